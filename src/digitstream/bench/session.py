"""The benchmark's fixtures: the sender and listener processes, the model, and one
run of one system under test, timed.

Shared by the suite (:mod:`~digitstream.bench.runner`), the Dask benchmark
(:mod:`~digitstream.bench.dask_bench`) and the scripts under ``docs/benchmarks``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from digitstream.addresses import Address
from digitstream.bench.systems import (
    HOST,
    PROFILED_MODEL,
    BenchError,
    MemorySampler,
    Running,
    System,
    start_all,
)
from digitstream.bench.worker import JsonLines
from digitstream.tools.measure import as_timeline, latencies_ns, latency_summary

#: the slowest plausible rate of each kind (messages/s), for a run's deadline
_SLOWEST = {"digitstream": 20_000, "baseline": 100, "relay": 50_000}


class WorkerProcess:
    """A :mod:`digitstream.bench.worker` process and its JSON-lines channel."""

    def __init__(self, role: str, directory: Path):
        self.role = role
        self.log_path = directory / f"{role}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - the worker's stderr until close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "digitstream.bench.worker", role, str(directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            bufsize=0,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None  # both are pipes
        self.channel = JsonLines(self.proc.stdout.fileno(), self.proc.stdin.fileno())

    def request(self, obj: dict) -> None:
        try:
            self.channel.write(obj)
        except BrokenPipeError:
            raise self._dead() from None

    def reply(self, timeout: float | None) -> dict | None:
        """The next reply; None if none within ``timeout``."""
        try:
            return self.channel.read(timeout)
        except EOFError:
            raise self._dead() from None

    def _dead(self) -> BenchError:
        self.proc.poll()
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-10:]
        return BenchError(
            f"the benchmark's {self.role} process ended "
            f"(status {self.proc.returncode}):\n" + "\n".join(tail)
        )

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.channel.write({"cmd": "quit"})
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


class Session:
    """The benchmark's fixtures: a work directory, a model, the sender and the
    listener, a memory sampler, and the systems under test started so far.

    :meth:`throughput` and :meth:`latency` measure one run of one system; an
    engine-specific benchmark (``--engine dask``) uses the same calls.
    """

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self.log = log or (lambda text: None)
        self._tmp = tempfile.TemporaryDirectory(prefix="digitstream-bench-")
        self.directory = Path(self._tmp.name)
        self.model_dir = self.directory / "model"
        self.model_info: dict = {}
        self.sender: WorkerProcess | None = None
        self.listener: WorkerProcess | None = None
        self.listen_addr: Address | None = None
        self.sampler = MemorySampler()
        self.running: dict[str, Running] = {}
        self.answered: dict[str, int] = {}  # messages answered per system, over every run

    def __enter__(self) -> Session:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def open(self) -> None:
        self.sender = WorkerProcess("send", self.directory)
        self.listener = WorkerProcess("listen", self.directory)
        self.model_info = prepare_model(self.model_dir)
        hello = self.listener.reply(60)
        if hello is None:
            raise BenchError("the benchmark's listener did not start within 60 s")
        self.listen_addr = Address(HOST, hello["port"])
        self.sampler.start()

    def start(self, systems: list[System]) -> None:
        """Start systems, all at once, and wait until each one listens."""
        assert self.listen_addr is not None, "open() the session first"
        started = start_all(systems, self.listen_addr, self.model_dir, self.directory)
        for key, proc in started.items():
            self.running[key] = proc
            self.sampler.watch(key, proc.pid)

    def attempt(self, system: System, what: str, measure, live: list, errors: list):
        """``measure()``; if it fails, the failure is recorded in ``errors``, the
        system stopped and dropped from ``live``, and None returned."""
        try:
            return measure()
        except BenchError as exc:
            errors.append(f"{system.label}, {what}: {exc}")
            self.log(f"[red]{system.label}: {what} failed[/red]")
            self.stop(system.key)
            live.remove(system)
            return None

    def stop(self, key: str) -> None:
        self.stop_all([key])

    def stop_all(self, keys: list[str]) -> None:
        """Stop these systems; they are all signalled first, so their shutdowns overlap."""
        procs = [self.running.pop(key) for key in keys if key in self.running]
        if procs:
            self.sampler.sample()
        for proc in procs:
            self.sampler.unwatch(proc.system.key)
            proc.terminate()
        for proc in procs:
            proc.stop()

    def close(self) -> None:
        self.stop_all(list(self.running))
        self.sampler.stop()
        for worker in (self.sender, self.listener):
            if worker is not None:
                worker.close()
        self._tmp.cleanup()

    # -------------------------------------------------------------- runs
    def throughput(self, key: str, messages: int) -> dict:
        """Send ``messages`` as fast as the system takes them; the run's figures."""
        sent, received = self._run(key, messages, rate=None, timeline=False)
        seconds = (received["last_ns"] - sent["start_ns"]) / 1e9
        return {
            "messages": messages,
            "seconds": seconds,
            "msg_per_s": messages / seconds,
            "sender_msg_per_s": messages / ((sent["end_ns"] - sent["start_ns"]) / 1e9),
        }

    def latency(self, key: str, rate: float, seconds: float) -> dict:
        """Send for ``seconds`` paced at ``rate`` messages/s; per-message latency figures."""
        lat, rate_sent = self.latencies(key, rate, seconds)
        return {"rate_target": rate, "rate_sent": rate_sent, **latency_summary(lat)}

    def latencies(self, key: str, rate: float, seconds: float) -> tuple[np.ndarray, float]:
        """Send for ``seconds`` paced at ``rate`` messages/s: every message's latency (ns, in
        the order sent) and the rate the sender kept."""
        messages = max(1, int(rate * seconds))
        sent, received = self._run(key, messages, rate=rate, timeline=True)
        lat = latencies_ns(
            as_timeline(np.load(sent["timeline"])),
            as_timeline(np.load(received["timeline"])),
            messages,
        )
        return lat, messages / ((sent["end_ns"] - sent["start_ns"]) / 1e9)

    def _run(self, key: str, messages: int, rate: float | None, timeline: bool):
        listener, sender = self.listener, self.sender
        assert listener is not None and sender is not None, "open() the session first"
        proc = self.running[key]
        slowest = min(_SLOWEST[proc.system.kind], rate or float("inf"))
        deadline = 60 + messages / slowest
        listener.request(
            {"cmd": "expect", "messages": messages, "timeout": deadline, "timeline": timeline}
        )
        if listener.reply(30) is None:
            raise BenchError("the benchmark's listener does not answer")
        sender.request(
            {
                "cmd": "send",
                "to": str(proc.in_addr),
                "format": proc.system.fmt,
                "messages": messages,
                "rate": rate,
                "timeline": timeline,
            }
        )
        sent = received = None
        problem = None
        until = time.monotonic() + deadline
        while received is None:
            received = listener.reply(0.1)
            if sent is None:
                sent = sender.reply(0)
            if sent is not None and "error" in sent:
                problem = proc.failure(f"the sender failed: {sent['error']}")
            elif not proc.alive():
                problem = proc.failure("stopped in the middle of a run")
            elif received is None and time.monotonic() > until:
                problem = proc.failure(f"{messages:,} results not in after {deadline:.0f} s")
            if problem is not None and received is None:
                listener.request({"cmd": "cancel"})
                listener.reply(30)
                if sent is None:
                    self.stop(key)  # unblocks a sender stuck on a full socket
                    sender.reply(60)
                self.stop(key)
                raise problem
        if sent is None:
            sent = sender.reply(120)
            if sent is None:
                raise BenchError("the benchmark's sender does not answer")
        if "error" in sent:
            raise proc.failure(f"the sender failed: {sent['error']}")
        if not received["ok"]:
            raise proc.failure(f"only {received['frames']:,} of {messages:,} results arrived")
        self.answered[key] = self.answered.get(key, 0) + messages
        return sent, received

    def peak_rss(self, key: str) -> int | None:
        proc = self.running.get(key)
        hwm = proc.peak_rss() if proc is not None else None
        sampled = self.sampler.peak(key)
        return max(v for v in (hwm, sampled) if v is not None) if (hwm or sampled) else None


def prepare_model(directory: Path) -> dict:
    """Fit the seed's model (PCA with 40 components, then logistic regression with
    C=3, on the whole digits set) and save it as a bundle in ``directory``."""
    # heavy: scikit-learn, only to fit the model
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from threadpoolctl import threadpool_limits

    from digitstream.datasets import load_dataset
    from digitstream.model.bundle import save_bundle
    from digitstream.model.train import split_dataset
    from digitstream.monitor.profile import profile_of_split

    data = load_dataset("digits")
    pipeline = Pipeline(
        [
            ("PCA", PCA(n_components=40, random_state=0)),
            ("Logistic Regression", LogisticRegression(C=3, max_iter=5000)),
        ]
    )
    # a fit this small gains nothing from BLAS threads, and on a busy machine
    # their spinning makes it fifty times slower
    with threadpool_limits(1):
        pipeline.fit(data.X, data.y)
    accuracy = float(np.mean(pipeline.predict(data.X) == data.y))
    card = {"dataset": "digits", "model": "pca-logistic", "training_accuracy": accuracy}
    save_bundle(pipeline, directory, card)
    # the same model with a reference profile, for the drift-on system (its held-out part
    # was seen in the fit: the calibration is optimistic, the cost the same)
    profile = profile_of_split(pipeline, split_dataset(data), data.value_range, "digits")
    save_bundle(pipeline, directory.parent / PROFILED_MODEL, card, profile=profile)
    return {
        "steps": [name for name, _ in pipeline.steps],
        "n_features": int(data.X.shape[1]),
        "dataset": "digits",
        "fitted_on": f"all {len(data.X)} images",
        "training_accuracy": accuracy,
    }
