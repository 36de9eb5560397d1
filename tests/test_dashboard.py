"""The dashboard in a real browser (Debian's chromium, headless) while a stream flows."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")


class PacedSender(threading.Thread):
    """Sends frames over one connection, a slice every 20 ms, until stopped."""

    def __init__(self, port: int, framed, per_second: int):
        super().__init__(daemon=True)
        from helpers import send_bytes

        self.sock = send_bytes(port, b"", close=False)
        self.framed = framed
        self.per_tick = max(1, per_second // 50)
        self.sent = 0
        self.error: Exception | None = None
        self._halt = threading.Event()

    def run(self):
        n = len(self.framed)
        position = 0
        try:
            while not self._halt.is_set():
                stop = min(position + self.per_tick, n)
                self.sock.sendall(self.framed.slice(position, stop).data)
                self.sent += stop - position
                position = 0 if stop == n else stop
                self._halt.wait(0.02)
        except OSError as exc:
            self.error = exc

    def stop(self):
        self._halt.set()
        self.join(timeout=5)
        self.sock.close()


@contextlib.contextmanager
def dashboard_page(url: str, problems: list[str], outside: list[str] | None = None):
    """The dashboard at ``url`` open in headless Chromium. Page errors and console
    errors go to ``problems``; with ``outside``, the URL of every request not to
    ``url``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            if outside is not None:
                page.on("request", lambda r: None if r.url.startswith(url)
                        else outside.append(r.url))
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.goto(url + "/")
            yield page
        finally:
            browser.close()


def test_dashboard_shows_the_live_stream(start_app, collector, digits):
    from digitstream.tools.sender import build_frames

    app = start_app(collector.port, "--input-format", "json")
    # json frames carry the true label, so the page has live accuracy to show too
    sender = PacedSender(app.in_port, build_frames(digits, "json"), per_second=5000)
    sender.start()
    ARTIFACTS.mkdir(exist_ok=True)
    outside: list[str] = []
    problems: list[str] = []
    try:
        with dashboard_page(app.metrics_url, problems, outside) as page:
            # the throughput tile shows the last whole second, so allow a few
            page.wait_for_function(
                "() => parseFloat(document.getElementById('throughput-now').textContent) > 0",
                timeout=15_000)
            page.wait_for_function(
                "() => document.getElementById('latency-table').textContent.includes('Logistic Regression')",
                timeout=5_000)
            time.sleep(1.5)  # a few more points on the charts for the screenshot
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            throughput = page.inner_text("#throughput-now")
            stage_table = page.inner_text("#latency-table")
            pipeline = page.inner_text("#pipeline")
            p99 = page.inner_text("#latency-p99")
            accuracy = page.inner_text("#accuracy")
            status = page.inner_text("#status")
            model_card = page.inner_text("#model-card")
            chart_canvases = page.locator("#chart-throughput canvas, #chart-latency canvas").count()
    finally:
        sender.stop()

    assert sender.error is None, sender.error
    assert float(re.match(r"[\d.]+", throughput).group()) > 0, throughput
    for stage in ("PCA", "Logistic Regression"):
        assert stage in stage_table and stage in pipeline
    assert re.fullmatch(r"\d+(\.\d+)? (µs|ms|s)", p99), p99
    assert re.search(r"\d+(\.\d+)? (µs|ms|s)", stage_table)
    assert accuracy.endswith("%"), accuracy
    assert status.strip().lower() == "ready"
    assert "digits" in model_card
    assert chart_canvases == 2
    assert not outside, f"the page fetched from elsewhere: {outside}"
    assert not problems, problems
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def test_dashboard_shows_model_swaps_and_marks_them_on_the_chart(
        start_app, collector, digits, model_dir, seed_pipeline, tmp_path):
    from sklearn.naive_bayes import GaussianNB
    from sklearn.pipeline import Pipeline

    from digitstream.model.bundle import CARD_FILE, PIPELINE_FILE, save_bundle
    from digitstream.tools.sender import build_frames

    def put_in_place(pipeline, card: dict, staging: Path) -> str:
        """Write a bundle into staging, then rename its files into the served directory,
        the card last; its content hash."""
        save_bundle(pipeline, staging, card)
        for name in (PIPELINE_FILE, CARD_FILE):
            os.replace(staging / name, bundle / name)
        return json.loads((bundle / CARD_FILE).read_text())["content_hash"]

    bundle = shutil.copytree(model_dir, tmp_path / "model")
    old_hash = json.loads((bundle / CARD_FILE).read_text())["content_hash"]
    # the seed's model answering (digit + 1) % 10: same features and classes, another hash
    shifted = copy.deepcopy(seed_pipeline)
    shifted[-1].coef_ = np.roll(shifted[-1].coef_, 1, axis=0)
    shifted[-1].intercept_ = np.roll(shifted[-1].intercept_, 1)

    app = start_app(collector.port, "--input-format", "u8", model=bundle)
    sender = PacedSender(app.in_port, build_frames(digits, "u8"), per_second=5000)
    sender.start()
    ARTIFACTS.mkdir(exist_ok=True)
    problems: list[str] = []
    text = "(id) => document.getElementById(id).textContent"
    try:
        with dashboard_page(app.metrics_url, problems) as page:
            page.wait_for_function(
                "() => document.getElementById('model-now').textContent === 'pca-logistic'",
                timeout=15_000)
            before = {name: page.evaluate(text, name) for name in
                      ("model-hash", "model-swaps", "model-refused", "model-last-swap")}
            marks_before = page.get_attribute("#chart-throughput", "data-swap-marks")

            # refused: a model that takes other images
            narrow = Pipeline([("Naive Bayes", GaussianNB())]).fit(digits.X[:, :32], digits.y)
            put_in_place(narrow, {"model": "narrow"}, tmp_path / "narrow")
            page.wait_for_function(
                "() => document.getElementById('model-refused').textContent === '1'",
                timeout=30_000)
            refused_event = page.inner_text("#model-events")
            # the refusal is marked on the throughput chart once it has a second past it
            page.wait_for_function(
                "() => document.getElementById('chart-throughput').dataset.refusedMarks === '1'",
                timeout=10_000)
            marks_refused = page.get_attribute("#chart-throughput", "data-swap-marks")
            still = page.inner_text("#model-now")

            # taken
            new_hash = put_in_place(shifted, {"dataset": "digits", "model": "shifted"},
                                    tmp_path / "shifted")
            page.wait_for_function(
                "() => document.getElementById('model-swaps').textContent === '1'",
                timeout=30_000)
            page.wait_for_function(
                "() => document.getElementById('model-now').textContent === 'shifted'",
                timeout=5_000)
            # the marker shows once the chart has a second past the swap
            page.wait_for_function(
                "() => document.getElementById('chart-throughput').dataset.swapMarks === '1'",
                timeout=10_000)
            page.screenshot(path=str(ARTIFACTS / "dashboard-swap.png"), full_page=True)
            after = {name: page.evaluate(text, name) for name in
                     ("model-hash", "model-swaps", "model-refused", "model-last-swap")}
            events = page.inner_text("#model-events")
            model_card = page.inner_text("#model-card")
    finally:
        sender.stop()

    assert sender.error is None, sender.error
    assert before == {"model-hash": old_hash[:len("sha256:") + 12], "model-swaps": "0",
                      "model-refused": "0", "model-last-swap": "no swap yet"}
    assert marks_before in (None, "0")
    assert marks_refused == "0"  # a refused bundle is not drawn as a swap
    assert still == "pca-logistic"
    assert "refused: it takes 32 features, the model serving takes 64" in refused_event
    assert after["model-hash"] == new_hash[:len("sha256:") + 12]
    assert (after["model-swaps"], after["model-refused"]) == ("1", "1")
    assert re.fullmatch(r"last swap \S.*", after["model-last-swap"]), after["model-last-swap"]
    assert f"swapped in {new_hash[:19]} (was {old_hash[:19]})" in events
    assert "refused" in events
    assert "shifted" in model_card
    assert not problems, problems


def test_dashboard_shows_drift_its_heat_map_and_the_shadow(start_app, collector, digits, tmp_path):
    """The model monitor's panel: the held-out digits, then the same digits moved one pixel
    to the right, with a shadow model beside the served one; the screenshot is
    test-artifacts/dashboard-monitor.png."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    from digitstream.datasets import Dataset
    from digitstream.model.bundle import save_bundle
    from digitstream.model.train import train_model
    from digitstream.monitor.profile import profile_of_split
    from digitstream.tools.sender import build_frames

    result = train_model(digits, "pca-logistic", quick=True)
    served = tmp_path / "served"
    save_bundle(result.pipeline, served, result.card,
                profile=profile_of_split(result.pipeline, result.split, digits.value_range,
                                         "digits"))
    other = Pipeline([("PCA", PCA(n_components=8, random_state=0)),
                      ("Logistic Regression", LogisticRegression(C=0.001, max_iter=2000))])
    other.fit(result.split.X_train, result.split.y_train)
    save_bundle(other, tmp_path / "shadow", {"model": "small-pca", "dataset": "digits"})

    held_out = Dataset("held-out", result.split.X_test, result.split.y_test, (0.0, 16.0))
    images = result.split.X_test.reshape(-1, 8, 8)
    moved = np.roll(images, 1, axis=2)
    moved[:, :, 0] = 0
    shifted = Dataset("shifted", moved.reshape(-1, 64), result.split.y_test, (0.0, 16.0))

    app = start_app(collector.port, "--input-format", "json", "--drift-window", "2000",
                    "--shadow", str(tmp_path / "shadow"), model=served)
    sender = PacedSender(app.in_port, build_frames(held_out, "json"), per_second=2000)
    sender.start()
    ARTIFACTS.mkdir(exist_ok=True)
    problems: list[str] = []
    try:
        with dashboard_page(app.metrics_url, problems) as page:
            page.wait_for_function(
                "() => document.getElementById('drift-state').textContent === 'no drift'"
                " && document.getElementById('drift-heat').dataset.cells === '64'",
                timeout=30_000)
            calm = page.inner_text("#drift-state")
            page.wait_for_function(
                "() => document.getElementById('shadow-facts').textContent.includes('% of')",
                timeout=30_000)
            sender.stop()
            sender = PacedSender(app.in_port, build_frames(shifted, "json"), per_second=2000)
            sender.start()
            page.wait_for_function(
                "() => document.getElementById('drift-state').textContent.startsWith('drift since')",
                timeout=30_000)
            time.sleep(2.5)  # a few more verdicts on the chart for the screenshot
            page.locator("#monitor").scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "dashboard-monitor.png"), full_page=True)
            heat_max = float(page.get_attribute("#drift-heat", "data-max"))
            tests = page.inner_text("#drift-tests")
            facts = page.inner_text("#monitor-facts")
            shadow = page.inner_text("#shadow-facts")
            matrix_cells = page.locator("#shadow-matrix td").count()
            charts = page.locator("#chart-drift canvas").count()
    finally:
        sender.stop()

    assert sender.error is None, sender.error
    assert calm.lower() == "no drift"
    assert heat_max > 0.3  # a moved digit lights its columns up
    assert all(name in tests for name in ("inputs", "classes", "confidence"))
    assert "not to be trusted while the inputs drift" in facts
    assert re.search(r"agreement\s+\d+\.\d\d% of [\d,]+ messages", shadow), shadow
    assert "served" in shadow and "shadow" in shadow
    assert matrix_cells == 100
    assert charts == 1
    assert not problems, problems
    assert (ARTIFACTS / "dashboard-monitor.png").stat().st_size > 10_000
