"""Figures from raw timings: throughput, per-message latency, percentiles.

Here rather than in :mod:`digitstream.bench` because ``digitstream demo`` reports
the same figures, and the tools must not depend on the benchmark.

Latency needs no timestamp in the payload. The sender records, per write,
``(t_ns, frames written so far)`` and the listener, per read, ``(t_ns, frames
received so far)``, both with ``time.perf_counter_ns()``, which on Linux is
CLOCK_MONOTONIC and so one clock for every process of the machine. Frames
keep their order end to end, so frame ``i`` left in the first write whose
count passes ``i`` and its result arrived in the first read whose count
passes ``i``: the difference is that message's latency.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

#: the percentiles reported for every latency measurement
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99_9": 99.9}
#: points kept of each latency distribution (for the chart and the JSON)
CDF_POINTS = 200


def as_timeline(pairs) -> np.ndarray:
    """``(t_ns, cumulative_count)`` pairs as an ``(n, 2)`` int64 array."""
    array = np.asarray(pairs, dtype=np.int64)
    return array.reshape(-1, 2)


def latencies_ns(sent: np.ndarray, received: np.ndarray, messages: int | None = None) -> np.ndarray:
    """Per-message latency in nanoseconds, for messages ``0 .. messages - 1``.

    ``sent`` and ``received`` are timelines (see :func:`as_timeline`) whose
    counts start at zero for the first message of the measurement and never
    decrease. Messages not yet received (or never sent) are left out.
    """
    if messages is None:
        messages = int(min(sent[-1, 1], received[-1, 1])) if len(sent) and len(received) else 0
    index = np.arange(messages, dtype=np.int64)
    write = np.searchsorted(sent[:, 1], index, side="right")
    read = np.searchsorted(received[:, 1], index, side="right")
    ok = (write < len(sent)) & (read < len(received))
    return received[read[ok], 0] - sent[write[ok], 0]


def latency_summary(lat_ns: np.ndarray) -> dict:
    """Percentiles, mean and maximum in milliseconds, and a compact CDF.

    ``cdf`` is a list of ``[latency_ms, fraction_at_or_below]`` points, spaced
    evenly in fraction and denser in the tail, enough to draw the distribution.
    """
    if lat_ns.size == 0:
        return {
            "messages": 0,
            **{k: None for k in PERCENTILES},
            "mean": None,
            "max": None,
            "cdf": [],
        }
    ms = np.sort(lat_ns) / 1e6
    out: dict[str, Any] = {"messages": int(ms.size)}
    for name, q in PERCENTILES.items():
        out[name] = float(np.percentile(ms, q))
    out["mean"] = float(ms.mean())
    out["max"] = float(ms[-1])
    # evenly in fraction up to 0.99, then in -log10(1 - f) through the tail
    body = np.linspace(0.0, 0.99, CDF_POINTS // 2, endpoint=False)
    tail = 1.0 - np.logspace(-2, -np.log10(ms.size), CDF_POINTS // 2)
    fractions = np.unique(np.concatenate([body, tail, [1.0]]))
    positions = np.minimum((fractions * ms.size).astype(np.int64), ms.size - 1)
    out["cdf"] = [[float(ms[p]), float(f)] for p, f in zip(positions, fractions)]
    return out


def rate_summary(rates: list[float]) -> dict:
    """Median, minimum and maximum of per-run rates (messages per second)."""
    if not rates:
        return {"median": None, "min": None, "max": None}
    return {
        "median": float(statistics.median(rates)),
        "min": float(min(rates)),
        "max": float(max(rates)),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return numerator / denominator
