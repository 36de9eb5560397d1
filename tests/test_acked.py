"""Acknowledged delivery (``--acked``): SIGKILL the sender, ``run`` or the listener at random
moments, start it again with the same command, and every result is in the file exactly once,
in order per stream. Real processes, real sockets on 127.0.0.1.

The kill points come from a seeded schedule: the seed is printed (and shown on failure);
``DIGITSTREAM_KILL_SEED`` replays one, ``DIGITSTREAM_KILL_RUNS=20`` runs each kill test
that many times (one test item per run) with seeds one after another.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from digitstream.wire import acked
from digitstream.wire.framing import HEADER, HEADER_SIZE, frame
from helpers import HOST, AppProcess, HeldPort, app_counts, memory_of, plateau, wait_for

DIGITS = 1797
#: 501,363 messages per stream
REPEAT = 279
TOTAL = DIGITS * REPEAT
#: about what one json result takes in the file, header included
RESULT_BYTES = 50
KILL_RUNS = int(os.environ.get("DIGITSTREAM_KILL_RUNS", "1"))
SEED = int(os.environ.get("DIGITSTREAM_KILL_SEED", str(random.SystemRandom().randrange(1 << 30))))
CLI = [sys.executable, "-m", "digitstream.cli"]
LONG = 240.0
#: senders of the kill tests are paced: at full speed the rest of a stream after a kill
#: point (10% or more) can be sent between two looks at how far it is, and the kill
#: then comes after the end
KILL_RATE = 1_000_000


def _started(proc: subprocess.Popen, log: Path, pattern: str, what: str) -> None:
    def up():
        if re.search(pattern, log.read_text(errors="replace"), re.MULTILINE):
            return True
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}:\n{log.read_text()}")
        return False

    wait_for(up, 60, interval=0.02, what=what)


class AckedSetup:
    """A listener, an application and senders on fixed ports, each restartable with the
    same command."""

    def __init__(self, tmp_path: Path, model_dir: Path, run_args: tuple[str, ...] = ()):
        self.tmp = tmp_path
        self.model = model_dir
        self.run_args = run_args
        self.in_port, self.out_port = HeldPort(), HeldPort()
        self.file = tmp_path / "results.acked"
        self.listener: subprocess.Popen | None = None
        self.app: AppProcess | None = None
        self.senders: dict[str, subprocess.Popen] = {}
        self.sender_args: dict[str, list[str]] = {}
        self.kills = {"sender": 0, "run": 0, "listener": 0}
        self._logs = 0

    def _log(self, name: str) -> Path:
        self._logs += 1
        return self.tmp / f"{self._logs:02d}-{name}.log"

    def start_listener(self) -> None:
        log = self._log("listen")
        with open(log, "wb") as f:
            self.listener = subprocess.Popen(
                [*CLI, "listen", "--acked", f"{HOST}:{self.out_port.port}", "-o", str(self.file)],
                stdout=subprocess.DEVNULL, stderr=f)
        _started(self.listener, log, r"^listening on", "the acked listener")

    def start_app(self) -> None:
        self.app = AppProcess(self.model, self.out_port.port, "--acked", "--no-metrics",
                              "--input-format", "u8", "--output-format", "json", *self.run_args,
                              in_port=self.in_port.port)
        self.app.wait_listening(60)

    def start_sender(self, name: str, repeat: int = REPEAT, *extra: str) -> None:
        args = self.sender_args.setdefault(
            name, [*CLI, "send", "--acked", "--stream", name, "--to", f"{HOST}:{self.in_port.port}",
                   "--format", "u8", "--repeat", str(repeat), *extra])
        with open(self._log(f"send-{name}"), "wb") as f:
            self.senders[name] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=f)

    def kill(self, who: str, name: str | None = None) -> None:
        """SIGKILL ``who`` and start it again with the same command."""
        self.kills[who] += 1
        if who == "listener":
            assert self.listener is not None
            self.listener.kill()
            self.listener.wait(30)
            self.start_listener()
        elif who == "run":
            assert self.app is not None
            self.app.proc.kill()
            self.app.stop()
            self.start_app()
        else:
            assert name is not None
            proc = self.senders[name]
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
                self.start_sender(name)

    def stored(self) -> int:
        """About how many results the file holds (from its size)."""
        try:
            return self.file.stat().st_size // RESULT_BYTES
        except FileNotFoundError:
            return 0

    def wait_senders(self, timeout: float = LONG) -> None:
        deadline = time.monotonic() + timeout
        for name, proc in self.senders.items():
            try:
                code = proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"sender {name!r} did not finish; {self.diagnosis()}") from None
            assert code == 0, f"sender {name!r} exited with {code}; {self.diagnosis()}"

    def diagnosis(self) -> str:
        logs = sorted(self.tmp.glob("*.log"))[-6:]
        app_log = self.app.log()[-3000:] if self.app else ""
        return (f"seed {SEED}, kills {self.kills}\nrun: {app_log}\n"
                + "\n".join(f"{p.name}: {p.read_text(errors='replace')[-1500:]}" for p in logs))

    def close(self) -> None:
        for proc in [*self.senders.values(), self.listener]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(30)
        if self.app is not None:
            self.app.stop()
        self.in_port.close()
        self.out_port.close()


def results_of(path: Path, stream: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(seq, label) of every result ``digitstream read`` prints, in its order."""
    args = [*CLI, "read", str(path)] + (["--stream", stream] if stream else [])
    out = subprocess.run(args, capture_output=True, timeout=120, check=True).stdout
    lines = out.count(b"\n")
    pairs = np.array(re.findall(rb'^\{"seq":(\d+),"label":(\d+),', out, re.MULTILINE),
                     dtype=np.int64).reshape(-1, 2)
    assert len(pairs) == lines, f"{lines - len(pairs)} lines are not classified results"
    return pairs[:, 0], pairs[:, 1]


def assert_exactly_once(path: Path, stream: str, total: int, labels: np.ndarray,
                        why: str) -> None:
    seqs, got = results_of(path, stream)
    assert len(seqs) == total, f"{len(seqs):,} results of {total:,} stored; {why}"
    wrong = np.flatnonzero(seqs != np.arange(total))
    assert not wrong.size, (f"results out of order or repeated from position {wrong[0]:,} "
                            f"(seq {seqs[wrong[0]]}); {why}")
    assert np.array_equal(got, labels[np.arange(total) % len(labels)]), why


@pytest.fixture(scope="module")
def labels(expected_texts):
    return np.array([int(t.strip("[]")) for t in expected_texts])


@pytest.fixture
def setup(tmp_path, model_dir):
    made: list[AckedSetup] = []

    def make(run_args: tuple[str, ...] = (), sub: str = "") -> AckedSetup:
        directory = tmp_path / sub if sub else tmp_path
        directory.mkdir(exist_ok=True)
        s = AckedSetup(directory, model_dir, run_args)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def _kill_schedule(rng: random.Random, who: list[str]) -> list[tuple[float, str]]:
    """Kill points as fractions of the stream, in order."""
    return sorted((rng.uniform(0.02, 0.9), w) for w in who)


def _run_with_kills(setup, who: list[str], streams: tuple[str, ...], seed: int, sub: str,
                    labels) -> None:
    rng = random.Random(seed)
    print(f"kill schedule seed {seed} (DIGITSTREAM_KILL_SEED={seed} replays it)")
    s = setup(sub=sub)
    s.start_listener()
    s.start_app()
    for name in streams:
        s.start_sender(name, REPEAT, "--rate", str(KILL_RATE))
    expected = TOTAL * len(streams)
    for fraction, w in _kill_schedule(rng, who):
        wait_for(lambda: s.stored() >= fraction * expected
                 or all(p.poll() is not None for p in s.senders.values()),
                 LONG, what=f"{fraction:.0%} of the stream before killing {w}")
        time.sleep(rng.uniform(0, 0.01))  # at most 2% of a stream at KILL_RATE
        assert any(p.poll() is None for p in s.senders.values()), (
            f"the stream ended before the kill of {w} at {fraction:.0%}; {s.diagnosis()}")
        s.kill(w, rng.choice(streams) if w == "sender" else None)
    s.wait_senders()
    why = s.diagnosis()
    for name in streams:
        assert_exactly_once(s.file, name, TOTAL, labels, why)


#: one test item per run of a kill test, each with its own seed
KILL_SEEDS = pytest.mark.parametrize("seed", [SEED + run for run in range(KILL_RUNS)],
                                     ids=lambda seed: f"seed{seed}")


@KILL_SEEDS
@pytest.mark.parametrize("who", ["sender", "run", "listener"])
def test_a_process_killed_mid_stream_and_started_again_loses_and_repeats_nothing(
        who, seed, setup, labels):
    _run_with_kills(setup, [who], ("digits",), seed, who, labels)


@KILL_SEEDS
def test_all_three_killed_several_times_in_one_stream(seed, setup, labels):
    _run_with_kills(setup, ["sender", "run", "listener"] * 2, ("digits",), seed, "all", labels)


@KILL_SEEDS
def test_two_streams_at_once_with_kills(seed, setup, labels):
    _run_with_kills(setup, ["sender", "sender", "run", "listener"], ("left", "right"), seed,
                    "two", labels)


def test_with_the_dask_engine_a_killed_run_loses_and_repeats_nothing(setup, labels):
    rng = random.Random(SEED)
    print(f"kill schedule seed {SEED}")
    s = setup(("--engine", "dask", "--workers", "1"))
    s.start_listener()
    s.start_app()
    s.start_sender("dask", 60)
    total = DIGITS * 60
    for fraction, w in _kill_schedule(rng, ["run", "listener"]):
        wait_for(lambda: s.stored() >= fraction * total or s.senders["dask"].poll() is not None,
                 LONG, what=f"{fraction:.0%} of the stream")
        s.kill(w)
    s.wait_senders()
    assert_exactly_once(s.file, "dask", total, labels, s.diagnosis())


def test_with_worker_processes_kills_of_run_its_workers_and_the_listener_lose_nothing(
        setup, labels):
    import psutil

    rng = random.Random(SEED)
    print(f"kill schedule seed {SEED}")
    s = setup(("--workers", "2"))
    s.start_listener()
    s.start_app()
    s.start_sender("pool", 60)
    total = DIGITS * 60
    workers_killed = 0
    for fraction, w in _kill_schedule(rng, ["run", "listener", "worker", "worker"]):
        wait_for(lambda: s.stored() >= fraction * total or s.senders["pool"].poll() is not None,
                 LONG, what=f"{fraction:.0%} of the stream")
        if w != "worker":
            s.kill(w)
            continue
        assert s.app is not None
        workers = []
        for child in psutil.Process(s.app.proc.pid).children():
            try:  # one killed before may not be reaped yet
                if (child.status() != psutil.STATUS_ZOMBIE
                        and "digitstream.engine.pool_worker" in " ".join(child.cmdline())):
                    workers.append(child)
            except psutil.Error:
                pass
        if workers:
            rng.choice(workers).kill()
            workers_killed += 1
    s.wait_senders()
    assert_exactly_once(s.file, "pool", total, labels, s.diagnosis())
    print(f"worker processes killed: {workers_killed}")


def test_a_stream_name_reused_with_other_data_is_refused(setup, labels):
    s = setup()
    s.start_listener()
    s.start_app()
    s.start_sender("digits", 2)
    s.wait_senders(60)
    other = subprocess.run(
        [*CLI, "send", "--acked", "--stream", "digits", "--to", f"{HOST}:{s.in_port.port}",
         "--format", "u8", "--repeat", "3"], capture_output=True, timeout=60)
    assert other.returncode == 1
    assert b"refused" in other.stderr and b"other data" in other.stderr, other.stderr
    # the same command again finds its stream complete and ends at once
    again = subprocess.run(s.sender_args["digits"], capture_output=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert b"resumed at 3,594" in again.stderr
    assert_exactly_once(s.file, "digits", 2 * DIGITS, labels, s.diagnosis())


def test_a_stream_name_reused_while_its_sender_sends_leaves_that_stream_alone(setup, labels):
    """A second sender with other data under the name of a stream whose sender is still
    sending is refused, and the first stream goes on: its results are still delivered,
    also across a reconnection of the listener, exactly once."""
    s = setup()
    s.start_listener()
    s.start_app()
    s.start_sender("digits", 40, "--rate", "15000")
    wait_for(lambda: s.stored() > 2 * DIGITS, 60, what="the first results")
    for _ in range(3):  # while it holds results here, and in the gaps when it holds none
        other = subprocess.run(
            [*CLI, "send", "--acked", "--stream", "digits", "--to", f"{HOST}:{s.in_port.port}",
             "--format", "u8", "--repeat", "3"], capture_output=True, timeout=60)
        assert other.returncode == 1
        assert b"refused" in other.stderr and b"other data" in other.stderr, other.stderr
    s.kill("listener")  # the sink says HELLO again for every stream it knows
    s.wait_senders(120)
    assert_exactly_once(s.file, "digits", 40 * DIGITS, labels, s.diagnosis())


def test_a_torn_last_record_is_cut_off_and_the_file_goes_on(setup, labels):
    s = setup()
    s.start_listener()
    s.start_app()
    s.start_sender("digits", 2)
    s.wait_senders(60)
    s.listener.kill()
    s.listener.wait(30)
    whole = s.file.stat().st_size
    with open(s.file, "ab") as f:  # what a crash inside a write leaves
        f.write(acked.data("digits", 2 * DIGITS, 5, b"\0\0\0\x03[1]" * 5)[:-7])
    s.start_listener()
    assert s.file.stat().st_size == whole
    s.sender_args.pop("digits")
    s.start_sender("digits", 3)  # other data under the same name: refused
    assert s.senders.pop("digits").wait(60) == 1
    s.start_sender("more", 1)
    s.wait_senders(60)
    assert_exactly_once(s.file, "digits", 2 * DIGITS, labels, s.diagnosis())
    assert_exactly_once(s.file, "more", DIGITS, labels, s.diagnosis())


class StalledListener:
    """An acked listener that answers the first HELLO (the stream is new) and then stops
    reading."""

    def __init__(self):
        self.sock = socket.create_server((HOST, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.conns.append(conn)
            conn.settimeout(5)
            head = conn.recv(HEADER_SIZE, socket.MSG_WAITALL)
            body = conn.recv(HEADER.unpack(head)[0], socket.MSG_WAITALL)
            message = acked.parse(body)
            conn.sendall(acked.resume(message.stream, 0))

    def close(self):
        self._stop.set()
        self._thread.join(5)
        for conn in self.conns:
            conn.close()
        self.sock.close()




@pytest.mark.parametrize("window", [20_000, 10_000_000])
def test_a_listener_that_stops_reading_bounds_the_window_and_runs_memory(window, start_app):
    stalled = StalledListener()
    sender = None
    try:
        app = start_app(stalled.port, "--acked", "--input-format", "u8", "--output-format",
                        "json", "--flush-timeout", "1")
        rss_before = memory_of(app.proc.pid)[0]
        repeat = 1200  # 2.2 million messages, 138 MB of input
        sender = subprocess.Popen(
            [*CLI, "send", "--acked", "--stream", "s", "--to", f"{HOST}:{app.in_port}",
             "--format", "u8", "--repeat", str(repeat), "--window", str(window)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        def received():
            return app_counts(app.stats())["messages_in"]

        wait_for(received, 60, what="the first messages")
        held = plateau(received)
        assert sender.poll() is None, "the sender ended while nothing was acknowledged"
        if window < DIGITS * repeat // 2:
            assert held <= window, f"run received {held:,} with a window of {window:,}"
        else:
            # not the window but run's bounded result queue (8 MiB) and buffers stop it
            assert held < DIGITS * repeat // 2, f"run took {held:,} messages of a stalled stream"
        rss = memory_of(app.proc.pid)[0]
        print(f"window {window:,}: run took {held:,} messages, grew by {(rss - rss_before) >> 20} "
              "MiB")
        assert rss - rss_before < 200 << 20, f"run grew by {(rss - rss_before) >> 20} MiB"
    finally:
        if sender is not None and sender.poll() is None:
            sender.send_signal(signal.SIGINT)
            try:
                sender.wait(10)
            except subprocess.TimeoutExpired:
                sender.kill()
                sender.wait(10)
        stalled.close()


def test_messages_and_the_file_round_trip(tmp_path):
    frames = b"".join(HEADER.pack(3) + b"[%d]" % (i % 10) for i in range(5))
    message = acked.parse(acked.data("s", 10, 5, frames)[HEADER_SIZE:])
    assert (message.kind, message.stream, message.seq, message.count) == (acked.DATA, "s", 10, 5)
    assert bytes(message.frames) == frames
    assert acked.frame_offsets(message.frames, 5) == [0, 7, 14, 21, 28, 35]
    with pytest.raises(acked.ProtocolError):
        acked.frame_offsets(message.frames, 4)
    assert acked.parse(acked.hello("s", "ab")[HEADER_SIZE:]).hello()["fingerprint"] == "ab"
    with pytest.raises(acked.ProtocolError):
        acked.parse(b"Z\x00\x01s")
    path = tmp_path / "f.acked"
    record = acked.data("s", 0, 5, frames)
    path.write_bytes(frame(acked.FILE_MAGIC) + acked.hello("s", "ab") + record
                     + record[:-3])
    with open(path, "rb") as f:
        state = acked.AckedFile.scan(f)
        assert state.positions == {"s": 5} and state.fingerprints == {"s": "ab"}
        assert state.torn == len(record) - 3
        assert list(acked.iter_file(f)) == [frames]
        assert list(acked.iter_file(f, "other")) == []
    plain = tmp_path / "plain.out"
    plain.write_bytes(frames)
    with open(plain, "rb") as f, pytest.raises(ValueError):
        acked.AckedFile.scan(f)
