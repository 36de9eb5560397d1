"""A shadow model (``run --shadow``) scored off the served path, and ``digitstream promote``."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline

from digitstream.addresses import Address
from digitstream.model.bundle import CARD_FILE, load_bundle, save_bundle
from digitstream.tools.sender import Framed, send_frames
from digitstream.wire.framing import frame_many
from helpers import HOST, TIMEOUT, http_get, send_bytes, wait_for

pytestmark = pytest.mark.timeout(300)


ENGINES = {"local": [], "workers": ["--workers", "2"], "dask": ["--engine", "dask", "--workers", "1"]}


@pytest.fixture(scope="module")
def other_pipeline(digits):
    """Another model of the digits: fewer components, more regularised; it disagrees with the
    seed's now and then."""
    pipeline = Pipeline([("PCA", PCA(n_components=8, random_state=0)),
                         ("Logistic Regression", LogisticRegression(C=0.001, max_iter=2000))])
    return pipeline.fit(digits.X, digits.y)


@pytest.fixture
def shadow_dir(tmp_path, other_pipeline):
    directory = tmp_path / "shadow"
    save_bundle(other_pipeline, directory, {"dataset": "digits", "model": "other"})
    return directory


@pytest.fixture
def served_dir(tmp_path, model_dir):
    return shutil.copytree(model_dir, tmp_path / "served")


def labelled_frames(X, y, first_id: int = 0) -> bytes:
    return frame_many(
        json.dumps({"pixels": X[i].tolist(), "label": int(y[i]), "id": f"m{first_id + i}"}).encode()
        for i in range(len(X)))


def outside(served_pipeline, shadow_pipeline, X, y) -> dict:
    """What an outside script makes of the same inputs."""
    served, shadow = served_pipeline.predict(X), shadow_pipeline.predict(X)
    k = 10
    matrix = np.bincount(served * k + shadow, minlength=k * k).reshape(k, k)
    return {"scored": len(X), "agreement": float(np.mean(served == shadow)),
            "matrix": matrix.tolist(), "labelled": len(X),
            "served_accuracy": float(np.mean(served == y)),
            "shadow_accuracy": float(np.mean(shadow == y))}


def assert_same(shadow: dict, expected: dict) -> None:
    got = compared(shadow)
    assert got.pop("matrix") == expected["matrix"]
    assert got == pytest.approx({k: v for k, v in expected.items() if k != "matrix"})


def compared(shadow: dict) -> dict:
    return {"scored": shadow["scored"], "agreement": shadow["agreement"],
            "matrix": shadow["disagreement"]["matrix"], "labelled": shadow["labelled"],
            "served_accuracy": shadow["served_accuracy"],
            "shadow_accuracy": shadow["shadow_accuracy"]}


def send_and_wait_scored(app, collector, frames: bytes, n: int, expected_out: int,
                         expected_batches: int | None = None) -> dict:
    send_bytes(app.in_port, frames)
    collector.wait_count(expected_out)
    return wait_for(lambda: (s := app.stats()["shadow"])["scored"]
                    + s["skipped_messages"] >= n and s["in_flight"] == 0 and s,
                    what=f"the shadow to score {n} messages")


@pytest.mark.parametrize("engine", ["local", "workers", "dask"])
def test_the_shadow_agrees_and_scores_as_an_outside_script_computes(
        start_app, collector, served_dir, shadow_dir, digits, seed_pipeline, other_pipeline,
        engine):
    args = ENGINES[engine]
    app = start_app(collector.port, "--input-format", "json", "--shadow", str(shadow_dir),
                    *args, model=served_dir)
    wait_for(lambda: app.stats()["shadow"]["ready"], what="the shadow ready")
    X, y = np.concatenate([digits.X] * 3), np.concatenate([digits.y] * 3)
    with sending(app, labelled_frames(X, y), rate=5000):  # paced: the shadow keeps up
        collector.wait_count(len(X))
    shadow = wait_for(lambda: (s := app.stats()["shadow"])["scored"]
                      + s["skipped_messages"] >= len(X) and s["in_flight"] == 0 and s)
    assert shadow["skipped_batches"] == 0
    expected = outside(seed_pipeline, other_pipeline, X, y)
    assert_same(shadow, expected)
    assert 0.5 < shadow["agreement"] < 1.0  # the two models do differ
    assert shadow["model"]["content_hash"] == load_bundle(shadow_dir).content_hash
    assert shadow["seconds_per_batch"]["shadow"] > 0
    # served results are the served model's, untouched by the shadow
    assert collector.texts() == [str(np.array([p])) for p in seed_pipeline.predict(X)]
    metrics = http_get(app.metrics_url + "/metrics")[1].decode()
    assert re.search(r"^digitstream_shadow_agreement 0\.\d+", metrics, re.M)
    assert 'digitstream_shadow_accuracy{model="shadow"}' in metrics


def test_late_labels_count_for_both_models(start_app, collector, served_dir, shadow_dir, digits,
                                           seed_pipeline, other_pipeline):
    app = start_app(collector.port, "--input-format", "json", "--shadow", str(shadow_dir),
                    "--labels", f"{HOST}:0", model=served_dir)
    port = int(wait_for(lambda: re.search(r"late labels from 127\.0\.0\.1:(\d+)", app.log()))[1])
    wait_for(lambda: app.stats()["shadow"]["ready"])
    X, y = digits.X, digits.y
    frames = frame_many(json.dumps({"pixels": X[i].tolist(), "id": f"m{i}"}).encode()
                        for i in range(len(X)))
    shadow = send_and_wait_scored(app, collector, frames, len(X), len(X))
    assert shadow["labelled"] == 0
    send_bytes(port, frame_many(json.dumps({"id": f"m{i}", "label": int(y[i])}).encode()
                                for i in reversed(range(len(X)))))
    shadow = wait_for(lambda: (s := app.stats()["shadow"])["labelled"] == len(X) and s)
    expected = outside(seed_pipeline, other_pipeline, X, y)
    assert shadow["served_accuracy"] == pytest.approx(expected["served_accuracy"])
    assert shadow["shadow_accuracy"] == pytest.approx(expected["shadow_accuracy"])


@contextlib.contextmanager
def sending(app, frames: bytes, rate: int):
    """``frames`` to ``app`` at ``rate`` messages/s from a thread while the block runs."""
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
        sender.join(timeout=120)
    assert not failures, failures


SWAP = re.compile(r"INFO\s+digitstream\.swap: (model|shadow model) swapped at \S+ \(.*?\): "
                  r"(\S+) -> (\S+); the new model answers from message: (.*)$", re.M)


@pytest.mark.parametrize("engine", ["local", "workers", "dask"])
def test_promote_mid_stream_answers_everything_once_and_exchanges_the_models(
        start_app, collector, served_dir, shadow_dir, digits, seed_pipeline, other_pipeline,
        engine):
    served_hash = load_bundle(served_dir).content_hash
    shadow_hash = load_bundle(shadow_dir).content_hash
    args = ENGINES[engine]
    app = start_app(collector.port, "--input-format", "u8", "--shadow", str(shadow_dir),
                    *args, model=served_dir)
    wait_for(lambda: app.stats()["shadow"]["ready"])
    n, rate = 200_000, 25_000
    index = np.arange(n) % len(digits.X)
    X = digits.X[index]
    frames = frame_many(row.tobytes() for row in X.astype(np.uint8))
    with sending(app, frames, rate):
        collector.wait_count(n // 3, timeout=60)
        done = subprocess.run(
            [sys.executable, "-m", "digitstream.cli", "promote", "--model", str(served_dir),
             "--shadow", str(shadow_dir)], capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr
        assert "promoted:" in done.stdout
        swaps = wait_for(lambda: len(SWAP.findall(app.log())) == 2 and SWAP.findall(app.log()),
                         what="both swaps in the log")
        texts = collector.wait_count(n, timeout=90)
    assert len(texts) == n  # every message answered, once
    served_swap = next(s for s in swaps if s[0] == "model")
    assert served_swap[1:3] == (served_hash, shadow_hash)
    shadow_swap = next(s for s in swaps if s[0] == "shadow model")
    assert shadow_swap[1:3] == (shadow_hash, served_hash)
    at = int(re.fullmatch(r"stream \S+ -> (\d+)", served_swap[3])[1])
    assert 0 < at < n
    predicted = np.array([int(t[1:-1]) for t in texts])
    # before the switch point the old model answered every message, from it on the new one
    assert np.array_equal(predicted[:at], seed_pipeline.predict(X[:at]))
    assert np.array_equal(predicted[at:], other_pipeline.predict(X[at:]))
    stats = app.stats()
    assert stats["model"]["content_hash"] == shadow_hash
    assert stats["shadow"]["content_hash"] == served_hash and stats["shadow"]["swaps"] == 1
    # the comparison started again with the exchange: the roles are the other way round now
    before = wait_for(lambda: (s := app.stats()["shadow"])["in_flight"] == 0 and s)
    with sending(app, frame_many(r.tobytes() for r in digits.X.astype(np.uint8)), rate=5000):
        collector.wait_count(n + len(digits.X))
    after = wait_for(lambda: (s := app.stats()["shadow"])["in_flight"] == 0
                     and s["scored"] + s["skipped_messages"]
                     == before["scored"] + before["skipped_messages"] + len(digits.X) and s)
    assert after["skipped_batches"] == before["skipped_batches"]
    new = np.array(after["disagreement"]["matrix"]) - np.array(before["disagreement"]["matrix"])
    assert new.tolist() == outside(other_pipeline, seed_pipeline, digits.X, digits.y)["matrix"]


def test_a_slow_shadow_skips_whole_batches_and_the_served_stream_does_not_wait(
        start_app, collector, served_dir, tmp_path, digits, seed_pipeline):
    slow = KNeighborsClassifier(n_neighbors=1, algorithm="brute")
    slow.fit(np.concatenate([digits.X] * 8), np.concatenate([digits.y] * 8))
    slow_dir = tmp_path / "slow"
    save_bundle(slow, slow_dir, {"model": "slow"})
    app = start_app(collector.port, "--input-format", "u8", "--shadow", str(slow_dir),
                    "--max-batch", "256", model=served_dir)
    wait_for(lambda: app.stats()["shadow"]["ready"])
    n = 100_000
    frames = frame_many(r.tobytes() for r in digits.X[np.arange(n) % len(digits.X)].astype(np.uint8))
    send_bytes(app.in_port, frames)
    texts = collector.wait_count(n, timeout=120)
    # every served result is in while the shadow still works through what it took
    assert app.stats()["shadow"]["in_flight"] > 0
    expected = seed_pipeline.predict(digits.X)
    assert [int(t[1:-1]) for t in texts[:len(digits.X)]] == expected.tolist()
    shadow = wait_for(lambda: (s := app.stats()["shadow"])["in_flight"] == 0 and s, timeout=90)
    assert shadow["skipped_batches"] > 0
    assert shadow["offered_batches"] == shadow["batches"] + shadow["skipped_batches"]
    assert shadow["scored"] + shadow["skipped_messages"] == n
    assert shadow["agreement"] > 0.9


def test_the_shadow_process_killed_is_started_again(start_app, collector, served_dir, shadow_dir,
                                                    digits):
    app = start_app(collector.port, "--input-format", "u8", "--shadow", str(shadow_dir),
                    model=served_dir)
    pid = int(wait_for(lambda: re.search(r"shadow model's process \(pid (\d+)\) is ready",
                                         app.log()))[1])
    frames = frame_many(r.tobytes() for r in digits.X.astype(np.uint8))
    send_and_wait_scored(app, collector, frames, len(digits.X), len(digits.X))

    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: "shadow model's process (pid %d) lost" % pid in app.log())
    wait_for(lambda: app.stats()["shadow"]["ready"] and app.stats()["shadow"]["restarts"] == 1)
    shadow = send_and_wait_scored(app, collector, frames, 2 * len(digits.X), 2 * len(digits.X))
    assert shadow["scored"] + shadow["skipped_messages"] == 2 * len(digits.X)
    assert shadow["batches"] >= 2


def test_a_shadow_of_other_classes_is_a_one_line_error(tmp_path, model_dir, digits):
    binary = LogisticRegression(max_iter=500).fit(digits.X, digits.y % 2)
    save_bundle(binary, tmp_path / "binary", {"model": "odd"})
    for shadow, message in [(tmp_path / "binary", "they must be the same"),
                            (tmp_path / "missing", "no model bundle at")]:
        done = subprocess.run(
            [sys.executable, "-m", "digitstream.cli", "run", "--in", f"{HOST}:0", "--out",
             f"{HOST}:9", "--no-metrics", "--model", str(model_dir), "--shadow", str(shadow)],
            capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 1
        assert message in done.stderr.strip().splitlines()[-1]
    done = subprocess.run(
        [sys.executable, "-m", "digitstream.cli", "promote", "--model", str(model_dir),
         "--shadow", str(tmp_path / "binary")], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 1 and "a run swaps only a model of the same" in done.stderr
    assert json.loads((model_dir / CARD_FILE).read_text())["model"] == "pca-logistic"


def test_promote_with_a_skops_shadow_carries_the_profile_beside_it(
        tmp_path, seed_pipeline, other_pipeline, digits):
    import skops.io as sio

    from digitstream.model.train import split_dataset
    from digitstream.monitor.profile import profile_of_split

    profile = profile_of_split(seed_pipeline, split_dataset(digits), digits.value_range, "digits")
    served = tmp_path / "served"
    save_bundle(seed_pipeline, served, {"model": "seed"}, profile=profile)
    before = load_bundle(served)
    mine = tmp_path / "mine.skops"
    sio.dump(other_pipeline, mine)
    done = subprocess.run([sys.executable, "-m", "digitstream.cli", "promote", "--model",
                           str(served), "--shadow", str(mine)],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert "its profile beside it as mine.profile.json" in done.stdout
    now_served, now_shadow = load_bundle(served), load_bundle(mine)
    assert np.array_equal(now_served.pipeline.predict(digits.X), other_pipeline.predict(digits.X))
    assert now_served.profile is None and now_served.card["promoted_from"] == str(mine)
    # the old served model, byte for byte with its profile: the same content hash
    assert now_shadow.content_hash == before.content_hash
    assert now_shadow.profile is not None
