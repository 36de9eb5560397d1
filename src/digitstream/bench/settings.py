"""The benchmark's settings, and the skeleton of its figures: what was run, where, with what.

Shared by the suite (:mod:`~digitstream.bench.runner`) and the soak
(:mod:`~digitstream.bench.soak`), which the runner starts.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import psutil

import digitstream


@dataclass
class Settings:
    runs: int
    messages: dict[str, int]  # per system key, per throughput run
    warmup: dict[str, int]
    latency_rate: float = 100_000
    latency_seconds: float = 10.0
    #: paced latency runs per system, in turns (the figures are medians over them)
    latency_rounds: int = 3
    quick: bool = False
    startup_runs: int = 5

    @classmethod
    def full(cls) -> Settings:
        messages = {
            "digitstream_u8": 20_000_000,
            "digitstream_u8_no_metrics": 20_000_000,
            "digitstream_u8_drift": 20_000_000,
            "digitstream_u8_shadow": 20_000_000,
            "digitstream_pickle": 5_000_000,
            "digitstream_f32": 5_000_000,
            "digitstream_json": 2_000_000,
            "digitstream_json_workers": 3_000_000,
            "baseline": 20_000,
            "relay_u8": 10_000_000,
            "relay_pickle": 5_000_000,
        }
        return cls(runs=5, messages=messages, warmup=_warmups(messages), latency_seconds=10.0)

    @classmethod
    def quick_run(cls) -> Settings:
        messages = {
            "digitstream_u8": 1_000_000,
            "digitstream_u8_no_metrics": 1_000_000,
            "digitstream_u8_drift": 1_000_000,
            "digitstream_u8_shadow": 1_000_000,
            "digitstream_pickle": 300_000,
            "digitstream_f32": 300_000,
            "digitstream_json": 100_000,
            "digitstream_json_workers": 100_000,
            "baseline": 1_000,
            "relay_u8": 1_000_000,
            "relay_pickle": 300_000,
        }
        return cls(
            runs=3,
            messages=messages,
            warmup=_warmups(messages),
            latency_seconds=1.5,
            latency_rounds=1,
            quick=True,
            startup_runs=3,
        )


def _warmups(messages: dict[str, int]) -> dict[str, int]:
    return {key: max(100, min(200_000, n // 10)) for key, n in messages.items()}


def new_figures(settings: Settings) -> dict:
    return {
        "benchmark": "digitstream bench",
        "command": command_line(),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": settings.quick,
        "settings": {
            "runs": settings.runs,
            "messages_per_run": settings.messages,
            "warmup_messages": settings.warmup,
            "latency_rate": settings.latency_rate,
            "latency_seconds": settings.latency_seconds,
            "latency_rounds": settings.latency_rounds,
            "startup_runs": settings.startup_runs,
        },
        "machine": machine_info(),
        "versions": versions(),
        "throughput": {},
        "latency": {},
        "memory": {},
        "ratios": {},
        "ratios_paired": {},
        "targets": [],
        "errors": [],
    }


def command_line() -> str:
    """How this benchmark was started, as a user would type it."""
    args = sys.argv[1:]
    return "digitstream " + shlex.join(args) if "bench" in args else "digitstream bench"


# ------------------------------------------------------------- environment
def machine_info() -> dict:
    model = None
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cpu_model": model or platform.processor() or None,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "blas_env": {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS_")},
    }


def versions() -> dict:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("digitstream", "numpy", "scikit-learn", "skops"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out["digitstream_source"] = _source_revision()
    return out


def _source_revision() -> str | None:
    """The git commit of the source tree digitstream runs from, "+changes" if it differs."""
    where = Path(digitstream.__file__).parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if commit.returncode != 0:
            return None
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "."],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return commit.stdout.strip() + ("+changes" if changed.stdout.strip() else "")
