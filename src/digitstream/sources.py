"""What a source is: where batches of frames come from.

A source is a set of **streams** (a TCP connection, a named stream of a broker).
Each stream yields :class:`~digitstream.batch.Batch`\\ es in order, numbered by
the sequence number of their first frame; the application answers each stream's
batches in that order. A source that must know when results are safe (a broker
that redelivers what is not acknowledged) puts a
:class:`~digitstream.batch.Receipt` on each batch; the sink hands it back once
the batch's results are delivered, and :meth:`Source.acknowledge` gets it.

A source says in one line, its ``guarantee``, what a crash of each process
costs; a class without one cannot be built, and neither can one that leaves an
abstract method out. It lives in :mod:`digitstream.connectors` under the URL
scheme that names it, and is made by :meth:`Source.build` from the endpoint.

A minimal source, for the shape of it (:class:`digitstream.testing.MemorySource`
is a complete one)::

    class OneShot(Source):
        guarantee = "at most once: nothing is kept"
        def __init__(self, batches): self._batches = batches
        @classmethod
        def build(cls, endpoint, options, config, metrics=None): ...
        def describe(self): return "memory"
        async def start(self, sink): pass
        async def streams(self):
            yield MemoryStream(...)
        async def drain(self): pass
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from digitstream.batch import Batch, Receipt, StreamId
from digitstream.connectors.options import Declared, Endpoint

if TYPE_CHECKING:
    from digitstream.config import AppConfig
    from digitstream.sinks import Sink


class InputStream(ABC):
    """One stream of a source."""

    #: the stream's name in results, logs and metrics
    id: StreamId

    @abstractmethod
    def batches(self) -> AsyncIterator[Batch]:
        """Its batches in order; ends when the stream ends (its sender closed it, it
        broke, or the source was asked to drain). A stream that ends in the middle of
        a frame, or on a frame it refuses, says so in the log and the metrics; every
        whole frame before that point is in a batch."""

    def close(self) -> None:  # noqa: B027 (an optional hook: nothing to let go of by default)
        """Let go of it (after its last batch is answered)."""


class Source(Declared):
    """Where input comes from; see the module doc."""

    @classmethod
    @abstractmethod
    def build(
        cls, endpoint: Endpoint, options: dict[str, Any], config: AppConfig, metrics=None
    ) -> Source:
        """The source ``endpoint`` names, with its ``options`` already parsed (see
        :mod:`digitstream.connectors.kit`); UserError if it is malformed. No I/O: that is
        for :meth:`start`."""

    @abstractmethod
    def describe(self) -> str:
        """Where it reads, for logs and the metrics UI (``127.0.0.1:8002``)."""

    @abstractmethod
    async def start(self, sink: Sink) -> None:
        """Start taking input for ``sink``; UserError if it cannot (an address in use, a
        sink it cannot work with)."""

    @abstractmethod
    def streams(self) -> AsyncIterator[InputStream]:
        """Each stream as it opens; ends once the source drains."""

    @abstractmethod
    async def drain(self) -> None:
        """Take no new stream and, in each open one, no input after what has been
        sent so far; returns once every stream has been told to end."""

    def acknowledge(self, receipt: Receipt) -> None:
        """The results of ``receipt``'s frames are safely delivered: a source that tells its
        upstream does it here. Receipts of one stream come back in order."""

    async def close(self) -> None:
        """Release what it holds (sockets, connections)."""

    def held_frames(self) -> int:
        """Complete frames received and not yet handed out in a batch (what a stop that
        cannot wait for them leaves unanswered); 0 for a source that holds none."""
        return 0

    def counters(self) -> dict | None:
        """What the metrics show of it, if it counts its entries (a broker's):
        ``{connector, where, counters: {event: total}, gauges: {name: now}}``, shown in
        ``/api/stats`` ``connectors``, Prometheus ``digitstream_connector_*`` and the
        dashboard's source card; None if it counts nothing of its own."""
        return None
