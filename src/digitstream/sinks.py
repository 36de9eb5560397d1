"""What a sink is: where results go.

A sink takes each stream's :class:`~digitstream.batch.BatchResult`\\ s in order,
keeps them until they are delivered, and then hands each result's receipt back
to its source (:meth:`~digitstream.batch.Receipt.delivered`). ``write`` waits
while the sink holds as much as it may: that is the back-pressure that stops the
source reading. A sink says in one line, its ``guarantee``, what a crash of each
process costs, and lives in :mod:`digitstream.connectors` under the URL scheme
that names it.

Most sinks are a :class:`QueuedSink`: the base owns the queue, its high-water
mark, flushing, retries with one backoff, and the bookkeeping of what is
delivered; the connector writes one method, :meth:`QueuedSink.deliver`, which
writes a group of results out. A sink whose peer confirms later (a listener
that acknowledges what it stored) sets ``confirms_later`` and calls
:meth:`QueuedSink.confirm` as confirmations come. For example, a sink that
prints::

    class PrintSink(QueuedSink):
        guarantee = "at most once: printed is delivered"
        @classmethod
        def build(cls, endpoint, options, config): return cls("stdout")
        def describe(self): return "stdout"
        async def deliver(self, results):
            for result in results:
                sys.stdout.buffer.write(result.output)

An in-memory sink for tests is :class:`digitstream.testing.MemorySink`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from abc import abstractmethod
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from digitstream.backoff import Backoff
from digitstream.batch import BatchResult, StreamId
from digitstream.connectors.options import Declared, Endpoint

if TYPE_CHECKING:
    from digitstream.config import AppConfig

log = logging.getLogger("digitstream.sink")


class Sink(Declared):
    """Where results go; see the module doc."""

    @classmethod
    @abstractmethod
    def build(cls, endpoint: Endpoint, options: dict[str, Any], config: AppConfig) -> Sink:
        """The sink ``endpoint`` names, with its ``options`` already parsed; no I/O."""

    @abstractmethod
    def describe(self) -> str:
        """Where it writes, for logs and the metrics UI (``127.0.0.1:7002``)."""

    #: called (on the event loop) when the sink fails for good and delivers nothing more:
    #: the application stops then, rather than wait on a sink that will never take results
    on_failure: Callable[[BaseException], None] | None = None

    async def start(self) -> None:
        """Start delivering (a sink may wait for its peer in the background)."""

    @abstractmethod
    async def write(self, result: BatchResult) -> None:
        """Take ``result``, the next of its stream; wait while the sink is full."""

    @abstractmethod
    async def flush(self) -> None:
        """Wait until everything taken so far is delivered."""

    @abstractmethod
    def delivered(self, stream: StreamId) -> int:
        """The sequence number up to which ``stream``'s results are delivered (0: none yet)."""

    @property
    @abstractmethod
    def undelivered(self) -> int:
        """Results taken and not yet delivered."""

    async def close(self) -> None:
        """Stop; what is not delivered by now stays undelivered."""

    def counters(self) -> dict | None:
        """What the metrics show of it (see :meth:`digitstream.sources.Source.counters`)."""
        return None


class ResumingSink(Sink):
    """A sink that knows where each named stream stands downstream, so that a source
    can resume a stream from there (``run --acked``)."""

    @abstractmethod
    async def open_stream(self, name: str, fingerprint: str) -> int:
        """The sequence number stream ``name`` resumes at (waiting for the peer if it is
        not there); raises ``StreamRefused`` if the peer holds other data under that name."""


class QueuedSink(Sink):
    """A sink with a queue: the connector writes :meth:`deliver`; see the module doc.

    What is held (queued, being delivered, or awaiting confirmation) is measured by
    :meth:`weight`, bytes of output unless a connector says otherwise; ``write``
    waits while ``high_water`` of it is held, and one ``deliver`` call takes up to
    ``group_limit`` of it (at least one result). A ``deliver`` that raises one of
    :meth:`retried_errors` is called again with the same results after a backoff, for ever: a
    result is never skipped.
    """

    high_water: int = 8 << 20
    group_limit: int = 1 << 20
    #: deliver() only sends: results are delivered once confirm() says so
    confirms_later: ClassVar[bool] = False

    def __init__(self, what: str, quiet_retries: bool = False):
        #: results waiting for deliver(), in order
        self._queue: collections.deque[BatchResult] = collections.deque()
        #: results sent and awaiting confirmation, per stream, in order (confirms_later)
        self._unconfirmed: dict[StreamId, collections.deque[BatchResult]] = {}
        #: per stream, the sequence number up to which the peer said it has everything
        self._confirmed: dict[StreamId, int] = {}
        self._held = 0  # weight of everything above and of the group being delivered
        self._undelivered = 0  # results, likewise
        self._delivering = 0  # frames of the results in the deliver() call under way
        self._delivered: dict[StreamId, int] = {}
        self._has_data = asyncio.Event()
        self._has_space = asyncio.Event()
        self._has_space.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._pump: asyncio.Task | None = None
        self.backoff = Backoff(what, log=log, quiet=quiet_retries)
        self.counts: collections.Counter = collections.Counter(delivered=0, retries=0)

    # ---------------------------------------------------------- the connector's part
    @abstractmethod
    async def deliver(self, results: list[BatchResult]) -> None:
        """Write ``results`` (consecutive in the queue, in order) out; raise one of
        :meth:`retried_errors` to have them given again later."""

    def retried_errors(self) -> tuple[type[BaseException], ...]:
        """What deliver() may raise to mean "try the same results again later" (logged
        once per outage, with backoff): a lost connection, by default."""
        return (OSError,)

    def weight(self, result: BatchResult) -> int:
        """How much of ``high_water`` a result takes: its output's bytes."""
        return len(result.output)

    def joins(self, first: BatchResult, result: BatchResult) -> bool:
        """Whether ``result`` may go in one deliver() call with the group ``first`` heads."""
        return True

    # ---------------------------------------------------------- the application's part
    async def start(self) -> None:
        self._pump = asyncio.create_task(self._run(), name=f"sink {self.describe()}")
        self._pump.add_done_callback(self._pump_ended)

    def _pump_ended(self, pump: asyncio.Task) -> None:
        if pump.cancelled() or pump.exception() is None:
            return
        exc = pump.exception()
        assert exc is not None
        log.error("sink %s failed: %s", self.describe(), exc)
        if self.on_failure is not None:
            self.on_failure(exc)

    async def write(self, result: BatchResult) -> None:
        if not result.count:
            return
        while self._held >= self.high_water:
            self._has_space.clear()
            await self._has_space.wait()
        self._queue.append(result)
        self._held += self.weight(result)
        self._undelivered += result.count
        self._idle.clear()
        self._has_data.set()

    async def flush(self) -> None:
        await self._idle.wait()

    def delivered(self, stream: StreamId) -> int:
        return self._delivered.get(stream, 0)

    @property
    def undelivered(self) -> int:
        return self._undelivered

    @property
    def held(self) -> int:
        """The weight held now (queued, being delivered, awaiting confirmation)."""
        return self._held

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)

    # ---------------------------------------------------------- confirmation
    def confirm(self, stream: StreamId, seq: int) -> None:
        """The peer has every result of ``stream`` before ``seq`` (confirms_later); it may
        say so before the results are sent (a peer that had them from before)."""
        if seq > self._confirmed.get(stream, 0):
            self._confirmed[stream] = seq
        waiting = self._unconfirmed.get(stream)
        if not waiting:
            return
        done = []
        while waiting and waiting[0].end_seq <= seq:
            done.append(waiting.popleft())
        if not waiting:
            del self._unconfirmed[stream]
        if done:
            self._settle(done)

    def confirmed(self, stream: StreamId) -> int:
        """The sequence number up to which the peer said it has ``stream``'s results."""
        return self._confirmed.get(stream, 0)

    def forget(self, stream: StreamId) -> None:
        """Start ``stream`` over (another stream now has its name): what the peer confirmed
        of it no longer counts. Only when nothing of it is held."""
        assert not self.holds(stream)
        self._confirmed.pop(stream, None)
        self._delivered.pop(stream, None)

    def holds(self, stream: StreamId) -> bool:
        """Whether results of ``stream`` are held: queued, or awaiting confirmation."""
        return stream in self._unconfirmed or any(r.stream == stream for r in self._queue)

    def unconfirmed(self) -> Iterator[BatchResult]:
        """Results sent and not yet confirmed, stream by stream, in order (to send again
        after a reconnection)."""
        for waiting in self._unconfirmed.values():
            yield from waiting

    # ---------------------------------------------------------- the pump
    def _next_group(self) -> list[BatchResult]:
        queue = self._queue
        first = queue[0]
        group = [first]
        size = self.weight(first)
        for i in range(1, len(queue)):
            result = queue[i]
            size += self.weight(result)
            if size > self.group_limit or not self.joins(first, result):
                break
            group.append(result)
        return group

    async def _run(self) -> None:
        queue = self._queue
        retried = self.retried_errors()
        while True:
            if not queue:
                self._update_idle()
                self._has_data.clear()
                await self._has_data.wait()
                continue
            group = self._next_group()
            self._delivering = sum(result.count for result in group)
            while True:
                try:
                    await self.deliver(group)
                    break
                except retried as exc:
                    self.counts["retries"] += 1
                    await self.backoff.failed(exc)
            self.backoff.succeeded()
            for _ in group:
                queue.popleft()
            self._delivering = 0
            if self.confirms_later:
                self._await_confirmation(group)
            else:
                self._settle(group)

    def _await_confirmation(self, group: list[BatchResult]) -> None:
        confirmed = self._confirmed
        already = []
        for result in group:
            if result.end_seq <= confirmed.get(result.stream, 0):
                already.append(result)
            else:
                self._unconfirmed.setdefault(result.stream, collections.deque()).append(result)
        if already:
            self._settle(already)
        else:
            self._update_idle()

    def _settle(self, results: list[BatchResult]) -> None:
        """``results`` are delivered: their streams' positions, the space they took, and
        their receipts back to the source."""
        delivered = self._delivered
        weight = self.weight
        for result in results:
            delivered[result.stream] = result.end_seq
            self._held -= weight(result)
            self._undelivered -= result.count
            self.counts["delivered"] += result.count
            if result.receipt is not None:
                result.receipt.delivered()
        if self._held < self.high_water:
            self._has_space.set()
        self._update_idle()

    def _update_idle(self) -> None:
        if not self._queue and not self._delivering and not self._unconfirmed:
            self._idle.set()
