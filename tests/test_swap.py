"""Swap without stopping: a new bundle written to ``run``'s ``--model`` directory
replaces the model between two batches, and a bad one is refused.

The new model is the seed's made to answer (digit + 1) % 10, so each answer
says which model gave it. Bundles are written as a user should:
into a staging directory, then renamed into place, ``model.json`` last.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import re
import shutil
import signal
import threading
import time

import numpy as np
import pytest
import skops.io as sio
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.naive_bayes import GaussianNB
from sklearn.pipeline import Pipeline

from digitstream.addresses import Address
from digitstream.app import AppConfig, Application
from digitstream.batch import Batch
from digitstream.engine.local import LocalEngine
from digitstream.metrics.recorder import Metrics
from digitstream.model.bundle import (
    CARD_FILE,
    PIPELINE_FILE,
    content_hash,
    format_card,
    save_bundle,
)
from digitstream.model.swap import ModelWatcher
from digitstream.tools.sender import Framed, send_frames
from digitstream.wire.framing import Payloads, frame_fixed, iter_frames
from helpers import HOST, Collector, http_get, send_bytes, wait_for

pytestmark = pytest.mark.timeout(120)

SWAP_LINE = re.compile(r"model swapped at \S+ \((.*?)\): (\S+) -> (\S+); "
                       r"the new model answers from message: (.*)$", re.M)


@pytest.fixture(scope="module")
def shifted_pipeline(seed_pipeline):
    """The seed's model answering (digit + 1) % 10: what training it on labels shifted by
    one would give, without the wait. Class j scores what class j - 1 scored."""
    pipeline = copy.deepcopy(seed_pipeline)
    classifier = pipeline[-1]
    classifier.coef_ = np.roll(classifier.coef_, 1, axis=0)
    classifier.intercept_ = np.roll(classifier.intercept_, 1)
    return pipeline


@pytest.fixture
def bundle_dir(tmp_path, model_dir):
    """A copy of the seed's bundle to swap models into (the session's own stays as it is)."""
    return shutil.copytree(model_dir, tmp_path / "model")


def put_in_place(staging, directory) -> None:
    """Rename a bundle's files into ``directory``, the pipeline first and the card last."""
    for name in (PIPELINE_FILE, CARD_FILE):
        os.replace(staging / name, directory / name)


def write_bundle(pipeline, directory, staging) -> str:
    save_bundle(pipeline, staging, {"dataset": "digits", "model": "test"})
    digest = json.loads((staging / CARD_FILE).read_text())["content_hash"]
    put_in_place(staging, directory)
    return digest


def labels_of(texts: list[str]) -> np.ndarray:
    return np.array([int(t[1:-1]) for t in texts])


def u8_frames(X) -> bytes:
    return frame_fixed(np.asarray(X).astype(np.uint8))


class Doubler(TransformerMixin, BaseEstimator):
    """A user's own transformer: a type no bundle may bring in."""

    def fit(self, X, y=None):
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X):
        return 2 * X


# ------------------------------------------------------------ under load
@contextlib.contextmanager
def sending(app, frames: bytes, rate: int):
    """Sends ``frames`` to ``app`` at ``rate`` messages/s from a thread while the block
    runs; on leaving, waits for the sender, and fails the test if sending failed."""
    framed = Framed.from_bytes(frames)
    failures = []

    def send():
        try:
            send_frames(Address(HOST, app.in_port), [framed], rate=rate)
        except Exception as exc:
            failures.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        yield
    finally:
        sender.join(timeout=60)
    assert not failures, failures


def test_swap_under_load_every_message_answered_by_one_model(
        start_app, collector, bundle_dir, tmp_path, digits, seed_pipeline, shifted_pipeline):
    n, rate = 200_000, 25_000
    index = np.arange(n) % len(digits.X)
    old = seed_pipeline.predict(digits.X)[index]
    new = shifted_pipeline.predict(digits.X)[index]
    assert np.all(old != new)  # each answer tells which model gave it
    old_hash = json.loads((bundle_dir / CARD_FILE).read_text())["content_hash"]

    app = start_app(collector.port, "--input-format", "u8", model=bundle_dir)
    with sending(app, u8_frames(digits.X[index]), rate):
        collector.wait_count(n // 4, timeout=60)
        new_hash = write_bundle(shifted_pipeline, bundle_dir, tmp_path / "staging")
        swaps = wait_for(lambda: app.stats()["model_swaps"], timeout=30, interval=0.05,
                         what="the swap in /api/stats")
        texts = collector.wait_count(n, timeout=60)
    stats = app.stats()
    _, prometheus = http_get(app.metrics_url + "/metrics")
    log = app.log()
    app.stop()  # flushes: a result beyond n would be here now
    assert collector.count() == n

    # one switch point k: the old model's answers before it, the new one's from it on
    results = labels_of(texts)
    assert len(swaps) == 1
    swap = swaps[0]
    assert (swap["old_hash"], swap["new_hash"]) == (old_hash, new_hash)
    (k,) = swap["at"].values()
    assert n // 4 <= k < n
    assert np.array_equal(results[:k], old[:k])
    assert np.array_equal(results[k:], new[k:])

    line = SWAP_LINE.search(log)
    assert line and line.group(2, 3) == (old_hash, new_hash)
    assert line.group(4) == f"stream {next(iter(swap['at']))} -> {k}"
    assert stats["model"]["content_hash"] == new_hash
    assert stats["model_swaps"] == swaps
    assert b"digitstream_model_swaps_total 1.0" in prometheus
    assert "WARNING" not in log


# -------------------------------------------------------------- refused
def test_bad_bundles_are_refused_once_and_the_old_model_keeps_serving(
        start_app, collector, bundle_dir, tmp_path, digits, seed_pipeline, shifted_pipeline):
    app = start_app(collector.port, "--input-format", "u8", model=bundle_dir)
    old_hash = json.loads((bundle_dir / CARD_FILE).read_text())["content_hash"]
    expected = list(seed_pipeline.predict(digits.X))
    served = 0

    def refused(reason: str, count: int = 1) -> None:
        wait_for(lambda: app.log().count(reason) >= count, timeout=30, interval=0.05,
                 what=f"a warning saying {reason!r}")

    def check_old_model_serves() -> None:
        nonlocal served
        send_bytes(app.in_port, u8_frames(digits.X))
        served += len(digits.X)
        assert list(labels_of(collector.wait_count(served)[-len(digits.X):])) == expected

    # a pipeline file changed after its card was written
    staging = tmp_path / "tampered"
    save_bundle(shifted_pipeline, staging, {})
    data = bytearray((staging / PIPELINE_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (staging / PIPELINE_FILE).write_bytes(bytes(data))
    put_in_place(staging, bundle_dir)
    refused("does not match")
    check_old_model_serves()

    # a type no one vouched for, in a bundle whose card names its hash
    staging = tmp_path / "untrusted"
    staging.mkdir()
    pipeline = Pipeline([("Double", Doubler().fit(digits.X)), *seed_pipeline.steps])
    data = sio.dumps(pipeline)
    card = json.loads((bundle_dir / CARD_FILE).read_text())
    (staging / PIPELINE_FILE).write_bytes(data)
    (staging / CARD_FILE).write_text(format_card({**card, "content_hash": content_hash(data)}))
    put_in_place(staging, bundle_dir)
    refused("Doubler")
    check_old_model_serves()

    # a sound bundle of a model that takes other images
    narrow = Pipeline([("Naive Bayes", GaussianNB())])
    write_bundle(narrow.fit(digits.X[:, :32], digits.y), bundle_dir, tmp_path / "narrow")
    refused("it takes 32 features, the model serving takes 64")
    check_old_model_serves()

    log = app.log()
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert len(warnings) == 3, warnings  # each bundle once, though polled many times since
    assert all("not swapped in" in w and "still serving" in w for w in warnings)
    assert "untrusted type" in warnings[1]

    # SIGHUP loads the path again, even files already refused
    app.signal(signal.SIGHUP)
    refused("it takes 32 features", count=2)
    check_old_model_serves()
    stats = wait_for(lambda: (lambda st: st if st["model_swaps_refused"] >= 4 else None)(
        app.stats()), timeout=10, interval=0.05, what="4 refusals in /api/stats")
    assert stats["model_swaps_refused"] == 4  # one per bundle and one for SIGHUP, not per poll
    assert "it takes 32 features" in stats["last_swap_refused"]["reason"]
    assert stats["model_swaps"] == [] and stats["model_swaps_total"] == 0
    assert stats["model"]["content_hash"] == old_hash
    _, prometheus = http_get(app.metrics_url + "/metrics")
    assert b"digitstream_model_swaps_refused_total 4.0" in prometheus
    assert b"digitstream_model_swaps_total 0.0" in prometheus
    assert app.proc.poll() is None


def test_a_refused_swap_under_load_is_counted_and_loses_nothing(
        start_app, collector, bundle_dir, tmp_path, digits, seed_pipeline):
    n, rate = 100_000, 20_000
    index = np.arange(n) % len(digits.X)
    old = seed_pipeline.predict(digits.X)[index]
    old_hash = json.loads((bundle_dir / CARD_FILE).read_text())["content_hash"]
    app = start_app(collector.port, "--input-format", "u8", model=bundle_dir)
    before = app.stats()
    assert (before["model_swaps_refused"], before["last_swap_refused"]) == (0, None)
    _, prometheus = http_get(app.metrics_url + "/metrics")
    assert b"digitstream_model_swaps_refused_total 0.0" in prometheus

    with sending(app, u8_frames(digits.X[index]), rate):
        collector.wait_count(n // 4, timeout=60)
        # a sound bundle, its card vouching for it, of a model that takes other images
        narrow = Pipeline([("Naive Bayes", GaussianNB())]).fit(digits.X[:, :32], digits.y)
        written = time.time()
        write_bundle(narrow, bundle_dir, tmp_path / "narrow")
        stats = wait_for(lambda: (lambda st: st if st["model_swaps_refused"] else None)(
            app.stats()), timeout=30, interval=0.05, what="the refusal in /api/stats")
        sent_when_refused = collector.count()
        texts = collector.wait_count(n, timeout=60)
    assert sent_when_refused < n, "the refusal came after the stream: nothing was tested"
    after = wait_for(lambda: (lambda st: st if st["messages"]["out"] >= n else None)(
        app.stats()), timeout=10, interval=0.05, what="every result in /api/stats")
    _, prometheus = http_get(app.metrics_url + "/metrics")
    app.stop()  # flushes: a result beyond n would be here now

    assert collector.count() == n
    assert np.array_equal(labels_of(texts), old)  # every message, by the old model
    refusal = stats["last_swap_refused"]
    assert refusal["reason"] == "it takes 32 features, the model serving takes 64"
    assert written - 1 <= refusal["time"] <= time.time()
    assert after["model_swaps_refused"] == 1 and after["last_swap_refused"] == refusal
    assert after["model_swaps"] == [] and after["model_swaps_total"] == 0
    assert after["model"]["content_hash"] == old_hash
    assert after["messages"]["out"] == n and after["messages"]["rejected"] == 0
    assert b"digitstream_model_swaps_refused_total 1.0" in prometheus
    assert b"digitstream_model_swaps_total 0.0" in prometheus


def test_sighup_with_the_same_bundle_swaps_nothing(start_app, collector, bundle_dir):
    app = start_app(collector.port, model=bundle_dir)
    app.signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP: the model at" in app.log(), timeout=30, interval=0.05,
             what="the SIGHUP reload in the log")
    assert "is the one serving" in app.log()
    assert app.stats()["model_swaps"] == []


# ------------------------------------------------ the watcher, in process
def _watch(app, engine, metrics=None, positions=None, **kwargs) -> ModelWatcher:
    """A watcher of ``app``'s model path that switches ``engine``; ``positions`` are the open
    streams' next sequence numbers."""
    app.engine = app.serving.engine = engine
    app.metrics = metrics
    app.positions.update(positions or {})
    return ModelWatcher(app.config.model_path, app.serving, metrics, **kwargs)


def _served_by(app, X) -> list[str]:
    async def classify():
        future = await app.engine.submit(Batch(1, 0, Payloads(fixed=X.astype(np.uint8)), 0))
        return (await future).output

    return [payload.decode() for payload in iter_frames(asyncio.run(classify()))]


def test_a_bundle_half_written_waits_and_sighup_alone_swaps(
        bundle_dir, tmp_path, digits, seed_pipeline, shifted_pipeline):
    app = Application(AppConfig(model_path=str(bundle_dir), input_format="u8", metrics_addr=None))
    app.load()
    metrics = Metrics("app", app.flow.stage_names, app.flow.runner.classes)
    old_hash = app.bundle.content_hash
    now = [100.0]
    watcher = _watch(app, LocalEngine(app.flow), metrics, {3: 1234}, poll=0, settle=2.0,
                     clock=lambda: now[0])

    # the new pipeline file is in place, its card not yet: a writer between two renames
    staging = tmp_path / "staging"
    save_bundle(shifted_pipeline, staging, {})
    os.replace(staging / PIPELINE_FILE, bundle_dir / PIPELINE_FILE)
    asyncio.run(watcher.check())
    now[0] += 1.0
    asyncio.run(watcher.check())
    assert app.bundle.content_hash == old_hash
    os.replace(staging / CARD_FILE, bundle_dir / CARD_FILE)
    asyncio.run(watcher.check())
    new_hash = app.bundle.content_hash
    assert new_hash != old_hash
    assert _served_by(app, digits.X[:50]) == [f"[{y}]" for y in shifted_pipeline.predict(
        digits.X[:50])]
    (swap,) = app.metrics.snapshot().model_swaps
    assert swap["at"] == {"3": 1234} and swap["old_hash"] == old_hash

    # with polling off, only a reload request (SIGHUP) swaps
    back_hash = write_bundle(seed_pipeline, bundle_dir, tmp_path / "back")

    async def reload_on_request():
        watcher.start()
        try:
            await asyncio.sleep(0)
            assert app.bundle.content_hash == new_hash
            watcher.request_reload()
            deadline = asyncio.get_running_loop().time() + 30
            while app.bundle.content_hash == new_hash:
                assert asyncio.get_running_loop().time() < deadline, "no swap on request"
                await asyncio.sleep(0.01)
        finally:
            await watcher.close()

    asyncio.run(reload_on_request())
    assert app.bundle.content_hash == back_hash
    assert _served_by(app, digits.X[:50]) == [f"[{y}]" for y in seed_pipeline.predict(
        digits.X[:50])]
    assert app.metrics.snapshot().model_swaps_total == 2


def test_a_tampered_bundle_is_refused_once_left_alone_and_not_tried_again(
        bundle_dir, tmp_path, shifted_pipeline, caplog):
    app = Application(AppConfig(model_path=str(bundle_dir), input_format="u8", metrics_addr=None))
    app.load()
    old_hash = app.bundle.content_hash
    now = [0.0]
    metrics = Metrics("app", app.flow.stage_names, app.flow.runner.classes)
    watcher = _watch(app, LocalEngine(app.flow), metrics, poll=0, settle=2.0,
                     clock=lambda: now[0])
    staging = tmp_path / "tampered"
    save_bundle(shifted_pipeline, staging, {})
    data = bytearray((staging / PIPELINE_FILE).read_bytes())
    data[-100] ^= 0xFF
    (staging / PIPELINE_FILE).write_bytes(bytes(data))
    put_in_place(staging, bundle_dir)

    caplog.set_level("WARNING", logger="digitstream.swap")
    for t in (0.0, 1.0, 1.9):  # a writer may still be about to put the right card in place
        now[0] = t
        asyncio.run(watcher.check())
    assert caplog.records == []
    assert app.metrics.snapshot().model_swaps_refused == 0
    for t in (2.0, 2.5, 10.0, 60.0):
        now[0] = t
        asyncio.run(watcher.check())
    (record,) = caplog.records
    assert "does not match" in record.getMessage() and "\n" not in record.getMessage()
    assert app.bundle.content_hash == old_hash
    snapshot = app.metrics.snapshot()
    assert snapshot.model_swaps_refused == 1 and snapshot.model_swaps_total == 0
    assert snapshot.last_swap_refused["reason"] in record.getMessage()


class _EngineThatFailsOnce(LocalEngine):
    """A local engine whose first switch fails as an engine fault would (say, a
    cluster lost while the bundle is shipped): not a refusal of the bundle."""

    failed = False

    async def set_flow(self, flow, bundle=None):
        if not self.failed:
            self.failed = True
            raise RuntimeError("workers went away while the bundle was shipped\nsecond line")
        return await super().set_flow(flow, bundle)


def test_an_unexpected_error_in_a_swap_is_counted_and_the_old_model_serves_on(
        bundle_dir, tmp_path, digits, seed_pipeline, shifted_pipeline, caplog):
    app = Application(AppConfig(model_path=str(bundle_dir), input_format="u8", metrics_addr=None))
    app.load()
    metrics = Metrics("app", app.flow.stage_names, app.flow.runner.classes)
    old_hash = app.bundle.content_hash
    watcher = _watch(app, _EngineThatFailsOnce(app.flow), metrics, poll=0, settle=2.0)
    new_hash = write_bundle(shifted_pipeline, bundle_dir, tmp_path / "new")

    caplog.set_level("WARNING", logger="digitstream.swap")
    asyncio.run(watcher.check())
    (record,) = caplog.records
    assert record.levelname == "ERROR" and record.exc_info is not None
    assert "unexpected RuntimeError: workers went away" in record.getMessage()
    assert app.bundle.content_hash == old_hash
    assert _served_by(app, digits.X[:50]) == [f"[{y}]" for y in seed_pipeline.predict(
        digits.X[:50])]
    snapshot = app.metrics.snapshot()
    assert snapshot.model_swaps_refused == 1 and snapshot.model_swaps_total == 0
    assert snapshot.last_swap_refused["reason"] == (
        "unexpected RuntimeError: workers went away while the bundle was shipped")

    # the same files are not tried again by polling; SIGHUP tries them, and now they swap
    asyncio.run(watcher.check())
    assert app.bundle.content_hash == old_hash and len(caplog.records) == 1
    asyncio.run(watcher.check(forced=True))
    assert app.bundle.content_hash == new_hash
    assert _served_by(app, digits.X[:50]) == [f"[{y}]" for y in shifted_pipeline.predict(
        digits.X[:50])]
    snapshot = app.metrics.snapshot()
    assert snapshot.model_swaps_total == 1 and snapshot.model_swaps_refused == 1


def test_a_single_skops_file_is_watched_and_taken_once_left_alone(
        tmp_path, digits, seed_pipeline, shifted_pipeline):
    path = tmp_path / "model.skops"
    sio.dump(seed_pipeline, path)
    app = Application(AppConfig(model_path=str(path), input_format="u8", metrics_addr=None))
    app.load()
    old_hash = app.bundle.content_hash
    now = [0.0]
    watcher = _watch(app, LocalEngine(app.flow), poll=0, settle=2.0, clock=lambda: now[0])
    asyncio.run(watcher.check())  # unchanged: nothing to do

    temporary = tmp_path / ".model.skops.tmp"
    sio.dump(shifted_pipeline, temporary)
    os.replace(temporary, path)
    asyncio.run(watcher.check())
    assert app.bundle.content_hash == old_hash  # no card vouches for it: it may be half written
    now[0] += 2.5
    asyncio.run(watcher.check())
    assert _served_by(app, digits.X[:50]) == [f"[{y}]" for y in shifted_pipeline.predict(
        digits.X[:50])]


# ------------------------------------------------------------------ Dask
def test_swap_on_a_dask_cluster_ships_the_new_model_to_the_workers(
        start_app, bundle_dir, tmp_path, digits, seed_pipeline, shifted_pipeline):
    pytest.importorskip("distributed")
    sink = Collector()
    try:
        app = start_app(sink.port, "--input-format", "u8", "--engine", "dask", "--workers", "1",
                        model=bundle_dir, ready=False)
        app.wait_ready(timeout=90)
        stats, log = _swap_mid_stream(app, sink, digits, bundle_dir, tmp_path, seed_pipeline,
                                      shifted_pipeline)
    finally:
        sink.close()
    # every batch went to the worker: none was computed in the run process instead
    busy = [w["name"] for w in stats["workers"] if w["messages"]]
    assert busy and "worker-1" not in busy, busy
    assert "computed in this process" not in log


def _swap_mid_stream(app, sink, digits, bundle_dir, tmp_path, seed_pipeline, shifted_pipeline,
                     n: int = 30_000) -> tuple[dict, str]:
    """``n`` u8 frames at 6,000 msg/s, the bundle swapped for ``shifted_pipeline`` after a
    fifth of them: checks that the old model answered every frame before one point and the
    new one every frame from it; ``/api/stats`` and the log afterwards."""
    index = np.arange(n) % len(digits.X)
    old = seed_pipeline.predict(digits.X)[index]
    new = shifted_pipeline.predict(digits.X)[index]
    framed = Framed.from_bytes(u8_frames(digits.X[index]))
    sender = threading.Thread(
        target=send_frames, args=(Address(HOST, app.in_port), [framed]),
        kwargs={"rate": 6_000}, daemon=True)
    sender.start()
    sink.wait_count(n // 5, timeout=60)
    new_hash = write_bundle(shifted_pipeline, bundle_dir, tmp_path / "staging")
    (swap,) = wait_for(lambda: app.stats()["model_swaps"], timeout=30, interval=0.05,
                       what="the swap in /api/stats")
    texts = sink.wait_count(n, timeout=60)
    sender.join(timeout=30)
    stats = app.stats()
    log = app.log()
    app.stop()
    assert sink.count() == n

    assert swap["new_hash"] == new_hash
    (k,) = swap["at"].values()
    assert n // 5 <= k < n
    results = labels_of(texts)
    assert np.array_equal(results[:k], old[:k]) and np.array_equal(results[k:], new[k:])
    return stats, log


# ------------------------------------------------------------------ worker processes
def test_swap_with_worker_processes_switches_between_two_batches(
        start_app, bundle_dir, tmp_path, digits, seed_pipeline, shifted_pipeline):
    sink = Collector()
    try:
        app = start_app(sink.port, "--input-format", "u8", "--workers", "2", model=bundle_dir)
        wait_for(lambda: app.stats()["cluster"]["worker_processes"] == 2, timeout=60,
                 what="two worker processes")
        stats, _ = _swap_mid_stream(app, sink, digits, bundle_dir, tmp_path, seed_pipeline,
                                    shifted_pipeline)
    finally:
        sink.close()
    # every batch, before the swap and after, went to the worker processes
    assert stats["cluster"]["in_process_batches"] == 0, stats["cluster"]
