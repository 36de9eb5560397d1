"""The batching policy (digitstream.batching) on an in-memory reader: sizes, joining,
waiting to fill, and what a reader that fails while a batch fills leaves answered."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from digitstream.batching import BatchPolicy, batches
from digitstream.wire.framing import FrameTooLarge, Payloads


def fixed(n: int, width: int = 4, start: int = 0) -> Payloads:
    rows = (np.arange(start, start + n, dtype=np.uint32)[:, None] * np.ones(width, np.uint32))
    return Payloads(fixed=rows.astype(np.uint8))


class Reads:
    """Hands out the given reads one by one; ``None`` in the list is the deadline passing
    (``[]``), an exception is raised; after the list, the end of the stream."""

    def __init__(self, reads):
        self.reads = list(reads)
        self.timeouts: list[float | None] = []

    async def __call__(self, timeout):
        self.timeouts.append(timeout)
        await asyncio.sleep(0)
        if not self.reads:
            return None
        item = self.reads.pop(0)
        if isinstance(item, BaseException):
            raise item
        return [] if item is None else item


def collect(reads, policy, stream="s"):
    async def go():
        return [b async for b in batches(stream, reads, policy)]

    return asyncio.run(go())


def test_what_has_arrived_is_one_batch_cut_at_max_batch():
    out = collect(Reads([[fixed(10)], [fixed(3, start=10)]]), BatchPolicy(max_batch=4))
    assert [len(b) for b in out] == [4, 4, 2, 3]
    assert [b.first_seq for b in out] == [0, 4, 8, 10]
    assert all(b.stream == "s" for b in out)
    assert bytes(out[3].payloads.fixed[0]) == bytes([10] * 4)


def test_neighbouring_groups_of_one_width_are_joined_others_kept_apart():
    reads = Reads([[fixed(2), fixed(3, start=2), Payloads(items=[b"x", b"yy"]), fixed(2, width=8)]])
    out = collect(reads, BatchPolicy(max_batch=100))
    assert [len(b) for b in out] == [5, 2, 2]
    assert out[0].payloads.fixed.shape == (5, 4)
    assert out[1].payloads.items == [b"x", b"yy"]
    assert [b.first_seq for b in out] == [0, 5, 7]


def test_with_max_delay_a_batch_waits_to_fill_until_max_batch():
    reads = Reads([[fixed(2)], [fixed(2, start=2)], [fixed(2, start=4)], [fixed(1, start=6)]])
    out = collect(reads, BatchPolicy(max_batch=6, max_delay=10.0))
    assert [len(b) for b in out] == [6, 1]
    assert reads.timeouts[0] is None and all(t is not None and t <= 10.0 for t in reads.timeouts[1:3])


def test_with_max_delay_the_deadline_sends_what_there_is():
    reads = Reads([[fixed(2)], None, [fixed(1, start=2)]])
    out = collect(reads, BatchPolicy(max_batch=100, max_delay=10.0))
    assert [len(b) for b in out] == [2, 1]


@pytest.mark.parametrize("error", [FrameTooLarge(1 << 30, 1 << 20), ConnectionResetError("reset")])
def test_a_reader_failing_while_a_batch_fills_leaves_the_frames_before_it_answered(error):
    reads = Reads([[fixed(3)], [fixed(2, start=3)], error])
    got = []

    async def go():
        async for batch in batches(7, reads, BatchPolicy(max_batch=100, max_delay=10.0)):
            got.append(batch)

    with pytest.raises(type(error)):
        asyncio.run(go())
    assert [(b.first_seq, len(b)) for b in got] == [(0, 5)]


def test_sequence_numbers_continue_from_first_seq():
    async def go():
        return [b async for b in batches(1, Reads([[fixed(3)]]), BatchPolicy(2), first_seq=100)]

    assert [(b.first_seq, len(b)) for b in asyncio.run(go())] == [(100, 2), (102, 1)]
