"""The TCP source's reader (connectors/tcp.py FrameReader) without sockets: frames received
before the connection ends are all handed out, buffers sized to what a connection needs, and
the buffer budget across connections, batches in flight included."""

from __future__ import annotations

import asyncio
import gc
import weakref

from digitstream.connectors.tcp import FIRST_BUFFER, OWN_SHARE, BufferBudget, FrameReader
from digitstream.wire.framing import HEADER, frame_many


class Transport:
    """What FrameReader asks of an asyncio transport."""

    def __init__(self):
        self.reading = True
        self.closed = False

    def get_extra_info(self, name):
        return ("127.0.0.1", 12345) if name == "peername" else None

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True

    abort = close


def receive(reader: FrameReader, data: bytes) -> bytes:
    """Feed ``data`` as the event loop would, while the reader reads; what it did not take
    (it paused)."""
    while data and reader.transport.reading and not reader.transport.closed:
        buffer = reader.get_buffer(-1)
        n = min(len(buffer), len(data))
        buffer[:n] = data[:n]
        reader.buffer_updated(n)
        data = data[n:]
    return data


async def take(reader: FrameReader) -> list[bytes]:
    groups = await reader.read_groups(timeout=0)
    return [p for g in groups or [] for p in g.to_list()]


async def deliver(reader: FrameReader, data: bytes) -> tuple[list[bytes], bytes]:
    """Reads and takes in turn, as the event loop and the consumer would, until ``data`` is
    all read or the reader stays paused: the frames taken, and what was not read."""
    got: list[bytes] = []
    while True:
        data = receive(reader, data)
        got += await take(reader)
        if not data or not reader.transport.reading:
            return got, data


async def until(condition, timeout: float = 10.0) -> None:
    """Let the event loop run until ``condition()`` holds; AssertionError at the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def connected(budget: BufferBudget | None = None, max_frame: int = 1 << 16) -> FrameReader:
    reader = FrameReader(lambda r: None, max_frame=max_frame, budget=budget)
    reader.connection_made(Transport())
    return reader


def test_frames_received_before_the_peer_closes_are_all_handed_out():
    payloads = [bytes([i % 256]) * (1 + i % 50) for i in range(2000)]
    data = frame_many(payloads)

    async def go():
        reader = connected()
        got: list[bytes] = []
        rest = data
        while rest:
            rest = receive(reader, rest)
            got += await take(reader)  # the consumer, after several reads
        reader.eof_received()
        reader.connection_lost(None)
        while (groups := await reader.read_groups()) is not None:
            got += [p for g in groups for p in g.to_list()]
        return got

    assert asyncio.run(go()) == payloads


def test_a_reset_connection_still_hands_out_its_complete_frames():
    async def go():
        reader = connected()
        receive(reader, frame_many([b"abc", b"de"]) + HEADER.pack(10) + b"xy")
        reader.connection_lost(ConnectionResetError("reset"))
        got = await take(reader)
        assert await reader.read_groups() is None
        return got, reader.pending

    # the partial frame (header and 2 bytes) is what is logged as dropped
    assert asyncio.run(go()) == ([b"abc", b"de"], 6)


def test_buffers_are_sized_to_what_a_connection_needs():
    async def go():
        budget = BufferBudget(limit=64 << 20)
        idle, small, large = connected(budget), connected(budget), connected(budget, 1 << 20)
        assert budget.total == 0  # nothing is allocated before the first read
        receive(small, frame_many([b"x" * 60] * 100))
        assert len(await take(small)) == 100 and small.charge == (FIRST_BUFFER, False)
        frame = HEADER.pack(1_000_000) + b"y" * 1_000_000
        rest = receive(large, frame)
        assert rest and not large.transport.reading  # its first buffer is full
        assert await take(large) == []  # the frame needs a buffer of its size: it moves
        assert large.transport.reading and large.charge[0] >= 1_000_004 and large.charge[1]
        assert receive(large, rest) == b""
        assert await take(large) == [b"y" * 1_000_000]
        assert idle.charge == (0, False)

    asyncio.run(go())


def test_batches_in_flight_keep_their_buffer_counted_until_they_are_done():
    async def go():
        budget = BufferBudget(limit=1 << 20)
        reader = connected(budget)
        in_flight = []
        for _ in range(4):  # each take fills most of a buffer: the next read needs another
            receive(reader, frame_many([b"z" * 1000] * 28))
            in_flight.append(await reader.read_groups(timeout=0))
        held = budget.total
        assert held > 3 * FIRST_BUFFER, held  # the buffers the batches hold, and the current
        in_flight.clear()
        gc.collect()
        assert budget.total < held and budget.total <= reader.charge[0]

    asyncio.run(go())


def test_back_pressure_over_the_budget_pauses_and_never_closes():
    """The limit is spent on buffers that batches in flight hold: a connection that needs
    another waits, paused, and goes on once they are done. Nobody is closed."""

    async def go():
        budget = BufferBudget(limit=256 << 10, own=OWN_SHARE)
        readers = [connected(budget) for _ in range(6)]
        chunk = frame_many([b"w" * 2000] * 60)  # 120 KB: more than a connection's own share
        in_flight = []
        for reader in readers:
            rest = chunk
            while rest:
                rest = receive(reader, rest)
                in_flight.append(await reader.read_groups(timeout=0))
                if not reader.transport.reading:
                    break
        waiting = [r for r in readers if not r.transport.reading]
        assert waiting, "nobody paused"
        assert budget.shared <= budget.limit
        assert all(r.closed_because is None for r in readers)
        in_flight.clear()  # the engine and the sink are done with them
        gc.collect()
        # the budget serves the waiting connections from the loop
        await until(lambda: all(r.transport.reading for r in readers))
        assert all(r.closed_because is None for r in readers)

    asyncio.run(go())


def test_a_quiet_partial_frame_over_its_own_share_is_closed_when_others_wait():
    async def go():
        budget = BufferBudget(limit=4 << 20, quiet_after=0.5)
        idle, hoarder = connected(budget, 4 << 20), connected(budget, 4 << 20)
        assert await deliver(idle, frame_many([b"i" * 300_000])) == ([b"i" * 300_000], b"")
        # a buffer for its frame, from the limit, and most of the frame
        assert await deliver(hoarder, HEADER.pack(1_500_000) + b"h" * 1_000_000) == ([], b"")
        assert hoarder.charge[1] and idle.charge[1]  # both hold buffers of the limit
        newcomer = connected(budget, 4 << 20)
        got, rest = await deliver(newcomer, HEADER.pack(2_800_000) + b"n" * 2_800_000)
        assert rest and newcomer in budget.waiting  # no room: it waits, paused
        # once the others have been quiet for half a second: the one with nothing pending
        # gives its buffer back, the partial frame's is closed
        await until(lambda: hoarder.closed_because is not None)
        assert idle.closed_because is None and not idle.charge[1]
        assert hoarder.closed_because == "stalled" and hoarder.transport.closed
        assert newcomer.transport.reading
        assert await deliver(newcomer, rest) == ([b"n" * 2_800_000], b"")

    asyncio.run(go())


def test_a_frame_larger_than_the_whole_budget_closes_its_connection():
    async def go():
        budget = BufferBudget(limit=128 << 10)
        reader = connected(budget, max_frame=1 << 20)
        receive(reader, HEADER.pack(500_000) + b"b" * 100_000)
        await take(reader)
        await until(lambda: reader.closed_because is not None)
        assert reader.closed_because == "buffer_limit"

    asyncio.run(go())


def test_a_buffer_nobody_holds_a_payload_of_is_reused_in_place():
    async def go():
        budget = BufferBudget(limit=1 << 20)
        reader = connected(budget)
        receive(reader, frame_many([b"r" * 996] * 20))  # 20,000 of its 32,768 bytes
        first = weakref.ref(reader._buf)  # (a reference would hold the buffer)
        got = await take(reader)  # taken, and let go of as a batch that is done
        frame = frame_many([b"s" * 15_000])
        receive(reader, frame[:2000])  # a frame that does not fit in what is left
        got += await take(reader)
        assert reader._buf is first() and budget.total == FIRST_BUFFER  # moved to its start
        receive(reader, frame[2000:])
        return got + await take(reader)

    assert asyncio.run(go()) == [b"r" * 996] * 20 + [b"s" * 15_000]


def test_a_buffer_a_batch_in_flight_holds_is_not_written_again():
    async def go():
        reader = connected()
        chunk = frame_many([bytes([i]) * 996 for i in range(10)])
        receive(reader, chunk)
        held = await reader.read_groups(timeout=0)  # a batch still in flight
        for _ in range(5):
            receive(reader, frame_many([b"x" * 996] * 10))
            await take(reader)
        return [p for g in held for p in g.to_list()]

    assert asyncio.run(go()) == [bytes([i]) * 996 for i in range(10)]
