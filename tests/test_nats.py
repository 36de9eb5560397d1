"""The NATS JetStream connector against a real ``nats-server`` with JetStream.

Each test starts its own server (``brokers.NatsServer``) on 127.0.0.1 in its own
directory, and stops it. What the application wrote is read back by an independent
reader, nats-py itself, not by the project's ``listen``.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from certs import Certificates
from helpers import HOST, TIMEOUT, wait_for
from helpers import one_line_error as _one_line_error
from test_redis import RedisApp

nats = pytest.importorskip("nats")


def _run(model_dir, in_url: str, out_url: str, *args: str) -> RedisApp:
    return RedisApp(model_dir, in_url, out_url, "--input-format", "u8", *args)


def _send(url: str, repeat: int = 1, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "digitstream.cli", "send", "--to", url,
                           "--format", "u8", "--repeat", str(repeat), *args],
                          capture_output=True, text=True, timeout=TIMEOUT * 12)


def read_results(server, name: str) -> list[tuple[str, bytes]]:
    """Every message of stream ``name``, in stream order: (its ``in`` header, its data)."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    async def main():
        nc = await nats.connect(**server.connect_options())
        try:
            js = nc.jetstream()
            total = (await js.stream_info(name)).state.messages
            sub = await js.pull_subscribe(name, stream=name, config=ConsumerConfig(
                ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL))
            found: list[tuple[str, bytes]] = []
            while len(found) < total:
                messages = await sub.fetch(min(5000, total - len(found)), timeout=TIMEOUT)
                found += [((m.headers or {}).get("in", ""), m.data) for m in messages]
            return found
        finally:
            await nc.close()
    return asyncio.run(main())


def stored(server, name: str) -> int:
    """How many messages stream ``name`` holds now (0 if it does not exist yet)."""
    async def main():
        nc = await nats.connect(**server.connect_options())
        try:
            return (await nc.jetstream().stream_info(name)).state.messages
        except Exception:
            return 0
        finally:
            await nc.close()
    return asyncio.run(main())


def _check_exactly_once(results, total: int, expected_texts, ordered: bool) -> None:
    """One result per input sequence 1..total, each the model's answer for its image."""
    seqs = [int(in_seq) for in_seq, _ in results]
    assert len(seqs) == len(set(seqs)), "a result twice"
    assert set(seqs) == set(range(1, total + 1)), "an input unanswered"
    n = len(expected_texts)
    wrong = [s for s, (_, data) in zip(seqs, results)
             if data.decode() != expected_texts[(s - 1) % n]]
    assert not wrong, f"{len(wrong)} results wrong, first for input {wrong[0]}"
    if ordered:
        assert seqs == sorted(seqs)


def test_nats_in_and_out_answers_every_input_once_in_order(nats_server, model_dir,
                                                            expected_texts, fresh_name):
    name_in, name_out = fresh_name(), fresh_name()
    sent = _send(nats_server.url(name_in), 3)
    assert sent.returncode == 0, sent.stderr
    total = 3 * len(expected_texts)
    app = _run(model_dir, nats_server.url(name_in), nats_server.url(name_out)).wait_ready()
    try:
        wait_for(lambda: stored(nats_server, name_out) >= total, what="every result")
        wait_for(lambda: app.stats()["connectors"]["source"]["counters"]["acknowledged"]
                 == total, what="every input acknowledged")
    finally:
        assert app.stop() == 0, app.log()
    _check_exactly_once(read_results(nats_server, name_out), total, expected_texts,
                        ordered=True)


def test_listen_and_read_show_each_result(nats_server, model_dir, expected_texts, fresh_name,
                                          tmp_path):
    name_in, name_out = fresh_name(), fresh_name()
    assert _send(nats_server.url(name_in)).returncode == 0
    app = _run(model_dir, nats_server.url(name_in), nats_server.url(name_out)).wait_ready()
    out = tmp_path / "results.out"
    try:
        listened = subprocess.run(
            [sys.executable, "-m", "digitstream.cli", "listen", nats_server.url(name_out),
             "-o", str(out), "--count", str(len(expected_texts))],
            capture_output=True, text=True, timeout=TIMEOUT * 4)
        assert listened.returncode == 0, listened.stderr
    finally:
        app.stop()
    printed = subprocess.run([sys.executable, "-m", "digitstream.cli", "read", str(out)],
                             capture_output=True, text=True, timeout=TIMEOUT, check=True)
    assert printed.stdout.splitlines() == expected_texts


@pytest.mark.slow
def test_two_runs_one_killed_one_stopped_answer_each_input_exactly_once(
        start_nats, model_dir, expected_texts, fresh_name):
    """200,000 digits through one group of two ``run`` processes: one is SIGKILLed at
    moments from a seeded schedule and started again, the other SIGSTOPped for longer than
    the redelivery wait and then continued. Every input is answered exactly once."""
    seed = random.randrange(1 << 30)
    print(f"\nseed {seed} (to replay: random.Random({seed}))")
    rng = random.Random(seed)
    server = start_nats()
    name_in, name_out = fresh_name(), fresh_name()
    in_url, out_url = server.url(name_in), server.url(name_out)
    repeat = 112  # 112 x 1,797 = 201,264 digits
    total = repeat * len(expected_texts)
    sender = subprocess.Popen([sys.executable, "-m", "digitstream.cli", "-q", "send", "--to",
                               in_url, "--format", "u8", "--repeat", str(repeat)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_ms = "1500"
    read_url = f"{in_url}?ack-wait-ms={wait_ms}"
    args = ("--max-batch", "2048")
    killed = _run(model_dir, read_url, out_url, *args, "--name", "killed")
    stopped = _run(model_dir, read_url, out_url, *args, "--name", "stopped")
    apps = [killed, stopped]
    try:
        killed.wait_ready(), stopped.wait_ready()
        kills = 0
        stopped_once = False
        deadline = time.monotonic() + 240
        while stored(server, name_out) < total and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.3, 1.5))
            if not stopped_once and stored(server, name_out) > total // 4:
                stopped.proc.send_signal(signal.SIGSTOP)
                time.sleep(int(wait_ms) / 1000 + rng.uniform(0.5, 2.0))
                stopped.proc.send_signal(signal.SIGCONT)
                stopped_once = True
            elif kills < 6:
                killed.proc.send_signal(signal.SIGKILL)
                killed.proc.wait(timeout=TIMEOUT)
                kills += 1
                killed = _run(model_dir, read_url, out_url, *args, "--name", "killed")
                apps.append(killed)
                killed.wait_ready()
        assert sender.wait(timeout=TIMEOUT * 12) == 0, sender.stderr.read()
        wait_for(lambda: stored(server, name_out) >= total, timeout=120,
                 what=f"every result (seed {seed})")
        assert stopped_once and kills
    finally:
        for app in apps:
            app.stop()
        if sender.poll() is None:
            sender.kill()
            sender.wait(timeout=TIMEOUT)
    results = read_results(server, name_out)
    assert len(results) == total, f"seed {seed}"
    _check_exactly_once(results, total, expected_texts, ordered=False)



def one_line_error(*args: str) -> str:
    return _one_line_error(*args, timeout=TIMEOUT * 3)

def test_errors_are_one_line_and_never_show_the_password(start_nats, model_dir, held_port):
    server = start_nats(user="ana", password="s3cret-pw")
    wrong = server.url("in", "ana", "wrong-pw")
    line = one_line_error("send", "--to", wrong)
    assert "refused" in line and "wrong-pw" not in line
    line = one_line_error("run", "--model", str(model_dir), "--in", wrong, "--no-metrics")
    assert "refused" in line and "wrong-pw" not in line
    line = one_line_error("send", "--to", server.url("in"))
    assert "needs credentials" in line
    line = one_line_error("send", "--to", f"nats://{HOST}:{held_port.port}/in")
    assert "cannot reach" in line
    line = one_line_error("run", "--model", str(model_dir), "--in",
                           server.url("in", "ana", "s3cret-pw") + "?wait=1")
    assert "unknown option 'wait'" in line and "ack-wait-ms" in line and "s3cret" not in line
    line = one_line_error("listen", server.url("missing", "ana", "s3cret-pw"), "--count", "1")
    assert "no stream" in line and "missing" in line
    line = one_line_error("send", "--to", f"nats://{HOST}:{server.port}/a.b")
    assert "cannot name a JetStream stream" in line


def test_over_tls_with_the_authority_named(start_nats, model_dir, expected_texts, fresh_name,
                                           tmp_path):
    server = start_nats(tls=Certificates(tmp_path / "ca"))
    name_in, name_out = fresh_name(), fresh_name()
    url_in = server.url(name_in)
    assert url_in.startswith("tls://")
    assert _send(url_in).returncode == 0
    without_ca = url_in.split("?")[0]
    line = one_line_error("send", "--to", without_ca)
    assert "certificate" in line and "ca=" in line
    app = _run(model_dir, url_in, server.url(name_out)).wait_ready()
    try:
        wait_for(lambda: stored(server, name_out) >= len(expected_texts), what="every result")
    finally:
        assert app.stop() == 0, app.log()
    _check_exactly_once(read_results(server, name_out), len(expected_texts), expected_texts,
                        ordered=True)


def test_a_bad_payload_is_answered_at_its_place(nats_server, model_dir, fresh_name):
    """A message that is not an image gets its error result at its place; nothing stalls."""
    name_in, name_out = fresh_name(), fresh_name()
    images = np.zeros((3, 64), dtype=np.uint8).tobytes()

    async def publish():
        nc = await nats.connect(**nats_server.connect_options())
        js = nc.jetstream()
        await js.add_stream(name=name_in, subjects=[name_in])
        for payload in (images[:64], b"not an image", images[64:128]):
            await js.publish(name_in, payload)
        await nc.close()
    asyncio.run(publish())
    app = _run(model_dir, nats_server.url(name_in), nats_server.url(name_out)).wait_ready()
    try:
        wait_for(lambda: stored(nats_server, name_out) >= 3, what="three results")
    finally:
        app.stop()
    results = read_results(nats_server, name_out)
    assert [seq for seq, _ in results] == ["1", "2", "3"]
    assert results[1][1].startswith(b"error:") and not results[2][1].startswith(b"error:")
