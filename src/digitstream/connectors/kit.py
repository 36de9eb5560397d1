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

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

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
from digitstream.sources import Source

__all__ = [
    "DEFAULT_SCHEME",
    "GROUP",
    "Connector",
    "Endpoint",
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
