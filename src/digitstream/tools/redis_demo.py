"""``digitstream demo --redis``: the flow through Redis Streams, with a consumer lost mid-way.

1. trains the seed's model if there is no bundle yet (as ``digitstream demo``);
2. starts a ``redis-server`` of its own on a free port of 127.0.0.1, in a
   temporary directory, without persistence;
3. starts three ``digitstream run`` consumers in one consumer group, reading
   stream ``digits`` and writing stream ``results``;
4. adds every digits image (pickled, with its label) to ``digits``, paced over
   a few seconds, and kills one consumer with SIGKILL half-way: the others take
   over its pending entries after ``--claim-idle-ms``;
5. waits until every entry has its result and nothing is pending, writes the
   results to the output file in input order (``in`` restores it), and prints
   the usual summary plus entries in, results out, duplicates and missing.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis
from rich.console import Console
from rich.table import Table

from digitstream.codecs.inputs import encode_images
from digitstream.codecs.outputs import seed_label_text
from digitstream.datasets import load_dataset
from digitstream.errors import UserError
from digitstream.tools.demo import ensure_model
from digitstream.wire.framing import frame_many

HOST = "127.0.0.1"
CONSUMERS = ("consumer-1", "consumer-2", "consumer-3")
CLAIM_IDLE_MS = 1000
SEND_SECONDS = 3.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_redis(directory: Path) -> tuple[subprocess.Popen, int]:
    """A ``redis-server`` on a free port of 127.0.0.1 in ``directory``; UserError naming the
    Debian package if there is none."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise UserError(
            "redis-server is not installed: install the Debian package redis-server "
            "(apt-get install redis-server)"
        )
    log = directory / "redis.log"
    for _ in range(10):
        # a port the kernel handed out and let go: taken by another process in between, the
        # server fails to bind and another is tried
        port = _free_port()
        proc = subprocess.Popen(
            [
                binary,
                "--bind",
                HOST,
                "--port",
                str(port),
                "--dir",
                str(directory),
                "--save",
                "",
                "--appendonly",
                "no",
                "--logfile",
                str(log),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            if log.exists() and "Ready to accept connections" in log.read_text(errors="replace"):
                return proc, port
            time.sleep(0.02)
        proc.kill()
        proc.wait(timeout=10)
    raise UserError(f"redis-server did not start; see {log}")


def main(model_path: str = "models", output: str = "digits.out", repeat: int = 1) -> int:
    console = Console(stderr=True)
    model = ensure_model(console, Path(model_path))
    directory = Path(tempfile.mkdtemp(prefix="digitstream-redis-demo-"))
    server, port = start_redis(directory)
    apps: dict[str, subprocess.Popen] = {}
    try:
        base = f"redis://{HOST}:{port}"
        console.rule("[bold]2. redis-server, three consumers in one group, sender")
        console.print(f"redis-server on {HOST}:{port} in {directory}")
        for name in CONSUMERS:
            log_file = open(directory / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
            apps[name] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "digitstream.cli",
                    "run",
                    "--in",
                    f"{base}/digits",
                    "--out",
                    f"{base}/results",
                    "--group",
                    "demo",
                    "--name",
                    name,
                    "--claim-idle-ms",
                    str(CLAIM_IDLE_MS),
                    "--model",
                    str(model),
                    "--metrics",
                    f"{HOST}:0",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            log_file.close()
        client: Any = redis.Redis(HOST, port, socket_timeout=30)
        _wait_started(apps, directory)
        console.print(f"consumers {', '.join(CONSUMERS)} in group demo (logs in {directory})")

        data = load_dataset("digits")
        payloads = encode_images(data.X, "pickle", labels=data.y)
        truth = [seed_label_text(label) for label in data.y]
        total = len(payloads) * repeat
        victim = CONSUMERS[1]
        chunk = max(1, total // 60)
        ids: list[bytes] = []
        killed = False
        began = time.perf_counter()
        for start in range(0, total, chunk):
            time.sleep(max(0.0, began + SEND_SECONDS * start / total - time.perf_counter()))
            if start >= total // 2 and not killed:
                apps[victim].kill()
                killed = True
                console.print(f"killed {victim} (SIGKILL) after {start:,} of {total:,} entries")
            pipe = client.pipeline(transaction=False)
            for k in range(start, min(total, start + chunk)):
                i = k % len(payloads)
                pipe.xadd("digits", {"data": payloads[i], "label": truth[i], "id": str(k)})
            ids.extend(pipe.execute())
        console.print(
            f"added {total:,} entries to stream digits in {time.perf_counter() - began:.1f} s"
        )

        deadline = time.monotonic() + 120
        while client.xlen("results") < total or client.xpending("digits", "demo")["pending"]:
            if time.monotonic() > deadline:
                raise UserError(
                    f"only {client.xlen('results')} of {total} results within 120 s; "
                    f"see the logs in {directory}"
                )
            time.sleep(0.05)
        elapsed = time.perf_counter() - began
        by_input: dict[bytes, list[bytes]] = {}
        latencies_ms = []
        for result_id, fields in client.xrange("results"):
            by_input.setdefault(fields[b"in"], []).append(fields[b"data"])
            # entry ids begin with the time Redis added the entry, in ms: input to result
            latencies_ms.append(_ms(result_id) - _ms(fields[b"in"]))
        duplicates = sum(len(v) - 1 for v in by_input.values())
        missing = sum(1 for entry_id in ids if entry_id not in by_input)
        texts = [by_input[entry_id][0] if entry_id in by_input else b"" for entry_id in ids]
        Path(output).write_bytes(frame_many(texts))
        correct = sum(text.decode() == truth[k % len(truth)] for k, text in enumerate(texts))
        _summary(
            console,
            total,
            client.xlen("results"),
            duplicates,
            missing,
            correct,
            elapsed,
            victim,
            latencies_ms,
            output,
        )
        return 0 if duplicates == missing == 0 else 1
    finally:
        for proc in apps.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in apps.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        shutil.rmtree(directory, ignore_errors=True)


def _wait_started(apps: dict[str, subprocess.Popen], directory: Path) -> None:
    deadline = time.monotonic() + 60
    for name, proc in apps.items():
        log = directory / f"{name}.log"
        while "listening on" not in (log.read_text(errors="replace") if log.exists() else ""):
            if proc.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:]
                raise UserError(f"{name} exited ({proc.returncode}): {' '.join(tail)}")
            if time.monotonic() > deadline:
                raise UserError(f"{name} did not start within 60 s; see {log}")
            time.sleep(0.05)


def _ms(entry_id: bytes) -> int:
    return int(entry_id.split(b"-")[0])


def _summary(
    console, total, results, duplicates, missing, correct, elapsed, victim, latencies_ms, output
):
    table = Table(title="digitstream demo --redis", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("entries in", f"{total:,}")
    table.add_row("results out", f"{results:,}")
    table.add_row("duplicates", f"{duplicates}")
    table.add_row("missing", f"{missing}")
    table.add_row("consumers", f"3 in group demo, {victim} killed half-way")
    table.add_row(
        "accuracy", f"{correct / total:.4f} against the true labels ({correct:,} of {total:,})"
    )
    table.add_row(
        "throughput",
        f"{total / elapsed:,.0f} entries/s from the first entry added to the last result "
        f"(sending paced over {SEND_SECONDS:.0f} s)",
    )
    p50, p99, worst = np.percentile(latencies_ms, [50, 99, 100]) if latencies_ms else (0, 0, 0)
    table.add_row(
        "latency",
        f"p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {worst:.0f} ms (entry added to its result "
        f"added, Redis's clock; the killed consumer's entries wait --claim-idle-ms "
        f"{CLAIM_IDLE_MS})",
    )
    table.add_row("output", f"{output}, in input order (print it with: digitstream read {output})")
    console.print(table)
