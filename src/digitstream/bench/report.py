"""The benchmark's figures as tables (rich), a JSON file and a chart (PNG)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from rich.console import JustifyMethod


def _num(value, fmt: str = ",.0f", missing: str = "—") -> str:
    return missing if value is None else format(value, fmt)


def _mark(met) -> str:
    return {True: "[green]met[/green]", False: "[red]missed[/red]", None: "[yellow]n/a[/yellow]"}[
        met
    ]


def print_header(figures: dict, console: Console) -> None:
    m, v = figures["machine"], figures["versions"]
    console.print(f"[bold]{figures['command']}[/bold]  ({figures['started']})")
    console.print(
        f"machine: {m['cpu_model']}, {m['cores_logical']} logical cores "
        f"({m['cores_physical']} physical), {m['memory_gb']} GB, {m['platform']}, "
        f"load average at start {' '.join(map(str, m['load_average_at_start']))}"
    )
    console.print("versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    model = figures.get("model") or {}
    if model:
        console.print(
            f"model: {' -> '.join(model['steps'])}, {model['n_features']} features, "
            f"fitted on {model['fitted_on']} of {model['dataset']}"
        )


def print_report(figures: dict, console: Console) -> None:
    print_header(figures, console)
    settings = figures["settings"]

    table = Table(title=f"Throughput, end to end (median of {settings['runs']} runs)")
    columns: list[tuple[str, JustifyMethod]] = [
        ("system", "left"),
        ("input", "left"),
        ("messages/run", "right"),
        ("median msg/s", "right"),
        ("min – max msg/s", "right"),
        ("peak RSS", "right"),
    ]
    for name, justify in columns:
        table.add_column(name, justify=justify)
    for fig in figures["throughput"].values():
        table.add_row(
            fig["label"],
            fig["format"],
            _num(fig["messages_per_run"]),
            _num(fig["median"]),
            f"{_num(fig['min'])} – {_num(fig['max'])}",
            _num(fig["peak_rss_mb"], ",.0f") + " MB",
        )
    console.print(table)

    table = Table(
        title=f"Latency, end to end, paced at {settings['latency_rate']:,.0f} msg/s "
        f"for {settings['latency_seconds']:g} s (ms)"
        + _rounds_note(settings.get("latency_rounds", 1))
    )
    for name in ["system", "messages", "sent msg/s", "p50", "p90", "p99", "p99.9", "max"]:
        table.add_column(name, justify="left" if name == "system" else "right")
    for fig in figures["latency"].values():
        table.add_row(
            fig["label"],
            _num(fig["messages"]),
            _num(fig["rate_sent"]),
            *(_num(fig[k], ".3f") for k in ("p50", "p90", "p99", "p99_9", "max")),
        )
    console.print(table)

    startup = figures.get("startup") or {}
    if startup:
        table = Table(title="Start-up: exec to listening, model loaded (s)")
        for name in ["system", "starts", "median", "min", "max"]:
            table.add_column(name, justify="left" if name == "system" else "right")
        for fig in startup.values():
            table.add_row(
                fig["label"],
                str(len(fig["runs"])),
                *(_num(fig[k], ".3f") for k in ("median", "min", "max")),
            )
        console.print(table)

    table = Table(title="Ratios, this run")
    table.add_column("ratio")
    table.add_column("of medians", justify="right")
    table.add_column("paired (median over rounds)", justify="right")
    names = {
        "u8_vs_baseline": "digitstream u8 / seed design",
        "pickle_vs_baseline": "digitstream pickle / seed design (same input)",
        "u8_vs_relay": "digitstream u8 / relay u8 (the ceiling)",
        "pickle_vs_relay": "digitstream pickle / relay pickle",
        "metrics_on_vs_off": "digitstream u8, metrics on / off",
        "drift_on_vs_off": "digitstream u8, drift on / off",
        "shadow_vs_none": "digitstream u8, with a shadow / without",
    }
    paired = figures.get("ratios_paired", {})
    for key, value in figures["ratios"].items():
        table.add_row(names.get(key, key), _ratio(value), _ratio(paired.get(key)))
    console.print(table)

    table = Table(title="Targets")
    for name in ["target", "wanted", "measured", ""]:
        table.add_column(name)
    for row in figures["targets"]:
        measured = row["measured"]
        unit = row["unit"]
        text = (
            "—"
            if measured is None
            else f"{measured:,.0f} {unit}"
            if unit == "msg/s"
            else f"{measured:,.3f} {unit}"
            if unit in ("ms", "s")
            else f"{measured:,.0f} {unit}"
            if unit == "MB"
            else f"{measured:,.2f}{unit}"
            if measured < 10
            else f"{measured:,.0f}{unit}"
        )
        if row.get("note"):
            text += f" ({row['note']})"
        table.add_row(row["name"], row["target"], text, _mark(row["met"]))
    console.print(table)
    if "dask" in figures:
        print_dask(figures["dask"], console)
    if "acked" in figures:
        print_acked(figures["acked"], console)
    for error in figures["errors"]:
        console.print(f"[red]error:[/red] {error}")


def print_dask(figures: dict, console: Console) -> None:
    """The figures of the Dask benchmark (:mod:`~digitstream.bench.dask_bench`)."""
    heavy_steps = " -> ".join(figures.get("heavy_model", {}).get("steps", []))
    for part, title in (
        ("heavy", f"compute-heavy model ({heavy_steps})"),
        ("linear", "the seed's linear model"),
    ):
        table = Table(title=f"Dask engine, {title}: msg/s, u8, median of runs")
        for name in ("system", "median msg/s", "min – max", "p50 ms", "p99 ms", "run options"):
            table.add_column(name, justify="right" if "ms" in name else "left")
        for fig in figures.get(part, {}).values():
            lat = fig.get("latency", {})
            table.add_row(
                fig["label"],
                _num(fig["median"]),
                f"{_num(fig['min'])} – {_num(fig['max'])}",
                _num(lat.get("p50"), ".2f"),
                _num(lat.get("p99"), ".2f"),
                fig["args"],
            )
        console.print(table)
    mark = {True: "[green]met[/green]", False: "[red]missed[/red]", None: "n/a"}[figures.get("met")]
    console.print(
        f"compute-heavy model, 2 workers / 1 worker: "
        f"{_num(figures.get('speedup_2_vs_1'), '.2f')} "
        f"(target >= {figures.get('speedup_target')}) {mark}"
    )
    console.print(
        f"linear model, Dask with 2 workers / local engine: "
        f"{_num(figures.get('dask_2_vs_local'), '.2f')}; added median latency at "
        f"{_num(figures.get('latency_rate'), ',')} msg/s: "
        f"{_num(figures.get('added_p50_ms'), '.1f')} ms"
    )
    probe = figures.get("round_trip")
    if probe:
        console.print(
            f"one batch of {probe['batch_size']:,} messages, nothing queued: "
            f"{probe['dask_ms']:.1f} ms through Dask, {probe['local_ms']:.1f} ms in "
            f"process: [bold]{probe['overhead_ms']:.1f} ms overhead per batch[/bold]; "
            f"at most {probe['batches_per_s']:,.0f} batches/s with "
            f"{probe['in_flight']} in flight on one worker"
        )
    load = figures.get("load_average")
    if load:
        console.print(
            f"load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f} "
            f"on {figures.get('cores')} cores: other work on the machine shows here"
        )
    for error in figures.get("errors", []):
        console.print(f"[red]dask error:[/red] {error}")


def print_acked(acked: dict, console: Console) -> None:
    """The rows of ``--acked`` (:mod:`~digitstream.bench.acked_bench`)."""
    table = Table(title="Acknowledged delivery (--acked): median msg/s, latency to the ACK")
    for name in ("system", "median msg/s", "plain msg/s", "acked / plain", "p50 ms", "p99 ms"):
        table.add_column(name, justify="left" if name == "system" else "right")
    table.add_column("peak RSS MiB", justify="right")
    for row in acked.get("rows", {}).values():
        lat = row.get("latency", {})
        table.add_row(
            row["label"],
            _num(row.get("median")),
            _num(row.get("plain_median")),
            _num(row.get("vs_plain"), ".2f"),
            _num(lat.get("p50"), ".3f"),
            _num(lat.get("p99"), ".3f"),
            _num(row.get("peak_rss_mb"), ".0f"),
        )
    console.print(table)
    targets = acked.get("targets", {})
    mark = {True: "[green]met[/green]", False: "[red]missed[/red]", None: "n/a"}
    console.print(
        f"acked u8 / plain u8: {_num(targets.get('u8_vs_plain'), '.2f')} "
        f"(target >= {targets.get('u8_vs_plain_target')}) "
        f"{mark[targets.get('u8_vs_plain_met')]}; "
        f"acked u8 p99: {_num(targets.get('u8_p99_ms'), '.3f')} ms "
        f"(target <= {targets.get('u8_p99_target_ms')}) {mark[targets.get('u8_p99_met')]}"
    )
    for error in acked.get("errors", []):
        console.print(f"[red]error:[/red] {error}")


def print_soak(figures: dict, console: Console) -> None:
    print_header(figures, console)
    soak = figures["soak"]
    table = Table(title=f"Soak: digitstream u8, {soak['minutes']:g} min of sustained load")
    for name in ["t (s)", "msg/s", "app RSS (MB)"]:
        table.add_column(name, justify="right")
    for point in soak["timeline"]:
        table.add_row(f"{point['t']:.0f}", _num(point["msg_per_s"]), _num(point["rss_mb"], ",.1f"))
    console.print(table)
    if soak["timeline"]:
        console.print(
            f"{soak['messages']:,} messages in {soak['seconds']:.1f} s: "
            f"{soak['msg_per_s']:,.0f} msg/s overall; application RSS "
            f"{soak['rss_first_mb']:.0f} MB after the first chunk, "
            f"{soak['rss_last_mb']:.0f} MB after the last, peak {soak['peak_rss_mb']:.0f} MB"
        )
    for error in figures["errors"]:
        console.print(f"[red]error:[/red] {error}")


def write_json(figures: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(figures, indent=1, allow_nan=False) + "\n")


def write_plot(figures: dict, path: str | Path) -> None:
    """Throughput bars (log scale, one dot per run) and the latency distributions;
    for a soak, throughput and memory over time."""
    # heavy: matplotlib, only for --plot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # once the backend is chosen

    if "soak" in figures:
        fig = _plot_soak(plt, figures)
    else:
        fig, (bars, cdf) = plt.subplots(
            1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.2, 1]}
        )
        _plot_throughput(bars, figures)
        _plot_latency(cdf, figures)
        fig.suptitle(
            f"{figures['command']} — {figures['machine']['cpu_model']}, "
            f"{figures['machine']['cores_logical']} cores",
            fontsize=10,
        )
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_throughput(ax, figures: dict) -> None:
    items = [f for f in figures["throughput"].values() if f["median"]]
    colours = {"digitstream": "tab:blue", "baseline": "tab:red", "relay": "tab:gray"}
    xs = range(len(items))
    ax.bar(xs, [f["median"] for f in items], color=[colours[f["kind"]] for f in items])
    for x, f in zip(xs, items):
        runs = [r["msg_per_s"] for r in f["runs"]]
        ax.plot([x] * len(runs), runs, "k.", markersize=4)
        ax.annotate(
            _short(f["median"]),
            (x, f["median"]),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 3),
            textcoords="offset points",
        )
    ax.set_yscale("log")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f["label"] for f in items], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("messages/s, end to end (median; dots: runs)")
    ax.set_title("Throughput")
    ax.grid(axis="y", which="both", alpha=0.3)


def _rounds_note(rounds: int) -> str:
    """How a latency figure of several runs is made (see ``runner.combine_latency_runs``)."""
    if rounds <= 1:
        return ""
    return f"; {rounds} runs each, in turns: medians over the runs, max of all"


def _plot_latency(ax, figures: dict) -> None:
    """Latency by percentile, the tail stretched out: x is -log10(1 - fraction)."""
    # heavy: matplotlib, only for --plot
    from matplotlib.ticker import FuncFormatter

    top = 1
    for fig in figures["latency"].values():
        points = [(ms, f) for ms, f in fig["cdf"] if f < 1.0]
        if not points:
            continue
        ms, frac = np.array(points).T
        x = -np.log10(1.0 - frac)
        top = max(top, int(np.ceil(x.max())))
        ax.plot(x, np.maximum(ms, 1e-3), label=f"{fig['label']} (p99 {fig['p99']:.2f} ms)")
    labels = ["90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%", "99.99999%"][:top]
    ax.set_xticks([np.log10(2), *range(1, len(labels) + 1)])
    ax.set_xticklabels(["50%", *labels])
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency, ms (sender write to listener read)")
    ax.set_title(f"Latency at {figures['settings']['latency_rate']:,.0f} msg/s paced")
    ax.axhline(2.0, color="tab:red", lw=0.8, ls=":", label="target p99: 2 ms")
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")


def _plot_soak(plt, figures: dict):
    soak = figures["soak"]
    fig, (rate, rss) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    points = soak["timeline"]
    rate.plot([p["t"] for p in points], [p["msg_per_s"] for p in points], "o-")
    rate.set_ylabel("messages/s")
    rate.set_ylim(bottom=0)
    rate.set_title(f"Soak: digitstream u8, {soak['minutes']:g} min")
    samples = soak["rss_samples_mb"]
    rss.plot([s[0] for s in samples], [s[1] for s in samples])
    rss.set_ylabel("application RSS, MB")
    rss.set_xlabel("seconds")
    rss.set_ylim(bottom=0)
    for ax in (rate, rss):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _ratio(value: float | None) -> str:
    return _num(value, ",.2f" if value is not None and value < 10 else ",.0f")


def _short(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k"
    return f"{value:.0f}"


def broker_main(measure, model_path: str, quick: bool, json_path, runs, describe) -> int:
    """``digitstream bench --redis`` / ``--nats``: ``measure`` (a broker bench's) on the model
    at ``model_path`` (trained if missing), then its table, ratios and JSON;
    ``describe(figures)`` gives the table's title, the unit and the rates by system."""
    from digitstream.tools.demo import ensure_model  # start-up time: it imports the trainer

    console = Console(stderr=True)
    model = ensure_model(console, Path(model_path))
    figures = measure(
        model,
        total=50_000 if quick else 200_000,
        runs=runs or (1 if quick else 3),
        log=console.print,
    )
    title, unit, rates = describe(figures)
    print_broker(figures, title, unit, rates, json_path)
    return 0


def print_broker(
    figures: dict, title: str, unit: str, rates: dict[str, float], json_path: str | None
) -> None:
    """A broker benchmark's table (``unit`` per second per system, from ``rates``) and its
    ratios; and its figures to ``json_path``, if given."""
    table = Table(title=title, title_justify="left")
    for column in ("system", f"{unit}/s"):
        table.add_column(column)
    for name, rate in rates.items():
        table.add_row(name, f"{rate:,.0f}")
    Console().print(table)
    for name, value in figures["ratios"].items():
        print(f"{name}: {value:.2f}")
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2))
