"""How far apart two identical processes measure: the resolution of "metrics on / off".

    python docs/benchmarks/twins.py [ROUNDS]

Starts, with the benchmark's own runner, three systems at once: ``digitstream u8``
twice (the same command, metrics on) and ``digitstream u8, no metrics``, and
measures them in turns for ROUNDS rounds (default 5) of the full run's 20 M
messages. Prints each system's runs and median, and three paired ratios (the
median over rounds of the ratio within each round): the twin to the first, and
each of them to the system without metrics. The paced latency of the full
suite's latency systems that are among them follows the rounds, as in the
benchmark.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import replace

from digitstream.bench.runner import SYSTEMS, run_suite
from digitstream.bench.session import Session
from digitstream.bench.settings import Settings
from digitstream.bench.systems import System


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    by_key = {s.key: s for s in SYSTEMS}
    first, no_metrics = by_key["digitstream_u8"], by_key["digitstream_u8_no_metrics"]
    twin = System("digitstream_u8_twin", "digitstream u8 (twin)", "digitstream", "u8")
    systems = [first, twin, no_metrics]
    full = Settings.full()
    settings = replace(
        full,
        runs=rounds,
        messages={**full.messages, twin.key: full.messages[first.key]},
        warmup={**full.warmup, twin.key: full.warmup[first.key]},
    )
    with Session(lambda line: None) as session:
        figures = run_suite(settings, session, systems)
    rates = {
        s.key: [run["msg_per_s"] for run in figures["throughput"][s.key]["runs"]] for s in systems
    }
    for s in systems:
        runs = ", ".join(f"{r / 1e6:.2f}" for r in rates[s.key])
        print(f"{s.label:28s} median {statistics.median(rates[s.key]) / 1e6:6.2f} M msg/s ({runs})")

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

    print(f"twin / first, paired: {paired(twin.key, first.key):.3f}")
    print(f"first / no metrics, paired: {paired(first.key, no_metrics.key):.3f}")
    print(f"twin / no metrics, paired: {paired(twin.key, no_metrics.key):.3f}")


if __name__ == "__main__":
    main()
