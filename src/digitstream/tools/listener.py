"""The listener: what ``nc -l 127.0.0.1 7002 > digits.out`` was.

It listens, accepts the application's connection (and any later one: the
application reconnects when its connection drops) and stores the result frames
byte for byte in a file, appending in arrival order, or prints them one per
line. Only whole frames reach the file, so a connection cut inside a frame
leaves the file readable.

One thread serves the listening socket and every connection with a selector;
reads are a megabyte at a time and frames are counted a group at a time
(:class:`~digitstream.wire.framing.FrameSplitter`), which keeps up with
millions of short result frames per second.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from digitstream.addresses import Address
from digitstream.errors import UserError
from digitstream.tools.reader import MAX_RESULT_FRAME, write_lines
from digitstream.wire.framing import FrameSplitter, FrameTooLarge, Payloads

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20
#: reads per connection when draining what already arrived before stopping
DRAIN_READS = 256

FramesCallback = Callable[[list[Payloads], int], None]


@dataclass
class _Connection:
    sock: socket.socket
    peer: str
    splitter: FrameSplitter = field(
        default_factory=lambda: FrameSplitter(max_frame=MAX_RESULT_FRAME)
    )
    held: bytes = b""  # received bytes of an incomplete frame, written once it is whole


#: a free port on loopback, the kernel's choice
ANY_LOOPBACK_PORT = Address("127.0.0.1", 0)


class Listener:
    """Accepts connections on ``addr`` and takes in their result frames.

    ``addr`` port 0 picks a free port (see :attr:`address` after
    :meth:`start`). What happens to the frames:

    * ``output``: a path (truncated at start, as ``> FILE`` does) or a binary
      file; every whole frame is written to it byte for byte, in arrival order;
    * ``collect=True``: payloads are kept, see :meth:`results`;
    * ``on_frames(groups, t_ns)``: called from the listener's thread with the
      :class:`Payloads` groups of each read and its arrival time;
    * ``record_times=True``: :attr:`timeline` gets one ``(t_ns, frames)`` pair
      per read that completed frames: ``time.perf_counter_ns()`` when the read
      returned and the total number of frames received by then.

    ``count`` stops the listener after exactly that many frames (bytes after
    the last of them are not written). Use as a context manager, or call
    :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        addr: Address | tuple[str, int] = ANY_LOOPBACK_PORT,
        output: str | os.PathLike | BinaryIO | None = None,
        *,
        count: int | None = None,
        collect: bool = False,
        on_frames: FramesCallback | None = None,
        record_times: bool = False,
    ):
        self.requested = Address(*addr)
        self.count = count
        self.frames = 0
        self.bytes = 0
        self.connections = 0
        self.timeline: list[tuple[int, int]] = []
        self.error: BaseException | None = None
        self.first_frame_ns: int | None = None
        self.last_frame_ns: int | None = None
        self._output_spec = output
        self._out: BinaryIO | None = None
        self._own_out = False
        self._collect = collect
        self._collected: list[Payloads] = []
        self._on_frames = on_frames
        self._record_times = record_times
        self._lsock: socket.socket | None = None
        self._address: Address | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel = selectors.DefaultSelector()
        self._conns: dict[int, _Connection] = {}
        self._buf = bytearray(READ_SIZE)
        self._view = memoryview(self._buf)
        self._cond = threading.Condition()
        self._stopping = False
        self._finished = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ public
    def start(self) -> Listener:
        """Bind and listen (UserError if the address cannot be used), then serve in a thread."""
        host, port = self.requested
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._lsock = socket.create_server((host, port), family=family, backlog=64)
        except OSError as exc:
            self._wake_r.close()
            self._wake_w.close()
            # create_server appends the address to strerror; the address is in our message already
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise UserError(f"cannot listen on {self.requested}: {reason}") from None
        self._lsock.setblocking(False)
        self._address = Address(*self._lsock.getsockname()[:2])
        if isinstance(self._output_spec, (str, os.PathLike)):
            try:
                self._out = open(self._output_spec, "wb")  # noqa: SIM115 - closed in close()
            except OSError as exc:
                self._lsock.close()
                raise UserError(
                    f"cannot write {self._output_spec}: {exc.strerror or exc}"
                ) from None
            self._own_out = True
        else:
            self._out = self._output_spec
        self._sel.register(self._lsock, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._wake_r)
        self._thread = threading.Thread(target=self._serve, name="listener", daemon=True)
        self._thread.start()
        return self

    @property
    def address(self) -> Address:
        """The bound address (the real port when 0 was asked for)."""
        assert self._address is not None, "the listener has not been started"
        return self._address

    @property
    def port(self) -> int:
        return self.address.port

    @property
    def finished(self) -> bool:
        """True once the count is reached, :meth:`stop` was called, or an error ended it."""
        return self._finished

    def wait(self, count: int | None = None, timeout: float | None = None) -> bool:
        """Wait until ``count`` frames (default: the listener's own count) have
        arrived or the listener has finished; True if that happened in time."""
        target = count if count is not None else self.count
        with self._cond:
            return self._cond.wait_for(
                lambda: self._finished or (target is not None and self.frames >= target), timeout
            )

    def results(self) -> list[bytes]:
        """The payloads received so far (with ``collect=True``), in arrival order."""
        with self._cond:
            groups = list(self._collected)
        return [payload for group in groups for payload in group.to_list()]

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, take in what has already arrived, close everything.
        Re-raises an error that ended the listener's thread."""
        if self._thread is not None:
            self._stopping = True
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
            self._thread.join(timeout)
        if self.error is not None and not isinstance(self.error, BrokenPipeError):
            raise self.error

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ------------------------------------------------------------ thread
    def _serve(self) -> None:
        try:
            while not self._stopping and not self._finished:
                for key, _ in self._sel.select():
                    if key.data is None:
                        self._accept()
                    elif key.data is self._wake_r:
                        self._wake_r.recv(64)
                    else:
                        self._read(key.data)
                    if self._finished:
                        break
            if not self._finished:
                self._drain()
        except BaseException as exc:
            self.error = exc
            if not isinstance(exc, BrokenPipeError):
                log.error("listener stopped: %s", exc)
        finally:
            self._close()

    def _accept(self) -> None:
        assert self._lsock is not None  # served only after start() bound it
        try:
            sock, peer = self._lsock.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        conn = _Connection(sock, f"{peer[0]}:{peer[1]}")
        self._conns[sock.fileno()] = conn
        self._sel.register(sock, selectors.EVENT_READ, conn)
        self.connections += 1
        log.info("connection %d from %s", self.connections, conn.peer)

    def _read(self, conn: _Connection) -> bool:
        """One read from ``conn``; False when nothing more will come from it now."""
        try:
            n = conn.sock.recv_into(self._buf)
        except BlockingIOError:
            return False
        except OSError as exc:
            log.warning("connection from %s failed: %s", conn.peer, exc.strerror or exc)
            n = 0
        if n == 0:
            self._drop(conn)
            return False
        t_ns = time.perf_counter_ns()
        self.bytes += n
        data = self._view[:n]
        try:
            groups = conn.splitter.feed(data)
        except FrameTooLarge as exc:
            log.warning(
                "connection from %s closed: %s; it is not sending result frames", conn.peer, exc
            )
            conn.held = b""
            self._drop(conn)
            return False
        new = sum(len(g) for g in groups)
        if self.count is not None and self.frames + new >= self.count:
            groups = _first_frames(groups, self.count - self.frames)
            new = self.count - self.frames
        if self._out is not None and groups:
            whole = sum(g.nbytes for g in groups)
            held = conn.held
            if held:
                self._out.write(held[:whole])
            if whole > len(held):
                self._out.write(data[: whole - len(held)])
            self._out.flush()
        pending = conn.splitter.pending
        if pending == 0:
            conn.held = b""
        elif pending <= n:
            conn.held = bytes(data[n - pending :])
        else:
            conn.held = conn.held[len(conn.held) - (pending - n) :] + bytes(data)
        if new:
            if self._on_frames is not None:
                self._on_frames(groups, t_ns)
            with self._cond:
                if self._collect:
                    self._collected.extend(groups)
                self.frames += new
                if self.first_frame_ns is None:
                    self.first_frame_ns = t_ns
                self.last_frame_ns = t_ns
                if self._record_times:
                    self.timeline.append((t_ns, self.frames))
                if self.count is not None and self.frames >= self.count:
                    self._finished = True
                self._cond.notify_all()
        return True

    def _drain(self) -> None:
        for conn in list(self._conns.values()):
            for _ in range(DRAIN_READS):
                if self._finished or not self._read(conn):
                    break

    def _drop(self, conn: _Connection) -> None:
        if conn.splitter.pending:
            log.warning(
                "connection from %s closed inside a frame: %d bytes of it discarded",
                conn.peer,
                conn.splitter.pending,
            )
        else:
            log.info("connection from %s closed", conn.peer)
        self._conns.pop(conn.sock.fileno(), None)
        self._sel.unregister(conn.sock)
        conn.sock.close()

    def _close(self) -> None:
        for conn in list(self._conns.values()):
            self._sel.unregister(conn.sock)
            conn.sock.close()
        self._conns.clear()
        self._sel.close()
        assert self._lsock is not None  # served only after start() bound it
        self._lsock.close()
        self._wake_r.close()
        self._wake_w.close()
        if self._out is not None:
            try:
                if self._own_out:
                    self._out.close()
                else:
                    self._out.flush()
            except OSError as exc:
                self.error = self.error or exc
        with self._cond:
            self._finished = True
            self._cond.notify_all()


def _first_frames(groups: list[Payloads], k: int) -> list[Payloads]:
    """The first ``k`` frames of ``groups``."""
    out: list[Payloads] = []
    for group in groups:
        if k <= 0:
            break
        if len(group) <= k:
            out.append(group)
        else:
            out.append(group.slice(0, k))
        k -= len(group)
    return out


def main(
    addr: Address, output: str | None = None, count: int | None = None, progress: bool | None = None
) -> int:
    """``digitstream listen``: returns the exit status."""
    stdout = sys.stdout.buffer

    def print_results(groups: list[Payloads], t_ns: int) -> None:
        write_lines(groups, stdout)
        stdout.flush()

    listener = Listener(addr, output, count=count, on_frames=None if output else print_results)
    listener.start()
    where = f", storing results in {output}" if output else ""
    print(f"listening on {listener.address}{where}", file=sys.stderr)
    if progress is None:
        progress = output is not None and sys.stderr.isatty()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main_thread else None
    bar = _progress_bar(count) if progress else None
    try:
        while not listener.wait(timeout=0.2):
            if bar is not None:
                bar[0].update(bar[1], completed=listener.frames)
    except KeyboardInterrupt:
        pass
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        if bar is not None:
            bar[0].update(bar[1], completed=listener.frames)
            bar[0].stop()
        try:
            listener.stop()
        except OSError as exc:
            raise UserError(f"listener failed: {exc.strerror or exc}") from None
    if isinstance(listener.error, BrokenPipeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    print(_summary(listener, output), file=sys.stderr)
    return 0


def _summary(listener: Listener, output: str | None) -> str:
    plural = "" if listener.connections == 1 else "s"
    text = f"received {listener.frames:,} results over {listener.connections} connection{plural}"
    if listener.frames > 1:
        assert listener.first_frame_ns is not None and listener.last_frame_ns is not None
        seconds = (listener.last_frame_ns - listener.first_frame_ns) / 1e9
        rate = f", {listener.frames / seconds:,.0f} results/s" if seconds > 0 else ""
        text += f" in {seconds:.3f} s from first to last{rate}"
    return text + (f", stored in {output}" if output else "")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _progress_bar(count: int | None):
    # start-up time: only for the progress bar
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn

    columns: list[ProgressColumn] = [TextColumn("received")]
    columns += (
        [BarColumn(), MofNCompleteColumn()] if count else [TextColumn("{task.completed:,} results")]
    )
    bar = Progress(*columns, console=Console(stderr=True), transient=True)
    bar.start()
    return bar, bar.add_task("listen", total=count)
