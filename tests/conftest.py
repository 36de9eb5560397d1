"""Shared fixtures: the digits data, the seed's model as a bundle, listeners, the application."""

from __future__ import annotations

import numpy as np
import pytest

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
