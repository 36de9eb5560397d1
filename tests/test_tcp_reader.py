"""The TCP source's reader (connectors/tcp.py FrameReader) without sockets: frames received
before the connection ends are all handed out, and the buffer budget across connections."""

from __future__ import annotations

import asyncio

from digitstream.connectors.tcp import BufferBudget, FrameReader
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


def receive(reader: FrameReader, data: bytes) -> None:
    buffer = reader.get_buffer(len(data))
    buffer[:len(data)] = data
    reader.buffer_updated(len(data))


def read_all(reader: FrameReader) -> list[bytes]:
    async def go():
        out = []
        while (groups := await reader.read_groups()) is not None:
            for group in groups:
                out.extend(group.to_list())
        return out

    return asyncio.run(go())


def connected(budget: BufferBudget | None = None) -> FrameReader:
    reader = FrameReader(lambda r: None, max_frame=1 << 16, budget=budget)
    reader.connection_made(Transport())
    return reader


def test_frames_received_before_the_peer_closes_are_all_handed_out():
    payloads = [bytes([i % 256]) * (1 + i % 50) for i in range(2000)]
    reader = connected()
    data = frame_many(payloads)
    receive(reader, data[:70_000])
    receive(reader, data[70_000:])
    reader.eof_received()
    reader.connection_lost(None)  # before the consumer took anything: it was behind
    assert read_all(reader) == payloads


def test_a_reset_connection_still_hands_out_its_complete_frames():
    reader = connected()
    receive(reader, frame_many([b"abc", b"de"]) + HEADER.pack(10) + b"xy")
    reader.connection_lost(ConnectionResetError("reset"))
    assert read_all(reader) == [b"abc", b"de"]
    assert reader.pending == 6  # the partial frame (header and 2 bytes), logged as dropped


def test_over_the_budget_the_largest_partial_frame_is_closed_and_complete_ones_kept():
    budget = BufferBudget(limit=1000)
    hoarder, other = connected(budget), connected(budget)
    receive(hoarder, frame_many([b"kept"]) + HEADER.pack(5000) + b"x" * 900)

    async def take_one(reader):
        return await reader.read_groups(timeout=0)

    assert [g.to_list() for g in asyncio.run(take_one(hoarder))] == [[b"kept"]]
    assert hoarder.partial == 904 and budget.held == 904
    receive(other, frame_many([b"y" * 200]))  # over the limit: the hoarder goes
    assert hoarder.closed_because == "buffer_limit" and hoarder.transport.closed
    assert budget.held == 204 and hoarder not in budget.readers
    assert [g.to_list() for g in asyncio.run(take_one(other))] == [[b"y" * 200]]
    assert budget.held == 0


def test_complete_frames_over_the_budget_pause_reading_until_there_is_room():
    budget = BufferBudget(limit=1000)
    a, b = connected(budget), connected(budget)
    receive(a, frame_many([b"a" * 600]))
    receive(b, frame_many([b"b" * 600]))  # over, and nothing partial to close: b pauses
    assert not b.transport.reading and b.budget_paused and a.closed_because is None

    async def take_one(reader):
        return await reader.read_groups(timeout=0)

    asyncio.run(take_one(a))  # room again
    assert b.transport.reading and not b.budget_paused
