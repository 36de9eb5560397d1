"""What an engine is: the part that turns a :class:`~digitstream.pipeline.Batch`
into a :class:`~digitstream.pipeline.BatchResult`, here or elsewhere.

An engine implements :class:`Engine`. The application calls ``start`` once,
then ``submit`` for every batch, in order per stream, and awaits the futures in
the same order; ``set_flow`` switches the model between two batches; ``close``
ends it. Engines are looked up by name in :data:`digitstream.engine.ENGINES`, so
adding one is a module and a line there::

    class EchoEngine:
        '''Answers each batch in this process, as the local engine does.'''
        name = "echo"
        capacity = 1

        def __init__(self, flow, bundle, options, metrics=None):
            self.flow = flow

        async def start(self): pass
        async def close(self): pass
        async def set_flow(self, flow, bundle): self.flow = flow
        def state(self): return None

        async def submit(self, batch):
            future = asyncio.get_running_loop().create_future()
            future.set_result(self.flow.process(batch))
            return future

:func:`answer` is the one guard at the engine's boundary: whatever an engine's
future raises, the batch is still answered, one error frame per message.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from digitstream.batch import Batch, BatchResult
from digitstream.engine import ENGINES
from digitstream.errors import UserError
from digitstream.pipeline import Flow, FlowOptions, failure_reason

log = logging.getLogger("digitstream.engine")


@dataclass(frozen=True)
class EngineOptions:
    """What an engine is told: the flow's options (a remote engine builds its own flows
    from them) and, for a cluster, where it is and how much it may hold."""

    flow: FlowOptions = field(default_factory=FlowOptions)
    #: a running cluster's scheduler address (Dask)
    scheduler: str | None = None
    #: workers of a cluster started for this run (Dask ``--workers``)
    workers: int | None = None
    #: batches in flight per worker
    in_flight: int = 4
    #: seconds a batch may take on the cluster before it is computed here instead (0: no
    #: limit); see :mod:`digitstream.engine.dask`
    batch_deadline: float = 2.0
    #: TLS to the scheduler: the CA file, and this client's certificate and key (PEM)
    tls_ca_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


class Engine(Protocol):
    """Turns batches into results; see the module doc."""

    name: str

    @property
    def capacity(self) -> int:
        """Batches it works on at once: how many a stream may keep in flight."""
        ...

    async def start(self) -> None:
        """Get ready to take batches; UserError if it cannot (a cluster out of reach)."""

    async def submit(self, batch: Batch) -> asyncio.Future[BatchResult]:
        """Take ``batch``; wait while the engine is full (the back-pressure); a future of
        its result."""
        ...

    async def set_flow(self, flow: Flow, bundle) -> None:
        """Answer every batch submitted after this returns with ``flow`` (serving
        ``bundle``), every batch before with the old one; nothing is awaited after the
        switch. Raises (``BundleError``) and keeps the old flow if the new one cannot serve."""

    def state(self) -> dict | None:
        """What it says of where batches go (``cluster`` in ``/api/stats``), or None."""
        ...

    async def close(self) -> None:
        """Stop; batches already answered stay answered."""


def engine_class(name: str) -> type:
    """The engine class registered as ``name``; UserError naming the known ones if none."""
    try:
        module_name, _, class_name = ENGINES[name].partition(":")
    except KeyError:
        raise UserError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}") from None
    return getattr(importlib.import_module(module_name), class_name)


def make_engine(name: str, flow: Flow, bundle, options: EngineOptions, metrics=None) -> Engine:
    return engine_class(name)(flow, bundle, options, metrics=metrics)


class _Quiet:
    """One log line every few seconds for a fault that may hit every batch."""

    def __init__(self, every: float = 5.0):
        self.every = every
        self.count = 0
        self._next = 0.0

    def due(self) -> bool:
        self.count += 1
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.every
            return True
        return False


_engine_faults = _Quiet()


async def answer(batch: Batch, future: asyncio.Future[BatchResult], flow: Flow) -> BatchResult:
    """The result of ``future``; if it raises, ``batch`` answered with one
    ``error: engine failed: <reason>`` frame per message (in ``flow``'s output format)."""
    try:
        result = await future
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        reason = failure_reason(exc)
        if _engine_faults.due():
            log.error(
                "the engine failed on a batch of %d (stream %s, from message %d): %s; "
                "its messages are answered with an error (%d batches so far)",
                len(batch),
                batch.stream,
                batch.first_seq,
                reason,
                _engine_faults.count,
                exc_info=exc,
            )
        return flow.failed(batch, f"engine failed: {reason}")
    if result.count != len(batch) or result.first_seq != batch.first_seq:
        if _engine_faults.due():
            log.error(
                "the engine answered %d messages from %d for a batch of %d from %d "
                "(stream %s); its messages are answered with an error",
                result.count,
                result.first_seq,
                len(batch),
                batch.first_seq,
                batch.stream,
            )
        return flow.failed(batch, "engine failed: it answered another number of messages")
    return result
