"""The Apache Kafka connector: ``kafka://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/TOPIC`` for
``--in`` and ``--out`` (``kafkas://`` for TLS).

Client: confluent-kafka (librdkafka). Its calls block, releasing the GIL, so each
client (consumer, producer) makes them on a thread of its own, one call at a time.
``USER:PASSWORD@`` is SASL/SCRAM (``?sasl-mechanism=SCRAM-SHA-256``, the default, or
``SCRAM-SHA-512``), over TLS with ``kafkas://``; ``?ca=FILE`` trusts a CA bundle,
``&cert=FILE&key=FILE`` is a client certificate. Any other librdkafka setting goes in
the query as it is named there (``?session.timeout.ms=6000``). The password is masked
in logs.

**Source.** A consumer in group ``--group`` (``?group=``) subscribed to TOPIC; the
broker assigns partitions, so several ``run`` processes share a topic. It reads with
``read_committed`` isolation, from the earliest offset when the group has none, up to
``--max-batch`` records per call; the records' values are the batch's payloads and
the batch's receipt (:class:`KafkaRecords`) holds their partitions, offsets and keys.
Offsets are committed only once results are delivered. A rebalance takes every
partition away (eager assignment): the batches read before it are stale
(:attr:`KafkaSource.epoch`), their offsets are never committed and, into Kafka with
exactly once, their results are never written: the partitions' new owners read those
records again from the committed offsets.

**Sink.** One record per result: value = the result payload, key = the input record's
key, header ``in`` = ``TOPIC/PARTITION/OFFSET`` of its input (``STREAM:SEQ`` for input
from elsewhere). A keyless result goes to the partition of its input's number (modulo
the result topic's partitions), so results of one input partition keep their order in
one result partition.

**Exactly once, Kafka to Kafka** (input and results on the same cluster, the default;
``?transactions=0`` on ``--out`` turns it off): a transactional producer
(``transactional.id`` = ``digitstream-GROUP-NAME``, so a ``run`` started again with the
same ``--name`` fences its dead predecessor) writes each group of results and commits
their inputs' offsets (``send_offsets_to_transaction`` with the consumer's group
metadata) in one transaction. A ``read_committed`` reader sees each result once: a
crash aborts the open transaction, and the records are read again from the committed
offsets; a ``run`` stopped past the group's session timeout comes back to a new group
generation, its transaction is refused and aborted, and its results are dropped.
Otherwise (other input, another cluster, or ``?transactions=0``) the producer is
idempotent and results are flushed before the inputs are acknowledged: at least once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from digitstream.batch import Batch, BatchResult, Receipt
from digitstream.batching import BatchPolicy
from digitstream.config import AppConfig
from digitstream.connectors.kit import (
    GROUP,
    Connector,
    Endpoint,
    GroupSource,
    Option,
    boolean,
    integer,
    mask,
    resolve_options,
    text,
)
from digitstream.errors import UserError
from digitstream.sinks import QueuedSink, Sink
from digitstream.sources import Source
from digitstream.wire.framing import Payloads, iter_frames

log = logging.getLogger("digitstream.kafka")
#: librdkafka's own log lines (a coordinator still loading, a retry): errors only, since
#: what matters reaches the connector as an error it reports itself
_CLIENT_LOG = logging.getLogger("digitstream.kafka.client")
_CLIENT_LOG.setLevel(logging.ERROR)

#: seconds to wait for a broker to answer at start (said in the error)
CONNECT_SECONDS = 10.0
#: seconds a transaction's commit (or a flush) may take before it is tried again
COMMIT_SECONDS = 60.0
#: how long one flush waits before the sink looks whether it is closing
FLUSH_SECONDS = 1.0
#: the longest one read waits for records before looking again (for a drain)
POLL_SECONDS = 0.5
#: a topic name (Kafka's own rule)
TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
#: librdkafka's codes this connector reacts to
_AUTHENTICATION = "authentic"  # in the text of an error: "SASL authentication error ..."
T = TypeVar("T")

CLIENT_OPTIONS = (
    Option("ca", text, None, "TLS: a CA bundle to trust instead of the system's.", metavar="FILE"),
    Option("cert", text, None, "TLS: this client's certificate (PEM).", metavar="FILE"),
    Option("key", text, None, "TLS: this client's private key (PEM).", metavar="FILE"),
    Option(
        "sasl-mechanism",
        text,
        "SCRAM-SHA-256",
        "With USER:PASSWORD@: SCRAM-SHA-256 or SCRAM-SHA-512.",
        metavar="NAME",
    ),
)
PARTITIONS = Option(
    "partitions",
    integer(1, 1 << 16),
    1,
    "Partitions of a topic made because it was missing (send, and run's --out).",
    metavar="N",
)
TRANSACTIONS = Option(
    "transactions",
    boolean,
    True,
    "Kafka to Kafka: results and their inputs' offsets in one transaction (0: at least "
    "once, without transactions).",
    metavar="1|0",
)


@dataclass(frozen=True)
class KafkaURL:
    """A parsed ``kafka://`` or ``kafkas://`` endpoint; the password is never in ``str()``."""

    bootstrap: str
    topic: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    mechanism: str = "SCRAM-SHA-256"
    settings: dict = field(default_factory=dict)

    @classmethod
    def of(cls, endpoint: Endpoint, options: dict) -> KafkaURL:
        """The URL of ``endpoint``; UserError (with the password masked) if malformed."""
        import urllib.parse  # start-up time: only Kafka URLs need it here

        shown = str(endpoint)
        authority, slash, topic = endpoint.location.partition("/")
        credentials, at, hosts = authority.rpartition("@")
        if not slash or not topic:
            raise UserError(
                f"no topic named in {shown}: expected {endpoint.scheme}://HOST:PORT/TOPIC"
            )
        topic = urllib.parse.unquote(topic)
        if not TOPIC.match(topic):
            raise UserError(f"{topic!r} in {shown} cannot name a Kafka topic")
        for host in hosts.split(","):
            name, colon, port = host.rpartition(":")
            if not colon or not name or not port.isdigit() or not 0 < int(port) < 65536:
                raise UserError(
                    f"expected {endpoint.scheme}://HOST:PORT[,HOST:PORT...]/TOPIC, got {shown}"
                )
        username = password = None
        if at:
            user, colon, secret = credentials.partition(":")
            username = urllib.parse.unquote(user) or None
            password = urllib.parse.unquote(secret) if colon else None
        mechanism = options["sasl-mechanism"].upper()
        if mechanism not in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
            raise UserError(f"sasl-mechanism in {shown}: SCRAM-SHA-256 or SCRAM-SHA-512")
        return cls(
            hosts,
            topic,
            username,
            password,
            endpoint.scheme == "kafkas",
            options["ca"],
            options["cert"],
            options["key"],
            mechanism,
            dict(options.get("settings", {})),
        )

    def __str__(self) -> str:
        auth = ""
        if self.username:
            auth = f"{self.username}:***@" if self.password else f"{self.username}@"
        return mask(f"{'kafkas' if self.tls else 'kafka'}://{auth}{self.bootstrap}/{self.topic}")

    def config(self, **more: Any) -> dict:
        """The librdkafka settings of a client of this URL, with ``more``."""
        config: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "logger": _CLIENT_LOG,
            # Since librdkafka 2.10 a client that finds every broker down forgets them all
            # and then waits on a group coordinator it dropped (librdkafka issue 5511): a
            # transaction's offsets would hang after a broker restart. Without that
            # recovery the client keeps its brokers and reconnects to them.
            "metadata.recovery.strategy": "none",
            "reconnect.backoff.max.ms": 500,
        }
        if self.username:
            protocol = "SASL_SSL" if self.tls else "SASL_PLAINTEXT"
            config.update(
                {
                    "sasl.mechanism": self.mechanism,
                    "sasl.username": self.username,
                    "sasl.password": self.password or "",
                }
            )
        else:
            protocol = "SSL" if self.tls else "PLAINTEXT"
        config["security.protocol"] = protocol
        if self.ca:
            config["ssl.ca.location"] = self.ca
        if self.cert:
            config["ssl.certificate.location"] = self.cert
        if self.key:
            config["ssl.key.location"] = self.key
        config.update(more)
        config.update(self.settings)
        return config


class _Client:
    """A confluent-kafka client driven from asyncio: its calls on a thread of its own, one at
    a time, and the errors librdkafka reports by callback kept for the messages."""

    def __init__(self, url: KafkaURL, name: str):
        self.url = url
        self.errors: collections.deque[str] = collections.deque(maxlen=20)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=name)

    def on_error(self, error) -> None:
        self.errors.append(str(error))
        log.debug("kafka %s: %s", self.url, error)

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    def stop(self) -> None:
        self._thread.shutdown(wait=True)

    def failure(self, exc: BaseException) -> UserError:
        """What a user reads, in one line, when a first request failed."""
        where = f"kafka at {self.url.bootstrap}"
        seen = " ".join(self.errors)
        if _AUTHENTICATION in seen.lower() or "sasl" in seen.lower():
            if not self.url.password:
                return UserError(f"{where} needs a user and password (USER:PASSWORD@ in the URL)")
            return UserError(f"{where} refused the user or password")
        if "certificate" in seen.lower() or "ssl handshake" in seen.lower():
            hint = f" against {self.url.ca}" if self.url.ca else "; name its CA with ?ca=FILE"
            return UserError(
                f"cannot reach {where} over TLS: the certificate does not verify{hint}"
            )
        unreachable = ("TIMED_OUT", "_TRANSPORT", "ALL_BROKERS_DOWN", "timed out")
        if any(word in str(exc) for word in unreachable) or not str(exc):
            return UserError(f"cannot reach {where} within {CONNECT_SECONDS:.0f} s")
        return UserError(f"{where}: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _partitions(client, url: KafkaURL, failure: Callable[[BaseException], UserError]):
    """The number of partitions of ``url.topic``, or None if there is no such topic; a
    :class:`UserError` if the cluster does not answer."""
    from confluent_kafka import KafkaError, KafkaException  # start-up time: client only

    try:
        metadata = client.list_topics(url.topic, timeout=CONNECT_SECONDS)
    except KafkaException as exc:
        client.poll(0.5)  # serves the error callbacks: what the broker said, if anything
        raise failure(exc) from None
    topic = metadata.topics.get(url.topic)
    if topic is None or (
        topic.error is not None and topic.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
    ):
        return None
    if topic.error is not None:
        if "AUTHORIZ" in topic.error.name():
            raise UserError(f"kafka at {url.bootstrap}: not authorised to use topic {url.topic}")
        raise UserError(f"kafka at {url.bootstrap}: topic {url.topic}: {topic.error.str()}")
    return len(topic.partitions)


def _create_topic(url: KafkaURL, partitions: int) -> None:
    """Make ``url.topic`` with ``partitions`` (replication: the cluster's default)."""
    from confluent_kafka import KafkaException  # start-up time: client only
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(url.config())
    future = admin.create_topics([NewTopic(url.topic, partitions)])[url.topic]
    try:
        future.result(CONNECT_SECONDS)
        log.info(
            "created topic %s (%d partitions) on kafka at %s", url.topic, partitions, url.bootstrap
        )
    except KafkaException as exc:
        if "TOPIC_ALREADY_EXISTS" not in str(exc):
            raise UserError(
                f"kafka at {url.bootstrap}: cannot create {url.topic}: {_reason(exc)}"
            ) from None


# ---------------------------------------------------------------------------- source
@dataclass(frozen=True)
class _Read:
    """What one consume() call's records were read under: the assignment's epoch, and the
    group's metadata then (its generation: a transaction that commits their offsets must
    name the generation they were read in, or the broker refuses it)."""

    epoch: int
    group_metadata: Any


class KafkaRecords(Receipt):
    """The receipt of a batch read from Kafka: per record its partition, offset, key and
    the read it came in (:class:`_Read`)."""

    __slots__ = ("bootstrap", "items", "topic")

    def __init__(self, source: KafkaSource, batch: Batch, items: list):
        super().__init__(source, batch.stream, batch.first_seq, batch.end_seq)
        self.items = items  # (partition, offset, key, read) per record
        self.topic = source.url.topic
        self.bootstrap = source.url.bootstrap

    @property
    def stale(self) -> bool:
        """Read before a rebalance took the partitions away: neither commit nor write it."""
        source = self.source
        assert isinstance(source, KafkaSource)
        epoch = source.epoch
        return self.items[0][3].epoch != epoch or self.items[-1][3].epoch != epoch

    @property
    def group_metadata(self):
        """The group's metadata as it was when the batch's last record was read."""
        return self.items[-1][3].group_metadata

    def next_offsets(self) -> dict[int, int]:
        """Partition -> the offset after this batch's last record in it."""
        offsets: dict[int, int] = {}
        for partition, offset, _, _ in self.items:
            if offset >= offsets.get(partition, -1):
                offsets[partition] = offset + 1
        return offsets


class KafkaSource(GroupSource):
    """Kafka source, at least once (exactly once with the Kafka sink on the same cluster):
    a crash of ``run`` costs nothing, its records are read again from the committed offsets.

    See the module doc."""

    guarantee = (
        "at least once (exactly once with the Kafka sink on the same cluster): a crash of run "
        "leaves its records uncommitted, to be read again"
    )
    options = (*CLIENT_OPTIONS, GROUP)
    client_settings = True

    def __init__(self, url: KafkaURL, group: str, name: str, policy: BatchPolicy):
        super().__init__(url.topic, policy, str(url), log)
        self.url = url
        self.group = group
        self.name = name
        #: bumped when a rebalance takes the partitions away: older receipts are stale
        self.epoch = 0
        self.consumer: Any = None
        self._client = _Client(url, "kafka-consumer")
        self.counts = collections.Counter(
            read=0, committed=0, stale=0, rebalances=0, rewinds=0, errors=0
        )

    @classmethod
    def build(cls, endpoint: Endpoint, options: dict, config: AppConfig, metrics=None) -> Source:
        return cls(
            KafkaURL.of(endpoint, options),
            options["group"],
            config.name,
            BatchPolicy(config.max_batch, config.max_delay),
        )

    def describe(self) -> str:
        return f"{self.url} (consumer group {self.group})"

    async def start(self, sink: Sink) -> None:
        if isinstance(sink, KafkaSink):
            # before any offset is read: a run started again under its name fences the
            # producer it replaces, whose last transaction is settled (committed or aborted)
            # first, so the offsets read next include it
            await sink.prepare(self)
        self.consumer = await self._client.call(self._subscribe)
        self.open_stream()

    def _subscribe(self):
        from confluent_kafka import Consumer  # start-up time: client only

        client = self._client
        consumer = Consumer(
            self.url.config(
                **{
                    "group.id": self.group,
                    "client.id": f"digitstream-{self.name}",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "auto.offset.reset": "earliest",
                    "isolation.level": "read_committed",
                    "partition.assignment.strategy": "range",
                    "error_cb": client.on_error,
                }
            )
        )
        try:
            if _partitions(consumer, self.url, client.failure) is None:
                raise UserError(f"no topic {self.url.topic!r} on kafka at {self.url.bootstrap}")
            consumer.subscribe(
                [self.url.topic],
                on_assign=self._assigned,
                on_revoke=self._revoked,
                on_lost=self._revoked,
            )
        except BaseException:
            consumer.close()
            raise
        return consumer

    def _assigned(self, consumer, partitions) -> None:
        log.info(
            "kafka %s: partitions %s assigned",
            self.url.topic,
            ",".join(str(p.partition) for p in partitions) or "(none)",
        )

    async def rewind(self) -> None:
        """Read again from the offsets the group has committed: every record read before is
        stale (dropped by the sink, never committed). On failure, ``run`` stops rather than
        go on past records it dropped."""
        try:
            await self._client.call(self._rewind)
        except Exception as exc:
            raise UserError(
                f"kafka {self.url}: cannot read again from the committed offsets: {exc}"
            ) from None

    def _rewind(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING  # start-up time: client only

        self.epoch += 1
        self.counts["rewinds"] += 1
        assignment = self.consumer.assignment()
        if not assignment:
            return  # the next assignment starts from the committed offsets
        committed = self.consumer.committed(assignment, timeout=COMMIT_SECONDS)
        for position in committed:
            if position.offset < 0:  # nothing committed: where auto.offset.reset says
                position.offset = OFFSET_BEGINNING
            self.consumer.seek(position)
        log.info(
            "kafka %s: reading again from the committed offsets %s",
            self.url,
            ", ".join(f"{p.partition}:{p.offset}" for p in committed),
        )

    def _revoked(self, consumer, partitions) -> None:
        # on the consumer's thread, within consume(): what was read before is stale now
        self.epoch += 1
        self.counts["rebalances"] += 1

    async def read(self, timeout: float | None) -> list[Payloads] | None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        consume = self.consumer.consume
        while not self.draining:
            wait = POLL_SECONDS
            if deadline is not None:
                wait = min(wait, deadline - loop.time())
                if wait <= 0.001:
                    return []
            records, read = await self._client.call(self._consume, consume, wait)
            values: list[bytes] = []
            items: list[tuple[int, int, bytes | None, _Read]] = []
            for record in records:
                if record.error() is not None:
                    self._error(record.error())
                    continue
                values.append(record.value() or b"")
                items.append((record.partition(), record.offset(), record.key(), read))
            if values:
                self.counts["read"] += len(values)
                self.pending += len(values)
                self.unbatched.add(items)
                return [Payloads.from_list(values)]
        return None

    def _consume(self, consume, wait: float):
        """On the consumer's thread: records, and what they were read under (taken right
        after the call, in which any rebalance callback has run)."""
        records = consume(self.policy.max_batch, wait)
        if not records:
            return records, None
        return records, _Read(self.epoch, self.consumer.consumer_group_metadata())

    def _error(self, error) -> None:
        from confluent_kafka import KafkaError  # start-up time: client only

        if error.code() == KafkaError._PARTITION_EOF:
            return
        self.counts["errors"] += 1
        if error.fatal():
            log.error("kafka %s: %s", self.url, error.str())
        else:
            log.warning("kafka %s: %s", self.url, error.str())

    def receipt_for(self, batch: Batch, items: list) -> Receipt:
        return KafkaRecords(self, batch, items)

    def retried_errors(self) -> tuple[type[BaseException], ...]:
        from confluent_kafka import KafkaException  # start-up time: client only

        return (KafkaException, OSError)

    async def settle(self, receipts: list[Receipt]) -> None:
        """Commit the offsets after the records of ``receipts`` that are not stale."""
        from confluent_kafka import KafkaException, TopicPartition  # start-up time

        offsets: dict[int, int] = {}
        for receipt in receipts:
            assert isinstance(receipt, KafkaRecords)  # this source makes no other
            if receipt.stale:
                self.counts["stale"] += len(receipt)
                continue
            for partition, offset in receipt.next_offsets().items():
                offsets[partition] = max(offset, offsets.get(partition, 0))
        if not offsets:
            return
        positions = [TopicPartition(self.url.topic, p, o) for p, o in offsets.items()]
        try:
            await self._client.call(self._commit, positions)
        except KafkaException as exc:
            error = exc.args[0]
            if error.retriable():
                raise
            # the partitions went to another consumer meanwhile: it reads them from the
            # last committed offsets (at least once)
            log.info("kafka %s: offsets not committed (%s)", self.url, error.str())
            return
        self.counts["committed"] += sum(len(r) for r in receipts)

    def _commit(self, positions) -> None:
        self.consumer.commit(offsets=positions, asynchronous=False)

    def counters(self) -> dict | None:
        return {
            "connector": "kafka",
            "where": self.describe(),
            "counters": dict(self.counts),
            "gauges": {"pending": self.pending},
        }

    async def close(self) -> None:
        await super().close()
        if self.consumer is not None:
            await self._client.call(self.consumer.close)
        self._client.stop()


# ---------------------------------------------------------------------------- sink
class KafkaSink(QueuedSink):
    """Kafka sink, exactly once for records of a Kafka source on the same cluster (results
    and input offsets in one transaction), at least once otherwise: a crash of ``run``
    loses nothing.

    See the module doc. ``write`` waits while ``high_water`` results are held."""

    guarantee = (
        "exactly once for records of a Kafka source on the same cluster (one transaction), "
        "at least once otherwise: a crash of run loses nothing"
    )
    options = (*CLIENT_OPTIONS, TRANSACTIONS, PARTITIONS)
    client_settings = True
    group_limit = 1 << 15

    def __init__(
        self,
        url: KafkaURL,
        name: str,
        transactions: bool = True,
        partitions: int = 1,
        high_water: int = 1 << 16,
    ):
        super().__init__(f"producing to {url}")
        self.url = url
        self.name = name
        self.transactions = transactions
        self.partitions = partitions
        self.high_water = high_water
        self.producer: Any = None  # idempotent, for results of other input
        self.transactional: Any = None  # made for the first results of a Kafka source
        self.topic_partitions = 1
        self._client = _Client(url, "kafka-producer")
        self._failed: list[str] = []
        self._closing = False
        self.counts.update(produced=0, transactions=0, aborted=0, dropped=0)

    @classmethod
    def build(cls, endpoint: Endpoint, options: dict, config: AppConfig) -> Sink:
        return cls(
            KafkaURL.of(endpoint, options),
            config.name,
            transactions=options["transactions"],
            partitions=options["partitions"],
        )

    def describe(self) -> str:
        return str(self.url)

    def weight(self, result: BatchResult) -> int:
        return result.count

    def retried_errors(self) -> tuple[type[BaseException], ...]:
        from confluent_kafka import KafkaException  # start-up time: client only

        return (KafkaException, BufferError, OSError)

    async def start(self) -> None:
        self.producer, self.topic_partitions = await self._client.call(self._open)
        await super().start()

    def _open(self):
        from confluent_kafka import Producer  # start-up time: client only

        # a record waits for a broker that is away as long as it takes (back-pressure stops
        # the source meanwhile), rather than failing after 5 minutes and being produced again
        producer = Producer(
            self._producer_config(**{"enable.idempotence": True, "message.timeout.ms": 0})
        )
        partitions = _partitions(producer, self.url, self._client.failure)
        if partitions is None:
            _create_topic(self.url, self.partitions)
            partitions = self.partitions
        return producer, partitions

    def _producer_config(self, **more: Any) -> dict:
        return self.url.config(
            **{
                "client.id": f"digitstream-{self.name}",
                "linger.ms": 5,
                "queue.buffering.max.messages": 1_000_000,
                "queue.buffering.max.kbytes": 1 << 20,
                "error_cb": self._client.on_error,
                **more,
            }
        )

    def _exactly_once(self, result: BatchResult) -> bool:
        receipt = result.receipt
        return (
            self.transactions
            and isinstance(receipt, KafkaRecords)
            and receipt.bootstrap == self.url.bootstrap
        )

    def joins(self, first: BatchResult, result: BatchResult) -> bool:
        return self._exactly_once(first) == self._exactly_once(result)

    async def deliver(self, results: list[BatchResult]) -> None:
        if not self._exactly_once(results[0]):
            await self._client.call(self._produce_flushed, results)
            return
        live = []
        for result in results:
            receipt = result.receipt
            assert isinstance(receipt, KafkaRecords)
            receipt.settled = True  # committed here with the results, or stale
            if receipt.stale:
                self.counts["dropped"] += result.count
            else:
                live.append(result)
        if live and not await self._client.call(self._transaction, live):
            # what became of the transaction is not known (the producer failed or was
            # fenced, or its abort failed): the records are read again from the offsets the
            # group has committed, which were committed with their results, so nothing goes
            # twice; everything read before is dropped on its way
            receipt = live[0].receipt
            assert isinstance(receipt, KafkaRecords)
            source = receipt.source
            assert isinstance(source, KafkaSource)
            await source.rewind()

    # on the producer's thread
    def _produce(self, producer, results: list[BatchResult]) -> None:
        topic, partitions = self.url.topic, self.topic_partitions
        for result in results:
            receipt = result.receipt
            payloads = iter_frames(result.output)
            if isinstance(receipt, KafkaRecords):
                prefix = f"{receipt.topic}/"
                for payload, (partition, offset, key, _) in zip(payloads, receipt.items):
                    headers = [("in", f"{prefix}{partition}/{offset}".encode())]
                    if key is None:
                        self._send(producer, topic, payload, None, headers, partition % partitions)
                    else:
                        self._send(producer, topic, payload, key, headers, -1)
            else:
                for seq, payload in enumerate(payloads, result.first_seq):
                    headers = [("in", f"{result.stream}:{seq}".encode())]
                    self._send(producer, topic, payload, None, headers, -1)
            self.counts["produced"] += result.count

    def _send(self, producer, topic, payload, key, headers, partition) -> None:
        while True:
            try:
                if partition < 0:
                    producer.produce(topic, payload, key, headers=headers, on_delivery=self._report)
                else:
                    producer.produce(
                        topic, payload, key, partition, headers=headers, on_delivery=self._report
                    )
                return
            except BufferError:  # its queue is full: let it send
                producer.poll(0.05)

    def _report(self, error, record) -> None:
        if error is not None:
            self._failed.append(error.str())

    def _produce_flushed(self, results: list[BatchResult]) -> None:
        from confluent_kafka import KafkaError, KafkaException  # start-up time: client only

        self._failed.clear()
        self._produce(self.producer, results)
        # what is queued stays queued while the broker is away (the producer sends it when
        # the broker is back, in order, once): producing it again would duplicate it and
        # put it out of order. Only records the producer gave up on are produced again.
        waited = 0.0
        while (left := self.producer.flush(FLUSH_SECONDS)) and not self._closing:
            waited += FLUSH_SECONDS
            if waited % COMMIT_SECONDS < FLUSH_SECONDS:
                log.warning(
                    "kafka %s: %d results wait for the broker (%.0f s)", self.url, left, waited
                )
        if left or self._failed:
            reason = self._failed[0] if self._failed else f"{left} records not sent"
            raise KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT, reason))

    def _transaction(self, results: list[BatchResult]) -> bool:
        """Write ``results`` and commit their inputs' offsets in one transaction; False when
        its outcome is unknown (see :meth:`deliver`)."""
        from confluent_kafka import KafkaException, TopicPartition  # start-up time

        first = results[0].receipt
        assert isinstance(first, KafkaRecords)
        source = first.source
        assert isinstance(source, KafkaSource)
        if self.transactional is None:  # the last one failed
            self.transactional = self._transactional_producer(source.group)
        producer = self.transactional
        offsets: dict[int, int] = {}
        for result in results:
            receipt = result.receipt
            assert isinstance(receipt, KafkaRecords)
            for partition, offset in receipt.next_offsets().items():
                offsets[partition] = max(offset, offsets.get(partition, 0))
        positions = [TopicPartition(first.topic, p, o) for p, o in offsets.items()]
        try:
            producer.begin_transaction()
            self._produce(producer, results)
            producer.send_offsets_to_transaction(positions, first.group_metadata, COMMIT_SECONDS)
            self._commit(producer)
        except KafkaException as exc:
            return self._failed_transaction(exc, results)
        self.counts["transactions"] += 1
        return True

    def _commit(self, producer) -> None:
        """Commit the transaction; asked again while the broker says the answer may yet
        come (a commit that timed out may have been done: aborting it then, or writing its
        results again, could put them in twice)."""
        from confluent_kafka import KafkaException  # start-up time: client only

        while True:
            try:
                producer.commit_transaction(COMMIT_SECONDS)
                return
            except KafkaException as exc:
                error = exc.args[0]
                if not error.retriable() or self._closing:
                    raise
                log.warning("kafka %s: commit not confirmed (%s); asked again", self.url, error)

    def _failed_transaction(self, exc, results: list[BatchResult]) -> bool:
        """A transaction that did not commit. Aborted: its results are dropped if their
        inputs are no longer this consumer's (their new owner reads them again), else
        raised, to be tried again. Not known to be aborted (a fatal error, a fenced
        producer, an abort that failed): a new producer takes over, and False."""
        error = exc.args[0]
        self.counts["aborted"] += 1
        if error.fatal():
            log.warning(
                "kafka %s: the producer failed (%s); a new one takes over", self.url, error.str()
            )
            self.transactional = None
            self._drop(results, error.str())
            return False
        try:
            # what is still queued first: an abort that reaches the broker before it knows
            # the transaction's partitions fails for good (librdkafka issue 4849)
            self.transactional.flush(COMMIT_SECONDS)
            self.transactional.abort_transaction(COMMIT_SECONDS)
        except Exception as abort:
            log.warning("kafka %s: abort failed (%s); a new producer takes over", self.url, abort)
            self.transactional = None
            self._drop(results, error.str())
            return False
        if _stale_generation(error):
            self._drop(results, error.str())
            return True
        raise exc

    def _drop(self, results: list[BatchResult], reason: str) -> None:
        frames = sum(r.count for r in results)
        self.counts["dropped"] += frames
        self.counts["produced"] -= frames
        log.info(
            "kafka %s: %d results dropped (%s): their records are read again by the "
            "partitions' owner",
            self.url,
            frames,
            reason,
        )

    async def prepare(self, source: KafkaSource) -> None:
        """The transactional producer for ``source``'s results, if they are committed here."""
        from confluent_kafka import KafkaException  # start-up time: client only

        if not (self.transactions and source.url.bootstrap == self.url.bootstrap):
            return
        try:
            self.transactional = await self._client.call(self._transactional_producer, source.group)
        except KafkaException as exc:
            raise self._client.failure(exc) from None

    def _transactional_producer(self, group: str):
        from confluent_kafka import Producer  # start-up time: client only

        producer = Producer(
            self._producer_config(**{"transactional.id": f"digitstream-{group}-{self.name}"})
        )
        producer.init_transactions(COMMIT_SECONDS)
        return producer

    def counters(self) -> dict | None:
        return {
            "connector": "kafka",
            "where": self.describe(),
            "counters": {
                **{k: self.counts[k] for k in ("produced", "transactions", "aborted", "dropped")},
                "retries": self.backoff.outages,
            },
            "gauges": {"pending": self.undelivered},
        }

    async def close(self) -> None:
        self._closing = True  # a flush waiting for a broker that is away gives up
        await super().close()
        for producer in (self.producer, self.transactional):
            if producer is not None:
                await self._client.call(producer.flush, 5.0)
        self._client.stop()


def _stale_generation(error) -> bool:
    """Whether a failed transaction's inputs went to another consumer of the group."""
    name = error.name()
    return any(
        word in name
        for word in ("ILLEGAL_GENERATION", "UNKNOWN_MEMBER_ID", "FENCED", "REBALANCE_IN_PROGRESS")
    )


# ---------------------------------------------------------------------------- tools
class KafkaPublisher:
    """``send --to kafka://...``: one record per image, headers ``label`` and ``id``; the
    topic is made if missing (``?partitions=N``)."""

    def __init__(self, endpoint: Endpoint):
        from confluent_kafka import Producer  # start-up time: client only

        options = resolve_options((*CLIENT_OPTIONS, PARTITIONS), endpoint, client_settings=True)
        self.url = KafkaURL.of(endpoint, options)
        self.client = _Client(self.url, "kafka-send")
        self.failed: list[str] = []
        self.producer = Producer(
            self.url.config(
                **{
                    "enable.idempotence": True,
                    "linger.ms": 5,
                    "queue.buffering.max.messages": 1_000_000,
                    "error_cb": self.client.on_error,
                }
            )
        )
        if _partitions(self.producer, self.url, self.client.failure) is None:
            _create_topic(self.url, options["partitions"])

    def describe(self) -> str:
        return str(self.url)

    def publish(self, payloads: list[bytes], labels: list[bytes], ids: list[bytes]) -> None:
        producer, topic = self.producer, self.url.topic

        def report(error, record) -> None:
            if error is not None:
                self.failed.append(error.str())

        for payload, label, record_id in zip(payloads, labels, ids):
            while True:
                try:
                    producer.produce(
                        topic,
                        payload,
                        headers=[("label", label), ("id", record_id)],
                        on_delivery=report,
                    )
                    break
                except BufferError:
                    producer.poll(0.05)
        self.flush()

    def flush(self) -> None:
        left = self.producer.flush(COMMIT_SECONDS)
        if left or self.failed:
            raise UserError(
                f"kafka at {self.url.bootstrap}: "
                + (self.failed[0] if self.failed else f"{left} records not sent in time")
            )

    def close(self) -> None:
        self.producer.flush(5.0)
        self.client.stop()


class KafkaResultReader:
    """``listen kafka://...``: every committed record of the topic from the start of each
    partition (``read_committed``), partition by partition as they come."""

    def __init__(self, endpoint: Endpoint):
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition  # start-up time

        options = resolve_options(CLIENT_OPTIONS, endpoint, client_settings=True)
        self.url = KafkaURL.of(endpoint, options)
        self.client = _Client(self.url, "kafka-listen")
        self.consumer = Consumer(
            self.url.config(
                **{
                    "group.id": f"digitstream-listen-{uuid.uuid4().hex}",
                    "enable.auto.commit": False,
                    "isolation.level": "read_committed",
                    "error_cb": self.client.on_error,
                }
            )
        )
        partitions = _partitions(self.consumer, self.url, self.client.failure)
        if partitions is None:
            self.consumer.close()
            raise UserError(f"no topic {self.url.topic!r} on kafka at {self.url.bootstrap}")
        self.consumer.assign(
            [TopicPartition(self.url.topic, p, OFFSET_BEGINNING) for p in range(partitions)]
        )

    def describe(self) -> str:
        return str(self.url)

    def read(self, most: int, timeout: float) -> list[bytes]:
        records = self.consumer.consume(most, timeout)
        return [r.value() or b"" for r in records if r.error() is None]

    def close(self) -> None:
        self.consumer.close()
        self.client.stop()


CONNECTOR = Connector(
    ("kafka", "kafkas"),
    KafkaSource,
    KafkaSink,
    publisher=KafkaPublisher,
    result_reader=KafkaResultReader,
    title="Apache Kafka",
)
