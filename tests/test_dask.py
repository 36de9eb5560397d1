"""The Dask engine against a real cluster: a scheduler and workers started as
processes of their own (``dask scheduler``, ``dask worker``), as separate
machines would run them, all on 127.0.0.1.

Every process a test starts is in a session of its own and is stopped, with
its children, when the test ends, pass or fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from digitstream.engine.base import EngineOptions
from digitstream.pipeline import FlowOptions
from digitstream.wire.framing import Payloads, frame_fixed, frame_many
from helpers import HOST, Collector, HeldPort, app_counts, send_bytes, stop_groups, wait_for
from streams import CHUNK, Gaps, Stream

distributed = pytest.importorskip("distributed")

from digitstream.engine import dask as dask_engine  # noqa: E402
from digitstream.engine.dask import scheduler as dask_scheduler  # noqa: E402
from digitstream.engine.dask.slots import _Slots  # noqa: E402

pytestmark = pytest.mark.timeout(90)

#: one BLAS thread per worker, as the nanny would set it: two workers on two cores
_ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


class Cluster:
    """``dask scheduler`` and ``dask worker`` processes; workers without a nanny, so
    that a killed worker stays dead."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.port = 0  # the kernel's choice, the first time a scheduler starts
        self.address = ""
        self.procs: list[subprocess.Popen] = []
        self.workers: dict[str, subprocess.Popen] = {}
        self._client = None
        self.scheduler_name = "scheduler"
        self.start_scheduler()

    def start_scheduler(self, name: str = "scheduler") -> None:
        """A scheduler on a port the kernel picks, or on this cluster's port again after
        :meth:`kill_scheduler`."""
        self.scheduler_name = name
        scheduler_file = self.tmp_path / f"dask-{name}.json"
        self.scheduler = self._spawn(name, ["scheduler", "--host", HOST, "--port",
                                            str(self.port), "--no-dashboard",
                                            "--scheduler-file", str(scheduler_file)])
        self.address = wait_for(lambda: self._bound_address(scheduler_file), 30, interval=0.05,
                                what="the Dask scheduler's address")
        self.port = int(self.address.rpartition(":")[2])
        wait_for(self._listening, 30, interval=0.05, what="the Dask scheduler")

    def _bound_address(self, scheduler_file) -> str | None:
        """The address the scheduler bound, from the file it writes once listening."""
        self._check_scheduler()
        try:
            return json.loads(scheduler_file.read_text())["address"]
        except (OSError, ValueError, KeyError):  # not written yet, or half written
            return None

    def kill_scheduler(self) -> None:
        if self._client is not None:  # it would reconnect to the next scheduler by itself
            self._client.close(timeout=5)
            self._client = None
        os.killpg(self.scheduler.pid, signal.SIGKILL)
        self.scheduler.wait(10)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        with open(self.tmp_path / f"dask-{name}.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, **_ONE_THREAD})
        self.procs.append(proc)
        return proc

    def _check_scheduler(self) -> None:
        if self.scheduler.poll() is not None:
            raise AssertionError(f"the scheduler exited:\n{self.log(self.scheduler_name)}")

    def _listening(self) -> bool:
        self._check_scheduler()
        try:
            socket.create_connection((HOST, self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def log(self, name: str) -> str:
        return (self.tmp_path / f"dask-{name}.log").read_text(errors="replace")

    def add_worker(self, name: str) -> None:
        self.workers[name] = self._spawn(name, [
            "worker", self.address, "--host", HOST, "--nthreads", "1", "--no-dashboard",
            "--no-nanny", "--name", name, "--local-directory", str(self.tmp_path / name),
            "--death-timeout", "60"])

    @property
    def client(self):
        if self._client is None:
            self._client = distributed.Client(self.address, timeout=30, set_as_default=False)
        return self._client

    def wait_workers(self, names) -> None:
        wanted = set(names)
        wait_for(lambda: wanted <= {w["name"] for w in
                                    self.client.scheduler_info(n_workers=-1)["workers"].values()},
                 30, interval=0.1, what=f"Dask workers {sorted(wanted)}")

    def address_of(self, name: str) -> str:
        for address, info in self.client.scheduler_info(n_workers=-1)["workers"].items():
            if info["name"] == name:
                return address
        raise KeyError(name)

    def kill_worker(self, name: str) -> None:
        os.killpg(self.workers[name].pid, signal.SIGKILL)
        self.workers[name].wait(10)

    def close(self) -> None:
        if self._client is not None:
            self._client.close(timeout=5)
        stop_groups(self.procs[::-1])


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def two_workers(cluster):
    cluster.add_worker("w1")
    cluster.add_worker("w2")
    cluster.wait_workers(["w1", "w2"])
    return cluster


def _pickle_frames(X: np.ndarray) -> bytes:
    """The seed's sender: one pickled float64 array per frame."""
    return frame_many(pickle.dumps(x) for x in X.astype(np.float64))


def _stop_and_drain(app, sink: Collector) -> None:
    """Stop ``app`` and wait until ``sink`` has read everything it was sent: ``app``'s
    results connection closes as it exits, so a result sent twice has arrived by then."""
    app.stop()
    wait_for(lambda: sink._conn is None, 15, interval=0.02,
             what="the application's results connection to close")


def _stats_after(app, messages: int) -> dict:
    """``app``'s stats once its workers are credited with ``messages`` results (the
    metrics count a batch just after handing its results to the sink)."""
    def settled():
        stats = app.stats()
        return stats if sum(w["messages"] for w in stats["workers"]) >= messages else None

    return wait_for(settled, 10, interval=0.05, what=f"{messages} results in the metrics")


def _collect(start_app, payload: bytes, expected: int, *args: str) -> list[str]:
    sink = Collector()
    app = None
    try:
        app = start_app(sink.port, *args)
        send_bytes(app.in_port, payload)
        texts = sink.wait_count(expected, timeout=45)
        _stop_and_drain(app, sink)
        assert sink.count() == expected, "more results than inputs"
        return texts
    finally:
        if app is not None:
            app.stop()
        sink.close()


# ------------------------------------------------------------ real clusters
def test_outputs_equal_the_local_engine_and_the_model_loads_once_per_worker(
        two_workers, start_app, digits, expected_texts):
    # the seed's pickled arrays, and between them frames of other lengths that are
    # rejected in place: both payload layouts (one array, a list of bytes) travel
    bad = [b"not a pickle", b"\x80\x04junk", b""]
    payload = (_pickle_frames(digits.X[:900]) + frame_many(bad)
               + _pickle_frames(digits.X[900:]))
    expected = len(digits.X) + len(bad)

    local = _collect(start_app, payload, expected, "--max-batch", "64")
    sink = Collector()
    try:
        app = start_app(sink.port, "--engine", "dask", "--scheduler", two_workers.address,
                        "--max-batch", "64")
        for i in range(1, 3):  # more batches than workers x in-flight, over two connections
            send_bytes(app.in_port, payload)
            dask = sink.wait_count(i * expected, timeout=45)[-expected:]
            assert dask == local
        loads = two_workers.client.run(dask_engine.model_loads)
        stats = _stats_after(app, 2 * expected)
        _stop_and_drain(app, sink)
        assert sink.count() == 2 * expected
    finally:
        sink.close()

    assert local[:900] == expected_texts[:900] and local[903:] == expected_texts[900:]
    assert all(t.startswith("error: ") for t in local[900:903])
    # loaded once by each worker, though each classified many batches
    assert sorted(loads) == sorted(two_workers.address_of(n) for n in ("w1", "w2"))
    assert [list(v.values()) for v in loads.values()] == [[1], [1]]
    busy = {w["name"]: w["messages"] for w in stats["workers"] if w["messages"]}
    assert set(busy) == {"w1", "w2"}, busy
    assert sum(busy.values()) == 2 * expected


def test_worker_killed_mid_stream_loses_and_duplicates_nothing(two_workers, start_app, digits,
                                                             expected_texts):
    repeat = 112  # 112 x 1,797 = 201,264 messages
    total = repeat * len(digits.X)
    data = frame_fixed(np.tile(digits.X.astype(np.uint8), (repeat, 1)))
    sink = Collector()
    try:
        app = start_app(sink.port, "--engine", "dask", "--scheduler", two_workers.address,
                        "--input-format", "u8", "--max-batch", "1500")
        sock = send_bytes(app.in_port, b"", close=False)
        chunk = 68 * 1500

        def send_paced():
            for pos in range(0, len(data), chunk):
                sock.sendall(data[pos:pos + chunk])
                time.sleep(0.004)
            sock.close()

        sender = threading.Thread(target=send_paced, daemon=True)
        sender.start()
        prefix = "digitstream-"

        def busy_worker():
            # a worker with batches out to it: a task on it, or batches sent to it directly
            # (each worker has several of them at any moment of the stream)
            if sink.count() < total // 5:
                return None
            for address, keys in two_workers.client.processing().items():
                if any(str(k).startswith(prefix) for k in keys):
                    return address
            return two_workers.address_of("w2")

        victim = wait_for(busy_worker, 40, interval=0.002, what="a worker computing a batch")
        name = next(n for n in ("w1", "w2") if two_workers.address_of(n) == victim)
        two_workers.kill_worker(name)
        killed_at = sink.count()
        texts = sink.wait_count(total, timeout=50)
        sender.join(10)
        wait_for(lambda: "Dask worker lost: " + name in app.log(), 10, what="the loss logged")
        _stop_and_drain(app, sink)
        assert sink.count() == total, "duplicate results"
        assert killed_at < total, "the stream ended before the worker was killed"
        assert texts == expected_texts * repeat
    finally:
        sink.close()


def test_a_frozen_worker_holds_the_stream_up_to_the_deadline_then_takes_batches_again(
        two_workers, start_app, digits, expected_texts):
    # SIGSTOP: the worker's connections stay open and go quiet, as those of a host off the
    # network do; its kernel still acknowledges, so Dask waits for worker-ttl (5 minutes)
    sink = Collector()
    stream = None
    try:
        app = start_app(sink.port, "--engine", "dask", "--scheduler", two_workers.address,
                        "--input-format", "u8", "--output-format", "json", "--max-batch",
                        str(CHUNK), "--name", "runner")
        stream = Stream(app.in_port, digits.X.astype(np.uint8))

        def messages_by(name: str) -> int:
            return sum(w["messages"] for w in app.stats()["workers"] if w["name"] == name)

        wait_for(lambda: messages_by("w2") >= 5 * CHUNK, 40, interval=0.05,
                 what="batches classified by w2")
        gaps = Gaps(sink).start()
        os.killpg(two_workers.workers["w2"].pid, signal.SIGSTOP)
        at_stop = sink.count()
        wait_for(lambda: sink.count() >= at_stop + 40 * CHUNK, 40, interval=0.05,
                 what="the stream going on without w2")
        stall = gaps.stop()
        by_w2 = messages_by("w2")
        os.killpg(two_workers.workers["w2"].pid, signal.SIGCONT)
        wait_for(lambda: messages_by("w2") > by_w2, 30, interval=0.05,
                 what="batches classified by w2 once it runs again")
        total = stream.stop()
        stream = None
        frames = sink.wait_count(total, timeout=40)
        log_text = app.log()
        _stop_and_drain(app, sink)
        assert sink.count() == total, "more results than inputs"
    finally:
        if stream is not None:
            stream.stop()
        sink.close()
    results = [json.loads(f) for f in frames]
    assert [r["seq"] for r in results] == list(range(total))
    labels = [int(t.strip("[]")) for t in expected_texts]
    assert [r["label"] for r in results] == [labels[i % len(labels)] for i in range(total)]
    assert stall < 5.0, f"the stream waited {stall:.1f} s for a result"
    assert "Dask worker w2 held a batch past its deadline" in log_text
    assert "Dask worker w2 answered its late batch: it takes batches again" in log_text


def test_scheduler_lost_mid_stream_the_rest_is_answered_here(cluster, start_app, digits,
                                                              expected_texts):
    cluster.add_worker("w1")
    cluster.wait_workers(["w1"])
    repeat = 30
    total = repeat * len(digits.X)
    data = frame_fixed(np.tile(digits.X.astype(np.uint8), (repeat, 1)))
    sink = Collector()
    try:
        app = start_app(sink.port, "--engine", "dask", "--scheduler", cluster.address,
                        "--input-format", "u8", "--max-batch", "500")
        sock = send_bytes(app.in_port, b"", close=False)

        def send_paced():
            for pos in range(0, len(data), 68 * 500):
                sock.sendall(data[pos:pos + 68 * 500])
                time.sleep(0.01)
            sock.close()

        sender = threading.Thread(target=send_paced, daemon=True)
        sender.start()
        sink.wait_count(total // 4, timeout=40)
        os.killpg(cluster.scheduler.pid, signal.SIGKILL)
        texts = sink.wait_count(total, timeout=40)
        sender.join(10)
        lost = f"Dask scheduler at {cluster.address} lost, classifying in-process"
        wait_for(lambda: lost in app.log(), 10, what="the loss logged")
        _stop_and_drain(app, sink)
        assert sink.count() == total
        assert texts == expected_texts * repeat
    finally:
        sink.close()


def test_scheduler_back_on_its_address_takes_the_batches_again(cluster, start_app, digits,
                                                               expected_texts):
    # the scheduler and its worker die mid-stream; a new scheduler on the same port, and
    # a worker, come back while the stream goes on
    cluster.add_worker("w1")
    cluster.wait_workers(["w1"])
    rows = digits.X.astype(np.uint8)
    n = len(rows)
    chunk = 250
    sink = Collector()
    stop = threading.Event()
    sender = None
    try:
        app = start_app(sink.port, "--engine", "dask", "--scheduler", cluster.address,
                        "--input-format", "u8", "--output-format", "json",
                        "--max-batch", str(chunk), "--name", "runner")
        sock = send_bytes(app.in_port, b"", close=False)
        sent = 0

        def stream():
            nonlocal sent
            while not stop.is_set():
                sock.sendall(frame_fixed(rows[np.arange(sent, sent + chunk) % n]))
                sent += chunk
                time.sleep(0.01)
            sock.close()

        sender = threading.Thread(target=stream, daemon=True)
        sender.start()

        def messages_by(name: str) -> int:
            return sum(w["messages"] for w in app.stats()["workers"] if w["name"] == name)

        wait_for(lambda: messages_by("w1") >= 5 * chunk, 30, interval=0.05,
                 what="batches classified by w1")
        assert app.stats()["cluster"]["connected"] is True
        cluster.kill_scheduler()
        cluster.kill_worker("w1")
        wait_for(lambda: app.stats()["cluster"]["connected"] is False, 15, interval=0.05,
                 what="the scheduler's loss seen by the application")
        lost_at = sink.count()
        wait_for(lambda: sink.count() >= lost_at + 20 * chunk, 30, interval=0.05,
                 what="results classified in-process")
        cluster.start_scheduler("scheduler-2")
        wait_for(lambda: "a Dask scheduler is back at" in app.log(), 30, interval=0.05,
                 what="the new scheduler found, without workers")
        back_at = sink.count()
        wait_for(lambda: sink.count() >= back_at + 10 * chunk, 30, interval=0.05,
                 what="more results classified in-process")
        assert app.stats()["cluster"]["connected"] is False
        cluster.add_worker("w2")
        wait_for(lambda: messages_by("w2") >= 5 * chunk, 40, interval=0.05,
                 what="batches classified by w2, on the new scheduler")
        stop.set()
        sender.join(10)
        assert not sender.is_alive()
        total = sent
        frames = sink.wait_count(total, timeout=40)
        stats = _stats_after(app, total)
        log_text = app.log()
        _stop_and_drain(app, sink)
        assert sink.count() == total, "more results than inputs"
        results = [json.loads(f) for f in frames]
    finally:
        stop.set()
        if sender is not None:
            sender.join(10)
        sink.close()

    # one result per input, in input order, across both transitions
    assert [r["seq"] for r in results] == list(range(total))
    labels = [int(t.strip("[]")) for t in expected_texts]
    assert [r["label"] for r in results] == [labels[i % n] for i in range(total)]
    by_worker = {w["name"]: w["messages"] for w in stats["workers"]}
    assert by_worker["w1"] > 0 and by_worker["runner"] > 0 and by_worker["w2"] > 0, by_worker
    assert sum(by_worker.values()) == total
    assert stats["cluster"] == {"scheduler": cluster.address, "local_cluster": False,
                                "connected": True, "workers": 1, "reconnects": 1,
                                "in_process_batches": stats["cluster"]["in_process_batches"]}
    assert stats["cluster"]["in_process_batches"] > 0
    # each transition logged once
    assert log_text.count(f"Dask scheduler at {cluster.address} lost, classifying "
                          f"in-process") == 1, log_text
    assert log_text.count(f"Dask scheduler back at {cluster.address}, 1 worker(s)") == 1, log_text
    assert "Traceback" not in log_text


def _engine(**options):
    """A DaskEngine as ``run`` makes it, without starting it."""
    flow = FlowOptions(input_format="u8", output_format="text", compile_model=True)
    return dask_engine.DaskEngine(flow=None, bundle=SimpleNamespace(content_hash="sha256:ab12"),
                                  options=EngineOptions(flow=flow, **options))


async def _until(condition, timeout: float, what: str) -> None:
    """``wait_for`` inside an event loop: poll ``condition()`` without blocking the loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.01)


class _LostClient:
    status = "connecting"

    def __init__(self):
        self.closed = False

    async def _close(self, fast=False):
        self.closed = True


def test_local_cluster_lost_is_not_tried_again():
    # --workers: the scheduler ran in run's process; the engine does not restart it
    async def main():
        engine = _engine(workers=2)
        link, lost = engine.link, _LostClient()
        engine.cluster = object()
        link.connected(lost, "", local=True)
        link.workers = {"tcp://127.0.0.1:1": "w1"}
        link.lose(lost)
        link.lose(lost)  # seen twice, lost once
        return engine, link._reconnector, engine.state(), link.losses

    engine, reconnector, state, losses = asyncio.run(main())
    assert reconnector is None and losses == 1
    assert state == {"scheduler": "", "local_cluster": True, "connected": False, "workers": 0,
                     "reconnects": 0, "in_process_batches": 0}
    assert engine.capacity == 4  # batches go on, in-process


def test_scheduler_lost_is_tried_again_in_the_background_until_closed(monkeypatch):
    tries: list[float] = []
    accepts = dask_scheduler._accepts

    async def counted(address: str) -> bool:
        tries.append(time.monotonic())
        return await accepts(address)

    monkeypatch.setattr(dask_scheduler, "_accepts", counted)

    async def main():
        with HeldPort() as nobody:  # every connect there is refused
            address = f"tcp://{HOST}:{nobody.port}"
            engine = _engine(scheduler=address)
            lost = _LostClient()
            engine.link.connected(lost, address, local=False)
            engine.link.lose(lost)
            reconnector = engine.link._reconnector
            await _until(lambda: len(tries) >= 2, 10, "two tries of the address")  # 0.5 s, 1.5 s
            running = not reconnector.done()
            await asyncio.wait_for(engine.close(), 5)
        return lost, reconnector, running, engine

    lost, reconnector, running, engine = asyncio.run(main())
    assert running and reconnector.cancelled()
    assert tries[1] - tries[0] >= 0.9  # the wait doubled after the first try
    assert lost.closed and engine.client is None and engine.link._reconnector is None
    assert engine.state()["connected"] is False


def test_all_workers_gone_input_waits_for_a_new_worker(cluster, start_app, digits,
                                                      expected_texts):
    cluster.add_worker("w1")
    cluster.wait_workers(["w1"])
    sink = Collector()
    try:
        app = start_app(sink.port, "--engine", "dask", "--scheduler", cluster.address,
                        "--input-format", "u8")
        wait_for(lambda: "Dask worker joined: w1" in app.log(), 10, what="w1 known to the app")
        cluster.kill_worker("w1")
        wait_for(lambda: "all Dask workers are gone" in app.log(), 15, what="the loss logged")
        send_bytes(app.in_port, frame_fixed(digits.X.astype(np.uint8)))
        # read, and waiting for a slot that no worker gives
        wait_for(lambda: app_counts(app.stats())["messages_in"] > 0, 15, interval=0.05,
                 what="the input read")
        assert app_counts(app.stats())["messages_out"] == 0
        assert sink.count() == 0
        cluster.add_worker("w2")
        texts = sink.wait_count(len(digits.X), timeout=40)
        assert texts == expected_texts
        assert app.proc.poll() is None
    finally:
        sink.close()


def test_local_cluster_of_two_workers(start_app, digits, expected_texts):
    texts = _collect(start_app, frame_fixed(digits.X.astype(np.uint8)), len(digits.X),
                     "--engine", "dask", "--workers", "2", "--input-format", "u8",
                     "--max-batch", "100")
    assert texts == expected_texts


def test_the_engine_on_a_local_cluster_answers_as_the_flow_does(model_dir, digits):
    # the engine alone, as the application drives it: streams named by number and by
    # text, both payload layouts, more batches than it takes at once
    from digitstream.batch import Batch
    from digitstream.model.bundle import load_bundle
    from digitstream.pipeline import Flow

    bundle = load_bundle(model_dir)
    options = FlowOptions(input_format="u8", worker="here")
    flow = Flow.build(bundle.pipeline, options)
    rows = digits.X.astype(np.uint8)
    batches = [Batch(stream, first, Payloads(fixed=rows[first:first + 150]))
               for first in range(0, 600, 150) for stream in (1, "camera-2")]
    batches.append(Batch(3, 0, Payloads(items=[rows[0].tobytes(), b"short", rows[1].tobytes()])))

    async def main():
        engine = dask_engine.DaskEngine(flow, bundle,
                                        EngineOptions(flow=options, workers=1, in_flight=2))
        await engine.start()
        try:
            started = engine.state(), engine.capacity
            futures = [await engine.submit(batch) for batch in batches]
            return started, [await future for future in futures], engine.state()
        finally:
            await engine.close()

    (state, capacity), results, after = asyncio.run(main())
    assert state["local_cluster"] and state["connected"] and state["workers"] == 1
    assert state["scheduler"].startswith("tcp://127.0.0.1:")
    assert capacity == 2
    for batch, result in zip(batches, results):
        local = flow.process(batch)
        assert (result.stream, result.first_seq, result.count) == (batch.stream,
                                                                  batch.first_seq, len(batch))
        assert result.output == local.output
        assert result.worker.startswith("tcp://127.0.0.1:")  # the worker's, not this process's
    assert results[-1].rejected and not results[0].rejected
    assert after["in_process_batches"] == 0


def test_ctrl_c_answers_everything_received_then_stops_the_local_cluster(model_dir, digits,
                                                                        expected_texts,
                                                                        tmp_path):
    # Ctrl-C in a terminal signals the whole process group: run and its workers
    sink = Collector()
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "digitstream.cli", "run", "--model", str(model_dir),
             "--in", f"{HOST}:0", "--out", sink.addr, "--no-metrics", "--input-format", "u8",
             "--engine", "dask", "--workers", "2", "--max-batch", "200"],
            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        in_port = wait_for(lambda: _listening_port(log_path, proc), 60, interval=0.1,
                           what="run to listen")
        send_bytes(in_port, frame_fixed(digits.X.astype(np.uint8)))
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 0
        assert sink.wait_count(len(digits.X), timeout=10) == expected_texts
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        sink.close()


def _listening_port(log_path, proc: subprocess.Popen) -> int | None:
    """The input port ``run`` bound (it was given port 0), once it says it listens."""
    text = log_path.read_text(errors="replace")
    if proc.poll() is not None:
        raise AssertionError(f"run exited with {proc.returncode}: {text}")
    found = re.search(rf"listening on (?:tcp://)?{re.escape(HOST)}:(\d+)", text)
    return int(found.group(1)) if found else None


def test_scheduler_unreachable_is_a_one_line_error(model_dir, tmp_path):
    sink = Collector()
    nobody = HeldPort()  # every connect there is refused
    try:
        port = nobody.port
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "digitstream.cli", "run", "--model", str(model_dir),
             "--in", f"{HOST}:0", "--out", sink.addr, "--metrics", f"{HOST}:0",
             "--engine", "dask", "--scheduler", f"tcp://{HOST}:{port}"],
            capture_output=True, text=True, timeout=60)
    finally:
        nobody.close()
        sink.close()
    assert proc.returncode != 0
    assert time.monotonic() - started < 30
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"Error: cannot reach the Dask scheduler at tcp://{HOST}:{port}")
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- the parts
def test_payloads_travel_as_buffers():
    fixed = Payloads(fixed=np.arange(12, dtype=np.uint8).reshape(3, 4))
    packed = dask_engine.pack(fixed)
    assert isinstance(packed, np.ndarray)
    assert np.array_equal(dask_engine.unpack(packed).fixed, fixed.fixed)

    items = Payloads(items=[b"a", b"", b"bcd", b"\x00" * 5])
    blob, lengths = dask_engine.pack(items)
    assert blob == b"abcd" + b"\x00" * 5 and lengths.tolist() == [1, 0, 3, 5]
    assert dask_engine.unpack((blob, lengths)).items == items.items


def test_slots_follow_the_workers():
    async def scenario():
        slots = _Slots()
        slots.resize(2)
        await slots.acquire()
        await slots.acquire()
        third = asyncio.ensure_future(slots.acquire())
        await asyncio.sleep(0.01)
        assert not third.done()
        slots.resize(0)  # every worker gone: even a released slot is not reused
        slots.release()
        await asyncio.sleep(0.01)
        assert not third.done()
        slots.resize(4)  # a worker joined
        await asyncio.wait_for(third, 1)
        assert slots.used == 2

    asyncio.run(scenario())


def test_worker_labels():
    assert dask_engine.worker_label("gpu-1", "tcp://10.0.0.5:4000") == "gpu-1"
    assert dask_engine.worker_label(0, "tcp://10.0.0.5:4000") == "tcp://10.0.0.5:4000"
    assert dask_engine.worker_label("tcp://10.0.0.5:4000", "tcp://10.0.0.5:4000") == \
        "tcp://10.0.0.5:4000"


def test_tls_settings_are_checked_before_connecting(tmp_path):
    from digitstream.engine.dask.engine import _security
    from digitstream.errors import UserError

    assert dask_engine.scheduler_address("sched:8786") == "tcp://sched:8786"
    assert dask_engine.scheduler_address("sched:8786", tls=True) == "tls://sched:8786"
    assert dask_engine.scheduler_address("tls://sched:8786") == "tls://sched:8786"
    with pytest.raises(UserError, match=f"TLS file {tmp_path}/ca.pem not found"):
        _security(EngineOptions(scheduler="tls://sched:8786", tls_ca_file=str(tmp_path / "ca.pem")))
    with pytest.raises(UserError, match="needs a certificate: --tls-ca-file"):
        _security(EngineOptions(scheduler="tls://sched:8786"))
    assert _security(EngineOptions(scheduler="tcp://sched:8786")).require_encryption is False
