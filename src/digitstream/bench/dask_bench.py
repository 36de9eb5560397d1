"""``digitstream bench --engine dask``: the Dask engine beside the local one.

Two questions, on this machine over loopback, with the benchmark's sender and
listener (:class:`~digitstream.bench.session.Session`); each application runs
``--engine dask --workers N``, a local cluster of N worker processes:

1. **Does the work spread?** A compute-heavy model (scaler, then an RBF
   SVC: some hundred times the seed's model's cost per image) through one and
   through two workers. Target: two workers >= 1.6 x one. Batches are capped
   (``--max-batch``) so that a run has enough of them to share.
2. **What does Dask cost?** The seed's linear model through the local engine
   and through Dask: throughput side by side; latency at a paced rate, where
   Dask's median minus the local engine's is what the round trips and the
   batches queued behind them add (hence also a run with ``--in-flight 1``);
   and, measured on the engine in this process, the overhead of one batch's
   round trip with nothing queued.

Systems of one question are started together and measured in turns, as the
main suite does, so that a slow spell of the shared machine spreads over all.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from digitstream.batch import Batch
from digitstream.bench.report import print_dask
from digitstream.bench.session import Session
from digitstream.bench.settings import Settings
from digitstream.bench.systems import BenchError, System, start_all
from digitstream.datasets import load_dataset
from digitstream.engine.base import EngineOptions
from digitstream.model.bundle import load_bundle, save_bundle
from digitstream.model.runner import make_runner
from digitstream.pipeline import Flow, FlowOptions
from digitstream.tools.measure import rate_summary, ratio
from digitstream.wire.framing import Payloads

#: two workers / one worker, compute-heavy model
SPEEDUP_TARGET = 1.6
#: at least this many throughput runs per system with the heavy model
HEAVY_MIN_RUNS = 5
#: batch cap with the heavy model: ~0.1 s of one core per batch, many batches per run
HEAVY_MAX_BATCH = 1000
#: the latency runs are paced at this rate (messages/s), for this long (s)
LATENCY_RATE = 20_000
LATENCY_SECONDS = {True: 2.0, False: 6.0}
#: messages per throughput run: heavy model, linear model (quick, full)
MESSAGES = {"heavy": {True: 60_000, False: 200_000}, "linear": {True: 500_000, False: 3_000_000}}


def _dask(workers: int, *more: str) -> tuple[str, ...]:
    return ("--engine", "dask", "--workers", str(workers), *more)


HEAVY = [
    System(
        "heavy_local",
        "local engine",
        "digitstream",
        "u8",
        args=("--max-batch", str(HEAVY_MAX_BATCH)),
    ),
    System(
        "heavy_dask_1",
        "dask, 1 worker",
        "digitstream",
        "u8",
        args=_dask(1, "--max-batch", str(HEAVY_MAX_BATCH)),
    ),
    System(
        "heavy_dask_2",
        "dask, 2 workers",
        "digitstream",
        "u8",
        args=_dask(2, "--max-batch", str(HEAVY_MAX_BATCH)),
    ),
]
LINEAR = [
    System("linear_local", "local engine", "digitstream", "u8"),
    System("linear_dask_1", "dask, 1 worker", "digitstream", "u8", args=_dask(1)),
    System("linear_dask_2", "dask, 2 workers", "digitstream", "u8", args=_dask(2)),
    System(
        "linear_dask_2_if1",
        "dask, 2 workers, 1 in flight",
        "digitstream",
        "u8",
        args=_dask(2, "--in-flight", "1"),
    ),
]


def cluster_systems(scheduler: str) -> tuple[list[System], list[System]]:
    """The systems of both questions against the running cluster at ``scheduler``: its
    workers, whatever their number, in place of local clusters of one and two."""
    on = ("--engine", "dask", "--scheduler", scheduler)
    heavy = [
        HEAVY[0],
        System(
            "heavy_dask",
            "dask, the cluster",
            "digitstream",
            "u8",
            args=(*on, "--max-batch", str(HEAVY_MAX_BATCH)),
        ),
    ]
    linear = [
        LINEAR[0],
        System("linear_dask", "dask, the cluster", "digitstream", "u8", args=on),
        System(
            "linear_dask_if1",
            "dask, the cluster, 1 in flight",
            "digitstream",
            "u8",
            args=(*on, "--in-flight", "1"),
        ),
    ]
    return heavy, linear


def cluster_workers(scheduler: str) -> int:
    """How many workers the scheduler at ``scheduler`` has now."""
    # heavy, and optional: distributed, only with --engine dask
    from distributed import Client

    with Client(scheduler, timeout=10, set_as_default=False) as client:
        return len(client.scheduler_info(n_workers=-1)["workers"])


def main(
    scheduler: str, quick: bool = False, json_path: str | None = None, runs: int | None = None
) -> int:
    """``digitstream bench --engine dask --scheduler ADDR``: the Dask questions alone,
    against a running cluster; the exit status."""
    console = Console(width=None if sys.stdout.isatty() else 120)
    started = time.monotonic()

    def log(text: str) -> None:
        console.print(f"[dim]{time.monotonic() - started:6.1f}s[/dim] {text}")

    settings = Settings.quick_run() if quick else Settings.full()
    if runs is not None:
        settings = replace(settings, runs=runs)
    with Session(log) as session:
        figures = run(session, settings, console, scheduler=scheduler)
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2, default=str))
    return 1 if figures["errors"] else 0


def heavy_model(directory: Path) -> dict:
    """Fit the compute-heavy model on the digits set and save it as a bundle."""
    # heavy: scikit-learn, to fit the model
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    data = load_dataset("digits")
    pipeline = Pipeline(
        [("Scaler", StandardScaler()), ("RBF SVM", SVC(kernel="rbf", C=10, gamma="scale"))]
    )
    pipeline.fit(data.X, data.y)
    accuracy = float(np.mean(pipeline.predict(data.X) == data.y))
    save_bundle(
        pipeline,
        directory,
        {"dataset": "digits", "model": "scaler-rbf-svc", "training_accuracy": accuracy},
    )
    return {
        "steps": [name for name, _ in pipeline.steps],
        "support_vectors": int(pipeline[-1].support_vectors_.shape[0]),
    }


def run(session, settings, console=None, scheduler: str | None = None) -> dict:
    """Measure both questions; the figures (and a table printed on ``console``).

    With ``scheduler``, against that running cluster: its workers, however many,
    beside the local engine (``workers`` says how many); the two-workers question
    then compares the cluster with the local engine, not two workers with one.
    """
    quick = settings.quick
    figures: dict = {
        "speedup_target": SPEEDUP_TARGET,
        "latency_rate": LATENCY_RATE,
        "errors": [],
        "cores": os.cpu_count(),
    }
    heavy_systems, linear_systems = HEAVY, LINEAR
    if scheduler:
        heavy_systems, linear_systems = cluster_systems(scheduler)
        figures["scheduler"] = scheduler
        figures["workers"] = cluster_workers(scheduler)
        session.log(f"dask: the cluster at {scheduler}, {figures['workers']} worker(s)")
    load_before = os.getloadavg()[0]
    heavy_dir = session.directory / "model-heavy"
    session.log("dask: fitting the compute-heavy model (scaler, RBF SVC)")
    figures["heavy_model"] = heavy_model(heavy_dir)

    # runs of the heavy model are short: a few more of them steady the median
    heavy = _measure(
        session,
        heavy_systems,
        heavy_dir,
        MESSAGES["heavy"][quick],
        max(settings.runs, HEAVY_MIN_RUNS),
        figures["errors"],
    )
    figures["heavy"] = heavy
    one, two = heavy.get("heavy_dask_1", {}), heavy.get("heavy_dask_2", {})
    figures["speedup_2_vs_1"] = ratio(two.get("median"), one.get("median"))

    if scheduler:
        figures["heavy_cluster_vs_local"] = ratio(
            heavy.get("heavy_dask", {}).get("median"), heavy.get("heavy_local", {}).get("median")
        )
    # against a running cluster, its workers; else the local cluster of two
    linear_dask = "linear_dask" if scheduler else "linear_dask_2"
    linear = _measure(
        session,
        linear_systems,
        session.model_dir,
        MESSAGES["linear"][quick],
        settings.runs,
        figures["errors"],
        latency=("linear_local", linear_dask, f"{linear_dask}_if1"),
        latency_seconds=LATENCY_SECONDS[quick],
    )
    figures["linear"] = linear
    vs_local = ratio(
        linear.get(linear_dask, {}).get("median"), linear.get("linear_local", {}).get("median")
    )
    if scheduler:
        figures["dask_cluster_vs_local"] = vs_local
    else:
        figures["dask_2_vs_local"] = vs_local
        local_p50 = linear.get("linear_local", {}).get("latency", {}).get("p50")
        dask_p50 = linear.get(linear_dask, {}).get("latency", {}).get("p50")
        figures["added_p50_ms"] = (
            (dask_p50 - local_p50) if None not in (local_p50, dask_p50) else None
        )
        session.log("dask: round trip of one batch, in this process (one local worker)")
    try:
        figures["round_trip"] = round_trip(session.model_dir, quick, scheduler=scheduler)
    except Exception as exc:  # a figure missing, not the whole benchmark
        figures["errors"].append(f"round trip probe: {type(exc).__name__}: {exc}")
    figures["load_average"] = [load_before, os.getloadavg()[0]]
    speedup = figures["speedup_2_vs_1"]
    # a running cluster has the workers it has: no two-against-one target
    figures["met"] = None if scheduler or speedup is None else speedup >= SPEEDUP_TARGET
    if console is not None:
        print_dask(figures, console)
        if scheduler:
            console.print(
                f"the cluster at {scheduler}: {figures['workers']} worker(s); "
                f"heavy model, cluster / local engine: "
                f"{figures['heavy_cluster_vs_local'] or 0:.2f}; linear model, cluster / local "
                f"engine: {figures['dask_cluster_vs_local'] or 0:.2f}"
            )
    return figures


def _measure(
    session,
    systems: list[System],
    model_dir: Path,
    messages: int,
    runs: int,
    errors: list[str],
    latency=(),
    latency_seconds: float = 2.0,
) -> dict:
    log = session.log
    log(f"dask: starting {', '.join(s.key for s in systems)}")
    try:
        started = start_all(systems, session.listen_addr, model_dir, session.directory)
    except BenchError as exc:
        errors.append(str(exc))
        return {}
    for key, proc in started.items():
        session.running[key] = proc
        session.sampler.watch(key, proc.pid)
    live = list(systems)
    out: dict[str, dict[str, Any]] = {
        s.key: {
            "label": s.label,
            "args": " ".join(s.args),
            "messages_per_run": messages,
            "runs": [],
        }
        for s in systems
    }

    def attempt(system: System, what: str, measure):
        return session.attempt(system, what, measure, live, errors)

    try:
        for system in list(live):
            attempt(
                system,
                "warm-up",
                functools.partial(session.throughput, system.key, max(1000, messages // 10)),
            )
        for round_no in range(1, runs + 1):
            for system in list(live):
                result = attempt(
                    system,
                    f"run {round_no}",
                    functools.partial(session.throughput, system.key, messages),
                )
                if result is not None:
                    out[system.key]["runs"].append(result)
                    log(
                        f"dask: run {round_no}/{runs}  {system.key:16s} "
                        f"{result['msg_per_s']:>12,.0f} msg/s"
                    )
        for key in latency:
            found = next((s for s in live if s.key == key), None)
            if found is not None:
                result = attempt(
                    found,
                    "latency",
                    functools.partial(session.latency, key, LATENCY_RATE, latency_seconds),
                )
                if result is not None:
                    result.pop("cdf", None)
                    out[key]["latency"] = result
                    log(
                        f"dask: latency at {LATENCY_RATE:,} msg/s  {key:16s} "
                        f"p50 {result['p50']:.2f} ms  p99 {result['p99']:.2f} ms"
                    )
    finally:
        for system in systems:
            session.stop(system.key)
    for fig in out.values():
        fig.update(rate_summary([r["msg_per_s"] for r in fig["runs"]]))
    return out


def round_trip(
    model_dir: Path, quick: bool, batch_size: int = 1000, scheduler: str | None = None
) -> dict:
    """What the cluster adds to one batch, measured on the engine itself.

    One worker (a local cluster), the linear model, one batch at a time so
    nothing queues: the median time from ``submit`` to the result, beside the
    median time the same batch takes in this process; then as many one-message
    batches as the cluster takes in a few seconds, ``in_flight`` at a time:
    the most batches per second the engine can turn over.
    """
    # heavy, and optional: distributed, only with --engine dask
    from digitstream.engine.dask import DaskEngine

    options = EngineOptions(
        flow=FlowOptions(input_format="u8"),
        workers=None if scheduler else 1,
        scheduler=scheduler,
    )
    bundle = load_bundle(model_dir)
    flow = Flow(make_runner(bundle.pipeline), "u8", "text", worker="bench")
    X = load_dataset("digits").X.astype(np.uint8)
    rows = np.resize(X, (batch_size, X.shape[1]))
    samples = 30 if quick else 100
    seconds = 2.0 if quick else 5.0

    async def measure() -> dict:
        engine = DaskEngine(flow, bundle, options)
        await engine.start()
        try:
            batch = Batch(1, 0, Payloads(fixed=rows), 0)
            local, remote = [], []
            for i in range(samples + 3):
                t0 = time.perf_counter()
                flow.process(batch)
                t1 = time.perf_counter()
                await (await engine.submit(Batch(1, i * batch_size, batch.payloads, 0)))
                t2 = time.perf_counter()
                if i >= 3:  # the first batches warm up connections and caches
                    local.append(t1 - t0)
                    remote.append(t2 - t1)
            one = Payloads(fixed=rows[:1])
            pending: list = []
            done = 0
            started = time.perf_counter()
            seq = 10_000_000
            while time.perf_counter() - started < seconds:
                pending.append(await engine.submit(Batch(2, seq, one, 0)))
                seq += 1
                if len(pending) >= engine.capacity:
                    await pending.pop(0)
                    done += 1
            for future in pending:
                await future
                done += 1
            elapsed = time.perf_counter() - started
        finally:
            await engine.close()
        local_ms = statistics.median(local) * 1e3
        remote_ms = statistics.median(remote) * 1e3
        return {
            "batch_size": batch_size,
            "batches": samples,
            "local_ms": local_ms,
            "dask_ms": remote_ms,
            "overhead_ms": remote_ms - local_ms,
            "batches_per_s": done / elapsed,
            "in_flight": options.in_flight,
        }

    return asyncio.run(measure())
