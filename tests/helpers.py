"""Real parts for tests: held ports, a result collector, the application and the listener as
processes.

Everything talks to 127.0.0.1 only, on ports the kernel hands out: a server is started on
port 0 and the port it bound is read back from it, and a port wanted before anything listens
there is held by a socket of the test (:class:`HeldPort`). None is merely found free and
used later, since another process can take it in between. Every socket has a timeout, every
wait is on a condition with a deadline, and every process started here is stopped by its
fixture.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

from digitstream.wire.framing import HEADER_SIZE, FrameSplitter

HOST = "127.0.0.1"
TIMEOUT = 30.0


class HeldPort:
    """A port the kernel handed out, held by a socket that is bound but never listens.

    Connecting there is refused, as with nothing on the port, and the kernel hands the
    number to no other socket; yet a server that sets SO_REUSEADDR (asyncio's, Python's
    ``socket.create_server``, :class:`Collector`) can listen on it. For a listener that must
    be missing at first, or come back on the same port.
    """

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, 0))
        self.port: int = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> HeldPort:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def wait_for(condition, timeout: float = TIMEOUT, interval: float = 0.01,
             what: str = "condition"):
    """Poll ``condition()`` until it is truthy; its value, or AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Collector:
    """A listener in a thread: accepts the application's connections, keeps every frame."""

    def __init__(self, port: int = 0):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, port))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.frames: list[bytes] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conn: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def addr(self) -> str:
        return f"{HOST}:{self.port}"

    def _run(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            conn.settimeout(0.2)
            self._conn = conn
            splitter = FrameSplitter(max_frame=1 << 30)
            while not self._stop.is_set():
                try:
                    data = conn.recv(1 << 20)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                groups = splitter.feed(data)
                with self._lock:
                    for group in groups:
                        self.frames.extend(group.to_list())
            conn.close()
            self._conn = None

    def texts(self) -> list[str]:
        with self._lock:
            return [f.decode("utf-8", "replace") for f in self.frames]

    def count(self) -> int:
        with self._lock:
            return len(self.frames)

    def wait_count(self, n: int, timeout: float = TIMEOUT) -> list[str]:
        wait_for(lambda: self.count() >= n, timeout,
                 what=f"{n} result frames (have {self.count()})")
        return self.texts()

    def drop_connection(self):
        """Close the current connection from the listener's side."""
        if self._conn is not None:
            self._conn.close()

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def send_bytes(port: int, data: bytes, close: bool = True) -> socket.socket | None:
    sock = socket.create_connection((HOST, port), timeout=TIMEOUT)
    sock.sendall(data)
    if close:
        sock.close()
        return None
    return sock


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _log_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _wait_for_line(pattern: re.Pattern, proc: subprocess.Popen, log_path: Path, timeout: float,
                   what: str) -> re.Match:
    """The first match of ``pattern`` in the log a process writes; AssertionError, with the
    log, if the process exits first or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        # exited before the read: then the log read is complete
        exited = proc.poll() is not None
        text = _log_text(log_path)
        match = pattern.search(text)
        if match:
            return match
        if exited:
            raise AssertionError(f"{what} exited with {proc.returncode} before it listened:\n"
                                 f"{text}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} to "
                                 f"listen:\n{text}")
        time.sleep(0.02)


def _port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


#: the line ``digitstream run`` logs once it serves, e.g. ``listening on 127.0.0.1:43211,
#: results to 127.0.0.1:7002, metrics UI at http://127.0.0.1:40123/`` (no metrics part with
#: ``--no-metrics``)
_APP_LISTENING = re.compile(r"INFO .*?listening on ([^\s,]+), results to ([^\s,]+)"
                            r"(?:, metrics UI at (\S+))?\s*$", re.MULTILINE)


class AppProcess:
    """``digitstream run`` as a real process, on ports the kernel picks.

    ``--in`` and ``--metrics`` are port 0 unless ``in_port`` / ``metrics_port`` are given
    (to start an application again on the same ports, say); the ports it bound are read
    from its start-up log line (see :meth:`wait_listening`).
    """

    def __init__(self, model: str | Path, out_port: int, *args: str, env: dict | None = None,
                 in_port: int | None = None, metrics_port: int | None = None):
        self._in_port = in_port or None
        self._metrics_port = metrics_port or None
        self._listening = False
        self.out_port = out_port
        cmd = [sys.executable, "-m", "digitstream.cli", "run",
               "--in", f"{HOST}:{in_port or 0}", "--out", f"{HOST}:{out_port}",
               "--metrics", f"{HOST}:{metrics_port or 0}", "--model", str(model), *args]
        fd, name = tempfile.mkstemp(prefix="digitstream-app-", suffix=".log",
                                    dir=os.environ.get("TMPDIR", "/tmp"))
        self.log_path = Path(name)
        self._log = os.fdopen(fd, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    @property
    def in_port(self) -> int:
        """The port ``--in`` bound (waits for the start-up log line if it has not come yet)."""
        if self._in_port is None:
            self.wait_listening()
        return self._in_port

    @property
    def metrics_port(self) -> int | None:
        """The port the metrics UI bound; None with ``--no-metrics``."""
        if self._metrics_port is None and not self._listening:
            self.wait_listening()
        return self._metrics_port

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}"

    def log(self) -> str:
        self._log.flush()
        return _log_text(self.log_path)

    def wait_listening(self, timeout: float = TIMEOUT) -> AppProcess:
        """Wait for the line the application logs once it listens, and take the ports it
        bound from it."""
        if not self._listening:
            match = _wait_for_line(_APP_LISTENING, self.proc, self.log_path, timeout,
                                   "the application")
            self._in_port = _port_of(match[1])
            self._metrics_port = urllib.parse.urlsplit(match[3]).port if match[3] else None
            self._listening = True
        return self

    def wait_ready(self, timeout: float = TIMEOUT) -> AppProcess:
        """Wait until it listens, then until ``/readyz`` says ready (when it serves metrics)."""
        deadline = time.monotonic() + timeout
        self.wait_listening(timeout)
        if self.metrics_port is None:
            return self  # the start-up line comes once it is ready

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"application exited with {self.proc.returncode}:\n"
                                     f"{self.log()}")
            try:
                status, _ = http_get(self.metrics_url + "/readyz", timeout=1)
            except OSError:
                return False
            # and the model whole: a linear one is served from its stored arrays while
            # skops loads its pipeline (which the process's memory then grows by)
            return status == 200 and self.stats()["pipeline_loaded"]
        wait_for(ready, max(0.0, deadline - time.monotonic()), interval=0.05,
                 what="the application to be ready")
        return self

    def stats(self) -> dict:
        return json.loads(http_get(self.metrics_url + "/api/stats")[1])

    def signal(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)

    def wait(self, timeout: float = TIMEOUT) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


#: what ``digitstream listen`` prints on stderr once it listens, e.g. ``listening on
#: 127.0.0.1:43211, storing results in FILE``
_LISTENER_LISTENING = re.compile(r"^listening on ([^\s,]+)", re.MULTILINE)


class ListenProcess:
    """``digitstream listen`` as its own process, storing whole result frames in ``output``;
    its stderr goes to ``output`` + ``.log``.

    On port 0 (the default) the kernel picks the port, and :attr:`port` is the one the
    listener reports it bound.
    """

    def __init__(self, output: Path, port: int = 0, timeout: float = TIMEOUT):
        self.output = Path(output)
        self.log_path = self.output.with_name(self.output.name + ".log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "digitstream.cli", "-q", "listen",
                                          f"{HOST}:{port}", "-o", str(self.output)],
                                         stdout=subprocess.DEVNULL, stderr=log)
        try:
            match = _wait_for_line(_LISTENER_LISTENING, self.proc, self.log_path, timeout,
                                   "the listener")
        except BaseException:
            self.stop(signal.SIGKILL)
            raise
        self.port: int = _port_of(match[1])

    def log(self) -> str:
        return _log_text(self.log_path)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=TIMEOUT)

    def stop(self, sig=signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        """Stop it with ``sig`` (continued first if stopped; killed if it outlives
        ``timeout``); its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.send_signal(signal.SIGCONT)  # a stopped process acts on it once continued
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=TIMEOUT)
        return self.proc.returncode


def frame_count_of(data: bytes) -> int:
    """Number of complete frames in ``data``."""
    pos = count = 0
    while pos + HEADER_SIZE <= len(data):
        length = int.from_bytes(data[pos:pos + HEADER_SIZE], "big")
        if pos + HEADER_SIZE + length > len(data):
            break
        pos += HEADER_SIZE + length
        count += 1
    return count


def py2_pickle(row: np.ndarray, protocol: int) -> bytes:
    """What Python 2's ``cPickle.dumps(row, protocol)`` wrote for a float64 array (NumPy 1.x)."""
    data = np.ascontiguousarray(row, dtype="<f8").tobytes()
    n = len(row)
    if protocol == 0:
        escaped = "".join(f"\\x{b:02x}" for b in data)
        text = ("cnumpy.core.multiarray\n_reconstruct\np0\n(cnumpy\nndarray\np1\n(I0\ntp2\n"
                f"S'b'\np3\ntp4\nRp5\n(I1\n(I{n}\ntp6\ncnumpy\ndtype\np7\n(S'f8'\np8\nI0\n"
                "I1\ntp9\nRp10\n(I3\nS'<'\np11\nNNNI-1\nI-1\nI0\ntp12\nbI00\n"
                f"S'{escaped}'\np13\ntp14\nb.")
        return text.encode("ascii")
    assert protocol == 2
    count = bytes([n]) if n < 256 else b""
    return (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nq\x00cnumpy\nndarray\nq\x01K\x00"
            b"\x85q\x02U\x01bq\x03\x87q\x04Rq\x05(K\x01K" + count
            + b"\x85q\x06cnumpy\ndtype\nq\x07U\x02f8q\x08K\x00K\x01\x87q\tRq\n(K\x03U\x01<q\x0b"
            b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tq\x0cb"
            b"\x89T" + struct.pack("<I", len(data)) + data + b"q\rtq\x0eb.")


def app_counts(stats: dict) -> dict:
    """The counters of an ``/api/stats`` document that reliability tests compare before and after:
    ``messages_in``, ``messages_out``, ``rejected`` (reason -> count), ``connections_open`` and
    ``connection_errors`` (kind -> count)."""
    messages = stats.get("messages")
    connections = stats.get("connections")
    return {
        "messages_in": messages["in"] if isinstance(messages, dict) else stats["messages_in"],
        "messages_out": messages["out"] if isinstance(messages, dict) else stats["messages_out"],
        "rejected": dict(stats.get("rejected", {})),
        "connections_open": (connections["open"] if isinstance(connections, dict)
                             else stats["connections_open"]),
        "connection_errors": dict(connections.get("errors", {})) if isinstance(connections, dict)
        else dict(stats.get("connection_errors", {})),
    }


def memory_of(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS since the process started) in bytes, from /proc."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def raise_open_files(at_least: int) -> int:
    """Raise this process's soft limit on open files to ``at_least`` (within the hard limit);
    processes started afterwards inherit it. Returns the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < at_least:
        soft = at_least if hard == resource.RLIM_INFINITY else min(at_least, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def reference_frames(stream: bytes, max_frame: int) -> tuple[list[bytes], bool]:
    """What a correct receiver makes of ``stream``, one frame at a time: the complete frames
    before the first header above ``max_frame`` (or before an incomplete frame at the end), and
    whether such a header was reached."""
    frames, pos = [], 0
    while pos + HEADER_SIZE <= len(stream):
        length = int.from_bytes(stream[pos:pos + HEADER_SIZE], "big")
        if length > max_frame:
            return frames, True
        if pos + HEADER_SIZE + length > len(stream):
            break
        frames.append(stream[pos + HEADER_SIZE:pos + HEADER_SIZE + length])
        pos += HEADER_SIZE + length
    return frames, False


def plateau(read, settle: float = 1.5, timeout: float = 60) -> int:
    """Wait until ``read()`` stops growing for ``settle`` seconds; its value."""
    last, since = read(), time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= settle:
            return now
    raise AssertionError(f"still growing after {timeout} s: {last}")


def stop_groups(procs, grace: float = 3.0) -> None:
    """Stop processes started each in a session of its own: SIGTERM to every group, then
    SIGKILL to any still there ``grace`` seconds later (a test's servers and workers: how
    they shut down is not what it tests)."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(TIMEOUT)


def one_line_error(*args: str, timeout: float = TIMEOUT * 6) -> str:
    """Run ``digitstream ARGS``, which must fail with one ``Error:`` line and no traceback;
    that line."""
    done = subprocess.run([sys.executable, "-m", "digitstream.cli", *args],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode != 0
    # run logs its start before it fails: the error is the one line that says Error
    lines = [line for line in done.stderr.splitlines() if "Error" in line]
    assert len(lines) == 1 and lines[0].startswith("Error:"), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return lines[0]

