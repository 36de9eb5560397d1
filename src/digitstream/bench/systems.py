"""The systems under test, each started as a process of its own on free ports.

* ``digitstream``: ``python -m digitstream.cli run`` with one input format;
* ``baseline``: :mod:`digitstream.bench.baseline`, the seed's per-message design;
* ``relay``: :mod:`digitstream.bench.relay`, frames forwarded untouched.

Every one reads frames on its ``in_addr`` and writes one frame per input frame
to the benchmark's listener. :class:`MemorySampler` follows their resident
memory while they run.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from digitstream.addresses import Address

if TYPE_CHECKING:
    import psutil

HOST = "127.0.0.1"


class BenchError(RuntimeError):
    """A measurement that could not be made; the message says which and why."""


@dataclass(frozen=True)
class System:
    key: str  # the name in the JSON figures
    label: str  # the name in tables and charts
    kind: str  # digitstream | baseline | relay
    fmt: str  # the payload format the sender sends
    metrics: bool = True  # digitstream only: the metrics UI on or off
    args: tuple[str, ...] = ()  # digitstream only: more options of `digitstream run`
    #: digitstream only: "drift" serves the model's bundle with a reference profile (the
    #: plain bundle has none: drift is not judged), "shadow" scores the same model as a
    #: shadow (run --shadow)
    monitor: str = ""


#: beside the bench's model bundle: the same model with a reference profile
PROFILED_MODEL = "model-profiled"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_listening(proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Wait until ``proc`` writes ``listening on`` to ``log``; RuntimeError if it exits first
    or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while "listening on" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"did not start: see {log}")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM ``proc`` and wait for it (SIGKILL after 30 s)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def command(
    system: System, in_addr: Address, out_addr: Address, model_dir: str | Path
) -> list[str]:
    if system.kind == "digitstream":
        metrics = ["--metrics", f"{HOST}:{free_port()}"] if system.metrics else ["--no-metrics"]
        monitor: list[str] = []
        if system.monitor == "drift":
            model_dir = Path(model_dir).parent / PROFILED_MODEL
        elif system.monitor == "shadow":
            monitor = ["--shadow", str(model_dir)]
        return [
            sys.executable,
            "-m",
            "digitstream.cli",
            "-q",
            "run",
            "--in",
            str(in_addr),
            "--out",
            str(out_addr),
            "--model",
            str(model_dir),
            "--input-format",
            system.fmt,
            *metrics,
            *monitor,
            *system.args,
        ]
    if system.kind == "baseline":
        return [
            sys.executable,
            "-m",
            "digitstream.bench.baseline",
            "--in",
            str(in_addr),
            "--out",
            str(out_addr),
            "--model",
            str(model_dir),
        ]
    if system.kind == "relay":
        return [
            sys.executable,
            "-m",
            "digitstream.bench.relay",
            "--in",
            str(in_addr),
            "--out",
            str(out_addr),
        ]
    raise ValueError(f"unknown system kind {system.kind!r}")


class Running:
    """One system under test as a live process; its log goes to ``log_path``."""

    def __init__(self, system: System, out_addr: Address, model_dir: str | Path, log_dir: Path):
        self.system = system
        self.in_addr = Address(HOST, free_port())
        self.log_path = log_dir / f"{system.key}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open for the process's life
        self.started_at = time.monotonic()
        cmd = command(system, self.in_addr, out_addr, model_dir)
        self.metrics_addr = cmd[cmd.index("--metrics") + 1] if "--metrics" in cmd else None
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def failure(self, what: str) -> BenchError:
        status = "" if self.alive() else f" (exited with status {self.proc.returncode})"
        return BenchError(
            f"{self.system.label}: {what}{status}; log {self.log_path}:\n{self.log_tail()}"
        )

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.05) -> float:
        """Wait until this process listens on its input port (the model is loaded by then);
        the seconds from its start (to within ``interval``).

        The socket is looked up among the process's own: a test connection could
        be answered by another process that holds the port, while this one failed
        to bind it.
        """
        process = psutil.Process(self.pid)
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise self.failure("did not start")
            try:
                if any(
                    c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.in_addr.port
                    for c in process.net_connections("tcp")
                ):
                    listening = time.monotonic() - self.started_at
                    self._wait_workers(deadline)
                    self._wait_shadow(deadline)
                    return listening
            except psutil.NoSuchProcess:
                continue
            if time.monotonic() > deadline:
                raise self.failure(f"not listening after {timeout:.0f} s")
            time.sleep(interval)

    def stats(self) -> dict:
        """Its ``/api/stats`` (empty without a metrics UI, or if it does not answer)."""
        if self.metrics_addr is None:
            return {}
        try:
            with urllib.request.urlopen(f"http://{self.metrics_addr}/api/stats", timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            return {}

    def _wait_shadow(self, deadline: float) -> None:
        """With a shadow model: wait until its process is ready, so that no run counts the
        batches it skips while it starts."""
        if self.system.monitor != "shadow":
            return
        while not (self.stats().get("shadow") or {}).get("ready"):
            if not self.alive():
                raise self.failure("did not start")
            if time.monotonic() > deadline:
                raise self.failure("the shadow model not ready in time")
            time.sleep(0.05)

    def _wait_workers(self, deadline: float) -> None:
        """With ``--workers N`` (the local engine's worker processes): wait until all N are
        ready, as ``/api/stats`` says, so that no run measures batches computed in ``run``
        while they start."""
        args = self.system.args
        if "--workers" not in args or "--engine" in args or self.metrics_addr is None:
            return
        wanted = int(args[args.index("--workers") + 1])
        url = f"http://{self.metrics_addr}/api/stats"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    cluster = json.loads(response.read()).get("cluster") or {}
                if cluster.get("worker_processes", 0) >= wanted:
                    return
            except OSError:
                pass
            if not self.alive():
                raise self.failure("did not start")
            if time.monotonic() > deadline:
                raise self.failure(f"{wanted} worker processes not ready in time")
            time.sleep(0.05)

    def peak_rss(self) -> int | None:
        """The process's resident-memory high-water mark in bytes (VmHWM), if readable."""
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def terminate(self) -> None:
        """Ask the process to stop (SIGTERM) without waiting; :meth:`stop` waits."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


class MemorySampler:
    """Samples the resident memory of processes every ``interval`` seconds, in a thread.

    ``series[key]`` is a list of ``(seconds since start, rss bytes)``.
    """

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.series: dict[str, list[tuple[float, int]]] = {}
        self._procs: dict[str, psutil.Process] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def watch(self, key: str, pid: int) -> None:
        with self._lock:
            self._procs[key] = psutil.Process(pid)
            self.series.setdefault(key, [])

    def unwatch(self, key: str) -> None:
        with self._lock:
            self._procs.pop(key, None)

    def now(self) -> float:
        """The clock of :attr:`series`: seconds since the sampler was made."""
        return time.monotonic() - self._t0

    def peak(self, key: str) -> int | None:
        samples = self.series.get(key)
        return max(rss for _, rss in samples) if samples else None

    def sample(self) -> None:
        with self._lock:
            procs = list(self._procs.items())
        now = self.now()
        for key, proc in procs:
            try:
                rss = proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            self.series[key].append((now, rss))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)


def start_all(
    systems: list[System],
    out_addr: Address,
    model_dir: str | Path,
    log_dir: Path,
    timeout: float = 120.0,
) -> dict[str, Running]:
    """Start every system at once (start-up is mostly imports: they overlap) and wait
    until all are ready; on failure, stop the ones started and raise."""
    running: dict[str, Running] = {}
    try:
        for system in systems:
            running[system.key] = Running(system, out_addr, model_dir, log_dir)
        for key, proc in list(running.items()):
            try:
                proc.wait_ready(timeout)
            except BenchError:
                if proc.alive():
                    raise
                # most often a port another process took between our choosing and binding it
                proc.stop()
                running[key] = Running(proc.system, out_addr, model_dir, log_dir)
                running[key].wait_ready(timeout)
    except BaseException:
        for proc in running.values():
            proc.stop()
        raise
    return running
