"""The local engine: batches are classified on this machine.

By default in the application's own process: on two cores a batch of raw pixels
is a few NumPy calls, so handing it to another process would cost more than
computing it. With ``workers`` (``--engine local --workers N``) the batches go to
N worker processes (:mod:`digitstream.engine.pool`), for formats whose decoding
keeps one core busy (json).
"""

from __future__ import annotations

import asyncio

from threadpoolctl import threadpool_limits

from digitstream.batch import Batch, BatchResult
from digitstream.engine.base import EngineOptions
from digitstream.pipeline import Flow


class LocalEngine:
    """Classifies each batch on the event loop as it is submitted, or in its worker
    processes (see :class:`~digitstream.engine.base.Engine`)."""

    name = "local"

    def __init__(self, flow: Flow, bundle=None, options: EngineOptions | None = None, metrics=None):
        self.flow = flow
        workers = options.workers if options is not None else None
        self.pool = None
        if workers:
            # start-up time: only with --workers
            from digitstream.engine.pool import ProcessPool

            assert options is not None
            self.pool = ProcessPool(workers, flow, deadline=options.batch_deadline)

    @property
    def capacity(self) -> int:
        # in this process a batch is done when ``submit`` returns: a few in flight suffice
        return self.pool.capacity if self.pool is not None else 4

    async def start(self) -> None:
        # A batch is too small to gain from BLAS threads, and on a machine whose
        # cores are busy with the network they only add contention.
        threadpool_limits(1)
        if self.pool is not None:
            self.pool.start()

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    def state(self) -> dict | None:
        return self.pool.state() if self.pool is not None else None

    async def set_flow(self, flow: Flow, bundle) -> None:
        self.flow = flow
        if self.pool is not None:
            self.pool.set_flow(flow)

    async def submit(self, batch: Batch) -> asyncio.Future[BatchResult]:
        """Classify ``batch`` now (the returned future is already done; never waits), or
        send it to a worker process (waiting while every one is full)."""
        if self.pool is not None:
            return await self.pool.submit(batch, self.flow)
        future = asyncio.get_running_loop().create_future()
        future.set_result(self.flow.process(batch))
        return future
