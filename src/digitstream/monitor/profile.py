"""The reference profile of a model: what it was trained and checked on, kept in its bundle.

``digitstream train`` builds one from its split (:func:`profile_of_split`);
``digitstream profile`` from a data set for a bundle or ``.skops`` file that has none. It
holds:

- **the inputs**: per feature, a histogram of the reference part (the training part) over
  ``bins`` equal bins of the data set's value range;
- **the classes**: the true labels' counts in the reference part, and the predicted
  classes' counts on the held-out part;
- **the confidence**: on the held-out part, a histogram of the winning class's probability
  and, per bin, how often the model was right there (its calibration), when the model gives
  probabilities;
- **the null**: for each test the monitor makes (inputs, classes, confidence), the mean and
  spread of its statistic over windows drawn from the held-out part, by window size. A live
  window is judged against what the reference's own windows of its size look like
  (:class:`NullCurve`).

The monitor (:mod:`digitstream.monitor.drift`) reads nothing else. The profile is a JSON
file beside the pipeline (``profile.json`` in a bundle directory, ``NAME.profile.json``
beside ``NAME.skops``); it names the content hash of the pipeline it describes, and the
bundle's content hash covers it (see :mod:`digitstream.model.bundle`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from digitstream.monitor.distance import js_distance
from digitstream.monitor.sketch import Sketcher

PROFILE_FILE = "profile.json"
PROFILE_FORMAT = "digitstream-profile/1"
#: bins per feature, equal over the data set's value range (16 levels of a 0-16 digit
#: pixel, 16 grey levels of a byte)
BINS = 16
#: bins of the winning probability: fine near 1, where a good model's answers are
CONFIDENCE_EDGES = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)
#: a live window is flagged when a test's statistic lies this many standard deviations of
#: the reference's own windows above their mean (see NullCurve)
Z = 5.0
#: window sizes the null is drawn at: sampled rows (inputs, confidence) ...
ROW_SIZES = tuple(50 * 2**k for k in range(10))  # 50 .. 25,600
#: ... and messages (the predicted classes, counted over every message)
MESSAGE_SIZES = tuple(50 * 2**k for k in range(14))  # 50 .. 409,600
#: windows drawn per size
REPLICATES = 200
#: held-out rows x features the input bootstrap uses at most (a random subset beyond)
BOOTSTRAP_CELLS = 1_000_000
#: calibration: held-out rows' worth of weight given to the model's own probability in a
#: bin (a bin with few held-out rows is trusted to be calibrated, one with many is measured)
PRIOR_ROWS = 1.0


@dataclass(frozen=True)
class NullCurve:
    """A test's statistic over windows of the reference's held-out part: ``mean`` and ``sd``
    at each window size in ``sizes`` (increasing). Between sizes it is interpolated on log
    scales; below the first there is no verdict, past the last the last holds.

    ``sd`` never falls below its value at the held-out part's own size: a window larger than
    the held-out part is not judged more finely than that part can vouch for (a fresh sample
    of the same distribution differs from the reference as much as the held-out part does).
    """

    sizes: np.ndarray
    mean: np.ndarray
    sd: np.ndarray

    def at(self, n: float) -> tuple[float, float] | None:
        """(mean, sd) at window size ``n``; None if ``n`` is below the smallest size."""
        sizes = self.sizes
        if n < sizes[0]:
            return None
        x = np.log(min(float(n), float(sizes[-1])))
        logs = np.log(sizes)
        mean = float(np.exp(np.interp(x, logs, np.log(np.maximum(self.mean, 1e-12)))))
        sd = float(np.exp(np.interp(x, logs, np.log(np.maximum(self.sd, 1e-12)))))
        return mean, sd

    def z(self, statistic: float, n: float) -> float | None:
        """How many standard deviations ``statistic`` lies above the null mean at ``n``."""
        null = self.at(n)
        if null is None:
            return None
        mean, sd = null
        return (statistic - mean) / sd

    def threshold(self, n: float, z: float = Z) -> float | None:
        """The statistic at ``z`` standard deviations above the null mean at ``n``."""
        null = self.at(n)
        return None if null is None else null[0] + z * null[1]

    def to_json(self) -> dict:
        return {
            "sizes": self.sizes.astype(int).tolist(),
            "mean": [float(f"{v:.6g}") for v in self.mean],
            "sd": [float(f"{v:.6g}") for v in self.sd],
        }

    @classmethod
    def from_json(cls, data, what: str) -> NullCurve:
        if not isinstance(data, dict):
            raise ValueError(f"{what}: expected an object")
        sizes = _floats(data.get("sizes"), f"{what}.sizes")
        mean = _floats(data.get("mean"), f"{what}.mean", len(sizes))
        sd = _floats(data.get("sd"), f"{what}.sd", len(sizes))
        if not len(sizes) or np.any(sizes <= 0) or np.any(np.diff(sizes) <= 0):
            raise ValueError(f"{what}.sizes must be positive and increasing")
        if np.any(sd <= 0) or np.any(mean < 0):
            raise ValueError(f"{what}: sd must be positive and mean not negative")
        return cls(sizes, mean, sd)


@dataclass(frozen=True)
class ConfidenceReference:
    """The winning probability on the held-out part: ``counts`` per bin of ``edges``,
    ``correct`` (how many of those the model got right) and ``calibrated`` (the accuracy the
    monitor expects of an answer in that bin: the held-out accuracy there, pulled towards
    the bin's mean probability where the bin holds few rows, and made non-decreasing)."""

    edges: np.ndarray
    counts: np.ndarray
    correct: np.ndarray
    calibrated: np.ndarray

    def expected_accuracy(self, counts: np.ndarray) -> float | None:
        """The accuracy expected of answers whose probabilities fell in the bins as
        ``counts`` says (confidence-based performance estimation); None for no answers."""
        total = float(counts.sum())
        return float(counts @ self.calibrated) / total if total > 0 else None


@dataclass(frozen=True)
class Profile:
    """A model's reference profile; see the module doc. Arrays are read-only in use."""

    source: dict  # what it was made from: data set, parts, seed, rows
    pipeline_hash: str  # the content hash of the pipeline file it describes
    low: float
    high: float
    bins: int
    reference: np.ndarray  # (n_features, bins) int64: the reference part's histograms
    classes: list[str]
    priors: np.ndarray  # (n_classes,) true labels in the reference part
    predicted: np.ndarray  # (n_classes,) predicted classes on the held-out part
    heldout_rows: int
    heldout_accuracy: float
    confidence: ConfidenceReference | None
    input_null: NullCurve  # mean Jensen-Shannon distance over features, by sampled rows
    classes_null: NullCurve  # predicted classes' distance, by messages
    confidence_null: NullCurve | None  # winning probability's distance, by sampled rows
    z: float = Z

    @property
    def n_features(self) -> int:
        return int(self.reference.shape[0])

    @property
    def reference_rows(self) -> int:
        return int(self.reference[0].sum()) if self.n_features else 0

    def sketcher(self) -> Sketcher:
        """What a flow serving a model with this profile measures of each batch."""
        edges = None if self.confidence is None else self.confidence.edges
        return Sketcher(self.n_features, self.low, self.high, self.bins, edges)

    # ------------------------------------------------------------- the file
    def to_json(self) -> dict:
        confidence = None
        if self.confidence is not None:
            c = self.confidence
            confidence = {
                "edges": c.edges.tolist(),
                "counts": c.counts.astype(int).tolist(),
                "correct": c.correct.astype(int).tolist(),
                "calibrated": [round(float(v), 6) for v in c.calibrated],
            }
        return {
            "format": PROFILE_FORMAT,
            "source": self.source,
            "pipeline_hash": self.pipeline_hash,
            "features": {
                "n": self.n_features,
                "low": self.low,
                "high": self.high,
                "bins": self.bins,
                "reference_rows": self.reference_rows,
                "counts": self.reference.astype(int).tolist(),
            },
            "classes": {
                "labels": list(self.classes),
                "priors": self.priors.astype(int).tolist(),
                "predicted": self.predicted.astype(int).tolist(),
            },
            "held_out": {"rows": self.heldout_rows, "accuracy": self.heldout_accuracy},
            "confidence": confidence,
            "null": {
                "z": self.z,
                "input": self.input_null.to_json(),
                "classes": self.classes_null.to_json(),
                "confidence": None
                if self.confidence_null is None
                else self.confidence_null.to_json(),
            },
        }

    @classmethod
    def from_json(cls, data) -> Profile:
        """A profile from its JSON document; ValueError (one line) if it is not one."""
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"not a {PROFILE_FORMAT} document")
        features, classes = _object(data, "features"), _object(data, "classes")
        held_out, null = _object(data, "held_out"), _object(data, "null")
        n, bins = _int(features.get("n"), "features.n"), _int(features.get("bins"), "features.bins")
        low, high = (
            _float(features.get("low"), "features.low"),
            _float(features.get("high"), "features.high"),
        )
        if n < 1 or bins < 1 or not high >= low:
            raise ValueError("features: n and bins must be positive, high at least low")
        reference = _counts(features.get("counts"), "features.counts", (n, bins))
        labels = classes.get("labels")
        if (
            not isinstance(labels, list)
            or len(labels) < 2
            or not all(isinstance(x, str) for x in labels)
        ):
            raise ValueError("classes.labels must list at least two class names")
        k = len(labels)
        priors = _counts(classes.get("priors"), "classes.priors", (k,))
        predicted = _counts(classes.get("predicted"), "classes.predicted", (k,))
        confidence = None
        if data.get("confidence") is not None:
            c = _object(data, "confidence")
            edges = _floats(c.get("edges"), "confidence.edges")
            if len(edges) < 2 or np.any(np.diff(edges) <= 0):
                raise ValueError("confidence.edges must increase")
            m = len(edges) - 1
            confidence = ConfidenceReference(
                edges,
                _counts(c.get("counts"), "confidence.counts", (m,)),
                _counts(c.get("correct"), "confidence.correct", (m,)),
                _floats(c.get("calibrated"), "confidence.calibrated", m),
            )
        confidence_null = null.get("confidence")
        if (confidence is None) != (confidence_null is None):
            raise ValueError("confidence and null.confidence go together")
        source = data.get("source")
        pipeline_hash = data.get("pipeline_hash")
        if not isinstance(pipeline_hash, str):
            raise ValueError("pipeline_hash must name the pipeline's content hash")
        return cls(
            source=source if isinstance(source, dict) else {},
            pipeline_hash=pipeline_hash,
            low=low,
            high=high,
            bins=bins,
            reference=reference,
            classes=labels,
            priors=priors,
            predicted=predicted,
            heldout_rows=_int(held_out.get("rows"), "held_out.rows"),
            heldout_accuracy=_float(held_out.get("accuracy"), "held_out.accuracy"),
            confidence=confidence,
            input_null=NullCurve.from_json(null.get("input"), "null.input"),
            classes_null=NullCurve.from_json(null.get("classes"), "null.classes"),
            confidence_null=(
                None
                if confidence_null is None
                else NullCurve.from_json(confidence_null, "null.confidence")
            ),
            z=_float(null.get("z"), "null.z"),
        )

    def summary(self) -> list[str]:
        """What ``digitstream inspect`` says of the profile, a line each."""
        source = self.source
        where = f"{source.get('dataset', '?')} ({source.get('reference', 'training part')})"
        predicted = " ".join(f"{c}:{n}" for c, n in zip(self.classes, self.predicted.tolist()))
        lines = [
            f"reference: {self.reference_rows:,} rows of {where}; {self.n_features} features "
            f"x {self.bins} bins over [{self.low:g}, {self.high:g}]",
            f"held out: {self.heldout_rows:,} rows, accuracy {self.heldout_accuracy:.4f}; "
            f"predicted classes {predicted}",
        ]
        if self.confidence is not None:
            estimate = self.confidence.expected_accuracy(self.confidence.counts)
            lines.append(
                f"confidence: {len(self.confidence.counts)} bins, calibrated accuracy "
                f"{' '.join(f'{v:.3f}' for v in self.confidence.calibrated)}; "
                f"estimated held-out accuracy {estimate:.4f}"
            )
        else:
            lines.append(
                "confidence: none (the model gives no probabilities): no estimated accuracy"
            )
        for name, curve, unit in (
            ("inputs", self.input_null, "sampled rows"),
            ("classes", self.classes_null, "messages"),
            ("confidence", self.confidence_null, "sampled rows"),
        ):
            if curve is None:
                continue
            points = [int(curve.sizes[0]), 800 if unit == "sampled rows" else 20_000]
            said = ", ".join(f"{curve.threshold(p, self.z):.4f} at {p:,}" for p in points)
            lines.append(f"drift threshold, {name} ({unit}): {said}")
        return lines


# -------------------------------------------------------------------- building
def build_profile(
    pipeline,
    X_reference: np.ndarray,
    y_reference: np.ndarray,
    X_heldout: np.ndarray,
    y_heldout: np.ndarray,
    value_range: tuple[float, float],
    source: dict,
    pipeline_hash: str = "",
    seed: int = 0,
) -> Profile:
    """The profile of a fitted classifier ``pipeline`` from its reference part (what it was
    trained on) and a held-out part it was not trained on; ``value_range`` is the range the
    features may take, ``source`` says where the parts come from. ``pipeline_hash`` is
    filled in when the profile is saved with its pipeline."""
    # start-up time: the runner (and through it the model's code) only when building
    from digitstream.model.runner import make_runner

    runner = make_runner(pipeline)
    classes = [str(c) for c in runner.classes]
    X_heldout = np.ascontiguousarray(X_heldout, dtype=np.float64)
    prediction = runner.predict(X_heldout, want_confidence=True)
    codes = {label: i for i, label in enumerate(classes)}
    true = np.array([codes.get(str(y), -1) for y in y_heldout], dtype=np.intp)
    correct = prediction.class_index == true
    reference_codes = np.array([codes.get(str(y), -1) for y in y_reference], dtype=np.intp)
    k = len(classes)
    priors = np.bincount(reference_codes[reference_codes >= 0], minlength=k)
    predicted = np.bincount(prediction.class_index, minlength=k)

    low, high = float(value_range[0]), float(value_range[1])
    if not high > low:
        high = low + 1.0
    d = X_heldout.shape[1]
    binning = Sketcher(d, low, high, BINS)
    reference = np.zeros(d * BINS, dtype=np.int64)
    for start in range(0, len(X_reference), 4096):
        reference += np.bincount(
            binning.bin_index(np.asarray(X_reference[start : start + 4096])).ravel(),
            minlength=d * BINS,
        )
    reference = reference.reshape(d, BINS)

    rng = np.random.default_rng(seed)
    confidence = confidence_null = None
    if prediction.confidence is not None:
        confidence = _calibration(prediction.confidence, correct)
        bins = np.clip(
            np.searchsorted(confidence.edges, prediction.confidence, side="right") - 1,
            0,
            len(confidence.edges) - 2,
        )
        confidence_null = _two_sample_null(bins, len(confidence.counts), ROW_SIZES, rng)
    return Profile(
        source=source,
        pipeline_hash=pipeline_hash,
        low=low,
        high=high,
        bins=BINS,
        reference=reference,
        classes=classes,
        priors=priors,
        predicted=predicted,
        heldout_rows=len(X_heldout),
        heldout_accuracy=float(correct.mean()) if len(correct) else 0.0,
        confidence=confidence,
        input_null=_input_null(binning, X_heldout, reference, rng),
        classes_null=_two_sample_null(prediction.class_index, k, MESSAGE_SIZES, rng),
        confidence_null=confidence_null,
    )


def profile_of_split(pipeline, split, value_range, dataset: str, seed: int = 0) -> Profile:
    """The profile ``digitstream train`` stores: the training part of ``split`` as the
    reference, its held-out part for the classes, the confidence and the null."""
    source = {
        "dataset": dataset,
        "reference": "training part",
        "held_out": "held-out part",
        "seed": seed,
    }
    return build_profile(
        pipeline,
        split.X_train,
        split.y_train,
        split.X_test,
        split.y_test,
        value_range,
        source,
        seed=seed,
    )


def with_pipeline_hash(profile: Profile, pipeline_hash: str) -> Profile:
    """``profile``, naming the pipeline it describes."""
    return replace(profile, pipeline_hash=pipeline_hash)


def _calibration(confidence: np.ndarray, correct: np.ndarray) -> ConfidenceReference:
    edges = np.asarray(CONFIDENCE_EDGES, dtype=np.float64)
    m = len(edges) - 1
    bins = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, m - 1)
    counts = np.bincount(bins, minlength=m)
    hits = np.bincount(bins, weights=correct.astype(np.float64), minlength=m)
    summed = np.bincount(bins, weights=confidence, minlength=m)
    middle = 0.5 * (edges[:-1] + edges[1:])
    mean_probability = np.where(counts > 0, summed / np.maximum(counts, 1), middle)
    weight = counts + PRIOR_ROWS
    accuracy = (hits + PRIOR_ROWS * mean_probability) / weight
    return ConfidenceReference(
        edges, counts, hits.round().astype(np.int64), _non_decreasing(accuracy, weight)
    )


def _non_decreasing(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The weighted least-squares non-decreasing fit to ``values`` (pool adjacent
    violators): a more confident answer is never expected to be right less often."""
    blocks: list[list[float]] = []  # [mean, weight, length]
    for value, weight in zip(values.tolist(), weights.tolist()):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return np.concatenate([np.full(int(n), v) for v, _, n in blocks])


def _input_null(binning: Sketcher, X_heldout: np.ndarray, reference: np.ndarray, rng) -> NullCurve:
    """The mean Jensen-Shannon distance over features between the reference histograms and
    windows of n rows drawn (with replacement) from the held-out part, for n in ROW_SIZES."""
    # start-up time: SciPy's sparse matrices only when a profile is built
    from scipy import sparse

    d, bins = reference.shape
    rows = len(X_heldout)
    most = max(200, BOOTSTRAP_CELLS // d)
    if rows > most:
        X_heldout = X_heldout[rng.choice(rows, most, replace=False)]
        rows = most
    index = binning.bin_index(X_heldout)  # (rows, d)
    onehot = sparse.csr_matrix(
        (np.ones(index.size), index.ravel(), np.arange(0, index.size + 1, d)),
        shape=(rows, d * bins),
    )
    means, sds = [], []
    uniform = np.full(rows, 1.0 / rows)
    for n in ROW_SIZES:
        weights = rng.multinomial(n, uniform, size=REPLICATES).astype(np.float64)
        histograms = np.asarray((onehot.T @ weights.T).T).reshape(REPLICATES, d, bins)
        scores = js_distance(histograms, reference[None, :, :]).mean(axis=1)
        means.append(scores.mean())
        sds.append(scores.std(ddof=1))
    return _floored(np.array(ROW_SIZES, dtype=np.float64), np.array(means), np.array(sds), rows)


def _two_sample_null(values: np.ndarray, k: int, sizes, rng) -> NullCurve:
    """The Jensen-Shannon distance between two histograms of ``values`` (codes below
    ``k``) drawn with replacement, one as large as ``values`` (the reference is itself a
    sample) and one of n, for n in ``sizes``."""
    m = len(values)
    p = np.bincount(values, minlength=k) / max(m, 1)
    means, sds = [], []
    for n in sizes:
        reference = rng.multinomial(m, p, size=REPLICATES)
        window = rng.multinomial(n, p, size=REPLICATES)
        scores = js_distance(reference, window)
        means.append(scores.mean())
        sds.append(scores.std(ddof=1))
    return _floored(np.array(sizes, dtype=np.float64), np.array(means), np.array(sds), m)


def _floored(sizes: np.ndarray, mean: np.ndarray, sd: np.ndarray, own_size: int) -> NullCurve:
    sd = np.maximum(sd, 1e-9)
    at_own = float(np.exp(np.interp(np.log(max(own_size, sizes[0])), np.log(sizes), np.log(sd))))
    return NullCurve(sizes, mean, np.where(sizes > own_size, np.maximum(sd, at_own), sd))


# ------------------------------------------------------------------ validation
def _object(data: dict, key: str) -> dict:
    value = data.get(key)
    if not isinstance(value, dict):
        raise ValueError(f"{key}: expected an object")
    return value


def _int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what}: expected a whole number")
    return value


def _float(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ValueError(f"{what}: expected a finite number")
    return float(value)


def _floats(value, what: str, length: int | None = None) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a list of numbers") from None
    if array.ndim != 1 or (length is not None and len(array) != length):
        raise ValueError(f"{what}: expected a list of {length or 'some'} numbers")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what}: expected finite numbers")
    return array


def _counts(value, what: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected counts") from None
    if array.shape != shape or array.dtype.kind not in "iu" or np.any(array < 0):
        raise ValueError(f"{what}: expected whole counts of shape {shape}")
    return array.astype(np.int64)
