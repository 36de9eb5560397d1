"""The message brokers the connector tests run against (``brokers.py``), driven with their
client libraries directly: what a connector relies on works on these servers.

NATS JetStream: a stream with file storage, publishing with ``Nats-Msg-Id`` (the server drops
a duplicate), a durable pull consumer that fetches and acknowledges, the stream and the
consumer's place kept across a restart and a SIGKILL, credentials and TLS.

Kafka: a topic of three partitions, the consume-transform-produce loop in transactions
(``send_offsets_to_transaction``) across a broker restart, seen by a ``read_committed``
reader as exactly the committed records, and the SASL_SSL listener's SCRAM user.
"""

from __future__ import annotations

import asyncio
import ssl
import time

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from certs import Certificates
from helpers import TIMEOUT

nats = pytest.importorskip("nats")
from nats.js.api import AckPolicy, ConsumerConfig, StorageType  # noqa: E402

# --- NATS JetStream ------------------------------------------------------------------------


async def _publish(js, subject: str, ids: list[str]) -> list:
    return [await js.publish(subject, f"data {i}".encode(), headers={"Nats-Msg-Id": i},
                             timeout=TIMEOUT)
            for i in ids]


async def _fetch_all(sub, n: int) -> list:
    """``n`` messages from a pull subscription, fetched in batches and acknowledged once the
    server confirms each acknowledgement."""
    got: list = []
    deadline = time.monotonic() + TIMEOUT
    while len(got) < n:
        assert time.monotonic() < deadline, f"fetched {len(got)} of {n}"
        try:
            batch = await sub.fetch(n - len(got), timeout=1)
        except nats.errors.TimeoutError:
            continue
        for msg in batch:
            await msg.ack_sync(timeout=TIMEOUT)
        got.extend(batch)
    return got


def test_nats_jetstream_drops_duplicates_and_a_pull_consumer_acknowledges(nats_server,
                                                                           fresh_name):
    name = fresh_name()

    async def main():
        nc = await nats.connect(**nats_server.connect_options())
        try:
            js = nc.jetstream(timeout=TIMEOUT)
            await js.add_stream(name=name, subjects=[name], storage=StorageType.FILE,
                                duplicate_window=60)
            acks = await _publish(js, name, [f"m{i}" for i in range(10)])
            assert [a.seq for a in acks] == list(range(1, 11))
            assert not any(a.duplicate for a in acks)
            again = await _publish(js, name, ["m3", "m7"])
            assert [(a.seq, a.duplicate) for a in again] == [(4, True), (8, True)]
            assert (await js.stream_info(name)).state.messages == 10

            sub = await js.pull_subscribe(name, durable="workers", stream=name,
                                          config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT,
                                                                ack_wait=30))
            got = await _fetch_all(sub, 10)
            assert [m.data for m in got] == [f"data m{i}".encode() for i in range(10)]
            assert [m.headers["Nats-Msg-Id"] for m in got] == [f"m{i}" for i in range(10)]
            assert [m.metadata.sequence.stream for m in got] == list(range(1, 11))
            info = await js.consumer_info(name, "workers")
            assert (info.num_pending, info.num_ack_pending, info.ack_floor.stream_seq) == (0, 0, 10)
            with pytest.raises(nats.errors.TimeoutError):
                await sub.fetch(1, timeout=0.3)
        finally:
            await nc.close()

    asyncio.run(main())


@pytest.mark.parametrize("how", ["restart", "kill"])
def test_nats_stream_and_consumer_survive_the_server(nats_server, fresh_name, how):
    """Stopped (SIGTERM) or killed (SIGKILL) and started again on its port: the stream's
    messages, its duplicate window and the durable consumer's acknowledgements are kept."""
    name = fresh_name()

    async def before():
        nc = await nats.connect(**nats_server.connect_options())
        try:
            js = nc.jetstream(timeout=TIMEOUT)
            await js.add_stream(name=name, subjects=[name], storage=StorageType.FILE,
                                duplicate_window=60)
            await _publish(js, name, [f"m{i}" for i in range(6)])
            sub = await js.pull_subscribe(name, durable="workers", stream=name)
            await _fetch_all(sub, 4)
        finally:
            await nc.close()

    async def after():
        nc = await nats.connect(**nats_server.connect_options())
        try:
            js = nc.jetstream(timeout=TIMEOUT)
            assert (await js.stream_info(name)).state.messages == 6
            assert (await _publish(js, name, ["m5"]))[0].duplicate
            sub = await js.pull_subscribe(name, durable="workers", stream=name)
            got = await _fetch_all(sub, 2)
            assert [m.metadata.sequence.stream for m in got] == [5, 6]
        finally:
            await nc.close()

    asyncio.run(before())
    port = nats_server.port
    if how == "kill":
        nats_server.kill()
        nats_server.start()
    else:
        nats_server.restart()
    assert nats_server.port == port
    asyncio.run(after())


def test_nats_password_and_tls(start_nats, tmp_path, fresh_name):
    server = start_nats(user="alice", password="right-pw", tls=Certificates(tmp_path / "certs"))
    name = fresh_name()
    assert server.url(name).startswith("tls://")

    async def main():
        nc = await nats.connect(**server.connect_options())
        try:
            js = nc.jetstream(timeout=TIMEOUT)
            await js.add_stream(name=name, subjects=[name])
            assert (await js.publish(name, b"x", timeout=TIMEOUT)).seq == 1
        finally:
            await nc.close()
        for wrong in ({"password": "wrong-pw"}, {"user": None, "password": None}):
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await nats.connect(**server.connect_options(**wrong))
        # the system's store does not trust the test's CA
        with pytest.raises(ssl.SSLCertVerificationError):
            await nats.connect(**server.connect_options(tls=ssl.create_default_context()))

    asyncio.run(main())
    # and it still serves
    asyncio.run(_ping(server))


async def _ping(server) -> None:
    nc = await nats.connect(**server.connect_options())
    try:
        await nc.flush(timeout=TIMEOUT)
    finally:
        await nc.close()


# --- Kafka ---------------------------------------------------------------------------------


def _produce(broker, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = Producer(broker.config(enable_idempotence=True))
    errors: list = []
    for key, value in records:
        producer.produce(topic, value, key,
                         on_delivery=lambda err, msg: err is not None and errors.append(err))
    assert producer.flush(TIMEOUT) == 0
    assert errors == []


def _read_committed(broker, topic: str, n: int, group: str) -> list:
    """Every record of ``topic`` a read_committed reader sees, once it has seen ``n`` and no
    more come for a moment."""
    consumer = Consumer(broker.config(group_id=group, auto_offset_reset="earliest",
                                      isolation_level="read_committed",
                                      enable_auto_commit=False))
    consumer.subscribe([topic])
    seen: list = []
    deadline = time.monotonic() + TIMEOUT
    quiet_until = None
    try:
        while quiet_until is None or time.monotonic() < quiet_until:
            assert time.monotonic() < deadline, f"read {len(seen)} of {n}"
            for msg in consumer.consume(500, timeout=0.2):
                if msg.error() is None:
                    seen.append(msg)
                elif msg.error().code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(msg.error())
            if len(seen) >= n and quiet_until is None:
                quiet_until = time.monotonic() + 1.0
    finally:
        consumer.close()
    return seen


def test_kafka_three_partitions_keep_order_per_partition(kafka_broker, fresh_name):
    topic = fresh_name()
    kafka_broker.create_topic(topic, 3)
    records = [(f"k{i % 7}".encode(), f"v{i}".encode()) for i in range(300)]
    _produce(kafka_broker, topic, records)
    seen = _read_committed(kafka_broker, topic, 300, fresh_name())
    assert sorted(m.value() for m in seen) == sorted(v for _, v in records)
    assert {m.partition() for m in seen} == {0, 1, 2}
    for partition in range(3):
        mine = [m for m in seen if m.partition() == partition]
        assert [m.offset() for m in mine] == list(range(len(mine)))
        # one key, one partition, in the order produced
        for key in {m.key() for m in mine}:
            values = [m.value() for m in mine if m.key() == key]
            assert values == [v for k, v in records if k == key]


#: librdkafka (2.10 and later) drops every broker it knows once all of them have been down a
#: while and bootstraps again; a transactional producer whose group coordinator was dropped
#: that way then waits in send_offsets_to_transaction past its timeout, for good
#: (confluentinc/librdkafka#5511). One broker restarted is all it takes, so clients that must
#: live through a broker restart keep the brokers they know.
_KEEP_BROKERS = {"metadata_recovery_strategy": "none", "reconnect_backoff_max_ms": 500}


class _Abort(Exception):
    pass


class _Relay:
    """Consume-transform-produce in Kafka transactions: each batch's results and its input
    offsets committed together (``send_offsets_to_transaction``)."""

    def __init__(self, broker, source: str, sink: str, group: str):
        self.sink = sink
        # a broker killed and started again has forgotten the consumer, and its rejoining
        # waits out the session of the member it was: keep that short
        self.consumer = Consumer(broker.config(
            group_id=group, auto_offset_reset="earliest", enable_auto_commit=False,
            isolation_level="read_committed", session_timeout_ms=2000,
            heartbeat_interval_ms=300, **_KEEP_BROKERS))
        self.consumer.subscribe([source])
        self.producer = Producer(broker.config(transactional_id=f"{group}-relay",
                                               transaction_timeout_ms=30000, **_KEEP_BROKERS))
        self.producer.init_transactions(TIMEOUT)

    def batch(self, limit: int, abort: bool = False) -> int:
        """Relay up to ``limit`` records in one transaction (aborted with ``abort``); how
        many."""
        msgs = [m for m in self.consumer.consume(limit, timeout=1) if m.error() is None]
        if not msgs:
            return 0
        self.producer.begin_transaction()
        for m in msgs:
            self.producer.produce(self.sink, m.value().upper(), m.key(),
                                  headers={"in": f"{m.topic()}/{m.partition()}/{m.offset()}"})
        try:
            if abort:
                raise _Abort
            self.producer.send_offsets_to_transaction(
                self.consumer.position(self.consumer.assignment()),
                self.consumer.consumer_group_metadata(), TIMEOUT)
            self._commit()
        except (_Abort, KafkaException) as exc:
            # the group may have moved on (a broker restart can cost the consumer its
            # membership): the batch is relayed again from the offsets the group holds
            if isinstance(exc, KafkaException) and not exc.args[0].txn_requires_abort():
                raise
            # librdkafka may send EndTxn before the coordinator has taken the transaction's
            # partitions, which it answers with a fatal INVALID_TXN_STATE
            # (confluentinc/librdkafka#4849); a partition's first delivery shows it has them
            self.producer.flush(TIMEOUT)
            self.producer.abort_transaction(TIMEOUT)
            self._rewind()
            return 0
        return len(msgs)

    def _commit(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                self.producer.commit_transaction(TIMEOUT)
                return
            except KafkaException as exc:
                # a commit cut short (the broker going away) may be retried as it is
                if not exc.args[0].retriable() or time.monotonic() > deadline:
                    raise

    def _rewind(self) -> None:
        """Back to the group's committed offsets, as after an aborted transaction."""
        committed = self.consumer.committed(self.consumer.assignment(), TIMEOUT)
        for tp in committed:
            self.consumer.seek(TopicPartition(tp.topic, tp.partition,
                                              tp.offset if tp.offset >= 0 else 0))

    def close(self) -> None:
        self.consumer.close()


@pytest.mark.parametrize("how", ["restart", "kill"])
def test_kafka_transactions_are_exactly_once_across_a_broker_restart(kafka_broker, fresh_name,
                                                                      how):
    """Stopped (SIGTERM) or killed (SIGKILL) and started again on its ports mid-way: the
    relay goes on, and a read_committed reader sees each input's result once."""
    source, sink, group = fresh_name(), fresh_name(), fresh_name()
    kafka_broker.create_topic(source, 3)
    kafka_broker.create_topic(sink, 3)
    records = [(f"k{i % 5}".encode(), f"v{i}".encode()) for i in range(600)]
    _produce(kafka_broker, source, records)

    relay = _Relay(kafka_broker, source, sink, group)
    try:
        done = 0
        deadline = time.monotonic() + 2 * TIMEOUT
        while done < 200:
            done += relay.batch(50)
            assert time.monotonic() < deadline
        # an aborted transaction's records never reach a read_committed reader
        relay.batch(50, abort=True)
        port = kafka_broker.port
        if how == "kill":
            kafka_broker.kill()
            kafka_broker.start()
        else:
            kafka_broker.restart()
        assert kafka_broker.port == port
        while done < len(records):
            done += relay.batch(50)
            assert time.monotonic() < deadline, f"relayed {done}"
        assert done == len(records)
    finally:
        relay.close()

    seen = _read_committed(kafka_broker, sink, len(records), fresh_name())
    assert len(seen) == len(records)
    inputs = [dict(m.headers())["in"].decode() for m in seen]
    assert len(set(inputs)) == len(records)
    by_input = {(p, int(o)): m.value() for (_, p, o), m in
                zip((i.split("/") for i in inputs), seen)}
    # every result from its input, and per input partition in input order
    source_seen = _read_committed(kafka_broker, source, len(records), fresh_name())
    for m in source_seen:
        assert by_input[(str(m.partition()), m.offset())] == m.value().upper()
    for partition in map(str, range(3)):
        offsets = [int(i.split("/")[2]) for i in inputs if i.split("/")[1] == partition]
        assert offsets == sorted(offsets)
    # and the group's committed offsets are the end of every input partition
    consumer = Consumer(kafka_broker.config(group_id=group))
    try:
        committed = consumer.committed([TopicPartition(source, p) for p in range(3)], TIMEOUT)
        ends = [consumer.get_watermark_offsets(tp, TIMEOUT)[1] for tp in committed]
        assert [tp.offset for tp in committed] == ends
    finally:
        consumer.close()


def test_kafka_scram_over_tls_takes_the_right_password_only(kafka_broker, fresh_name):
    topic = fresh_name()
    kafka_broker.create_topic(topic, 1)
    (user, password), = kafka_broker.users.items()
    assert kafka_broker.secure_url(topic, user, password).startswith(f"kafkas://{user}:")

    producer = Producer(kafka_broker.secure_config(user, password))
    producer.produce(topic, b"over TLS")
    assert producer.flush(TIMEOUT) == 0

    def failure(config: dict) -> str:
        errors: list[KafkaError] = []
        admin = Producer({**config, "error_cb": errors.append})
        deadline = time.monotonic() + TIMEOUT
        while not errors:
            assert time.monotonic() < deadline, "no error for a client that must fail"
            admin.poll(0.1)
        return errors[0].str()

    wrong = failure(kafka_broker.secure_config(user, "wrong-pw"))
    assert "Authentication failed" in wrong, wrong
    # without the test's CA, the system's store does not trust the broker
    untrusted = {**kafka_broker.secure_config(user, password)}
    del untrusted["ssl.ca.location"]
    assert "certificate verify failed" in failure(untrusted)

    seen = _read_committed(kafka_broker, topic, 1, fresh_name())
    assert [m.value() for m in seen] == [b"over TLS"]
