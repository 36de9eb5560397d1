"""The sender: a data set, encoded and framed once, written to the application's input.

The default is what the seed's ``sender.py`` did: every digits image, pickled,
one frame each, to 127.0.0.1:8002. Every distinct frame is encoded once into one
buffer; repeats and connections are views of that buffer and writes are about
a megabyte each, so the sender's own cost per message is close to nothing and
it is not what a benchmark measures.

Building blocks, for the demo and the benchmark as much as for ``digitstream send``:

* :func:`build_frames` encodes a data set into a :class:`Framed` buffer;
* :func:`split` turns it, repeated, into one :class:`Plan` per connection;
* :func:`send_frames` connects and writes the plans, paced or flat out, and
  returns :class:`SendStats`.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from digitstream.addresses import Address
from digitstream.codecs.inputs import encode_images
from digitstream.datasets import Dataset, load_dataset
from digitstream.errors import UserError
from digitstream.wire.framing import HEADER_SIZE, FrameSplitter, frame_many

#: bytes per write: large enough that system calls cost nothing per message
WRITE_SIZE = 1 << 20
#: a paced sender wakes about this often (seconds) and writes everything that has fallen due
PACE_INTERVAL = 0.001


@dataclass(frozen=True)
class Framed:
    """Whole frames, back to back in one buffer.

    ``offsets`` holds ``n + 1`` int64 byte offsets starting at 0: frame ``i``,
    header included, is ``data[offsets[i]:offsets[i + 1]]``.
    """

    data: bytes | memoryview
    offsets: np.ndarray

    @classmethod
    def from_payloads(cls, payloads: Sequence[bytes]) -> Framed:
        """Frame each payload (4-byte big-endian length, then the bytes)."""
        sizes = np.fromiter((len(p) for p in payloads), dtype=np.int64, count=len(payloads))
        offsets = np.zeros(len(payloads) + 1, dtype=np.int64)
        np.cumsum(sizes + HEADER_SIZE, out=offsets[1:])
        return cls(frame_many(payloads), offsets)

    @classmethod
    def from_bytes(cls, data: bytes) -> Framed:
        """Bytes that already are whole frames; ValueError if they end inside a frame."""
        splitter = FrameSplitter(max_frame=max(len(data), 1))
        sizes = []
        for group in splitter.feed(data):
            sizes.append(group.lengths() + HEADER_SIZE)
        if splitter.pending:
            raise ValueError(
                f"the last {splitter.pending} of {len(data)} bytes are not a whole frame"
            )
        offsets = np.zeros(1 + sum(map(len, sizes)), dtype=np.int64)
        if sizes:
            np.cumsum(np.concatenate(sizes), out=offsets[1:])
        return cls(bytes(data), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1])

    def slice(self, start: int, stop: int) -> Framed:
        """Frames ``start`` to ``stop`` (exclusive), without copying."""
        first, last = int(self.offsets[start]), int(self.offsets[stop])
        return Framed(memoryview(self.data)[first:last], self.offsets[start : stop + 1] - first)

    def tile(self, times: int) -> Framed:
        """These frames ``times`` times over, in one new buffer."""
        shifts = np.arange(times, dtype=np.int64)[:, None] * self.nbytes
        offsets = np.append((self.offsets[:-1] + shifts).ravel(), times * self.nbytes)
        return Framed(bytes(self.data) * times, offsets)


@dataclass(frozen=True)
class Plan:
    """What one connection sends: each part's frames, ``times`` times over, in order."""

    parts: tuple[tuple[Framed, int], ...]

    @property
    def messages(self) -> int:
        return sum(len(framed) * times for framed, times in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(framed.nbytes * times for framed, times in self.parts)


@dataclass
class SendStats:
    """What :func:`send_frames` did.

    ``timelines`` (with ``record_times=True``) holds, per connection, one
    ``(t_ns, sent)`` pair per write: ``time.perf_counter_ns()`` just before the
    write and the number of messages written on that connection once it is
    done. On Linux that clock is CLOCK_MONOTONIC, shared by every process of
    the machine, so it lines up with a :class:`~digitstream.tools.listener.Listener`'s
    timeline in another process.
    """

    messages: int
    bytes: int
    seconds: float
    connections: int
    timelines: list[list[tuple[int, int]]] | None = None

    @property
    def rate(self) -> float:
        """Messages per second."""
        return self.messages / self.seconds if self.seconds > 0 else float("inf")

    def summary(self, addr: Address) -> str:
        plural = "" if self.connections == 1 else "s"
        return (
            f"sent {self.messages:,} messages ({self.bytes / 1e6:,.1f} MB) "
            f"in {self.seconds:.3f} s, "
            f"{self.rate:,.0f} messages/s, to {addr} over {self.connections} connection{plural}"
        )


def build_frames(dataset: str | Dataset = "digits", fmt: str = "pickle") -> Framed:
    """Every image of a data set (``digits``, ``idx:DIR``, ``npz:FILE`` or a loaded
    :class:`Dataset`) encoded in ``fmt`` and framed, in data set order."""
    data = load_dataset(dataset) if isinstance(dataset, str) else dataset
    return Framed.from_payloads(encode_images(data.X, fmt, labels=data.y))


def split(framed: Framed, repeat: int = 1, connections: int = 1) -> list[Plan]:
    """The frames ``repeat`` times over as one stream, cut into ``connections``
    consecutive shares whose sizes differ by at most one message."""
    n = len(framed)
    total = n * repeat
    plans = []
    for i in range(connections):
        start, stop = i * total // connections, (i + 1) * total // connections
        parts: list[tuple[Framed, int]] = []
        if stop > start:
            first_pass, first = divmod(start, n)
            last_pass, last = divmod(stop, n)
            if first_pass == last_pass:
                parts.append((framed.slice(first, last), 1))
            else:
                if first:
                    parts.append((framed.slice(first, n), 1))
                    first_pass += 1
                if last_pass > first_pass:
                    parts.append((framed, last_pass - first_pass))
                if last:
                    parts.append((framed.slice(0, last), 1))
        plans.append(Plan(tuple(parts)))
    return plans


class _Cursor:
    """Walks one plan in pieces of whole frames."""

    def __init__(self, plan: Plan, tiles: dict):
        self._parts = [
            piece for framed, times in plan.parts for piece in _for_writing(framed, times, tiles)
        ]
        self._index = 0
        self._left = self._parts[0][1] if self._parts else 0
        self._pos = 0

    def take(self, max_frames: int) -> tuple[memoryview, int] | None:
        """The next at most ``max_frames`` frames (and about WRITE_SIZE bytes, at
        least one frame) as one contiguous view, and how many frames it holds."""
        while self._index < len(self._parts) and (
            self._left == 0 or len(self._parts[self._index][0]) == 0
        ):
            self._index += 1
            self._left = self._parts[self._index][1] if self._index < len(self._parts) else 0
            self._pos = 0
        if self._index == len(self._parts):
            return None
        framed = self._parts[self._index][0]
        offsets = framed.offsets
        start = self._pos
        by_size = int(np.searchsorted(offsets, offsets[start] + WRITE_SIZE, side="right")) - 1
        stop = min(len(framed), start + max_frames, max(start + 1, by_size))
        view = memoryview(framed.data)[int(offsets[start]) : int(offsets[stop])]
        self._pos = stop
        if stop == len(framed):
            self._pos = 0
            self._left -= 1
        return view, stop - start


def _for_writing(framed: Framed, times: int, tiles: dict) -> list[tuple[Framed, int]]:
    """A part repeated many times, as a tile of about WRITE_SIZE bytes (built once
    per send and shared between connections) repeated fewer times."""
    per_tile = min(times, WRITE_SIZE // max(framed.nbytes, 1))
    if per_tile < 2:
        return [(framed, times)]
    key = (id(framed), per_tile)
    if key not in tiles:
        tiles[key] = framed.tile(per_tile)
    pieces = [(tiles[key], times // per_tile)]
    if times % per_tile:
        pieces.append((framed, times % per_tile))
    return pieces


def send_frames(
    addr: Address,
    plans: Sequence[Plan | Framed | bytes],
    rate: float | None = None,
    progress: bool = False,
    record_times: bool = False,
    connect_timeout: float = 10.0,
) -> SendStats:
    """Open one connection per plan to ``addr`` and write each plan on its own
    connection, all at once (one thread each).

    A :class:`Framed` or ``bytes`` item is sent once as it is. ``rate`` paces
    the messages of all connections together at that many per second: each
    connection writes, about every millisecond, every message that has fallen
    due by a monotonic clock since the common start. Raises :class:`UserError`
    if a connection cannot be opened or is lost; on KeyboardInterrupt, stops
    every connection and re-raises.
    """
    conn_plans: list[Plan] = [_as_plan(p) for p in plans]
    total = sum(p.messages for p in conn_plans)
    socks = _connect_all(addr, len(conn_plans), connect_timeout)
    sent = [0] * len(conn_plans)
    timelines: list[list[tuple[int, int]]] | None = (
        [[] for _ in conn_plans] if record_times else None
    )
    errors: list[tuple[int, OSError]] = []
    stop = threading.Event()
    tiles: dict = {}
    start = time.perf_counter()

    def work(i: int) -> None:
        share = rate * conn_plans[i].messages / total if rate and total else None
        try:
            _write_plan(
                socks[i],
                _Cursor(conn_plans[i], tiles),
                conn_plans[i].messages,
                share,
                start,
                sent,
                i,
                None if timelines is None else timelines[i],
                stop,
            )
        except OSError as exc:
            errors.append((i, exc))
            stop.set()

    threads = [
        threading.Thread(target=work, args=(i,), name=f"sender-{i}", daemon=True)
        for i in range(len(conn_plans))
    ]
    bar = _progress_bar(total) if progress else None
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.1)
                if bar is not None:
                    bar[0].update(bar[1], completed=sum(sent))
        seconds = time.perf_counter() - start
    except KeyboardInterrupt:
        stop.set()
        for sock in socks:
            # wakes a thread blocked in a write to a receiver that stopped reading
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        raise
    finally:
        if bar is not None:
            bar[0].update(bar[1], completed=sum(sent))
            bar[0].stop()
        for sock in socks:
            sock.close()
    if errors:
        i, exc = errors[0]
        raise UserError(
            f"connection {i + 1} to {addr} lost after {sent[i]:,} messages: {exc.strerror or exc}"
        )
    return SendStats(
        messages=sum(sent),
        bytes=sum(p.nbytes for p in conn_plans),
        seconds=seconds,
        connections=len(conn_plans),
        timelines=timelines,
    )


def _as_plan(item: Plan | Framed | bytes) -> Plan:
    if isinstance(item, Plan):
        return item
    framed = item if isinstance(item, Framed) else Framed.from_bytes(item)
    return Plan(((framed, 1),))


def _connect_all(addr: Address, count: int, timeout: float) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection((addr.host, addr.port), timeout=timeout)
            sock.settimeout(None)
            # paced bursts are small: do not let Nagle hold them back for an ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(sock)
    except OSError as exc:
        for sock in socks:
            sock.close()
        reason = exc.strerror or str(exc) or type(exc).__name__
        if isinstance(exc, ConnectionRefusedError):
            reason += " (is `digitstream run` listening there?)"
        raise UserError(f"cannot connect to {addr}: {reason}") from None
    return socks


def _write_plan(
    sock: socket.socket,
    cursor: _Cursor,
    total: int,
    rate: float | None,
    start: float,
    sent: list[int],
    index: int,
    timeline: list | None,
    stop: threading.Event,
) -> None:
    done = 0
    burst = max(1, int(rate * PACE_INTERVAL)) if rate else 0
    while done < total and not stop.is_set():
        if rate:
            # message m falls due at start + m / rate; wait for a whole burst to fall due
            target = min(total, done + burst)
            delay = start + (target - 1) / rate - time.perf_counter()
            if delay > 0 and stop.wait(delay):
                break
            due = max(target, min(total, int((time.perf_counter() - start) * rate) + 1))
        else:
            due = total
        while done < due:
            # the cursor holds exactly ``total`` frames, so it never runs out before ``due``
            piece = cursor.take(due - done)
            assert piece is not None
            view, count = piece
            if timeline is not None:
                timeline.append((time.perf_counter_ns(), done + count))
            sock.sendall(view)
            done += count
            sent[index] = done
    if done == total:
        sock.shutdown(socket.SHUT_WR)


def _progress_bar(total: int):
    # start-up time: only for the progress bar
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        "sending",
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    bar.start()
    return bar, bar.add_task("send", total=total)


def main(
    to_addr: Address,
    fmt: str = "pickle",
    dataset: str = "digits",
    repeat: int = 1,
    rate: float | None = None,
    connections: int = 1,
    progress: bool | None = None,
) -> int:
    """``digitstream send``: returns the exit status."""
    plans = split(build_frames(dataset, fmt), repeat, connections)
    if progress is None:
        progress = sys.stderr.isatty()
    try:
        stats = send_frames(to_addr, plans, rate=rate, progress=progress)
    except KeyboardInterrupt:
        print("send: interrupted", file=sys.stderr)
        return 130
    print(stats.summary(to_addr), file=sys.stderr)
    return 0
