"""The model on the hot path: a fitted pipeline applied to whole batches.

``make_runner(pipeline)`` returns a :class:`Runner` whose ``predict`` takes a
batch ``X`` of shape (n_samples, n_features), float64 or float32 (whose values
then stand for themselves in float64), C-contiguous and already checked to be
finite, and returns class indices (into ``runner.classes``), the
winning class's probability if asked, and the wall time of every stage.

Two ways to run a pipeline:

* **Fused**, when every step is affine and the classifier is linear
  (StandardScaler, PCA with or without whitening, then LogisticRegression,
  LinearSVC, RidgeClassifier, SGDClassifier or Perceptron; or the classifier
  alone): the steps compose into one map ``scores = X @ W + b`` and an argmax,
  one matrix product per batch. The whole map is one stage, named after the
  steps it replaces ("PCA + Logistic Regression").
* **Step by step**, for anything else: each step's ``transform`` on the whole
  batch, then the classifier's ``predict``; one stage per step.

The fused labels equal ``pipeline.predict`` exactly. Rounding makes fused and
step-by-step scores differ in their last bits, which can only change the
answer where the top two scores are (nearly) tied, so the tie rule is: rows
whose two highest fused scores lie within ``TIE_RTOL`` times the largest
magnitude any term of a score can reach for this batch (for binary
classifiers: whose score lies that close to 0) are recomputed with the real
pipeline. Those rows then get exactly scikit-learn's answer, ties included:
the first of equal maxima, and the negative class for a binary score of
exactly 0. The margin is ~10^4 times the worst rounding error, and real
images almost never fall inside it.

A batch that arrives as float32 (bytes and float32 pixels are exact in it)
is scored in single precision first, which halves the cost of the product.
Its margin is ``single_rtol``: twice the worst float32 rounding of a dot
product of that length plus the double-precision margin, with an absolute
allowance for underflow. Rows inside it are scored again in double precision
and, if still tied there, by the real pipeline, so the labels stay exactly
``pipeline.predict(X.astype(float64))``. Confidences are always computed in
double precision.

The pipeline may also be a :class:`~digitstream.model.stored.StoredPipeline`,
read from its skops file without importing scikit-learn: it is fused from the
stored arrays into the same map, bit for bit, and rows within the tie margin
wait until the real pipeline is loaded. Nothing here imports scikit-learn; a
loaded estimator's class is known by its module and name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from digitstream.model.stored import (
    CLASSIFIER_KINDS,
    ESTIMATOR_KINDS,
    StoredPipeline,
    StoredStep,
)

TIE_RTOL = 1e-9
SINGLE_EPS = 2.0**-24  # unit roundoff of float32
SINGLE_TINY = 2.0**-148  # twice the absolute rounding of a float32 operation that underflows
SINGLE_MAX = 1e37  # score terms below this cannot overflow float32

# Fused by exact type (a subclass may override transform or predict): the kinds of
# stored.ESTIMATOR_KINDS, and the linear classifiers fused only once loaded.
_LOADED_ONLY_CLASSIFIERS = {
    ("sklearn.linear_model._ridge", "RidgeClassifier"): "RidgeClassifier",
    ("sklearn.linear_model._ridge", "RidgeClassifierCV"): "RidgeClassifierCV",
    ("sklearn.linear_model._stochastic_gradient", "SGDClassifier"): "SGDClassifier",
    ("sklearn.linear_model._perceptron", "Perceptron"): "Perceptron",
}
_LINEAR_CLASSIFIERS = CLASSIFIER_KINDS | set(_LOADED_ONLY_CLASSIFIERS.values())

perf_counter = time.perf_counter


@dataclass
class Prediction:
    class_index: np.ndarray  # (n,) intp, index into runner.classes
    confidence: np.ndarray | None  # (n,) float64, probability of the winning class
    stage_seconds: list[tuple[str, float]]  # wall time of each stage on this batch, in order


def pipeline_steps(estimator) -> list[tuple[str, Any]]:
    """The steps that run, as (name, estimator); a bare classifier is one step
    named after its class. ``None`` and ``"passthrough"`` steps are skipped, as
    the Pipeline skips them. A :class:`~digitstream.model.stored.StoredPipeline`
    gives its stored steps."""
    if isinstance(estimator, StoredPipeline):
        steps = estimator.steps
    else:
        from sklearn.pipeline import Pipeline  # loaded with the estimator already

        if not isinstance(estimator, Pipeline):
            return [(type(estimator).__name__, estimator)]
        steps = estimator.steps
    return [(name, step) for name, step in steps if step is not None and not isinstance(step, str)]


def estimator_kind(step) -> str | None:
    """The name of ``step``'s class if it is exactly one the fused path composes
    (or a stored step of one), else None."""
    if isinstance(step, StoredStep):
        return step.kind
    cls = type(step)
    where = (cls.__module__, cls.__qualname__)
    return ESTIMATOR_KINDS.get(where) or _LOADED_ONLY_CLASSIFIERS.get(where)


def n_features_of(estimator) -> int:
    """The number of input features; a Pipeline starting with "passthrough"
    does not say, its first real step does. AttributeError if not fitted."""
    try:
        return int(estimator.n_features_in_)
    except AttributeError:
        return int(pipeline_steps(estimator)[0][1].n_features_in_)


class Runner:
    """Applies a fitted classifier pipeline to batches; see the module doc."""

    stage_names: list[str]
    classes: np.ndarray
    n_features: int
    compiled: bool

    def __init__(self, pipeline, stage_names: list[str], compiled: bool):
        self.pipeline = pipeline
        self.stage_names = stage_names
        self.classes = np.asarray(pipeline.classes_)
        self.n_features = n_features_of(pipeline)
        self.compiled = compiled
        self._has_proba = hasattr(pipeline, "predict_proba")
        self._classes_sorted = bool(np.all(self.classes[:-1] < self.classes[1:]))

    def predict(
        self, X: np.ndarray, want_confidence: bool = False, max_abs: float | None = None
    ) -> Prediction:
        """Classify the batch ``X`` (n, n_features), float64 or float32; the
        answer is always that of the pipeline on ``X.astype(float64)``.

        ``confidence`` is the probability the model gives the class it
        predicts (``predict_proba``), or None if the model has no
        probabilities or it was not asked for. ``max_abs`` is an optional
        upper bound on ``abs(X)`` known to the caller (255 for bytes, say);
        the fused path otherwise finds it with two passes over ``X``.
        """
        raise NotImplementedError

    def same_map(self, other: Runner) -> bool:
        """Whether ``other`` is fused into exactly the map this runner is fused into
        (a runner that is not fused has none)."""
        return False

    def winning_probability(self, X: np.ndarray) -> np.ndarray | None:
        """The highest class probability of each row of ``X`` (the model's confidence, for
        the drift monitor's sample; no tie rule: it is not an answer), or None for a model
        without probabilities."""
        if not self._has_proba:
            return None
        return np.asarray(self.pipeline.predict_proba(np.asarray(X, dtype=np.float64))).max(axis=1)

    def _empty(self, want_confidence: bool) -> Prediction:
        confidence = np.empty(0) if want_confidence and self._has_proba else None
        return Prediction(
            np.empty(0, dtype=np.intp), confidence, [(name, 0.0) for name in self.stage_names]
        )

    def _index_of(self, labels: np.ndarray) -> np.ndarray:
        if self._classes_sorted:
            return np.searchsorted(self.classes, labels).astype(np.intp, copy=False)
        position = {label: i for i, label in enumerate(self.classes.tolist())}
        return np.fromiter((position[label] for label in labels.tolist()), np.intp, len(labels))

    def _proba_of_winner(self, X: np.ndarray, index: np.ndarray) -> np.ndarray:
        proba = self.pipeline.predict_proba(X)
        return proba[np.arange(len(index)), index]

    def __repr__(self) -> str:
        kind = "fused" if self.compiled else "step by step"
        return f"<Runner {kind}: {' -> '.join(self.stage_names)}>"


class _StepwiseRunner(Runner):
    def __init__(self, pipeline):
        steps = pipeline_steps(pipeline)
        super().__init__(pipeline, [name for name, _ in steps], compiled=False)
        self._transformers = steps[:-1]
        self._final_name, self._final = steps[-1]

    def predict(self, X, want_confidence=False, max_abs=None):
        if len(X) == 0:
            return self._empty(want_confidence)
        stage_seconds = []
        Z = np.asarray(X, dtype=np.float64)
        for name, step in self._transformers:
            start = perf_counter()
            Z = step.transform(Z)
            stage_seconds.append((name, perf_counter() - start))
        start = perf_counter()
        index = self._index_of(self._final.predict(Z))
        confidence = None
        if want_confidence and self._has_proba:
            proba = self._final.predict_proba(Z)
            confidence = proba[np.arange(len(index)), index]
        stage_seconds.append((self._final_name, perf_counter() - start))
        return Prediction(index, confidence, stage_seconds)


@dataclass
class _Affine:
    """``z -> z @ A + c``, with ``A_abs``/``c_abs`` bounding the magnitude of
    every term the real step computes (for the rounding bound)."""

    A: np.ndarray
    c: np.ndarray
    A_abs: np.ndarray
    c_abs: np.ndarray

    def then(self, other: _Affine) -> _Affine:
        return _Affine(
            self.A @ other.A,
            self.c @ other.A + other.c,
            self.A_abs @ other.A_abs,
            self.c_abs @ other.A_abs + other.c_abs,
        )


def _affine_transformer(step) -> _Affine | None:
    kind = estimator_kind(step)
    if kind == "StandardScaler":
        n = step.n_features_in_
        mean = step.mean_ if step.with_mean and step.mean_ is not None else np.zeros(n)
        scale = step.scale_ if step.scale_ is not None else np.ones(n)
        inverse = 1.0 / np.asarray(scale, dtype=np.float64)
        A = np.diag(inverse)
        return _Affine(A, -mean * inverse, A, np.abs(mean) * inverse)
    if kind == "PCA":
        A = np.asarray(step.components_, dtype=np.float64).T.copy()
        mean = np.asarray(step.mean_, dtype=np.float64)
        A_abs = np.abs(A)
        c, c_abs = -(mean @ A), np.abs(mean) @ A_abs
        if step.whiten:
            # As PCA.transform: variances below machine epsilon are clipped.
            scale = np.sqrt(np.asarray(step.explained_variance_, dtype=np.float64))
            scale[scale < np.finfo(np.float64).eps] = np.finfo(np.float64).eps
            A, A_abs, c, c_abs = A / scale, A_abs / scale, c / scale, c_abs / scale
        return _Affine(A, c, A_abs, c_abs)
    return None


def _linear_classifier(step) -> _Affine | None:
    if estimator_kind(step) not in _LINEAR_CLASSIFIERS:
        return None
    coef = getattr(step, "coef_", None)
    if not isinstance(coef, np.ndarray) or coef.ndim != 2:
        return None  # sparsified coefficients, or not fitted
    binarizer = getattr(step, "_label_binarizer", None)
    if binarizer is not None and binarizer.y_type_.startswith("multilabel"):
        return None
    n_classes = len(step.classes_)
    if coef.shape[0] != (1 if n_classes == 2 else n_classes):
        return None
    W = np.asarray(coef, dtype=np.float64).T.copy()
    b = np.broadcast_to(np.asarray(step.intercept_, dtype=np.float64), (W.shape[1],)).copy()
    return _Affine(W, b, np.abs(W), np.abs(b))


def _closed_form_confidence(classifier) -> str | None:
    """How LogisticRegression.predict_proba derives probabilities from scores."""
    if estimator_kind(classifier) == "LogisticRegression":
        return "sigmoid" if len(classifier.classes_) == 2 else "softmax"
    return None


class _FusedRunner(Runner):
    def __init__(self, pipeline, steps, affine: _Affine):
        super().__init__(pipeline, [" + ".join(name for name, _ in steps)], compiled=True)
        self._stage = self.stage_names[0]
        self._probability = _closed_form_confidence(steps[-1][1])
        self._binary = affine.A.shape[1] == 1
        self._double = self._weights(affine, np.float64)
        fits_single = (
            max(float(np.abs(affine.A).max(initial=0.0)), float(np.abs(affine.c).max(initial=0.0)))
            < SINGLE_MAX
        )
        self._single = self._weights(affine, np.float32) if fits_single else None
        # Every term of a score is at most max|x| * sum_i A_abs[i, j] + c_abs[j].
        self._term_per_unit_x = float(affine.A_abs.sum(axis=0).max())
        self._term_constant = float(affine.c_abs.max())
        # A float32 score of a length-d product is off by at most (d + 3) roundings
        # of the largest term; two scores are compared, and 4x that is kept in hand.
        d = affine.A.shape[0]
        self.single_rtol = 8 * (d + 3) * SINGLE_EPS + TIE_RTOL
        self._single_tiny = (d + 1) * SINGLE_TINY

    def same_map(self, other: Runner) -> bool:
        """Whether ``other`` is fused into exactly this map (bit for bit), with the same
        classes, stages and confidences."""
        if not isinstance(other, _FusedRunner):
            return False
        mine, theirs = self._double, other._double
        return (
            self.stage_names == other.stage_names
            and self._probability == other._probability
            and self._binary == other._binary
            and self._has_proba == other._has_proba
            and np.array_equal(self.classes, other.classes)
            and self.classes.dtype == other.classes.dtype
            # the weights and offsets (what follows them is derived from the classes)
            and all(np.array_equal(a, b) for a, b in zip(mine[:2], theirs[:2]))
            and self._term_per_unit_x == other._term_per_unit_x
            and self._term_constant == other._term_constant
        )

    def winning_probability(self, X: np.ndarray) -> np.ndarray | None:
        if self._probability is None:
            return super().winning_probability(X)
        X = np.asarray(X, dtype=np.float64)
        if self._binary:
            w, b = self._double
            positive = 1.0 / (1.0 + np.exp(-(X @ w + b)))
            return np.maximum(positive, 1.0 - positive)
        A, b, _ = self._double
        scores = X @ A
        scores += b[:, 0]
        scores -= scores.max(axis=1, keepdims=True)
        return 1.0 / np.exp(scores).sum(axis=1)

    def _weights(self, affine: _Affine, dtype) -> tuple:
        if self._binary:
            return np.ascontiguousarray(affine.A[:, 0], dtype=dtype), dtype(affine.c[0])
        k = len(affine.c)
        # The decision takes scores laid out (k, n) and a mask of the classes near the top
        # of each row; its column sums say how many there are and, with the class numbers
        # as weights, which (when that is one). Bytes hold the count for up to 255 classes
        # (a sum that wraps past 255 only happens in rows already counted as tied).
        count_type = np.uint8 if k <= 255 else np.int64
        class_numbers = np.arange(k, dtype=count_type)[:, None]
        return (
            np.ascontiguousarray(affine.A, dtype=dtype),
            affine.c[:, None].astype(dtype),
            (count_type, class_numbers),
        )

    def _term_bound(self, X: np.ndarray, max_abs: float | None) -> tuple[float, float]:
        if max_abs is None:
            max_abs = max(float(X.max()), -float(X.min()))
        return max_abs, max_abs * self._term_per_unit_x + self._term_constant

    def tie_margin(self, X: np.ndarray, max_abs: float | None = None) -> float:
        return TIE_RTOL * self._term_bound(X, max_abs)[1]

    def _decide(self, X: np.ndarray, weights: tuple, margin: float):
        """Scores in the precision of ``weights``, the winner per row, and the
        rows whose decision lies within ``margin`` of a tie."""
        # A row whose top score overflowed (inf, or nan from inf - inf) cannot be decided
        # here: it joins the tied rows, which the real pipeline answers (or refuses).
        if self._binary:
            w, b = weights
            scores = X @ w
            scores += b
            unsure = ~(np.abs(scores) > margin)  # nan included
            return scores, (scores > 0).astype(np.intp), np.flatnonzero(unsure)
        A, b, (count_type, class_numbers) = weights
        # the reductions below are fastest along rows of a (k, n) array
        scores = _scores(X, A)
        scores += b
        top = scores.max(axis=0)
        near_top = (scores >= top - margin).view(np.uint8)
        count = np.add.reduce(near_top, axis=0, dtype=count_type)
        index = np.add.reduce(near_top * class_numbers, axis=0, dtype=count_type)
        return scores, index.astype(np.intp), np.flatnonzero((count != 1) | ~np.isfinite(top))

    def _decide_double(self, X: np.ndarray, bound: float):
        scores, index, tied = self._decide(X, self._double, TIE_RTOL * bound)
        if tied.size:
            index[tied] = self._index_of(self.pipeline.predict(X[tied]))
        return scores, index, tied

    def predict(self, X, want_confidence=False, max_abs=None):
        if len(X) == 0:
            return self._empty(want_confidence)
        start = perf_counter()
        max_abs, bound = self._term_bound(X, max_abs)
        if (
            X.dtype == np.float32
            and self._single is not None
            and not want_confidence
            and bound < SINGLE_MAX
        ):
            margin = self.single_rtol * bound + (max_abs + 3) * self._single_tiny
            _, index, tied = self._decide(X, self._single, margin)
            if tied.size:
                index[tied] = self._decide_double(X[tied].astype(np.float64), bound)[1]
            return Prediction(index, None, [(self._stage, perf_counter() - start)])
        X = np.asarray(X, dtype=np.float64)
        scores, index, tied = self._decide_double(X, bound)
        confidence = None
        if want_confidence:
            confidence = self._confidence(X, scores, index, tied)
            if confidence is not None and self._has_proba:
                overflowed = np.flatnonzero(~np.isfinite(confidence))
                if overflowed.size:  # scores too large for the closed form: the model's own
                    confidence[overflowed] = self._proba_of_winner(X[overflowed], index[overflowed])
        return Prediction(index, confidence, [(self._stage, perf_counter() - start)])

    def _confidence(self, X, scores, index, tied) -> np.ndarray | None:
        if self._probability == "sigmoid":
            # start-up time: SciPy stays off the start path
            from scipy.special import expit

            positive = expit(scores)
            return np.where(index == 1, positive, 1 - positive)
        if self._probability == "softmax":
            top = scores.max(axis=0)
            exp = np.exp(scores - top)
            total = exp.sum(axis=0)
            # exp of the winner is exactly 1 except where a tied row's winner
            # is not the numerical top.
            confidence = 1.0 / total
            if tied.size:
                confidence[tied] = exp[index[tied], tied] / total[tied]
            return confidence
        if self._has_proba:
            return self._proba_of_winner(X, index)
        return None


#: rows of a batch per BLAS call in the fused product: OpenBLAS multiplies many rows by a
#: few columns up to twice as fast in blocks whose rows stay in the cache as in one call
PRODUCT_ROWS = 1024


def _scores(X: np.ndarray, A: np.ndarray) -> np.ndarray:
    """``(X @ A).T``, C-contiguous, PRODUCT_ROWS rows of X at a time.

    BLAS is at its fastest on the row-major product (twice the speed of ``A.T @ X.T``
    on some CPUs). In float32 each block's product is written straight into its
    columns of the (k, n) result, which saves the transposed copy of the whole; in
    float64 that costs more than the copy.
    """
    n, k = len(X), A.shape[1]
    dtype = np.result_type(X.dtype, A.dtype)
    direct = dtype == np.float32
    out = np.empty((k, n) if direct else (n, k), dtype=dtype)
    for start in range(0, n, PRODUCT_ROWS):
        stop = start + PRODUCT_ROWS
        np.matmul(X[start:stop], A, out=out[:, start:stop].T if direct else out[start:stop])
    return out if direct else np.ascontiguousarray(out.T)


def make_runner(pipeline, compile: bool = True) -> Runner:
    """A runner for a fitted classifier (a Pipeline or a bare estimator).

    With ``compile`` (the default), an all-linear pipeline is fused into one
    affine map; anything else, or ``compile=False``, runs step by step.
    """
    if compile:
        steps = pipeline_steps(pipeline)
        classifier = _linear_classifier(steps[-1][1])
        transformers = [_affine_transformer(step) for _, step in steps[:-1]]
        fusable = [t for t in transformers if t is not None]
        if classifier is not None and len(fusable) == len(transformers):
            affine = classifier
            for transformer in reversed(fusable):
                affine = transformer.then(affine)
            return _FusedRunner(pipeline, steps, affine)
    if isinstance(pipeline, StoredPipeline):  # read only when fusable: a bug if it is not
        raise ValueError(f"{pipeline!r} cannot be served before it is loaded")
    return _StepwiseRunner(pipeline)
