"""The Redis Streams connector against a real ``redis-server`` (Debian package ``redis-server``).

Each test starts its own server on 127.0.0.1, in its own directory, without persistence
unless the test needs it, and stops it. Redis cannot be told to take a port the kernel picks,
so a port the kernel handed out is released and given to ``--port``; if another process took
it in between, the server fails to bind and is started again on another one.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from certs import Certificates
from helpers import HOST, TIMEOUT, _log_text, http_get, wait_for

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs redis-server (Debian package redis-server)"
)

redis = pytest.importorskip("redis")


class RedisServer:
    """``redis-server`` on 127.0.0.1 in ``directory``; ``persist`` turns the append-only file on.
    With ``tls`` (a :class:`Certificates`), it speaks only TLS and asks every client for a
    certificate signed by that authority."""

    def __init__(self, directory: Path, persist: bool = False, password: str | None = None,
                 port: int | None = None, tls: Certificates | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.persist = persist
        self.password = password
        self.port = port
        self.tls = tls
        if tls is not None:
            self.server_cert = tls.issue("redis-server", f"IP:{HOST}")
            self.client_cert = tls.issue("client")
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        log = self.directory / "redis.log"
        for _ in range(20):
            port = self.port or _kernel_port()
            # a restart writes to the same log: only what this start writes counts
            seen = len(_log_text(log)) if log.exists() else 0
            args = ["redis-server", "--bind", HOST, "--port", str(port), "--dir",
                    str(self.directory), "--save", "", "--daemonize", "no",
                    "--appendonly", "yes" if self.persist else "no", "--appendfsync", "always",
                    "--logfile", str(self.directory / "redis.log")]
            if self.password:
                args += ["--requirepass", self.password]
            if self.tls is not None:
                cert, key = self.server_cert
                args[args.index("--port") + 1] = "0"
                args += ["--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file",
                         str(key), "--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients",
                         "yes"]
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if "Ready to accept connections" in _log_text(log)[seen:]:
                    self.port = port
                    return
                time.sleep(0.02)
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)
            if "Address already in use" not in _log_text(log)[seen:]:
                raise AssertionError("redis-server did not start:\n" + _log_text(log)[-2000:])
        raise AssertionError("no port for redis-server")

    def url(self, stream: str, password: str | None = None) -> str:
        auth = f":{password}@" if password else ""
        if self.tls is None:
            return f"redis://{auth}{HOST}:{self.port}/{stream}"
        cert, key = self.client_cert
        return f"rediss://{auth}{HOST}:{self.port}/{stream}?ca={self.tls.ca}&cert={cert}&key={key}"

    def client(self) -> redis.Redis:
        tls = {}
        if self.tls is not None:
            cert, key = self.client_cert
            tls = {"ssl": True, "ssl_ca_certs": str(self.tls.ca), "ssl_certfile": str(cert),
                   "ssl_keyfile": str(key)}
        return redis.Redis(HOST, self.port, password=self.password, socket_timeout=TIMEOUT, **tls)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=TIMEOUT)


def _kernel_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


_LISTENING = re.compile(r"INFO .*?listening on (.+), results to (\S+?)"
                        r"(?:, metrics UI at (\S+))?\s*$", re.MULTILINE)


class RedisApp:
    """``digitstream run --in/--out`` with any endpoints, as a process; its log in a file."""

    def __init__(self, model, in_url: str, out_url: str, *args: str, env: dict | None = None):
        fd, name = tempfile.mkstemp(prefix="digitstream-redis-", suffix=".log")
        self.log_path = Path(name)
        self._log = os.fdopen(fd, "wb")
        cmd = [sys.executable, "-m", "digitstream.cli", "run", "--in", in_url, "--out", out_url,
               "--metrics", f"{HOST}:0", "--model", str(model), *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.metrics_url: str | None = None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return _log_text(self.log_path)

    def wait_ready(self, timeout: float = TIMEOUT) -> RedisApp:
        def started():
            match = _LISTENING.search(self.log())
            if match:
                return match
            if self.proc.poll() is not None:
                raise AssertionError(f"run exited with {self.proc.returncode}:\n{self.log()}")
            return None
        match = wait_for(started, timeout, interval=0.02, what="run to start")
        self.metrics_url = match[3].rstrip("/") if match[3] else None
        return self

    def stats(self) -> dict:
        import json

        assert self.metrics_url
        return json.loads(http_get(self.metrics_url + "/api/stats")[1])

    def stop(self, sig=signal.SIGTERM) -> int | None:
        """Stop it with ``sig`` (continued first if stopped; killed if it outlives TIMEOUT);
        its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.send_signal(signal.SIGCONT)  # a stopped process acts on it once continued
            try:
                self.proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=TIMEOUT)
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def start_run(model_dir):
    started: list[RedisApp] = []

    def start(in_url: str, out_url: str, *args: str, ready: bool = True, **kwargs) -> RedisApp:
        app = RedisApp(model_dir, in_url, out_url, *args, **kwargs)
        started.append(app)
        if ready:
            app.wait_ready()
        return app

    yield start
    for app in started:
        app.stop()


def _add(client, stream: str, payloads: list[bytes], chunk: int = 10_000) -> list[bytes]:
    ids: list[bytes] = []
    for start in range(0, len(payloads), chunk):
        pipe = client.pipeline(transaction=False)
        for payload in payloads[start:start + chunk]:
            pipe.xadd(stream, {"data": payload})
        ids.extend(pipe.execute())
    return ids


def _stop_holding_entries(client, proc, consumer: str, feeding, stream: str = "in",
                          group: str = "g") -> float:
    """SIGSTOP the consumer ``proc`` at a moment it holds entries of ``stream`` (one stopped
    between two reads holds none, and leaves nothing to take over): when it holds none within
    0.2 s, it goes on and is stopped again. The moment it was stopped."""
    while feeding():
        proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            wait_for(lambda: client.xpending_range(stream, group, "-", "+", 1,
                                                   consumername=consumer),
                     timeout=0.2, interval=0.005, what=f"{consumer} to hold entries")
            return stopped
        except AssertionError:
            proc.send_signal(signal.SIGCONT)
    raise AssertionError(f"{consumer} held no entries at any moment it was stopped")


def _results(client, stream: str) -> list[tuple[bytes, bytes]]:
    """(in, data) of every result entry, in the result stream's order."""
    out = []
    last = "-"
    while True:
        entries = client.xrange(stream, min=last, count=50_000)
        if last != "-":
            entries = entries[1:]
        if not entries:
            return out
        out.extend((fields.get(b"in"), fields.get(b"data")) for _, fields in entries)
        last = entries[-1][0]


def _wait_results(client, stream: str, n: int, timeout: float = TIMEOUT, apps=()) -> None:
    def enough():
        for app in apps:
            if app.proc.poll() is not None and app.proc.returncode not in (0, -9, -15):
                raise AssertionError(f"run exited with {app.proc.returncode}:\n{app.log()}")
        return client.xlen(stream) >= n
    wait_for(enough, timeout, interval=0.05,
             what=f"{n} results in {stream} (have {client.xlen(stream)})")


def _u8(digits) -> list[bytes]:
    return [row.astype(np.uint8).tobytes() for row in digits.X]


# ------------------------------------------------------------------------ tests
def test_one_consumer_answers_every_entry_once_in_order(redis_server, start_run, digits,
                                                         expected_texts):
    client = redis_server.client()
    payloads = _u8(digits)[:500]
    bad = {3: b"", 10: b"\x00" * 7, 200: b"not an image"}
    for i, payload in bad.items():
        payloads[i] = payload
    ids = _add(client, "in", payloads)
    client.xadd("in", {"other": b"no data field"})  # an entry without data
    app = start_run(redis_server.url("in"), redis_server.url("out"), "--input-format", "u8")
    _wait_results(client, "out", len(ids) + 1, apps=[app])
    more = _add(client, "in", _u8(digits)[500:800])  # after start: read as they come
    _wait_results(client, "out", len(ids) + 1 + len(more), apps=[app])
    results = _results(client, "out")
    assert [r[0] for r in results[:len(ids)]] == ids
    texts = [r[1].decode() for r in results]
    for i, text in enumerate(texts[:len(ids)]):
        if i in bad:
            assert text.startswith("error:"), (i, text)
        else:
            assert text == expected_texts[i], i
    assert texts[len(ids)] == "error: empty payload"
    assert [r[0] for r in results[len(ids) + 1:]] == more
    assert texts[len(ids) + 1:] == expected_texts[500:800]
    assert app.stop() == 0
    assert client.xpending("in", "digitstream")["pending"] == 0
    # started again, it has nothing of its own pending and nothing new to read
    app = start_run(redis_server.url("in"), redis_server.url("out"), "--input-format", "u8")
    counters = app.stats()["connectors"]["source"]["counters"]
    assert counters["read"] == counters["redelivered"] == counters["claimed"] == 0
    assert app.stop() == 0
    assert client.xlen("out") == len(ids) + 1 + len(more)


def test_urls_mask_the_password():
    from digitstream.connectors.redis import RedisURL
    from digitstream.connectors.registry import parse as parse_endpoint

    url = RedisURL.parse("user:p%40ss@127.0.0.1:6380/in?db=2", environ={})
    assert (url.username, url.password, url.port, url.stream, url.db) == (
        "user", "p@ss", 6380, "in", 2)
    assert str(url) == url.masked() == "redis://user:***@127.0.0.1:6380/in?db=2"
    assert "p@ss" not in repr(url)
    assert RedisURL.parse("h:1/s", environ={"DIGITSTREAM_REDIS_PASSWORD": "env"}).password == "env"
    assert str(RedisURL.parse("h:1/s", tls=True, environ={})) == "rediss://h:1/s"
    assert str(parse_endpoint("redis://:secret@h:1/s", "source")) == "redis://:***@h:1/s"
    from digitstream.errors import UserError

    with pytest.raises(UserError, match=r"^no stream named in redis://:\*\*\*@h:1: expected"):
        RedisURL.parse(":secret@h:1", environ={})


def test_huge_and_malformed_entries_get_error_results(redis_server, start_run, digits,
                                                      expected_texts):
    client = redis_server.client()
    good = _u8(digits)[:20]
    ids = [client.xadd("in", {"data": good[0]}),
           client.xadd("in", {"data": b"\x01" * (8 << 20)}),  # 8 MiB: above --max-frame too
           client.xadd("in", {"label": b"3"}),  # no data
           client.xadd("in", {"data": b""}),
           client.xadd("in", {"data": b'{"pixels": [1, 2]}'}),
           *_add(client, "in", good[1:])]
    app = start_run(redis_server.url("in"), redis_server.url("out"), "--input-format", "u8")
    _wait_results(client, "out", len(ids), apps=[app])
    results = _results(client, "out")
    assert [r[0] for r in results] == ids
    texts = [r[1].decode() for r in results]
    assert texts[0] == expected_texts[0]
    assert texts[1].startswith("error: expected 64 bytes") and "got 8388608" in texts[1]
    assert texts[2] == texts[3] == "error: empty payload"
    assert texts[4].startswith("error: expected 64 bytes")
    assert texts[5:] == expected_texts[1:20]
    assert app.stop() == 0


def _results_by_input(client, stream: str) -> dict[bytes, list[bytes]]:
    by_input: dict[bytes, list[bytes]] = {}
    for source_id, data in _results(client, stream):
        by_input.setdefault(source_id, []).append(data)
    return by_input


@pytest.mark.slow
def test_three_consumers_killed_and_stalled_answer_each_entry_exactly_once(
        redis_server, start_run, digits, expected_texts):
    """SIGKILL one consumer and SIGSTOP another past --claim-idle-ms while entries keep coming
    (so that both hold entries then), on a seeded random schedule."""
    seed = int(os.environ.get("DIGITSTREAM_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    client = redis_server.client()
    total, claim_ms, feed_seconds = 300_000, 1000, 3.0
    base = _u8(digits)
    payloads = [base[i % len(base)] for i in range(total)]
    args = ("--input-format", "u8", "--claim-idle-ms", str(claim_ms), "--max-batch", "2048",
            "--group", "g")
    apps = {name: start_run(redis_server.url("in"), redis_server.url("out"), "--name", name,
                            *args) for name in ("a", "b", "c")}
    victim, stalled = rng.sample(sorted(apps), 2)
    kill_at, stall_at = rng.uniform(0.5, 2.0), rng.uniform(0.8, 2.0)
    stall_for = claim_ms / 1000 * rng.uniform(2.5, 4.0)
    restart = rng.random() < 0.5
    ids: list[bytes] = []

    def feed():
        feeder = redis_server.client()
        chunk = 5_000
        begun = time.monotonic()
        for start in range(0, total, chunk):
            due = begun + feed_seconds * start / total
            time.sleep(max(0.0, due - time.monotonic()))
            ids.extend(_add(feeder, "in", payloads[start:start + chunk]))

    feeder = threading.Thread(target=feed, daemon=True)
    try:
        began = time.monotonic()
        feeder.start()
        for at, action in sorted([(kill_at, "kill"), (stall_at, "stall")]):
            wait_for(lambda at=at: time.monotonic() - began >= at, timeout=30, what="the schedule")
            if action == "kill":
                apps[victim].proc.kill()
            else:
                stalled_since = _stop_holding_entries(client, apps[stalled].proc, stalled,
                                                      feeder.is_alive)
        wait_for(lambda: time.monotonic() - stalled_since >= stall_for, timeout=30,
                 what="the stall")
        apps[stalled].proc.send_signal(signal.SIGCONT)
        if restart:
            apps[victim] = start_run(redis_server.url("in"), redis_server.url("out"), "--name",
                                     victim, *args)
        feeder.join(timeout=60)
        assert not feeder.is_alive() and len(ids) == total
        wait_for(lambda: client.xlen("out") >= total
                 and client.xpending("in", "g")["pending"] == 0, timeout=60, interval=0.1,
                 what=f"every result and nothing pending (have {client.xlen('out')})")
        counts = {name: app.stats()["connectors"] for name, app in apps.items()
                  if app.proc.poll() is None}
        claimed = sum(c["source"]["counters"]["claimed"] for c in counts.values())
        skipped = sum(c["sink"]["counters"]["skipped"] for c in counts.values())
        print(f"seed {seed}: victim {victim} (restarted: {restart}), stalled {stalled}; "
              f"claimed {claimed}, results not written by a consumer that lost them {skipped}")
        assert claimed > 0
        for app in apps.values():
            if app.proc.poll() is None:
                assert app.stop() == 0, app.log()
        by_input = _results_by_input(client, "out")
        assert client.xlen("out") == total
        assert set(by_input) == set(ids)
        assert all(len(v) == 1 for v in by_input.values())
        for i, entry_id in enumerate(ids):
            assert by_input[entry_id][0].decode() == expected_texts[i % len(base)], i
        assert client.xpending("in", "g")["pending"] == 0
    except AssertionError as exc:
        raise AssertionError(f"{exc} (DIGITSTREAM_TEST_SEED={seed}: victim {victim}, "
                             f"stalled {stalled}, restart {restart})") from exc


def _cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "digitstream.cli", *args], capture_output=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("tls", [False, pytest.param(True, marks=pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs openssl to make certificates"))],
    ids=["plain", "tls-client-certificates"])
def test_redis_restarted_mid_stream_loses_nothing_it_kept(tmp_path, start_run, digits,
                                                          expected_texts, tls):
    certificates = Certificates(tmp_path / "certs") if tls else None
    server = RedisServer(tmp_path / "redis", persist=True, tls=certificates)
    try:
        client = server.client()
        base = _u8(digits)
        payloads = [base[i % len(base)] for i in range(60_000)]
        ids = _add(client, "in", payloads[:30_000])
        apps = [start_run(server.url("in"), server.url("out"), "--name", name,
                          "--input-format", "u8", "--claim-idle-ms", "2000")
                for name in ("a", "b")]
        _wait_results(client, "out", 5_000, apps=apps)
        server.stop()  # SIGTERM: Redis writes what it has and exits
        assert server.proc.returncode == 0
        server.start()  # on the same port, from its append-only file
        client = server.client()
        ids += _add(client, "in", payloads[30_000:])
        wait_for(lambda: client.xlen("out") >= len(ids)
                 and client.xpending("in", "digitstream")["pending"] == 0, timeout=60,
                 interval=0.1, what=f"every result after the restart (have {client.xlen('out')})")
        logs = "".join(app.log() for app in apps)
        assert "retrying with backoff" in logs and "back after" in logs
        print("\n".join(re.findall(r"^.*back after.*$", logs, re.M)))
        if tls:
            # the authority trusted, but no certificate of one's own: refused at the handshake
            bare = _cli("send", "--to", f"rediss://{HOST}:{server.port}/in?ca={certificates.ca}",
                        "--format", "u8")
            assert bare.returncode != 0
            refusal = bare.stderr.decode()
            assert "Traceback" not in refusal, refusal
            assert f"cannot reach redis at {HOST}:{server.port}: " in refusal
            assert "give one with ?cert=FILE&key=FILE" in refusal
            print(refusal)
        for app in apps:
            assert app.stop() == 0, app.log()
        by_input = _results_by_input(client, "out")
        assert client.xlen("out") == len(ids)
        assert set(by_input) == set(ids)
        for i, entry_id in enumerate(ids):
            assert by_input[entry_id] == [expected_texts[i % len(base)].encode()], i
    finally:
        server.stop()


def test_password_right_wrong_or_missing(tmp_path, start_run, model_dir, digits):
    secret = "pw-Sekr3t-9"
    server = RedisServer(tmp_path / "redis", password=secret)
    try:
        client = server.client()
        ids = _add(client, "in", _u8(digits)[:50])
        common = ["--model", str(model_dir), "--input-format", "u8", "--metrics", f"{HOST}:0"]
        wrong = _cli("run", "--in", server.url("in", "wrong-one"), "--out",
                     server.url("out", "wrong-one"), *common, timeout=60)
        assert wrong.returncode != 0
        assert wrong.stderr.decode().strip().splitlines()[-1] == (
            f"Error: redis at {HOST}:{server.port} refused the password: invalid "
            "username-password pair or user is disabled.")
        assert b"wrong-one" not in wrong.stderr + wrong.stdout
        missing = _cli("run", "--in", server.url("in"), "--out", server.url("out"), *common,
                       env={"DIGITSTREAM_REDIS_PASSWORD": ""}, timeout=60)
        assert missing.returncode != 0
        assert "needs a password" in missing.stderr.decode().strip().splitlines()[-1]
        assert "DIGITSTREAM_REDIS_PASSWORD" in missing.stderr.decode()
        # right: in the URL for --in, from the environment for --out
        app = start_run(server.url("in", secret), server.url("out"), "--input-format", "u8",
                        env={"DIGITSTREAM_REDIS_PASSWORD": secret})
        _wait_results(client, "out", len(ids), apps=[app])
        stats = http_get(app.metrics_url + "/api/stats")[1]
        prometheus = http_get(app.metrics_url + "/metrics")[1]
        assert b"redis://:***@" in stats
        assert b'digitstream_connector_entries_total{connector="redis",event="committed",' \
               b'role="sink"} 50.0' in prometheus
        assert app.stop() == 0
        for text in (app.log().encode(), stats, prometheus):
            assert secret.encode() not in text
    finally:
        server.stop()


def test_tcp_in_redis_out(redis_server, start_run, digits, expected_texts):
    from digitstream.wire.framing import frame_many

    client = redis_server.client()
    app = start_run(f"{HOST}:0", redis_server.url("out"), "--input-format", "u8")
    port = int(_LISTENING.search(app.log())[1].rpartition(":")[2])
    payloads = _u8(digits)[:300]
    with socket.create_connection((HOST, port), timeout=TIMEOUT) as sock:
        sock.sendall(frame_many(payloads))
    _wait_results(client, "out", len(payloads), apps=[app])
    results = _results(client, "out")
    assert [r[0] for r in results] == [f"1:{i}".encode() for i in range(len(payloads))]
    assert [r[1].decode() for r in results] == expected_texts[:300]
    assert app.stop() == 0


def test_redis_in_tcp_out_acknowledges_once_delivered(redis_server, start_run, collector,
                                                      digits, expected_texts):
    client = redis_server.client()
    ids = _add(client, "in", _u8(digits))
    app = start_run(redis_server.url("in"), collector.addr, "--input-format", "u8")
    assert collector.wait_count(len(ids)) == expected_texts
    wait_for(lambda: client.xpending("in", "digitstream")["pending"] == 0,
             what="every entry acknowledged")
    counters = app.stats()["connectors"]["source"]["counters"]
    assert counters["read"] == counters["acknowledged"] == len(ids)
    assert app.stop() == 0


def test_send_listen_read_through_redis(redis_server, start_run, tmp_path, expected_texts):
    sent = _cli("send", "--to", redis_server.url("in"), "--format", "pickle")
    assert sent.returncode == 0, sent.stderr
    client = redis_server.client()
    first = client.xrange("in", count=1)[0][1]
    assert set(first) == {b"data", b"label", b"id"} and first[b"id"] == b"0"
    app = start_run(redis_server.url("in"), redis_server.url("out"), "--output-format", "text")
    out = tmp_path / "results.out"
    listened = _cli("listen", redis_server.url("out"), "-o", str(out), "--count",
                    str(len(expected_texts)))
    assert listened.returncode == 0, listened.stderr
    read = _cli("read", str(out))
    assert read.stdout.decode().splitlines() == expected_texts
    assert app.stop() == 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_tls_with_a_password(tmp_path, start_run, digits, expected_texts):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True,
                   timeout=TIMEOUT)
    port = _kernel_port()
    log = tmp_path / "redis.log"
    proc = subprocess.Popen(["redis-server", "--bind", HOST, "--port", "0", "--tls-port",
                             str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                             "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
                             "--requirepass", "tls-pw", "--dir", str(tmp_path), "--save", "",
                             "--logfile", str(log)])
    try:
        wait_for(lambda: "Ready to accept" in _log_text(log) or proc.poll() is not None,
                 what="redis-server with TLS")
        if proc.poll() is not None:
            pytest.skip("this redis-server has no TLS:\n" + _log_text(log)[-500:])
        base = f"rediss://:tls-pw@{HOST}:{port}"
        sent = _cli("send", "--to", f"{base}/in?ca={cert}", "--format", "u8")
        assert sent.returncode == 0, sent.stderr
        untrusted = _cli("send", "--to", f"{base}/in", "--format", "u8")
        assert untrusted.returncode != 0
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr.decode()
        assert "name the one that signed it with ?ca=FILE" in untrusted.stderr.decode()
        app = start_run(f"{base}/in?ca={cert}", f"{base}/out?ca={cert}", "--input-format", "u8")
        client = redis.Redis(HOST, port, password="tls-pw", ssl=True, ssl_ca_certs=str(cert),
                             socket_timeout=TIMEOUT)
        _wait_results(client, "out", len(expected_texts), apps=[app])
        assert [r[1].decode() for r in _results(client, "out")] == expected_texts
        assert app.stop() == 0
        assert "tls-pw" not in app.log()
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)


def test_demo_redis_loses_and_duplicates_nothing(tmp_path, model_dir):
    out = tmp_path / "demo.out"
    done = _cli("demo", "--redis", "--model", str(model_dir), "--output", str(out), timeout=180)
    text = done.stderr.decode()
    assert done.returncode == 0, text
    for row in ("entries in", "results out", "duplicates", "missing"):
        assert re.search(rf"{row}\s*│\s*(\S+)", text), row
    assert re.search(r"duplicates\s*│\s*0\b", text) and re.search(r"missing\s*│\s*0\b", text)
    assert re.search(r"results out\s*│\s*1,797\b", text)
    read = _cli("read", str(out))
    assert len(read.stdout.decode().splitlines()) == 1797


# Entry ids are two unsigned 64-bit integers: each part at the edges where a double stops
# telling integers apart (2^53 + 1 is the first it cannot hold) and at the top of the range.
_ID_PARTS = [0, 1, 2**53 - 1, 2**53, 2**53 + 1, 2**64 - 2, 2**64 - 1]
_EDGE_IDS = [f"{ms}-{seq}".encode() for ms in _ID_PARTS for seq in _ID_PARTS if (ms, seq) != (0, 0)]


def _add_with_ids(client, stream: str, ids: list[bytes], payloads: list[bytes]) -> None:
    pipe = client.pipeline(transaction=False)
    for entry_id, payload in zip(ids, payloads, strict=True):
        pipe.xadd(stream, {"data": payload}, id=entry_id)
    assert pipe.execute() == ids


def _wait_settled(client, n: int, results: str | None = None) -> None:
    """Until no entry of ``in`` is pending (and ``results`` holds ``n`` entries)."""
    def settled():
        return ((results is None or client.xlen(results) >= n)
                and client.xpending("in", "digitstream")["pending"] == 0)
    try:
        wait_for(settled, what="every entry answered and acknowledged")
    except AssertionError as exc:
        held = client.xlen(results) if results else "-"
        raise AssertionError(f"{exc}: {held} results of {n}, "
                             f"{client.xpending('in', 'digitstream')['pending']} pending") from None


def test_ids_at_the_edges_of_64_bits_are_answered_once_in_order(redis_server, start_run, digits,
                                                                expected_texts):
    """Read, answered and acknowledged by the commit script in one batch: a comparison of
    ids as floating-point numbers left some pending, answered later and out of order."""
    client = redis_server.client()
    _add_with_ids(client, "in", _EDGE_IDS, _u8(digits)[:len(_EDGE_IDS)])
    app = start_run(redis_server.url("in"), redis_server.url("out"), "--input-format", "u8",
                    "--claim-idle-ms", "5000")
    _wait_settled(client, len(_EDGE_IDS), "out")
    connectors = app.stats()["connectors"]
    assert app.stop() == 0
    results = _results(client, "out")
    assert [r[0] for r in results] == _EDGE_IDS
    assert [r[1].decode() for r in results] == expected_texts[:len(_EDGE_IDS)]
    source, sink = connectors["source"]["counters"], connectors["sink"]["counters"]
    assert source["read"] == sink["committed"] == len(_EDGE_IDS)
    assert source["redelivered"] == source["claimed"] == sink["skipped"] == 0
    assert client.xpending("in", "digitstream")["pending"] == 0


def test_ids_at_the_edges_of_64_bits_are_acknowledged_once(redis_server, start_run, collector,
                                                           digits, expected_texts):
    """Redis in, TCP out: the source acknowledges delivered entries with the same script."""
    client = redis_server.client()
    _add_with_ids(client, "in", _EDGE_IDS, _u8(digits)[:len(_EDGE_IDS)])
    app = start_run(redis_server.url("in"), collector.addr, "--input-format", "u8",
                    "--claim-idle-ms", "5000")
    collector.wait_count(len(_EDGE_IDS))
    _wait_settled(client, len(_EDGE_IDS))
    counters = app.stats()["connectors"]["source"]["counters"]
    assert app.stop() == 0
    assert collector.texts() == expected_texts[:len(_EDGE_IDS)]
    assert counters["read"] == counters["acknowledged"] == len(_EDGE_IDS)
    assert counters["redelivered"] == counters["claimed"] == 0


def test_streams_stay_bounded_inputs_trimmed_once_every_group_has_them(redis_server, start_run,
                                                                       digits):
    """Input entries go once every group of the stream has acknowledged them (not before: a
    second group that has read nothing keeps them all), and the result stream keeps about
    ``?maxlen=`` entries, at its peak as well as at the end; every input still answered
    once."""
    client = redis_server.client()
    payloads = _u8(digits) * 20  # 35,940 entries
    ids = _add(client, "in", payloads)
    client.xgroup_create("in", "late", id="0")  # a second group, which reads nothing yet
    maxlen = 1000
    app = start_run(redis_server.url("in"), redis_server.url("out") + f"?maxlen={maxlen}",
                    "--input-format", "u8")
    peak = 0

    def added() -> int:
        nonlocal peak
        peak = max(peak, client.xlen("out"))
        return int(client.xinfo_stream("out")["entries-added"]) if client.exists("out") else 0

    wait_for(lambda: added() >= len(ids), TIMEOUT * 4, what="every result")
    time.sleep(6)  # a trim comes every 5 s: it must leave the late group's entries alone
    assert client.xlen("in") == len(ids)
    # about maxlen: Redis trims whole nodes of its radix tree (up to 100 entries each)
    assert peak <= maxlen + 200 and client.xlen("out") <= maxlen + 200, peak
    assert added() == len(ids) and client.xpending("in", "digitstream")["pending"] == 0
    print(f"\nresult stream: at most {peak:,} entries at its peak (maxlen {maxlen:,})")
    client.xgroup_destroy("in", "late")
    wait_for(lambda: client.xlen("in") < 200, TIMEOUT, what="the input trimmed")
    counters = app.stats()["connectors"]["source"]["counters"]
    assert counters["trimmed"] >= len(ids) - 200 and counters["read"] == len(ids)
    assert app.stop() == 0
