"""The TCP connector: ``HOST:PORT`` or ``tcp://HOST:PORT`` for ``--in`` and ``--out``.

**Source.** An asyncio server; each connection is a stream, numbered from 1 in
the order they are accepted. Its bytes are read straight into a buffer of ours
and cut into frames in place (:class:`FrameReader`), then into batches by the
run's :class:`~digitstream.batching.BatchPolicy`. Bounds: ``max_connections``
open at once (one more is closed on arrival, with a log line), and
``max_buffered`` bytes held for all connections together: past it, reading
pauses on the connection that went over, and if what is held is not complete
frames waiting for the engine but partial frames, the connection holding the
largest is closed, with a log line. What closed connections held goes back to the
system within a second (glibc's ``malloc_trim``).

**Sink.** One client connection to the listener; it waits for the listener to
appear, reconnects with backoff when a write fails, and keeps results that
were not yet handed to the socket until it is back. A listener that closes
only its sending side (``nc -N``, ``ncat`` whose standard input ended) still
gets every result: end of stream from the listener is not a failure, a write
that fails is.

What a listener that crashes can lose: the results that had left the sink's
queue and not yet reached the listener's storage when it died. They are in
asyncio's write buffer of the connection (up to its 1 MiB high-water mark, plus
the write in progress: queued results joined up to 1 MiB, the last of them
possibly a whole batch's), in this host's socket send buffer (up to the
maximum of net.ipv4.tcp_wmem, 4 MiB by default), in the listener's receive
buffer (up to the maximum of net.ipv4.tcp_rmem, 6 MiB by default) and in the
listener's own hands. With no acknowledgements on this path the application
cannot tell which of them arrived, so none is written again: a result is lost,
never duplicated, and order is kept. Results still queued in the application
are written after the reconnection. RELIABILITY.md has measured figures.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator

import numpy as np

from digitstream.addresses import Address, parse_address
from digitstream.backoff import Backoff
from digitstream.batch import Batch, BatchResult, StreamId
from digitstream.batching import BatchPolicy, batches
from digitstream.config import AppConfig
from digitstream.connectors.kit import Connector, Endpoint, Option, integer, number
from digitstream.errors import UserError
from digitstream.sinks import QueuedSink, Sink
from digitstream.sources import InputStream, Source
from digitstream.wire.framing import (
    HEADER_SIZE,
    FrameTooLarge,
    Payloads,
    count_frames,
    split_frames,
)

log = logging.getLogger("digitstream.tcp")

#: queued results are joined into writes of about this size: fewer system calls
WRITE_CHUNK = 1 << 20
#: input buffer per connection; a larger --max-frame makes it larger
SOURCE_BUFFER = 4 << 20


#: ``run`` flags of the TCP source
MAX_CONNECTIONS = Option(
    "max-connections",
    integer(1, 1 << 20),
    1024,
    "Input connections open at once; one more is closed as it arrives.",
    flag=True,
    metavar="N",
)
MAX_BUFFERED = Option(
    "max-buffered-mb",
    number(1, 1 << 20),
    256.0,
    "MiB held for all input connections together: past it reading pauses, and the "
    "connection holding the largest partial frame is closed.",
    flag=True,
    metavar="MIB",
)


def tcp_address(location: str | Address) -> Address:
    """The address of a ``HOST:PORT`` or ``tcp://HOST:PORT`` endpoint; UserError if malformed."""
    if isinstance(location, Address):
        return location
    try:
        return parse_address(location)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _hugepage_switch():
    """NumPy's switch for advising huge pages on arrays of 4 MiB and more (NUMPY_MADVISE_HUGEPAGE
    at import); None where this NumPy has none."""
    # start-up time: only this function needs it
    import importlib

    for name in ("numpy._core.multiarray", "numpy.core.multiarray"):  # NumPy 2, NumPy 1
        try:
            return getattr(importlib.import_module(name), "_set_madvise_hugepage", None)
        except ImportError:
            continue
    return None


_set_hugepage = _hugepage_switch()


def _buffer(size: int) -> np.ndarray:
    # From the allocator's heap, where a buffer let go of is reused warm: fresh mapped pages
    # would cost a page fault and a zeroed page per 4 KiB each time (measured: u8 throughput
    # 0.35 of the relay against 0.8). What closed connections held is given back by _trim.
    # Without huge pages: with them, the first byte of a partial frame makes 2 MiB resident,
    # and connections that each hold a little would take four times what the budget counts.
    if _set_hugepage is None:
        return np.empty(size, dtype=np.uint8)
    was = _set_hugepage(False)
    try:
        return np.empty(size, dtype=np.uint8)
    finally:
        _set_hugepage(was)


def _malloc_trim():
    """glibc's malloc_trim, which hands the heap's free pages back to the system; None elsewhere."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


class _Trim:
    """Gives free heap memory back to the system a little after connections close (at most
    once per ``delay`` seconds, so that a burst of closes costs one call)."""

    def __init__(self, delay: float = 0.5):
        self.delay = delay
        self._trim = _malloc_trim()
        self._pending: asyncio.TimerHandle | None = None

    def soon(self) -> None:
        if self._trim is None or self._pending is not None:
            return
        self._pending = asyncio.get_running_loop().call_later(self.delay, self._run)

    def _run(self) -> None:
        self._pending = None
        self._trim(0)


class BufferBudget:
    """Bytes held by all connections' readers together, against ``limit``."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self.readers: set[FrameReader] = set()
        self.paused: set[FrameReader] = set()  # paused because the budget ran out

    @property
    def over(self) -> bool:
        return self.held > self.limit

    def make_room(self, reader: FrameReader) -> None:
        """Held bytes went over the limit as ``reader`` received: close the connections holding
        the largest partial frames until they are under it again, and if complete frames
        waiting for the engine are what fills it, pause ``reader``."""
        while self.over:
            largest = max(self.readers, key=lambda r: r.partial, default=None)
            if largest is None or not largest.partial:
                break
            largest.evict(self)
        if self.over and reader in self.readers and not reader.budget_paused:
            reader.budget_paused = True
            self.paused.add(reader)

    def after_take(self) -> None:
        """Frames were handed out: resume the readers paused for the budget once there is
        room again."""
        if self.paused and self.held <= self.limit * 3 // 4:
            for paused in list(self.paused):
                paused.budget_resume()
            self.paused.clear()


class FrameReader(asyncio.BufferedProtocol):
    """One input connection. The socket reads straight into a buffer of ours and
    frames are cut out of it in place: fixed-width payloads are views of the
    buffer, with no copy between the kernel and the decoder.

    A region of the buffer, once handed out, is never written again (new reads
    go after it, and a fresh buffer is taken when the space runs out), so the
    payloads stay valid for as long as anyone holds them. When the consumer
    falls behind and the buffer fills, or all connections together hold their
    budget, reading pauses: that is the back-pressure the sender feels.
    """

    def __init__(
        self,
        on_connect,
        max_frame: int,
        budget: BufferBudget | None = None,
        buffer_size: int = SOURCE_BUFFER,
    ):
        self._on_connect = on_connect
        self.max_frame = max_frame
        self.budget = budget or BufferBudget(1 << 62)
        self._size = max(buffer_size, 2 * (max_frame + HEADER_SIZE))
        #: below this much free space at the end, the next take moves to a fresh buffer
        self._low = max(self._size // 4, max_frame + HEADER_SIZE)
        self._buf = _buffer(self._size)
        # numpy's stubs declare ndarray.__buffer__ only for Python 3.12 and later
        self._view = memoryview(self._buf)  # type: ignore[arg-type]
        self._start = 0  # first byte not yet handed out
        self._end = 0  # end of received bytes
        self._eof = False
        self._full = False  # reading paused: no room left in the buffer
        self.budget_paused = False  # reading paused: all connections hold their budget
        self._reading = True
        self._waiter: asyncio.Future | None = None
        self.transport: asyncio.Transport | None = None
        self.error: BaseException | None = None
        #: why the application closed it, if it did (a log line has said so)
        self.closed_because: str | None = None
        #: bytes of an incomplete frame after the last take
        self.partial = 0
        self.last_rx = time.monotonic()
        self.peer = "?"
        self.id: StreamId = 0

    def complete_frames(self) -> int:
        """Complete frames received and not yet handed out (counted for a stop)."""
        return count_frames(self._view, self._start, self._end)

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete frame handed out."""
        return self._end - self._start

    # ---- the event loop's side
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.budget.readers.add(self)
        self._on_connect(self)

    def get_buffer(self, sizehint: int):
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        if self in self.budget.readers:
            self.budget.held += nbytes
        self.last_rx = time.monotonic()
        if self._size == self._end:
            self._full = True
        if self.budget.over:
            self.budget.make_room(self)
        self._update_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc) -> None:
        # what was received is still taken and answered; close() lets go of the rest
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
        self._eof = True
        self._update_reading()
        self._wake()

    def evict(self, budget: BufferBudget) -> None:
        """Close the connection: it holds the largest partial frame while the budget is spent."""
        self.closed_because = "buffer_limit"
        log.warning(
            "connection %s from %s closed: it held %.1f MiB of a partial frame while "
            "all connections held %.0f MiB, over the limit of %.0f MiB "
            "(run --max-buffered-mb)",
            self.id,
            self.peer,
            self.partial / 2**20,
            budget.held / 2**20,
            budget.limit / 2**20,
        )
        self._eof = True
        if self.transport is not None:
            self.transport.abort()
        # its complete frames are still taken and answered; the budget no longer counts it
        self._leave_budget()
        self._wake()

    def budget_resume(self) -> None:
        self.budget_paused = False
        self._update_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._leave_budget()
        self._start = self._end
        # nothing more is read into it: the buffer goes now (payloads handed out keep theirs)
        self._buf = np.empty(0, dtype=np.uint8)
        self._view = memoryview(self._buf)  # type: ignore[arg-type]
        self._start = self._end = 0

    def _leave_budget(self) -> None:
        budget = self.budget
        if self in budget.readers:
            budget.readers.discard(self)
            budget.paused.discard(self)
            budget.held -= self._end - self._start
            self.partial = 0

    def _cut(self, start: int, end: int) -> tuple[list[Payloads], int]:
        """The complete frames in ``self._view[start:end]`` and where the rest begins (a
        reader of another wire cuts its own messages here)."""
        try:
            return split_frames(self._view, start, end, self.max_frame)
        except FrameTooLarge as exc:
            if not exc.groups:
                raise
            # the frames before the bad header are answered first; the next take raises
            return exc.groups, exc.offset

    def _take(self) -> list[Payloads]:
        if self._end == self._start:
            return []
        groups, pos = self._cut(self._start, self._end)
        if self in self.budget.readers:
            self.budget.held -= pos - self._start
        self._start = pos
        self.partial = self._end - self._start
        if self._size - self._end < self._low:
            # Move the incomplete tail to a fresh buffer; the old one lives on
            # for as long as the payloads just handed out are referenced.
            tail = self._end - self._start
            fresh = _buffer(self._size)
            fresh[:tail] = self._buf[self._start : self._end]
            self._buf, self._view = fresh, memoryview(fresh)  # type: ignore[arg-type]
            self._start, self._end = 0, tail
            self._full = False
        self._update_reading()
        self.budget.after_take()
        return groups

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        wanted = not (self._eof or self._full or self.budget_paused)
        if wanted != self._reading:
            self._reading = wanted
            if wanted:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class TcpStream(InputStream):
    """One connection of a :class:`TcpSource`: its frames as batches."""

    def __init__(
        self,
        stream_id: StreamId,
        reader: FrameReader,
        policy: BatchPolicy,
        metrics=None,
        on_close=None,
    ):
        self.id = stream_id
        self.reader = reader
        self.policy = policy
        self.metrics = metrics
        self._on_close = on_close
        reader.id = stream_id
        if metrics is not None:
            metrics.connection_opened()
        log.debug("connection %s from %s", stream_id, reader.peer)

    async def batches(self) -> AsyncIterator[Batch]:
        reader = self.reader
        too_large = False
        try:
            async for batch in batches(self.id, reader.read_groups, self.policy):
                yield batch
        except FrameTooLarge as exc:
            too_large = True
            log.warning("connection %d from %s closed: %s", self.id, reader.peer, exc)
            self._error("frame_too_large")
        if reader.closed_because is not None:
            self._error(reader.closed_because)
        elif reader.pending and not too_large:
            log.warning(
                "connection %d from %s closed in the middle of a frame: "
                "%d bytes of a partial frame dropped",
                self.id,
                reader.peer,
                reader.pending,
            )
            self._error("partial_frame")

    def _error(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.connection_error(kind)

    def close(self) -> None:
        self.reader.close()
        if self._on_close is not None:
            self._on_close(self)
        if self.metrics is not None:
            self.metrics.connection_closed()
        log.debug("connection %s from %s closed", self.id, self.reader.peer)


class TcpSource(Source):
    """TCP source, at most once: a crash of ``run`` loses the frames it had received and
    not yet answered; a crash of the sender loses what its socket had not yet sent.

    Listens on ``addr``; see the module doc for the bounds. ``drain`` reads each open
    connection until it has been quiet for ``drain_quiet`` seconds (at most
    ``drain_grace``), then ends it.
    """

    guarantee = "at most once: a crash of run loses the frames received and not yet answered"
    options = (MAX_CONNECTIONS, MAX_BUFFERED)

    def __init__(
        self,
        addr: Address,
        max_frame: int,
        policy: BatchPolicy,
        metrics=None,
        max_connections: int = 1024,
        max_buffered: int = 256 << 20,
        drain_quiet: float = 0.2,
        drain_grace: float = 5.0,
    ):
        self.addr = addr
        self.max_frame = max_frame
        self.policy = policy
        self.metrics = metrics
        self.max_connections = max_connections
        self.budget = BufferBudget(max_buffered)
        self.drain_quiet = drain_quiet
        self.drain_grace = drain_grace
        self.bound: Address | None = None
        self._server: asyncio.base_events.Server | None = None
        self._new: asyncio.Queue[TcpStream | None] = asyncio.Queue()
        self._open: dict[StreamId, TcpStream] = {}
        self._ids = 0
        self._draining = False
        self._refused = 0
        self._refused_logged = 0.0
        self._trim = _Trim()

    @classmethod
    def build(cls, endpoint: Endpoint, options: dict, config: AppConfig, metrics=None) -> TcpSource:
        return cls(
            tcp_address(endpoint.location),
            config.max_frame,
            BatchPolicy(config.max_batch, config.max_delay),
            metrics=metrics,
            max_connections=options["max-connections"],
            max_buffered=int(options["max-buffered-mb"] * 2**20),
            drain_quiet=config.drain_quiet,
            drain_grace=config.drain_grace,
        )

    def describe(self) -> str:
        return str(self.bound or self.addr)

    async def start(self, sink: Sink) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                self._new_reader,
                self.addr.host,
                self.addr.port,
                backlog=1024,
            )
        except OSError as exc:
            raise UserError(f"cannot listen on {self.addr}: {exc.strerror or exc}") from None
        port = self._server.sockets[0].getsockname()[1]
        self.bound = Address(self.addr.host, port)

    def _new_reader(self) -> FrameReader:
        return FrameReader(self._accepted, self.max_frame, self.budget)

    def _accepted(self, reader: FrameReader) -> None:
        if self._draining:
            reader.close()
            return
        if len(self._open) >= self.max_connections:
            self._refuse(reader)
            return
        self._ids += 1
        stream = TcpStream(self._ids, reader, self.policy, self.metrics, on_close=self._closed)
        self._open[stream.id] = stream
        self._new.put_nowait(stream)

    def _refuse(self, reader: FrameReader) -> None:
        self._refused += 1
        if self.metrics is not None:
            self.metrics.connection_error("too_many_connections")
        now = time.monotonic()
        if now - self._refused_logged >= 5.0:  # a flood of them: one line every few seconds
            self._refused_logged = now
            log.warning(
                "connection from %s closed: %d connections are open, the most allowed "
                "(run --max-connections); %d refused so far",
                reader.peer,
                len(self._open),
                self._refused,
            )
        reader.close()

    async def streams(self) -> AsyncIterator[TcpStream]:
        while True:
            stream = await self._new.get()
            if stream is None:
                return
            yield stream

    def _closed(self, stream: TcpStream) -> None:
        self._open.pop(stream.id, None)
        self._trim.soon()

    async def drain(self) -> None:
        self._draining = True
        if self._server is not None:
            self._server.close()
        self._new.put_nowait(None)
        await asyncio.gather(*(self._quiesce(s.reader) for s in list(self._open.values())))

    async def _quiesce(self, reader: FrameReader) -> None:
        """Read a connection until it is quiet (or the grace time ends), then end it."""
        deadline = time.monotonic() + self.drain_grace
        while True:
            now = time.monotonic()
            quiet_for = now - reader.last_rx
            if quiet_for >= self.drain_quiet or now >= deadline:
                break
            await asyncio.sleep(min(self.drain_quiet - quiet_for, deadline - now) + 0.001)
        reader.finish()

    def held_frames(self) -> int:
        return sum(stream.reader.complete_frames() for stream in self._open.values())

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for stream in list(self._open.values()):
            stream.reader.close()


_TCP_CLOSE = 7  # tcp_info.tcpi_state of a connection the peer reset
_TCP_INFO_UNACKED = 24  # offset of tcpi_unacked in Linux's struct tcp_info


async def _acknowledged(writer: asyncio.StreamWriter, timeout: float = 2.0) -> bool:
    """Whether the peer's kernel acknowledges what was just written (it reads on), rather
    than resetting the connection (it is gone); True if neither happens within ``timeout``."""
    await writer.drain()
    sock = writer.get_extra_info("socket")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if writer.transport.is_closing():
            return False
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        except (AttributeError, OSError):  # no TCP_INFO here: the next write will tell
            await asyncio.sleep(0.05)
            return not writer.transport.is_closing()
        if info[0] == _TCP_CLOSE:
            return False
        if int.from_bytes(info[_TCP_INFO_UNACKED : _TCP_INFO_UNACKED + 4], sys.byteorder) == 0:
            return True
        await asyncio.sleep(0.001)
    return True


async def connect_to_listener(
    addr: Address, start_it: str, first_delay: float, backoff_max: float, limit: int = 1 << 16
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the listener at ``addr``, with TCP_NODELAY; until it answers, tries
    again with backoff from ``first_delay`` seconds up to ``backoff_max``, and says once in
    the log how to start it (the command ``start_it``)."""
    backoff = Backoff(f"the listener at {addr}", first_delay, backoff_max, log=log, quiet=True)
    while True:
        try:
            reader, writer = await asyncio.open_connection(addr.host, addr.port, limit=limit)
        except OSError as exc:
            if backoff.note_failure(exc):
                log.info(
                    "waiting for the listener at %s (%s); start it with `%s`",
                    addr,
                    exc.strerror or exc,
                    start_it,
                )
            await asyncio.sleep(backoff.next_delay())
            continue
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer


class TcpSink(QueuedSink):
    """TCP sink, at most once: results handed to the socket when the listener crashes
    are lost (never written twice); results still queued here wait for it to return.

    Writes result bytes, in the order given, to the listener at ``addr``, joined into
    writes of up to ``WRITE_CHUNK`` bytes; ``write`` waits while ``high_water`` bytes
    are held: that is the back-pressure that stops the source reading when the listener
    is slow or gone. A result counts as delivered once it is written to the socket. The
    connection is made (and made again after a failure) in the background, as soon as
    the sink starts, so a listener that goes away is noticed even while nothing is sent.
    """

    guarantee = "at most once: a crash of the listener loses what its socket buffers held"
    group_limit = WRITE_CHUNK

    def __init__(self, addr: Address, high_water: int = 8 << 20, backoff_max: float = 2.0):
        # the connection's own loop logs its outages: the queue's retries stay quiet
        super().__init__(f"writing to {addr}", quiet_retries=True)
        self.addr = addr
        self.high_water = high_water
        self.backoff_max = backoff_max
        self._writer: asyncio.StreamWriter | None = None
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._lost_reason = ""
        self._keeper: asyncio.Task | None = None
        self.connects = 0
        self.closed = False
        self._peer_eof = False  # the listener closed its side of the connection
        self._peer_reads = False  # ... and it has been seen to read on
        #: the chunks written last, newest at the end, while asyncio may still hold their
        #: bytes (what undelivered counts of them)
        self._recent: collections.deque[bytes] = collections.deque()
        self._written = False  # the chunk of the deliver() under way is written
        self._final: int | None = None  # undelivered, as it stood when the sink closed

    @classmethod
    def build(cls, endpoint: Endpoint, options: dict, config: AppConfig) -> TcpSink:
        return cls(tcp_address(endpoint.location))

    def describe(self) -> str:
        return str(self.addr)

    @property
    def undelivered(self) -> int:
        """Results not handed to the kernel: queued, and those whose bytes asyncio still
        holds (a result in the kernel's socket buffer leaves with a graceful close)."""
        if self._final is not None:
            return self._final
        queued = super().undelivered - (self._delivering if self._written else 0)
        return queued + self._unsent()

    def _unsent(self) -> int:
        """Frames of the chunks written last whose bytes asyncio still holds."""
        writer = self._writer
        if writer is None:
            return 0
        unsent = writer.transport.get_write_buffer_size()
        frames = 0
        for chunk in reversed(self._recent):
            if unsent <= 0:
                break
            sent = max(0, len(chunk) - unsent)
            frames += count_frames(chunk) - count_frames(chunk, 0, sent)
            unsent -= len(chunk)
        return frames

    async def start(self) -> None:
        self._keeper = asyncio.create_task(self._keep_connected(), name="sink connection")
        await super().start()

    async def flush(self) -> None:
        """Wait until everything written so far has been handed to the socket and drained."""
        while True:
            await super().flush()
            writer = self._writer
            if writer is None or writer.transport.get_write_buffer_size() == 0:
                if self._idle.is_set():
                    return
                continue
            # drain() returns below asyncio's low-water mark, not at empty, and nothing
            # signals empty: look again shortly
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Stop: what asyncio still holds of the results is dropped (and counted in
        ``undelivered``); the socket closes gracefully, so the kernel still delivers what
        it was handed."""
        self.closed = True
        writer = self._writer
        await super().close()
        self._final = self.undelivered
        if writer is not None:
            writer.transport.abort()  # drops asyncio's buffer only: the close is a FIN
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await connect_to_listener(
            self.addr,
            f"digitstream listen {self.addr}",
            first_delay=0.05,
            backoff_max=self.backoff_max,
        )
        writer.transport.set_write_buffer_limits(high=1 << 20)
        return reader, writer

    async def _keep_connected(self) -> None:
        while not self.closed:
            reader, writer = await self._connect()
            self.connects += 1
            log.info(
                "connected to the listener at %s%s",
                self.addr,
                "" if self.connects == 1 else f" (reconnection {self.connects - 1})",
            )
            self._peer_eof = self._peer_reads = False
            self._lost.clear()
            watch = asyncio.create_task(self._watch_peer(reader))
            self._writer = writer
            self._connected.set()
            try:
                await self._lost.wait()
            finally:
                self._connected.clear()
                self._writer = None
                watch.cancel()
                writer.close()
            log.warning(
                "listener at %s went away (%s); %d result bytes queued, reconnecting",
                self.addr,
                self._lost_reason,
                self.held,
            )

    def _lose(self, reason: str) -> None:
        self._lost_reason = reason
        self._lost.set()

    async def deliver(self, results: list[BatchResult]) -> None:
        if not self._connected.is_set():
            await self._connected.wait()
        writer = self._writer
        assert writer is not None  # set with _connected
        if self._lost.is_set() or writer.transport.is_closing():
            # nothing of these was written: they go again once the keeper reconnects
            self._lose("the connection to the listener is closed")
            raise ConnectionResetError("the connection to the listener is closed")
        chunk = results[0].output if len(results) == 1 else b"".join(r.output for r in results)
        self._written = False
        if self._peer_eof and not self._peer_reads:
            # The listener closed its side: still reading (half-closed), or gone. One
            # byte asks; if it is gone, that byte is all that is lost, and the whole
            # chunk goes again to the next listener.
            writer.write(chunk[:1])
            if not await _acknowledged(writer):
                self._lose("the listener closed the connection")
                raise ConnectionResetError("the listener closed the connection")
            self._peer_reads = True
            log.info(
                "the listener at %s closed its sending side; it still reads, so results go on",
                self.addr,
            )
            chunk = chunk[1:]
        writer.write(chunk)
        self._written = True
        recent = self._recent
        recent.append(chunk)
        while len(recent) > 1 and sum(map(len, recent)) - len(recent[0]) > (2 << 20):
            recent.popleft()  # older than what asyncio's buffer (1 MiB at most) can hold
        try:
            await writer.drain()
        except (ConnectionError, OSError) as exc:
            # handed to the socket: delivered as far as this wire can tell (at most once)
            self._lose(str(exc) or type(exc).__name__)

    async def _watch_peer(self, reader: asyncio.StreamReader) -> None:
        # The listener never sends. End of stream is a listener that has gone, or one that
        # closed only its sending side (nc -N, ncat whose input ended) and still reads: the
        # next write finds out which. A read error is a broken connection.
        try:
            while await reader.read(65536):
                pass
        except (ConnectionError, OSError) as exc:
            self._lose(str(exc) or type(exc).__name__)
            return
        self._peer_eof = True


CONNECTOR = Connector(("tcp",), TcpSource, TcpSink, title="TCP")
