"""A Dask cluster across two hosts (network namespaces, see :mod:`hosts`), for
``digitstream bench --engine dask --scheduler``::

    sudo .venv/bin/python tests/hosts_cluster.py [--workers-per-host N]

Host ``a``: the scheduler and N workers; host ``b``: N workers; each worker one
thread, without a nanny. The benchmark (or ``digitstream run``) stays in the
root namespace, which reaches both hosts through the bridge at its address
(printed). It prints the scheduler's address once every worker has joined,
and removes everything (processes, namespaces, bridge) on Ctrl-C, SIGTERM, or
when a process of the cluster exits.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import hosts as hostlib

PORT = 8786
_ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def _stop(signum, frame):
    raise KeyboardInterrupt


def _wait(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(0.1)


def _listening(address: str) -> bool:
    try:
        socket.create_connection((address, PORT), timeout=0.5).close()
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers-per-host", type=int, default=1)
    args = parser.parse_args(argv)
    why_not = hostlib.unavailable()
    if why_not:
        print(f"hosts_cluster: {why_not}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop)
    logs = Path(tempfile.mkdtemp(prefix="digitstream-hosts-"))
    net = hostlib.Hosts(["a", "b"])
    try:
        a, b = net["a"], net["b"]
        address = f"tcp://{a.address}:{PORT}"
        py = sys.executable
        procs = [a.start([py, "-m", "dask", "scheduler", "--host", a.address, "--port",
                          str(PORT), "--no-dashboard"], logs / "scheduler.log", env=_ONE_THREAD)]
        _wait(lambda: _listening(a.address), 30, "the scheduler")
        names = []
        for host in (a, b):
            for i in range(args.workers_per_host):
                name = f"{host.name}{i + 1}"
                names.append(name)
                procs.append(host.start(
                    [py, "-m", "dask", "worker", address, "--host", host.address,
                     "--nthreads", "1", "--no-nanny", "--no-dashboard", "--name", name,
                     "--local-directory", str(logs / name)],
                    logs / f"worker-{name}.log", env=_ONE_THREAD))

        def joined() -> bool:
            text = (logs / "scheduler.log").read_text(errors="replace")
            return all(f"name: {n}," in text or f"name: {n}\n" in text for n in names)

        _wait(joined, 60, "the workers")
        print(f"scheduler {address}", flush=True)
        print(f"workers {', '.join(names)} (host a {a.address}, host b {b.address}); "
              f"the root namespace is {net.gateway}; logs in {logs}", flush=True)
        print("Ctrl-C removes the cluster", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        print("hosts_cluster: a process of the cluster exited (see the logs)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        # a second Ctrl-C (or a SIGTERM beside it) must not cut the removal short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        net.close()
        print("hosts_cluster: removed", flush=True)


if __name__ == "__main__":
    sys.exit(main())
