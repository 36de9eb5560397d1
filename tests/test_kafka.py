"""The Kafka connector against a real Apache Kafka broker (KRaft, from the jars that
``make kafka-jars`` fetches; skipped with the reason when Java or the jars are absent).

The session's broker is shared: each test uses topics and a group of its own. What the
application wrote is read back by an independent ``read_committed`` consumer
(confluent-kafka itself), not by the project's ``listen``.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from helpers import HOST, TIMEOUT, HeldPort, one_line_error, wait_for
from test_redis import RedisApp

confluent_kafka = pytest.importorskip("confluent_kafka")

#: a group's session: short, so that a stopped run is noticed within the test
FAST_GROUP = "session.timeout.ms=4000&heartbeat.interval.ms=500"


def _run(model_dir, in_url: str, out_url: str, *args: str) -> RedisApp:
    return RedisApp(model_dir, in_url, out_url, "--input-format", "u8", *args)


def _cli(*args: str, timeout: float = TIMEOUT * 12) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "digitstream.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def read_committed(broker, topic: str, expect: int | None = None,
                   timeout: float = TIMEOUT * 4) -> list[tuple[int, str, bytes]]:
    """Every committed record of ``topic`` (read_committed, from the start), as (its
    partition, its ``in`` header, its value), partition by partition in offset order."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(broker.config(**{"group.id": f"check-{uuid.uuid4().hex}",
                                         "enable.auto.commit": False,
                                         "isolation.level": "read_committed"}))
    try:
        partitions = consumer.list_topics(topic, timeout=TIMEOUT).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        found: list[tuple[int, str, bytes]] = []
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            records = consumer.consume(10_000, 0.2)
            for record in records:
                if record.error() is None:
                    headers = dict(record.headers() or [])
                    found.append((record.partition(), headers.get("in", b"").decode(),
                                  record.value()))
            if records:
                quiet_since = time.monotonic()
            elif (expect is None or len(found) >= expect) and time.monotonic() - quiet_since > 1:
                break
        return found
    finally:
        consumer.close()


def _check(results, inputs: dict[tuple[int, int], int], expected_texts, topic: str) -> None:
    """Exactly one result per input record, each naming its input and correct for its
    image, and in order per input partition within each result partition."""
    named = [(p_out, tuple(map(int, tag.split("/")[1:])), value)
             for p_out, tag, value in results if tag.startswith(f"{topic}/")]
    assert len(named) == len(results), "a result without its input"
    keys = [key for _, key, _ in named]
    assert len(keys) == len(set(keys)), f"{len(keys) - len(set(keys))} results twice"
    assert set(keys) == set(inputs), f"{len(set(inputs) - set(keys))} inputs unanswered"
    n = len(expected_texts)
    wrong = [key for _, key, value in named if value.decode() != expected_texts[inputs[key] % n]]
    assert not wrong, f"{len(wrong)} wrong results, first for {wrong[0]}"
    last: dict[tuple[int, int], int] = {}
    for p_out, (p_in, offset), _ in named:
        assert offset > last.get((p_out, p_in), -1), f"out of order in partition {p_in}"
        last[(p_out, p_in)] = offset


def _send_digits(broker, topic: str, repeat: int) -> None:
    """The digits ``repeat`` times into a new topic of 3 partitions, by ``send``."""
    broker.create_topic(topic, 3)
    sent = _cli("send", "--to", broker.url(topic), "--format", "u8", "--repeat", str(repeat))
    assert sent.returncode == 0, sent.stderr


def _inputs(broker, topic: str) -> dict[tuple[int, int], int]:
    """(partition, offset) -> the record's ``id`` header (its place in what send sent)."""
    return {(p, o): int(i) for p, o, i in _records_with_ids(broker, topic)}


def _records_with_ids(broker, topic: str):
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(broker.config(**{"group.id": f"ids-{uuid.uuid4().hex}",
                                         "enable.auto.commit": False}))
    try:
        partitions = consumer.list_topics(topic, timeout=TIMEOUT).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        quiet = time.monotonic()
        while time.monotonic() - quiet < 1.5:
            records = consumer.consume(10_000, 0.2)
            for record in records:
                if record.error() is None:
                    quiet = time.monotonic()
                    yield record.partition(), record.offset(), dict(record.headers())["id"]
    finally:
        consumer.close()


def test_kafka_in_and_out_answers_every_record_once_in_order(kafka_broker, model_dir,
                                                              expected_texts, fresh_name):
    name_in, name_out = fresh_name(), fresh_name()
    sent = _cli("send", "--to", f"{kafka_broker.url(name_in)}?partitions=3", "--format", "u8",
                "--repeat", "2")
    assert sent.returncode == 0, sent.stderr
    total = 2 * len(expected_texts)
    app = _run(model_dir, kafka_broker.url(name_in), kafka_broker.url(name_out),
               "--group", fresh_name()).wait_ready(TIMEOUT * 2)
    try:
        wait_for(lambda: len(read_committed(kafka_broker, name_out, total, 10)) >= total,
                 TIMEOUT * 4, interval=0.5, what="every result")
        counters = app.stats()["connectors"]["sink"]["counters"]
        assert counters["transactions"] > 0 and counters["produced"] == total
    finally:
        assert app.stop() == 0, app.log()
    results = read_committed(kafka_broker, name_out, total)
    _check(results, _inputs(kafka_broker, name_in), expected_texts, name_in)


def test_listen_reads_what_run_committed(kafka_broker, model_dir, expected_texts, fresh_name,
                                         tmp_path):
    name_in, name_out = fresh_name(), fresh_name()
    assert _cli("send", "--to", kafka_broker.url(name_in), "--format", "u8").returncode == 0
    app = _run(model_dir, kafka_broker.url(name_in), kafka_broker.url(name_out),
               "--group", fresh_name()).wait_ready(TIMEOUT * 2)
    out = tmp_path / "results.out"
    try:
        listened = _cli("listen", kafka_broker.url(name_out), "-o", str(out), "--count",
                        str(len(expected_texts)))
        assert listened.returncode == 0, listened.stderr
    finally:
        app.stop()
    printed = _cli("read", str(out))
    assert printed.stdout.splitlines() == expected_texts  # one partition: in input order


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_runs_killed_and_stopped_answer_each_record_exactly_once(
        kafka_broker, model_dir, expected_texts, fresh_name):
    """300,000 digits in a topic of 3 partitions; two ``run`` processes of one group, one
    SIGKILLed at moments of a seeded schedule and started again, the other SIGSTOPped for
    longer than the group's session timeout and continued. A read_committed reader finds
    one result per input record, naming it, in order per input partition, each correct."""
    seed = random.randrange(1 << 30)
    print(f"\nseed {seed} (to replay: random.Random({seed}))")
    rng = random.Random(seed)
    name_in, name_out, group = fresh_name(), fresh_name(), fresh_name()
    repeat = 167  # 167 x 1,797 = 300,099 digits
    total = repeat * len(expected_texts)
    kafka_broker.create_topic(name_in, 3)
    kafka_broker.create_topic(name_out, 3)
    sender = subprocess.Popen([sys.executable, "-m", "digitstream.cli", "-q", "send", "--to",
                               kafka_broker.url(name_in), "--format", "u8", "--repeat",
                               str(repeat)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    in_url = f"{kafka_broker.url(name_in)}?{FAST_GROUP}"
    out_url = kafka_broker.url(name_out)
    args = ("--group", group, "--max-batch", "4096")
    killed = _run(model_dir, in_url, out_url, *args, "--name", "killed")
    stopped = _run(model_dir, in_url, out_url, *args, "--name", "stopped")
    apps = [killed, stopped]

    def answered() -> int:
        return len(read_committed(kafka_broker, name_out, total, 60))

    try:
        killed.wait_ready(TIMEOUT * 2), stopped.wait_ready(TIMEOUT * 2)
        deadline = time.monotonic() + 300
        kills, stopped_once = 0, False
        while time.monotonic() < deadline and kills < 4:
            time.sleep(rng.uniform(1.0, 4.0))
            if not stopped_once and kills == 1:
                stopped.proc.send_signal(signal.SIGSTOP)
                time.sleep(4 + rng.uniform(2, 4))  # past the session timeout
                stopped.proc.send_signal(signal.SIGCONT)
                stopped_once = True
                continue
            killed.proc.send_signal(signal.SIGKILL)
            killed.proc.wait(timeout=TIMEOUT)
            kills += 1
            killed = _run(model_dir, in_url, out_url, *args, "--name", "killed")
            apps.append(killed)
            killed.wait_ready(TIMEOUT * 2)
        assert sender.wait(timeout=TIMEOUT * 12) == 0, sender.stderr.read()
        wait_for(lambda: answered() >= total, timeout=240, interval=1,
                 what=f"every result (seed {seed})")
    finally:
        for app in apps:
            app.stop()
        if sender.poll() is None:
            sender.kill()
            sender.wait(timeout=TIMEOUT)
    results = read_committed(kafka_broker, name_out, total)
    print(f"{len(results):,} results for {total:,} records; kills {kills}")
    try:
        _check(results, _inputs(kafka_broker, name_in), expected_texts, name_in)
    except AssertionError:
        _explain(results, apps, seed)
        raise


def _explain(results, apps, seed: int) -> None:
    """What a failed exactly-once check needs to be understood: where the twice-answered
    inputs are, and what each run logged about its group and transactions."""
    seen: dict[str, list[int]] = {}
    for p_out, tag, _ in results:
        seen.setdefault(tag, []).append(p_out)
    twice = sorted(tag for tag, outs in seen.items() if len(outs) > 1)
    print(f"seed {seed}: {len(twice)} inputs answered twice; first {twice[:3]}, "
          f"last {twice[-3:]}")
    for app in apps:
        lines = [line for line in app.log().splitlines()
                 if "kafka" in line]
        print(f"--- {app.proc.args[-1]} (pid {app.proc.pid}):", *lines[-30:], sep="\n")


def test_a_fenced_producer_reads_again_from_the_committed_offsets(
        kafka_broker, model_dir, expected_texts, fresh_name):
    """Another producer takes ``run``'s transactional id at moments of a seeded schedule (as a
    second ``run`` with the same ``--name`` would): ``run``'s producer is fenced with its
    transaction's outcome unknown, no rebalance follows, and ``run`` reads again from the
    offsets its group committed. A read_committed reader finds one result per record."""
    seed = random.randrange(1 << 30)
    print(f"\nseed {seed} (to replay: random.Random({seed}))")
    rng = random.Random(seed)
    name_in, name_out, group = fresh_name(), fresh_name(), fresh_name()
    repeat = 100
    total = repeat * len(expected_texts)
    _send_digits(kafka_broker, name_in, repeat)
    app = _run(model_dir, kafka_broker.url(name_in), kafka_broker.url(name_out), "--group",
               group, "--name", "fenced", "--max-batch", "512").wait_ready(TIMEOUT * 2)
    fencers = []
    try:
        for share in sorted(rng.uniform(0.05, 0.6) for _ in range(3)):
            wait_for(lambda share=share: app.stats()["messages"]["out"] >= share * total,
                     TIMEOUT * 4, interval=0.02, what=f"{share:.0%} of the results (seed {seed})")
            fencer = confluent_kafka.Producer(kafka_broker.config(
                **{"transactional.id": f"digitstream-{group}-fenced"}))
            fencer.init_transactions(TIMEOUT)
            fencers.append(fencer)
        wait_for(lambda: len(read_committed(kafka_broker, name_out, total, 10)) >= total,
                 TIMEOUT * 8, interval=0.5, what=f"every result (seed {seed})")
        counters = app.stats()["connectors"]["source"]["counters"]
        assert counters["rewinds"] >= 1, counters
        assert "reading again from the committed offsets" in app.log()
    finally:
        for fencer in fencers:
            fencer.close()
        assert app.stop() == 0, app.log()
    results = read_committed(kafka_broker, name_out, total)
    try:
        _check(results, _inputs(kafka_broker, name_in), expected_texts, name_in)
    except AssertionError:
        _explain(results, [app], seed)
        raise


def test_errors_are_one_line(kafka_broker, model_dir, fresh_name):
    with HeldPort() as held:
        started = time.monotonic()
        line = one_line_error("send", "--to", f"kafka://{HOST}:{held.port}/t")
        assert "cannot reach" in line and "within 10 s" in line, line
        assert time.monotonic() - started < 30
    line = one_line_error("run", "--model", str(model_dir), "--no-metrics", "--in",
                           kafka_broker.url(fresh_name()))
    assert "no topic" in line
    line = one_line_error("listen", kafka_broker.url(fresh_name()), "--count", "1")
    assert "no topic" in line
    line = one_line_error("run", "--model", str(model_dir), "--in",
                           kafka_broker.url("t") + "?grup=x")
    assert "unknown option 'grup'" in line and "group" in line


def test_scram_over_tls_and_a_wrong_password(kafka_broker, model_dir, expected_texts,
                                             fresh_name):
    user, password = next(iter(kafka_broker.users.items()))
    name_in, name_out = fresh_name(), fresh_name()
    wrong = kafka_broker.secure_url(name_in, user, "not-the-password")
    line = one_line_error("send", "--to", wrong)
    assert "refused the user or password" in line and "not-the-password" not in line
    url_in = kafka_broker.secure_url(name_in, user, password)
    assert _cli("send", "--to", url_in, "--format", "u8").returncode == 0
    app = _run(model_dir, url_in, kafka_broker.secure_url(name_out, user, password),
               "--group", fresh_name()).wait_ready(TIMEOUT * 2)
    try:
        wait_for(lambda: len(read_committed(kafka_broker, name_out, len(expected_texts), 10))
                 >= len(expected_texts), TIMEOUT * 4, interval=0.5, what="every result")
        assert password not in app.log() and f"{user}:***@" in app.log()
    finally:
        assert app.stop() == 0, app.log()


def test_a_bad_record_is_answered_at_its_place(kafka_broker, model_dir, fresh_name):
    from confluent_kafka import Producer

    name_in, name_out = fresh_name(), fresh_name()
    kafka_broker.create_topic(name_in, 1)
    producer = Producer(kafka_broker.config())
    images = np.zeros((2, 64), dtype=np.uint8).tobytes()
    for value in (images[:64], b"not an image", images[64:]):
        producer.produce(name_in, value)
    assert producer.flush(TIMEOUT) == 0
    app = _run(model_dir, kafka_broker.url(name_in), kafka_broker.url(name_out),
               "--group", fresh_name()).wait_ready(TIMEOUT * 2)
    try:
        wait_for(lambda: len(read_committed(kafka_broker, name_out, 3, 10)) >= 3,
                 TIMEOUT * 4, interval=0.5, what="three results")
    finally:
        app.stop()
    results = read_committed(kafka_broker, name_out, 3)
    assert [tag for _, tag, _ in results] == [f"{name_in}/0/{i}" for i in range(3)]
    assert results[1][2].startswith(b"error:") and not results[2][2].startswith(b"error:")


def test_kafka_in_tcp_out_and_tcp_in_kafka_out(kafka_broker, model_dir, expected_texts,
                                               fresh_name, collector):
    """Kafka into another sink, and another source into Kafka: at least once, and every
    record answered."""
    name_in, name_out = fresh_name(), fresh_name()
    assert _cli("send", "--to", kafka_broker.url(name_in), "--format", "u8").returncode == 0
    app = _run(model_dir, kafka_broker.url(name_in), collector.addr, "--group", fresh_name())
    app.wait_ready(TIMEOUT * 2)
    try:
        assert collector.wait_count(len(expected_texts)) == expected_texts
        wait_for(lambda: app.stats()["connectors"]["source"]["counters"]["committed"]
                 >= len(expected_texts), what="the offsets committed")
    finally:
        app.stop()
    tcp = RedisApp(model_dir, f"{HOST}:0", kafka_broker.url(name_out), "--input-format", "u8")
    tcp.wait_ready(TIMEOUT * 2)
    try:
        import re

        port = int(re.search(rf"listening on {HOST}:(\d+)", tcp.log())[1])
        sent = _cli("send", "--to", f"{HOST}:{port}", "--format", "u8")
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: len(read_committed(kafka_broker, name_out, len(expected_texts), 10))
                 >= len(expected_texts), TIMEOUT * 4, interval=0.5, what="every result")
    finally:
        tcp.stop()
    results = read_committed(kafka_broker, name_out)
    assert [value.decode() for _, _, value in results] == expected_texts
    assert [tag for _, tag, _ in results] == [f"1:{i}" for i in range(len(expected_texts))]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_broker_restarted_mid_stream_loses_and_duplicates_nothing(
        kafka_broker, model_dir, expected_texts, fresh_name):
    """The broker is stopped and started again while ``run`` writes results: the clients
    reconnect, a transaction the restart cut is aborted and done again, and a read_committed
    reader finds one result per input record."""
    name_in, name_out = fresh_name(), fresh_name()
    repeat = 60
    total = repeat * len(expected_texts)
    _send_digits(kafka_broker, name_in, repeat)
    app = _run(model_dir, f"{kafka_broker.url(name_in)}?{FAST_GROUP}",
               kafka_broker.url(name_out), "--group", fresh_name(), "--max-batch", "2048",
               "--name", "restart").wait_ready(TIMEOUT * 2)
    try:
        wait_for(lambda: app.stats()["messages"]["out"] > 0, TIMEOUT * 2, what="results")
        kafka_broker.restart()
        wait_for(lambda: len(read_committed(kafka_broker, name_out, total, 30)) >= total,
                 240, interval=1, what="every result after the restart")
    finally:
        assert app.stop() == 0, app.log()
    results = read_committed(kafka_broker, name_out, total)
    print(f"\n{len(results):,} results for {total:,} records across a broker restart")
    _check(results, _inputs(kafka_broker, name_in), expected_texts, name_in)


def test_demo_through_a_broker_the_user_names(kafka_broker, model_dir, fresh_name):
    """``demo --kafka URL``: two runs of one group, one killed half-way; its summary says
    0 duplicates and 0 missing, and it exits 0."""
    done = _cli("demo", "--model", str(model_dir), "--kafka",
                f"{kafka_broker.url(fresh_name())}?partitions=3", timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    summary: dict[str, str] = {}
    for line in done.stdout.splitlines():
        words = line.split()
        if len(words) == 2:  # "inputs 1,797", "duplicates 0"...
            summary.setdefault(words[0], words[1])
    assert summary["duplicates"].strip() == "0" and summary["missing"].strip() == "0", done.stdout
    assert summary["results"].strip() == summary["inputs"].strip() == "1,797"
