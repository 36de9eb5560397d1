"""What a sink is: where results go.

A sink takes each stream's :class:`~digitstream.pipeline.BatchResult`\\ s in
order, keeps them until they are delivered, and says up to which sequence number
of a stream they are (what a source that acknowledges to its upstream needs).
``write`` waits while the sink holds as much as it may: that is the
back-pressure that stops the source reading. A sink says in one line of its
docstring what a crash of each process costs, and lives in
:mod:`digitstream.connectors` under the URL scheme that names it.

An in-memory sink for tests is :class:`digitstream.testing.MemorySink`.

A connector that counts its entries (a broker's) may also have ``counters()``,
returning ``{connector, where, counters: {event: total}, gauges: {name: now}}``;
the application shows it in the metrics (``/api/stats`` ``connectors``, Prometheus
``digitstream_connector_*``, the dashboard's source and sink cards).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from digitstream.pipeline import BatchResult, StreamId

#: called with (stream, seq) when every result of the stream before seq is delivered
DeliveredCallback = Callable[[StreamId, int], None]


class Sink(Protocol):
    """Where results go; see the module doc."""

    #: what a crash costs, in one line (its docstring's first line says the same)
    guarantee: str
    #: told of each step of delivery; the application points it at the source's ``acknowledge``
    on_delivered: DeliveredCallback | None

    def describe(self) -> str:
        """Where it writes, for logs and the metrics UI (``127.0.0.1:7002``)."""
        ...

    async def start(self) -> None:
        """Start delivering (a sink may wait for its peer in the background)."""

    async def write(self, result: BatchResult) -> None:
        """Take ``result``, the next of its stream; wait while the sink is full."""

    async def flush(self) -> None:
        """Wait until everything taken so far is delivered."""

    def delivered(self, stream: StreamId) -> int:
        """The sequence number up to which ``stream``'s results are delivered (0: none yet)."""
        ...

    @property
    def undelivered(self) -> int:
        """Results taken and not yet delivered."""
        ...

    async def close(self) -> None:
        """Stop; what is not delivered by now stays undelivered."""
