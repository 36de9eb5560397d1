"""`digitstream train`: every model, every kind of data set, an honest card."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits

from digitstream.cli import main as cli
from digitstream.datasets import load_dataset, read_idx, write_idx
from digitstream.errors import UserError
from digitstream.model import train
from digitstream.model.bundle import CARD_FILE, load_bundle, save_bundle
from digitstream.model.runner import make_runner
from digitstream.model.zoo import RECIPES, GridContext

MODELS = ["pca-logistic", "svc", "knn", "random-forest", "mlp"]


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
