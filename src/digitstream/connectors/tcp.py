"""The TCP connector: ``HOST:PORT`` or ``tcp://HOST:PORT`` for ``--in`` and ``--out``.

**Source.** An asyncio server; each connection is a stream, numbered from 1 in
the order they are accepted. Its bytes are read straight into a buffer of ours
and cut into frames in place (:class:`FrameReader`), then into batches by the
run's :class:`~digitstream.batching.BatchPolicy`. Bounds, none of which closes a
connection that makes progress or waits for the application:

* ``max_connections`` open at once. One more takes the place of the connection
  that has been quiet longest among those that make no progress (never completed
  a frame, or sent nothing for ``QUIET_AFTER`` seconds while they could); with
  none, it is closed on arrival. Either way with a log line.
* ``max_buffered`` bytes of input buffers, plus ``OWN_SHARE`` per connection
  (:class:`BufferBudget`): a buffer counts until it is freed, also while the
  batches in flight hold frames of it. A connection that needs a buffer the
  budget has no room for pauses; meanwhile connections quiet for ``QUIET_AFTER``
  seconds give theirs back, and are closed if they hold a partial frame their
  own share cannot.
* A frame once begun is complete within ``frame_timeout`` seconds (time the
  application did not read it not counted), or its connection is closed.

What closed connections held goes back to the system within a second (glibc's
``malloc_trim``).

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
import threading
import time
import weakref
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
    HEADER,
    HEADER_SIZE,
    FrameTooLarge,
    Payloads,
    count_frames,
    split_frames,
)

log = logging.getLogger("digitstream.tcp")

#: queued results are joined into writes of about this size: fewer system calls
WRITE_CHUNK = 1 << 20
#: a connection's first input buffer; a busy connection's grow from it, up to SOURCE_BUFFER
FIRST_BUFFER = 32 << 10
#: the largest input buffer of a connection (a larger --max-frame: twice the frame)
SOURCE_BUFFER = 4 << 20
#: what a connection's input buffers may hold outside --max-buffered-mb: the buffer it reads
#: into and the next, so that a connection whose frames fit there always makes progress
OWN_SHARE = 2 * FIRST_BUFFER
#: what an open input connection may cost beyond --max-buffered-mb: its own share, and its
#: transport, reader, stream and tasks (measured: see RELIABILITY.md); the README's bound
#: is ``max_buffered + PER_CONNECTION x connections``
PER_CONNECTION = 128 << 10
#: a connection that has sent nothing this long while it could makes no progress: it gives
#: way to a new connection at --max-connections, and its buffer to connections that wait
QUIET_AFTER = 1.0
#: a frame once begun must be complete within this long (time the application did not read
#: the connection not counted), or its connection is closed
FRAME_TIMEOUT = 30.0
#: how often the source looks for frames past that time
WATCH_EVERY = 1.0


#: ``run`` flags of the TCP source
MAX_CONNECTIONS = Option(
    "max-connections",
    integer(1, 1 << 20),
    1024,
    "Input connections open at once; one more takes the place of the connection quiet "
    "longest of those that make no progress, or is closed as it arrives if all do.",
    flag=True,
    metavar="N",
)
MAX_BUFFERED = Option(
    "max-buffered-mb",
    number(1, 1 << 20),
    256.0,
    "MiB of input buffers for all connections together, batches in flight included "
    "(each connection also has 64 KiB of its own): past it reading pauses, and a connection "
    "that sent nothing for a second while others wait gives its buffer back, or is closed "
    "if it holds a partial frame.",
    flag=True,
    metavar="MIB",
)
FRAME_TIMEOUT_OPTION = Option(
    "frame-timeout",
    number(0.1, 86_400),
    30.0,
    "Seconds a frame once begun may take to complete (time run did not read the "
    "connection not counted); past it the connection is closed.",
    flag=True,
    metavar="S",
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


_NO_BUFFER = np.empty(0, dtype=np.uint8)
_NO_VIEW = memoryview(b"")


def _least_buffer(need: int) -> int:
    """The smallest buffer worth taking for a frame that needs ``need`` bytes."""
    return max(-(-need // 4096) * 4096, FIRST_BUFFER)


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


class _Share:
    """The bytes of one connection's live input buffers charged to its own share; it
    outlives the connection, as a buffer a batch in flight still holds does."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = 0


class _RareLog:
    """Warnings an attack can cause by the thousand: one line a second at most of each
    kind, which says how many went unsaid since the last."""

    def __init__(self, every: float = 1.0):
        self.every = every
        self._next: dict[str, float] = {}
        self._unsaid: collections.Counter = collections.Counter()

    def warning(self, kind: str, message: str, *args) -> None:
        now = time.monotonic()
        if now < self._next.get(kind, 0.0):
            self._unsaid[kind] += 1
            return
        self._next[kind] = now + self.every
        unsaid = self._unsaid.pop(kind, 0)
        if unsaid:
            message += " (and %d more such since the last line)"
            args = (*args, unsaid)
        log.warning(message, *args)


class BufferBudget:
    """The input buffers of all connections, against ``limit`` bytes.

    A buffer counts from its allocation until it is freed: until its connection has moved
    on to another and no batch in flight holds a frame of it (``weakref.finalize``), so
    what batches waiting for the engine or the sink keep counts as what connections hold.
    Each connection may also hold ``own`` bytes of buffers outside ``limit`` (the buffer it
    reads into and the next), so that one whose frames fit there always makes progress:
    all connections together hold at most ``limit + own`` x connections.

    A connection that needs a buffer the limit has no room for pauses (``waiting``) until
    one is freed, in order of arrival. Meanwhile room is made from connections that make
    no progress: one that has sent nothing for ``quiet_after`` seconds while it could
    gives back its buffer if what it holds fits its own share, and is closed otherwise.
    ``readers`` are the open connections, the least recently active first.
    """

    def __init__(self, limit: int, own: int = OWN_SHARE, quiet_after: float = QUIET_AFTER):
        self.limit = limit
        self.own = own
        self.quiet_after = quiet_after
        self.shared = 0  # bytes of live buffers charged to the limit
        self.total = 0  # bytes of all live buffers, own shares included
        self.readers: dict[FrameReader, None] = {}
        self.waiting: dict[FrameReader, None] = {}
        self.notes = _RareLog()
        # freed buffers are counted by whichever thread frees them (a batch may end anywhere)
        self._lock = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serve_soon = False
        self._relief: asyncio.Handle | None = None

    def allocate(
        self, reader: FrameReader, want: int, need: int, credit: int = 0, first: bool = False
    ) -> tuple[np.ndarray, bool] | None:
        """A buffer of ``want`` bytes, or else of ``need``, for ``reader``: from its own share
        if that has room, else from the limit if no connection waits there before it; None
        if neither. ``credit``: bytes of the reader's current buffer that go as this one
        comes (nothing else holds it). ``first``: its first buffer, which its own share
        always has room for. The flag says whether the limit was charged."""
        share = reader.share
        on_limit = reader.charge[1]
        own_credit = credit if not on_limit else 0
        limit_credit = credit if on_limit else 0
        with self._lock:
            for size in (want, need) if want > need else (need,):
                if first or share.held - own_credit + size <= self.own:
                    charged = False
                    share.held += size
                elif self.shared - limit_credit + size <= self.limit and (
                    next(iter(self.waiting), reader) is reader
                ):
                    charged = True
                    self.shared += size
                else:
                    continue
                self.total += size
                break
            else:
                return None
        buf = _buffer(size)
        weakref.finalize(buf, self._freed, share, size, charged).atexit = False
        return buf, charged

    def _freed(self, share: _Share, size: int, charged: bool) -> None:
        with self._lock:
            if charged:
                self.shared -= size
            else:
                share.held -= size
            self.total -= size
        self.serve_soon()

    def serve_soon(self) -> None:
        """Give the waiting connections another try, from the event loop (never in the
        middle of what freed a buffer)."""
        if not self.waiting or self._serve_soon or self._loop is None:
            return
        self._serve_soon = True
        try:
            self._loop.call_soon_threadsafe(self._serve)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _serve(self) -> None:
        self._serve_soon = False
        for reader in list(self.waiting):
            if reader in self.waiting:
                reader.retry()

    def wait(self, reader: FrameReader) -> None:
        """``reader`` pauses until it can have the buffer it needs."""
        if reader in self.waiting:
            return
        self.waiting[reader] = None
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:  # driven without an event loop (a unit test): no timers
                self.relieve()
                return
        if self._relief is None:
            self._relief = self._loop.call_soon(self.relieve)

    def leave(self, reader: FrameReader) -> None:
        """``reader`` is closed (its buffers count until they are freed)."""
        self.readers.pop(reader, None)
        self.waiting.pop(reader, None)

    def relieve(self) -> None:
        """Make room for the connections that wait (see the class doc): first from quiet
        connections that can give their buffer back, then by closing quiet ones that hold
        partial frames, the least recently active first, until the first waiting can have
        its buffer. While some still wait, look again a little later."""
        if self._relief is not None:
            self._relief.cancel()
            self._relief = None
        if not self.waiting:
            return
        now = time.monotonic()
        quiet = []
        for reader in list(self.readers):
            if now - reader.active_at < self.quiet_after:
                break  # the rest were active more recently
            if reader.charge[1] and reader.stalled_for(now) >= self.quiet_after:
                quiet.append(reader)
        for reader in quiet:
            reader.give_back()
        self._serve()
        for reader in quiet:
            first = next(iter(self.waiting), None)
            if first is None or self.shared + first.need <= self.limit:
                break  # served, or it will be as soon as the buffers just let go of are freed
            if reader.charge[1] and reader.closed_because is None:
                reader.evict(
                    "stalled",
                    "connection %s from %s closed: it held %.2f MiB of a partial frame and "
                    "sent nothing for %.1f s while other connections waited for room (run "
                    "--max-buffered-mb %.0f)",
                    reader.id,
                    reader.peer,
                    reader.partial / 2**20,
                    now - reader.active_at,
                    self.limit / 2**20,
                )
                self._serve()
        self._break_deadlock()
        if self.waiting and self._loop is not None:
            self._relief = self._loop.call_later(self.quiet_after / 4, self.relieve)

    def _break_deadlock(self) -> None:
        """Every byte charged to the limit is in buffers of waiting connections that need
        bigger ones, which nothing else holds: nothing will be freed. Close the one holding
        most besides the first in line (the first itself if it waits alone: its frame needs
        more than the limit), with a log line, until the first can be served."""
        while self.waiting:
            stuck = [r for r in self.waiting if r.charge[1] and r.exclusive()]
            if sum(r.charge[0] for r in stuck) < self.shared:
                return
            first = next(iter(self.waiting))
            others = [r for r in stuck if r is not first]
            victim = max(others, key=lambda r: r.charge[0]) if others else first
            victim.evict(
                "buffer_limit",
                "connection %s from %s closed: its partial frame needs %.1f MiB, and the "
                "partial frames of the connections waiting need more than --max-buffered-mb "
                "%.0f holds",
                victim.id,
                victim.peer,
                victim.need / 2**20,
                self.limit / 2**20,
            )
            self._serve()

    def quietest(self, now: float, exclude: FrameReader) -> FrameReader | None:
        """The connection to close to make room for ``exclude``, a new one, at the most
        connections allowed: of those making no progress (see :meth:`FrameReader.stalled_for`)
        and that never completed a frame or have sent nothing for ``quiet_after`` seconds,
        the one active least recently; None if there is none."""
        for reader in self.readers:
            if reader is exclude:
                continue
            quiet = reader.stalled_for(now)
            if quiet >= self.quiet_after or (quiet >= 0 and not reader.progressed):
                return reader
        return None

    def over_time(self, now: float, frame_timeout: float) -> list[FrameReader]:
        """The connections whose partial frame began ``frame_timeout`` seconds ago or more
        (time the application did not read them not counted)."""
        return [r for r in self.readers if r.frame_age(now) >= frame_timeout]


class FrameReader(asyncio.BufferedProtocol):
    """One input connection. The socket reads straight into a buffer of ours and
    frames are cut out of it in place: fixed-width payloads are views of the
    buffer, with no copy between the kernel and the decoder.

    A region of the buffer, once handed out, is not written again while a payload of it
    is held (new reads go after it; when the space runs out, the incomplete tail moves
    to a fresh buffer, or to the start of this one once nobody holds a payload of it),
    so the payloads stay valid for as long as anyone holds them. A buffer is sized to what
    the connection needs: it starts at ``FIRST_BUFFER``, doubles while the connection uses
    it up quickly (up to ``buffer_size``, or twice the largest frame), halves while it
    stays mostly empty, and holds at least the frame in progress. Buffers come from the connections'
    :class:`BufferBudget`. When the consumer falls behind and the buffer fills, or the
    budget has no room for the next buffer, reading pauses: that is the back-pressure the
    sender feels.
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
        self.share = _Share()
        #: the largest buffer it asks for
        self._largest = max(buffer_size, 2 * (max_frame + HEADER_SIZE))
        self._buf = _NO_BUFFER  # allocated at the first read
        self._read_view = _NO_VIEW  # of the whole buffer, for the socket's reads
        self._size = 0
        #: (bytes, whether charged to the budget's limit) of the buffer read into
        self.charge = (0, False)
        self._start = 0  # first byte not yet handed out
        self._end = 0  # end of received bytes
        self._view = _NO_VIEW  # what _cut reads, during a take
        self._peak = 0  # most bytes held at once in this buffer
        self._filled = False  # a read filled this buffer to its end
        self._takes = 0  # takes from this buffer
        self._eof = False
        self._full = False  # reading paused: no room left in the buffer
        self._reading = True
        self._paused_at = 0.0
        self._waiter: asyncio.Future | None = None
        self.transport: asyncio.Transport | None = None
        self.error: BaseException | None = None
        #: why the application closed it, if it did (a log line has said so)
        self.closed_because: str | None = None
        #: bytes of an incomplete frame after the last take
        self.partial = 0
        #: whether it ever completed a frame
        self.progressed = False
        #: the application, not the peer, is what it waits for (an acked HELLO that
        #: waits for the listener's RESUME, say)
        self.held_by_us = False
        now = time.monotonic()
        self.last_rx = now
        #: when it last received bytes, or could again after a pause of ours
        self.active_at = now
        self._frame_began: float | None = None
        self.peer = "?"
        self.id: StreamId = 0

    def complete_frames(self) -> int:
        """Complete frames received and not yet handed out (counted for a stop)."""
        return count_frames(self._buf, self._start, self._end) if self._end > self._start else 0

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete frame handed out."""
        return self._end - self._start

    @property
    def need(self) -> int:
        """Bytes from the first not handed out that the frame in progress needs."""
        tail = self._end - self._start
        if tail < HEADER_SIZE:
            return HEADER_SIZE
        (length,) = HEADER.unpack_from(self._buf, self._start)  # type: ignore[arg-type]
        return HEADER_SIZE + min(length, self.max_frame)

    def _complete_waiting(self) -> bool:
        """Whether a complete frame (or a header the consumer will refuse) is received and
        not yet taken by the consumer."""
        tail = self._end - self._start
        if tail < HEADER_SIZE:
            return False
        (length,) = HEADER.unpack_from(self._buf, self._start)  # type: ignore[arg-type]
        return length > self.max_frame or tail >= HEADER_SIZE + length

    def stalled_for(self, now: float) -> float:
        """Seconds it has sent nothing while it could: reading not paused by the
        application, no complete frame waiting to be taken, nothing awaited from the
        application; -1 if it waits for the application."""
        if not self._reading or self._eof or self.held_by_us or self._complete_waiting():
            return -1.0
        return now - self.active_at

    def frame_age(self, now: float) -> float:
        """Seconds since its partial frame began (not counting pauses of the application);
        -1 if it has none, or waits for the application."""
        if self._frame_began is None or self.stalled_for(now) < 0:
            return -1.0
        return now - self._frame_began

    def exclusive(self) -> bool:
        """Whether no payload handed out holds the buffer it reads into."""
        # each take's payloads hold a view of their own; what is left is this attribute,
        # the view the socket reads into, and the call's argument
        return sys.getrefcount(self._buf) <= 3

    # ---- the event loop's side
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.budget.readers[self] = None
        self._on_connect(self)

    def get_buffer(self, sizehint: int):
        if not self._size:
            # the first read: a connection's own share always has room for its first buffer
            got = self.budget.allocate(self, FIRST_BUFFER, FIRST_BUFFER, first=True)
            assert got is not None
            self._use(*got)
        return self._read_view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        now = time.monotonic()
        if now - self.active_at > 0.05:  # (the order need not be finer than that)
            readers = self.budget.readers
            if self in readers:
                readers[self] = readers.pop(self)  # to the end: the most recently active
        self.last_rx = self.active_at = now
        held = self._end - self._start
        if held > self._peak:
            self._peak = held
        if self._size == self._end:
            self._full = self._filled = True
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

    def evict(self, kind: str, message: str, *args) -> None:
        """Close the connection for ``kind`` (a connection error of the metrics), saying
        ``message`` in the log (at most once a second for each kind); what it holds that is
        not a complete frame goes at once."""
        self.closed_because = kind
        self.budget.notes.warning(kind, message, *args)
        self._eof = True
        if self.transport is not None:
            self.transport.abort()
        self.budget.leave(self)
        if not self._complete_waiting():
            self._drop_buffer()
        self._wake()

    def give_back(self) -> None:
        """It makes no progress while others wait for the budget: let go of the buffer
        charged to the limit if what it holds fits its own share (the buffer goes, or the
        partial frame moves to a buffer of its own share)."""
        tail = self._end - self._start
        if not tail and self.share.held + FIRST_BUFFER <= self.budget.own:
            self._drop_buffer()  # the next read takes a buffer of its own share
            return
        need = _least_buffer(self.need)
        if self.share.held + need <= self.budget.own:
            self._move(need, need, in_place=False)

    def retry(self) -> None:
        """The budget may have room now for the buffer it waits for."""
        self._move(self._next_size(), _least_buffer(self.need))
        self._update_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.budget.leave(self)
        self.partial = 0
        # nothing more is read into it: the buffer goes now (payloads handed out keep theirs)
        self._drop_buffer()

    def _use(self, buf: np.ndarray, on_limit: bool) -> None:
        """Read into ``buf`` from now on (the old buffer is freed unless payloads hold it)."""
        self._buf, self._size, self.charge = buf, len(buf), (len(buf), on_limit)
        self._read_view = memoryview(buf)  # type: ignore[arg-type]

    def _drop_buffer(self) -> None:
        self._buf, self._read_view = _NO_BUFFER, _NO_VIEW
        self._size = self._start = self._end = self._peak = self._takes = 0
        self.charge = (0, False)
        self._full = self._filled = False
        self.budget.waiting.pop(self, None)
        self._update_reading()

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
        # The payloads cut now hold this piece of the buffer (a view of it), and through
        # it the buffer: while one is held, that part is never written again.
        piece = self._buf[: self._end]
        view = self._view = memoryview(piece)  # type: ignore[arg-type]
        try:
            groups, pos = self._cut(self._start, self._end)
        finally:
            self._view = _NO_VIEW
        end = self._end
        # a frame in progress began with the last read, or before
        if pos != self._start:
            self.progressed = True
            self._frame_began = self.last_rx if pos != end else None
        elif self._frame_began is None:
            self._frame_began = self.last_rx
        self._start = pos
        self.partial = end - pos
        self._takes += 1
        need = HEADER_SIZE
        if end - pos >= HEADER_SIZE:
            need += min(HEADER.unpack_from(view, pos)[0], self.max_frame)
        size = self._size
        if size - end >= size >> 2 and need <= size - pos:
            self._update_reading()
            return groups
        del view
        want = self._next_size()
        if not groups:
            del piece  # nothing cut holds it: the buffer may be reused in place
            if need <= size:
                want = size  # nor was it used up by frames: it need not grow
        if not self._move(want, _least_buffer(need)) and groups:
            # no room for the next buffer: once the batches of these frames are done,
            # their piece lets go of this buffer, and it may be reused in place
            weakref.finalize(piece, self.budget.serve_soon).atexit = False
        self._update_reading()
        return groups

    def _next_size(self) -> int:
        """The size of the next buffer: twice this one's if a read filled it or it served
        few takes (each move costs an allocation and a copy), half if it served many and
        stayed mostly empty; no less than the frame in progress needs."""
        size = self._size or FIRST_BUFFER
        if self._filled or self._takes < 32:
            size *= 2
        elif self._takes > 256 and self._peak < size // 16:
            size //= 2
        size = min(max(size, FIRST_BUFFER), self._largest)
        return max(size, _least_buffer(self.need))

    def _move(self, want: int, need: int, in_place: bool = True) -> bool:
        """Move the incomplete tail to a buffer of ``want`` bytes (at least ``need``), or
        to the start of this one when nobody holds a payload of it and it is the size
        wanted (``in_place``). False if the budget has no room for the one it needs yet:
        reading goes on in what is left of this one, then waits for it."""
        tail = self._end - self._start
        exclusive = self.exclusive()
        if in_place and exclusive and want == self._size:
            self._compact(tail)
            return True
        got = self.budget.allocate(self, want, need, credit=self.charge[0] if exclusive else 0)
        if got is None:
            if in_place and exclusive and need <= self._size:
                self._compact(tail)
                return True
            if self._full:
                self.budget.wait(self)
            return False
        fresh, on_limit = got
        fresh[:tail] = self._buf[self._start : self._end]
        self._use(fresh, on_limit)
        self._start, self._end = 0, tail
        self._peak, self._full, self._filled, self._takes = tail, False, False, 0
        self.budget.waiting.pop(self, None)
        return True

    def _compact(self, tail: int) -> None:
        if tail and self._start:
            base = self._buf.ctypes.data
            ctypes.memmove(base, base + self._start, tail)
        self._start, self._end = 0, tail
        self._peak, self._full, self._filled, self._takes = tail, False, False, 0
        self.budget.waiting.pop(self, None)

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        wanted = not (self._eof or self._full)
        if wanted != self._reading:
            self._reading = wanted
            now = time.monotonic()
            if wanted:
                # the time it could not send is not held against it
                if self._frame_began is not None:
                    self._frame_began += now - self._paused_at
                self.active_at = now
                readers = self.budget.readers
                if self in readers:
                    readers[self] = readers.pop(self)
                transport.resume_reading()
            else:
                self._paused_at = now
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
    options = (MAX_CONNECTIONS, MAX_BUFFERED, FRAME_TIMEOUT_OPTION)

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
        frame_timeout: float = FRAME_TIMEOUT,
    ):
        self.addr = addr
        self.max_frame = max_frame
        self.policy = policy
        self.metrics = metrics
        self.max_connections = max_connections
        self.budget = BufferBudget(max_buffered)
        self.drain_quiet = drain_quiet
        self.drain_grace = drain_grace
        self.frame_timeout = frame_timeout
        self.bound: Address | None = None
        self._server: asyncio.base_events.Server | None = None
        self._new: asyncio.Queue[TcpStream | None] = asyncio.Queue()
        self._open: dict[StreamId, TcpStream] = {}
        self._ids = 0
        self._draining = False
        self._refused = 0
        self._refused_logged = 0.0
        self._trim = _Trim()
        self._watch: asyncio.Task | None = None

    @classmethod
    def build(cls, endpoint: Endpoint, options: dict, config: AppConfig, metrics=None) -> TcpSource:
        return cls(
            tcp_address(endpoint.location),
            config.max_frame,
            BatchPolicy(config.max_batch, config.max_delay),
            metrics=metrics,
            max_connections=options["max-connections"],
            frame_timeout=options["frame-timeout"],
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
        self._watch = asyncio.create_task(self._watch_progress(), name="source bounds")

    def _new_reader(self) -> FrameReader:
        return FrameReader(self._accepted, self.max_frame, self.budget)

    async def _watch_progress(self) -> None:
        """Close the connections whose frame is past ``frame_timeout``; look again for
        room for connections that wait for the budget."""
        budget = self.budget
        while True:
            await asyncio.sleep(min(WATCH_EVERY, self.frame_timeout / 4))
            now = time.monotonic()
            for reader in budget.over_time(now, self.frame_timeout):
                reader.evict(
                    "frame_timeout",
                    "connection %s from %s closed: a frame begun %.0f s ago is still not "
                    "complete (%d bytes of it received)",
                    reader.id,
                    reader.peer,
                    reader.frame_age(now),
                    reader.pending,
                )
            budget.relieve()

    def _admit(self, reader: FrameReader) -> bool:
        """Whether a new connection may stay: at ``max_connections``, the quietest that makes
        no progress is closed to make room for it (:meth:`BufferBudget.quietest`), and it
        is closed itself if there is none."""
        if self._draining:
            reader.close()
            return False
        if len(self.budget.readers) > self.max_connections:  # the new one is among them
            now = time.monotonic()
            victim = self.budget.quietest(now, reader)
            if victim is None:
                self._refuse(reader)
                return False
            victim.evict(
                "evicted",
                "connection %s from %s closed to make room for a new one: %d connections "
                "are open, the most allowed (run --max-connections), and it had sent "
                "nothing for %.1f s, %d bytes of a frame",
                victim.id or "(handshake)",
                victim.peer,
                self.max_connections,
                now - victim.active_at,
                victim.pending,
            )
        return True

    def _accepted(self, reader: FrameReader) -> None:
        if not self._admit(reader):
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
                "(run --max-connections), and all of them make progress; %d refused so far",
                reader.peer,
                len(self.budget.readers) - 1,
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
        if self._watch is not None:
            self._watch.cancel()
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
