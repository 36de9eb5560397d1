"""The whole pipeline in one place: wire -> decode -> stages -> encode -> wire.

:class:`Flow` is what every engine runs on a batch. It knows nothing of
sockets: it takes the payloads of consecutive frames of one stream and
returns the framed result bytes for them, in the same order, with the time
each stage took. The stages are the model's pipeline steps, named as the
model names them ("PCA", "Logistic Regression" for the seed's model).

::

    source --frames--> decode --X--> PCA --> Logistic Regression --> encode --frames--> sink

**Every frame is answered.** A stage that raises on a batch does not take the
batch with it: the batch is split in halves and each half is processed again,
down to single frames, so only the frames that fail alone are answered with
an error (``decode failed: ...``, ``model failed: ...``, ``encode failed:
...``) at their place and every other frame gets its class. Finding ``k``
failing rows of ``n`` costs about ``2 k log2(n)`` extra calls, not ``n``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from digitstream.batch import Batch, BatchResult
from digitstream.codecs.inputs import Decoder, reason_kind
from digitstream.codecs.outputs import make_encoder

log = logging.getLogger("digitstream.pipeline")

#: what a true label outside the model's classes counts as, in live accuracy
OTHER_LABEL = "(other)"
#: the most of a flow's time its drift sketches may take: a sketch is made when the flow
#: has that share of the time since its last one to spend (a token bucket of at most
#: SKETCH_BURST seconds), so a flow below saturation sketches every batch and a saturated
#: one keeps 98% of its speed
SKETCH_SHARE = 0.02
SKETCH_BURST = 0.0005


@dataclass(frozen=True)
class FlowOptions:
    """How a model is served: the run's formats, fusing, and the worker's name in metrics."""

    input_format: str = "auto"
    output_format: str = "text"
    compile_model: bool = True
    worker: str = ""
    #: sketch each batch for the drift monitor, when the model has a reference profile
    drift: bool = True
    #: put each message's predicted class, true label and id on the result (late labels,
    #: a shadow model)
    predictions: bool = False


class StageFailed(Exception):
    """A stage raised on a batch; ``stage`` is ``decode``, ``model`` or ``encode``."""

    def __init__(self, stage: str, cause: BaseException, ids: list | None = None):
        super().__init__(f"{stage} failed: {failure_reason(cause)}")
        self.stage = stage
        self.ids = ids  # what the payloads carried, if they were decoded


def _int_classes(classes) -> tuple[np.ndarray, np.ndarray] | None:
    values = np.asarray(classes)
    if values.dtype.kind not in "iu":
        return None
    if values.dtype.kind == "u" and len(values) and values.max() > np.iinfo(np.int64).max:
        return None
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    if np.any(ordered[1:] == ordered[:-1]):  # (not np.unique: it imports numpy.ma, 50 ms)
        return None
    return ordered.astype(np.int64), order


def failure_reason(exc: BaseException) -> str:
    """One short line for an exception: its message, or its type's name if it has none."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


class Flow:
    """Decode, classify and encode batches for one model and one pair of formats."""

    def __init__(
        self,
        runner,
        input_format: str,
        output_format: str,
        worker: str = "",
        profile=None,
        predictions: bool = False,
    ):
        self.runner = runner
        self.predictions = predictions
        #: the model's reference profile (digitstream.monitor.profile), or None; with one,
        #: each batch is sketched for the drift monitor where its pixels are decoded
        self.profile = profile
        self.sketcher = profile.sketcher() if profile is not None else None
        self.sketch_share = SKETCH_SHARE
        self.sketch_seconds = 0.0  # spent sketching so far
        self._sketch_credit = SKETCH_BURST  # seconds of sketching it may spend now
        self._sketch_clock: float | None = None
        self._rng = np.random.default_rng()
        self.decoder = Decoder(input_format, runner.n_features)
        self.encoder = make_encoder(output_format, runner.classes)
        self.stage_names = ["decode", *runner.stage_names, "encode"]
        self.worker = worker
        self._label_text = [str(c) for c in runner.classes]
        self._label_codes = {text: i for i, text in enumerate(self._label_text)}
        #: the classes as sorted int64 values and their indices, when every class is an
        #: integer (an int label then names class c exactly when it equals c)
        self._int_classes = _int_classes(runner.classes)

    @classmethod
    def build(cls, pipeline, options: FlowOptions, profile=None) -> Flow:
        """The flow that serves a fitted ``pipeline`` with ``options``; ``profile``, the
        model's reference profile, if it has one (sketched for unless ``options.drift`` is
        off)."""
        # start-up time: scikit-learn's helpers load only when a flow is built
        from digitstream.model.runner import make_runner

        runner = make_runner(pipeline, compile=options.compile_model)
        return cls(
            runner,
            options.input_format,
            options.output_format,
            worker=options.worker,
            profile=profile if options.drift else None,
            predictions=options.predictions,
        )

    def process(self, batch: Batch) -> BatchResult:
        """The answer to every frame of ``batch``, whatever a stage does (see the module doc)."""
        try:
            return self._process(batch)
        except StageFailed as failure:
            if len(batch) == 1:
                return self.failed(batch, str(failure), failure.ids)
            middle = len(batch) // 2
            return self.process(batch.part(0, middle)).then(
                self.process(batch.part(middle, len(batch)))
            )

    def failed(self, batch: Batch, reason: str, ids: list | None = None) -> BatchResult:
        """Every frame of ``batch`` answered with the error ``reason`` (and its id, if known)."""
        n = len(batch)
        result = BatchResult(
            stream=batch.stream,
            first_seq=batch.first_seq,
            count=n,
            output=self.encoder.error_frames(batch.first_seq, n, reason, ids),
            stage_seconds=[],
            class_counts=np.zeros(len(self._label_text), dtype=np.int64),
            rejected=Counter({reason_kind(reason): n}),
            worker=self.worker,
        )
        if self.predictions:
            result.predicted = np.full(n, -1, dtype=np.int32)
            result.true = np.full(n, -1, dtype=np.int32)
            result.ids = ids
        return result

    def _process(self, batch: Batch) -> BatchResult:
        clock = time.perf_counter
        t0 = clock()
        try:
            decoded = self.decoder.decode(batch.payloads)
        except Exception as exc:
            raise StageFailed("decode", exc) from exc
        t1 = clock()
        try:
            prediction = self.runner.predict(
                decoded.X,
                want_confidence=self.encoder.wants_confidence,
                max_abs=self.decoder.max_abs,
            )
        except Exception as exc:
            raise StageFailed("model", exc, decoded.ids) from exc
        t2 = clock()
        errors = decoded.errors
        try:
            output = self.encoder.encode(
                batch.first_seq, prediction.class_index, prediction.confidence, errors, decoded.ids
            )
        except Exception as exc:
            raise StageFailed("encode", exc, decoded.ids) from exc
        t3 = clock()

        class_index = prediction.class_index
        rejected: Counter = Counter()
        if errors:
            rejected.update(reason_kind(r) for r in errors.values())
            keep = np.ones(len(class_index), dtype=bool)
            keep[list(errors)] = False
            counts = np.bincount(class_index[keep], minlength=len(self._label_text))
        else:
            counts = np.bincount(class_index, minlength=len(self._label_text))
        result = BatchResult(
            stream=batch.stream,
            first_seq=batch.first_seq,
            count=len(batch),
            output=output,
            stage_seconds=[("decode", t1 - t0), *prediction.stage_seconds, ("encode", t3 - t2)],
            class_counts=counts,
            rejected=rejected,
            worker=self.worker,
        )
        true = None
        if decoded.labels is not None:
            true = self._score(result, decoded.labels, class_index, errors)
        if self.predictions:
            predicted = class_index.astype(np.int32)
            if errors:
                predicted[list(errors)] = -1
            result.predicted = predicted
            result.true = true.astype(np.int32) if true is not None else None
            result.ids = decoded.ids
        if self.sketcher is not None and self._sketch_due(t3):
            self._sketch(result, decoded.X, errors, prediction.confidence)
            spent = clock() - t3
            self._sketch_credit -= spent
            self.sketch_seconds += spent
        return result

    def _sketch_due(self, now: float) -> bool:
        """Whether the sketch budget (SKETCH_SHARE of the time) allows one now."""
        last, self._sketch_clock = self._sketch_clock, now
        if last is not None:
            earned = (now - last) * self.sketch_share
            self._sketch_credit = min(self._sketch_credit + earned, SKETCH_BURST)
        return self._sketch_credit > 0

    def _sketch(
        self,
        result: BatchResult,
        X: np.ndarray,
        errors: dict[int, str],
        confidence: np.ndarray | None,
    ) -> None:
        """The batch's sample for the drift monitor (digitstream.monitor.sketch), on
        ``result``; the winning probabilities of the sampled rows are computed for them
        alone when the output did not need them."""
        sketcher = self.sketcher
        assert sketcher is not None
        rows = sketcher.rows(len(X), errors, self._rng)
        if not len(rows):
            return
        sample = X[rows]
        result.sampled = len(rows)
        result.feature_counts = sketcher.feature_counts(sample)
        if sketcher.confidence_edges is not None:
            if confidence is None:
                confidence = self.runner.winning_probability(sample)
            else:
                confidence = confidence[rows]
            if confidence is not None:
                result.confidence_counts = sketcher.confidence_counts(confidence)

    def _score(
        self, result: BatchResult, labels: list, class_index: np.ndarray, errors: dict[int, str]
    ) -> np.ndarray:
        """Live accuracy: the labelled frames of the batch, and their (true, predicted)
        label texts counted; a true label is ``str(label)``, or ``OTHER_LABEL`` when the
        model has no such class. Returns the true labels' codes (see :meth:`true_codes`;
        -1 for a rejected frame too)."""
        texts = self._label_text
        k = len(texts)  # also the code of OTHER_LABEL
        true = self.true_codes(labels)
        if errors:
            true[list(errors)] = -1
        scored = true >= 0
        # rows: true label code (OTHER_LABEL last), columns: predicted class
        matrix = np.bincount(true[scored] * k + class_index[scored], minlength=(k + 1) * k)
        matrix = matrix.reshape(k + 1, k)
        confusion: Counter = Counter()
        for t, p in np.argwhere(matrix).tolist():
            confusion[(texts[t] if t < k else OTHER_LABEL, texts[p])] = int(matrix[t, p])
        result.labelled = int(scored.sum())
        result.correct = int(np.trace(matrix))
        result.confusion = confusion
        return true

    def true_codes(self, labels: list) -> np.ndarray:
        """Per frame: the index of its label's class, ``len(classes)`` for a label the
        model has no class for, -1 for none."""
        other = len(self._label_text)
        if self._int_classes is not None and set(map(type, labels)) == {int}:
            values = np.array(labels)
            if values.dtype.kind == "i":  # else an int beyond int64: the general case
                classes, order = self._int_classes
                at = np.searchsorted(classes, values).clip(0, len(classes) - 1)
                return np.where(classes[at] == values, order[at], other)
        codes = self._label_codes
        return np.fromiter(
            (-1 if label is None else codes.get(str(label), other) for label in labels),
            dtype=np.int64,
            count=len(labels),
        )
