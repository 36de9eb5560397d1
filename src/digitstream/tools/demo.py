"""``digitstream demo``: the seed's whole flow on this machine, in one command.

1. trains the seed's model into ``models/`` if there is no bundle yet;
2. starts a listener (what ``nc -l 127.0.0.1 7002 > digits.out`` was);
3. starts the application (``digitstream run``) as its own process;
4. sends every digits image once, pickled, as the seed's sender does;
5. waits for every result and prints a summary: messages, accuracy against
   the true labels, throughput, latency, where the output and the metrics UI are.

The seed's ports (8002 in, 7002 out, 5001 metrics) are used when they are
free; otherwise free ports are taken and printed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

from digitstream.addresses import Address
from digitstream.codecs.outputs import seed_label_text
from digitstream.datasets import load_dataset
from digitstream.errors import UserError
from digitstream.tools.listener import Listener
from digitstream.tools.measure import as_timeline, latencies_ns, latency_summary
from digitstream.tools.sender import build_frames, send_frames, split

HOST = "127.0.0.1"
SEED_PORTS = {"in": 8002, "out": 7002, "metrics": 5001}


def _port(preferred: int) -> int:
    """``preferred`` if nothing listens there, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as s:
            # as the servers will bind: a port left in TIME_WAIT by a previous run is usable
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise UserError("no free port on 127.0.0.1")


def _wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
            raise UserError(f"the application exited ({proc.returncode}): {' '.join(tail)}")
        try:
            with urllib.request.urlopen(url + "readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise UserError(f"the application was not ready within {timeout:.0f} s; see {log_path}")


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(timeout=10)
    return proc.returncode


def ensure_model(console: Console, model: Path) -> Path:
    """``model``, the seed's model trained into it first if it holds no bundle."""
    if not (model / "model.json").exists():
        # heavy: scikit-learn, only when the model is trained first
        from digitstream.model import train

        console.rule("[bold]1. training the seed's model (no bundle yet)")
        train.main(
            dataset="digits",
            model_name="pca-logistic",
            output=str(model),
            test_size=0.25,
            seed=0,
            jobs=1,
        )
    else:
        console.print(f"using the model bundle in {model}/")
    return model


def main(
    model_path: str = "models",
    output: str = "digits.out",
    repeat: int = 1,
    keep_running: bool = False,
) -> int:
    console = Console(stderr=True)
    model = ensure_model(console, Path(model_path))
    ports = {name: _port(port) for name, port in SEED_PORTS.items()}
    dataset = load_dataset("digits")
    frames = build_frames(dataset, "pickle")
    total = len(frames) * repeat

    console.rule("[bold]2. listener, application, sender")
    listener = Listener(
        Address(HOST, ports["out"]), output, collect=True, record_times=True
    ).start()
    log_path = Path(output).with_suffix(".app.log")
    metrics_url = f"http://{HOST}:{ports['metrics']}/"
    cmd = [
        sys.executable,
        "-m",
        "digitstream.cli",
        "run",
        "--in",
        f"{HOST}:{ports['in']}",
        "--out",
        f"{HOST}:{ports['out']}",
        "--metrics",
        f"{HOST}:{ports['metrics']}",
        "--model",
        str(model),
    ]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        _wait_ready(metrics_url, proc, log_path)
        console.print(f"listener on {HOST}:{ports['out']} -> {output}")
        console.print(
            f"application: in {HOST}:{ports['in']}, out {HOST}:{ports['out']}, "
            f"metrics UI [link={metrics_url}]{metrics_url}[/link] (log: {log_path})"
        )
        stats = send_frames(
            Address(HOST, ports["in"]),
            split(frames, repeat=repeat),
            progress=console.is_terminal,
            record_times=True,
        )
        console.print(stats.summary(Address(HOST, ports["in"])))
        if not listener.wait(count=total, timeout=120):
            raise UserError(f"only {listener.frames} of {total} results arrived within 120 s")
        app_stats = _fetch_json(metrics_url + "api/stats")
        _summary(console, listener, stats, dataset.y, repeat, output, metrics_url, app_stats)
        if keep_running:
            console.print("the application and its dashboard stay up; Ctrl-C to stop")
            try:
                while proc.poll() is None:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
    finally:
        status = _stop(proc)
        listener.stop()
    if status != 0:
        console.print(f"[red]the application exited with status {status}; see {log_path}")
    return status


def _fetch_json(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except OSError:
        return {}


def _summary(console, listener, stats, labels, repeat, output, metrics_url, app_stats) -> None:
    texts = [p.decode("utf-8", "replace") for p in listener.results()]
    truth = [seed_label_text(label) for label in labels] * repeat
    correct = sum(t == p for t, p in zip(truth, texts))
    errors = sum(t.startswith("error:") for t in texts)
    sent = as_timeline(stats.timelines[0])
    received = as_timeline(listener.timeline)
    latency = latency_summary(latencies_ns(sent, received, len(texts)))
    elapsed = (listener.last_frame_ns - sent[0, 0]) / 1e9 if len(sent) else float("nan")

    table = Table(title="digitstream demo", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("messages", f"{len(texts):,} sent, {len(texts):,} results, {errors} errors")
    table.add_row(
        "accuracy",
        f"{correct / len(texts):.4f} against the true labels ({correct:,} of {len(texts):,})",
    )
    table.add_row(
        "throughput",
        f"{len(texts) / elapsed:,.0f} messages/s end to end "
        f"(first write to last result, {elapsed * 1000:.1f} ms)",
    )
    table.add_row(
        "latency",
        f"p50 {latency['p50']:.2f} ms, p99 {latency['p99']:.2f} ms (sender write to listener read)",
    )
    model = app_stats.get("model") or {}
    if model.get("heldout_accuracy") is not None:
        table.add_row(
            "model",
            f"{' -> '.join(model.get('steps', []))}, held-out accuracy "
            f"{model['heldout_accuracy']:.4f}",
        )
    table.add_row("output", f"{output} (print it with: digitstream read {output})")
    table.add_row("metrics UI", metrics_url)
    console.print(table)
    if correct < len(texts) * 0.9:
        console.print("[yellow]accuracy is low: is the model in the bundle the digits model?")
