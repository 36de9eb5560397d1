"""Hosts for tests: network namespaces on one bridge, each with an address of its own.

::

    root namespace (the test, ``digitstream run``)  10.213.N.1  on bridge dsbr<pid>
      |-- veth -- host "a"  10.213.N.11
      |-- veth -- host "b"  10.213.N.12
      ...

A host's processes run in its namespace (``ip netns exec``), so they have the
network of a machine of their own: their own loopback, their own ports, and
only the bridge to reach the others. :meth:`Host.cut` takes its cable out
(the bridge's end of its link goes down: packets vanish without a word, as
across a real network), :meth:`Hosts.partition` cuts two hosts off from each
other and from nobody else (a blackhole route on each side).

The subnet's third number comes from the test process's id, and every name
carries that id, so two runs never meet; what a run killed before its
clean-up left behind is removed by the next one. Only addresses made here
are ever used. Needs root and ``ip`` (iproute2): :func:`unavailable` says why
not, for a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

from helpers import stop_groups

PREFIX = "ds-"  # of the namespaces made here: ds-<pid>-<host>


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def unavailable() -> str | None:
    """Why hosts cannot be made here, or None if they can."""
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2) to make network namespaces"
    if os.geteuid() != 0:
        return "needs root to make network namespaces (ip netns)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> None:
    """Namespaces and bridges of test runs that are gone (killed before their clean-up)."""
    names = _ip("netns", "list", check=False).stdout.split()
    for name in names:
        found = re.fullmatch(rf"{PREFIX}(\d+)-\S+", name)
        if found and not _alive(int(found[1])):
            _kill_processes_in(name)
            _ip("netns", "del", name, check=False)
    for found in re.finditer(r"^\d+: (dsbr(\d+))[:@]", _ip("-o", "link", "show").stdout, re.M):
        if not _alive(int(found[2])):
            _ip("link", "del", found[1], check=False)


def _kill_processes_in(namespace: str) -> None:
    pids = _ip("netns", "pids", namespace, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


class Host:
    """One namespace: its address, its link to the bridge, the processes started on it."""

    def __init__(self, name: str, namespace: str, address: str, link: str):
        self.name = name
        self.namespace = namespace
        self.address = address
        self.link = link  # the bridge's end of its veth pair
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
        """``args`` run on this host, in a session of its own, output to ``log_path``."""
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", self.namespace, *args], stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, **(env or {})})
        self.procs.append(proc)
        return proc

    def cut(self) -> None:
        """Its cable out: nothing reaches it, nothing it sends arrives."""
        _ip("link", "set", self.link, "down")

    def restore(self) -> None:
        _ip("link", "set", self.link, "up")

    def stop_processes(self) -> None:
        """Every process started here: SIGTERM, then SIGKILL for any still there after 3 s."""
        stop_groups(self.procs)
        self.procs.clear()
        _kill_processes_in(self.namespace)  # anything they left in the namespace

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.address})"


class Hosts:
    """Namespaces ``names`` on a bridge of the root namespace, which is itself at
    :attr:`gateway`; everything is removed by :meth:`close`."""

    def __init__(self, names: list[str]):
        pid = os.getpid()
        self.subnet = f"10.213.{pid % 250 + 1}"
        self.gateway = f"{self.subnet}.1"
        self.bridge = f"dsbr{pid}"
        self.hosts: dict[str, Host] = {}
        remove_leftovers()
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, name in enumerate(names):
                namespace, link = f"{PREFIX}{pid}-{name}", f"ds{pid}{name}"
                host = Host(name, namespace, f"{self.subnet}.{11 + i}", link)
                _ip("netns", "add", namespace)
                self.hosts[name] = host
                _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns",
                    namespace)
                _ip("link", "set", link, "master", self.bridge, "up")
                _ip("-n", namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
                _ip("-n", namespace, "link", "set", "eth0", "up")
                _ip("-n", namespace, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def partition(self, a: Host, b: Host) -> None:
        """``a`` and ``b`` no longer reach each other; both still reach everyone else."""
        _ip("-n", a.namespace, "route", "add", "blackhole", f"{b.address}/32")
        _ip("-n", b.namespace, "route", "add", "blackhole", f"{a.address}/32")

    def heal(self, a: Host, b: Host) -> None:
        _ip("-n", a.namespace, "route", "del", "blackhole", f"{b.address}/32", check=False)
        _ip("-n", b.namespace, "route", "del", "blackhole", f"{a.address}/32", check=False)

    def reset(self) -> None:
        """Every host's processes stopped, its link up, no partition: as made."""
        for host in self.hosts.values():
            host.stop_processes()
            host.restore()
            for other in self.hosts.values():
                if other is not host:
                    _ip("-n", host.namespace, "route", "del", "blackhole",
                        f"{other.address}/32", check=False)

    def close(self) -> None:
        """Processes, namespaces (their veth pairs go with them) and the bridge, removed."""
        for host in self.hosts.values():
            host.stop_processes()
            _ip("netns", "del", host.namespace, check=False)
        self.hosts.clear()
        _ip("link", "del", self.bridge, check=False)
