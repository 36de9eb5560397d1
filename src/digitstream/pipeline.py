"""The whole pipeline in one place: wire -> decode -> stages -> encode -> wire.

:class:`Flow` is what every engine runs on a batch. It knows nothing of
sockets: it takes the payloads of consecutive frames of one connection and
returns the framed result bytes for them, in the same order, with the time
each stage took. The stages are the model's pipeline steps, named as the
model names them ("PCA", "Logistic Regression" for the seed's model).

::

    TCP source --frames--> decode --X--> PCA --> Logistic Regression --> encode --frames--> TCP sink
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from digitstream.codecs.inputs import Decoder, reason_kind
from digitstream.codecs.outputs import make_encoder
from digitstream.wire.framing import Payloads


@dataclass
class Batch:
    """Consecutive frames of one connection: frame ``first_seq + i`` is ``payloads[i]``."""

    conn_id: int
    first_seq: int
    payloads: Payloads
    received_ns: int  # time.perf_counter_ns() when the last frame of the batch was complete

    def __len__(self) -> int:
        return len(self.payloads)


@dataclass
class BatchResult:
    """The answer to a :class:`Batch`: one result frame per input frame, in order."""

    conn_id: int
    first_seq: int
    count: int
    output: bytes
    stage_seconds: list[tuple[str, float]]
    class_counts: np.ndarray  # (n_classes,) predictions per class, rejected inputs excluded
    rejected: Counter = field(default_factory=Counter)  # reason kind -> count
    worker: str = ""
    labelled: int = 0  # inputs that carried a true label
    correct: int = 0  # ... of which were classified as labelled
    confusion: list[tuple[str, str]] | None = None  # (true, predicted) label texts


class Flow:
    """Decode, classify and encode batches for one model and one pair of formats."""

    def __init__(self, runner, input_format: str, output_format: str, worker: str = ""):
        self.runner = runner
        self.decoder = Decoder(input_format, runner.n_features)
        self.encoder = make_encoder(output_format, runner.classes)
        self.stage_names = ["decode", *runner.stage_names, "encode"]
        self.worker = worker
        self._label_text = [str(c) for c in runner.classes]

    def process(self, batch: Batch) -> BatchResult:
        clock = time.perf_counter
        t0 = clock()
        decoded = self.decoder.decode(batch.payloads)
        t1 = clock()
        prediction = self.runner.predict(decoded.X, want_confidence=self.encoder.wants_confidence,
                                         max_abs=self.decoder.max_abs)
        t2 = clock()
        errors = decoded.errors
        output = self.encoder.encode(batch.first_seq, prediction.class_index, prediction.confidence,
                                     errors, decoded.ids)
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
            conn_id=batch.conn_id, first_seq=batch.first_seq, count=len(batch), output=output,
            stage_seconds=[("decode", t1 - t0), *prediction.stage_seconds, ("encode", t3 - t2)],
            class_counts=counts, rejected=rejected, worker=self.worker,
        )
        if decoded.labels is not None:
            self._score(result, decoded.labels, class_index, errors)
        return result

    def _score(self, result: BatchResult, labels: list, class_index: np.ndarray,
               errors: dict[int, str]) -> None:
        pairs = []
        for i, label in enumerate(labels):
            if label is None or i in errors:
                continue
            pairs.append((str(label), self._label_text[class_index[i]]))
        result.labelled = len(pairs)
        result.correct = sum(1 for t, p in pairs if t == p)
        result.confusion = pairs
