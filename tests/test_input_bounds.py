"""The TCP source's bounds under abuse: a client that makes no progress never keeps an honest
sender out, and ``--max-buffered-mb`` holds at the peak of the process's memory (VmHWM).

Each test runs a real ``digitstream run`` and attacks it from this process: thousands of idle
connections at the connection cap, hundreds of connections each holding most of a large
frame, malformed or silent acked handshakes, and many honest senders behind a listener too
slow for them. Each checks that every frame of every honest sender is answered, and that no
honest sender's connection is closed.
"""

from __future__ import annotations

import asyncio
import errno
import selectors
import socket
import subprocess
import sys
import threading
import time

from digitstream.addresses import Address
from digitstream.batching import BatchPolicy
from digitstream.codecs.inputs import encode_images
from digitstream.connectors.tcp import PER_CONNECTION, TcpSource
from digitstream.testing import MemorySink
from digitstream.wire import acked
from digitstream.wire.framing import HEADER, HEADER_SIZE, FrameSplitter, frame_many
from helpers import HOST, TIMEOUT, app_counts, memory_of, raise_open_files, wait_for

CLI = [sys.executable, "-m", "digitstream.cli"]


def _closed_within(sock: socket.socket, timeout: float) -> bool:
    """Whether the peer closes ``sock`` (end of stream or reset) within ``timeout``; what it
    sends first is read and dropped."""
    sock.settimeout(timeout)
    try:
        while sock.recv(1 << 16):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return False
    return True


# ------------------------------------------------ item 1: a cap full of idle connections
class IdleSwarm:
    """``n`` connections that each send two bytes of a header and then nothing; one the
    application closes is opened again at once, for as long as the swarm runs."""

    def __init__(self, port: int, n: int):
        self.port = port
        self.n = n
        self.opened = 0
        self.closed_by_peer = 0
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> IdleSwarm:
        self._thread.start()
        return self

    def _open(self) -> None:
        sock = socket.create_connection((HOST, self.port), timeout=TIMEOUT)
        sock.sendall(HEADER.pack(64)[:2])
        sock.setblocking(False)
        self._selector.register(sock, selectors.EVENT_READ)
        self.opened += 1

    def _run(self) -> None:
        for _ in range(self.n):
            if self._stop.is_set():
                return
            self._open()
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.1):
                sock = key.fileobj
                try:
                    data = sock.recv(1 << 16)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    continue
                self._selector.unregister(sock)
                sock.close()
                self.closed_by_peer += 1
                if not self._stop.is_set():
                    self._open()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()
        self._selector.close()


#: an honest sender arriving while idle clients hold every connection slot, and take any
#: slot freed at once, is answered within this long (README, "What one client cannot do"):
#: its connection waits in the kernel's accept queue behind up to 1,024 of theirs
SERVED_WITHIN = 5.0


def test_an_honest_sender_is_served_while_2000_idle_clients_attack(start_app, collector, digits,
                                                                    expected_texts):
    raise_open_files(4096)  # the swarm's 2,000 sockets are this process's
    app = start_app(collector.port, "--input-format", "u8")  # --max-connections 1024
    swarm = IdleSwarm(app.in_port, 2000).start()
    try:
        wait_for(lambda: swarm.opened >= 2000, what="2,000 idle connections opened")
        wait_for(lambda: swarm.closed_by_peer >= 2000 - 1024,
                 what="the application to hold 1,024 of them")
        waits = []
        for round_ in range(5):
            images = digits.X[round_ * 100:(round_ + 1) * 100]
            before = collector.count()
            started = time.monotonic()
            with socket.create_connection((HOST, app.in_port), timeout=TIMEOUT) as sock:
                sock.sendall(frame_many(encode_images(images, "u8")))
                got = collector.wait_count(before + len(images), timeout=SERVED_WITHIN * 5)
            waits.append(time.monotonic() - started)
            assert got[before:] == expected_texts[round_ * 100:(round_ + 1) * 100]
        opened, evicted = swarm.opened, swarm.closed_by_peer
    finally:
        swarm.close()
    errors = app_counts(app.stats())["connection_errors"]
    print(f"\n2,000 idle clients, {opened:,} connections opened by them, {evicted:,} closed by "
          f"the application; 5 honest senders answered in "
          f"{', '.join(f'{w * 1000:.0f}' for w in waits)} ms; errors {errors}")
    assert max(waits) < SERVED_WITHIN, waits


# -------------------------------------------------- item 1: the acked handshake
def _acked_listener(tmp_path):
    log = tmp_path / "listen.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([*CLI, "listen", "--acked", f"{HOST}:0", "-o",
                                 str(tmp_path / "results.acked")],
                                stdout=subprocess.DEVNULL, stderr=f)
    line = wait_for(lambda: next((ln for ln in log.read_text().splitlines()
                                  if ln.startswith("listening on")), None)
                    or (proc.poll() is not None and f"exited: {log.read_text()}"),
                    60, what="the acked listener")
    assert line.startswith("listening on"), line
    return proc, int(line.split()[2].rstrip(",").rpartition(":")[2])


def _hello_frame(name: bytes, body: bytes) -> bytes:
    payload = acked.HELLO + len(name).to_bytes(2, "big") + name + body
    return HEADER.pack(len(payload)) + payload


def _read_message(sock: socket.socket) -> acked.Message | None:
    sock.settimeout(TIMEOUT)
    head = sock.recv(HEADER_SIZE, socket.MSG_WAITALL)
    if len(head) < HEADER_SIZE:
        return None
    body = sock.recv(HEADER.unpack(head)[0], socket.MSG_WAITALL)
    return acked.parse(body)


BAD_HELLOS = [
    ("a body that is a JSON list", _hello_frame(b"s", b"[]"), "not a JSON object"),
    ("a body that is not JSON", _hello_frame(b"s", b"{nope"), "not JSON"),
    ("no fingerprint", _hello_frame(b"s", b'{"version": 1}'), "fingerprint"),
    ("a fingerprint that is a number", _hello_frame(b"s", b'{"version": 1, "fingerprint": 7}'),
     "fingerprint"),
    ("another version", _hello_frame(b"s", b'{"version": 9, "fingerprint": "ab"}'), "version"),
    ("an empty stream name", _hello_frame(b"", b'{"version": 1, "fingerprint": "ab"}'), "name"),
    ("a name longer than 255 bytes", _hello_frame(b"n" * 300, b'{"version": 1, '
                                                  b'"fingerprint": "ab"}'), "255"),
    ("DATA before HELLO", acked.data("s", 0, 0, b""), "HELLO"),
]


def test_acked_handshakes_that_never_finish_are_counted_refused_or_timed_out(start_app, tmp_path):
    listener, out_port = _acked_listener(tmp_path)
    try:
        app = start_app(out_port, "--acked", "--input-format", "u8", "--max-connections", "4",
                        "--no-metrics")
        # each malformed HELLO is answered with one REFUSED message saying why, then closed
        for name, data, words in BAD_HELLOS:
            with socket.create_connection((HOST, app.in_port), timeout=TIMEOUT) as sock:
                sock.sendall(data)
                message = _read_message(sock)
                assert message is not None and message.kind == acked.REFUSED, name
                assert words in message.reason, (name, message.reason)
                assert _closed_within(sock, 5), name
        # handshaking connections count against --max-connections: a fifth takes the place of
        # the one quiet longest
        silent = [socket.create_connection((HOST, app.in_port), timeout=TIMEOUT)
                  for _ in range(4)]
        silent[1].sendall(HEADER.pack(40)[:2])  # a HELLO begun and never finished
        started = time.monotonic()
        silent.append(socket.create_connection((HOST, app.in_port), timeout=TIMEOUT))
        assert _closed_within(silent[0], 5), "the quietest handshake was not closed"
        # an honest sender still gets in, and is served in full
        done = subprocess.run([*CLI, "send", "--acked", "--stream", "honest", "--to",
                               f"{HOST}:{app.in_port}", "--format", "u8", "--repeat", "2"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        # the others are closed by the handshake deadline (10 s after they connected)
        for sock in silent[1:]:
            assert _closed_within(sock, 15 - (time.monotonic() - started)), "not closed"
        waited = time.monotonic() - started
        for sock in silent:
            sock.close()
        assert waited < 13, waited
        print(f"\n{len(BAD_HELLOS)} malformed HELLOs refused; 5 silent handshakes against "
              f"--max-connections 4: the quietest closed for the fifth, an acked sender served, "
              f"the rest closed after {waited:.1f} s")
    finally:
        listener.kill()
        listener.wait(TIMEOUT)


# ------------------------------------------ item 2: --max-buffered-mb at the peak
class PartialHolders:
    """``n`` connections that each send ``sent`` bytes of a frame of ``length`` and then hold
    it, pushed from one thread with non-blocking sockets (the application stops reading
    some of them)."""

    def __init__(self, port: int, n: int, length: int, sent: int):
        body = b'{"pixels":[' + b"0," * length
        self.data = HEADER.pack(length) + body[:sent - HEADER_SIZE]
        self.socks = []
        for _ in range(n):
            sock = socket.create_connection((HOST, port), timeout=TIMEOUT)
            sock.setblocking(False)
            self.socks.append(sock)
        self.offsets = [0] * n
        self.closed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            pushed = False
            for i, sock in enumerate(self.socks):
                at = self.offsets[i]
                if at < 0 or at >= len(self.data):
                    continue
                try:
                    n = sock.send(self.data[at:at + (1 << 16)])
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.ECONNRESET, errno.EPIPE):
                        raise
                    self.offsets[i] = -1
                    self.closed += 1
                    continue
                self.offsets[i] = at + n
                pushed = True
            if not pushed:
                self._stop.wait(0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        for sock in self.socks:
            sock.close()


#: results queued for the listener: the TCP sink's queue (8 MiB) and the write in progress
RESULT_QUEUE = 10 << 20


def _bound(budget_mb: float, connections: int) -> int:
    """What the README says the process may grow by above the serving level."""
    return int(budget_mb * 2**20) + PER_CONNECTION * connections + RESULT_QUEUE


def test_partial_frames_of_300_clients_stay_within_the_budget_at_the_peak(start_app, collector,
                                                                          digits, expected_texts):
    """300 clients each send 0.9 MB of a 1 MB frame and hold it, against --max-buffered-mb
    64, while 4 honest senders send theirs: the peak of the process's memory stays within the
    stated bound, and every honest frame is answered."""
    budget_mb = 64
    app = start_app(collector.port, "--input-format", "json", "--max-buffered-mb",
                    str(budget_mb))
    # the serving level: a batch of the size the honest senders send has been through
    payloads = encode_images(digits.X[:1000], "json")
    assert len(_exchange(app, collector, payloads)) == 1000
    serving, _ = memory_of(app.proc.pid)
    holders = PartialHolders(app.in_port, 300, 1_000_000, 900_000)
    honest_errors: list[BaseException] = []

    def honest():
        try:
            with socket.create_connection((HOST, app.in_port), timeout=TIMEOUT) as sock:
                for _ in range(5):
                    sock.sendall(frame_many(payloads))
        except OSError as exc:
            honest_errors.append(exc)

    senders = [threading.Thread(target=honest) for _ in range(4)]
    try:
        started = time.monotonic()
        for t in senders:
            t.start()
        for t in senders:
            t.join(TIMEOUT * 2)
        results = collector.wait_count(1000 + 4 * 5 * 1000, timeout=TIMEOUT)
        honest_seconds = time.monotonic() - started
        # the holders are taken in turn: each is read, then closed once it makes no progress,
        # until those left (about one per MiB of the budget) fit it
        wait_for(lambda: app_counts(app.stats())["connections_open"] <= budget_mb + 16,
                 timeout=TIMEOUT, what="the partial frames let go")
        _, peak = memory_of(app.proc.pid)
    finally:
        holders.close()
    assert not honest_errors, honest_errors
    assert sorted(results[1000:]) == sorted(expected_texts[:1000] * 20)
    errors = app_counts(app.stats())["connection_errors"]
    bound = _bound(budget_mb, 300 + 4)
    print(f"\n300 clients x 0.9 MB of a 1 MB frame, --max-buffered-mb {budget_mb}: RSS "
          f"{serving / 2**20:.0f} MiB serving, peak (VmHWM) {peak / 2**20:.0f} MiB, "
          f"+{(peak - serving) / 2**20:.0f} MiB (bound {bound / 2**20:.0f} MiB); 20,000 honest "
          f"frames answered in {honest_seconds:.1f} s; connections closed {errors}")
    assert peak - serving <= bound, (serving, peak, bound)


def _exchange(app, collector, payloads):
    before = collector.count()
    with socket.create_connection((HOST, app.in_port), timeout=TIMEOUT) as sock:
        sock.sendall(frame_many(payloads))
        return collector.wait_count(before + len(payloads))[before:]


class SlowListener:
    """A listener that reads ``rate`` bytes a second (in 4 KiB reads) and counts frames."""

    def __init__(self, rate: int):
        self.sock = socket.create_server((HOST, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.rate = rate
        self.frames = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(0.2)
            splitter = FrameSplitter()
            with conn:
                while not self._stop.is_set():
                    try:
                        data = conn.recv(4096)
                    except TimeoutError:
                        continue
                    if not data:
                        break
                    self.frames += sum(map(len, splitter.feed(data)))
                    self._stop.wait(len(data) / self.rate)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        self.sock.close()


def test_many_honest_senders_and_a_slow_listener_pause_within_the_budget(start_app, digits):
    """40 senders send 10,000 json frames each as fast as they can, to a listener that reads
    512 KiB/s of results, against --max-buffered-mb 16: reading pauses, nobody is closed,
    every frame is answered, and the peak of the process's memory stays within the stated
    bound."""
    budget_mb, n_senders, per_sender = 16, 40, 10_000
    listener = SlowListener(rate=512 << 10)
    try:
        app = start_app(listener.port, "--input-format", "json", "--max-buffered-mb",
                        str(budget_mb))
        chunk = frame_many(encode_images(digits.X[:1000], "json"))
        with socket.create_connection((HOST, app.in_port), timeout=TIMEOUT) as sock:
            sock.sendall(chunk * 10)  # the serving level: batches of a fast sender's size
        wait_for(lambda: listener.frames >= 10_000, what="the warm-up answered")
        serving, _ = memory_of(app.proc.pid)
        failures: list[BaseException] = []

        def send():
            try:
                with socket.create_connection((HOST, app.in_port), timeout=TIMEOUT * 2) as sock:
                    sock.sendall(chunk * (per_sender // 1000))
            except OSError as exc:
                failures.append(exc)

        started = time.monotonic()
        senders = [threading.Thread(target=send) for _ in range(n_senders)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(TIMEOUT * 2)
        total = 10_000 + n_senders * per_sender
        wait_for(lambda: listener.frames >= total, timeout=TIMEOUT * 2,
                 what=f"{total:,} results (have {listener.frames:,})")
        elapsed = time.monotonic() - started
        _, peak = memory_of(app.proc.pid)
        counts = app_counts(app.stats())
    finally:
        listener.close()
    bound = _bound(budget_mb, n_senders)
    print(f"\n{n_senders} senders x {per_sender:,} json frames, a listener reading 512 KiB/s, "
          f"--max-buffered-mb {budget_mb}: all answered in {elapsed:.1f} s; RSS "
          f"{serving / 2**20:.0f} MiB serving, peak (VmHWM) {peak / 2**20:.0f} MiB, "
          f"+{(peak - serving) / 2**20:.0f} MiB (bound {bound / 2**20:.0f} MiB); "
          f"connection errors {counts['connection_errors']}")
    assert not failures, failures
    assert counts["connection_errors"] == {}
    assert counts["messages_in"] == counts["messages_out"] == total
    assert listener.frames == total
    assert peak - serving <= bound, (serving, peak, bound)


# ---------------------------------------------- item 1: a deadline for a frame once begun
def test_a_frame_not_completed_in_time_closes_its_connection_and_only_that_one():
    """In process, with a deadline of 0.4 s: a connection that sends two bytes of a header, or
    most of a frame, and stops is closed; one that sends whole frames slowly, one at a time,
    and one that is idle are not."""
    async def go():
        source = TcpSource(Address(HOST, 0), 1 << 16, BatchPolicy(), frame_timeout=0.4)
        await source.start(MemorySink())
        frames: dict = {}
        consumers = []

        async def consume(stream):
            async for batch in stream.batches():
                frames[stream.id] = frames.get(stream.id, 0) + len(batch)
            stream.close()

        async def accept():
            async for stream in source.streams():
                consumers.append(asyncio.ensure_future(consume(stream)))

        accepting = asyncio.ensure_future(accept())
        port = source.bound.port
        opened = [await asyncio.open_connection(HOST, port) for _ in range(4)]
        (_, header), (_, most), (_, slow), (idle_reader, _) = opened
        header.write(HEADER.pack(100)[:2])
        most.write(HEADER.pack(1000) + b"m" * 900)
        started = asyncio.get_running_loop().time()
        for _ in range(8):  # 1.6 s of whole frames, 0.2 s apart
            slow.write(frame_many([b"s" * 10]))
            await asyncio.sleep(0.2)
        closed = [(await r.read()) == b"" for r, _ in opened[:2]]
        waited = asyncio.get_running_loop().time() - started
        slow.close()
        still_open = not idle_reader.at_eof()
        for _, w in opened:
            w.close()
        await source.drain()
        await asyncio.wait_for(asyncio.gather(*consumers), TIMEOUT)
        accepting.cancel()
        await source.close()
        return closed, waited, still_open, sorted(frames.values())

    closed, waited, idle_open, answered = asyncio.run(go())
    assert closed == [True, True] and waited < 2.0, (closed, waited)
    assert idle_open and answered == [8]
