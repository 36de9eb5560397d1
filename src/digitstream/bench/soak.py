"""``digitstream bench --soak MINUTES``: sustained u8 load on one application.

The sender sends back to back, in chunks of a few seconds each (a new
connection per chunk, as a fleet of producers coming and going would); every
chunk gives a throughput point, and the application's resident memory is
sampled all along. A leak shows as a rising memory line; a slowdown as a
falling throughput line.
"""

from __future__ import annotations

import time
from typing import Any

from digitstream.bench.settings import Settings, new_figures
from digitstream.bench.systems import BenchError, System

SOAK_SYSTEM = System("digitstream_u8", "digitstream u8", "digitstream", "u8")
#: seconds of load per chunk, and so between throughput points
CHUNK_SECONDS = 3.0
#: spacing of the memory samples kept in the figures
RSS_SPACING = 2.0


def _chunk_for(rate: float) -> int:
    return int(min(50_000_000, max(100_000, rate * CHUNK_SECONDS)))


def run_soak(session, minutes: float) -> dict:
    log = session.log
    figures = new_figures(Settings(runs=0, messages={}, warmup={}))
    figures["model"] = session.model_info
    key = SOAK_SYSTEM.key
    session.start([SOAK_SYSTEM])
    sampler_start = session.sampler.now()
    soak: dict[str, Any] = {
        "minutes": minutes,
        "system": key,
        "timeline": [],
        "messages": 0,
        "seconds": 0.0,
    }
    figures["soak"] = soak
    try:
        chunk = _chunk_for(session.throughput(key, 500_000)["msg_per_s"])
        log(f"soak: {minutes:g} min of u8 load in chunks of about {CHUNK_SECONDS:g} s")
        start = time.monotonic()
        sampler_start = session.sampler.now()
        end = start + minutes * 60
        while time.monotonic() < end:
            run = session.throughput(key, chunk)
            session.sampler.sample()
            rss = session.sampler.series[key][-1][1] / 2**20
            point = {
                "t": round(time.monotonic() - start, 2),
                "msg_per_s": run["msg_per_s"],
                "rss_mb": rss,
            }
            soak["timeline"].append(point)
            soak["messages"] += run["messages"]
            log(f"soak {point['t']:7.1f} s  {run['msg_per_s']:>12,.0f} msg/s  RSS {rss:6.1f} MB")
            chunk = _chunk_for(run["msg_per_s"])
        soak["seconds"] = time.monotonic() - start
    except BenchError as exc:
        figures["errors"].append(f"soak: {exc}")
        soak["seconds"] = soak["seconds"] or 0.0
    samples = session.sampler.series.get(key, [])
    kept, last = [], None
    for t, rss in samples:
        t -= sampler_start
        if t >= 0 and (last is None or t - last >= RSS_SPACING):
            kept.append([round(t, 2), rss / 2**20])
            last = t
    soak["rss_samples_mb"] = kept
    peak = session.peak_rss(key)
    soak["peak_rss_mb"] = peak / 2**20 if peak else None
    # under load, not the idle process before the first message
    soak["rss_first_mb"] = soak["timeline"][0]["rss_mb"] if soak["timeline"] else None
    soak["rss_last_mb"] = soak["timeline"][-1]["rss_mb"] if soak["timeline"] else None
    soak["msg_per_s"] = soak["messages"] / soak["seconds"] if soak["seconds"] else None
    session.stop(key)
    return figures
