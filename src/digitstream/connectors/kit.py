"""The connector kit: what a connector module is made of, beside its source and sink.

A connector module holds its source and sink classes (:mod:`digitstream.sources`,
:mod:`digitstream.sinks`), declares their options
(:mod:`digitstream.connectors.options`), and ends with its :class:`Connector`,
the one line the registry (:mod:`digitstream.connectors.registry`) lists. A
broker's connector also gives ``send --to URL`` a :class:`Publisher` and
``listen URL`` a :class:`ResultReader`; its source can keep what it read in a
:class:`ReadLedger` until each batch's receipt takes its share.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from abc import abstractmethod
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from digitstream.backoff import Backoff
from digitstream.batch import Batch, Receipt, StreamId
from digitstream.batching import BatchPolicy, batches
from digitstream.connectors.options import (
    DEFAULT_SCHEME,
    GROUP,
    Endpoint,
    Location,
    Option,
    ServerURL,
    boolean,
    integer,
    mask,
    number,
    resolve_options,
    text,
)
from digitstream.sinks import Sink
from digitstream.sources import InputStream, Source
from digitstream.wire.framing import Payloads

__all__ = [
    "DEFAULT_SCHEME",
    "GROUP",
    "Connector",
    "Endpoint",
    "GroupSource",
    "Location",
    "Option",
    "Publisher",
    "ReadLedger",
    "ResultReader",
    "ServerURL",
    "boolean",
    "integer",
    "mask",
    "number",
    "resolve_options",
    "text",
]

T = TypeVar("T")


class ReadLedger(Generic[T]):
    """What a broker's source read and has not yet put in a batch, read by read: each
    read's items (entry ids, messages) in order, one per frame. The batching policy cuts
    batches from the reads' payloads; :meth:`take` gives the items of a batch's frames."""

    def __init__(self) -> None:
        self._reads: collections.deque[list[T]] = collections.deque()

    def add(self, items: list[T]) -> None:
        """The items of one read, one per frame, in order."""
        self._reads.append(items)

    def take(self, n: int) -> list[T]:
        """The items of the next ``n`` frames."""
        taken: list[T] = []
        reads = self._reads
        while len(taken) < n:
            head = reads[0]
            want = n - len(taken)
            if len(head) <= want:
                taken.extend(head)
                reads.popleft()
            else:
                taken.extend(head[:want])
                reads[0] = head[want:]
        return taken


# ---------------------------------------------------------------------------- registry
class Publisher(Protocol):
    """``send --to URL`` for a broker: adds messages to the input stream (synchronously)."""

    def describe(self) -> str:
        """Where it publishes, the password masked."""
        ...

    def publish(self, payloads: list[bytes], labels: list[bytes], ids: list[bytes]) -> None:
        """One message per payload, in order, with its label and id (as the broker's
        headers or fields); returns once the broker has them, or raises."""

    def flush(self) -> None:
        """Wait until everything published is stored by the broker."""

    def close(self) -> None: ...


class ResultReader(Protocol):
    """``listen URL`` for a broker: reads a result stream from its start, in its order."""

    def describe(self) -> str: ...

    def read(self, most: int, timeout: float) -> list[bytes]:
        """The next results' payloads (at most ``most``; ``[]`` after ``timeout`` seconds
        with none)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Connector:
    """A connector as the registry lists it: the URL schemes that name it, its source and
    sink classes, the ones ``run --acked`` takes, and, for a broker, what ``send --to URL``
    and ``listen URL`` use."""

    schemes: tuple[str, ...]
    source: type[Source] | None = None
    sink: type[Sink] | None = None
    acked_source: type[Source] | None = None
    acked_sink: type[Sink] | None = None
    publisher: Callable[[Endpoint], Publisher] | None = None
    result_reader: Callable[[Endpoint], ResultReader] | None = None
    #: what it is, for help: "Redis Streams"
    title: str = ""

    def part(self, role: str, acked: bool = False) -> type[Source] | type[Sink] | None:
        """The class for ``role`` (source or sink), acked or not; None if it has none."""
        if role == "source":
            return self.acked_source if acked else self.source
        return self.acked_sink if acked else self.sink


class GroupStream(InputStream):
    """What this process reads of a consumer group: the one stream of a :class:`GroupSource`,
    its batches cut by the batching policy and each given its receipt."""

    def __init__(self, source: GroupSource):
        self.source = source
        self.id: StreamId = source.stream_name

    async def batches(self) -> AsyncIterator[Batch]:
        source = self.source
        async for batch in batches(self.id, source.read, source.policy):
            batch.receipt = source.receipt_for(batch, source.unbatched.take(len(batch)))
            yield batch


class GroupSource(Source):
    """A broker's source, read as one consumer of a group: what this process reads is one
    stream of the application (the group shares the broker's stream among its processes).

    The base owns that stream, draining, the ledger of what was read and not yet batched,
    and acknowledging: receipts come back in order and are settled by :meth:`settle`, on
    a task of their own, retried with backoff (a receipt a sink settled itself is only
    counted). A connector writes :meth:`read` (payloads, and their items into
    :attr:`unbatched`), :meth:`receipt_for` and :meth:`settle`, and starts it all with
    :meth:`open_stream` once connected.
    """

    def __init__(self, stream_name: str, policy: BatchPolicy, what: str, log: logging.Logger):
        self.stream_name = stream_name
        self.policy = policy
        #: per frame read and not yet in a batch, what its receipt needs (ids, messages)
        self.unbatched: ReadLedger = ReadLedger()
        #: frames read and not yet acknowledged, by this process
        self.pending = 0
        self._stream: GroupStream | None = None
        self._draining = False
        self._drained = asyncio.Event()
        self._to_settle: collections.deque[Receipt] = collections.deque()
        self._settle_wanted = asyncio.Event()
        self._settled = asyncio.Event()
        self._settled.set()
        self._tasks: list[asyncio.Task] = []
        self._what = what
        self._log = log

    @abstractmethod
    async def read(self, timeout: float | None) -> list[Payloads] | None:
        """The next payloads (one group), their items added to :attr:`unbatched`; ``[]``
        when ``timeout`` passes first, None once draining."""

    @abstractmethod
    def receipt_for(self, batch: Batch, items: list) -> Receipt:
        """The receipt of ``batch``, whose frames' items (from :attr:`unbatched`) are
        ``items``."""

    @abstractmethod
    async def settle(self, receipts: list[Receipt]) -> None:
        """Acknowledge the inputs of ``receipts`` to the broker; raise one of
        :meth:`retried_errors` to have it tried again."""

    def retried_errors(self) -> tuple[type[BaseException], ...]:
        return (OSError,)

    def open_stream(self, *tasks: Coroutine[Any, Any, None]) -> None:
        """Connected: the stream opens, acknowledging starts, and ``tasks`` with it."""
        self._stream = GroupStream(self)
        self._tasks = [
            asyncio.create_task(self._settling(), name=f"acknowledging {self._what}"),
            *(asyncio.create_task(task) for task in tasks),
        ]

    async def streams(self) -> AsyncIterator[InputStream]:
        if self._stream is not None and not self._draining:
            yield self._stream
        await self._drained.wait()

    async def drain(self) -> None:
        self._draining = True
        self._drained.set()

    @property
    def draining(self) -> bool:
        return self._draining

    def acknowledge(self, receipt: Receipt) -> None:
        self.pending -= len(receipt)
        if receipt.settled:  # the sink acknowledged them with their results
            return
        self._to_settle.append(receipt)
        self._settled.clear()
        self._settle_wanted.set()

    async def _settling(self) -> None:
        backoff = Backoff(f"acknowledging on {self._what}", log=self._log)
        retried = self.retried_errors()
        while True:
            await self._settle_wanted.wait()
            self._settle_wanted.clear()
            while self._to_settle:
                receipts = list(self._to_settle)
                try:
                    await self.settle(receipts)
                except retried as exc:
                    await backoff.failed(exc)
                    continue
                backoff.succeeded()
                for _ in receipts:
                    self._to_settle.popleft()
            self._settled.set()

    async def close(self) -> None:
        """Wait (up to 10 s) for what is delivered to be acknowledged, then stop."""
        try:
            await asyncio.wait_for(self._settled.wait(), 10.0)
        except asyncio.TimeoutError:
            left = sum(map(len, self._to_settle))
            self._log.error("%d inputs left unacknowledged: %s did not answer", left, self._what)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
