"""Model bundles: saved with skops, checked on load, refused with one line."""

import json
import os
import warnings

import numpy as np
import pytest
import skops.io as sio
from click.testing import CliRunner
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

from digitstream.cli import main as cli
from digitstream.errors import UserError
from digitstream.model.bundle import (
    CARD_FILE,
    PIPELINE_FILE,
    BundleError,
    content_hash,
    inspect_main,
    load_bundle,
    save_bundle,
)

X, Y = load_digits(return_X_y=True)


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def seed_pipeline():
    return Pipeline([("PCA", PCA(30, random_state=0)),
                     ("Logistic Regression", LogisticRegression(C=0.1, max_iter=3000))]).fit(X, Y)


@pytest.fixture
def bundle_dir(tmp_path, seed_pipeline):
    return save_bundle(seed_pipeline, tmp_path / "models", {"model": "pca-logistic",
                                                            "heldout_accuracy": 0.97})


def _write_bundle_by_hand(directory, obj):
    """A bundle whose card matches its file, whatever the file holds: what a
    careless or hostile producer could write."""
    directory.mkdir()
    sio.dump(obj, directory / PIPELINE_FILE)
    data = (directory / PIPELINE_FILE).read_bytes()
    (directory / CARD_FILE).write_text(json.dumps({"content_hash": content_hash(data)}))
    return directory


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_a_saved_bundle_loads_with_its_card(bundle_dir, seed_pipeline):
    assert sorted(p.name for p in bundle_dir.iterdir()) == [CARD_FILE, PIPELINE_FILE]
    bundle = load_bundle(bundle_dir)
    assert bundle.path == bundle_dir
    assert bundle.n_features == 64
    assert bundle.step_names == ["PCA", "Logistic Regression"]
    np.testing.assert_array_equal(bundle.classes, np.arange(10))
    assert bundle.content_hash == content_hash((bundle_dir / PIPELINE_FILE).read_bytes())
    card = json.loads((bundle_dir / CARD_FILE).read_text())
    assert bundle.card == card
    assert card["content_hash"] == bundle.content_hash
    assert card["heldout_accuracy"] == 0.97 and card["model"] == "pca-logistic"
    assert card["steps"] == ["PCA", "Logistic Regression"] and card["n_features"] == 64
    assert card["classes"] == list(range(10))
    assert {"numpy", "scikit-learn", "skops", "python"} <= set(card["versions"])
    np.testing.assert_array_equal(bundle.pipeline.predict(X), seed_pipeline.predict(X))


def test_a_second_save_replaces_the_bundle_whole(bundle_dir, seed_pipeline):
    other = Pipeline([("Scaler", StandardScaler()), ("SVM", SVC())]).fit(X, Y)
    save_bundle(other, bundle_dir, {"model": "svc"})
    bundle = load_bundle(bundle_dir)
    assert bundle.step_names == ["Scaler", "SVM"] and bundle.card["model"] == "svc"
    assert not [p for p in bundle_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_single_skops_file_loads_with_a_derived_card(tmp_path):
    # What a user writes to serve their own model.
    user_pipeline = Pipeline([("Scaler", StandardScaler()), ("SVM", SVC())]).fit(X, Y)
    sio.dump(user_pipeline, tmp_path / "mine.skops")
    bundle = load_bundle(tmp_path / "mine.skops")
    assert bundle.step_names == ["Scaler", "SVM"]
    assert bundle.n_features == 64
    assert bundle.card["derived_from"] == str(tmp_path / "mine.skops")
    assert bundle.card["content_hash"] == bundle.content_hash
    assert bundle.card["steps"] == ["Scaler", "SVM"]
    np.testing.assert_array_equal(bundle.pipeline.predict(X), user_pipeline.predict(X))


def test_a_bare_classifier_is_one_stage_named_after_its_class(tmp_path):
    sio.dump(KNeighborsClassifier(algorithm="brute").fit(X, Y), tmp_path / "knn.skops")
    assert load_bundle(tmp_path / "knn.skops").step_names == ["KNeighborsClassifier"]


def test_a_tampered_file_is_refused_by_its_hash(bundle_dir):
    path = bundle_dir / PIPELINE_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="content hash") as exc_info:
        load_bundle(bundle_dir)
    assert "changed after the bundle was written" in _one_line(exc_info)
    assert isinstance(exc_info.value, UserError)


def test_a_function_that_runs_a_shell_command_is_refused_by_name(tmp_path, seed_pipeline):
    pipeline = Pipeline([("Identity", FunctionTransformer()),
                         ("Logistic Regression", seed_pipeline[-1])])
    pipeline.fit(seed_pipeline[0].transform(X), Y)
    pipeline[0].func = os.system
    directory = _write_bundle_by_hand(tmp_path / "evil", pipeline)
    with pytest.raises(BundleError, match=r"untrusted type .*\bsystem\b") as exc_info:
        load_bundle(directory)
    _one_line(exc_info)


class Doubler(TransformerMixin, BaseEstimator):
    """A user's own transformer: code skops must not run unasked."""

    states_set = 0

    def fit(self, X, y=None):
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X):
        return 2 * X

    def __setstate__(self, state):
        Doubler.states_set += 1
        self.__dict__.update(state)


def test_a_custom_class_is_refused_by_name_and_never_built(tmp_path):
    pipeline = Pipeline([("Double", Doubler()), ("k-NN", KNeighborsClassifier(algorithm="brute"))])
    sio.dump(pipeline.fit(X, Y), tmp_path / "custom.skops")
    Doubler.states_set = 0
    with pytest.raises(BundleError, match=r"untrusted type \S*Doubler") as exc_info:
        load_bundle(tmp_path / "custom.skops")
    _one_line(exc_info)
    assert Doubler.states_set == 0


def test_saving_what_could_not_be_loaded_is_refused(tmp_path):
    pipeline = Pipeline([("Double", Doubler()), ("k-NN", KNeighborsClassifier(algorithm="brute"))])
    with pytest.raises(BundleError, match="Doubler"):
        save_bundle(pipeline.fit(X, Y), tmp_path / "models", {})
    assert not (tmp_path / "models" / CARD_FILE).exists()


def test_kd_trees_are_not_trusted(tmp_path):
    sio.dump(KNeighborsClassifier(algorithm="kd_tree").fit(X, Y), tmp_path / "kd.skops")
    with pytest.raises(BundleError, match="KDTree"):
        load_bundle(tmp_path / "kd.skops")


def test_forests_and_networks_load(tmp_path):
    for name, model in [("forest", RandomForestClassifier(n_estimators=5, random_state=0)),
                        ("mlp", MLPClassifier(hidden_layer_sizes=(16,), max_iter=20,
                                              random_state=0))]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # a few epochs are enough here
            model.fit(X, Y)
        sio.dump(model, tmp_path / f"{name}.skops")
        bundle = load_bundle(tmp_path / f"{name}.skops")
        np.testing.assert_array_equal(bundle.pipeline.predict(X), model.predict(X))


def test_a_tree_pointing_outside_itself_is_refused_before_it_is_used(tmp_path):
    forest = RandomForestClassifier(n_estimators=3, max_depth=4, random_state=0).fit(X, Y)
    tree = forest.estimators_[1].tree_
    state = tree.__getstate__()
    nodes = state["nodes"].copy()
    nodes["left_child"][0] = 10**9  # a crafted file: scikit-learn would read far out of bounds
    tree.__setstate__({**state, "nodes": nodes})
    sio.dump(forest, tmp_path / "forest.skops")
    with pytest.raises(BundleError, match="malformed decision tree") as exc_info:
        load_bundle(tmp_path / "forest.skops")
    _one_line(exc_info)

    forest = RandomForestClassifier(n_estimators=3, max_depth=4, random_state=0).fit(X, Y)
    tree = forest.estimators_[0].tree_
    state = tree.__getstate__()
    nodes = state["nodes"].copy()
    nodes["feature"][0] = 64  # one past the last pixel
    tree.__setstate__({**state, "nodes": nodes})
    sio.dump(forest, tmp_path / "forest.skops")
    with pytest.raises(BundleError, match="node 0 has a child or feature index out of bounds"):
        load_bundle(tmp_path / "forest.skops")


def test_missing_files_are_refused(tmp_path, bundle_dir):
    with pytest.raises(BundleError, match="no model bundle at"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=f"{CARD_FILE} is missing"):
        load_bundle(tmp_path / "empty")
    (bundle_dir / PIPELINE_FILE).unlink()
    with pytest.raises(BundleError, match=f"{PIPELINE_FILE} is missing"):
        load_bundle(bundle_dir)
    (tmp_path / "model.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(BundleError, match="neither a model bundle directory nor a .skops file"):
        load_bundle(tmp_path / "model.pkl")


def test_what_is_not_a_skops_file_or_card_is_refused(tmp_path, bundle_dir):
    (tmp_path / "junk.skops").write_bytes(os.urandom(200))
    with pytest.raises(BundleError, match="not a readable skops file") as exc_info:
        load_bundle(tmp_path / "junk.skops")
    _one_line(exc_info)
    (bundle_dir / CARD_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="cannot read") as exc_info:
        load_bundle(bundle_dir)
    _one_line(exc_info)


def test_what_is_not_a_fitted_classifier_is_refused(tmp_path):
    sio.dump(PCA(10).fit(X), tmp_path / "pca.skops")
    with pytest.raises(BundleError, match="not a classifier: a PCA has no predict"):
        load_bundle(tmp_path / "pca.skops")
    unfitted = Pipeline([("PCA", PCA(10)), ("LR", LogisticRegression())])
    sio.dump(unfitted, tmp_path / "unfitted.skops")
    with pytest.raises(BundleError, match="not a fitted classifier"):
        load_bundle(tmp_path / "unfitted.skops")


def test_a_card_without_a_hash_is_refused(bundle_dir):
    card = json.loads((bundle_dir / CARD_FILE).read_text())
    del card["content_hash"]
    (bundle_dir / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(BundleError, match="records no content_hash"):
        load_bundle(bundle_dir)


def test_a_card_that_contradicts_its_pipeline_is_refused(bundle_dir):
    card = json.loads((bundle_dir / CARD_FILE).read_text())
    card["n_features"] = 784
    (bundle_dir / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(BundleError, match="n_features is 784 but the pipeline has 64"):
        load_bundle(bundle_dir)


def test_inspect_prints_the_card_and_checks(bundle_dir, capsys):
    assert inspect_main(str(bundle_dir)) == 0
    out = capsys.readouterr().out
    assert '"heldout_accuracy": 0.97' in out
    assert "OK:" in out and "served fused into one affine map" in out


def test_inspect_refuses_with_one_line_and_status_1(bundle_dir, capsys):
    path = bundle_dir / PIPELINE_FILE
    path.write_bytes(path.read_bytes() + b"\0")
    assert inspect_main(str(bundle_dir)) == 1
    captured = capsys.readouterr()
    assert '"content_hash"' in captured.out  # the card is still shown
    error_lines = captured.err.strip().splitlines()
    assert len(error_lines) == 1 and error_lines[0].startswith("Error: ")


def test_the_inspect_command(bundle_dir, tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli, ["inspect", str(bundle_dir)]).exit_code == 0
    result = runner.invoke(cli, ["inspect", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "no model bundle" in result.output


# ------------------------------------------- skops imported with recorded trusted names
def _fresh(code: str) -> str:
    """The last line ``code`` prints, run in an interpreter that has not imported skops."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    return out.strip().splitlines()[-1]


def test_the_recorded_trusted_names_are_skops_own():
    from digitstream.model import _skops_defaults_data as data
    from digitstream.model.skops_defaults import installed_versions
    if installed_versions() != data.VERSIONS:
        pytest.skip(f"names recorded for {data.VERSIONS}, installed {installed_versions()}: "
                    "record them again with `python -m digitstream.model.skops_defaults`")
    differences = _fresh("import json, skops.io._trusted_types as computed\n"
                         "from digitstream.model.skops_defaults import differences\n"
                         "print(json.dumps(differences(computed)))")
    assert json.loads(differences) == []
    used = _fresh("from digitstream.model.skops_defaults import import_skops_io, "
                  "uses_recorded_names\nimport_skops_io()\nprint(uses_recorded_names())")
    assert used == "True"


def test_a_fresh_process_refuses_and_accepts_exactly_what_this_one_does(tmp_path, seed_pipeline):
    # This process imported skops.io plainly (above); a fresh `digitstream run` imports it
    # with the recorded names. Each file must get the same answer from both.
    files = {}
    evil = Pipeline([("Identity", FunctionTransformer()), ("LR", seed_pipeline[-1])])
    evil.fit(seed_pipeline[0].transform(X), Y)
    evil[0].func = os.system
    files["system"] = _write_bundle_by_hand(tmp_path / "evil", evil)
    sio.dump(KNeighborsClassifier(algorithm="kd_tree").fit(X, Y), tmp_path / "kd.skops")
    files["kd"] = tmp_path / "kd.skops"
    sio.dump(Pipeline([("Double", Doubler()), ("k-NN", KNeighborsClassifier(algorithm="brute"))])
             .fit(X, Y), tmp_path / "custom.skops")
    files["custom"] = tmp_path / "custom.skops"
    sio.dump(RandomForestClassifier(n_estimators=2, random_state=0).fit(X, Y),
             tmp_path / "forest.skops")
    files["forest"] = tmp_path / "forest.skops"
    sio.dump(Pipeline([("Scaler", StandardScaler()), ("SVM", SVC())]).fit(X, Y),
             tmp_path / "svc.skops")
    files["svc"] = tmp_path / "svc.skops"
    files["seed"] = save_bundle(seed_pipeline, tmp_path / "seed", {})

    def outcome(path):
        try:
            return "loaded " + " -> ".join(load_bundle(path).step_names)
        except BundleError as exc:
            return f"refused: {exc}"

    here = {name: outcome(path) for name, path in files.items()}
    there = json.loads(_fresh(
        "import json, sys\n"
        "sys.path.insert(0, %r)\n"  # Doubler's module, for the custom file's name only
        "from digitstream.model.bundle import BundleError, load_bundle\n"
        "def outcome(path):\n"
        "    try:\n"
        "        return 'loaded ' + ' -> '.join(load_bundle(path).step_names)\n"
        "    except BundleError as exc:\n"
        "        return f'refused: {exc}'\n"
        "print(json.dumps({name: outcome(path) for name, path in %r.items()}))"
        % (os.path.dirname(__file__), {k: str(v) for k, v in files.items()})))
    assert there == here
    assert here["system"].startswith("refused") and "system" in here["system"]
    assert here["kd"].startswith("refused") and here["custom"].startswith("refused")
    assert here["forest"].startswith("loaded") and here["svc"].startswith("loaded")
    assert here["seed"] == "loaded PCA -> Logistic Regression"
