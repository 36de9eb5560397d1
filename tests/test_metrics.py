"""Metrics: the recorder, /metrics, /api/stats, /healthz and /readyz.

The first tests drive the recorder and the server in this process with made-up
batches; the last ones run ``digitstream run`` as a process and check that
what it reports matches what was sent.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from digitstream.addresses import Address
from digitstream.app import AppConfig, Application
from digitstream.batch import BatchResult
from digitstream.metrics.prometheus import make_registry, render
from digitstream.metrics.recorder import LATENCY_EDGES, Histogram, Metrics
from digitstream.metrics.server import STATIC_DIR, MetricsServer
from digitstream.metrics.stats import stats_document
from helpers import HOST, http_get, send_bytes, wait_for

STAGES = ["decode", "PCA", "Logistic Regression", "encode"]


def make_result(n, worker="", rejected=None, labels=None, predicted=None):
    stage_seconds = [("decode", 1e-5), ("PCA", 2e-4), ("Logistic Regression", 3e-4), ("encode", 5e-5)]
    counts = np.bincount(np.arange(n) % 10, minlength=10)
    result = BatchResult(stream=1, first_seq=0, count=n, output=b"x" * (7 * n),
                         stage_seconds=stage_seconds, class_counts=counts,
                         rejected=Counter(rejected or {}), worker=worker)
    if labels is not None:
        pairs = [(str(t), str(p)) for t, p in zip(labels, predicted)]
        result.labelled = len(pairs)
        result.correct = sum(t == p for t, p in pairs)
        result.confusion = Counter(pairs)
    return result


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family, name=None, **labels):
    return [s for s in family.samples if (name is None or s.name == name)
            and all(s.labels.get(k) == v for k, v in labels.items())]


def check_histograms(family):
    """Buckets rise with ``le``, and the +Inf bucket equals ``_count``, per label set."""
    series: dict = {}
    for s in family.samples:
        key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
        entry = series.setdefault(key, {"buckets": [], "count": None})
        if s.name.endswith("_bucket"):
            entry["buckets"].append((float(s.labels["le"]), s.value))
        elif s.name.endswith("_count"):
            entry["count"] = s.value
    assert series, f"{family.name} has no series"
    for key, entry in series.items():
        buckets = sorted(entry["buckets"])
        values = [v for _, v in buckets]
        assert values == sorted(values), f"{family.name}{key}: buckets not cumulative"
        assert buckets[-1][0] == float("inf")
        assert buckets[-1][1] == entry["count"], f"{family.name}{key}: +Inf != _count"
    return series


# ------------------------------------------------------------------ recorder
def test_latency_buckets_span_1us_to_10s_finely_enough_for_p999():
    assert LATENCY_EDGES[0] == pytest.approx(1e-6)
    assert LATENCY_EDGES[-1] == pytest.approx(10.0)
    ratios = np.array(LATENCY_EDGES[1:]) / np.array(LATENCY_EDGES[:-1])
    assert ratios.max() < 1.06

    rng = np.random.default_rng(0)
    values = rng.lognormal(mean=np.log(2e-4), sigma=1.5, size=50_000)
    hist = Histogram()
    for v in values:
        hist.observe(float(v))
    for q in (0.5, 0.95, 0.99, 0.999):
        assert hist.quantile(q) == pytest.approx(np.quantile(values, q), rel=0.06), q
    assert hist.count == len(values)
    assert hist.max == pytest.approx(values.max())


def test_histogram_extremes_and_batches_of_observations():
    hist = Histogram()
    assert hist.quantile(0.5) is None
    hist.observe(1e-9, 10)  # faster than the first bucket
    hist.observe(100.0, 1)  # slower than the last
    assert hist.count == 11
    assert hist.counts[0] == 10 and hist.counts[-1] == 1
    assert hist.quantile(0.5) <= 1e-6
    assert hist.quantile(1.0) == 100.0


def test_class_counts_add_up_over_many_batches_read_at_any_moment():
    from digitstream.metrics.recorder import FOLD_BATCHES

    m = Metrics("app", STAGES, range(10))
    expected = np.zeros(10, dtype=np.int64)
    for i in range(3 * FOLD_BATCHES + 7):
        result = make_result(1 + i % 50)
        m.batch_done(result, 0.001)
        expected += result.class_counts
        if i in (5, FOLD_BATCHES - 1, FOLD_BATCHES, 2 * FOLD_BATCHES + 3):
            assert m.snapshot().class_counts == expected.tolist(), i
        if i % 97 == 0:
            m.sample()
    assert len(m._pending_class_counts) < FOLD_BATCHES
    assert m.snapshot().class_counts == expected.tolist()
    # counts of another width (a batch of a model with other classes) are left out
    odd = make_result(5)
    odd.class_counts = np.ones(3, dtype=np.int64)
    m.batch_done(odd, 0.001)
    assert m.class_counts.tolist() == expected.tolist()


def test_batch_done_counts_every_message_of_a_batch():
    m = Metrics("app", STAGES, range(10))
    m.connection_opened()
    m.frames_received(300, 300 * 64)
    m.batch_done(make_result(100), 0.002)
    m.batch_done(make_result(200, worker="dask-1", rejected={"bad_size": 3}), 0.004)
    m.worker_event("dask-2", "joined")
    m.worker_event("dask-1", "lost")
    s = m.snapshot()
    assert (s.messages_in, s.messages_out, s.batches, s.bytes_in) == (300, 300, 2, 300 * 64)
    assert s.bytes_out == 7 * 300
    assert s.rejected == {"bad_size": 3}
    assert sum(s.class_counts) == 300
    workers = {w.name: w for w in s.workers}
    assert workers["app"].messages == 100 and workers["dask-1"].messages == 200
    assert workers["dask-1"].state == "lost" and workers["dask-2"].state == "active"
    assert s.latency().count == 300
    assert s.latency().quantile(0.99) == pytest.approx(0.004, rel=0.05)
    assert [name for name in s.stages()] == STAGES
    assert all(h.count == 300 for h in s.stages().values())
    assert [e["event"] for e in s.worker_events] == ["joined", "joined", "joined", "lost"]


def test_history_is_one_sample_per_interval_with_rates():
    now = [1000.0]
    m = Metrics("app", STAGES, range(10), clock=lambda: now[0])
    assert m.sample() is None  # the first call only starts the interval
    m.frames_received(500, 500)
    m.batch_done(make_result(500), 0.001)
    now[0] += 2.0
    sample = m.sample()
    assert sample.messages_in == 250 and sample.messages_out == 250
    assert sample.latency_p50 == pytest.approx(0.001, rel=0.05)
    assert sample.workers == {"app": 250}
    now[0] += 1.0
    assert m.sample().messages_out == 0
    snapshot = m.snapshot()
    assert len(snapshot.history) == 2
    # the dashboard asks only for the seconds after the last one it has
    assert stats_document(snapshot, {}, since=1002.0)["history"]["t"] == [1003.0]
    assert stats_document(snapshot, {}, window=1)["history"]["out_per_s"] == [0.0]
    assert stats_document(snapshot, {})["history"]["workers"] == {"app": [250.0, 0.0]}


def test_live_accuracy_and_confusion():
    m = Metrics("app", STAGES, range(10))
    m.batch_done(make_result(4, labels=[1, 2, 3, 3], predicted=[1, 2, 3, 8]), 0.001)
    doc = stats_document(m.snapshot(), {})
    accuracy = doc["accuracy"]
    assert (accuracy["labelled"], accuracy["correct"], accuracy["accuracy"]) == (4, 3, 0.75)
    labels = accuracy["confusion"]["labels"]
    matrix = accuracy["confusion"]["matrix"]
    assert matrix[labels.index("3")][labels.index("8")] == 1
    assert matrix[labels.index("3")][labels.index("3")] == 1
    assert sum(map(sum, matrix)) == 4


# ---------------------------------------------------------------- /metrics
def test_prometheus_text_has_consistent_counters_and_histograms():
    m = Metrics("app", STAGES, range(10))
    m.frames_received(1000, 64_000)
    for n, worker in ((100, ""), (300, "dask-1"), (600, "dask-1")):
        m.batch_done(make_result(n, worker=worker, rejected={"bad_size": 1}), 0.003)
    parsed = families(render(make_registry(m, {"dataset": "digits", "held_out_accuracy": 0.97,
                                               "steps": ["PCA", "Logistic Regression"]})).decode())
    messages = parsed["digitstream_messages"]
    assert samples(messages, stage="source")[0].value == 1000
    assert sum(s.value for s in samples(messages, stage="sink")) == 1000
    for stage in STAGES:
        assert sum(s.value for s in samples(messages, stage=stage)) == 1000
    latency = check_histograms(parsed["digitstream_latency_seconds"])
    assert {dict(k)["stage"] for k in latency} == {"end_to_end", *STAGES}
    assert {dict(k)["worker"] for k in latency} == {"app", "dask-1"}
    e2e = samples(parsed["digitstream_latency_seconds"], "digitstream_latency_seconds_count",
                  stage="end_to_end", worker="dask-1")
    assert e2e[0].value == 900
    sizes = check_histograms(parsed["digitstream_batch_size"])
    assert sum(e["count"] for e in sizes.values()) == 3
    assert samples(parsed["digitstream_rejected"], reason="bad_size")[0].value == 3
    assert samples(parsed["digitstream_batches"], worker="dask-1")[0].value == 2
    assert sum(s.value for s in parsed["digitstream_predictions"].samples) == 1000
    for name in ("digitstream_connections_open", "digitstream_connections",
                 "digitstream_received_bytes", "digitstream_sent_bytes", "digitstream_ready",
                 "digitstream_model_info", "digitstream_model_held_out_accuracy", "process_cpu_seconds"):
        assert name in parsed, name
    assert samples(parsed["digitstream_model_info"])[0].labels["steps"] == "PCA,Logistic Regression"


def test_swaps_and_refused_swaps_are_counted_in_stats_and_prometheus():
    m = Metrics("app", STAGES, range(10))
    doc = stats_document(m.snapshot(), {})
    assert (doc["model_swaps_total"], doc["model_swaps_refused"]) == (0, 0)
    assert doc["last_swap_refused"] is None and doc["swap_refusals"] == []

    m.model_swap_refused(1000.0, "it takes 32 features, the model serving takes 64")
    m.model_swapped(1001.0, "sha256:aa", "sha256:bb", {1: 42}, STAGES)
    m.model_swap_refused(1002.5, "untrusted type x.Doubler")
    doc = stats_document(m.snapshot(), {})
    assert doc["model_swaps_total"] == 1 and len(doc["model_swaps"]) == 1
    assert doc["model_swaps_refused"] == 2
    assert doc["last_swap_refused"] == {"time": 1002.5, "reason": "untrusted type x.Doubler"}
    assert doc["swap_refusals"] == [
        {"time": 1000.0, "reason": "it takes 32 features, the model serving takes 64"},
        {"time": 1002.5, "reason": "untrusted type x.Doubler"}]
    for i in range(150):  # the list keeps the last 100, the count all of them
        m.model_swap_refused(2000.0 + i, f"refusal {i}")
    doc = stats_document(m.snapshot(), {})
    assert doc["model_swaps_refused"] == 152 and len(doc["swap_refusals"]) == 100
    assert doc["swap_refusals"][0]["reason"] == "refusal 50"
    assert doc["last_swap_refused"] == doc["swap_refusals"][-1] == {"time": 2149.0,
                                                                    "reason": "refusal 149"}
    json.dumps(doc, allow_nan=False)

    parsed = families(render(make_registry(m)).decode())
    assert samples(parsed["digitstream_model_swaps"], "digitstream_model_swaps_total")[0].value == 1
    assert samples(parsed["digitstream_model_swaps_refused"],
                   "digitstream_model_swaps_refused_total")[0].value == 152


# ------------------------------------------------------- the server in-process
def run_info() -> dict:
    return {"engine": "local", "cluster": None, "input_format": "u8", "output_format": "text",
            "addresses": {"in": f"{HOST}:8002", "out": f"{HOST}:7002"}}


CARD = {"dataset": "digits", "held_out_accuracy": 0.97, "steps": ["PCA", "Logistic Regression"]}


def serve(metrics: Metrics, scenario):
    """Run ``scenario(base_url)`` (blocking HTTP calls) against a MetricsServer on ``metrics``."""
    async def main():
        server = MetricsServer(metrics, Address(HOST, 0), info=run_info, card=lambda: CARD)
        await server.start()
        try:
            return await asyncio.to_thread(scenario, server.url.rstrip("/"))
        finally:
            await server.stop()
    return asyncio.run(main())


def request(url: str, method: str) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method, data=b"x"),
                                    timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


#: the top-level fields of /api/stats, as documented in stats_document's docstring
STATS_FIELDS = {"name", "version", "status", "ready", "now", "started_at", "uptime_seconds",
                "engine", "input_format", "output_format", "addresses", "pipeline", "messages",
                "bytes", "throughput", "latency", "batches", "rejected", "connections", "workers",
                "worker_events", "classes", "accuracy", "model", "model_swaps", "model_swaps_total",
                "model_swaps_refused", "last_swap_refused", "swap_refusals", "history",
                "cluster", "connectors", "pipeline_loaded", "drift", "estimated_accuracy", "labels",
                "shadow"}


def test_stats_fields_are_the_documented_ones():
    documented = set(re.findall(r"^    - ``(\w+)``", stats_document.__doc__, re.M))
    documented |= set(re.findall(r"^    - ``\w+``: .*?; ``(\w+)``", stats_document.__doc__, re.M))
    m = Metrics("app", STAGES, range(10))
    m.batch_done(make_result(10), 0.001)
    doc = stats_document(m.snapshot(), {})
    assert set(doc) == STATS_FIELDS
    for name in STATS_FIELDS:
        assert f"``{name}``" in stats_document.__doc__, f"{name} is not documented"
    assert documented <= STATS_FIELDS
    json.dumps(doc, allow_nan=False)


def test_readyz_follows_start_up_and_stopping_and_everything_is_read_only():
    m = Metrics("app", STAGES, range(10))

    def scenario(base):
        seen = {"starting": http_get(base + "/readyz"), "health": http_get(base + "/healthz")}
        m.ready = True
        seen["ready"] = http_get(base + "/readyz")
        seen["stats"] = http_get(base + "/api/stats")
        seen["methods"] = {(path, method): request(base + path, method)
                           for path in ("/", "/metrics", "/api/stats", "/readyz", "/nowhere")
                           for method in ("POST", "PUT", "DELETE", "PATCH")}
        seen["bad window"] = http_get(base + "/api/stats?window=x")[0]
        m.ready = False  # what the application does when it starts stopping
        seen["stopping"] = http_get(base + "/readyz")
        seen["health stopping"] = http_get(base + "/healthz")
        return seen

    seen = serve(m, scenario)
    assert seen["starting"][0] == 503 and json.loads(seen["starting"][1])["status"] == "starting"
    assert seen["health"][0] == 200
    assert seen["ready"][0] == 200
    assert seen["stopping"][0] == 503 and json.loads(seen["stopping"][1])["status"] == "stopping"
    assert seen["health stopping"][0] == 200
    assert set(seen["methods"].values()) == {405}, seen["methods"]
    assert seen["bad window"] == 400
    stats = json.loads(seen["stats"][1])
    assert stats["status"] == "ready" and stats["model"]["dataset"] == "digits"


def test_dashboard_assets_are_served_by_the_package_only():
    m = Metrics("app", STAGES, range(10))
    index = (STATIC_DIR / "index.html").read_text()
    links = re.findall(r'(?:src|href)="([^"]+)"', index)
    assert links and all(link.startswith("/") and not link.startswith("//") for link in links), links
    for name in ("dashboard.js", "dashboard.css"):
        assert "http://" not in (STATIC_DIR / name).read_text()
        assert "https://" not in (STATIC_DIR / name).read_text()
    assert (STATIC_DIR / "uPlot.LICENSE").exists()

    def scenario(base):
        return {link: http_get(base + link)[0] for link in ["/", *links]} | {
            "/static/../server.py": http_get(base + "/static/../server.py")[0]}

    statuses = serve(m, scenario)
    assert statuses.pop("/static/../server.py") == 404
    assert statuses.pop("/readyz") == 503  # linked from the page; the fake is not ready
    assert set(statuses.values()) == {200}, statuses


# ------------------------------------------------------- the application
def u8_frames(digits, repeat: int = 1) -> tuple[bytes, int]:
    from digitstream.tools.sender import build_frames

    framed = build_frames(digits, "u8")
    return bytes(framed.data) * repeat, len(framed) * repeat


def test_metrics_match_what_was_sent(start_app, collector, digits):
    app = start_app(collector.port, "--input-format", "u8")
    data, n = u8_frames(digits, repeat=3)
    half = (n // 2) * (4 + 64)
    bad = (3).to_bytes(4, "big") + b"abc"  # a payload of the wrong size: rejected, answered
    send_bytes(app.in_port, data[:half])
    send_bytes(app.in_port, data[half:] + bad)
    collector.wait_count(n + 1)

    def settled():
        stats = app.stats()
        return stats if stats["messages"]["out"] == n + 1 and stats["connections"]["open"] == 0 else None
    stats = wait_for(settled, 10, what="the metrics to count every message")

    status, body = http_get(app.metrics_url + "/metrics")
    assert status == 200
    parsed = families(body.decode())
    messages = parsed["digitstream_messages"]
    # the seed's model is linear, so it may be served fused as one "PCA + Logistic Regression" stage
    pipeline = stats["pipeline"]
    assert pipeline[0] == "decode" and pipeline[-1] == "encode"
    assert "PCA" in " ".join(pipeline) and "Logistic Regression" in " ".join(pipeline)
    for stage in ("source", *pipeline, "sink"):
        assert sum(s.value for s in samples(messages, stage=stage)) == n + 1, stage
    latency = check_histograms(parsed["digitstream_latency_seconds"])
    for key, entry in latency.items():
        assert entry["count"] == n + 1, key
    sizes = check_histograms(parsed["digitstream_batch_size"])
    assert sum(s.value for s in samples(parsed["digitstream_batch_size"], "digitstream_batch_size_sum")) == n + 1
    assert sum(e["count"] for e in sizes.values()) == stats["batches"]["count"]
    assert sum(s.value for s in parsed["digitstream_rejected"].samples) == 1
    assert sum(s.value for s in parsed["digitstream_predictions"].samples) == n
    assert samples(parsed["digitstream_connections"])[0].value == 2
    assert samples(parsed["digitstream_connections_open"])[0].value == 0
    assert samples(parsed["digitstream_ready"])[0].value == 1

    assert set(stats) == STATS_FIELDS
    assert stats["messages"] == {"in": n + 1, "out": n + 1, "in_flight": 0, "rejected": 1}
    assert sum(stats["classes"]["counts"]) == n
    e2e = stats["latency"]["end_to_end"]
    assert e2e["count"] == n + 1 and 0 < e2e["p50"] <= e2e["p99"] <= e2e["p99_9"] <= e2e["max"]
    assert list(stats["latency"]["stages"]) == stats["pipeline"]
    assert stats["model"], "the model card is missing"


def test_health_and_readiness_through_start_up_and_shutdown(start_app, collector, digits):
    app = start_app(collector.port, "--input-format", "u8", ready=False)
    assert app.proc.poll() is None
    app.wait_ready()
    assert http_get(app.metrics_url + "/healthz")[0] == 200
    assert http_get(app.metrics_url + "/readyz")[0] == 200

    # a sender that keeps talking holds the application in its drain on SIGTERM
    data, n = u8_frames(digits)
    frame = data[: 4 + 64]
    sock = send_bytes(app.in_port, frame, close=False)
    collector.wait_count(1)
    stop = threading.Event()

    def trickle():
        while not stop.is_set():
            try:
                sock.sendall(frame)
            except OSError:
                return
            time.sleep(0.02)
    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        app.signal(signal.SIGTERM)
        status, body = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(
            http_get(app.metrics_url + "/readyz")), 5, what="/readyz to answer 503 while stopping")
        assert json.loads(body)["status"] == "stopping"
        assert http_get(app.metrics_url + "/healthz")[0] == 200
    finally:
        stop.set()
        sender.join(timeout=5)
        sock.close()
    assert app.wait(timeout=20) == 0
    with pytest.raises(OSError):
        http_get(app.metrics_url + "/healthz", timeout=1)


def test_metrics_ui_off_loopback_warns_and_no_metrics_records_nothing(model_dir, collector, caplog):
    async def start_and_stop(metrics_addr):
        app = Application(AppConfig(in_addr=Address(HOST, 0), out_addr=Address(HOST, collector.port),
                                    metrics_addr=metrics_addr, model_path=str(model_dir)))
        await app.start()
        try:
            return app.metrics, app.metrics_server
        finally:
            await app.shutdown()

    assert AppConfig().metrics_addr.host == "127.0.0.1"
    caplog.set_level("WARNING")
    metrics, server = asyncio.run(start_and_stop(Address(HOST, 0)))
    assert metrics is not None and server is not None
    assert "metrics UI is bound" not in caplog.text
    metrics, server = asyncio.run(start_and_stop(Address("0.0.0.0", 0)))
    assert server is not None
    assert "the metrics UI is bound to 0.0.0.0" in caplog.text
    metrics, server = asyncio.run(start_and_stop(None))  # what --no-metrics gives
    assert metrics is None and server is None


@pytest.mark.parametrize(
    "classes, labels",
    [
        (np.arange(10), [3, 7, None, 10, -1, 2**70, 2**63, True, 3.0, "3", "x", 0] * 5),
        (np.arange(10), list(range(10)) * 7),
        (np.array([5, 2, 9]), [9, 2, 5, 4, None] * 4),
        (np.array(["cat", "dog"]), ["cat", "dog", "Cat", None, 1] * 3),
    ],
)
def test_live_accuracy_counts_labels_as_their_text(classes, labels):
    """Flow._score: a true label is str(label), OTHER_LABEL when no class has that text,
    and frames without a label or with an error are not scored."""
    from digitstream.pipeline import OTHER_LABEL, Flow

    class Runner:
        n_features = 1
        stage_names = ()

    Runner.classes = classes
    flow = Flow(Runner(), "json", "json")
    predicted = np.arange(len(labels)) % len(classes)
    errors = {1: "bad json: x"}
    result = make_result(len(labels))
    flow._score(result, labels, predicted, errors)
    texts = [str(c) for c in classes]
    expected = Counter(
        (str(t) if str(t) in texts else OTHER_LABEL, texts[p])
        for i, (t, p) in enumerate(zip(labels, predicted))
        if t is not None and i not in errors
    )
    assert result.confusion == expected
    assert result.labelled == sum(expected.values())
    assert result.correct == sum(n for (t, p), n in expected.items() if t == p)
