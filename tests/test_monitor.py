"""The model monitor, part one: the reference profile in the bundle, drift, and the accuracy
estimated without labels.

The long streams (2,000,000 messages) run in this process, through the real
:class:`~digitstream.pipeline.Flow` (which sketches each batch) and the real
:class:`~digitstream.monitor.drift.DriftMonitor` (which judges the windows), without sockets:
the statistics are what a run computes, at the speed of NumPy. What a run adds (the
sketches travelling on results, the report in ``/api/stats`` and ``/metrics``, the log
lines) is tested on a real ``digitstream run`` below.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from digitstream.batch import Batch
from digitstream.errors import BundleError
from digitstream.model.bundle import (
    CARD_FILE,
    PIPELINE_FILE,
    content_hash,
    load_bundle,
    profile_path,
    save_bundle,
)
from digitstream.monitor import Monitor
from digitstream.monitor.drift import DriftMonitor
from digitstream.monitor.profile import PROFILE_FILE, Profile, profile_of_split
from digitstream.monitor.sketch import Sketcher
from digitstream.pipeline import SKETCH_BURST, SKETCH_SHARE, Flow, FlowOptions
from digitstream.wire.framing import Payloads, frame_many
from helpers import http_get, send_bytes, wait_for

pytestmark = pytest.mark.timeout(300)

#: what the README states: with the default window (20,000 messages) and batches of 1,024
#: messages, a one-pixel shift and noise are flagged within these many messages of the
#: change, a change of the classes' mix within the next
WITHIN_SHIFT = 8_192
WITHIN_NOISE = 8_192
WITHIN_MIX = 24_576
#: and the accuracy estimated without labels is within this of the measured one
ESTIMATE_MARGIN = 0.03


@pytest.fixture(scope="module")
def trained(digits):
    """The seed's model trained as ``digitstream train --model pca-logistic`` does (its quick
    grid), with the profile ``train`` stores."""
    from digitstream.model.train import train_model

    result = train_model(digits, "pca-logistic", quick=True)
    profile = profile_of_split(result.pipeline, result.split, digits.value_range, "digits")
    return result, profile


@pytest.fixture(scope="module")
def profiled_dir(tmp_path_factory, trained):
    result, profile = trained
    directory = tmp_path_factory.mktemp("profiled")
    save_bundle(result.pipeline, directory, result.card, profile=profile)
    return directory


def shifted(X: np.ndarray, right: int = 1) -> np.ndarray:
    """The 8x8 images moved ``right`` pixels to the right (what falls off is lost)."""
    images = np.roll(X.reshape(-1, 8, 8), right, axis=2)
    images[:, :, :right] = 0
    return images.reshape(len(X), 64)


def noisy(X: np.ndarray, rng, sd: float = 2.0) -> np.ndarray:
    return np.clip(np.round(X + rng.normal(0, sd, X.shape)), 0, 16)


def mixed(X: np.ndarray, y: np.ndarray, rng, n: int = 20_000):
    """Digits 0-4 three times as often as 5-9."""
    weights = np.where(y < 5, 3.0, 1.0)
    at = rng.choice(len(X), n, p=weights / weights.sum())
    return X[at], y[at]


#: the rate the in-process streams keep time by: slow enough that every chunk of the
#: window gets its verdict (a run judges at most 20 times a second)
RATE = 20_000


class Stream:
    """Batches of u8 frames through a real flow into a drift monitor (``profile``'s, with
    ``window``), in this process; the monitor's clock moves as at ``rate`` messages/s."""

    def __init__(self, flow: Flow, profile: Profile, rate: float = RATE, **window):
        self.now = 1_000_000.0
        self.flow, self.seq, self.rate = flow, 0, rate
        self.monitor = DriftMonitor(profile, clock=lambda: self.now, **window)
        self.max_score = -np.inf

    def run(self, X: np.ndarray, messages: int, batch_sizes) -> int | None:
        """Send ``messages`` of ``X`` (cycled); how many went before drift was newly
        detected (None if it was not)."""
        rows = np.ascontiguousarray(X, dtype=np.uint8)
        sent, at, detected_after = 0, 0, None
        episodes = self.monitor.episodes
        while sent < messages:
            n = min(next(batch_sizes), messages - sent)
            index = np.arange(at, at + n) % len(rows)
            at = (at + n) % len(rows)
            result = self.flow.process(Batch(0, self.seq, Payloads(fixed=rows[index])))
            self.seq += n
            sent += n
            self.now += n / self.rate
            self.monitor.add(result)
            score = self.monitor._verdict.score
            if score is not None:
                self.max_score = max(self.max_score, score)
            if detected_after is None and self.monitor.episodes > episodes:
                detected_after = sent
        return detected_after


def every(n):
    while True:
        yield n


def u8_flow(trained) -> Flow:
    """The flow a run builds; it sketches every batch, as a run below saturation does (in
    this process it runs flat out, where a run's flow keeps to its share of the time)."""
    result, profile = trained
    flow = Flow.build(result.pipeline, FlowOptions("u8", "text"), profile)
    flow.sketch_share = 1e9
    return flow


# ------------------------------------------------------------------ the profile
def test_profile_round_trips_through_json_and_rejects_what_is_not_one(trained):
    _, profile = trained
    again = Profile.from_json(json.loads(json.dumps(profile.to_json())))
    assert again.to_json() == profile.to_json()
    assert again.n_features == 64 and again.classes == [str(c) for c in range(10)]
    assert again.reference_rows == 1347 and again.heldout_rows == 450
    assert again.reference.sum() == 1347 * 64
    document = profile.to_json()
    for change, reason in [
        (lambda d: d.update(format="x"), "not a digitstream-profile/1"),
        (lambda d: d["features"].update(counts=[[1] * 16] * 63), "features.counts"),
        (lambda d: d["features"].update(counts=[[-1] * 16] * 64), "features.counts"),
        (lambda d: d["classes"].update(predicted=[1, 2]), "classes.predicted"),
        (lambda d: d["null"]["input"].update(sd=[0.0] * 10), "null.input"),
        (lambda d: d["null"].update(confidence=None), "go together"),
        (lambda d: d.pop("pipeline_hash"), "pipeline_hash"),
    ]:
        broken = json.loads(json.dumps(document))
        change(broken)
        with pytest.raises(ValueError, match=re.escape(reason)):
            Profile.from_json(broken)


def test_thresholds_fall_with_the_window_and_stay_above_the_null(trained):
    _, profile = trained
    curve = profile.input_null
    thresholds = [curve.threshold(n) for n in (50, 100, 400, 1600, 25_600, 10**6)]
    assert all(a >= b for a, b in zip(thresholds, thresholds[1:]))
    assert curve.threshold(49) is None  # too few rows: no verdict
    # past the held-out part's own size (450) the spread does not shrink any further
    beyond = curve.sd[curve.sizes > 450]
    assert len(beyond) > 3 and np.all(beyond == beyond[0])


def test_bundle_holds_the_profile_and_its_content_hash_covers_it(profiled_dir, tmp_path):
    bundle = load_bundle(profiled_dir)
    assert bundle.profile is not None and bundle.profile.n_features == 64
    card = json.loads((profiled_dir / CARD_FILE).read_text())
    pipeline_bytes = (profiled_dir / PIPELINE_FILE).read_bytes()
    assert card["profile_file"] == PROFILE_FILE
    assert card["pipeline_hash"] == content_hash(pipeline_bytes)  # what sha256sum says
    assert card["content_hash"] == bundle.content_hash != card["pipeline_hash"]
    # a profile changed after the bundle was written is caught by the content hash
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (CARD_FILE, PIPELINE_FILE, PROFILE_FILE):
        (copy / name).write_bytes((profiled_dir / name).read_bytes())
    profile = json.loads((copy / PROFILE_FILE).read_text())
    profile["held_out"]["accuracy"] = 1.0
    (copy / PROFILE_FILE).write_text(json.dumps(profile))
    with pytest.raises(BundleError, match="does not match"):
        load_bundle(copy)
    (copy / PROFILE_FILE).unlink()
    with pytest.raises(BundleError, match="profile.json is missing"):
        load_bundle(copy)


def test_profile_command_adds_one_to_a_skops_file_and_to_a_bundle(trained, tmp_path):
    import skops.io as sio
    from sklearn.base import clone

    result, _ = trained
    mine = tmp_path / "mine.skops"
    sio.dump(result.pipeline, mine)
    assert load_bundle(mine).profile is None
    command = [sys.executable, "-m", "digitstream.cli", "profile", "--model", str(mine),
               "--dataset", "digits"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Reference profile written to" in done.stdout
    sidecar = tmp_path / "mine.profile.json"
    assert profile_path(mine) == sidecar and sidecar.exists()
    bundle = load_bundle(mine)
    assert bundle.profile is not None
    assert bundle.card["profile_file"] == "mine.profile.json"
    assert bundle.content_hash != content_hash(mine.read_bytes())
    inspected = subprocess.run([sys.executable, "-m", "digitstream.cli", "inspect", str(mine)],
                               capture_output=True, text=True, timeout=120)
    assert inspected.returncode == 0, inspected.stderr
    assert "reference profile (mine.profile.json):" in inspected.stdout
    assert "drift threshold, inputs" in inspected.stdout
    # a pipeline replaced under its profile: the stale profile is refused by name
    other = clone(result.pipeline).set_params(**{"Logistic Regression__C": 0.5}).fit(
        result.split.X_train, result.split.y_train)
    sio.dump(other, mine)
    with pytest.raises(BundleError, match="describes another pipeline"):
        load_bundle(mine)
    # a bundle directory without a profile gets one; its card now names it
    plain = tmp_path / "plain"
    save_bundle(other, plain, {"model": "mine"})
    before = load_bundle(plain)
    assert before.profile is None and not (plain / PROFILE_FILE).exists()
    done = subprocess.run([*command[:5], str(plain), "--dataset", "digits"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    after = load_bundle(plain)
    assert after.profile is not None and after.content_hash != before.content_hash
    # a data set of another width is a one-line usage error
    wrong = tmp_path / "wide.npz"
    np.savez(wrong, X=np.zeros((40, 10)), y=np.arange(40) % 2)
    done = subprocess.run([*command[:5], str(plain), "--dataset", f"npz:{wrong}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "has 10 features, the model at" in done.stderr


# ------------------------------------------------------------------ the sketch
def test_sketch_samples_about_one_in_eight_and_leaves_rejected_rows_out():
    sketcher = Sketcher(4, 0.0, 16.0, 16, np.array([0.0, 0.5, 1.0]))
    rng = np.random.default_rng(3)
    rows = sketcher.rows(1000, None, rng)
    assert 80 < len(rows) < 170 and np.all(np.diff(rows) > 0)
    assert len(sketcher.rows(100_000, None, rng)) == sketcher.max_rows  # a big batch
    errors = {int(r): "bad" for r in rows[:5]}
    assert not set(sketcher.rows(1000, errors, np.random.default_rng(3))) & set(errors)
    X = np.array([[0, 15.9, 16, 99], [-3, 8, 8.5, 1]], dtype=np.float32)
    counts = sketcher.feature_counts(X).reshape(4, 16)
    assert counts.sum() == 8 and counts[0, 0] == 2 and counts[1, 15] == 1 and counts[3, 15] == 1
    assert sketcher.confidence_counts(np.array([0.2, 0.5, 1.0])).tolist() == [1, 2]


def test_results_carry_the_sketch_and_failed_halves_keep_it(trained, digits):
    flow = u8_flow(trained)
    rows = np.ascontiguousarray(digits.X, dtype=np.uint8)
    result = flow.process(Batch(0, 0, Payloads(fixed=rows)))
    assert 0 < result.sampled <= flow.sketcher.max_rows
    assert result.feature_counts.sum() == result.sampled * 64
    assert result.confidence_counts.sum() == result.sampled
    # the same images again sample other rows of them
    again = flow.process(Batch(1, 0, Payloads(fixed=rows)))
    assert not np.array_equal(again.feature_counts, result.feature_counts)
    # a batch with bad frames is answered in parts; the parts' sketches add up
    payloads = [r.tobytes() for r in rows[:300]]
    payloads[7] = payloads[7][:10]
    split = flow.process(Batch(0, 0, Payloads.from_list(payloads)))
    assert 0 < split.sampled < 300 and split.feature_counts.sum() == split.sampled * 64
    # --no-drift: nothing sketched
    plain = Flow.build(trained[0].pipeline, FlowOptions("u8", "text", drift=False), trained[1])
    assert plain.process(Batch(0, 0, Payloads(fixed=rows))).feature_counts is None


def test_a_flow_keeps_its_sketches_to_their_share_of_the_time(trained, digits):
    """Flat out, a flow sketches a few of its batches (SKETCH_SHARE of its time); given time
    between batches, as a run below saturation has, every one."""
    result, profile = trained
    flow = Flow.build(result.pipeline, FlowOptions("u8", "text"), profile)
    rows = np.ascontiguousarray(digits.X[np.arange(8192) % len(digits.X)], dtype=np.uint8)
    batch = Batch(0, 0, Payloads(fixed=rows))
    started = time.perf_counter()
    sketched = sum(flow.process(batch).feature_counts is not None for _ in range(400))
    spent = time.perf_counter() - started
    assert 0 < sketched < 200, sketched
    # what they took: their share of the time, one burst and the last sketch at most
    assert flow.sketch_seconds <= SKETCH_SHARE * spent + 2 * SKETCH_BURST
    # below saturation: a pause between batches earns every one its sketch
    small = Batch(0, 0, Payloads(fixed=rows[:200]))
    paused = []
    for _ in range(10):
        time.sleep(0.02)
        paused.append(flow.process(small).feature_counts is not None)
    assert all(paused)


# ------------------------------------------------------------------ drift
def test_held_out_digits_repeated_to_two_million_messages_raise_no_alarm(trained):
    """2,000,000 messages of the held-out part, in batches of random sizes (seeded), through
    the real flow and monitor with the default window."""
    result, profile = trained
    seed = 20240601
    rng = np.random.default_rng(seed)
    sizes = iter(lambda: int(rng.integers(1, 8193)), None)
    stream = Stream(u8_flow(trained), profile)
    detected_after = stream.run(result.split.X_test, 2_000_000, sizes)
    assert detected_after is None, f"seed {seed}: drift after {detected_after} messages"
    assert stream.max_score < profile.z, f"seed {seed}"
    assert stream.monitor.episodes == 0


@pytest.mark.parametrize("drift", ["shift", "noise", "mix"])
def test_drift_is_flagged_within_the_stated_messages(trained, drift, caplog):
    result, profile = trained
    rng = np.random.default_rng(7)
    X, y = result.split.X_test, result.split.y_test
    stream = Stream(u8_flow(trained), profile)
    assert stream.run(X, 60_000, every(1024)) is None
    within = {"shift": WITHIN_SHIFT, "noise": WITHIN_NOISE, "mix": WITHIN_MIX}[drift]
    drifted = {"shift": lambda: shifted(X), "noise": lambda: noisy(X, rng),
               "mix": lambda: mixed(X, y, rng)[0]}[drift]()
    with caplog.at_level(logging.INFO, logger="digitstream.monitor"):
        after = stream.run(drifted, within, every(1024))
        assert after is not None and after <= within, after
        report = stream.monitor.report()
        assert report["detected"] and report["since"] is not None
        assert report["score"] > report["threshold"] == profile.z
        # back to the held-out digits: it clears once the window holds them again
        cleared_after = stream.run(X, 60_000, every(1024))
    assert cleared_after is None and not stream.monitor.detected
    assert stream.monitor.report()["since"] is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].getMessage().startswith("drift detected: score")
    assert any(r.levelno == logging.INFO and r.getMessage().startswith("drift cleared after")
               for r in caplog.records)


def shifted_down(X: np.ndarray) -> np.ndarray:
    images = np.roll(X.reshape(-1, 8, 8), 1, axis=1)
    images[:, 0, :] = 0
    return images.reshape(len(X), 64)


def test_the_heat_map_shows_where_a_shift_is(trained):
    """Moved right, the pixels change column by column (the columns where strokes begin
    most), moved down, row by row (the top row, blanked, most): the heat maps say so."""
    result, profile = trained
    heat = {}
    for name, move in (("right", shifted), ("down", shifted_down)):
        stream = Stream(u8_flow(trained), profile)
        stream.run(move(result.split.X_test), 20_000, every(1024))
        report = stream.monitor.report()
        assert report["detected"] and report["image"] == [8, 8]
        heat[name] = np.array(report["features"]).reshape(8, 8)
        assert report["tests"]["inputs"]["score"] > report["tests"]["classes"]["score"]
    by_column, by_row = heat["right"].mean(axis=0), heat["right"].mean(axis=1)
    assert by_column.std() > 2 * by_row.std()
    assert np.argmax(by_column) in (1, 2) and by_column[0] < 0.1  # column 0: blank before too
    by_row = heat["down"].mean(axis=1)
    assert by_row[0] > 2 * by_row[1:].max()  # the top row, inked in the middle, blanked


def test_estimated_accuracy_is_within_the_margin_without_a_shift(trained):
    """Confidence-based: right while answers stay as calibrated as on the held-out part
    (the held-out digits, noisy ones, another class mix); a shift makes the model confidently
    wrong, which the estimate cannot see and the drift test does."""
    result, profile = trained
    pipeline = result.pipeline
    rng = np.random.default_rng(11)
    X, y = result.split.X_test, result.split.y_test
    cases = {"held-out": (X, y), "noisy": (noisy(X, rng), y), "mixed": mixed(X, y, rng)}
    for name, (images, labels) in cases.items():
        stream = Stream(u8_flow(trained), profile)
        stream.run(images, 20_000, every(1024))
        # over what the window holds: the images cycled, so their measured accuracy
        measured = float(np.mean(pipeline.predict(images) == labels))
        estimated = stream.monitor.estimated_accuracy
        assert abs(estimated - measured) <= ESTIMATE_MARGIN, (name, estimated, measured)
    stream = Stream(u8_flow(trained), profile)
    stream.run(shifted(X), 20_000, every(1024))
    measured = float(np.mean(pipeline.predict(shifted(X)) == y))
    assert stream.monitor.detected
    assert stream.monitor.estimated_accuracy - measured > 0.2


def test_the_window_is_bounded_by_time_too(trained):
    result, profile = trained
    stream = Stream(u8_flow(trained), profile, rate=100, window_messages=10**9,
                    window_seconds=16.0)
    stream.run(result.split.X_test, 4000, every(100))  # 40 s of 100 a second
    report = stream.monitor.report()
    assert 1500 <= report["window"] <= 1800  # 16 s of it, in whole 1 s chunks
    stream.now += 100.0
    assert stream.monitor.report()["window"] == 0


def test_a_model_without_a_profile_says_so():
    report = Monitor(None).report()
    assert report["estimated_accuracy"] is None
    assert report["drift"]["enabled"] is False and "no reference profile" in report["drift"]["reason"]
    assert Monitor(None, drift=False).report()["drift"]["reason"] == "off (run --no-drift)"


# ------------------------------------------------------------------ a real run
def test_run_reports_drift_in_stats_metrics_and_log(start_app, collector, profiled_dir, trained):
    result, _ = trained
    app = start_app(collector.port, "--input-format", "u8", "--drift-window", "2000",
                    model=profiled_dir)
    stats = app.stats()
    assert stats["drift"]["enabled"] and not stats["drift"]["detected"]
    X = result.split.X_test
    clean = frame_many(r.tobytes() for r in np.ascontiguousarray(X, dtype=np.uint8))
    for _ in range(10):
        send_bytes(app.in_port, clean)
    collector.wait_count(10 * len(X))
    stats = wait_for(lambda: (s := app.stats())["drift"]["window"] >= 2000 and s)
    drift = stats["drift"]
    assert not drift["detected"] and drift["score"] < drift["threshold"]
    assert len(drift["features"]) == 64 and drift["since"] is None
    assert 0.9 < stats["estimated_accuracy"] <= 1.0
    moved = frame_many(r.tobytes() for r in np.ascontiguousarray(shifted(X), dtype=np.uint8))
    for _ in range(10):
        send_bytes(app.in_port, moved)
    collector.wait_count(20 * len(X))
    stats = wait_for(lambda: (s := app.stats())["drift"]["detected"] and s)
    assert stats["drift"]["since"] > stats["started_at"]
    assert "WARNING digitstream.monitor: drift detected: score" in app.log()
    status, body = http_get(app.metrics_url + "/metrics")
    text = body.decode()
    assert status == 200
    assert "digitstream_drift_detected 1.0" in text
    assert re.search(r'^digitstream_drift_score\{feature="63"\} 0\.\d+', text, re.M)
    assert re.search(r"^digitstream_estimated_accuracy 0\.\d+", text, re.M)


@pytest.mark.parametrize("engine", [["--workers", "2"], ["--engine", "dask", "--workers", "1"]])
def test_drift_is_judged_with_worker_processes_and_dask(start_app, collector, profiled_dir,
                                                        trained, engine):
    """The sketch is made where the batch is classified and travels back on its result."""
    result, _ = trained
    app = start_app(collector.port, "--input-format", "u8", "--drift-window", "2000", *engine,
                    model=profiled_dir)
    X = result.split.X_test
    moved = frame_many(r.tobytes() for r in np.ascontiguousarray(shifted(X), dtype=np.uint8))
    for _ in range(10):
        send_bytes(app.in_port, moved)
    collector.wait_count(10 * len(X))
    stats = wait_for(lambda: (s := app.stats())["drift"]["detected"] and s)
    assert stats["drift"]["rows"] > 0 and len(stats["drift"]["features"]) == 64


def test_a_profile_added_while_serving_is_swapped_in(start_app, collector, trained, tmp_path,
                                                     digits):
    result, _ = trained
    bundle = tmp_path / "bundle"
    save_bundle(result.pipeline, bundle, result.card)
    app = start_app(collector.port, "--input-format", "u8", model=bundle)
    assert "no reference profile" in app.stats()["drift"]["reason"]
    done = subprocess.run([sys.executable, "-m", "digitstream.cli", "profile", "--model",
                           str(bundle), "--dataset", "digits"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: app.stats()["model_swaps_total"] == 1, what="the swap")
    send_bytes(app.in_port, frame_many(r.tobytes() for r in digits.X.astype(np.uint8)))
    collector.wait_count(len(digits.X))
    stats = wait_for(lambda: (s := app.stats())["drift"]["enabled"] and s["drift"]["window"] and s)
    assert stats["model"]["profile_file"] == "profile.json"
    assert "drift windows start again" in app.log()
