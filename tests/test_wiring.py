"""The application's wiring (source -> engine -> sink) on the in-memory parts of
digitstream.testing: order per stream, several streams, and every frame answered
whatever fails inside: decode, the model, encode, the engine, the sink."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.pipeline import Pipeline

from digitstream.app import Application
from digitstream.batch import BatchResult
from digitstream.codecs.inputs import encode_images
from digitstream.config import AppConfig
from digitstream.sinks import QueuedSink
from digitstream.testing import MemorySink, MemorySource, memory_bundle, run_in_memory
from helpers import TIMEOUT


@pytest.fixture(scope="module")
def seed_texts(seed_pipeline, digits):
    return [str(np.array([c])) for c in seed_pipeline.predict(digits.X)]


def test_streams_are_answered_in_their_own_order(seed_pipeline, digits, seed_texts):
    u8 = encode_images(digits.X, "u8")
    source = MemorySource({1: u8, 2: u8[::-1], "named": u8[:77]}, max_batch=50, read_size=33)
    sink = MemorySink()
    assert asyncio.run(run_in_memory(seed_pipeline, source, sink, input_format="u8")) == 0
    assert sink.texts(1) == seed_texts
    assert sink.texts(2) == seed_texts[::-1]
    assert sink.texts("named") == seed_texts[:77]
    assert source.acknowledged == {1: len(u8), 2: len(u8), "named": 77}


def test_a_sink_that_fails_is_tried_again_and_nothing_is_skipped(seed_pipeline, digits,
                                                                 seed_texts):
    failures = iter([True, True, False] * 1000)
    sink = MemorySink(fail=lambda result: next(failures))
    source = MemorySource({1: encode_images(digits.X, "u8")}, max_batch=100)
    assert asyncio.run(run_in_memory(seed_pipeline, source, sink, input_format="u8")) == 0
    assert sink.failures >= 2 * 17
    assert sink.texts(1) == seed_texts


def test_a_stream_that_breaks_has_what_came_before_answered(seed_pipeline, digits, seed_texts):
    u8 = encode_images(digits.X, "u8")
    source = MemorySource({1: u8, 2: u8}, max_batch=64, read_size=10, fail_after={1: 123})
    sink = MemorySink()
    assert asyncio.run(run_in_memory(seed_pipeline, source, sink, input_format="u8")) == 0
    assert sink.texts(1) == seed_texts[:123]
    assert sink.texts(2) == seed_texts


class BrokenSink(QueuedSink):
    """A queued sink whose deliver() fails with an error it does not retry, after ``good``
    results: a sink that can deliver nothing more."""

    guarantee = "at most once: in memory"

    def __init__(self, good: int):
        super().__init__("a broken sink")
        self.good = good
        self.taken: list[BatchResult] = []

    build = classmethod(lambda cls, *args: None)

    def describe(self) -> str:
        return "broken"

    async def deliver(self, results):
        if len(self.taken) >= self.good:
            raise ValueError("the sink's peer is gone for good")
        self.taken += results


def test_a_sink_that_fails_for_good_stops_the_run_with_exit_status_1(seed_pipeline, digits,
                                                                      caplog):
    """deliver() raises what the sink does not retry: the run logs why and stops (exit status
    1), rather than serve on with a sink that takes nothing more."""
    sink = BrokenSink(good=3)
    source = MemorySource({1: encode_images(digits.X, "u8")}, max_batch=100)

    async def run() -> int:
        config = AppConfig(metrics_addr=None, model_poll=0, input_format="u8", flush_timeout=1.0)
        app = Application(config, source=source, sink=sink, bundle=memory_bundle(seed_pipeline))
        await app.start()
        return await asyncio.wait_for(app.serve_until_stopped(), TIMEOUT)  # stops by itself

    assert asyncio.run(run()) == 1
    assert "sink broken failed: the sink's peer is gone for good" in caplog.text
    taken = sum(r.count for r in sink.taken)
    assert 300 <= taken < len(digits.X)
    assert f"{len(digits.X) - taken} results not delivered" in caplog.text


class Faulty(TransformerMixin, BaseEstimator):
    """A step that raises on any row whose first feature is 13 (and passes the rest)."""

    def fit(self, X, y=None):
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X):
        if np.any(X[:, 0] == 13):
            raise ArithmeticError("row with 13 first")
        return X


@pytest.fixture(scope="module")
def faulty_pipeline(seed_pipeline, digits):
    steps = [("Faulty", Faulty().fit(digits.X)), *seed_pipeline.steps]
    return Pipeline(steps)


def test_rows_the_model_fails_on_are_answered_with_the_reason_the_rest_with_their_class(
        faulty_pipeline, seed_pipeline, digits, seed_texts):
    X = digits.X[:500].copy()
    bad = [0, 7, 8, 250, 499]
    X[bad, 0] = 13
    source = MemorySource({1: encode_images(X, "f64")}, max_batch=500, read_size=500)
    sink = MemorySink()
    assert asyncio.run(run_in_memory(faulty_pipeline, source, sink, input_format="f64")) == 0
    texts = sink.texts(1)
    good = [str(np.array([c])) for c in seed_pipeline.predict(X)]
    for i, text in enumerate(texts):
        if i in bad:
            assert text == "error: model failed: row with 13 first"
        else:
            assert text == good[i]
    assert sum(r.rejected["model"] for r in sink.results) == len(bad)


class FailingEncoder:
    """Wraps an encoder so that it raises for batches holding a sequence number in ``bad``."""

    def __init__(self, inner, bad: set[int]):
        self.inner, self.bad = inner, bad
        self.wants_confidence = inner.wants_confidence

    def encode(self, first_seq, class_index, confidence, errors, ids=None):
        if any(first_seq <= s < first_seq + len(class_index) for s in self.bad):
            raise UnicodeError("cannot encode this one")
        return self.inner.encode(first_seq, class_index, confidence, errors, ids)

    def error_frames(self, first_seq, count, reason, ids=None):
        return self.inner.error_frames(first_seq, count, reason, ids)


@settings(max_examples=25, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_frames_out_equal_frames_in_whatever_fails(data, faulty_pipeline, digits):
    """Random streams, batch sizes and reads, with failures injected in decode (bad payloads),
    the model (rows it raises on), encode (batches it raises on) and the sink (writes that
    raise): every stream gets exactly one answer per frame, in order."""
    from digitstream import pipeline as pipeline_module

    n_streams = data.draw(st.integers(1, 3), label="streams")
    streams, expected_errors = {}, {}
    for s in range(n_streams):
        n = data.draw(st.integers(1, 300), label=f"frames of stream {s}")
        rows = data.draw(st.lists(st.integers(0, len(digits.X) - 1), min_size=n, max_size=n))
        X = digits.X[rows].copy()
        model_bad = data.draw(st.sets(st.integers(0, n - 1), max_size=5))
        X[list(model_bad), 0] = 13
        payloads = encode_images(X, "f64")
        decode_bad = data.draw(st.sets(st.integers(0, n - 1), max_size=5)) - model_bad
        for i in decode_bad:
            payloads[i] = payloads[i][:-3]
        streams[s] = payloads
        expected_errors[s] = (model_bad, decode_bad)
    encode_bad = data.draw(st.sets(st.integers(0, 299), max_size=3), label="encode fails at")
    sink_fails = data.draw(st.lists(st.booleans(), max_size=20), label="sink failures")
    fail_iter = iter(sink_fails)
    source = MemorySource(streams, max_batch=data.draw(st.integers(1, 128), label="max batch"),
                          read_size=data.draw(st.integers(1, 200), label="read size"))
    sink = MemorySink(fail=lambda result: next(fail_iter, False))

    real_build = pipeline_module.Flow.build.__func__

    def build(cls, pipeline, options, profile=None):
        flow = real_build(cls, pipeline, options, profile)
        flow.encoder = FailingEncoder(flow.encoder, encode_bad)
        return flow

    pipeline_module.Flow.build = classmethod(build)
    try:
        status = asyncio.run(run_in_memory(faulty_pipeline, source, sink, input_format="f64"))
    finally:
        pipeline_module.Flow.build = classmethod(real_build)
    assert status == 0
    for s, payloads in streams.items():
        texts = sink.texts(s)
        assert len(texts) == len(payloads), (s, len(texts), len(payloads))
        model_bad, decode_bad = expected_errors[s]
        for i, text in enumerate(texts):
            # the stages run in order: a row the model fails on never reaches encode
            if i in model_bad:
                assert text == "error: model failed: row with 13 first", (i, text)
            elif i in encode_bad:
                assert text == "error: encode failed: cannot encode this one", (i, text)
            elif i in decode_bad:
                assert text.startswith("error: expected 512 bytes"), (i, text)
            else:
                assert text.startswith("[") and text.endswith("]"), (i, text)
        seqs = [(r.first_seq, r.end_seq) for r in sink.results if r.stream == s]
        assert seqs == [(a, b) for a, b in zip([0] + [e for _, e in seqs[:-1]],
                                                [e for _, e in seqs])]


class BrokenEngine:
    """An engine whose futures raise for every other batch."""

    name = "broken"
    capacity = 2

    def __init__(self, flow):
        self.flow, self.calls = flow, 0

    async def start(self):
        pass

    async def close(self):
        pass

    async def set_flow(self, flow, bundle):
        self.flow = flow

    def state(self):
        return None

    async def submit(self, batch):
        self.calls += 1
        future = asyncio.get_running_loop().create_future()
        if self.calls % 2:
            future.set_exception(RuntimeError("lost in the cluster"))
        else:
            future.set_result(self.flow.process(batch))
        return future


def test_an_engine_that_raises_still_gets_every_frame_of_its_batch_answered(
        seed_pipeline, digits, seed_texts, monkeypatch):
    from digitstream.engine import base

    monkeypatch.setattr(base, "make_engine", lambda name, flow, bundle, options, metrics=None:
                        BrokenEngine(flow))
    monkeypatch.setattr("digitstream.app.make_engine", base.make_engine)
    source = MemorySource({1: encode_images(digits.X[:400], "u8")}, max_batch=100, read_size=400)
    sink = MemorySink()
    assert asyncio.run(run_in_memory(seed_pipeline, source, sink, input_format="u8")) == 0
    texts = sink.texts(1)
    assert texts[:100] == ["error: engine failed: lost in the cluster"] * 100
    assert texts[100:200] == seed_texts[100:200]
    assert texts[200:300] == ["error: engine failed: lost in the cluster"] * 100
    assert sum(r.rejected["engine"] for r in sink.results) == 200
