"""The back-pressure: how many batches may be out on the cluster at once."""

from __future__ import annotations

import asyncio


class _Slots:
    """A semaphore whose size follows the cluster: ``in_flight`` per worker."""

    def __init__(self) -> None:
        self.size = 0
        self.used = 0
        self._changed = asyncio.Event()

    async def acquire(self) -> None:
        while self.used >= self.size:
            self._changed.clear()
            await self._changed.wait()
        self.used += 1

    def release(self) -> None:
        self.used -= 1
        self._changed.set()

    def resize(self, size: int) -> None:
        self.size = size
        self._changed.set()
