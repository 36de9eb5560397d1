"""TCP source and sink.

The source is an asyncio server: each connection's bytes are cut into frames
and handed on as batches (see :mod:`digitstream.app`). The sink is one client
connection to the listener; it waits for the listener to appear, reconnects
with backoff when it goes away, and keeps results that were not yet handed to
the socket until it is back.

What a listener that crashes can lose: the results that had left the sink's
queue and not yet reached the listener's storage when it died. They are in
asyncio's write buffer of the connection (up to its 1 MiB high-water mark, plus
the write in progress: queued results joined up to 1 MiB, the last of them
possibly a whole batch's), in this host's socket send buffer (up to the
maximum of net.ipv4.tcp_wmem, 4 MiB by default), in the listener's receive
buffer (up to the maximum of net.ipv4.tcp_rmem, 6 MiB by default) and in the
listener's own hands. Without acknowledgements the application cannot tell
which of them arrived, so none is written again: a result is lost, never
duplicated, and order is kept. Results still queued in the application are
written after the reconnection. The acknowledged delivery mode closes the
gap; RELIABILITY.md has measured figures.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time

import numpy as np

from digitstream.addresses import Address
from digitstream.wire.framing import HEADER_SIZE, FrameTooLarge, Payloads, split_frames

log = logging.getLogger("digitstream.sink")

#: queued results are joined into writes of about this size: fewer system calls
WRITE_CHUNK = 1 << 20
#: input buffer per connection; a larger --max-frame makes it larger
SOURCE_BUFFER = 4 << 20


class FrameSource(asyncio.BufferedProtocol):
    """One input connection. The socket reads straight into a buffer of ours and
    frames are cut out of it in place: fixed-width payloads are views of the
    buffer, with no copy between the kernel and the decoder.

    A region of the buffer, once handed out, is never written again (new reads
    go after it, and a fresh buffer is taken when the space runs out), so the
    payloads stay valid for as long as anyone holds them. When the consumer
    falls behind and the buffer fills, reading pauses: that is the
    back-pressure the sender feels.
    """

    def __init__(self, on_connect, max_frame: int, buffer_size: int = SOURCE_BUFFER):
        self._on_connect = on_connect
        self.max_frame = max_frame
        self._size = max(buffer_size, 2 * (max_frame + HEADER_SIZE))
        #: below this much free space at the end, the next take moves to a fresh buffer
        self._low = max(self._size // 4, max_frame + HEADER_SIZE)
        self._buf = np.empty(self._size, dtype=np.uint8)
        self._view = memoryview(self._buf)
        self._start = 0  # first byte not yet handed out
        self._end = 0  # end of received bytes
        self._eof = False
        self._paused = False
        self._waiter: asyncio.Future | None = None
        self.transport: asyncio.Transport | None = None
        self.error: BaseException | None = None
        self.last_rx = time.monotonic()
        self.peer = "?"

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return self._end - self._start

    # ---- the event loop's side
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._on_connect(self)

    def get_buffer(self, sizehint: int):
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        self.last_rx = time.monotonic()
        if self._size - self._end == 0 and not self._paused:
            self._pause()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc) -> None:
        self._eof = True
        self.error = exc
        self._wake()

    # ---- the consumer's side
    async def read_groups(self, timeout: float | None = None) -> list[Payloads] | None:
        """The next complete frames; ``[]`` when ``timeout`` passes first, None at
        the end of the stream. Raises FrameTooLarge."""
        while True:
            groups = self._take()
            if groups:
                return groups
            if self._eof:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                if timeout is None:
                    await self._waiter
                else:
                    try:
                        await asyncio.wait_for(self._waiter, timeout)
                    except asyncio.TimeoutError:
                        return []
            finally:
                self._waiter = None

    def finish(self) -> None:
        """Stop reading: what is already received is still handed out, then the end."""
        if self.transport is not None and not self.transport.is_closing() and not self._paused:
            self._pause()
        self._eof = True
        self._wake()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _take(self) -> list[Payloads]:
        if self._end == self._start:
            return []
        try:
            groups, pos = split_frames(self._view, self._start, self._end, self.max_frame)
        except FrameTooLarge as exc:
            if not exc.groups:
                raise
            # the frames before the bad header are answered first; the next take raises
            groups, pos = exc.groups, exc.offset
        self._start = pos
        if self._size - self._end < self._low:
            # Move the incomplete tail to a fresh buffer; the old one lives on
            # for as long as the payloads just handed out are referenced.
            tail = self._end - self._start
            fresh = np.empty(self._size, dtype=np.uint8)
            fresh[:tail] = self._buf[self._start:self._end]
            self._buf, self._view = fresh, memoryview(fresh)
            self._start, self._end = 0, tail
        if self._paused and not self._eof and self._size - self._end > 0:
            self._paused = False
            self.transport.resume_reading()
        return groups

    def _pause(self) -> None:
        self._paused = True
        self.transport.pause_reading()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class TcpSink:
    """Writes result bytes, in the order given, to the listener at ``addr``.

    ``write`` waits while more than ``high_water`` bytes are queued: that is
    the back-pressure that stops the source reading when the listener is slow
    or gone.
    """

    def __init__(self, addr: Address, high_water: int = 8 << 20, backoff_max: float = 2.0):
        self.addr = addr
        self.high_water = high_water
        self.backoff_max = backoff_max
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._has_data = asyncio.Event()
        self._has_space = asyncio.Event()
        self._has_space.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.connects = 0
        self.closed = False

    @property
    def queued_bytes(self) -> int:
        return self._queued

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sink")

    async def write(self, data: bytes) -> None:
        if not data:
            return
        while self._queued >= self.high_water:
            self._has_space.clear()
            await self._has_space.wait()
        self._queue.append(data)
        self._queued += len(data)
        self._idle.clear()
        self._has_data.set()

    async def flush(self) -> None:
        """Wait until everything written so far has been handed to the socket and drained."""
        await self._idle.wait()

    async def close(self) -> None:
        self.closed = True
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._writer is not None:
            self._writer.close()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        delay = 0.05
        warned = False
        while True:
            try:
                reader, writer = await asyncio.open_connection(self.addr.host, self.addr.port)
            except OSError as exc:
                if not warned:
                    log.info("waiting for the listener at %s (%s); start it with "
                             "`digitstream listen %s`", self.addr, exc.strerror or exc, self.addr)
                    warned = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            writer.transport.set_write_buffer_limits(high=1 << 20)
            return reader, writer

    async def _run(self) -> None:
        while not self.closed:
            reader, writer = await self._connect()
            self.connects += 1
            log.info("connected to the listener at %s%s", self.addr,
                     "" if self.connects == 1 else f" (reconnection {self.connects - 1})")
            self._writer = writer
            watch = asyncio.create_task(self._watch_peer(reader))
            try:
                await self._pump(writer, watch)
            except (ConnectionError, OSError) as exc:
                log.warning("listener at %s went away (%s); %d result bytes queued, reconnecting",
                            self.addr, exc, self._queued)
            finally:
                self._writer = None
                watch.cancel()
                writer.close()

    async def _pump(self, writer: asyncio.StreamWriter, watch: asyncio.Task) -> None:
        queue = self._queue
        while True:
            if not queue:
                unsent = writer.transport.get_write_buffer_size()
                if unsent == 0:
                    self._idle.set()
                self._has_data.clear()
                waiter = asyncio.ensure_future(self._has_data.wait())
                # drain() returns below asyncio's low-water mark, not at empty, and nothing
                # signals empty: while bytes remain, look again shortly, or flush() never ends
                done, _ = await asyncio.wait({waiter, watch}, timeout=0.01 if unsent else None,
                                             return_when=asyncio.FIRST_COMPLETED)
                if watch in done:
                    waiter.cancel()
                    raise ConnectionResetError("the listener closed the connection")
                if not done:
                    waiter.cancel()
                continue
            if watch.done():
                raise ConnectionResetError("the listener closed the connection")
            chunk = queue.popleft()
            if queue and len(chunk) < WRITE_CHUNK:
                parts = [chunk]
                size = len(chunk)
                while queue and size < WRITE_CHUNK:
                    part = queue.popleft()
                    parts.append(part)
                    size += len(part)
                chunk = b"".join(parts)
            if writer.transport.is_closing():
                queue.appendleft(chunk)
                raise ConnectionResetError("the connection to the listener is closed")
            writer.write(chunk)
            self._queued -= len(chunk)
            if self._queued < self.high_water:
                self._has_space.set()
            await writer.drain()
            if not queue and writer.transport.get_write_buffer_size() == 0:
                self._idle.set()

    @staticmethod
    async def _watch_peer(reader: asyncio.StreamReader) -> None:
        # The listener never sends; end of stream or an error means it is gone.
        try:
            while await reader.read(65536):
                pass
        except (ConnectionError, OSError):
            pass
