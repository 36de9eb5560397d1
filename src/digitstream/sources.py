"""What a source is: where batches of frames come from.

A source is a set of **streams** (a TCP connection, a named stream of a broker).
Each stream yields :class:`~digitstream.pipeline.Batch`\\ es in order, numbered
by the sequence number of their first frame; the application answers each
stream's batches in that order. A source says in one line of its docstring
what a crash of each process costs (its delivery guarantee), and lives in
:mod:`digitstream.connectors` under the URL scheme that names it.

An in-memory source for tests is :class:`digitstream.testing.MemorySource`.

A connector that counts its entries (a broker's) may also have ``counters()``,
returning ``{connector, where, counters: {event: total}, gauges: {name: now}}``;
the application shows it in the metrics (``/api/stats`` ``connectors``, Prometheus
``digitstream_connector_*``, the dashboard's source and sink cards).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from digitstream.pipeline import Batch, StreamId


class InputStream(Protocol):
    """One stream of a source."""

    #: the stream's name in results, logs and metrics
    id: StreamId

    def batches(self) -> AsyncIterator[Batch]:
        """Its batches in order; ends when the stream ends (its sender closed it, it
        broke, or the source was asked to drain). A stream that ends in the middle of
        a frame, or on a frame it refuses, says so in the log and the metrics; every
        whole frame before that point is in a batch."""
        ...

    def close(self) -> None:
        """Let go of it (after its last batch is answered)."""


class Source(Protocol):
    """Where input comes from; see the module doc."""

    #: what a crash costs, in one line (its docstring's first line says the same)
    guarantee: str

    def describe(self) -> str:
        """Where it reads, for logs and the metrics UI (``127.0.0.1:8002``)."""
        ...

    async def start(self) -> None:
        """Start taking input; UserError if it cannot (an address in use, say)."""

    def streams(self) -> AsyncIterator[InputStream]:
        """Each stream as it opens; ends once the source drains."""
        ...

    async def drain(self) -> None:
        """Take no new stream and, in each open one, no input after what has been
        sent so far; returns once every stream has been told to end."""

    def acknowledge(self, stream: StreamId, seq: int) -> None:
        """Every result of ``stream`` before ``seq`` is safely delivered: a source that
        acknowledges to its upstream does it here (the plain TCP source has no one to tell)."""

    async def close(self) -> None:
        """Release what it holds (sockets, connections)."""
