"""The batching policy: how the frames of one stream become batches.

Whatever has arrived when the engine is ready is one batch (no waiting by
default), cut at ``max_batch`` frames. With ``max_delay`` set, a batch waits up
to that long for more frames, until ``max_batch`` have come. Neighbouring
groups of same-width payloads are joined, so a batch of fixed-width frames is
one array however many reads it took.

A stream's reader may fail (a header above ``--max-frame``, a broken
connection) while a batch is filling: the frames already collected still go
out as a batch first, and the error is raised after them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from digitstream.batch import Batch, StreamId
from digitstream.wire.framing import Payloads

#: ``read(timeout)``: the next complete payloads; ``[]`` when ``timeout`` (seconds) passes
#: first, None at the end of the stream
ReadGroups = Callable[[float | None], Awaitable[list[Payloads] | None]]


@dataclass(frozen=True)
class BatchPolicy:
    #: most frames in one batch
    max_batch: int = 8192
    #: seconds a batch may wait to fill (0: never wait)
    max_delay: float = 0.0


async def batches(
    stream: StreamId, read: ReadGroups, policy: BatchPolicy, first_seq: int = 0
) -> AsyncIterator[Batch]:
    """The batches of one stream, numbered from ``first_seq``; see the module doc."""
    seq = first_seq
    failure: BaseException | None = None
    while failure is None:
        groups = await read(None)
        if groups is None:
            return
        if policy.max_delay > 0:
            try:
                await _fill(read, groups, policy)
            except Exception as exc:
                failure = exc
        received = time.perf_counter_ns()
        for group in Payloads.joined(groups):
            for start in range(0, len(group), policy.max_batch):
                part = group.slice(start, start + policy.max_batch)
                yield Batch(stream, seq, part, received)
                seq += len(part)
    raise failure


async def _fill(read: ReadGroups, groups: list[Payloads], policy: BatchPolicy) -> None:
    """Read more into ``groups`` until ``max_batch`` frames or ``max_delay`` has passed."""
    deadline = time.monotonic() + policy.max_delay
    while sum(map(len, groups)) < policy.max_batch:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        more = await read(remaining)
        if not more:  # the end of the stream, or the deadline
            return
        groups.extend(more)
