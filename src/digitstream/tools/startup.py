"""Start-up time of a command: from exec until it says it listens.

:func:`measure_startup` starts a command ``runs`` times, one after the other,
and times each from just before the process is spawned until a line of its
output (stdout and stderr together) matches ``pattern``; the process is then
stopped with SIGTERM (killed if it does not exit). ``digitstream run`` logs
``listening on HOST:PORT, results to ...`` once it is fully ready to serve,
which is the default pattern.

As a script, it measures ``digitstream run`` on free ports, with a listener of
its own for the results::

    python -m digitstream.tools.startup --model models --runs 10
"""

from __future__ import annotations

import argparse
import os
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

#: what ``digitstream run`` logs once it serves
LISTENING = r"listening on \S+, results to "


class StartupError(RuntimeError):
    """The command exited, or said nothing matching, before it listened."""


def measure_startup(
    cmd: list[str],
    runs: int,
    *,
    pattern: str = LISTENING,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> dict:
    """Start ``cmd`` ``runs`` times and time each until a line matches ``pattern``.

    Returns ``{"runs": N, "median": s, "min": s, "max": s, "seconds": [s, ...]}``,
    in seconds. Raises :class:`StartupError` (with the command's output) if a
    run exits or stays silent for ``timeout`` seconds before the line.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, not {runs}")
    wanted = re.compile(pattern)
    seconds = [_one_start(cmd, wanted, timeout, env) for _ in range(runs)]
    return {
        "runs": runs,
        "median": statistics.median(seconds),
        "min": min(seconds),
        "max": max(seconds),
        "seconds": seconds,
    }


def _one_start(
    cmd: Sequence[str], wanted: re.Pattern, timeout: float, env: dict[str, str] | None
) -> float:
    started = time.perf_counter()
    proc = subprocess.Popen(
        list(cmd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=None if env is None else {**os.environ, **env},
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    output = b""
    searched = 0  # output before this offset holds no whole line that matched
    deadline = started + timeout
    try:
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise StartupError(
                    f"no line matching {wanted.pattern!r} within {timeout:.0f} s from "
                    f"{' '.join(cmd)}:\n{output.decode(errors='replace')}"
                )
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                continue
            chunk = os.read(fd, 65536)
            now = time.perf_counter()
            if not chunk:
                proc.wait()
                raise StartupError(
                    f"{' '.join(cmd)} exited with status {proc.returncode} before a line "
                    f"matching {wanted.pattern!r}:\n{output.decode(errors='replace')}"
                )
            output += chunk
            end = output.rfind(b"\n") + 1
            if end > searched:
                if wanted.search(output[searched:end].decode(errors="replace")):
                    return now - started
                searched = end
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


class _Sink:
    """A TCP listener on a free loopback port that takes and discards what it is sent."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    @staticmethod
    def _drain(conn: socket.socket) -> None:
        with conn:
            while conn.recv(65536):
                pass

    def close(self) -> None:
        self.server.close()


def run_command(model: str, out_port: int, *extra: str) -> list[str]:
    """``digitstream run`` on free ports (input and metrics), results to ``out_port``: the
    console script beside this interpreter, or ``python -m digitstream.cli`` without one."""
    script = os.path.join(os.path.dirname(sys.executable), "digitstream")
    program = [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "digitstream.cli"]
    return [
        *program,
        "run",
        "--in",
        "127.0.0.1:0",
        "--out",
        f"127.0.0.1:{out_port}",
        "--metrics",
        "127.0.0.1:0",
        "--model",
        model,
        *extra,
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m digitstream.tools.startup",
        description="Median time from exec of `digitstream run` until it listens.",
    )
    parser.add_argument("--model", default="models", help="model bundle (default: models)")
    parser.add_argument("--runs", type=int, default=10, help="starts (default: 10)")
    parser.add_argument("extra", nargs="*", help="more `run` options, after --")
    args = parser.parse_args(argv)
    sink = _Sink()
    try:
        cmd = run_command(args.model, sink.port, *args.extra)
        result = measure_startup(cmd, args.runs)
    finally:
        sink.close()
    print(
        f"{' '.join(cmd)}\n{result['runs']} runs: median {result['median']:.3f} s, "
        f"min {result['min']:.3f} s, max {result['max']:.3f} s"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
