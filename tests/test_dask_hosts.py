"""The Dask engine across hosts: the scheduler and a worker on host ``a``, a worker on
host ``b``, ``digitstream run`` in the root namespace (the bridge's address), each
host a network namespace of its own (see :mod:`hosts`).

A host that drops off the network says nothing: its connections go quiet. These
tests cut hosts off mid-stream, with input always waiting, and measure the
longest time between two results; every result must still come, once, in order.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

import hosts as hostlib
from digitstream.wire.framing import frame_fixed
from helpers import HOST, Collector, send_bytes, wait_for
from streams import CHUNK, Gaps, Stream

pytest.importorskip("distributed")
_why_not = hostlib.unavailable()
pytestmark = [pytest.mark.timeout(150),
              pytest.mark.skipif(_why_not is not None, reason=f"hosts: {_why_not}")]

#: what a lost worker's host may cost the stream (the issue's bound)
STALL_BOUND = 5.0
PORT = 8786  # each host has its own ports: the scheduler's usual one is free on host a
_ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


@pytest.fixture(scope="module")
def hosts():
    made = hostlib.Hosts(["a", "b"])
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def net(hosts, tmp_path):
    """The hosts, as made, for one test: its processes stopped and its faults undone after."""
    try:
        yield hosts
    finally:
        hosts.reset()


class DaskOnHosts:
    """``dask scheduler`` on host ``a`` and ``dask worker`` processes on the hosts, without
    nannies (a worker that dies stays dead); ``tls`` maps the names of the processes to
    the TLS flags they are started with."""

    def __init__(self, net: hostlib.Hosts, tmp_path, tls: dict[str, list[str]] | None = None):
        self.net = net
        self.tmp_path = tmp_path
        self.tls = tls or {}
        self.scheme = "tls" if tls else "tcp"
        self.address = f"{self.scheme}://{net['a'].address}:{PORT}"
        self.procs: dict[str, subprocess.Popen] = {}
        self._spawn("scheduler", net["a"], ["scheduler", "--host", net["a"].address, "--port",
                                            str(PORT), "--no-dashboard", "--protocol",
                                            self.scheme])
        wait_for(self._listening, 30, interval=0.05, what="the Dask scheduler")

    def _spawn(self, name: str, host: hostlib.Host, args: list[str]) -> subprocess.Popen:
        proc = host.start([sys.executable, "-m", "dask", *args, *self.tls.get(name, [])],
                          self.tmp_path / f"dask-{name}.log", env=_ONE_THREAD)
        self.procs[name] = proc
        return proc

    def _listening(self) -> bool:
        if self.procs["scheduler"].poll() is not None:
            raise AssertionError(f"the scheduler exited:\n{self.log('scheduler')}")
        try:
            socket.create_connection((self.net["a"].address, PORT), timeout=0.5).close()
            return True
        except OSError:
            return False

    def log(self, name: str) -> str:
        return (self.tmp_path / f"dask-{name}.log").read_text(errors="replace")

    def add_worker(self, name: str, host: hostlib.Host, *args: str) -> subprocess.Popen:
        return self._spawn(name, host, [
            "worker", self.address, "--host", host.address, "--nthreads", "1",
            "--no-dashboard", "--no-nanny", "--name", name,
            "--local-directory", str(self.tmp_path / name), *args])

    def registered(self, name: str) -> bool:
        return re.search(rf"Register worker .*name: {re.escape(name)}\b",
                         self.log("scheduler")) is not None

    def wait_workers(self, names) -> None:
        for name in names:
            wait_for(lambda: self.registered(name), 40, interval=0.1,
                     what=f"Dask worker {name} registered")


@pytest.fixture
def dask_on_hosts(net, tmp_path):
    cluster = DaskOnHosts(net, tmp_path)
    cluster.add_worker("w1", net["a"])
    cluster.add_worker("w2", net["b"])
    cluster.wait_workers(["w1", "w2"])
    return cluster


def _start(start_app, sink: Collector, cluster: DaskOnHosts, *args: str):
    # DIGITSTREAM_BATCH_DEADLINE=0 measures Dask alone (the stall tests then fail, and say
    # by how much)
    deadline = os.environ.get("DIGITSTREAM_BATCH_DEADLINE")
    return start_app(sink.port, "--engine", "dask", "--scheduler", cluster.address,
                     "--input-format", "u8", "--output-format", "json", "--max-batch",
                     str(CHUNK), "--name", "runner", *args,
                     *(["--batch-deadline", deadline] if deadline else []))


def _messages_by(app, name: str) -> int:
    return sum(w["messages"] for w in app.stats()["workers"] if w["name"] == name)


def _check_all_in_order(sink: Collector, app, total: int, expected_texts: list[str]) -> None:
    """Every one of ``total`` results came once, in input order, with the model's label."""
    frames = sink.wait_count(total, timeout=60)
    app.stop()
    wait_for(lambda: sink._conn is None, 15, interval=0.02,
             what="the application's results connection to close")
    assert sink.count() == total, "more results than inputs"
    results = [json.loads(f) for f in frames]
    assert [r["seq"] for r in results] == list(range(total))
    labels = [int(t.strip("[]")) for t in expected_texts]
    n = len(labels)
    assert [r["label"] for r in results] == [labels[i % n] for i in range(total)]


def _lose_worker_host(cluster, start_app, digits, expected_texts, cut, restore) -> None:
    """``cut()`` off w2's host mid-stream, ``restore()`` it once the stream goes on without
    it: the longest wait for a result meanwhile within the bound, and w2 taking batches
    again after."""
    sink = Collector()
    stream = None
    try:
        app = _start(start_app, sink, cluster)
        stream = Stream(app.in_port, digits.X.astype(np.uint8))
        wait_for(lambda: _messages_by(app, "w2") >= 5 * CHUNK, 40, interval=0.05,
                 what="batches classified by w2")
        gaps = Gaps(sink).start()
        cut()
        at_cut = sink.count()
        wait_for(lambda: sink.count() >= at_cut + 40 * CHUNK, 60, interval=0.05,
                 what="the stream going on without w2")
        stall = gaps.stop()
        print(f"longest wait for a result with w2's host lost: {stall:.2f} s")
        by_w2 = _messages_by(app, "w2")
        restore()
        wait_for(lambda: _messages_by(app, "w2") > by_w2, 60, interval=0.1,
                 what="batches classified by w2 once its host is back")
        total = stream.stop()
        stream = None
        here = app.stats()["cluster"]["in_process_batches"]
        log_text = app.log()
        _check_all_in_order(sink, app, total, expected_texts)
    finally:
        if stream is not None:
            stream.stop()
        sink.close()
    print(f"{here} of {total // CHUNK} batches computed in-process")
    assert stall < STALL_BOUND
    assert "Dask worker w2 held a batch past its deadline" in log_text
    assert "Dask worker w2 answered its late batch: it takes batches again" in log_text
    assert "Dask worker w1 held a batch" not in log_text  # the other worker is not blamed
    assert "Traceback" not in log_text


def test_worker_host_cut_off_costs_seconds_and_back_it_takes_batches(
        net, dask_on_hosts, start_app, digits, expected_texts):
    b = net["b"]
    _lose_worker_host(dask_on_hosts, start_app, digits, expected_texts, b.cut, b.restore)


def test_worker_host_partitioned_from_the_scheduler_only(net, dask_on_hosts, start_app, digits,
                                                        expected_texts):
    # w2 still reaches the application's host, and the application reaches it: not enough,
    # its batches and results go through the scheduler
    a, b = net["a"], net["b"]
    _lose_worker_host(dask_on_hosts, start_app, digits, expected_texts,
                      lambda: net.partition(a, b), lambda: net.heal(a, b))


def test_scheduler_host_cut_off_falls_back_here_and_returns(net, dask_on_hosts, start_app,
                                                           digits, expected_texts):
    a = net["a"]
    sink = Collector()
    stream = None
    try:
        app = _start(start_app, sink, dask_on_hosts)
        stream = Stream(app.in_port, digits.X.astype(np.uint8))
        wait_for(lambda: _messages_by(app, "w1") + _messages_by(app, "w2") >= 10 * CHUNK, 40,
                 interval=0.05, what="batches classified on the cluster")
        gaps = Gaps(sink).start()
        a.cut()
        wait_for(lambda: app.stats()["cluster"]["connected"] is False, 20, interval=0.05,
                 what="the scheduler's loss seen by the application")
        lost_at = sink.count()
        wait_for(lambda: sink.count() >= lost_at + 20 * CHUNK, 30, interval=0.05,
                 what="results classified in-process")
        stall = gaps.stop()
        on_cluster = _messages_by(app, "w1") + _messages_by(app, "w2")
        a.restore()
        wait_for(lambda: app.stats()["cluster"]["connected"] is True, 40, interval=0.1,
                 what="the scheduler found again")
        wait_for(lambda: _messages_by(app, "w1") + _messages_by(app, "w2") > on_cluster, 30,
                 interval=0.1, what="batches classified on the cluster again")
        total = stream.stop()
        stream = None
        cluster_state = app.stats()["cluster"]
        log_text = app.log()
        _check_all_in_order(sink, app, total, expected_texts)
    finally:
        if stream is not None:
            stream.stop()
        sink.close()
    print(f"longest wait for a result with the scheduler's host lost: {stall:.2f} s")
    assert stall < STALL_BOUND + 2  # the deadline, then the scheduler's silence (2 s)
    assert cluster_state["reconnects"] == 1 and cluster_state["in_process_batches"] > 0
    address = dask_on_hosts.address
    assert log_text.count(f"Dask scheduler at {address} lost, classifying in-process") == 1
    assert f"Dask scheduler back at {address}" in log_text
    assert "Traceback" not in log_text


# ---------------------------------------------------------------------------- TLS
def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Authority:
    """A certificate authority made for the test, and the certificates it signs."""

    def __init__(self, directory, name: str):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.directory, self.name = directory, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_file = directory / f"{name}-ca.pem"
        self.ca_file.write_bytes(self._pem(self.cert))

    @staticmethod
    def _pem(cert) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, who: str, addresses: list[str]) -> list[str]:
        """A certificate and key for ``who`` at ``addresses``: Dask's three TLS flags."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, who)]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]), critical=False)
                .sign(self.key, hashes.SHA256()))
        cert_file = self.directory / f"{self.name}-{who}.pem"
        key_file = self.directory / f"{self.name}-{who}.key"
        cert_file.write_bytes(self._pem(cert))
        key_file.write_bytes(_pem_key(key))
        return ["--tls-ca-file", str(self.ca_file), "--tls-cert", str(cert_file),
                "--tls-key", str(key_file)]


def _run_briefly(model_dir, sink: Collector, *args: str) -> subprocess.CompletedProcess:
    """``digitstream run`` that is expected to give up at start."""
    return subprocess.run(
        [sys.executable, "-m", "digitstream.cli", "run", "--model", str(model_dir),
         "--in", f"{HOST}:0", "--out", sink.addr, "--no-metrics", "--engine", "dask", *args],
        capture_output=True, text=True, timeout=60)


def test_tls_between_hosts_and_no_entry_without_a_valid_certificate(
        net, tmp_path, start_app, model_dir, digits, expected_texts):
    a, b = net["a"], net["b"]
    ours, rogue = Authority(tmp_path, "ours"), Authority(tmp_path, "rogue")
    tls = {"scheduler": ours.issue("scheduler", [a.address]),
           "w2": ours.issue("w2", [b.address]),
           "intruder": rogue.issue("intruder", [b.address])}
    cluster = DaskOnHosts(net, tmp_path, tls=tls)
    cluster.add_worker("w2", b)
    intruder = cluster.add_worker("intruder", b, "--death-timeout", "8")
    cluster.wait_workers(["w2"])
    sink = Collector()
    try:
        # a client whose certificate the scheduler's CA did not sign, and one without any
        refused = _run_briefly(model_dir, sink, "--scheduler", cluster.address,
                               *rogue.issue("client", [net.gateway]))
        bare = _run_briefly(model_dir, sink, "--scheduler", cluster.address)

        app = _start(start_app, sink, cluster, *ours.issue("client", [net.gateway]))
        send_bytes(app.in_port, frame_fixed(digits.X.astype(np.uint8)))
        sink.wait_count(len(digits.X), timeout=60)
        assert _messages_by(app, "w2") == len(digits.X)
        _check_all_in_order(sink, app, len(digits.X), expected_texts)
        assert intruder.wait(40) != 0
    finally:
        sink.close()

    for proc in (refused, bare):
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
        assert proc.returncode != 0 and len(errors) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
    assert refused.stderr.count(f"Error: cannot reach the Dask scheduler at {cluster.address}") \
        == 1, refused.stderr
    assert "needs a certificate: --tls-ca-file, --tls-cert and --tls-key" in bare.stderr
    assert not cluster.registered("intruder"), cluster.log("scheduler")
