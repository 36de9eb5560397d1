"""`digitstream train`: every model, every kind of data set, an honest card."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits

from digitstream.cli import main as cli
from digitstream.codecs.inputs import encode_images
from digitstream.datasets import Dataset, load_dataset, read_idx, write_idx
from digitstream.errors import UserError
from digitstream.model import train
from digitstream.model.augment import augmented
from digitstream.model.bundle import CARD_FILE, load_bundle, save_bundle
from digitstream.model.runner import make_runner
from digitstream.model.zoo import RECIPES, GridContext
from digitstream.wire.framing import frame_many
from helpers import send_bytes

MODELS = ["pca-logistic", "svc", "best", "knn", "random-forest", "mlp"]


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    """A small MNIST-format data set: 300 digits, 8x8 pixels scaled to 0..255."""
    digits = load_digits()
    keep = np.random.default_rng(0).permutation(len(digits.target))[:300]
    images = (digits.images[keep] * 255 / 16).round().astype(np.uint8)
    directory = tmp_path_factory.mktemp("idx")
    write_idx(directory / "train-images-idx3-ubyte", images)
    write_idx(directory / "train-labels-idx1-ubyte", digits.target[keep].astype(np.uint8))
    return directory


def test_training_writes_a_bundle_whose_card_tells_the_truth(tmp_path, capsys):
    output = train.main(dataset="digits", model_name="pca-logistic", output=str(tmp_path / "m"),
                        quick=True)
    printed = capsys.readouterr().out
    bundle = load_bundle(output)
    card = json.loads((output / CARD_FILE).read_text())
    assert bundle.card == card

    # A fresh evaluation on the same split gives the card's figure.
    split = train.split_dataset(load_dataset("digits"), card["split"]["held_out_fraction"],
                                card["split"]["seed"])
    fresh = float(np.mean(bundle.pipeline.predict(split.X_test) == split.y_test))
    assert card["heldout_accuracy"] == fresh
    assert fresh >= 0.95
    assert f"Held-out accuracy: {fresh:.4f}" in printed
    assert str(output) in printed

    assert card["dataset"]["spec"] == "digits" and card["dataset"]["value_range"] == [0.0, 16.0]
    assert card["split"]["n_held_out"] == len(split.y_test) == 450
    assert card["steps"] == ["PCA", "Logistic Regression"]
    assert card["classes"] == list(range(10)) and card["n_features"] == 64
    assert set(card["search"]["best_params"]) == set(card["search"]["space"])
    assert card["training_seconds"] > 0
    assert card["content_hash"] == bundle.content_hash
    assert {"numpy", "scikit-learn", "skops"} <= set(card["versions"])
    assert np.array(card["confusion_matrix"]).sum() == 450


def test_the_search_chooses_by_cross_validated_accuracy_on_the_training_part_only():
    data = load_dataset("digits")
    result = train.train_model(data, "svc", seed=0)
    search = result.card["search"]
    assert search["scoring"] == "accuracy" and search["cv_folds"] == 5
    assert len(search["candidates"]) == 9
    best = max(search["candidates"], key=lambda c: c["cv_accuracy"])
    assert search["best_params"] == best["params"]
    assert result.pipeline.get_params()["RBF SVM__C"] == best["params"]["RBF SVM__C"]
    assert result.accuracy >= 0.985  # the target for svc


def test_the_seed_grid_is_searched_by_default():
    space = RECIPES["pca-logistic"].make_grid(GridContext(np.zeros((1000, 64)), smallest_fit=800),
                                              False)
    assert space["PCA__n_components"] == [20, 40, 64]
    assert {2.0, 3.0, 4.0} <= set(space["Logistic Regression__C"])
    # Components are capped at what the data allows.
    small = RECIPES["pca-logistic"].make_grid(GridContext(np.zeros((50, 64)), smallest_fit=30),
                                              False)
    assert small["PCA__n_components"] == [20, 30]


@pytest.mark.parametrize("model_name", MODELS)
def test_each_model_trains_on_digits_and_serves_what_it_predicts(model_name, tmp_path):
    data = load_dataset("digits")
    result = train.train_model(data, model_name, quick=True)
    assert result.accuracy >= 0.95
    bundle = load_bundle(save_bundle(result.pipeline, tmp_path / model_name, result.card))
    assert bundle.card["model"] == model_name
    assert bundle.step_names == [name for name, _ in result.pipeline.steps]
    runner = make_runner(bundle.pipeline)
    assert runner.compiled == (model_name == "pca-logistic")
    images = np.vstack([data.X, np.random.default_rng(1).uniform(0, 16, (2000, 64))])
    served = runner.classes[runner.predict(images).class_index]
    np.testing.assert_array_equal(served, result.pipeline.predict(images))


@pytest.mark.parametrize("model_name", MODELS)
def test_each_model_trains_on_an_idx_data_set(model_name, idx_dir, tmp_path, capsys):
    output = train.main(dataset=f"idx:{idx_dir}", model_name=model_name,
                        output=str(tmp_path / "m"), quick=True)
    bundle = load_bundle(output)
    assert bundle.card["dataset"]["value_range"] == [0.0, 255.0]
    assert bundle.n_features == 64 and bundle.card["split"]["n_held_out"] == 75
    X = load_dataset(f"idx:{idx_dir}").X
    runner = make_runner(bundle.pipeline)
    np.testing.assert_array_equal(runner.classes[runner.predict(X).class_index],
                                  bundle.pipeline.predict(X))
    assert bundle.card["heldout_accuracy"] > 0.8


def test_gzipped_idx_and_npz_data_sets_train(idx_dir, tmp_path, capsys):
    gz_dir = tmp_path / "gz"
    gz_dir.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        write_idx(gz_dir / f"{name}.gz", read_idx(idx_dir / name))
    output = train.main(dataset=f"idx:{gz_dir}", output=str(tmp_path / "gz-model"), quick=True)
    assert load_bundle(output).card["dataset"]["spec"] == f"idx:{gz_dir}"

    digits = load_digits()
    np.savez(tmp_path / "set.npz", X=digits.images[:400], y=digits.target[:400])
    output = train.main(dataset=f"npz:{tmp_path / 'set.npz'}", output=str(tmp_path / "npz-model"),
                        quick=True)
    bundle = load_bundle(output)
    assert bundle.n_features == 64 and bundle.card["split"]["n_train"] == 300


def test_a_data_set_too_small_to_split_or_search_is_a_user_error(tmp_path):
    np.savez(tmp_path / "tiny.npz", X=np.arange(12.0).reshape(6, 2), y=np.array([0, 0, 0, 1, 1, 2]))
    with pytest.raises(UserError, match="cannot hold out"):
        train.main(dataset=f"npz:{tmp_path / 'tiny.npz'}", output=str(tmp_path / "m"))
    np.savez(tmp_path / "few.npz", X=np.random.default_rng(0).uniform(size=(40, 4)),
             y=np.array([0] * 38 + [1] * 2))
    with pytest.raises(UserError, match="cross-validation needs at least 2"):
        train.main(dataset=f"npz:{tmp_path / 'few.npz'}", model_name="knn",
                   output=str(tmp_path / "m"), test_size=0.5)


def test_an_unknown_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown model 'deep-magic': choose one of pca-logistic"):
        train.main(model_name="deep-magic", output=str(tmp_path / "m"))


def test_the_command_lists_its_models():
    result = CliRunner().invoke(cli, ["train", "--list-models"])
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.output.splitlines()] == MODELS
    assert [name for name, _ in train.describe_models()] == MODELS


# ------------------------------------------------------------------ augmentation
def one_pixel_shifts(X):
    """The four one-pixel moves of 8x8 images, worked out here apart from the code under test:
    rolled one pixel, the row or column that came round blanked."""
    images = X.reshape(-1, 8, 8)
    copies = []
    for axis in (1, 2):
        for step in (1, -1):
            moved = np.roll(images, step, axis=axis)
            edge = [slice(None)] * 3
            edge[axis] = 0 if step == 1 else -1
            moved[tuple(edge)] = 0
            copies.append(moved.reshape(len(X), -1))
    return np.vstack(copies)


def rows(X):
    return {row.tobytes() for row in np.asarray(X, dtype=np.float64)}


def test_shift_adds_the_four_one_pixel_moves_of_each_image():
    X = load_dataset("digits").X[:50]
    y = np.arange(50)
    X_fit, y_fit = augmented("shift", X, y)
    assert X_fit.shape == (250, 64)
    np.testing.assert_array_equal(X_fit[:50], X)
    assert rows(X_fit[50:]) == rows(one_pixel_shifts(X))
    np.testing.assert_array_equal(y_fit, np.tile(y, 5))
    X_same, y_same = augmented("none", X, y)
    assert X_same is X and y_same is y


def test_augmentation_reaches_what_is_fitted_and_nothing_that_is_scored(monkeypatch):
    """No held-out image and no shifted copy of one is in any fit; in the search no
    validation image and no copy of one is in its fold's fit, and validation folds are
    scored as they are, while each fit side holds its images and all their shifts."""
    from sklearn.pipeline import Pipeline

    digits = load_dataset("digits")
    # Digits has no two equal images and no image equal to another's shift, so a row in
    # common can only be a leak.
    all_rows = rows(np.vstack([digits.X, one_pixel_shifts(digits.X)]))
    assert len(all_rows) == 5 * len(digits.X)
    keep = np.random.default_rng(0).permutation(len(digits.y))[:600]
    data = Dataset("digits", digits.X[keep], digits.y[keep], digits.value_range)

    calls = []  # ("fit" | "predict", pipeline, X) in call order
    real_fit, real_predict = Pipeline.fit, Pipeline.predict

    def fit(self, X, y=None, **params):
        calls.append(("fit", self, np.array(X)))
        return real_fit(self, X, y, **params)

    def predict(self, X, **params):
        calls.append(("predict", self, np.array(X)))
        return real_predict(self, X, **params)

    monkeypatch.setattr(Pipeline, "fit", fit)
    monkeypatch.setattr(Pipeline, "predict", predict)
    # Two candidates, so the search cross-validates, and few images: seconds, not minutes.
    monkeypatch.setitem(RECIPES, "best", dataclasses.replace(
        RECIPES["best"], make_grid=lambda ctx, quick: {"RBF SVM__C": [3.0, 10.0]}))

    result = train.train_model(data, "best", seed=0)
    assert result.card["augment"] == "shift" and result.card["search"]["cv_folds"] == 5

    split = result.split
    held_out, train_rows = rows(split.X_test), rows(split.X_train)
    held_out_copies = rows(one_pixel_shifts(split.X_test))
    fits = [(model, X) for what, model, X in calls if what == "fit"]
    assert len(fits) == 2 * 5 + 1
    for _, X in fits:
        assert not rows(X) & held_out, "a held-out image was fitted on"
        assert not rows(X) & held_out_copies, "a shifted copy of a held-out image was fitted on"

    fitted_by = {}
    scored = []
    for what, model, X in calls:
        if what == "fit":
            fitted_by[id(model)] = X
        else:
            scored.append((fitted_by[id(model)], X))
    *folds, (refit, final) = scored
    assert len(folds) == 10
    for X_fit, X_valid in folds:
        valid = rows(X_valid)
        assert valid <= train_rows, "a validation fold holds an augmented image"
        assert not rows(X_fit) & valid, "a validation image was fitted on"
        assert not rows(X_fit) & rows(one_pixel_shifts(X_valid)), (
            "a shifted copy of a validation image was fitted on")
        originals = X_fit[: len(X_fit) // 5]
        assert rows(originals) == train_rows - valid
        assert rows(X_fit) == rows(originals) | rows(one_pixel_shifts(originals))

    np.testing.assert_array_equal(final, split.X_test)
    assert len(refit) == result.card["n_fitted"] == 5 * len(split.X_train)
    assert rows(refit) == train_rows | rows(one_pixel_shifts(split.X_train))


def test_the_best_model_is_the_augmented_svm_and_its_card_says_so(tmp_path, capsys):
    output = train.main(model_name="best", output=str(tmp_path / "best"), quick=True)
    printed = capsys.readouterr().out
    bundle = load_bundle(output)
    card = bundle.card
    assert card["model"] == "best" and card["augment"] == "shift"
    assert card["steps"] == ["RBF SVM"]
    assert card["n_fitted"] == 5 * card["split"]["n_train"] == 5 * 1347
    assert "Augmentation shift" in printed and "6,735 images" in printed
    split = train.split_dataset(load_dataset("digits"), 0.25, 0)
    fresh = float(np.mean(bundle.pipeline.predict(split.X_test) == split.y_test))
    assert card["heldout_accuracy"] == fresh >= 0.995


def test_the_default_model_is_not_augmented_unless_asked(monkeypatch, tmp_path):
    # One candidate: no search, so the command takes a second.
    monkeypatch.setitem(RECIPES, "pca-logistic", dataclasses.replace(
        RECIPES["pca-logistic"], make_grid=lambda ctx, quick: {"PCA__n_components": [40]}))
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "--output", str(tmp_path / "plain")])
    assert result.exit_code == 0, result.output
    card = load_bundle(tmp_path / "plain").card
    assert card["augment"] == "none" and card["n_fitted"] == card["split"]["n_train"]
    assert card["steps"] == ["PCA", "Logistic Regression"]

    result = runner.invoke(cli, ["train", "--augment", "shift", "--output", str(tmp_path / "aug")])
    assert result.exit_code == 0, result.output
    card = load_bundle(tmp_path / "aug").card
    assert card["augment"] == "shift" and card["n_fitted"] == 5 * card["split"]["n_train"]
    assert make_runner(load_bundle(tmp_path / "aug").pipeline).compiled

    result = runner.invoke(cli, ["train", "--augment", "rotate", "--output", str(tmp_path / "x")])
    assert result.exit_code == 2 and "'rotate' is not one of 'none', 'shift'" in result.output


def test_shift_needs_square_images(tmp_path):
    np.savez(tmp_path / "wide.npz", X=np.random.default_rng(0).uniform(size=(100, 6)),
             y=np.arange(100) % 2)
    with pytest.raises(UserError, match="--augment shift needs square images .* 6 features"):
        train.main(dataset=f"npz:{tmp_path / 'wide.npz'}", output=str(tmp_path / "m"),
                   augment="shift")


def test_the_best_model_is_served_by_run(tmp_path, start_app, collector, capsys):
    output = train.main(model_name="best", output=str(tmp_path / "best"), quick=True)
    pipeline = load_bundle(output).pipeline
    images = load_dataset("digits").X
    app = start_app(collector.port, "--input-format", "u8", model=output)
    send_bytes(app.in_port, frame_many(encode_images(images, "u8")))
    expected = [str(np.array([label])) for label in pipeline.predict(images)]
    assert collector.wait_count(len(images)) == expected
    assert app.stats()["model"]["model"] == "best"


def test_the_outside_check_gets_the_cards_figure(tmp_path, capsys):
    output = train.main(output=str(tmp_path / "default"), quick=True)
    script = Path(__file__).parents[1] / "docs" / "models" / "check_heldout.py"
    done = subprocess.run([sys.executable, str(script), str(output)], capture_output=True,
                          text=True, timeout=120)
    figure = f"{load_bundle(output).card['heldout_accuracy']:.4f}"
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"held-out accuracy {figure} " in done.stdout
    assert done.stdout.rstrip().endswith(f"the card says {figure}")
