"""A shadow model: a second bundle scored on the same batches as the served model, off the
served path.

``run --shadow PATH``: once a served batch's results are handed to the sink, its payloads
go to one worker process of the shadow's own (``digitstream.engine.pool_worker``, as the
local engine's workers), which decodes and classifies them with the shadow's flow. Nothing
served waits for it: the served results are written before the shadow sees the batch, the
batch goes by a thread, and its answer comes back by another. It may lag, and is bounded:
at most ``in_flight`` batches (64) and 32,768 messages are with it at once; a batch that
finds it full (or not ready: starting, or started again after it died) is skipped whole and
counted. The shadow
runs here whatever the engine serves with (this process, worker processes, Dask).

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

from digitstream.batch import Batch, BatchResult
from digitstream.engine.pool import BATCH, FLOW, READY, pack
from digitstream.monitor.labels import id_key
from digitstream.pipeline import Flow, FlowOptions

log = logging.getLogger("digitstream.monitor")

#: batches, and messages, with the shadow at once; a batch that finds it full is skipped
#: (many: a stream of small batches is not to be lost to the time a round trip takes)
IN_FLIGHT = 64
IN_FLIGHT_MESSAGES = 32_768
#: the longest wait before a shadow process that died is started again (seconds)
MAX_RESTART_DELAY = 10.0


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
            self.ready = True
            self._restart_delay = 0.5

    def _answer(self, job: int, result, error: str) -> None:
        self._jobs.discard(job)
        self._answered(job, result, error)

    def _gone(self, process: subprocess.Popen) -> None:
        if process is not self._process:
            return
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
        ):
            self.skipped_batches += 1
            self.skipped_messages += result.count
            return
        number = next(self._numbers)
        self._messages += result.count
        self._jobs[number] = _Job(
            result.predicted,
            result.true,
            result.ids,
            sum(seconds for _, seconds in result.stage_seconds),
            self._epoch,
        )
        self._process.send(number, batch)

    def _answered(self, number: int, result: BatchResult | None, error: str) -> None:
        job = self._jobs.pop(number, None)
        if job is None:
            return
        self._messages -= len(job.served)
        if job.epoch != self._epoch:
            return
        if result is None or result.predicted is None or len(result.predicted) != len(job.served):
            self.skipped_batches += 1
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
        self.batches += 1
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
                self.skipped_batches += 1
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
        await self._process.close()
