"""The dashboard in a real browser (Debian's chromium, headless) while a stream flows."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

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


def test_dashboard_shows_the_live_stream(start_app, collector, digits):
    from playwright.sync_api import sync_playwright

    from digitstream.tools.sender import build_frames

    app = start_app(collector.port, "--input-format", "json")
    # json frames carry the true label, so the page has live accuracy to show too
    sender = PacedSender(app.in_port, build_frames(digits, "json"), per_second=5000)
    sender.start()
    ARTIFACTS.mkdir(exist_ok=True)
    outside: list[str] = []
    problems: list[str] = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1440, "height": 1000})
                page.on("request", lambda r: None if r.url.startswith(app.metrics_url)
                        else outside.append(r.url))
                page.on("pageerror", lambda e: problems.append(str(e)))
                page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
                page.goto(app.metrics_url + "/")

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
                browser.close()
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
