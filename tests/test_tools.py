"""The sender, the listener and the reader, over real sockets on 127.0.0.1.

Ports come from the OS (port 0), every socket and subprocess has a timeout,
waits are on conditions, and every process started here is stopped here.
"""

from __future__ import annotations

import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from digitstream.addresses import Address
from digitstream.codecs.inputs import encode_images
from digitstream.datasets import load_dataset
from digitstream.errors import UserError
from digitstream.tools import reader, sender
from digitstream.tools.listener import Listener
from digitstream.tools.sender import Framed, send_frames, split
from digitstream.wire.framing import frame, frame_many, iter_frames

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
TIMEOUT = 20.0
FORMATS = ["pickle", "npy", "u8", "f32", "f64", "json"]


# ------------------------------------------------------------------- helpers
class Sink:
    """A test server: accepts connections and keeps each one's bytes, in accept order."""

    def __init__(self, reset_after_first_read: bool = False):
        self.sock = socket.create_server((HOST, 0))
        self.sock.settimeout(TIMEOUT)
        self.addr = Address(HOST, self.sock.getsockname()[1])
        self.received: list[bytearray] = []
        self.closed = 0
        self._reset = reset_after_first_read
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self._reset:
                # an abortive close once the stream has started: the sender's next writes fail
                conn.settimeout(TIMEOUT)
                conn.recv(1)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.close()
                continue
            with self._lock:
                buffer = bytearray()
                self.received.append(buffer)
            thread = threading.Thread(target=self._read, args=(conn, buffer), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _read(self, conn: socket.socket, buffer: bytearray):
        conn.settimeout(TIMEOUT)
        with conn:
            while data := conn.recv(1 << 20):
                buffer += data
        with self._lock:
            self.closed += 1

    def wait_closed(self, connections: int) -> list[bytes]:
        wait_for(lambda: self.closed >= connections, what=f"{connections} connections to close")
        return [bytes(b) for b in self.received]

    def close(self):
        self._stop.set()
        self.sock.close()


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.close()


def wait_for(condition, timeout: float = TIMEOUT, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
    return value


def closed_port() -> tuple[socket.socket, int]:
    """A port nothing listens on, held (bound, not listening) so no one else takes it."""
    sock = socket.socket()
    sock.bind((HOST, 0))
    return sock, sock.getsockname()[1]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "digitstream.cli", *args]


class CliProcess:
    """A ``digitstream`` subprocess whose stderr lines are read by a thread."""

    def __init__(self, *args: str, **kwargs):
        self.proc = subprocess.Popen(cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self):
        for line in self.proc.stderr:
            text = line.decode(errors="replace").rstrip("\n")
            self.stderr.append(text)
            self.lines.put(text)

    def wait_line(self, prefix: str) -> str:
        deadline = time.monotonic() + TIMEOUT
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if line.startswith(prefix):
                return line

    def listening_port(self) -> int:
        return int(self.wait_line("listening on ").split()[2].split(",")[0].rsplit(":", 1)[1])

    def finish(self) -> tuple[int, bytes]:
        out = self.proc.stdout.read()
        status = self.proc.wait(timeout=TIMEOUT)
        self._pump_thread.join(TIMEOUT)
        return status, out

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)


@pytest.fixture
def processes():
    started: list[CliProcess] = []

    def start(*args: str, **kwargs) -> CliProcess:
        p = CliProcess(*args, **kwargs)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def connect(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# -------------------------------------------------------------------- sender
@pytest.mark.parametrize("fmt", FORMATS)
def test_sender_writes_what_the_codec_encodes(sink, digits, fmt):
    assert sender.main(sink.addr, fmt=fmt, progress=False) == 0
    [received] = sink.wait_closed(1)
    assert received == frame_many(encode_images(digits.X, fmt, labels=digits.y))


def test_default_send_is_the_seed_senders_bytes(sink, digits, processes):
    p = processes("send", "--to", str(sink.addr))
    status, _ = p.finish()
    [received] = sink.wait_closed(1)
    frames = list(iter_frames(received))
    assert len(frames) == 1797
    assert received == b"".join(frame(pickle.dumps(row)) for row in digits.X)
    assert pickle.loads(frames[5]).dtype == np.float64
    assert status == 0
    assert len(p.stderr) == 1 and "1,797 messages" in p.stderr[0]


def test_repeat_and_connections_split_the_stream_in_order(sink, digits):
    assert sender.main(sink.addr, fmt="u8", repeat=3, connections=4, progress=False) == 0
    received = sink.wait_closed(4)
    frames = list(iter_frames(frame_many(encode_images(digits.X, "u8")))) * 3
    total = len(frames)
    shares = [frame_many(frames[i * total // 4:(i + 1) * total // 4]) for i in range(4)]
    assert sorted(received) == sorted(shares)


@pytest.mark.parametrize("n, repeat, connections", [(5, 1, 1), (5, 3, 2), (5, 7, 3), (3, 1, 5), (4, 2, 4)])
def test_split_covers_the_repeated_stream_exactly(n, repeat, connections):
    payloads = [bytes([i]) * (i + 1) for i in range(n)]
    plans = split(Framed.from_payloads(payloads), repeat, connections)
    sizes = [plan.messages for plan in plans]
    assert sum(sizes) == n * repeat and max(sizes) - min(sizes) <= 1
    sent = b"".join(bytes(framed.data) * times for plan in plans for framed, times in plan.parts)
    assert sent == frame_many(payloads) * repeat


def test_many_repeats_of_a_small_set_arrive_whole(sink):
    # small frames repeated many times go out as large tiles; the stream must not change
    framed = Framed.from_payloads([b"a", b"bc", b"def"])
    stats = send_frames(sink.addr, split(framed, repeat=100_003, connections=2))
    received = sink.wait_closed(2)
    assert stats.messages == 300_009
    assert b"".join(received) == frame_many([b"a", b"bc", b"def"]) * 100_003


def test_rate_paces_all_connections_together(sink):
    framed = Framed.from_payloads([bytes([i % 256]) * 64 for i in range(1500)])
    stats = send_frames(sink.addr, split(framed, connections=3), rate=5000, record_times=True)
    received = sink.wait_closed(3)
    assert sum(len(list(iter_frames(r))) for r in received) == 1500
    # 1500 messages at 5000/s take 0.3 s; loose bounds keep a busy machine from failing this
    assert 0.25 <= stats.seconds < 3.0
    assert all(len(t) > 5 for t in stats.timelines)  # paced: many small writes, not one big one
    for timeline in stats.timelines:
        times, counts = zip(*timeline)
        assert list(times) == sorted(times) and list(counts) == sorted(counts) and counts[-1] == 500


def test_send_frames_takes_ready_made_bytes(sink):
    data = frame_many([b"x" * 10, b"y"])
    stats = send_frames(sink.addr, [data, Framed.from_bytes(data)])
    assert stats.messages == 4 and stats.connections == 2
    assert sink.wait_closed(2) == [data, data]
    with pytest.raises(ValueError):
        Framed.from_bytes(data[:-1])


def test_unreachable_address_is_one_line_and_nonzero(processes):
    held, port = closed_port()
    with held:
        p = processes("send", "--to", f"{HOST}:{port}")
        status, _ = p.finish()
    assert status != 0
    assert len(p.stderr) == 1 and p.stderr[0].startswith("Error: cannot connect to")


def test_a_lost_connection_is_a_user_error():
    s = Sink(reset_after_first_read=True)
    try:
        framed = Framed.from_payloads([b"z" * 1000] * 1000)
        with pytest.raises(UserError, match="lost after"):
            send_frames(s.addr, split(framed, repeat=1000))
    finally:
        s.close()


# ------------------------------------------------------------------ listener
RESULTS = [b"[3]", b"[1]", "é".encode(), b"", b"error: bad input \xff", b"[7]" * 50]


def test_listener_stores_frames_byte_for_byte_across_odd_reads(tmp_path):
    data = frame_many(RESULTS)
    out = tmp_path / "results.out"
    # cuts inside a header, inside a payload, on a boundary, and one byte at a time
    cuts = [0, 2, 5, 7, 8, 9, 10, 11, 12, 20, len(data) - 3, len(data)]
    with Listener(output=out, collect=True) as listener, connect(listener.port) as sock:
        for a, b in zip(cuts, cuts[1:]):
            sock.sendall(data[a:b])
            wait_for(lambda: listener.bytes >= b, what="the piece to be read")
        assert listener.wait(len(RESULTS), timeout=TIMEOUT)
    assert out.read_bytes() == data
    assert listener.results() == RESULTS


def test_listener_count_stops_after_exactly_n_frames(tmp_path):
    out = tmp_path / "results.out"
    with Listener(output=out, count=4, record_times=True) as listener, connect(listener.port) as sock:
        sock.sendall(frame_many([b"[%d]" % i for i in range(10)]))
        assert listener.wait(timeout=TIMEOUT)
        assert listener.finished
    assert out.read_bytes() == frame_many([b"[%d]" % i for i in range(4)])
    assert listener.frames == 4 and listener.timeline[-1][1] == 4


def test_listener_appends_a_reconnection_and_drops_a_cut_frame(tmp_path):
    out = tmp_path / "results.out"
    first, second = frame_many([b"[1]", b"[2]"]), frame_many([b"[3]", b"[4]", b"[5]"])
    with Listener(output=out) as listener:
        with connect(listener.port) as sock:
            sock.sendall(first + frame(b"[9]")[:5])  # the connection drops inside a frame
            wait_for(lambda: listener.bytes == len(first) + 5, what="the first connection's bytes")
        with connect(listener.port) as sock:
            sock.sendall(second)
            assert listener.wait(5, timeout=TIMEOUT)
    assert listener.connections == 2
    assert out.read_bytes() == first + second


def test_listener_on_frames_gets_groups_and_arrival_times():
    seen = []
    with Listener(on_frames=lambda groups, t_ns: seen.append((sum(map(len, groups)), t_ns))) as listener:
        with connect(listener.port) as sock:
            sock.sendall(frame_many([b"[0]"] * 1000))
            assert listener.wait(1000, timeout=TIMEOUT)
    assert sum(n for n, _ in seen) == 1000
    assert all(isinstance(t, int) and t > 0 for _, t in seen)


def test_listen_port_taken_is_one_line_and_nonzero(processes):
    with socket.create_server((HOST, 0)) as taken:
        port = taken.getsockname()[1]
        p = processes("listen", f"{HOST}:{port}")
        status, _ = p.finish()
    assert status != 0
    assert p.stderr == [f"Error: cannot listen on {HOST}:{port}: Address already in use"]


def test_listen_cli_prints_results_and_stops_at_count(processes):
    p = processes("listen", f"{HOST}:0", "--count", "3")
    with connect(p.listening_port()) as sock:
        sock.sendall(frame_many([b"[4]", b"caf\xc3\xa9", b"bad \xff", b"[5]"]))
        status, out = p.finish()
    assert status == 0
    assert out.decode() == "[4]\ncafé\nbad \ufffd\n"


def test_listen_cli_sigterm_keeps_what_arrived(processes, tmp_path):
    out = tmp_path / "digits.out"
    p = processes("listen", f"{HOST}:0", "-o", str(out))
    data = frame_many([b"[1]"] * 100)
    with connect(p.listening_port()) as sock:
        sock.sendall(data)
        wait_for(lambda: out.exists() and out.stat().st_size == len(data), what="the results on disk")
        p.proc.send_signal(signal.SIGTERM)
        status, _ = p.finish()
    assert status == 0
    assert out.read_bytes() == data
    assert "received 100 results" in p.stderr[-1]


def test_send_to_listen_through_the_cli(processes, tmp_path, digits):
    out = tmp_path / "digits.out"
    listening = processes("listen", f"{HOST}:0", "-o", str(out), "--count", str(2 * 1797))
    port = listening.listening_port()
    sending = processes("send", "--to", f"{HOST}:{port}", "--format", "u8", "--repeat", "2",
                        "--connections", "2")
    assert sending.finish()[0] == 0
    assert listening.finish()[0] == 0
    assert len(list(iter_frames(out.read_bytes()))) == 2 * 1797


# -------------------------------------------------------------------- reader
def test_read_prints_one_result_per_line(tmp_path, capsysbinary):
    path = tmp_path / "digits.out"
    path.write_bytes(frame_many(RESULTS[:5]))
    assert reader.main(str(path)) == 0
    out, err = capsysbinary.readouterr()
    assert err == b""
    assert out.decode() == "[3]\n[1]\né\n\nerror: bad input \ufffd\n"


def test_read_an_nc_style_file_of_many_pieces(tmp_path):
    # what `nc -l` stores is the stream as it came: the same bytes, whatever the reads were
    payloads = [b"[%d]" % (i % 10) for i in range(300_000)] + [b"error: x"] + [b"[1]"] * 5
    path = tmp_path / "digits.out"
    path.write_bytes(frame_many(payloads))
    done = subprocess.run(cli("read", str(path)), capture_output=True, timeout=TIMEOUT)
    assert done.returncode == 0
    assert done.stdout == b"\n".join(payloads) + b"\n"
    small = tmp_path / "small.out"
    small.write_bytes(frame_many(payloads[:1000] + payloads[-6:]))
    with open(small, "rb") as f:  # pieces that cut headers and payloads everywhere
        lines = [p for group in reader.iter_results(f, chunk_size=5) for p in group.to_list()]
    assert lines == payloads[:1000] + payloads[-6:]


@pytest.mark.parametrize("cut", [1, 3, 5])
def test_read_a_truncated_file_prints_whole_frames_then_warns(tmp_path, capsysbinary, cut):
    path = tmp_path / "digits.out"
    path.write_bytes(frame_many([b"[1]", b"[2]"]) + frame(b"[3]")[:cut])
    assert reader.main(str(path)) == 1
    out, err = capsysbinary.readouterr()
    assert out == b"[1]\n[2]\n"
    [warning] = err.decode().splitlines()
    assert warning.startswith("warning:") and "cut short" in warning


def test_read_a_file_that_is_not_result_frames(tmp_path, capsysbinary):
    path = tmp_path / "notes.txt"
    path.write_bytes(frame_many([b"[1]"] * 3) + b"hello, this is text\n" * 10)
    assert reader.main(str(path)) == 1
    out, err = capsysbinary.readouterr()
    assert out == b"[1]\n[1]\n[1]\n"
    assert "not a file of result frames" in err.decode()
