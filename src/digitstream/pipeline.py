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


@dataclass(frozen=True)
class FlowOptions:
    """How a model is served: the run's formats, fusing, and the worker's name in metrics."""

    input_format: str = "auto"
    output_format: str = "text"
    compile_model: bool = True
    worker: str = ""


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

    def __init__(self, runner, input_format: str, output_format: str, worker: str = ""):
        self.runner = runner
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
    def build(cls, pipeline, options: FlowOptions) -> Flow:
        """The flow that serves a fitted ``pipeline`` with ``options``."""
        # start-up time: scikit-learn's helpers load only when a flow is built
        from digitstream.model.runner import make_runner

        runner = make_runner(pipeline, compile=options.compile_model)
        return cls(runner, options.input_format, options.output_format, worker=options.worker)

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
        return BatchResult(
            stream=batch.stream,
            first_seq=batch.first_seq,
            count=n,
            output=self.encoder.error_frames(batch.first_seq, n, reason, ids),
            stage_seconds=[],
            class_counts=np.zeros(len(self._label_text), dtype=np.int64),
            rejected=Counter({reason_kind(reason): n}),
            worker=self.worker,
        )

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
        if decoded.labels is not None:
            self._score(result, decoded.labels, class_index, errors)
        return result

    def _score(
        self, result: BatchResult, labels: list, class_index: np.ndarray, errors: dict[int, str]
    ) -> None:
        """Live accuracy: the labelled frames of the batch, and their (true, predicted)
        label texts counted; a true label is ``str(label)``, or ``OTHER_LABEL`` when the
        model has no such class."""
        texts = self._label_text
        k = len(texts)  # also the code of OTHER_LABEL
        true = self._true_codes(labels)
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

    def _true_codes(self, labels: list) -> np.ndarray:
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
