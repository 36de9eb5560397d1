"""One row of the benchmark alone, with the CPU time of each process.

    python docs/benchmarks/json_cpu.py MODEL_DIR [MESSAGES] [RUNS] [FORMAT] [RUN OPTION ...]

Starts ``digitstream run`` on MODEL_DIR between the benchmark's own sender and
listener workers (``python -m digitstream.bench.worker``), sends the digits
MESSAGES at a time (default 1,000,000), RUNS times (default 3) after one warm-up,
and prints per run the messages/s (the benchmark's definition) and the CPU
seconds that the application, the sender and the listener used. FORMAT is the
input format (default ``json``: labelled json in, json out; any other: text
out); further arguments go to ``run`` (``--max-batch 4096``, say).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    model = sys.argv[1]
    messages = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    fmt = sys.argv[4] if len(sys.argv) > 4 else "json"
    options = sys.argv[5:]
    directory = tempfile.mkdtemp()

    def worker(role: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "digitstream.bench.worker", role, directory],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(proc: subprocess.Popen, request: dict) -> None:
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()

    listener = worker("listen")
    port = json.loads(listener.stdout.readline())["port"]
    sender = worker("send")
    app_port, metrics_port = free_port(), free_port()
    app = subprocess.Popen(
        [
            BIN / "digitstream",
            "run",
            "--in",
            f"127.0.0.1:{app_port}",
            "--out",
            f"127.0.0.1:{port}",
            "--metrics",
            f"127.0.0.1:{metrics_port}",
            "--model",
            model,
            "--input-format",
            fmt,
            "--output-format",
            "json" if fmt == "json" else "text",
            *options,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", app_port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        procs = [psutil.Process(p.pid) for p in (app, sender, listener)]

        def one(n: int) -> str:
            ask(listener, {"cmd": "expect", "messages": n, "timeout": 300})
            listener.stdout.readline()
            before = [sum(p.cpu_times()[:2]) for p in procs]
            ask(
                sender,
                {
                    "cmd": "send",
                    "to": f"127.0.0.1:{app_port}",
                    "format": fmt,
                    "messages": n,
                    "rate": None,
                    "timeline": False,
                },
            )
            sent = json.loads(sender.stdout.readline())
            got = json.loads(listener.stdout.readline())
            after = [sum(p.cpu_times()[:2]) for p in procs]
            seconds = (got["last_ns"] - sent["start_ns"]) / 1e9
            cpu = " / ".join(f"{b - a:.2f}" for a, b in zip(before, after))
            return (
                f"{n / seconds:,.0f} msg/s; CPU s app / sender / listener {cpu} in {seconds:.2f} s"
            )

        one(min(messages, 200_000))
        for _ in range(runs):
            print(one(messages), flush=True)
    finally:
        for proc in (sender, listener):
            ask(proc, {"cmd": "quit"})
            proc.wait(10)
        app.terminate()
        app.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
