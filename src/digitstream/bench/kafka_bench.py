"""``digitstream bench --kafka``: the Kafka connector against a bare confluent-kafka relay.

The broker is the one ``--kafka-bootstrap HOST:PORT`` names, or one started here from
the jars ``make kafka-jars`` fetches (KRaft, one process, a temporary directory, free
ports of 127.0.0.1). Each system reads a topic of its own, filled up front (3
partitions), and writes a result topic of its own:

* **relay** and **relay, transactions**: confluent-kafka alone, in a process of its
  own: a consumer of a group reading ``--max-batch`` records per call, each value
  produced untouched to the result topic; without transactions the batch is flushed
  and its offsets committed, with them the batch and its offsets are one transaction
  (``send_offsets_to_transaction``), as the connector does: the ceiling of this broker
  and client for the work;
* **digitstream** with ``?transactions=0`` (at least once) and with transactions
  (exactly once): ``digitstream run --in kafka://... --out kafka://...``, u8.

Throughput is (results - 1) / (time of the last result - time of the first), by the
records' timestamps, so neither process's start-up is counted. A figure is the median
of ``runs`` runs; the ratios are paired (each run's ratio, then the median).
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from digitstream.bench.report import broker_main
from digitstream.bench.systems import free_port, stop_process, wait_listening
from digitstream.codecs.inputs import encode_images
from digitstream.config import DEFAULTS
from digitstream.datasets import load_dataset
from digitstream.errors import UserError

HOST = "127.0.0.1"
PARTITIONS = 3
#: where ``make kafka-jars`` puts the broker's jars, unless $DIGITSTREAM_KAFKA_JARS says
JARS_ENV = "DIGITSTREAM_KAFKA_JARS"


def _jars() -> Path:
    named = os.environ.get(JARS_ENV)
    if named:
        return Path(named)
    found = sorted((Path.home() / ".cache" / "digitstream").glob("kafka-*"))
    if not found:
        raise UserError(
            "no Kafka broker: give one with --kafka-bootstrap HOST:PORT, or fetch the jars "
            f"with `make kafka-jars` (or name them in ${JARS_ENV})"
        )
    return found[-1]


def start_broker(directory: Path, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """A Kafka broker and controller in one process (KRaft) in ``directory``; (its process,
    its bootstrap address)."""
    if shutil.which("java") is None:
        raise UserError("no java for the Kafka broker: give one with --kafka-bootstrap")
    jars = _jars()
    port, controller = free_port(), free_port()
    properties = directory / "server.properties"
    properties.write_text(
        "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@{HOST}:{controller}",
                "controller.listener.names=CONTROLLER",
                f"listeners=PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller}",
                f"advertised.listeners=PLAINTEXT://{HOST}:{port}",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                f"log.dirs={directory / 'data'}",
                "offsets.topic.replication.factor=1",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "group.initial.rebalance.delay.ms=0",
                "auto.create.topics.enable=false",
            ]
        )
        + "\n"
    )
    log4j = directory / "log4j2.properties"
    log4j.write_text(
        "status = warn\nappender.file.type = File\nappender.file.name = file\n"
        f"appender.file.fileName = {directory / 'server.log'}\n"
        "appender.file.layout.type = PatternLayout\nappender.file.layout.pattern = %m%n\n"
        "rootLogger.level = WARN\nrootLogger.appenderRef.file.ref = file\n"
        "logger.started.name = kafka.server.KafkaRaftServer\nlogger.started.level = INFO\n"
    )
    java = ["java", "-Xmx512m", f"-Dlog4j2.configurationFile={log4j}", "-cp", f"{jars}/*"]
    cluster = "".join(c for c in uuid.uuid4().hex if c.isalnum())[:22]
    subprocess.run(
        [
            *java,
            "kafka.tools.StorageTool",
            "format",
            "--config",
            str(properties),
            "--cluster-id",
            cluster,
            "--standalone",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with open(directory / "kafka.out", "wb") as out:
        proc = subprocess.Popen(
            [*java, "kafka.Kafka", str(properties)], stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + timeout
    log = directory / "server.log"
    while time.monotonic() < deadline:
        if log.exists() and "Kafka Server started" in log.read_text(errors="replace"):
            return proc, f"{HOST}:{port}"
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the Kafka broker did not start: see {directory}")


def _topics(bootstrap: str, *names: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(n, PARTITIONS) for n in names]).values():
        future.result(60)


def _fill(bootstrap: str, topic: str, payloads: list[bytes], total: int) -> None:
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 5, "queue.buffering.max.messages": 1_000_000}
    )
    for k in range(total):
        while True:
            try:
                producer.produce(topic, payloads[k % len(payloads)])
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(120)


def _rate(bootstrap: str, topic: str, total: int, procs, timeout: float = 600) -> float:
    """Results per second in ``topic`` once it holds ``total`` committed records."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"b-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    stamps: list[int] = []
    deadline = time.monotonic() + timeout
    try:
        while len(stamps) < total:
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a system exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(stamps)} of {total} results in {timeout:.0f} s")
            for record in consumer.consume(10_000, 0.5):
                if record.error() is None:
                    stamps.append(record.timestamp()[1])
    finally:
        consumer.close()
    return (total - 1) / max((max(stamps) - min(stamps)) / 1000, 1e-3)


def _relay(bootstrap: str, topic_in: str, topic_out: str, batch: int, txn: bool) -> None:
    """The bare relay (a process of its own): consume, produce the same values, commit."""
    group = f"relay-{topic_in}"
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    settings: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "linger.ms": 5,
        "queue.buffering.max.messages": 1_000_000,
    }
    if txn:
        settings["transactional.id"] = f"relay-{topic_in}"
    else:
        settings["enable.idempotence"] = True
    producer = Producer(settings)
    if txn:
        producer.init_transactions(60)
    consumer.subscribe([topic_in])
    print("listening on", topic_in, flush=True)
    while True:
        records = [r for r in consumer.consume(batch, 0.5) if r.error() is None]
        if not records:
            continue
        offsets: dict[int, int] = {}
        if txn:
            producer.begin_transaction()
        for record in records:
            partition, offset = record.partition(), record.offset()
            assert partition is not None and offset is not None  # a record, not an error
            while True:
                try:
                    producer.produce(topic_out, record.value(), record.key(), partition)
                    break
                except BufferError:
                    producer.poll(0.05)
            offsets[partition] = offset + 1
        positions = [TopicPartition(topic_in, p, o) for p, o in offsets.items()]
        if txn:
            producer.send_offsets_to_transaction(positions, consumer.consumer_group_metadata(), 60)
            producer.commit_transaction(60)
        else:
            producer.flush(60)
            consumer.commit(offsets=positions, asynchronous=False)


SYSTEMS = ("relay", "relay_transactions", "digitstream", "digitstream_exactly_once")


def measure(
    model: Path, total: int = 200_000, runs: int = 3, log=print, bootstrap: str | None = None
) -> dict[str, Any]:
    """Every figure (messages/s, medians of ``runs``), and the paired ratios."""
    data = load_dataset("digits")
    payloads = encode_images(data.X, "u8")
    directory = Path(tempfile.mkdtemp(prefix="digitstream-kafka-bench-"))
    broker = None
    if bootstrap is None:
        broker, bootstrap = start_broker(directory)
    rates: dict[str, list[float]] = {}
    try:
        for run in range(runs):
            for system in SYSTEMS:
                tag = f"{system.replace('_', '-')}-{run}-{uuid.uuid4().hex[:6]}"
                _topics(bootstrap, f"{tag}-in", f"{tag}-out")
                _fill(bootstrap, f"{tag}-in", payloads, total)
                if system.startswith("relay"):
                    args = [
                        sys.executable,
                        "-m",
                        "digitstream.bench.kafka_bench",
                        bootstrap,
                        f"{tag}-in",
                        f"{tag}-out",
                        str(DEFAULTS.max_batch),
                        "1" if system == "relay_transactions" else "0",
                    ]
                else:
                    txn = "1" if system == "digitstream_exactly_once" else "0"
                    args = [
                        sys.executable,
                        "-m",
                        "digitstream.cli",
                        "run",
                        "--in",
                        f"kafka://{bootstrap}/{tag}-in",
                        "--out",
                        f"kafka://{bootstrap}/{tag}-out?transactions={txn}",
                        "--group",
                        tag,
                        "--input-format",
                        "u8",
                        "--model",
                        str(model),
                        "--no-metrics",
                    ]
                log_path = directory / f"{tag}.log"
                with open(log_path, "wb") as out:
                    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
                try:
                    wait_listening(proc, log_path)
                    rate = _rate(bootstrap, f"{tag}-out", total, [proc])
                finally:
                    stop_process(proc)
                rates.setdefault(system, []).append(rate)
            log(
                f"run {run + 1} of {runs}: "
                + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items())
            )
    finally:
        if broker is not None:
            broker.send_signal(signal.SIGTERM)
            try:
                broker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                broker.kill()
        shutil.rmtree(directory, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

    return {
        "messages": total,
        "runs": runs,
        "messages_per_s": medians,
        "all_runs": rates,
        "ratios": {
            "digitstream_vs_relay": paired("digitstream", "relay"),
            "exactly_once_vs_transactional_relay": paired(
                "digitstream_exactly_once", "relay_transactions"
            ),
        },
    }


def main(
    model_path: str = "models",
    quick: bool = False,
    json_path: str | None = None,
    runs: int | None = None,
    bootstrap: str | None = None,
) -> int:
    def measured(model, total, runs, log):
        return measure(model, total, runs, log, bootstrap)

    return broker_main(
        measured,
        model_path,
        quick,
        json_path,
        runs,
        lambda f: (
            f"Kafka, {f['messages']:,} records (u8, {PARTITIONS} partitions), median of "
            f"{f['runs']} runs; ratios paired",
            "messages",
            f["messages_per_s"],
        ),
    )


if __name__ == "__main__":  # the relay, as a process of its own: BOOTSTRAP IN OUT BATCH TXN
    bootstrap, topic_in, topic_out, batch, txn = sys.argv[1:6]
    _relay(bootstrap, topic_in, topic_out, int(batch), txn == "1")
