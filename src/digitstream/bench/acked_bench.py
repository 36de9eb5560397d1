"""The ``acked u8`` and ``acked pickle`` rows of ``digitstream bench``: ``--acked`` end to end.

Each row is ``digitstream run --acked`` between a ``digitstream listen --acked``
process and an acknowledged sender (:class:`~digitstream.tools.acked_sender.AckedSender`,
in the benchmark's process), measured after the main suite in the same invocation:

* **throughput**: messages / (time from the sender's start to the acknowledgement
  of the last message, that is the listener having stored it), median of runs,
  each run a new stream; beside it the plain row of the same format from the
  main suite, and their ratio (target for u8: at least 0.5);
* **latency** at the suite's paced rate (100,000 msg/s): per message, from the
  start of the send of its DATA message to the ACK that covers it, which is a
  round trip further than the plain rows measure (target: p99 within 2 ms);
* **memory**: the application's resident-set high-water mark.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

from digitstream.addresses import Address, parse_address
from digitstream.bench.systems import HOST, BenchError, Running, System, free_port
from digitstream.tools.acked_sender import AckedSender, ack_latencies_ns, fingerprint
from digitstream.tools.measure import latency_summary, rate_summary, ratio
from digitstream.tools.sender import build_frames

SYSTEMS = [
    System("acked_u8", "acked u8", "digitstream", "u8", args=("--acked",)),
    System("acked_pickle", "acked pickle", "digitstream", "pickle", args=("--acked",)),
]
#: the plain row each acked row is compared with
PLAIN = {"acked_u8": "digitstream_u8", "acked_pickle": "digitstream_pickle"}
#: messages per throughput run at most (the listener's file keeps every run)
MAX_MESSAGES = 3_000_000
THROUGHPUT_TARGET = 0.5
P99_TARGET_MS = 2.0
LISTEN = [sys.executable, "-m", "digitstream.cli", "-q", "listen", "--acked"]


class _AckedListener:
    def __init__(self, directory: Path, key: str):
        self.path = directory / f"{key}.acked"
        self.log_path = directory / f"{key}.listen.log"
        self.addr = Address(HOST, free_port())
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*LISTEN, str(self.addr), "-o", str(self.path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while "listening on" not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"acked listener did not start: {self.log_path.read_text()}")
            time.sleep(0.05)
        line = self.log_path.read_text().split("listening on ", 1)[1]
        self.addr = parse_address(line.split(",", 1)[0])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _send(app: Running, fmt: str, name: str, messages: int, rate=None, times=False):
    framed = build_frames("digits", fmt)
    repeat = max(1, math.ceil(messages / len(framed)))
    sender = AckedSender(
        app.in_addr,
        name,
        framed,
        repeat,
        fingerprint(framed, "digits", fmt, repeat),
        rate=rate,
        log=lambda text: None,
        record_times=times,
    )
    return sender, sender.run()


def run(session, settings, figures: dict) -> dict:
    """Measure both rows; ``figures`` are the main suite's (for the plain rows)."""
    log = session.log
    out: dict = {"rows": {}, "errors": []}
    for system in SYSTEMS:
        listener = _AckedListener(session.directory, system.key)
        app = None
        try:
            listener.wait_ready()
            app = Running(system, listener.addr, session.model_dir, session.directory)
            app.wait_ready()
            messages = min(settings.messages[PLAIN[system.key]], MAX_MESSAGES)
            _send(app, system.fmt, "warm-up", settings.warmup[PLAIN[system.key]])
            rates = []
            for run_no in range(1, settings.runs + 1):
                _, stats = _send(app, system.fmt, f"run-{run_no}", messages)
                rates.append(stats.total / stats.seconds)
                log(
                    f"run {run_no}/{settings.runs}  {system.label:28s} {rates[-1]:>14,.0f} msg/s"
                    f"  ({stats.total:,} acknowledged in {stats.seconds:.2f} s)"
                )
            rate = settings.latency_rate
            sender, _ = _send(
                app,
                system.fmt,
                "latency",
                int(rate * settings.latency_seconds),
                rate=rate,
                times=True,
            )
            assert sender.sends is not None and sender.acks is not None
            latency = latency_summary(ack_latencies_ns(sender.sends, sender.acks))
            log(
                f"latency at {rate:,.0f} msg/s  {system.label:20s} p50 {latency['p50']:.3f} ms"
                f"  p99 {latency['p99']:.3f} ms (to the listener's acknowledgement)"
            )
            peak = app.peak_rss()
            plain = figures["throughput"].get(PLAIN[system.key], {})
            summary = rate_summary(rates)
            out["rows"][system.key] = {
                "label": system.label,
                "format": system.fmt,
                "messages_per_run": messages,
                "runs": rates,
                **summary,
                "plain_median": plain.get("median"),
                "vs_plain": ratio(summary.get("median"), plain.get("median")),
                "latency": latency,
                "plain_latency_p99": figures["latency"].get(PLAIN[system.key], {}).get("p99"),
                "peak_rss_mb": peak / 2**20 if peak else None,
            }
        except (BenchError, OSError) as exc:
            out["errors"].append(f"{system.label}: {exc}")
            log(f"{system.label}: {exc}")
        finally:
            if app is not None:
                app.stop()
            listener.stop()
            listener.path.unlink(missing_ok=True)
    u8 = out["rows"].get("acked_u8", {})
    p99 = u8.get("latency", {}).get("p99")
    out["targets"] = {
        "u8_vs_plain": u8.get("vs_plain"),
        "u8_vs_plain_target": THROUGHPUT_TARGET,
        "u8_vs_plain_met": None
        if u8.get("vs_plain") is None
        else u8["vs_plain"] >= THROUGHPUT_TARGET,
        "u8_p99_ms": p99,
        "u8_p99_target_ms": P99_TARGET_MS,
        "u8_p99_met": None if p99 is None else p99 <= P99_TARGET_MS,
    }
    return out
