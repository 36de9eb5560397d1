"""``digitstream send --acked --stream NAME``: a data set sent as one named, acknowledged stream.

Frame *i* of the stream is image ``i mod n`` of the data set (``n`` images,
``repeat`` times over), so the sender can rebuild any frame: it keeps no copy of
what it sent, only where the stream stands. It says HELLO with the stream's name
and a fingerprint of its data, is told where the stream stands (RESUME), sends
DATA messages from there, and keeps at most ``window`` frames unacknowledged
(that window is the back-pressure). When the connection breaks (``run``
restarted) it connects again and carries on from where it is told; started again
with the same command, it does the same. It ends once every frame is
acknowledged, that is stored by the listener.

The fingerprint is a hash of the data set's name, the format, the repeat count,
the number of frames and the bytes of the first frames: a sender that reuses a
stream name with other data is refused by the listener that holds the stream.
"""

from __future__ import annotations

import hashlib
import json
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from digitstream.addresses import Address
from digitstream.errors import UserError
from digitstream.tools.sender import PACE_INTERVAL, Framed, build_frames
from digitstream.wire import acked
from digitstream.wire.framing import HEADER, HEADER_SIZE

#: frames per DATA message at most (the application's default batch)
MESSAGE_FRAMES = 8192
#: bytes of frames per DATA message at most (one larger frame is sent alone)
MESSAGE_BYTES = 1 << 20
#: frames sent and not yet acknowledged, at most, by default
DEFAULT_WINDOW = 1 << 17
#: how many leading frames the fingerprint hashes
FINGERPRINT_FRAMES = 64


def fingerprint(framed: Framed, dataset: str, fmt: str, repeat: int) -> str:
    digest = hashlib.sha256(
        json.dumps(
            {"dataset": dataset, "format": fmt, "repeat": repeat, "frames": len(framed) * repeat}
        ).encode()
    )
    digest.update(framed.slice(0, min(len(framed), FINGERPRINT_FRAMES)).data)
    return digest.hexdigest()[:16]


class _Lost(Exception):
    """The connection to ``run`` broke."""


@dataclass
class AckedStats:
    stream: str
    total: int
    resumed_at: int  # where the stream stood when this sender started
    sent: int  # frames this sender sent (resent ones included)
    connections: int
    seconds: float

    def summary(self, addr: Address) -> str:
        done = self.total - self.resumed_at
        rate = done / self.seconds if self.seconds > 0 else float("inf")
        start = f", resumed at {self.resumed_at:,}" if self.resumed_at else ""
        again = self.sent - done
        resent = f", {again:,} sent again after reconnections" if again > 0 else ""
        return (
            f"stream {self.stream!r}: all {self.total:,} messages acknowledged{start}{resent}; "
            f"{done:,} in {self.seconds:.3f} s, {rate:,.0f} messages/s, to {addr} "
            f"over {self.connections} connection{'' if self.connections == 1 else 's'}"
        )


class AckedSender:
    """Sends ``framed`` ``repeat`` times over as stream ``name`` to ``addr``; see the
    module doc. :meth:`run` returns once the listener holds every frame."""

    def __init__(
        self,
        addr: Address,
        name: str,
        framed: Framed,
        repeat: int,
        fingerprint: str,
        window: int = DEFAULT_WINDOW,
        rate: float | None = None,
        log=None,
        record_times: bool = False,
    ):
        if not name or len(name.encode()) > acked.MAX_NAME:
            raise UserError(f"--stream needs a name of 1 to {acked.MAX_NAME} bytes")
        self.addr = addr
        self.name = name
        self.framed = framed
        self.total = len(framed) * repeat
        self.fingerprint = fingerprint
        self.window = window
        self.rate = rate
        self.log = log or (lambda text: print(f"send: {text}", file=sys.stderr))
        self.acked = 0  # the listener holds every frame before this
        self.sent = 0
        self.connections = 0
        #: with ``record_times``: (perf_counter_ns before the send, seq after the message) per
        #: DATA message, and (perf_counter_ns, seq) per ACK; see :func:`ack_latencies_ns`
        self.sends: list[tuple[int, int]] | None = [] if record_times else None
        self.acks: list[tuple[int, int]] | None = [] if record_times else None
        self._cond = threading.Condition()
        self._lost = False

    def run(self) -> AckedStats:
        start = time.perf_counter()
        resumed_at: int | None = None
        delay = 0.02
        waiting = False
        while resumed_at is None or self.acked < self.total:
            try:
                sock = socket.create_connection((self.addr.host, self.addr.port), timeout=10)
            except OSError as exc:
                if not waiting:
                    self.log(f"waiting for `digitstream run --acked` at {self.addr} ({exc})")
                    waiting = True
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            waiting = False
            self.connections += 1
            try:
                seq = self._handshake(sock)
                if resumed_at is None:
                    resumed_at = seq
                elif seq < self.total:
                    self.log(f"stream {self.name!r} resumes at {seq:,}")
                delay = 0.02
                self._pump(sock, seq)
            except (_Lost, OSError) as exc:
                self.log(f"connection to {self.addr} lost ({exc}); connecting again")
                time.sleep(delay)
            finally:
                sock.close()
        return AckedStats(
            self.name,
            self.total,
            resumed_at,
            self.sent,
            self.connections,
            time.perf_counter() - start,
        )

    def _handshake(self, sock: socket.socket) -> int:
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(acked.hello(self.name, self.fingerprint))
        # run answers once the listener has said where the stream stands: it may be
        # waiting for the listener, so no deadline here beyond the connection breaking
        message = _read_message(sock)
        if message.kind == acked.REFUSED:
            raise UserError(f"stream {self.name!r} refused: {message.reason}")
        if message.kind != acked.RESUME:
            raise _Lost(f"expected RESUME, got {message.kind!r}")
        seq = message.seq
        if seq > self.total:
            raise UserError(
                f"stream {self.name!r} stands at {seq:,}, past this sender's {self.total:,} "
                "messages"
            )
        with self._cond:
            self.acked = max(self.acked, seq)
        return seq

    def _pump(self, sock: socket.socket, seq: int) -> None:
        self._lost = False
        reader = threading.Thread(target=self._read_acks, args=(sock,), daemon=True)
        reader.start()
        try:
            paced_from, paced_start = seq, time.perf_counter()
            burst = max(1, int((self.rate or 0) * PACE_INTERVAL))
            n = len(self.framed)
            offsets = self.framed.offsets
            data = memoryview(self.framed.data)
            while seq < self.total:
                with self._cond:
                    while seq - self.acked >= self.window and not self._lost:
                        self._cond.wait(0.5)
                    if self._lost:
                        raise _Lost("the connection broke")
                    room = self.acked + self.window - seq
                stop = min(self.total, seq + room, seq + MESSAGE_FRAMES, (seq // n + 1) * n)
                if self.rate:
                    # frame k falls due at paced_start + (k - paced_from) / rate; a DATA message
                    # waits for a whole burst (a millisecond's worth): a message per frame would
                    # cost run a batch per frame
                    target = min(self.total, seq + burst)
                    delay = paced_start + (target - paced_from) / self.rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    elapsed = time.perf_counter() - paced_start
                    stop = min(stop, max(target, paced_from + int(elapsed * self.rate)))
                first = seq % n
                last = first + (stop - seq)
                begin = int(offsets[first])
                by_size = int(offsets.searchsorted(begin + MESSAGE_BYTES, side="right")) - 1
                last = min(last, max(first + 1, by_size))
                end = int(offsets[last])
                count = last - first
                if self.sends is not None:
                    self.sends.append((time.perf_counter_ns(), seq + count))
                sock.sendall(acked.data_head(self.name, seq, count, end - begin))
                sock.sendall(data[begin:end])
                seq += count
                self.sent += count
            with self._cond:
                while self.acked < self.total and not self._lost:
                    self._cond.wait(0.5)
                if self.acked < self.total:
                    raise _Lost("the connection broke before the last acknowledgement")
            sock.shutdown(socket.SHUT_WR)
        finally:
            try:  # wakes the reader thread, which ends on the broken connection
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            reader.join(5)

    def _read_acks(self, sock: socket.socket) -> None:
        try:
            while True:
                message = _read_message(sock)
                if message.kind == acked.ACK:
                    if self.acks is not None:
                        self.acks.append((time.perf_counter_ns(), message.seq))
                    with self._cond:
                        if message.seq > self.acked:
                            self.acked = message.seq
                            self._cond.notify_all()
                elif message.kind == acked.REFUSED:
                    self.log(f"run closed the stream: {message.reason}")
                    break
        except (_Lost, OSError, ValueError):  # ProtocolError is a ValueError
            pass
        with self._cond:
            self._lost = True
            self._cond.notify_all()


def ack_latencies_ns(
    sends: list[tuple[int, int]], acks: list[tuple[int, int]], first: int = 0
) -> np.ndarray:
    """Per message from ``first`` on: nanoseconds from the start of the send of its DATA
    message to the first ACK that covers it (the listener has stored it)."""
    if not sends or not acks:
        return np.empty(0, dtype=np.int64)
    send_t, send_end = (np.array(column, dtype=np.int64) for column in zip(*sends, strict=True))
    ack_t, ack_seq = (np.array(column, dtype=np.int64) for column in zip(*acks, strict=True))
    ack_seq = np.maximum.accumulate(ack_seq)
    seqs = np.arange(first, int(send_end[-1]), dtype=np.int64)
    sent_at = send_t[np.searchsorted(send_end, seqs, side="right")]
    covered = np.searchsorted(ack_seq, seqs, side="right")
    done = covered < len(ack_t)
    return ack_t[covered[done]] - sent_at[done]


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    parts = []
    while size:
        ready, _, _ = select.select([sock], [], [], 1.0)
        if not ready:
            continue
        chunk = sock.recv(size)
        if not chunk:
            raise _Lost("run closed the connection")
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


def _read_message(sock: socket.socket) -> acked.Message:
    (length,) = HEADER.unpack(_read_exactly(sock, HEADER_SIZE))
    if length > 1 << 20:
        raise _Lost(f"a reply of {length:,} bytes is not of the acked protocol")
    return acked.parse(_read_exactly(sock, length))


def main(
    to_addr: Address,
    stream: str,
    fmt: str = "pickle",
    dataset: str = "digits",
    repeat: int = 1,
    rate: float | None = None,
    window: int = DEFAULT_WINDOW,
) -> int:
    """``digitstream send --acked``: returns the exit status."""
    framed = build_frames(dataset, fmt)
    sender = AckedSender(
        to_addr,
        stream,
        framed,
        repeat,
        fingerprint(framed, dataset, fmt, repeat),
        window=window,
        rate=rate,
    )
    try:
        stats = sender.run()
    except KeyboardInterrupt:
        print("send: interrupted", file=sys.stderr)
        return 130
    print(stats.summary(to_addr), file=sys.stderr)
    return 0
