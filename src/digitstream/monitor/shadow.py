"""A shadow model: a second bundle scored on the same batches as the served model, off the
served path.

``run --shadow PATH``: once a served batch's results are handed to the sink, its payloads
go to one worker process of the shadow's own (``digitstream.engine.pool_worker``, as the
local engine's workers), which decodes and classifies them with the shadow's flow. Nothing
served waits for it: the served results are written before the shadow sees the batch, the
batch goes by a thread, and its answer comes back by another; consecutive batches go
together (up to 8,192 messages, or 10 ms after the first), so that small batches cost it
little. It may lag, and is bounded: at most ``in_flight`` groups (64)
and 32,768 messages are with it at once, and its process may take at most 8% of a core
(:data:`SHARE`, its CPU time as the system counts it); a batch that finds it full, out of
time or not ready (starting, or started again after it died) is skipped whole and counted.
The shadow runs here whatever the engine serves with (this process, worker processes, Dask).

Its answers are compared, message by message, with the served model's: ``scored`` (messages
both answered), ``agreement`` (the share given the same class), ``disagreement`` (served
class x shadow class counts), and each model's accuracy on the labelled messages both scored
(inline labels, and late labels whose ids both models had answered), and each model's time
per batch. The comparison starts again when either model changes (a swap, a promotion).
A new bundle written to PATH is swapped in as the served model's is (same checks, no
message lost); ``digitstream promote`` uses that.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection

import numpy as np
import psutil

from digitstream.batch import Batch, BatchResult
from digitstream.engine.pool import BATCH, FLOW, READY, pack
from digitstream.monitor.labels import id_key
from digitstream.pipeline import Flow, FlowOptions
from digitstream.wire.framing import Payloads

log = logging.getLogger("digitstream.monitor")

#: batches, and messages, with the shadow at once; a batch that finds it full is skipped
#: (many: a stream of small batches is not to be lost to the time a round trip takes)
IN_FLIGHT = 64
IN_FLIGHT_MESSAGES = 32_768
#: the longest wait before a shadow process that died is started again (seconds)
MAX_RESTART_DELAY = 10.0
#: the share of one core the shadow's process may take (its CPU time, read every
#: CPU_EVERY seconds): a batch is offered while the shadow has CPU time in hand (a token
#: bucket earning SHARE of the time, holding at most SHARE_BURST seconds). Below
#: saturation it scores every batch; a saturated run, whose machine has no core to spare,
#: skips shadow batches rather than slowing
SHARE = 0.08
SHARE_BURST = 0.05
CPU_EVERY = 0.02
#: batches go to the shadow together, up to this many messages or this long after the
#: first: a stream of small batches costs it one round trip per group
GROUP_MESSAGES = 8192
GROUP_SECONDS = 0.01


class ShadowProcess:
    """The shadow's flow in a worker process of its own: ``answered(job, result, error)`` and
    ``lost(jobs)`` are called on the event loop."""

    def __init__(self, flow: Flow, answered, lost):
        self._flow = flow
        self._generation = 0
        self._answered, self._lost = answered, lost
        self._loop: asyncio.AbstractEventLoop | None = None
        self._process: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._outbox: list = []
        self._wake = threading.Condition()
        self._jobs: set[int] = set()
        self.ready = False
        self.restarts = 0
        self._closing = False
        self._restart_delay = 0.5
        self._restart: asyncio.TimerHandle | None = None
        self._cpu_before = 0.0  # CPU seconds of the processes before this one, once ready
        self._cpu_at_ready = 0.0  # this one's when it became ready

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._spawn()

    def _spawn(self) -> None:
        self._restart = None
        if self._closing:
            return
        mine, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "digitstream.engine.pool_worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            mine.close()
            log.error("cannot start the shadow model's process: %s", exc)
            self._restart_later()
            return
        finally:
            theirs.close()
        self._process, self._sock = process, mine
        conn = Connection(os.dup(mine.fileno()))
        outbox: list = [
            FLOW + pickle.dumps((self._generation, self._flow), pickle.HIGHEST_PROTOCOL)
        ]
        self._outbox = outbox
        sender = threading.Thread(
            target=self._send, args=(conn, outbox, mine), name="shadow send", daemon=True
        )
        receiver = threading.Thread(
            target=self._receive,
            args=(conn, outbox, mine, process, sender),
            name="shadow receive",
            daemon=True,
        )
        sender.start()
        receiver.start()

    def cpu_seconds(self) -> float | None:
        """CPU seconds the shadow's processes have used since each was ready, all of them
        together (None if the system does not say)."""
        process = self._process
        if process is None or not self.ready:
            return self._cpu_before
        used = _cpu_of(process)
        return None if used is None else self._cpu_before + used - self._cpu_at_ready

    def set_flow(self, flow: Flow) -> None:
        """Batches sent from now on are answered by ``flow``."""
        self._generation += 1
        self._flow = flow
        self._put(FLOW + pickle.dumps((self._generation, flow), pickle.HIGHEST_PROTOCOL))

    def send(self, job: int, batch: Batch) -> None:
        layout, data = pack(batch.payloads)
        header = BATCH + pickle.dumps(
            (self._generation, job, batch.stream, batch.first_seq, layout),
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        self._jobs.add(job)
        self._put(header, data)

    def _put(self, *messages) -> None:
        with self._wake:
            self._outbox.extend(messages)
            self._wake.notify()

    def _send(self, conn: Connection, outbox: list, sock: socket.socket) -> None:
        try:
            while True:
                with self._wake:
                    while not outbox:
                        self._wake.wait()
                    messages = outbox[:]
                    outbox.clear()
                for message in messages:
                    if message is None:
                        return
                    conn.send_bytes(message)
        except (OSError, ValueError):
            pass  # the receiver hears of the loss
        finally:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _receive(
        self,
        conn: Connection,
        outbox: list,
        sock: socket.socket,
        process: subprocess.Popen,
        sender: threading.Thread,
    ) -> None:
        loop = self._loop
        assert loop is not None
        try:
            while True:
                message = conn.recv_bytes()
                if message[:1] == READY:
                    loop.call_soon_threadsafe(self._became_ready, process)
                    continue
                job, result, error = pickle.loads(message)
                loop.call_soon_threadsafe(self._answer, job, result, error)
        except (EOFError, OSError, pickle.UnpicklingError):
            pass
        with self._wake:
            outbox.append(None)
            self._wake.notify_all()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        # the sender may be writing: let it finish before the descriptors go
        sender.join(5.0)
        conn.close()
        sock.close()
        try:
            loop.call_soon_threadsafe(self._gone, process)
        except RuntimeError:
            pass  # the loop is closed: nothing waits any more

    def _became_ready(self, process: subprocess.Popen) -> None:
        if process is self._process and not self._closing:
            if not self.ready:
                log.info("shadow model's process (pid %d) is ready", process.pid)
                # what it took to start (imports, the model) is not the shadow's running cost
                self._cpu_at_ready = _cpu_of(process) or 0.0
            self.ready = True
            self._restart_delay = 0.5

    def _answer(self, job: int, result, error: str) -> None:
        self._jobs.discard(job)
        self._answered(job, result, error)

    def _gone(self, process: subprocess.Popen) -> None:
        if process is not self._process:
            return
        if self.ready:
            used = _cpu_of(process)  # None once reaped: what it used is then not counted
            self._cpu_before += 0.0 if used is None else used - self._cpu_at_ready
        self.ready = False
        jobs, self._jobs = self._jobs, set()
        if not self._closing:
            code = process.poll()
            log.warning(
                "shadow model's process (pid %d) lost%s; its %d batch(es) are skipped",
                process.pid,
                "" if code is None else f", exit code {code}",
                len(jobs),
            )
            self._restart_later()
        self._lost(jobs)

    def _restart_later(self) -> None:
        if self._closing or self._loop is None:
            return
        delay = self._restart_delay
        self._restart_delay = min(MAX_RESTART_DELAY, delay * 2)

        def again() -> None:
            self.restarts += 1
            self._spawn()

        self._restart = self._loop.call_later(delay, again)

    async def close(self) -> None:
        self._closing = True
        self.ready = False
        if self._restart is not None:
            self._restart.cancel()
        self._put(None)
        process = self._process
        if process is not None:
            await asyncio.to_thread(_reap, process)


def _cpu_of(process: subprocess.Popen) -> float | None:
    """CPU seconds (user and system) ``process`` has used; None if it cannot be read."""
    try:
        times = psutil.Process(process.pid).cpu_times()
    except (psutil.Error, OSError):
        return None
    return times.user + times.system


def _reap(process: subprocess.Popen, timeout: float = 5.0) -> None:
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class _Job:
    served: np.ndarray  # the served model's classes (-1: rejected)
    true: np.ndarray | None  # inline labels' codes
    ids: list | None
    served_seconds: float
    epoch: int
    batches: int = 1  # the served batches it holds

    @staticmethod
    def joined(jobs: list[_Job]) -> _Job:
        """Consecutive jobs as one."""
        if len(jobs) == 1:
            return jobs[0]
        trues = [j.true for j in jobs]
        return _Job(
            np.concatenate([j.served for j in jobs]),
            None
            if all(t is None for t in trues)
            else np.concatenate(
                [t if t is not None else np.full(len(j.served), -1) for t, j in zip(trues, jobs)]
            ),
            None
            if all(j.ids is None for j in jobs)
            else [
                i for j in jobs for i in (j.ids if j.ids is not None else [None] * len(j.served))
            ],
            sum(j.served_seconds for j in jobs),
            jobs[0].epoch,
            sum(j.batches for j in jobs),
        )


class Shadow:
    """``bundle`` scored off the served path; see the module doc. ``options`` are the run's
    flow options (formats, fusing), ``classes`` the served model's class labels (the
    shadow's, as checked), ``label_window`` bounds the ids held for late labels."""

    def __init__(
        self,
        bundle,
        options: FlowOptions,
        classes: list[str],
        label_window: int = 100_000,
        in_flight: int = IN_FLIGHT,
        clock=time.time,
    ):
        self.bundle = bundle
        self.options = replace(
            options, output_format="text", worker="shadow", drift=False, predictions=True
        )
        self.classes = list(classes)
        self.in_flight = in_flight
        self.label_window = label_window
        self._clock = clock
        self._jobs: dict[int, _Job] = {}
        self._messages = 0  # in the batches with the shadow
        self._group: list[tuple[Payloads, _Job]] = []  # held back to go together
        self._grouped = 0  # messages in them
        self._flush_timer: asyncio.TimerHandle | None = None
        self._credit = SHARE_BURST  # seconds of CPU the shadow may spend now
        self._measured_at = time.monotonic()
        self._cpu_seen = 0.0  # the shadow process's CPU seconds when last read
        self._numbers = itertools.count()
        self._served_flow: Flow | None = None
        self._epoch = 0
        self.swaps = 0
        self._reset()
        self._process = ShadowProcess(self.build_flow(bundle), self._answered, self._lost)

    def _reset(self) -> None:
        k = len(self.classes)
        self.since = self._clock()
        self.offered = self.batches = self.scored = self.agreed = 0
        self.skipped_batches = self.skipped_messages = 0
        self.disagreement = np.zeros((k, k), dtype=np.int64)
        self.labelled = self.served_correct = self.shadow_correct = 0
        self.served_seconds = self.shadow_seconds = 0.0
        self._held: OrderedDict[str, tuple[int, int]] = OrderedDict()

    def _restart_comparison(self) -> None:
        self._epoch += 1
        self._reset()

    # ------------------------------------------------- the watcher's "serving"
    def build_flow(self, bundle) -> Flow:
        """The flow that scores ``bundle`` as the shadow."""
        return Flow.build(bundle.pipeline, self.options)

    async def switch(self, bundle, flow: Flow) -> dict:
        """Score ``bundle`` (with ``flow``) as the shadow from the next batch on."""
        self._process.set_flow(flow)
        self.bundle = bundle
        self.swaps += 1
        self._restart_comparison()
        return {}

    # ------------------------------------------------------------- batches
    def start(self) -> None:
        self._process.start()

    def offer(self, batch: Batch, result: BatchResult, served_flow: Flow) -> None:
        """A served batch and its result (with per-message predictions): to the shadow, or
        skipped when it is full or not ready."""
        if served_flow is not self._served_flow:
            if self._served_flow is not None:
                self._restart_comparison()  # the served model changed
            self._served_flow = served_flow
        if result.predicted is None:
            return
        self.offered += 1
        if (
            not self._process.ready
            or len(self._jobs) >= self.in_flight
            or self._messages + result.count > IN_FLIGHT_MESSAGES
            or not self._time_to_spare()
        ):
            self.skipped_batches += 1
            self.skipped_messages += result.count
            return
        job = _Job(
            result.predicted,
            result.true,
            result.ids,
            sum(seconds for _, seconds in result.stage_seconds),
            self._epoch,
        )
        self._messages += result.count
        self._group.append((batch.payloads, job))
        self._grouped += result.count
        if self._grouped >= GROUP_MESSAGES:
            self._flush()
        elif self._flush_timer is None:
            loop = asyncio.get_running_loop()
            self._flush_timer = loop.call_later(GROUP_SECONDS, self._flush)

    def _flush(self) -> None:
        """Send the batches held back to be sent together, as one."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        group, self._group, self._grouped = self._group, [], 0
        if not group:
            return
        parts = [payloads for payloads, _ in group]
        widths = {p.fixed.shape[1] if p.fixed is not None else None for p in parts}
        if len(parts) == 1:
            payloads = parts[0]
        elif None not in widths and len(widths) == 1:
            payloads = Payloads(fixed=np.concatenate([p.fixed for p in parts]))
        else:  # frames of varying lengths: joined as a list
            payloads = Payloads.from_list([item for p in parts for item in p.to_list()])
        self._send([job for _, job in group], Batch("shadow", 0, payloads))

    def _send(self, jobs: list[_Job], batch: Batch) -> None:
        number = next(self._numbers)
        self._jobs[number] = _Job.joined(jobs)
        self._process.send(number, batch)

    def _time_to_spare(self) -> bool:
        """Whether the shadow's share of a core (SHARE) allows it another batch now."""
        now = time.monotonic()
        if now - self._measured_at >= CPU_EVERY:
            used = self._process.cpu_seconds()
            if used is not None:
                self._credit -= max(0.0, used - self._cpu_seen)
                self._cpu_seen = used
            self._credit = min(self._credit + (now - self._measured_at) * SHARE, SHARE_BURST)
            self._measured_at = now
        return self._credit > 0

    def _answered(self, number: int, result: BatchResult | None, error: str) -> None:
        job = self._jobs.pop(number, None)
        if job is None:
            return
        self._messages -= len(job.served)
        if job.epoch != self._epoch:
            return
        if result is None or result.predicted is None or len(result.predicted) != len(job.served):
            self.skipped_batches += job.batches
            self.skipped_messages += len(job.served)
            if error:
                log.warning("the shadow model could not answer a batch: %s", error)
            return
        served, shadow = job.served, result.predicted
        both = (served >= 0) & (shadow >= 0)
        k = len(self.classes)
        pairs = served[both].astype(np.int64) * k + shadow[both]
        self.disagreement += np.bincount(pairs, minlength=k * k).reshape(k, k)
        self.scored += int(both.sum())
        self.agreed += int(np.count_nonzero(served[both] == shadow[both]))
        self.batches += job.batches
        self.served_seconds += job.served_seconds
        self.shadow_seconds += sum(seconds for _, seconds in result.stage_seconds)
        awaiting = both
        if job.true is not None:
            labelled = both & (job.true >= 0)
            true = job.true[labelled]
            self.labelled += int(labelled.sum())
            self.served_correct += int(np.count_nonzero(served[labelled] == true))
            self.shadow_correct += int(np.count_nonzero(shadow[labelled] == true))
            awaiting = both & (job.true < 0)
        if job.ids is not None:
            self._hold(job.ids, served, shadow, awaiting)

    def _hold(
        self, ids: list, served: np.ndarray, shadow: np.ndarray, awaiting: np.ndarray
    ) -> None:
        """Both answers for messages with ids, for their late labels (at most label_window)."""
        rows = np.flatnonzero(awaiting).tolist()
        served_codes, shadow_codes = served.tolist(), shadow.tolist()
        held = self._held
        for i in rows:
            key = id_key(ids[i])
            if key is not None:
                held[key] = (served_codes[i], shadow_codes[i])
        while len(held) > self.label_window:
            held.popitem(last=False)

    def _lost(self, numbers) -> None:
        for number in numbers:
            job = self._jobs.pop(number, None)
            if job is not None:
                self._messages -= len(job.served)
            if job is not None and job.epoch == self._epoch:
                self.skipped_batches += job.batches
                self.skipped_messages += len(job.served)

    def labels_joined(self, matched: list[tuple[str, int, int]]) -> None:
        """Late labels matched to served predictions: ``(id, true code, served code)``."""
        held = self._held
        for key, true, _ in matched:
            pair = held.pop(key, None)
            if pair is None:
                continue  # the shadow did not score it (skipped, not yet, or before a change)
            self.labelled += 1
            self.served_correct += pair[0] == true
            self.shadow_correct += pair[1] == true

    # ------------------------------------------------------------- reading
    def report(self) -> dict:
        """The ``shadow`` section of ``/api/stats``."""
        card = self.bundle.card
        return {
            "model": card,
            "path": str(self.bundle.path),
            "content_hash": self.bundle.content_hash,
            "ready": self._process.ready,
            "since": self.since,
            "offered_batches": self.offered,
            "batches": self.batches,
            "scored": self.scored,
            "agreement": self.agreed / self.scored if self.scored else None,
            "disagreement": {"labels": list(self.classes), "matrix": self.disagreement.tolist()},
            "labelled": self.labelled,
            "served_accuracy": self.served_correct / self.labelled if self.labelled else None,
            "shadow_accuracy": self.shadow_correct / self.labelled if self.labelled else None,
            "skipped_batches": self.skipped_batches,
            "skipped_messages": self.skipped_messages,
            "in_flight": len(self._jobs),
            "seconds_per_batch": {
                "served": self.served_seconds / self.batches if self.batches else None,
                "shadow": self.shadow_seconds / self.batches if self.batches else None,
            },
            "swaps": self.swaps,
            "restarts": self._process.restarts,
        }

    async def close(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        await self._process.close()
