"""``digitstream listen --acked -o FILE``: the end of the acknowledged path.

Exactly once, with ``run --acked``: a result is in FILE before it is
acknowledged (and on disk, with ``--fsync``, so a power loss keeps it too); a
crash of the listener costs nothing, since ``run`` keeps every result until it
is acknowledged and sends it again to the listener started again.

FILE (see :mod:`digitstream.wire.acked`) holds each stream's HELLO (its name and
the fingerprint of its data) and its results as DATA records, so that a listener
started again on it knows, from the file alone, where each stream stands: it cuts
off a torn last record, continues the file, and drops whatever comes again at or
below what it already holds (idempotent by sequence number). ``digitstream read
FILE`` prints each result once, in order per stream.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import BinaryIO

from digitstream.addresses import Address
from digitstream.errors import UserError
from digitstream.tools.reader import MAX_RESULT_FRAME
from digitstream.wire import acked
from digitstream.wire.framing import HEADER, HEADER_SIZE, frame

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20


class AckedListener:
    """Stores the acked results that come to ``addr`` in ``output``; see the module doc."""

    def __init__(self, addr: Address, output: str | os.PathLike, fsync: bool = False):
        self.requested = addr
        self.path = Path(output)
        self.fsync = fsync
        self.state = acked.AckedFile()
        self.stored = 0  # results written by this process
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._lsock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._file: BinaryIO | None = None

    def start(self) -> AckedListener:
        self._open_file()
        host, port = self.requested
        try:
            self._lsock = socket.create_server((host, port), backlog=16)
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise UserError(f"cannot listen on {self.requested}: {reason}") from None
        self._lsock.settimeout(0.2)
        thread = threading.Thread(target=self._accept, name="acked-listener", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    @property
    def address(self) -> Address:
        assert self._lsock is not None, "the listener has not been started"
        return Address(*self._lsock.getsockname()[:2])

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until :meth:`stop` is called; True if it was."""
        return self._stop.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        if self._lsock is not None:
            self._lsock.close()
        if self._file is not None:
            self._file.close()

    def _open_file(self) -> None:
        try:
            f = open(self.path, "r+b" if self.path.exists() else "w+b")  # noqa: SIM115
        except OSError as exc:
            raise UserError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        f.seek(0, 2)
        if f.tell() == 0:
            f.write(frame(acked.FILE_MAGIC))
            self._sync(f)
        else:
            try:
                self.state = acked.AckedFile.scan(f)
            except (ValueError, acked.ProtocolError) as exc:
                f.close()
                raise UserError(
                    f"{self.path} is not a file of `digitstream listen --acked` ({exc}); "
                    "give another -o FILE"
                ) from None
            if self.state.torn:
                log.warning(
                    "%s ends in a torn record (%d bytes): cut off, the file goes on from there",
                    self.path,
                    self.state.torn,
                )
                f.truncate(self.state.end)
                self._sync(f)
            f.seek(self.state.end)
        self._file = f

    def _sync(self, f) -> None:
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())

    def _accept(self) -> None:
        assert self._lsock is not None
        while not self._stop.is_set():
            try:
                sock, peer = self._lsock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            log.info("connection %d from %s:%d", self.connections, *peer[:2])
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(0.2)
        # an ACK is a few bytes: sent at once, not held back for the previous one's TCP ACK
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        try:
            while not self._stop.is_set():
                try:
                    chunk = sock.recv(READ_SIZE)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                buf = buf + chunk if buf else chunk
                used, replies = self._take(buf)
                buf = buf[used:]
                if replies:
                    sock.settimeout(30.0)
                    sock.sendall(b"".join(replies))
                    sock.settimeout(0.2)
        except (OSError, acked.ProtocolError) as exc:
            log.warning("connection closed: %s", exc)
        finally:
            sock.close()

    def _take(self, buf: bytes) -> tuple[int, list[bytes]]:
        """Store the whole messages at the start of ``buf``; the bytes used and the replies."""
        view = memoryview(buf)
        pos = 0
        records: list[bytes | memoryview] = []
        replies: list[bytes] = []
        acks: dict[str, int] = {}
        with self._lock:
            state = self.state
            while pos + HEADER_SIZE <= len(buf):
                (length,) = HEADER.unpack_from(buf, pos)
                if length > MAX_RESULT_FRAME:
                    raise acked.ProtocolError(f"a message of {length:,} bytes is not acked results")
                end = pos + HEADER_SIZE + length
                if end > len(buf):
                    break
                message = acked.parse(view[pos + HEADER_SIZE : end])
                if message.kind == acked.HELLO:
                    replies.append(self._hello(message, view[pos:end], records))
                elif message.kind == acked.DATA:
                    if self._data(message, view[pos:end], records):
                        acks[message.stream] = state.positions[message.stream]
                    else:
                        replies.append(
                            acked.refused(message.stream, "DATA for a stream that said no HELLO")
                        )
                else:
                    raise acked.ProtocolError(f"unexpected {message.kind!r} message")
                pos = end
            if records:
                assert self._file is not None
                for record in records:
                    self._file.write(record)
                self._sync(self._file)
        replies.extend(acked.ack(stream, seq) for stream, seq in acks.items())
        return pos, replies

    def _hello(self, message: acked.Message, record: memoryview, records: list) -> bytes:
        fingerprint = message.hello()["fingerprint"]
        stream, state = message.stream, self.state
        known = state.fingerprints.get(stream)
        if known is None:
            records.append(bytes(record))
            state.add(message)
        elif known != fingerprint:
            log.warning("stream %r refused: its data differs from what %s holds", stream, self.path)
            return acked.refused(
                stream,
                f"stream {stream!r} in {self.path} holds other data (fingerprint {known}, "
                f"this sender's {fingerprint}): send it under another --stream name",
            )
        return acked.resume(stream, state.positions[stream])

    def _data(self, message: acked.Message, record: memoryview, records: list) -> bool:
        stream, state = message.stream, self.state
        stands = state.positions.get(stream)
        if stands is None:
            return False
        first, count = message.seq, message.count
        if first + count <= stands:
            return True  # sent again after a reconnection: already stored
        if first > stands:
            # cannot happen with run --acked (it resends from where this file stands); storing
            # it would leave a hole, so it is not stored and not acknowledged
            log.error(
                "stream %r: results from %d came while the file stands at %d; not stored",
                stream,
                first,
                stands,
            )
            return True
        if first < stands:
            skip = stands - first
            offsets = acked.frame_offsets(message.frames, count)
            rest = message.frames[offsets[skip] :]
            record = memoryview(acked.data(stream, stands, count - skip, rest))
            count -= skip
        records.append(bytes(record))
        self.stored += count
        state.positions[stream] = stands + count
        return True


def main(addr: Address, output: str, fsync: bool = False) -> int:
    """``digitstream listen --acked -o FILE``: returns the exit status."""
    listener = AckedListener(addr, output, fsync=fsync).start()
    state = listener.state
    held = sum(state.positions.values())
    where = f"{held:,} results of {len(state.positions)} streams so far" if held else "new"
    print(
        f"listening on {listener.address}, storing results in {output} (acked, {where})",
        file=sys.stderr,
    )
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main_thread else None
    try:
        listener.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        listener.stop()
    print(
        f"stored {listener.stored:,} results over {listener.connections} connections in {output}",
        file=sys.stderr,
    )
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
