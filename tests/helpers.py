"""Real parts for tests: free ports, a result collector, the application as a process.

Everything talks to 127.0.0.1 only, on ports the OS hands out; every socket has
a timeout, every wait is on a condition with a deadline, and every process
started here is stopped by its fixture.
"""

from __future__ import annotations

import json
import os
import struct
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from digitstream.wire.framing import HEADER_SIZE, FrameSplitter

HOST = "127.0.0.1"
TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float = TIMEOUT, interval: float = 0.01, what: str = "condition"):
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
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            conn.settimeout(0.2)
            self._conn = conn
            splitter = FrameSplitter(max_frame=1 << 30)
            while not self._stop.is_set():
                try:
                    data = conn.recv(1 << 20)
                except socket.timeout:
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
        wait_for(lambda: self.count() >= n, timeout, what=f"{n} result frames (have {self.count()})")
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


class AppProcess:
    """``digitstream run`` as a real process on free ports."""

    def __init__(self, model: str | Path, out_port: int, *args: str, env: dict | None = None,
                 in_port: int | None = None, metrics_port: int | None = None):
        self.in_port = in_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.out_port = out_port
        cmd = [sys.executable, "-m", "digitstream.cli", "run",
               "--in", f"{HOST}:{self.in_port}", "--out", f"{HOST}:{out_port}",
               "--metrics", f"{HOST}:{self.metrics_port}", "--model", str(model), *args]
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"digitstream-app-{self.in_port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}"

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = TIMEOUT) -> "AppProcess":
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"application exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _ = http_get(self.metrics_url + "/readyz", timeout=1)
            except OSError:
                return False
            return status == 200
        wait_for(ready, timeout, interval=0.05, what="the application to be ready")
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
        text = ("cnumpy.core.multiarray\n_reconstruct\np0\n(cnumpy\nndarray\np1\n(I0\ntp2\nS'b'\np3\n"
                f"tp4\nRp5\n(I1\n(I{n}\ntp6\ncnumpy\ndtype\np7\n(S'f8'\np8\nI0\nI1\ntp9\nRp10\n"
                "(I3\nS'<'\np11\nNNNI-1\nI-1\nI0\ntp12\nbI00\n"
                f"S'{escaped}'\np13\ntp14\nb.")
        return text.encode("ascii")
    assert protocol == 2
    count = bytes([n]) if n < 256 else b""
    return (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nq\x00cnumpy\nndarray\nq\x01K\x00\x85q\x02"
            b"U\x01bq\x03\x87q\x04Rq\x05(K\x01K" + count + b"\x85q\x06cnumpy\ndtype\nq\x07U\x02f8q\x08"
            b"K\x00K\x01\x87q\tRq\n(K\x03U\x01<q\x0bNNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tq\x0cb"
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
