"""Labels that arrive later (``run --labels``), joined by id, counted in the live accuracy;
and an accuracy drop flagged by a change detector on the error rate."""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from digitstream.monitor.accuracy import AccuracyWatch
from digitstream.monitor.labels import LabelJoin, id_key
from digitstream.wire.framing import frame_many
from helpers import HOST, TIMEOUT, http_get, memory_of, send_bytes, wait_for

pytestmark = pytest.mark.timeout(300)

CLASSES = [str(c) for c in range(10)]


def served(ids, predicted, true=None):
    """A served result's per-message fields, as a flow asked for predictions gives them."""
    return SimpleNamespace(ids=ids, predicted=np.array(predicted, dtype=np.int32),
                           true=None if true is None else np.array(true, dtype=np.int32))


# ------------------------------------------------------------------ the join
def test_the_join_matches_by_id_and_counts_what_does_not_match():
    join = LabelJoin(CLASSES, capacity=4)
    # ids as text: 7 and "7" are one id; a rejected input (-1) and one without an id wait not
    join.predictions(served(["a", 7, None, "b", "c"], [1, 2, 3, -1, 4]))
    assert list(join.pending) == ["a", "7", "c"]
    # an input with its own label is scored inline: it waits for no late one
    join.predictions(served(["d", "e"], [5, 6], true=[5, -1]))
    assert list(join.pending) == ["a", "7", "c", "e"]
    matched = join.labels([
        {"id": "7", "label": 2},                  # its prediction: right
        {"id": "a", "label": "9"},                # wrong, label as text
        {"id": "a", "label": 1},                  # again: taken already
        {"id": "zzz", "label": 1},                # never seen
        {"id": "e", "label": "not-a-class"},      # a label the model has no class for
        {"id": "c"}, {"label": 3}, [1, 2], None,  # not records
        {"id": True, "label": 1}, {"id": "x", "label": float("nan")},
    ])
    assert matched == [("7", 2, 2), ("a", 9, 1), ("e", 10, 6)]
    assert (join.received, join.matched, join.unknown, join.invalid) == (5, 3, 2, 6)
    assert list(join.pending) == ["c"]


def test_the_join_is_bounded_and_drops_the_oldest_first():
    join = LabelJoin(CLASSES, capacity=1000)
    for start in range(0, 100_000, 5000):
        ids = [f"m{i}" for i in range(start, start + 5000)]
        join.predictions(served(ids, np.arange(5000) % 10))
    assert len(join.pending) == 1000 and join.expired == 99_000
    assert next(iter(join.pending)) == "m99000"
    assert join.labels([{"id": "m98999", "label": 9}, {"id": "m99000", "label": 0}]) == [
        ("m99000", 0, 0)]
    assert join.unknown == 1


def test_ids_are_compared_as_text():
    assert [id_key(v) for v in ("x", 5, 5.0, -1, True, None, [1], float("inf"))] == [
        "x", "5", "5.0", "-1", None, None, None, None]


# ------------------------------------------------------------- accuracy drops
def labels_at(rng, error_rate: float, n: int, group: int = 50):
    """(labelled, correct) groups of a steady error rate."""
    for _ in range(n // group):
        errors = int(rng.binomial(group, error_rate))
        yield group, group - errors


@pytest.mark.parametrize("error_rate", [0.0, 0.03, 0.4])
def test_a_steady_error_rate_raises_no_alarm(error_rate, caplog):
    seed = 5
    rng = np.random.default_rng(seed)
    watch = AccuracyWatch()
    with caplog.at_level(logging.WARNING, logger="digitstream.monitor"):
        for labelled, correct in labels_at(rng, error_rate, 500_000):
            watch.add(labelled, correct)
    assert watch.episodes == 0, f"seed {seed}"
    assert not caplog.records


def test_an_accuracy_drop_is_flagged_and_clears_when_it_recovers(caplog):
    rng = np.random.default_rng(9)
    watch = AccuracyWatch()
    for labelled, correct in labels_at(rng, 0.03, 20_000):
        watch.add(labelled, correct)
    assert not watch.detected
    seen = 0
    with caplog.at_level(logging.INFO, logger="digitstream.monitor"):
        for labelled, correct in labels_at(rng, 0.30, 20_000):
            watch.add(labelled, correct)
            seen += labelled
            if watch.detected:
                break
        assert watch.detected and seen <= 400, seen  # 3% -> 30% errors: within 400 labels
        assert watch.report()["drop"]["since"] is not None
        for labelled, correct in labels_at(rng, 0.30, 2000):  # it lasts
            watch.add(labelled, correct)
        assert watch.detected
        seen = 0
        for labelled, correct in labels_at(rng, 0.03, 20_000):
            watch.add(labelled, correct)
            seen += labelled
            if not watch.detected:
                break
        assert not watch.detected and seen <= 1000, seen
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("accuracy drop detected: error rate 0.")
    assert messages[1].startswith("accuracy drop cleared after")


def test_the_accuracy_window_is_by_time():
    now = [100.0]
    watch = AccuracyWatch(window_seconds=10, clock=lambda: now[0])
    for _ in range(30):
        watch.add(10, 9)
        now[0] += 1
    window = watch.report()["window"]
    # the last 10 s: the labels of seconds 121 to 129 (the clock stands at 130)
    assert window["labelled"] == 90 and window["correct"] == 81 and window["accuracy"] == 0.9
    now[0] += 20
    assert watch.report()["window"]["accuracy"] is None


# ------------------------------------------------------------------ a real run
def labels_port(app) -> int:
    match = wait_for(lambda: re.search(r"late labels from 127\.0\.0\.1:(\d+)", app.log()),
                     what="the labels line")
    return int(match[1])


def json_frames(X, ids, labels=None) -> bytes:
    def record(i):
        obj = {"pixels": X[i].tolist(), "id": ids[i]}
        if labels is not None and labels[i] is not None:
            obj["label"] = int(labels[i])
        return json.dumps(obj).encode()
    return frame_many(record(i) for i in range(len(X)))


def shuffled_within(items: list, window: int, rng: random.Random) -> list:
    """``items`` with each run of ``window`` shuffled: a label comes at most ``window``
    places from where its input was."""
    out = []
    for start in range(0, len(items), window):
        part = items[start:start + window]
        rng.shuffle(part)
        out.extend(part)
    return out


@pytest.mark.parametrize("workers", [None, 2])
def test_late_labels_shuffled_give_the_accuracy_computed_outside(
        start_app, collector, digits, seed_pipeline, workers):
    """Every digit three times with an id, a third of them with their label inline; the other
    labels later on a second stream, shuffled within 500: the live accuracy and confusion
    matrix equal what the model gives on them, computed here."""
    seed = 20240602
    rng = random.Random(seed)
    X = np.concatenate([digits.X] * 3)
    y = np.concatenate([digits.y] * 3)
    ids = [f"img-{i}" for i in range(len(X))]
    inline = [int(y[i]) if i % 3 == 0 else None for i in range(len(X))]
    args = ["--input-format", "json", "--labels", f"{HOST}:0"]
    if workers:
        args += ["--workers", str(workers)]
    app = start_app(collector.port, *args)
    port = labels_port(app)
    send_bytes(app.in_port, json_frames(X, ids, inline))
    collector.wait_count(len(X))
    wait_for(lambda: app.stats()["labels"]["pending"] == 2 * len(X) // 3, what="pending")
    late = shuffled_within([i for i in range(len(X)) if inline[i] is None], 500, rng)
    records = [json.dumps({"id": ids[i], "label": int(y[i])}).encode() for i in late]
    half = len(records) // 2
    send_bytes(port, frame_many(records[:half]))  # two connections, one after the other
    send_bytes(port, frame_many(records[half:]))
    stats = wait_for(lambda: (s := app.stats())["labels"]["matched"] == len(late) and s,
                     what=f"{len(late)} labels matched (seed {seed})")
    predicted = seed_pipeline.predict(X)
    assert stats["labels"] == {"enabled": True, "received": len(late), "matched": len(late),
                               "unknown": 0, "expired": 0, "pending": 0, "invalid": 0,
                               "capacity": 100_000}
    accuracy = stats["accuracy"]
    assert accuracy["labelled"] == len(X)
    assert accuracy["correct"] == int(np.sum(predicted == y))
    outside = Counter(zip(map(str, y), map(str, predicted)))
    labels = accuracy["confusion"]["labels"]
    inside = {(labels[t], labels[p]): n for t, row in enumerate(accuracy["confusion"]["matrix"])
              for p, n in enumerate(row) if n}
    assert inside == outside
    assert accuracy["per_class"]["8"]["labelled"] == int(np.sum(y == 8))
    assert accuracy["window"]["labelled"] == len(X)
    # the application still serves
    send_bytes(app.in_port, json_frames(X[:10], ids[:10]))
    collector.wait_count(len(X) + 10)


def test_labels_that_never_come_hold_bounded_memory(start_app, collector, digits):
    window = 1000
    app = start_app(collector.port, "--input-format", "json", "--labels", f"{HOST}:0",
                    "--label-window", str(window))
    X = digits.X
    chunk = json_frames(X, [f"c0-{i}" for i in range(len(X))])
    send_bytes(app.in_port, chunk)
    collector.wait_count(len(X))
    before = memory_of(app.proc.pid)[0]
    for round_ in range(1, 41):  # 40 x 1,797 ids that no label ever names
        ids = [f"c{round_}-{i}-{'x' * 40}" for i in range(len(X))]
        send_bytes(app.in_port, json_frames(X, ids))
    collector.wait_count(41 * len(X), timeout=120)
    stats = wait_for(lambda: (s := app.stats())["labels"]["expired"] == 41 * len(X) - window
                     and s, what="expired predictions")
    assert stats["labels"]["pending"] == window
    after = memory_of(app.proc.pid)[0]
    assert after - before < 20 * 2**20, (before, after)


def test_bad_label_records_are_counted_and_the_run_serves_on(start_app, collector, digits):
    app = start_app(collector.port, "--input-format", "json", "--labels", f"{HOST}:0",
                    "--max-frame", "4096")
    port = labels_port(app)
    send_bytes(app.in_port, json_frames(digits.X[:5], ["a", "b", "c", "d", "e"]))
    collector.wait_count(5)
    bad = [b"", b"\xff\xfe", b"not json", b"[1, 2]", b'{"id": "a"}', b'{"label": 1}',
           b'{"id": {"x": 1}, "label": 1}', b'{"id": "b", "label": NaN}',
           b'{"id": "c", "label": [1]}', b'"text"']
    send_bytes(port, frame_many(bad) + frame_many([b'{"id": "d", "label": 4}']))
    stats = wait_for(lambda: (s := app.stats())["labels"]["matched"] == 1 and s)
    assert stats["labels"]["invalid"] == len(bad)
    assert "are counted as invalid" in app.log()
    # a frame past --max-frame closes that labels connection; the next one is read
    send_bytes(port, (1 << 20).to_bytes(4, "big") + b"x" * 100)
    send_bytes(port, frame_many([b'{"id": "e", "label": 1}']))
    wait_for(lambda: app.stats()["labels"]["matched"] == 2)
    send_bytes(app.in_port, json_frames(digits.X[:3], ["f", "g", "h"]))
    collector.wait_count(8)
    assert app.proc.poll() is None


def test_wrong_late_labels_flag_an_accuracy_drop(start_app, collector, digits, seed_pipeline):
    app = start_app(collector.port, "--input-format", "json", "--labels", f"{HOST}:0")
    port = labels_port(app)
    X = np.concatenate([digits.X] * 2)
    ids = [f"i{i}" for i in range(len(X))]
    send_bytes(app.in_port, json_frames(X, ids))
    collector.wait_count(len(X))
    truth = np.concatenate([digits.y] * 2)
    right = [json.dumps({"id": ids[i], "label": int(truth[i])}).encode()
             for i in range(len(digits.X))]
    send_bytes(port, frame_many(right))
    wait_for(lambda: app.stats()["labels"]["matched"] == len(digits.X))
    assert not app.stats()["accuracy"]["drop"]["detected"]
    # the world changed: from here on the true labels are the next digit
    shifted = [json.dumps({"id": ids[i], "label": int((truth[i] + 1) % 10)}).encode()
               for i in range(len(digits.X), len(X))]
    send_bytes(port, frame_many(shifted))
    stats = wait_for(lambda: (s := app.stats())["accuracy"]["drop"]["detected"] and s)
    assert stats["accuracy"]["drop"]["since"] > stats["started_at"]
    assert "WARNING digitstream.monitor: accuracy drop detected: error rate" in app.log()
    assert re.search(r"^digitstream_accuracy_drop_detected 1\.0$",
                     http_get(app.metrics_url + "/metrics")[1].decode(),
                     re.M)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_late_labels_from_a_redis_stream(start_app, collector, digits, seed_pipeline, tmp_path):
    import redis as redis_py

    from test_redis import RedisServer

    server = RedisServer(tmp_path / "redis")
    try:
        app = start_app(collector.port, "--input-format", "json", "--labels",
                        server.url("labels"))
        n = 300
        ids = [f"r{i}" for i in range(n)]
        send_bytes(app.in_port, json_frames(digits.X[:n], ids))
        collector.wait_count(n)
        client = redis_py.Redis(HOST, server.port, socket_timeout=TIMEOUT)
        for i in range(n):
            client.xadd("labels", {"data": json.dumps({"id": ids[i], "label": int(digits.y[i])})})
        stats = wait_for(lambda: (s := app.stats())["labels"]["matched"] == n and s)
        assert stats["accuracy"]["correct"] == int(np.sum(seed_pipeline.predict(digits.X[:n])
                                                          == digits.y[:n]))
        # read as a consumer group: every entry acknowledged once joined
        wait_for(lambda: client.xpending("labels", "digitstream")["pending"] == 0,
                 what="the label entries acknowledged")
    finally:
        server.stop()
