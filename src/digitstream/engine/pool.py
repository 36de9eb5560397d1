"""Worker processes on this machine for the local engine (``--engine local --workers N``).

A decode-heavy format (json: a parser and a number conversion per frame) keeps
one core busy at a few hundred thousand frames a second; the pool spreads the
batches over N processes, while the application's process keeps the sockets,
the framing and the metrics::

    run process                                     each worker process
    source -> Batch --payloads' bytes-->  socket pair  --> Flow.process
    sink  <- BatchResult <----------------  pickled  <---'

**What travels.** A batch goes as its payloads' bytes in one buffer (the read
buffer's range that holds them, or the ``(n, length)`` array) and where each
payload lies, never a Python object per message. The flow goes once per model,
pickled: the application builds it from the bundle it loaded and checked, and
the bytes travel only over a socket pair that the two processes alone hold. Each
batch names the generation of the flow serving when it was submitted, so a swap
(:meth:`ProcessPool.set_flow`) changes the model between two batches exactly.

**Nothing is lost.** Each worker has a thread that sends its batches and one
that takes its answers, so the event loop never waits on a socket. A worker
that dies (SIGKILL, out of memory) is noticed by its reader at once: each batch
it held goes to another worker, or is computed in this process when none is
ready. A worker answers in the order it was sent, so the oldest batch it held
is the one it was computing: that one waits for another worker rather than
being tried on this process (it may end any process), and once two workers
were lost computing it, it goes on as two halves, and so on down to the frames
that end a worker alone, which are answered with an error. A worker
that cannot answer a batch (a generation it does not hold, a fault) says so and
the batch is computed here. A worker lost is started again (after a pause that
grows while new workers die before they are ready), and until one is ready,
batches are computed here.

**A worker stuck.** A worker that stops (SIGSTOP, a model step that never
returns) would hold its stream up for good: the output keeps input order. So the
batch a worker is computing has a deadline, ``deadline`` seconds (``run
--batch-deadline``, 2 by default) or four times the recent time a batch takes,
if that is longer, from when the worker could start on it. A worker past it is
killed (SIGKILL) and handled as any worker lost: its batches go elsewhere, the
late one counting against it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import queue
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import numpy as np

from digitstream.batch import Batch, BatchResult
from digitstream.pipeline import Flow
from digitstream.wire.framing import Payloads, Spans

log = logging.getLogger("digitstream.engine")

#: message kinds: the pool sends FLOW and BATCH, a worker answers FLOW with READY
FLOW, BATCH, READY = b"F", b"B", b"R"
#: the longest a worker lost is waited for before it is started again
MAX_RESTART_DELAY = 10.0
#: how often the batches being computed are checked against their deadline (seconds)
WATCH_INTERVAL = 0.1


def pack(payloads: Payloads) -> tuple[tuple, memoryview | np.ndarray]:
    """``payloads`` as (layout, buffer): one buffer for all their bytes, no copy of
    a fixed group or of payloads that lie in one read buffer."""
    if payloads.fixed is not None:
        fixed = np.ascontiguousarray(payloads.fixed)
        return ("fixed", fixed.shape[1]), fixed.reshape(-1)
    spans = payloads.spans if payloads.spans is not None else payloads.as_spans()
    if len(spans.starts) == 0:
        return ("spans", spans.starts, spans.lengths), np.empty(0, dtype=np.uint8)
    low = int(spans.starts.min())
    high = int((spans.starts + spans.lengths).max())
    return ("spans", spans.starts - low, spans.lengths), spans.data[low:high]


def payloads_of(layout: tuple, data: np.ndarray) -> Payloads:
    """The payloads that :func:`pack` made ``layout`` and ``data`` of."""
    if layout[0] == "fixed":
        return Payloads(fixed=data.reshape(-1, layout[1]))
    _, starts, lengths = layout
    return Payloads(spans=Spans(data, starts, lengths))


@dataclass
class _Job:
    batch: Batch
    generation: int
    flow: Flow  # the flow serving at submission: it answers here if no worker can
    future: asyncio.Future
    attempts: int = 0  # workers lost while computing it (its halves start at 1)
    sent: float = 0.0  # time.monotonic() when it was sent to its worker


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen
    sock: socket.socket
    conn: Connection  # over a copy of ``sock``'s descriptor
    outbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    jobs: dict[int, _Job] = field(default_factory=dict)
    ready: bool = False
    lost: bool = False
    answered: float = 0.0  # time.monotonic() of its last answer
    killed: bool = False  # by the pool, past a deadline
    sender: threading.Thread | None = None


class ProcessPool:
    """N worker processes that answer batches with the flow they were sent."""

    def __init__(self, size: int, flow: Flow, in_flight: int = 2, deadline: float = 2.0):
        self.size = size
        self.in_flight = in_flight
        #: seconds a batch may take, at the least (0: no deadline)
        self.deadline = deadline
        self.late_kills = 0  # workers killed past a batch's deadline
        self._batch_seconds = 0.0  # a moving average of the time a batch takes
        self.local_batches = 0  # batches computed in this process
        self.restarts = 0
        self._generation = 0
        self._flow = flow
        self._flow_message: bytes | None = None
        self._workers: dict[int, _Worker] = {}
        self._jobs = itertools.count()
        self._freed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._restart_delay = 0.5
        self._restarting: set[asyncio.TimerHandle] = set()
        self._watch: asyncio.TimerHandle | None = None
        #: batches a worker was lost computing, waiting for a worker to be ready
        self._waiting: list[_Job] = []

    # ---------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the workers; batches are computed here until one is ready."""
        self._loop = asyncio.get_running_loop()
        self._freed = asyncio.Event()
        self._flow_message = self._pickled(self._flow)
        for index in range(self.size):
            self._spawn(index)

    def _pickled(self, flow: Flow) -> bytes | None:
        try:
            return FLOW + pickle.dumps((self._generation, flow), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            log.warning("this model cannot go to the worker processes (%s): it is served here", exc)
            return None

    def _spawn(self, index: int) -> None:
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
            log.error("cannot start worker process %d: %s", index, exc)
            self._restart_later(index)
            return
        finally:
            theirs.close()
        worker = _Worker(index, process, mine, Connection(os.dup(mine.fileno())))
        self._workers[index] = worker
        if self._flow_message is not None:
            worker.outbox.put((self._flow_message, None))
        worker.sender = threading.Thread(
            target=self._send, args=(worker,), name=f"pool worker {index} send", daemon=True
        )
        worker.sender.start()
        threading.Thread(
            target=self._receive, args=(worker,), name=f"pool worker {index} receive", daemon=True
        ).start()

    async def close(self) -> None:
        """Stop every worker; batches still held are computed here."""
        self._closing = True
        if self._watch is not None:
            self._watch.cancel()
        for handle in self._restarting:
            handle.cancel()
        workers = list(self._workers.values())
        for worker in workers:
            worker.outbox.put(None)  # the sender closes the connection: the worker exits
        for worker in workers:
            self._lose(worker, "closing")
        waiting, self._waiting = self._waiting, []
        for job in waiting:
            self._compute_here(job)
        await asyncio.to_thread(_reap, [w.process for w in workers])

    def state(self) -> dict:
        ready = [w for w in self._workers.values() if w.ready and not w.lost]
        return {
            "worker_processes": len(ready),
            "in_process_batches": self.local_batches,
            "restarts": self.restarts,
            "late_kills": self.late_kills,
        }

    @property
    def capacity(self) -> int:
        return self.size * self.in_flight

    # ------------------------------------------------------------ batches
    async def submit(self, batch: Batch, flow: Flow) -> asyncio.Future[BatchResult]:
        """Send ``batch`` to the least busy ready worker, waiting while all are full;
        computed here (the future already done) when no worker is ready."""
        assert self._freed is not None and self._loop is not None
        generation = self._generation
        while True:
            worker = self._least_busy()
            if worker is None or self._flow_message is None:
                return self._here(batch, flow)
            if len(worker.jobs) < self.in_flight:
                break
            self._freed.clear()
            await self._freed.wait()  # the batch keeps the flow serving when it came
        future = self._loop.create_future()
        self._dispatch(worker, _Job(batch, generation, flow, future))
        return future

    def _least_busy(self) -> _Worker | None:
        ready = [w for w in self._workers.values() if w.ready and not w.lost]
        return min(ready, key=lambda w: len(w.jobs), default=None)

    def _dispatch(self, worker: _Worker, job: _Job) -> None:
        number = next(self._jobs)
        job.sent = time.monotonic()
        if not worker.jobs:
            worker.answered = job.sent  # it may start on this one now
        worker.jobs[number] = job
        if self.deadline > 0 and self._watch is None and self._loop is not None:
            self._watch = self._loop.call_later(WATCH_INTERVAL, self._check_deadlines)
        batch = job.batch
        layout, data = pack(batch.payloads)
        header = BATCH + pickle.dumps(
            (job.generation, number, batch.stream, batch.first_seq, layout),
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        worker.outbox.put((header, data))

    def _here(self, batch: Batch, flow: Flow) -> asyncio.Future[BatchResult]:
        assert self._loop is not None
        self.local_batches += 1
        future = self._loop.create_future()
        future.set_result(flow.process(batch))
        return future

    def set_flow(self, flow: Flow) -> None:
        """Batches submitted from now on are answered by ``flow``."""
        self._generation += 1
        self._flow = flow
        self._flow_message = self._pickled(flow)
        if self._flow_message is None:
            return
        for worker in self._workers.values():
            if not worker.lost:
                worker.outbox.put((self._flow_message, None))

    # ------------------------------------------- the workers' threads and answers
    def _send(self, worker: _Worker) -> None:
        conn = worker.conn
        try:
            while (item := worker.outbox.get()) is not None:
                header, data = item
                conn.send_bytes(header)
                if data is not None:
                    conn.send_bytes(data)
        except (OSError, ValueError):
            pass  # the receiver hears of the loss
        finally:
            # a closed pool, or a lost worker: shutting our end tells the worker to exit,
            # and ends the receiver's wait (which then closes the descriptors)
            try:
                worker.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _receive(self, worker: _Worker) -> None:
        assert self._loop is not None
        conn, loop = worker.conn, self._loop
        try:
            while True:
                message = conn.recv_bytes()
                if message[:1] == READY:
                    loop.call_soon_threadsafe(self._ready, worker)
                    continue
                number, result, error = pickle.loads(message)
                loop.call_soon_threadsafe(self._answered, worker, number, result, error)
        except (EOFError, OSError, pickle.UnpicklingError):
            pass
        # the sender may be writing: stop it and let it finish before the descriptors go
        # (closed under it, one could be reused for another file while it still writes)
        try:
            worker.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        worker.outbox.put(None)
        if worker.sender is not None:
            worker.sender.join(5.0)
        conn.close()
        worker.sock.close()
        try:
            loop.call_soon_threadsafe(self._lose, worker, "its connection closed")
        except RuntimeError:
            pass  # the loop is closed: nothing waits for these batches any more

    def _ready(self, worker: _Worker) -> None:
        if worker.lost or worker.ready:
            return
        worker.ready = True
        self._restart_delay = 0.5
        log.info("worker process %d (pid %d) is ready", worker.index, worker.process.pid)
        waiting, self._waiting = self._waiting, []
        for job in waiting:
            self._place(job)
        self._wake()

    def _answered(self, worker: _Worker, number: int, result, error: str) -> None:
        job = worker.jobs.pop(number, None)
        if job is None:
            return  # answered already, when the worker was taken for lost
        now = time.monotonic()
        took = now - max(job.sent, worker.answered)
        self._batch_seconds = (
            took if not self._batch_seconds else (0.9 * self._batch_seconds + 0.1 * took)
        )
        worker.answered = now
        if result is None:
            log.warning("worker process %d could not answer a batch: %s", worker.index, error)
            self.local_batches += 1
            result = job.flow.process(job.batch)
        job.future.set_result(result)
        self._wake()

    def _lose(self, worker: _Worker, why: str) -> None:
        if worker.lost:
            return
        worker.lost = True
        worker.outbox.put(None)
        if self._workers.get(worker.index) is worker:
            del self._workers[worker.index]
        jobs = list(worker.jobs.values())
        worker.jobs.clear()
        if not self._closing:
            code = worker.process.poll()
            log.warning(
                "worker process %d (pid %d) lost: %s%s; its %d batch(es) go elsewhere",
                worker.index,
                worker.process.pid,
                why,
                "" if code is None else f", exit code {code}",
                len(jobs),
            )
            self._restart_later(worker.index, early=not worker.ready)
        for position, job in enumerate(jobs):
            # a worker answers in the order it was sent: the oldest batch it held is the
            # one it was computing, the only one that may have been its end
            self._retry(job, suspect=position == 0)
        self._wake()

    def _retry(self, job: _Job, suspect: bool) -> None:
        if self._closing:
            self._compute_here(job)
            return
        job.attempts += suspect
        if job.attempts >= 2:
            # two workers were lost computing it: the batch itself may be their end (a
            # frame a model step crashes or hangs on), or an outside kill hit it twice.
            # Halves, then quarters, go on, down to the frames that end workers alone.
            if len(job.batch) == 1:
                reason = "engine failed: two worker processes were lost on this message"
                job.future.set_result(job.flow.failed(job.batch, reason))
                return
            for half in self._halves(job):
                self._place(half)
            return
        self._place(job)

    def _place(self, job: _Job) -> None:
        """To the least busy ready worker; with none, computed here, unless a worker was lost
        computing it: that one waits for a worker (it may end this process too)."""
        other = self._least_busy()
        if other is not None:
            self._dispatch(other, job)
        elif job.attempts:
            self._waiting.append(job)
        else:
            self._compute_here(job)

    def _compute_here(self, job: _Job) -> None:
        self.local_batches += 1
        job.future.set_result(job.flow.process(job.batch))

    def _halves(self, job: _Job) -> list[_Job]:
        """``job`` as two jobs of half its frames each, suspect as it was; its future is
        done when theirs are, with their results joined."""
        assert self._loop is not None
        batch, middle = job.batch, len(job.batch) // 2
        halves = [
            _Job(part, job.generation, job.flow, self._loop.create_future(), attempts=1)
            for part in (batch.part(0, middle), batch.part(middle, len(batch)))
        ]

        def joined(_: asyncio.Future) -> None:
            if all(h.future.done() for h in halves) and not job.future.done():
                first, second = (h.future.result() for h in halves)
                job.future.set_result(first.then(second))

        for half in halves:
            half.future.add_done_callback(joined)
        return halves

    def _restart_later(self, index: int, early: bool = False) -> None:
        if self._closing or self._loop is None:
            return
        delay = self._restart_delay
        if early:  # it died before it was ready: wait longer each time
            self._restart_delay = min(MAX_RESTART_DELAY, self._restart_delay * 2)

        def restart() -> None:
            self._restarting.discard(handle)
            self.restarts += 1
            self._spawn(index)

        handle = self._loop.call_later(delay, restart)
        self._restarting.add(handle)

    def _wake(self) -> None:
        if self._freed is not None:
            self._freed.set()

    def _check_deadlines(self) -> None:
        """Kill each worker whose batch in hand is past its deadline (see the module doc)."""
        self._watch = None
        if self._closing:
            return
        now = time.monotonic()
        allowed = max(self.deadline, 4 * self._batch_seconds)
        busy = False
        for worker in list(self._workers.values()):
            if not worker.jobs or worker.lost:
                continue
            busy = True
            oldest = next(iter(worker.jobs.values()))
            started = max(oldest.sent, worker.answered)
            if not worker.killed and now - started > allowed:
                worker.killed = True
                self.late_kills += 1
                log.warning(
                    "worker process %d (pid %d) did not answer a batch of %d messages "
                    "within %.1f s: killed",
                    worker.index,
                    worker.process.pid,
                    len(oldest.batch),
                    allowed,
                )
                worker.process.kill()  # its receiver hears of the end: the batches go on
        if busy and self._loop is not None:
            self._watch = self._loop.call_later(WATCH_INTERVAL, self._check_deadlines)


def _reap(processes: list[subprocess.Popen], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
