"""``digitstream bench``: digitstream against the seed's design and a bare relay.

One invocation, this machine, loopback only. A sender process and a listener
process (:mod:`digitstream.bench.worker`, driven by a
:class:`~digitstream.bench.session.Session`) serve the whole benchmark; every
system under test (:mod:`digitstream.bench.systems`) runs as a process of its
own between them, all started up front and measured in turns (round robin),
so that a slow spell of a shared machine spreads over every system instead of
landing on one.

Throughput of a run is messages / (time from the sender's start to the
listener holding the last result); a system's figure is the median of its
runs. Latency is measured per message at a paced rate (see
:mod:`digitstream.tools.measure`). Memory is the application's resident-set
high-water mark, sampled along the way as well.
"""

from __future__ import annotations

import signal
import statistics
import sys
import time
from dataclasses import replace
from functools import partial

from rich.console import Console

from digitstream.bench import report
from digitstream.bench.acked_bench import run as run_acked
from digitstream.bench.dask_bench import run as run_dask
from digitstream.bench.session import Session
from digitstream.bench.settings import Settings, new_figures
from digitstream.bench.soak import run_soak
from digitstream.bench.systems import BenchError, Running, System
from digitstream.tools.measure import PERCENTILES, rate_summary, ratio

SYSTEMS = [
    System("digitstream_u8", "digitstream u8", "digitstream", "u8"),
    System(
        "digitstream_u8_no_metrics",
        "digitstream u8, no metrics",
        "digitstream",
        "u8",
        metrics=False,
    ),
    System(
        "digitstream_u8_drift",
        "digitstream u8, drift on",
        "digitstream",
        "u8",
        monitor="drift",
    ),
    System(
        "digitstream_u8_shadow",
        "digitstream u8, shadow of the same model",
        "digitstream",
        "u8",
        monitor="shadow",
    ),
    System("digitstream_pickle", "digitstream pickle", "digitstream", "pickle"),
    System("digitstream_f32", "digitstream f32", "digitstream", "f32"),
    System(
        "digitstream_json",
        "digitstream json, labelled",
        "digitstream",
        "json",
        args=("--output-format", "json"),
    ),
    System(
        "digitstream_json_workers",
        "digitstream json, labelled, 2 worker processes",
        "digitstream",
        "json",
        args=("--output-format", "json", "--workers", "2"),
    ),
    System("baseline", "seed design (baseline)", "baseline", "pickle"),
    System("relay_u8", "relay u8", "relay", "u8"),
    System("relay_pickle", "relay pickle", "relay", "pickle"),
]
#: the systems whose latency is measured at the paced rate
LATENCY_SYSTEMS = ["digitstream_u8", "digitstream_pickle", "relay_u8", "digitstream_u8_shadow"]
#: the system whose shadow model's share of batches scored is reported
SHADOW_SYSTEM = "digitstream_u8_shadow"
#: the system the memory target is about
MEMORY_SYSTEM = "digitstream_u8"

#: the systems whose start-up is measured (each started alone, one after another)
STARTUP_SYSTEMS = ["digitstream_u8", "baseline", "relay_u8"]

TARGETS = {
    "u8_msg_per_s": 3_000_000,
    "u8_vs_relay": 0.7,
    "pickle_msg_per_s": 1_000_000,
    "json_msg_per_s": 500_000,
    "vs_baseline": 500,
    "p99_ms": 2.0,
    "u8_p99_9_ms": 2.0,
    "pickle_p99_ms": 1.0,
    "peak_rss_mb": 300,
    "memory_messages": 20_000_000,
    "metrics_on_vs_off": 0.95,
    "startup_s": 1.0,
    "drift_on_vs_off": 0.95,
    "shadow_vs_none": 0.8,
}


# --------------------------------------------------------------------- suite
def run_suite(settings: Settings, session: Session, systems: list[System] = SYSTEMS) -> dict:
    """Every measurement of the benchmark; the figures (see :func:`digitstream.bench.report`)."""
    log = session.log
    figures = new_figures(settings)
    figures["model"] = session.model_info
    errors = figures["errors"]
    log(f"starting {len(systems)} systems under test")
    session.start(systems)
    log(f"all {len(systems)} listening; warming up")
    live = list(systems)

    def attempt(system: System, what: str, measure):
        return session.attempt(system, what, measure, live, errors)

    for system in list(live):
        attempt(
            system, "warm-up", partial(session.throughput, system.key, settings.warmup[system.key])
        )

    runs: dict[str, list[dict]] = {s.key: [] for s in systems}
    shadow_before = _shadow_counts(session)
    for round_no in range(1, settings.runs + 1):
        for system in list(live):
            result = attempt(
                system,
                f"run {round_no}",
                partial(session.throughput, system.key, settings.messages[system.key]),
            )
            if result is not None:
                runs[system.key].append(result)
                log(
                    f"run {round_no}/{settings.runs}  {system.label:28s} "
                    f"{result['msg_per_s']:>14,.0f} msg/s  ({result['messages']:,} in "
                    f"{result['seconds']:.2f} s)"
                )

    shadow_share = {"throughput": _scored_share(shadow_before, _shadow_counts(session))}
    paced: list[float] = []
    # in turns, as the throughput runs: a slow spell of the host spreads over every system
    latency_runs: dict[str, list[dict]] = {}
    for round_no in range(1, settings.latency_rounds + 1):
        for key in LATENCY_SYSTEMS:
            found = next((s for s in live if s.key == key), None)
            if found is None:
                continue
            before = _shadow_counts(session) if key == SHADOW_SYSTEM else None
            result = attempt(
                found,
                f"latency, round {round_no}",
                partial(session.latency, key, settings.latency_rate, settings.latency_seconds),
            )
            share = _scored_share(before, _shadow_counts(session)) if before else None
            if share is not None:
                paced.append(share)
            if result is not None:
                latency_runs.setdefault(key, []).append(result)
                log(
                    f"latency {round_no}/{settings.latency_rounds} at "
                    f"{settings.latency_rate:,.0f} msg/s  {found.label:20s} "
                    f"p50 {result['p50']:.3f} ms  p99 {result['p99']:.3f} ms  "
                    f"p99.9 {result['p99_9']:.3f} ms"
                )
    labels = {system.key: system.label for system in systems}
    latency = {
        key: {"label": labels[key], **combine_latency_runs(results)}
        for key, results in latency_runs.items()
    }

    for system in systems:
        rates = [r["msg_per_s"] for r in runs[system.key]]
        peak = session.peak_rss(system.key)
        figures["throughput"][system.key] = {
            "label": system.label,
            "kind": system.kind,
            "format": system.fmt,
            "metrics": system.metrics if system.kind == "digitstream" else None,
            "messages_per_run": settings.messages[system.key],
            "runs": runs[system.key],
            **rate_summary(rates),
            "peak_rss_mb": peak / 2**20 if peak else None,
            "messages_answered": session.answered.get(system.key, 0),
        }
    figures["latency"] = latency
    shadow_share["paced"] = statistics.median(paced) if paced else None
    shadow_share["paced_rate"] = settings.latency_rate
    figures["shadow"] = shadow_share
    memory_samples = session.sampler.series.get(MEMORY_SYSTEM, [])
    figures["memory"] = {
        "system": MEMORY_SYSTEM,
        "messages_answered": session.answered.get(MEMORY_SYSTEM, 0),
        "peak_rss_mb": figures["throughput"].get(MEMORY_SYSTEM, {}).get("peak_rss_mb"),
        "samples_mb": [[round(t, 2), rss / 2**20] for t, rss in memory_samples],
    }
    session.stop_all([system.key for system in systems])
    log(f"stopped the {len(systems)} systems under test")
    figures["startup"] = time_startups(
        session, [s for s in systems if s.key in STARTUP_SYSTEMS], settings.startup_runs, errors
    )
    figures["ratios"] = compute_ratios(figures)
    figures["ratios_paired"] = compute_paired_ratios(figures)
    figures["targets"] = evaluate_targets(figures)
    return figures


def _shadow_counts(session: Session) -> tuple[int, int] | None:
    """(batches scored, batches offered) of the shadow system's shadow model, now."""
    proc = session.running.get(SHADOW_SYSTEM)
    shadow = (proc.stats().get("shadow") if proc is not None else None) or {}
    if "batches" not in shadow:
        return None
    return shadow["batches"], shadow["offered_batches"]


def _scored_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the batches offered between two counts that the shadow scored."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def combine_latency_runs(runs: list[dict]) -> dict:
    """One system's paced latency over several runs: each percentile and the mean are the
    median over the runs, ``max`` the largest of them and ``messages`` their sum; the
    distribution (``cdf``) is that of the run whose p99.9 is the median one. ``runs``
    keeps every run's own figures, without its distribution."""
    order = sorted(range(len(runs)), key=lambda i: runs[i]["p99_9"])
    middle = runs[order[(len(runs) - 1) // 2]]
    combined = dict(middle)
    for name in (*PERCENTILES, "mean", "rate_sent"):
        combined[name] = statistics.median(run[name] for run in runs)
    combined["max"] = max(run["max"] for run in runs)
    combined["messages"] = sum(run["messages"] for run in runs)
    combined["runs"] = [{k: v for k, v in run.items() if k != "cdf"} for run in runs]
    return combined


def time_startups(session: Session, systems: list[System], runs: int, errors: list[str]) -> dict:
    """Seconds from exec to listening on the input port (the model loaded), per system: each
    started alone, with the machine otherwise as quiet as the benchmark leaves it."""
    out = {}
    for system in systems:
        times = []
        for _ in range(runs):
            assert session.listen_addr is not None  # open() started the listener
            proc = Running(system, session.listen_addr, session.model_dir, session.directory)
            try:
                times.append(proc.wait_ready(60.0, interval=0.002))
            except BenchError as exc:
                errors.append(f"start-up: {exc}")
                break
            finally:
                proc.stop()
        if times:
            out[system.key] = {"label": system.label, "runs": times, **rate_summary(times)}
            session.log(
                f"start-up  {system.label:28s} median {out[system.key]['median']:.3f} s "
                f"(min {min(times):.3f}, max {max(times):.3f}; {len(times)} starts)"
            )
    return out


def _median(figures: dict, key: str) -> float | None:
    return figures["throughput"].get(key, {}).get("median")


#: ratio name -> (numerator system, denominator system)
RATIOS = {
    "u8_vs_baseline": ("digitstream_u8", "baseline"),
    "pickle_vs_baseline": ("digitstream_pickle", "baseline"),
    "u8_vs_relay": ("digitstream_u8", "relay_u8"),
    "pickle_vs_relay": ("digitstream_pickle", "relay_pickle"),
    "metrics_on_vs_off": ("digitstream_u8", "digitstream_u8_no_metrics"),
    "drift_on_vs_off": ("digitstream_u8_drift", "digitstream_u8"),
    "shadow_vs_none": ("digitstream_u8_shadow", "digitstream_u8"),
}


def compute_ratios(figures: dict) -> dict:
    """Each ratio of medians."""
    return {
        name: ratio(_median(figures, a), _median(figures, b)) for name, (a, b) in RATIOS.items()
    }


def compute_paired_ratios(figures: dict) -> dict:
    """Each ratio taken within every round (runs measured minutes apart at most), then
    the median over rounds: steadier than the ratio of medians when the machine's
    load drifts during the benchmark."""
    out = {}
    for name, (a, b) in RATIOS.items():
        runs_a = figures["throughput"].get(a, {}).get("runs", [])
        runs_b = figures["throughput"].get(b, {}).get("runs", [])
        pairs = [x["msg_per_s"] / y["msg_per_s"] for x, y in zip(runs_a, runs_b)]
        paired = pairs and len(runs_a) == len(runs_b)
        out[name] = float(statistics.median(pairs)) if paired else None
    return out


def evaluate_targets(figures: dict) -> list[dict]:
    t = TARGETS
    ratios = figures["ratios"]
    p99 = figures["latency"].get("digitstream_u8", {}).get("p99")
    u8_p99_9 = figures["latency"].get("digitstream_u8", {}).get("p99_9")
    pickle_p99 = figures["latency"].get("digitstream_pickle", {}).get("p99")
    json_rate = _median(figures, "digitstream_json_workers")
    json_one = _median(figures, "digitstream_json")
    startup = figures.get("startup", {}).get("digitstream_u8", {}).get("median")
    memory = figures["memory"]

    def row(name, target_text, measured, met, unit=""):
        return {
            "name": name,
            "target": target_text,
            "measured": measured,
            "unit": unit,
            "met": None if measured is None else met,
        }

    paired = figures.get("ratios_paired") or {}

    def ratio_row(name: str, key: str, least: float) -> dict:
        """A ratio target, judged by the paired ratio (steadier on a shared host) when the
        rounds pair up; the ratio of medians goes in the note."""
        of_medians, measured = ratios[key], paired.get(key)
        if measured is None:
            return row(name, f">= {least}", of_medians, (of_medians or 0) >= least, "x")
        out = row(name, f">= {least}", measured, measured >= least, "x")
        if of_medians is not None:
            shown = f"{of_medians:.2f}" if of_medians < 10 else f"{of_medians:,.0f}"
            out["note"] = f"paired; of medians {shown}"
        return out

    answered = memory.get("messages_answered") or 0
    peak = memory.get("peak_rss_mb")
    memory_row = row(
        "digitstream u8 peak RSS",
        f"<= {t['peak_rss_mb']} MB over {t['memory_messages'] / 1e6:.0f} M messages",
        peak,
        peak is not None and peak <= t["peak_rss_mb"],
        "MB",
    )
    if peak is not None and answered < t["memory_messages"]:
        memory_row["met"] = None
        memory_row["note"] = f"only {answered:,} messages in this run"
    u8, pickle = _median(figures, "digitstream_u8"), _median(figures, "digitstream_pickle")
    json_row = row(
        "digitstream json (labelled, json out, --workers 2) throughput",
        f">= {t['json_msg_per_s']:,} msg/s",
        json_rate,
        json_rate is not None and json_rate >= t["json_msg_per_s"],
        "msg/s",
    )
    if json_one is not None:
        json_row["note"] = f"{json_one:,.0f} msg/s in one process"
    rows = [
        row(
            "digitstream u8 throughput",
            f">= {t['u8_msg_per_s']:,} msg/s",
            u8,
            u8 is not None and u8 >= t["u8_msg_per_s"],
            "msg/s",
        ),
        ratio_row("digitstream u8 / relay u8", "u8_vs_relay", t["u8_vs_relay"]),
        row(
            "digitstream pickle throughput",
            f">= {t['pickle_msg_per_s']:,} msg/s",
            pickle,
            pickle is not None and pickle >= t["pickle_msg_per_s"],
            "msg/s",
        ),
        json_row,
        ratio_row("digitstream u8 / baseline", "u8_vs_baseline", t["vs_baseline"]),
        ratio_row(
            "digitstream pickle / baseline (same input)", "pickle_vs_baseline", t["vs_baseline"]
        ),
        row(
            "digitstream u8 p99 latency, paced",
            f"<= {t['p99_ms']} ms",
            p99,
            p99 is not None and p99 <= t["p99_ms"],
            "ms",
        ),
        row(
            "digitstream u8 p99.9 latency, paced",
            f"<= {t['u8_p99_9_ms']} ms",
            u8_p99_9,
            u8_p99_9 is not None and u8_p99_9 <= t["u8_p99_9_ms"],
            "ms",
        ),
        row(
            "digitstream pickle p99 latency, paced",
            f"<= {t['pickle_p99_ms']} ms",
            pickle_p99,
            pickle_p99 is not None and pickle_p99 <= t["pickle_p99_ms"],
            "ms",
        ),
        row(
            "digitstream run start-up (exec to listening)",
            f"<= {t['startup_s']} s",
            startup,
            startup is not None and startup <= t["startup_s"],
            "s",
        ),
        memory_row,
        ratio_row("metrics on / off (u8)", "metrics_on_vs_off", t["metrics_on_vs_off"]),
        ratio_row("drift on / off (u8)", "drift_on_vs_off", t["drift_on_vs_off"]),
        _shadow_row(
            ratio_row("served u8 with a shadow / without", "shadow_vs_none", t["shadow_vs_none"]),
            figures.get("shadow") or {},
        ),
    ]
    return rows


def _shadow_row(row: dict, share: dict) -> dict:
    """The shadow's ratio row, with the share of batches its shadow scored beside it."""
    said = []
    if share.get("throughput") is not None:
        said.append(f"shadow scored {share['throughput']:.0%} of batches at full speed")
    if share.get("paced") is not None:
        said.append(f"{share['paced']:.0%} at {share['paced_rate']:,.0f} msg/s paced")
    if said:
        row["note"] = "; ".join([*([row["note"]] if row.get("note") else []), *said])
    return row


# ---------------------------------------------------------------------- main
def main(
    quick: bool = False,
    json_path: str | None = None,
    plot_path: str | None = None,
    engine: str = "local",
    soak_minutes: float | None = None,
    runs: int | None = None,
) -> int:
    """``digitstream bench``; the exit status (1 if any measurement failed)."""
    # tables wider than a pipe's default 80 columns stay readable in a log file
    console = Console(width=None if sys.stdout.isatty() else 120)
    progress = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 120)
    started = time.monotonic()

    def log(text: str) -> None:
        progress.print(f"[dim]{time.monotonic() - started:6.1f}s[/dim] {text}")

    # a stop by SIGTERM must still stop the systems under test: they are not
    # children that die with this process
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        figures = _measure(quick, engine, soak_minutes, runs, log)
    except KeyboardInterrupt:
        progress.print("bench: interrupted; every process it started is stopped")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if "soak" in figures:
        report.print_soak(figures, console)
    else:
        report.print_report(figures, console)
    figures["duration_s"] = round(time.monotonic() - started, 1)
    if json_path:
        report.write_json(figures, json_path)
        log(f"figures written to {json_path}")
    if plot_path:
        report.write_plot(figures, plot_path)
        log(f"chart written to {plot_path}")
    return 1 if figures["errors"] or figures.get("dask", {}).get("errors") else 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _measure(quick: bool, engine: str, soak_minutes: float | None, runs: int | None, log) -> dict:
    if soak_minutes is not None:
        with Session(log) as session:
            return run_soak(session, soak_minutes)
    settings = Settings.quick_run() if quick else Settings.full()
    if runs is not None:
        settings = replace(settings, runs=runs)
    with Session(log) as session:
        figures = run_suite(settings, session)
        figures["acked"] = run_acked(session, settings, figures)
        if engine == "dask":
            figures["dask"] = run_dask(session, settings)
    return figures
