"""The local engine: batches are classified in the application's own process.

On two cores this is the fastest place: a batch is a few NumPy calls, so handing
it to another process would cost more than computing it.
"""

from __future__ import annotations

import asyncio

from threadpoolctl import threadpool_limits

from digitstream.pipeline import Batch, BatchResult, Flow


class LocalEngine:
    name = "local"

    def __init__(self, flow: Flow):
        self.flow = flow

    async def start(self) -> None:
        # A batch is too small to gain from BLAS threads, and on a machine whose
        # cores are busy with the network they only add contention.
        threadpool_limits(1)

    async def close(self) -> None:
        pass

    async def set_flow(self, flow: Flow, bundle) -> None:
        """Classify every batch submitted from now on with ``flow`` (which serves ``bundle``).

        The switch happens when this returns, with nothing awaited before it: a
        batch is submitted either before it, to the old flow, or after it.
        """
        self.flow = flow

    async def submit(self, batch: Batch) -> "asyncio.Future[BatchResult]":
        """Classify ``batch`` now; the returned future is already done.

        An engine's ``submit`` waits while the engine cannot take more (the
        application stops reading there); this one never waits.
        """
        future = asyncio.get_running_loop().create_future()
        future.set_result(self.flow.process(batch))
        return future
