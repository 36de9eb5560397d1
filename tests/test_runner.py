"""The hot path's model: fused linear pipelines and step-by-step fallback give
exactly ``pipeline.predict``."""

import warnings

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, RidgeClassifier, SGDClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from threadpoolctl import threadpool_limits

from digitstream.model.runner import (
    PRODUCT_ROWS,
    TIE_RTOL,
    Prediction,
    Runner,
    _scores,
    make_runner,
)

DIGITS = load_digits()
X_DIGITS = np.ascontiguousarray(DIGITS.data, dtype=np.float64)
Y_DIGITS = DIGITS.target
# 100,000 random images in the digits' value range, 0..16.
X_RANDOM = np.random.default_rng(7).uniform(0.0, 16.0, size=(100_000, 64))


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    # Small fits on a shared 2-core machine: a second BLAS thread only contends.
    with threadpool_limits(limits=1):
        yield


def _fit(pipeline, y=Y_DIGITS):
    with warnings.catch_warnings():
        # Convergence does not matter here: only agreement with predict does.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return pipeline.fit(X_DIGITS, y)


LINEAR = {
    "pca-logistic": lambda: Pipeline([
        ("PCA", PCA(40, random_state=0)),
        ("Logistic Regression", LogisticRegression(C=0.1, max_iter=3000))]),
    "scaler-pca-whiten-logistic": lambda: Pipeline([
        ("Scaler", StandardScaler()), ("PCA", PCA(30, whiten=True, random_state=0)),
        ("Logistic Regression", LogisticRegression(max_iter=3000))]),
    "linear-svc-alone": lambda: LinearSVC(C=0.01, max_iter=3000),
    "scaler-linear-svc": lambda: Pipeline([("Scaler", StandardScaler()),
                                           ("Linear SVM", LinearSVC(C=0.1, max_iter=3000))]),
    "pca-ridge": lambda: Pipeline([("PCA", PCA(20, random_state=0)), ("Ridge", RidgeClassifier())]),
    "scaler-sgd-hinge": lambda: Pipeline([("Scaler", StandardScaler(with_mean=False)),
                                          ("SGD", SGDClassifier(random_state=0))]),
    "scaler-sgd-log": lambda: Pipeline([("Scaler", StandardScaler(with_std=False)),
                                        ("SGD", SGDClassifier(loss="log_loss", random_state=0))]),
    "passthrough-ridge": lambda: Pipeline([("Nothing", "passthrough"),
                                           ("Ridge", RidgeClassifier())]),
}


@pytest.fixture(scope="module", params=sorted(LINEAR))
def linear_pipeline(request):
    return _fit(LINEAR[request.param]())


@pytest.fixture(scope="module")
def binary_pipeline():
    # Digits 0..4 against 5..9: a binary problem with many close calls.
    return _fit(Pipeline([("Scaler", StandardScaler()), ("PCA", PCA(20, random_state=0)),
                          ("Logistic Regression", LogisticRegression(max_iter=3000))]),
                y=Y_DIGITS >= 5)


def _labels(runner: Runner, X, **kwargs) -> np.ndarray:
    return runner.classes[runner.predict(X, **kwargs).class_index]


def _assert_confidence(prediction: Prediction, proba: np.ndarray) -> None:
    """Confidence is predict_proba's probability of the predicted class, to 1e-9."""
    rows = np.arange(len(prediction.class_index))
    np.testing.assert_allclose(prediction.confidence, proba[rows, prediction.class_index],
                               rtol=0, atol=1e-9)


def test_linear_pipelines_are_fused_and_equal_predict(linear_pipeline):
    runner = make_runner(linear_pipeline)
    assert runner.compiled
    assert len(runner.stage_names) == 1
    np.testing.assert_array_equal(_labels(runner, X_DIGITS), linear_pipeline.predict(X_DIGITS))
    np.testing.assert_array_equal(_labels(runner, X_RANDOM), linear_pipeline.predict(X_RANDOM))


def test_binary_logistic_regression_is_fused_and_equal_predict(binary_pipeline):
    runner = make_runner(binary_pipeline)
    assert runner.compiled
    for X in (X_DIGITS, X_RANDOM):
        np.testing.assert_array_equal(_labels(runner, X), binary_pipeline.predict(X))
        prediction = runner.predict(X, want_confidence=True)
        _assert_confidence(prediction, binary_pipeline.predict_proba(X))


def test_a_caller_known_bound_gives_the_same_answer(linear_pipeline):
    runner = make_runner(linear_pipeline)
    np.testing.assert_array_equal(runner.predict(X_RANDOM, max_abs=16.0).class_index,
                                  runner.predict(X_RANDOM).class_index)


def test_fused_stage_is_named_after_the_steps_it_replaces():
    pipeline = _fit(LINEAR["scaler-pca-whiten-logistic"]())
    fused, stepwise = make_runner(pipeline), make_runner(pipeline, compile=False)
    assert fused.stage_names == ["Scaler + PCA + Logistic Regression"]
    assert stepwise.stage_names == ["Scaler", "PCA", "Logistic Regression"]
    assert not stepwise.compiled
    prediction = fused.predict(X_DIGITS[:100])
    assert [name for name, _ in prediction.stage_seconds] == fused.stage_names
    prediction = stepwise.predict(X_DIGITS[:100])
    assert [name for name, _ in prediction.stage_seconds] == stepwise.stage_names
    assert all(seconds >= 0 for _, seconds in prediction.stage_seconds)
    assert repr(fused) == "<Runner fused: Scaler + PCA + Logistic Regression>"


@pytest.mark.parametrize("name", ["pca-logistic", "scaler-pca-whiten-logistic", "scaler-sgd-log"])
def test_confidence_is_the_probability_of_the_predicted_class(name):
    pipeline = _fit(LINEAR[name]())
    runner = make_runner(pipeline)
    for X in (X_DIGITS, X_RANDOM[:20_000]):
        prediction = runner.predict(X, want_confidence=True)
        _assert_confidence(prediction, pipeline.predict_proba(X))
        assert prediction.confidence.dtype == np.float64


def test_no_confidence_without_probabilities_or_when_not_asked():
    runner = make_runner(_fit(LINEAR["pca-ridge"]()))
    assert runner.predict(X_DIGITS, want_confidence=True).confidence is None
    assert make_runner(_fit(LINEAR["pca-logistic"]())).predict(X_DIGITS).confidence is None


@pytest.mark.parametrize("pipeline", [
    Pipeline([("Scaler", StandardScaler()), ("SVM", SVC())]),
    Pipeline([("PCA", PCA(30, random_state=0)), ("k-NN", KNeighborsClassifier(algorithm="brute"))]),
    KNeighborsClassifier(n_neighbors=3, algorithm="brute"),
], ids=["scaler-svc", "pca-knn", "knn-alone"])
def test_non_linear_pipelines_run_step_by_step_and_equal_predict(pipeline):
    pipeline = _fit(pipeline)
    runner = make_runner(pipeline)
    assert not runner.compiled
    X_some_random = X_RANDOM[:5_000]
    for X in (X_DIGITS, X_some_random):
        prediction = runner.predict(X, want_confidence=True)
        np.testing.assert_array_equal(runner.classes[prediction.class_index], pipeline.predict(X))
        assert prediction.class_index.dtype == np.intp
        assert len(prediction.stage_seconds) == len(runner.stage_names)
        if hasattr(pipeline, "predict_proba"):
            _assert_confidence(prediction, pipeline.predict_proba(X))
        else:
            assert prediction.confidence is None


def test_string_labels_are_indices_into_classes():
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    for pipeline in (LINEAR["pca-logistic"](), KNeighborsClassifier(algorithm="brute")):
        pipeline = _fit(pipeline, y=names[Y_DIGITS])
        runner = make_runner(pipeline)
        X = X_DIGITS[:300]
        np.testing.assert_array_equal(_labels(runner, X), pipeline.predict(X))


def test_an_empty_batch_gives_empty_results():
    for compile_model in (True, False):
        runner = make_runner(_fit(LINEAR["pca-logistic"]()), compile=compile_model)
        prediction = runner.predict(np.empty((0, 64)), want_confidence=True)
        assert isinstance(prediction, Prediction)
        assert prediction.class_index.shape == (0,) and prediction.confidence.shape == (0,)
        assert [name for name, _ in prediction.stage_seconds] == runner.stage_names


# ------------------------------------------------------------------ ties
# The tie rule (runner module doc): rows whose top two fused scores are within
# the tie margin are recomputed by the real pipeline, so ties go as in
# scikit-learn: the first of equal maxima; a binary score of exactly 0 is the
# negative class.

def test_exactly_tied_classes_go_to_the_first_as_in_scikit_learn():
    pipeline = _fit(LINEAR["pca-logistic"]())
    classifier = pipeline[-1]
    # Class 5 becomes an exact copy of class 3: wherever either wins, both tie.
    classifier.coef_[5] = classifier.coef_[3]
    classifier.intercept_[5] = classifier.intercept_[3]
    X = X_DIGITS[(Y_DIGITS == 3) | (Y_DIGITS == 5)]
    expected = pipeline.predict(X)
    assert np.sum(expected == 3) > 150 and not np.any(expected == 5)
    runner = make_runner(pipeline)
    assert runner.compiled
    prediction = runner.predict(X, want_confidence=True)
    np.testing.assert_array_equal(runner.classes[prediction.class_index], expected)
    _assert_confidence(prediction, pipeline.predict_proba(X))


def test_a_binary_score_of_exactly_zero_is_the_negative_class_even_where_fusing_rounds_it():
    pipeline = _fit(Pipeline([("Scaler", StandardScaler()),
                              ("Logistic Regression", LogisticRegression(max_iter=3000))]),
                    y=Y_DIGITS >= 5)
    scaler, classifier = pipeline
    mean, scale = np.array([3.3, 7.1]), np.array([0.7, 1.9])
    scaler.mean_[:2], scaler.scale_[:2] = mean, scale
    classifier.coef_[:] = 0.0
    classifier.coef_[0, :2] = [1.0, -1.0]
    classifier.intercept_[:] = 0.0
    # Images whose first two scaled pixels are bit-for-bit equal: the real
    # pipeline scores them exactly 0.
    z = np.random.default_rng(3).uniform(-2.0, 2.0, 20_000)
    x0, x1 = z * scale[0] + mean[0], z * scale[1] + mean[1]
    on_boundary = ((x0 - mean[0]) / scale[0] == z) & ((x1 - mean[1]) / scale[1] == z)
    X = np.zeros((int(on_boundary.sum()), 64))
    X[:, 0], X[:, 1] = x0[on_boundary], x1[on_boundary]
    assert len(X) > 1000
    expected = pipeline.predict(X)
    assert not np.any(expected)  # classes_[0] is False
    # The same map fused, without the tie rule, lands on both sides of 0.
    w = classifier.coef_[0] / scaler.scale_
    b = classifier.intercept_[0] - (scaler.mean_ / scaler.scale_) @ classifier.coef_[0]
    assert np.any(X @ w + b > 0)
    runner = make_runner(pipeline)
    assert runner.compiled
    np.testing.assert_array_equal(_labels(runner, X), expected)


def test_the_tie_margin_is_far_above_rounding_and_far_below_real_margins():
    pipeline = _fit(LINEAR["pca-logistic"]())
    runner = make_runner(pipeline)
    margin = runner.tie_margin(X_DIGITS)
    scores = np.sort(pipeline.decision_function(X_DIGITS), axis=1)
    gaps = scores[:, -1] - scores[:, -2]
    assert 1e-12 < margin < 1e-3 * np.min(gaps)
    assert TIE_RTOL == 1e-9


# ------------------------------------------------------------------ float32 batches
# Bytes and float32 pixels arrive as float32 and are scored in single precision
# first; the answer must still be the pipeline's on the same values in float64.
X_RANDOM_BYTES = np.random.default_rng(11).integers(0, 256, size=(100_000, 64)).astype(np.float32)


def test_float32_batches_give_the_float64_answer(linear_pipeline):
    runner = make_runner(linear_pipeline)
    assert runner._single is not None
    for X in (X_DIGITS.astype(np.float32), X_RANDOM_BYTES, X_RANDOM.astype(np.float32)):
        prediction = runner.predict(X, max_abs=255.0)
        assert prediction.confidence is None
        np.testing.assert_array_equal(runner.classes[prediction.class_index],
                                      linear_pipeline.predict(X.astype(np.float64)))


def test_binary_float32_batches_give_the_float64_answer(binary_pipeline):
    runner = make_runner(binary_pipeline)
    assert runner._binary and runner._single is not None
    for X in (X_DIGITS.astype(np.float32), X_RANDOM_BYTES):
        np.testing.assert_array_equal(_labels(runner, X, max_abs=255.0),
                                      binary_pipeline.predict(X.astype(np.float64)))


def test_float32_batches_with_confidence_are_scored_in_float64():
    pipeline = _fit(LINEAR["pca-logistic"]())
    runner = make_runner(pipeline)
    X = X_DIGITS.astype(np.float32)
    prediction = runner.predict(X, want_confidence=True)
    assert prediction.confidence.dtype == np.float64
    _assert_confidence(prediction, pipeline.predict_proba(X.astype(np.float64)))


def test_a_near_tie_float32_cannot_resolve_is_settled_in_float64():
    pipeline = _fit(LINEAR["pca-logistic"]())
    classifier = pipeline[-1]
    # Class 5 is class 3 moved up by far less than a float32 rounding but far more
    # than a float64 one: float64 says 5 wherever either wins, float32 cannot tell.
    classifier.coef_[5] = classifier.coef_[3]
    classifier.intercept_[5] = classifier.intercept_[3] + 1e-9
    X = X_DIGITS[(Y_DIGITS == 3) | (Y_DIGITS == 5)]
    expected = pipeline.predict(X)
    assert np.sum(expected == 5) > 150 and not np.any(expected == 3)
    runner = make_runner(pipeline)
    single = (X.astype(np.float32) @ runner._single[0]).T + runner._single[1]
    assert np.any(single[3] >= single[5])  # float32 alone would get some of them wrong
    np.testing.assert_array_equal(_labels(runner, X.astype(np.float32)), expected)


def test_the_float32_margin_covers_its_rounding():
    runner = make_runner(_fit(LINEAR["pca-logistic"]()))
    # 8 (d + 3) float32 roundings of the largest term, plus the float64 margin.
    assert runner.single_rtol == pytest.approx(8 * 67 * 2.0 ** -24 + TIE_RTOL)
    X = X_RANDOM_BYTES[:20_000]
    A, b, _ = runner._single
    error = np.abs(
        ((X @ A).T + b).astype(np.float64)
        - ((X.astype(np.float64) @ runner._double[0]).T + runner._double[1])
    )
    bound = 255.0 * runner._term_per_unit_x + runner._term_constant
    assert error.max() < runner.single_rtol * bound / 8


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "n", [1, PRODUCT_ROWS - 1, PRODUCT_ROWS, PRODUCT_ROWS + 1, 5 * PRODUCT_ROWS + 7]
)
def test_scores_in_blocks_are_the_transposed_product(dtype, n):
    runner = make_runner(_fit(LINEAR["pca-logistic"]()))
    A = (runner._single if dtype == np.float32 else runner._double)[0]
    X = X_RANDOM_BYTES[:n].astype(dtype)
    scores = _scores(X, A)
    assert scores.shape == (A.shape[1], n) and scores.dtype == dtype
    assert scores.flags.c_contiguous
    whole = (X.astype(np.float64) @ A.astype(np.float64)).T
    bound = 255.0 * runner._term_per_unit_x + runner._term_constant
    rtol = runner.single_rtol if dtype == np.float32 else TIE_RTOL
    assert np.abs(scores - whole).max() < rtol * bound / 8


@pytest.mark.parametrize("n_classes", [30, 300])
def test_many_classes_and_rows_tied_across_all_of_them(n_classes):
    # Up to 255 classes are counted in bytes, more in int64; with every class tied the
    # byte sum of class numbers wraps, and those rows still go to the real pipeline.
    rng = np.random.default_rng(n_classes)
    X = rng.uniform(0, 16, (20 * n_classes, 64))
    y = np.repeat(np.arange(n_classes), 20)
    pipeline = Pipeline([("Scaler", StandardScaler()), ("Ridge", RidgeClassifier())]).fit(X, y)
    runner = make_runner(pipeline)
    assert runner.compiled
    np.testing.assert_array_equal(_labels(runner, X), pipeline.predict(X))
    ridge = pipeline[-1]
    ridge.coef_[:] = ridge.coef_[0]
    ridge.intercept_[:] = ridge.intercept_[0]
    runner = make_runner(pipeline)
    expected = pipeline.predict(X)
    # every row tied across all classes: equal scores up to the last bit of BLAS's sums
    # (which of the columns comes out a bit higher depends on the CPU's kernel)
    scores = pipeline.decision_function(X)
    assert np.ptp(scores, axis=1).max() <= 1e-12 * np.abs(scores).max()
    np.testing.assert_array_equal(_labels(runner, X), expected)
    # tied rows go to the pipeline with the values the runner was given
    single = X.astype(np.float32)
    np.testing.assert_array_equal(
        _labels(runner, single), pipeline.predict(single.astype(np.float64))
    )
