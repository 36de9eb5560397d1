"""The benchmark: its seed-design baseline, its relay, its latency arithmetic, and a
whole ``digitstream bench --quick`` run (every figure present; no speed asserted)."""

from __future__ import annotations

import itertools
import json
import pickle
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from digitstream.wire.framing import frame, frame_many
from helpers import HOST, wait_for


def _start(module: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def _listening_port(proc: subprocess.Popen) -> int:
    """The port a server started on port 0 listens on. The baseline and the relay do not say
    which port they bound, so it is read from the process's sockets."""
    import psutil

    process = psutil.Process(proc.pid)
    # psutil before 6.0 has only the older name
    connections = getattr(process, "net_connections", None) or process.connections

    def listening():
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}: {proc.stdout.read().decode()}")
        ports = [c.laddr.port for c in connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
        return ports[0] if ports else None
    return wait_for(listening, what="the server to listen")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=10)
    proc.stdout.close()


class _RawSink:
    """Accepts one connection and keeps every byte it receives."""

    def __init__(self):
        self.server = socket.create_server((HOST, 0))
        self.port = self.server.getsockname()[1]
        self.data = bytearray()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        conn, _ = self.server.accept()
        with conn:
            while chunk := conn.recv(1 << 16):
                with self._lock:
                    self.data += chunk

    def received(self) -> bytes:
        with self._lock:
            return bytes(self.data)

    def close(self):
        self.server.close()


# ------------------------------------------------------------------ baseline
def test_seed_classifier_matches_the_pipeline(seed_pipeline, digits):
    from digitstream.bench.baseline import SeedClassifier

    classify = SeedClassifier(seed_pipeline)
    for x in digits.X[:40]:
        assert classify(pickle.dumps(x)) == str(seed_pipeline.predict([x])).encode()


def test_baseline_server_answers_the_seed_way(model_dir, digits, expected_texts, collector):
    proc = _start("digitstream.bench.baseline", "--in", f"{HOST}:0",
                  "--out", collector.addr, "--model", str(model_dir))
    try:
        in_port = _listening_port(proc)
        n = 25
        with socket.create_connection((HOST, in_port), timeout=10) as sock:
            sock.sendall(frame_many(pickle.dumps(x) for x in digits.X[:n]))
        assert collector.wait_count(n) == expected_texts[:n]
        assert expected_texts[0] == "[0]"
    finally:
        _stop(proc)


# --------------------------------------------------------------------- relay
def test_relay_forwards_frames_byte_for_byte():
    rng = np.random.default_rng(7)
    payloads = [rng.integers(0, 256, size=int(size), dtype=np.uint8).tobytes()
                for size in rng.choice([0, 1, 3, 64, 64, 64, 700, 5000, 70_000], size=400)]
    data = frame_many(payloads)
    sink = _RawSink()
    proc = _start("digitstream.bench.relay", "--in", f"{HOST}:0", "--out", f"{HOST}:{sink.port}")
    try:
        in_port = _listening_port(proc)
        with socket.create_connection((HOST, in_port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # cut the stream inside headers and payloads alike
            cuts = np.unique(np.concatenate([[0, len(data)], rng.integers(0, len(data), 60)]))
            for start, stop in itertools.pairwise(cuts):
                sock.sendall(data[start:stop])
        wait_for(lambda: len(sink.received()) >= len(data), what="the relayed bytes")
        assert sink.received() == data
    finally:
        _stop(proc)
        sink.close()


def test_relay_holds_back_a_partial_frame_until_it_is_whole():
    from digitstream.bench.relay import forward

    sink = _RawSink()
    out = socket.create_connection((HOST, sink.port))
    a, b = socket.socketpair()
    thread = threading.Thread(target=forward, args=(b, out, threading.Lock()))
    thread.start()
    whole = frame(b"abcdef")
    a.sendall(whole[:5])
    a.sendall(whole[5:] + frame(b"x")[:2])
    a.close()
    thread.join(10)
    out.close()
    wait_for(lambda: len(sink.received()) >= len(whole), what="one frame")
    assert sink.received() == whole
    sink.close()


def test_a_system_whose_port_was_taken_is_started_again_elsewhere(tmp_path, monkeypatch):
    from digitstream.addresses import Address
    from digitstream.bench import systems

    taken = socket.create_server((HOST, 0))
    out = socket.create_server((HOST, 0))
    choices = iter([taken.getsockname()[1]])
    real_free_port = systems.free_port
    monkeypatch.setattr(systems, "free_port", lambda: next(choices, None) or real_free_port())
    relay = systems.System("relay_u8", "relay u8", "relay", "u8")
    started = systems.start_all([relay], Address(HOST, out.getsockname()[1]), tmp_path, tmp_path)
    try:
        assert started["relay_u8"].alive()
        assert started["relay_u8"].in_addr.port != taken.getsockname()[1]
    finally:
        started["relay_u8"].stop()
        taken.close()
        out.close()


# ------------------------------------------------------------------- figures
def test_latency_is_matched_per_message():
    from digitstream.tools.measure import as_timeline, latencies_ns, latency_summary

    # 3 writes of 2, 3 and 1 messages; reads complete messages 0-1, 2-4, then 5
    sent = as_timeline([(100, 2), (200, 5), (300, 6)])
    received = as_timeline([(150, 1), (180, 2), (260, 5), (900, 6)])
    assert latencies_ns(sent, received, 6).tolist() == [50, 80, 60, 60, 60, 600]
    summary = latency_summary(np.array([1_000_000] * 99 + [5_000_000]))
    assert summary["p50"] == 1.0 and summary["max"] == 5.0
    assert summary["cdf"][-1] == [5.0, 1.0]


def test_latency_runs_combine_into_medians_and_the_worst_max():
    from digitstream.bench.runner import combine_latency_runs
    from digitstream.tools.measure import latency_summary

    def run(tail_ms: float, slow: int) -> dict:
        lat = np.array([200_000] * (10_000 - slow) + [int(tail_ms * 1e6)] * slow)
        return {"rate_target": 100_000, "rate_sent": 99_990.0, **latency_summary(lat)}

    # a quiet run, one with a slow spell of the host, one in between
    runs = [run(0.5, 15), run(6.0, 40), run(2.0, 20)]
    combined = combine_latency_runs(runs)
    assert [r["p99_9"] for r in runs] == [0.5, 6.0, 2.0]
    assert combined["p99_9"] == 2.0 and combined["p50"] == 0.2
    assert combined["max"] == 6.0 and combined["messages"] == 30_000
    assert combined["cdf"] == runs[2]["cdf"]  # the run with the median p99.9
    assert [r["p99_9"] for r in combined["runs"]] == [0.5, 6.0, 2.0]
    assert all("cdf" not in r for r in combined["runs"])
    one = combine_latency_runs(runs[:1])
    assert {k: v for k, v in one.items() if k != "runs"} == runs[0]


def test_ratio_targets_are_judged_by_the_paired_ratio():
    from digitstream.bench.runner import (
        RATIOS,
        compute_paired_ratios,
        compute_ratios,
        evaluate_targets,
    )

    def relay_row(u8_rates, relay_rates) -> tuple[dict, float]:
        def runs(rates):
            return {"runs": [{"msg_per_s": r} for r in rates], "median": sorted(rates)[1]}

        throughput = {key: runs([1.0] * 3) for pair in RATIOS.values() for key in pair}
        throughput["digitstream_u8"], throughput["relay_u8"] = runs(u8_rates), runs(relay_rates)
        figures = {"throughput": throughput, "latency": {}, "startup": {}, "memory": {}}
        figures["ratios"] = compute_ratios(figures)
        figures["ratios_paired"] = compute_paired_ratios(figures)
        rows = {row["name"]: row for row in evaluate_targets(figures)}
        return rows["digitstream u8 / relay u8"], figures["ratios"]["u8_vs_relay"]

    # rounds 0.7, 0.8, 0.75: paired 0.75; the medians, 7 and 10, give 0.70
    row, of_medians = relay_row([7.0, 8.0, 6.0], [10.0, 10.0, 8.0])
    assert of_medians == 0.7 and row["measured"] == 0.75 and row["met"] is True
    assert row["note"] == "paired; of medians 0.70"
    # rounds 0.6, 0.67, 0.7: paired 0.67 misses, though the ratio of medians is 0.70
    row, of_medians = relay_row([6.0, 8.0, 7.0], [10.0, 12.0, 10.0])
    assert of_medians == 0.7 and round(row["measured"], 3) == 0.667 and row["met"] is False


def test_exact_plan_sends_exactly_the_count_asked():
    from digitstream.bench.worker import exact_plan
    from digitstream.tools.sender import Framed

    framed = Framed.from_payloads([bytes([i]) * 3 for i in range(7)])
    for n in (1, 6, 7, 8, 100):
        assert exact_plan(framed, n).messages == n


# ----------------------------------------------------------------- the suite
EXPECTED_SYSTEMS = {"digitstream_u8", "digitstream_u8_no_metrics", "digitstream_pickle",
                    "digitstream_f32", "digitstream_json", "digitstream_json_workers", "baseline",
                    "relay_u8", "relay_pickle", "digitstream_u8_drift", "digitstream_u8_shadow"}


@pytest.mark.slow
def test_bench_quick_produces_every_figure(tmp_path):
    json_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    result = subprocess.run(
        [sys.executable, "-m", "digitstream.cli", "bench", "--quick", "--json", str(json_path),
         "--plot", str(plot_path)], capture_output=True, text=True, timeout=280, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(json_path.read_text())
    assert figures["errors"] == []
    assert figures["machine"]["cores_logical"] >= 1 and figures["machine"]["cpu_model"]
    assert all(figures["versions"][k] for k in ("python", "numpy", "scikit-learn"))

    assert set(figures["throughput"]) == EXPECTED_SYSTEMS
    for key, fig in figures["throughput"].items():
        assert len(fig["runs"]) == figures["settings"]["runs"], key
        assert fig["median"] > 0 and fig["min"] <= fig["median"] <= fig["max"], key
        assert fig["peak_rss_mb"] > 0, key
    for key in ("digitstream_u8", "digitstream_pickle", "relay_u8"):
        lat = figures["latency"][key]
        assert lat["messages"] > 0
        assert 0 < lat["p50"] <= lat["p99"] <= lat["p99_9"] <= lat["max"]
        assert lat["cdf"]
        assert len(lat["runs"]) == figures["settings"]["latency_rounds"] == 1
    for ratios in (figures["ratios"], figures["ratios_paired"]):
        assert ratios and all(value > 0 for value in ratios.values()), ratios
    assert figures["memory"]["peak_rss_mb"] > 0 and figures["memory"]["samples_mb"]
    shadow = figures["shadow"]
    assert 0 < shadow["throughput"] <= 1 and 0 < shadow["paced"] <= 1
    assert shadow["paced_rate"] == figures["settings"]["latency_rate"]
    assert all(row["measured"] is not None for row in figures["targets"])
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for word in ("Throughput", "Latency", "Ratios", "Targets"):
        assert word in result.stdout
