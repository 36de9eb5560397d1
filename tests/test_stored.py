"""A linear bundle served from its stored arrays before scikit-learn is loaded:
the same fused map bit for bit, the same checks of the files, nothing read that
skops would not trust, and rows near a tie answered by the real pipeline once it
is loaded."""

from __future__ import annotations

import io
import json
import threading
import warnings
import zipfile

import numpy as np
import pytest
import skops.io as sio
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, RidgeClassifier, SGDClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler
from sklearn.svm import LinearSVC

from digitstream.model.bundle import (
    CARD_FILE,
    PIPELINE_FILE,
    BundleError,
    content_hash,
    finish_loading,
    load_bundle,
    load_bundle_stored,
    save_bundle,
)
from digitstream.model.runner import make_runner
from digitstream.model.stored import ESTIMATOR_KINDS, StoredPipeline, read_stored
from helpers import TIMEOUT, Collector, wait_for

X, Y = load_digits(return_X_y=True)


def _fit(pipeline, y=Y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return pipeline.fit(X, y)


READ = {
    "pca-logistic": lambda: Pipeline([("PCA", PCA(40, random_state=0)),
                                      ("Logistic Regression", LogisticRegression(max_iter=3000))]),
    "scaler-pca-whiten-logistic": lambda: Pipeline([
        ("Scaler", StandardScaler()), ("PCA", PCA(30, whiten=True, random_state=0)),
        ("Logistic Regression", LogisticRegression(max_iter=3000))]),
    "scaler-no-mean-linear-svc": lambda: Pipeline([("Scaler", StandardScaler(with_mean=False)),
                                                   ("SVM", LinearSVC(C=0.1, max_iter=3000))]),
    "scaler-no-std-logistic": lambda: Pipeline([("Scaler", StandardScaler(with_std=False)),
                                                ("LR", LogisticRegression(max_iter=3000))]),
    "passthrough-logistic": lambda: Pipeline([("Nothing", "passthrough"),
                                              ("LR", LogisticRegression(max_iter=3000))]),
    "logistic-alone": lambda: LogisticRegression(max_iter=3000),
}
NOT_READ = {
    "ridge": lambda: Pipeline([("PCA", PCA(20, random_state=0)), ("Ridge", RidgeClassifier())]),
    "sgd": lambda: Pipeline([("Scaler", StandardScaler()), ("SGD", SGDClassifier(random_state=0))]),
    "min-max-logistic": lambda: Pipeline([("Scale", MinMaxScaler()),
                                          ("LR", LogisticRegression(max_iter=3000))]),
    "forest": lambda: RandomForestClassifier(n_estimators=3, random_state=0),
}


def _bundle(tmp_path, pipeline, name="m"):
    return save_bundle(pipeline, tmp_path / name, {"model": name})


@pytest.mark.parametrize("name", sorted(READ))
@pytest.mark.parametrize("binary", [False, True])
def test_a_fusable_bundle_is_served_from_its_arrays_exactly_as_once_loaded(tmp_path, name, binary):
    pipeline = _fit(READ[name](), y=(Y >= 5) if binary else Y)
    directory = _bundle(tmp_path, pipeline)
    stored = load_bundle_stored(directory)
    assert stored is not None and isinstance(stored.pipeline, StoredPipeline)
    full = load_bundle(directory)
    for attribute in ("n_features", "step_names", "content_hash", "card"):
        assert getattr(stored, attribute) == getattr(full, attribute)
    assert stored.classes.dtype == full.classes.dtype
    np.testing.assert_array_equal(stored.classes, full.classes)
    quick, real = make_runner(stored.pipeline), make_runner(full.pipeline)
    assert quick.compiled and quick.same_map(real)
    assert quick.stage_names == real.stage_names
    # rows near a tie need the real pipeline: hand it over first, as finish_loading does
    assert finish_loading(stored).content_hash == stored.content_hash
    assert stored.pipeline.resolved
    for batch in (X, X.astype(np.float32)):
        np.testing.assert_array_equal(quick.classes[quick.predict(batch).class_index],
                                      pipeline.predict(X))
    a, b = quick.predict(X, want_confidence=True), real.predict(X, want_confidence=True)
    np.testing.assert_array_equal(a.class_index, b.class_index)
    if b.confidence is None:
        assert a.confidence is None
    else:
        np.testing.assert_array_equal(a.confidence, b.confidence)


def test_string_classes_are_read_as_stored(tmp_path):
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                      "nine"])
    pipeline = _fit(READ["pca-logistic"](), y=names[Y])
    stored = load_bundle_stored(_bundle(tmp_path, pipeline))
    assert stored is not None
    np.testing.assert_array_equal(stored.classes, pipeline.classes_)
    assert stored.classes.dtype == pipeline.classes_.dtype


@pytest.mark.parametrize("name", sorted(NOT_READ))
def test_anything_else_is_left_to_skops(tmp_path, name):
    directory = _bundle(tmp_path, _fit(NOT_READ[name]()))
    assert load_bundle_stored(directory) is None
    assert load_bundle(directory).n_features == 64


def test_a_lone_skops_file_is_left_to_skops(tmp_path):
    path = tmp_path / "alone.skops"
    sio.dump(_fit(READ["pca-logistic"]()), path)
    assert load_bundle_stored(path) is None


def test_the_names_read_are_where_scikit_learn_defines_them():
    from sklearn.pipeline import Pipeline as RealPipeline

    from digitstream.model.stored import PIPELINE

    for (module, name), kind in ESTIMATOR_KINDS.items():
        cls = {"StandardScaler": StandardScaler, "PCA": PCA, "LogisticRegression":
               LogisticRegression, "LinearSVC": LinearSVC}[kind]
        assert (cls.__module__, cls.__qualname__) == (module, name)
    assert (RealPipeline.__module__, RealPipeline.__qualname__) == PIPELINE
    # and the linear classifiers fused once loaded
    from sklearn.linear_model import Perceptron, RidgeClassifierCV

    from digitstream.model.runner import estimator_kind
    for cls in (RidgeClassifier, RidgeClassifierCV, SGDClassifier, Perceptron, LinearSVC,
                LogisticRegression, StandardScaler, PCA):
        assert estimator_kind(cls()) == cls.__name__
    assert estimator_kind(MinMaxScaler()) is None


# ------------------------------------------------------------ hostile or broken files
def _rewrite(data: bytes, change) -> bytes:
    """The skops file ``data`` with ``change(schema, members)`` applied."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    schema = json.loads(members["schema.json"])
    change(schema, members)
    members["schema.json"] = json.dumps(schema).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return out.getvalue()


def _steps(schema):
    return schema["content"]["content"]["steps"]["content"]


def _attributes(schema, step):
    return _steps(schema)[step]["content"][1]["content"]["content"]


def _rename_classifier(schema, members):
    node = _steps(schema)[1]["content"][1]
    node["__module__"], node["__class__"] = "os", "system"


def _protocol_3(schema, members):
    schema["protocol"] = 3


def _object_array(schema, members):
    node = _attributes(schema, 1)["coef_"]
    buffer = io.BytesIO()
    np.save(buffer, np.array([object()] * 3, dtype=object), allow_pickle=True)
    members[node["file"]] = buffer.getvalue()


def _json_array(schema, members):
    _attributes(schema, 1)["coef_"]["type"] = "json"


def _missing_member(schema, members):
    del members[_attributes(schema, 0)["components_"]["file"]]


def _unknown_loader(schema, members):
    _attributes(schema, 0)["whiten"]["__loader__"] = "FunctionNode"


def _non_string_key(schema, members):
    _steps(schema)[0]["content"][1]["content"]["key_types"]["content"][0]["__class__"] = "int"


def _no_classes(schema, members):
    del _attributes(schema, 1)["classes_"]


def _no_components(schema, members):
    del _attributes(schema, 0)["components_"]


def _coef_as_json(schema, members):
    _attributes(schema, 1)["coef_"] = {"__class__": "str", "__module__": "builtins",
                                       "__loader__": "JsonNode", "content": "[1.0, 2.0]",
                                       "is_json": True, "__id__": 1}


def _whiten_as_a_number(schema, members):
    _attributes(schema, 0)["whiten"]["content"] = "1"


@pytest.mark.parametrize("change", [_rename_classifier, _protocol_3, _object_array, _json_array,
                                    _missing_member, _unknown_loader, _non_string_key,
                                    _no_classes, _no_components, _coef_as_json,
                                    _whiten_as_a_number])
def test_a_file_with_anything_unexpected_is_not_read(change):
    data = sio.dumps(_fit(READ["pca-logistic"]()))
    assert read_stored(data) is not None
    assert read_stored(_rewrite(data, change)) is None


@pytest.mark.parametrize("data", [b"", b"not a zip", b"PK\x03\x04" + bytes(100)])
def test_what_is_not_a_skops_file_is_not_read(data):
    assert read_stored(data) is None


def test_a_hostile_classifier_is_refused_by_skops_after_the_reader_declines(tmp_path):
    data = _rewrite(sio.dumps(_fit(READ["pca-logistic"]())), _rename_classifier)
    directory = tmp_path / "evil"
    directory.mkdir()
    (directory / PIPELINE_FILE).write_bytes(data)
    (directory / CARD_FILE).write_text(json.dumps({"content_hash": content_hash(data)}))
    assert load_bundle_stored(directory) is None
    with pytest.raises(BundleError, match="untrusted type"):
        load_bundle(directory)


def test_the_files_are_checked_as_a_full_load_checks_them(tmp_path):
    directory = _bundle(tmp_path, _fit(READ["pca-logistic"]()))
    path = directory / PIPELINE_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    for load in (load_bundle_stored, load_bundle):
        with pytest.raises(BundleError, match="content hash"):
            load(directory)
    card = json.loads((directory / CARD_FILE).read_text())
    path.write_bytes(sio.dumps(_fit(READ["pca-logistic"]())))
    card["content_hash"] = content_hash(path.read_bytes())
    card["n_features"] = 63
    (directory / CARD_FILE).write_text(json.dumps(card))
    for load in (load_bundle_stored, load_bundle):
        with pytest.raises(BundleError, match="n_features"):
            load(directory)


# ------------------------------------------------------------------ ties
def _tied_pipeline():
    """Class 5 an exact copy of class 3: wherever either wins, the two tie."""
    pipeline = _fit(READ["pca-logistic"]())
    classifier = pipeline[-1]
    classifier.coef_[5] = classifier.coef_[3]
    classifier.intercept_[5] = classifier.intercept_[3]
    return pipeline


def test_rows_near_a_tie_wait_for_the_real_pipeline(tmp_path):
    pipeline = _tied_pipeline()
    bundle = load_bundle_stored(_bundle(tmp_path, pipeline))
    assert bundle is not None
    runner = make_runner(bundle.pipeline)
    untied = X[(Y != 3) & (Y != 5)]
    expected = pipeline.predict(untied)
    assert not np.any((expected == 3) | (expected == 5))
    # rows nowhere near the tie are answered at once
    np.testing.assert_array_equal(runner.classes[runner.predict(untied).class_index], expected)
    tied = X[(Y == 3) | (Y == 5)]
    answers: list = []
    thread = threading.Thread(target=lambda: answers.append(runner.predict(tied)), daemon=True)
    thread.start()
    thread.join(0.3)
    assert thread.is_alive() and not answers  # waiting for the real pipeline
    finish_loading(bundle)
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    np.testing.assert_array_equal(runner.classes[answers[0].class_index], pipeline.predict(tied))


def test_a_pipeline_that_fails_to_load_fails_the_rows_that_need_it(tmp_path):
    bundle = load_bundle_stored(_bundle(tmp_path, _tied_pipeline()))
    assert bundle is not None
    runner = make_runner(bundle.pipeline)
    bundle.pipeline.fail(BundleError("cannot load it"))
    assert not bundle.pipeline.resolved  # /api/stats says pipeline_loaded false
    with pytest.raises(BundleError, match="cannot load it"):
        runner.predict(X[Y == 3])
    runner.predict(X[Y == 0])  # rows that need no pipeline are still answered


def test_run_serves_a_tied_model_exactly_from_the_first_frame(tmp_path, start_app):
    """End to end: frames sent as soon as ``run`` listens, before scikit-learn is loaded,
    get the real pipeline's labels, ties included."""
    from digitstream.codecs.inputs import encode_images
    from digitstream.wire.framing import frame_many
    from helpers import send_bytes

    pipeline = _tied_pipeline()
    directory = _bundle(tmp_path, pipeline)
    collector = Collector()
    try:
        app = start_app(collector.port, "--input-format", "u8", model=directory, ready=False)
        app.wait_listening()
        send_bytes(app.in_port, frame_many(encode_images(X, "u8")))
        texts = collector.wait_count(len(X))
        assert texts == [str(np.array([label])) for label in pipeline.predict(X)]
        wait_for(lambda: "loaded by skops" in app.log() or app.proc.poll() is not None,
                 timeout=TIMEOUT)
        app.signal()
        assert app.wait() == 0, app.log()
        assert "could not be loaded" not in app.log()
    finally:
        collector.close()


def test_run_stops_with_status_1_when_skops_cannot_load_the_pipeline(tmp_path, start_app):
    """A broken scikit-learn install (a package that fails to import, first on the path):
    the stored arrays serve at once, the load fails, and the run says so, answers what
    it received and exits 1."""
    from digitstream.codecs.inputs import encode_images
    from digitstream.wire.framing import frame_many
    from helpers import send_bytes

    pipeline = _fit(READ["pca-logistic"]())
    directory = _bundle(tmp_path, pipeline)
    broken = tmp_path / "broken" / "sklearn"
    broken.mkdir(parents=True)
    go = tmp_path / "fail-now"
    # it fails once the test says so, after the frames were answered
    (broken / "__init__.py").write_text(
        "import os, time\n"
        "deadline = time.monotonic() + 60\n"
        f"while not os.path.exists({str(go)!r}) and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n"
        "raise ImportError('this scikit-learn is broken')\n")
    collector = Collector()
    try:
        app = start_app(collector.port, "--input-format", "u8", model=directory, ready=False,
                        env={"PYTHONPATH": str(broken.parent)})
        app.wait_listening()
        send_bytes(app.in_port, frame_many(encode_images(X[:50], "u8")))
        assert collector.wait_count(50) == [str(np.array([c])) for c in pipeline.predict(X[:50])]
        assert not app.stats()["pipeline_loaded"]
        go.touch()
        assert app.wait() == 1, app.log()
        assert "could not be loaded: this scikit-learn is broken" in app.log()
        assert "stopped: 50 frames received, 50 answered" in app.log()
    finally:
        collector.close()
