"""What travels through the application: batches of frames, their results, and receipts.

A leaf: it imports no codec, no connector and no engine, so that a connector
can name these types without loading the decoders.

A :class:`Receipt` is how a source learns that what it read is safe: the source
puts one on each batch it makes, the application moves it to the batch's
result, and the sink, once the result is delivered (written to a socket,
committed to a broker, acknowledged by a listener), hands it back with
:meth:`Receipt.delivered`, which calls the source's ``acknowledge``. A
connector whose sink and source cooperate (a broker's sink that commits
results and acknowledges their inputs in one step) subclasses the receipt to
carry what the sink needs, and says on it that the acknowledgement is done.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from digitstream.wire.framing import Payloads

#: a stream's name: a TCP connection's number, or a stream named by its sender
StreamId = int | str


class Acknowledges(Protocol):
    """What a receipt goes back to: a source."""

    def acknowledge(self, receipt: Receipt) -> None: ...


class Receipt:
    """Frames ``first_seq`` up to ``end_seq`` of ``stream``, read by ``source``; see the
    module doc. ``settled`` is set by a sink that acknowledged the inputs itself (in the
    same transaction as their results), so the source has nothing left to do for them."""

    __slots__ = ("end_seq", "first_seq", "settled", "source", "stream")

    def __init__(self, source: Acknowledges, stream: StreamId, first_seq: int, end_seq: int):
        self.source = source
        self.stream = stream
        self.first_seq = first_seq
        self.end_seq = end_seq
        self.settled = False

    def __len__(self) -> int:
        return self.end_seq - self.first_seq

    def delivered(self) -> None:
        """The batch's results are safely delivered: tell the source."""
        self.source.acknowledge(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.stream!r}, {self.first_seq}..{self.end_seq})"


@dataclass
class Batch:
    """Consecutive frames of one stream: frame ``first_seq + i`` is ``payloads[i]``."""

    stream: StreamId
    first_seq: int
    payloads: Payloads
    received_ns: int = 0  # time.perf_counter_ns() when the last frame of the batch was complete
    #: what goes back to the source once the batch's results are delivered (None: nothing);
    #: it stays in the application process and goes with the batch's result to the sink
    receipt: Receipt | None = None

    def __len__(self) -> int:
        return len(self.payloads)

    @property
    def end_seq(self) -> int:
        """The sequence number after the batch's last frame."""
        return self.first_seq + len(self.payloads)

    def part(self, start: int, stop: int) -> Batch:
        """Frames ``start:stop`` of the batch, as a batch of their own (without the receipt,
        which stays with the whole)."""
        return Batch(
            self.stream, self.first_seq + start, self.payloads.slice(start, stop), self.received_ns
        )


@dataclass
class BatchResult:
    """The answer to a :class:`Batch`: one result frame per input frame, in order."""

    stream: StreamId
    first_seq: int
    count: int
    output: bytes
    stage_seconds: list[tuple[str, float]]
    class_counts: np.ndarray  # (n_classes,) predictions per class, rejected inputs excluded
    rejected: Counter = field(default_factory=Counter)  # reason kind -> count
    worker: str = ""
    labelled: int = 0  # inputs that carried a true label
    correct: int = 0  # ... of which were classified as labelled
    #: (true, predicted) label texts -> frames, over the labelled frames
    confusion: Counter | None = None
    #: the batch's receipt, set by the application before the result goes to the sink
    receipt: Receipt | None = None
    #: for the model monitor (digitstream.monitor.sketch): rows of the batch sampled, how
    #: many of them fell in each bin of each feature ((n_features * bins,) int32), and in
    #: each bin of the winning probability; None when the flow does not sketch
    sampled: int = 0
    feature_counts: np.ndarray | None = None
    confidence_counts: np.ndarray | None = None
    #: per message, when the flow is asked for them (late labels, a shadow model): its
    #: predicted class's index (-1: rejected), its true label's code (the class's index, the
    #: number of classes for a label the model has no class for, -1 for none) and its id
    #: (None where it had none, or the list is None: a format without ids)
    predicted: np.ndarray | None = None
    true: np.ndarray | None = None
    ids: list | None = None

    @property
    def end_seq(self) -> int:
        return self.first_seq + self.count

    def then(self, later: BatchResult) -> BatchResult:
        """This result followed by ``later``, the answer to the frames right after it."""
        times = dict(self.stage_seconds)
        for name, seconds in later.stage_seconds:
            times[name] = times.get(name, 0.0) + seconds
        confusion = None
        if self.confusion is not None or later.confusion is not None:
            confusion = Counter(self.confusion or ()) + Counter(later.confusion or ())
        return BatchResult(
            stream=self.stream,
            first_seq=self.first_seq,
            count=self.count + later.count,
            output=self.output + later.output,
            stage_seconds=list(times.items()),
            class_counts=self.class_counts + later.class_counts,
            rejected=self.rejected + later.rejected,
            worker=self.worker or later.worker,
            labelled=self.labelled + later.labelled,
            correct=self.correct + later.correct,
            confusion=confusion,
            sampled=self.sampled + later.sampled,
            feature_counts=_summed(self.feature_counts, later.feature_counts),
            confidence_counts=_summed(self.confidence_counts, later.confidence_counts),
            predicted=_joined(self.predicted, later.predicted, self.count, later.count),
            true=_joined(self.true, later.true, self.count, later.count),
            ids=(
                None
                if self.ids is None and later.ids is None
                else (self.ids or [None] * self.count) + (later.ids or [None] * later.count)
            ),
        )


def _joined(a: np.ndarray | None, b: np.ndarray | None, n_a: int, n_b: int) -> np.ndarray | None:
    """Per-message codes of two consecutive results, -1 where one had none."""
    if a is None and b is None:
        return None
    return np.concatenate(
        [a if a is not None else np.full(n_a, -1), b if b is not None else np.full(n_b, -1)]
    )


def _summed(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None or b is None:
        return b if a is None else a
    return a + b
