"""Where the paced tail comes from: the slow bursts of each system, and its CPU a message.

    python docs/benchmarks/tail.py [ROUNDS] [SECONDS] [SYSTEMS]

Starts, with the benchmark's own runner, the relay u8, ``digitstream u8`` and ``digitstream
u8`` with ``--no-metrics`` (or the comma-separated SYSTEMS, keys of the benchmark), and
paces each at 100,000 messages/s for SECONDS (default 10), in turns, ROUNDS times (default
2). Per run it prints p50, p99, p99.9 and max (ms), the CPU the system's process used per
message (µs, user + system), and the events: runs of messages over 1 ms late, each as
(second of the run it began, its worst latency in ms, messages in it).
"""

from __future__ import annotations

import sys

import numpy as np
import psutil

from digitstream.bench.runner import SYSTEMS
from digitstream.bench.session import Session
from digitstream.tools.measure import latency_summary

RATE = 100_000
SLOW_MS = 1.0
#: slow messages this far apart (in messages) belong to different events
EVENT_GAP = 500


def events(lat_ms: np.ndarray) -> list[tuple[float, float, int]]:
    slow = np.flatnonzero(lat_ms > SLOW_MS)
    if not slow.size:
        return []
    starts = np.concatenate([[0], np.flatnonzero(np.diff(slow) > EVENT_GAP) + 1])
    stops = np.append(starts[1:], slow.size)
    return [
        (
            round(float(slow[a]) / RATE, 3),
            round(float(lat_ms[slow[a] : slow[b - 1] + 1].max()), 2),
            int(b - a),
        )
        for a, b in zip(starts, stops)
    ]


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    keys = (
        sys.argv[3].split(",")
        if len(sys.argv) > 3
        else ["relay_u8", "digitstream_u8", "digitstream_u8_no_metrics"]
    )
    by_key = {s.key: s for s in SYSTEMS}
    messages = int(RATE * seconds)
    with Session() as session:
        session.start([by_key[k] for k in keys])
        for key in keys:
            session.throughput(key, 200_000)  # warm-up
        for round_no in range(1, rounds + 1):
            for key in keys:
                proc = psutil.Process(session.running[key].pid)
                before = sum(proc.cpu_times()[:2])
                lat_ns, _ = session.latencies(key, RATE, seconds)
                cpu = sum(proc.cpu_times()[:2]) - before
                lat = lat_ns / 1e6
                summary = latency_summary(lat_ns)
                found = events(lat)
                print(
                    f"{round_no} {key:26s} p50 {summary['p50']:.3f} p99 {summary['p99']:.3f} "
                    f"p99.9 {summary['p99_9']:.3f} max {summary['max']:.2f} ms; "
                    f"CPU {cpu / messages * 1e6:.2f} µs a message; "
                    f"{int((lat > SLOW_MS).sum())} over {SLOW_MS:g} ms in {len(found)} events "
                    f"{found[:10]}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
