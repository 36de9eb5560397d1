"""The local engine: batches are classified in the application's own process.

On two cores this is the fastest place: a batch is a few NumPy calls, so handing
it to another process would cost more than computing it.
"""

from __future__ import annotations

import asyncio

from threadpoolctl import threadpool_limits

from digitstream.engine.base import EngineOptions
from digitstream.pipeline import Batch, BatchResult, Flow


class LocalEngine:
    """Classifies each batch on the event loop as it is submitted (see
    :class:`~digitstream.engine.base.Engine`)."""

    name = "local"
    #: a batch is done when ``submit`` returns: a stream needs no more than a few in flight
    capacity = 4

    def __init__(self, flow: Flow, bundle=None, options: EngineOptions | None = None, metrics=None):
        self.flow = flow

    async def start(self) -> None:
        # A batch is too small to gain from BLAS threads, and on a machine whose
        # cores are busy with the network they only add contention.
        threadpool_limits(1)

    async def close(self) -> None:
        pass

    def state(self) -> dict | None:
        return None

    async def set_flow(self, flow: Flow, bundle) -> None:
        self.flow = flow

    async def submit(self, batch: Batch) -> asyncio.Future[BatchResult]:
        """Classify ``batch`` now; the returned future is already done. Never waits."""
        future = asyncio.get_running_loop().create_future()
        future.set_result(self.flow.process(batch))
        return future
