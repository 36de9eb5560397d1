"""What the application measures, recorded once per batch.

The application's wiring calls :meth:`Metrics.frames_received` once per batch as it
comes from the source and :meth:`Metrics.batch_done` once per batch as its results go
to the sink (the TCP source adds the connection counts); a batch's latency is attributed
to every message in it (``n`` observations at once), so the cost does not grow
with the number of messages. Readers (the metrics server, the Prometheus
collector) take a :meth:`Metrics.snapshot`, a consistent copy, once per request.

Latency histograms have fixed log-scale buckets, 48 per decade (each ~4.9%
wide) from 1 microsecond to 10 seconds, so p99.9 is known to within a few
percent anywhere in that range, and histograms of different workers add up.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np

BUCKETS_PER_DECADE = 48
#: upper bounds (inclusive, as Prometheus' ``le``) of the latency buckets, in seconds;
#: one more bucket past the last holds everything slower than 10 s
LATENCY_EDGES: tuple[float, ...] = tuple(
    float(f"{10.0 ** (k / BUCKETS_PER_DECADE - 6):.6g}") for k in range(7 * BUCKETS_PER_DECADE + 1)
)
#: upper bounds of the batch-size buckets: powers of two, then everything larger
BATCH_SIZE_EDGES: tuple[int, ...] = tuple(1 << k for k in range(21))
#: how many per-second samples the throughput history keeps (ten minutes)
HISTORY_SECONDS = 600
#: batches whose class counts wait to be summed together (see Metrics.batch_done)
FOLD_BATCHES = 256
#: the stage name of whole-message latency, from a frame complete to its result written
END_TO_END = "end_to_end"

QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("p99_9", 0.999))


class Histogram:
    """Latency observations counted per log-scale bucket of :data:`LATENCY_EDGES`."""

    __slots__ = ("count", "counts", "max", "sum")

    def __init__(self):
        self.counts = [0] * (len(LATENCY_EDGES) + 1)
        self.count = 0
        self.sum = 0.0
        self.max = 0.0

    def observe(self, seconds: float, n: int = 1) -> None:
        """Add ``n`` observations of ``seconds`` (a batch's time, shared by its messages)."""
        self.counts[bisect_left(LATENCY_EDGES, seconds)] += n
        self.count += n
        self.sum += seconds * n
        if seconds > self.max:
            self.max = seconds

    def copy(self) -> Histogram:
        other = Histogram()
        other.counts = self.counts.copy()
        other.count, other.sum, other.max = self.count, self.sum, self.max
        return other

    def add(self, other: Histogram) -> Histogram:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.count += other.count
        self.sum += other.sum
        self.max = max(self.max, other.max)
        return self

    def minus(self, earlier: Histogram) -> Histogram:
        """The observations made since ``earlier`` (a copy of this histogram); max is not known."""
        diff = Histogram()
        diff.counts = [a - b for a, b in zip(self.counts, earlier.counts)]
        diff.count = self.count - earlier.count
        diff.sum = self.sum - earlier.sum
        return diff

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile in seconds, interpolated on the log scale within its bucket."""
        return self.quantiles((q,))[0]

    def quantiles(self, qs) -> list[float | None]:
        """:meth:`quantile` for each of ``qs``, with one pass over the buckets."""
        if self.count == 0:
            return [None] * len(qs)
        cumulative = list(accumulate(self.counts))
        out = []
        for q in qs:
            rank = q * self.count
            index = min(bisect_left(cumulative, rank), len(cumulative) - 1)
            if index >= len(LATENCY_EDGES):
                out.append(max(self.max, LATENCY_EDGES[-1]))
                continue
            in_bucket = self.counts[index]
            below = cumulative[index] - in_bucket
            upper = LATENCY_EDGES[index]
            lower = LATENCY_EDGES[index - 1] if index else upper / _BUCKET_RATIO
            fraction = min(max((rank - below) / in_bucket, 0.0), 1.0) if in_bucket else 1.0
            value = lower * (upper / lower) ** fraction
            # an interpolated value past the largest one seen would be invented
            out.append(min(value, self.max) if self.max else value)
        return out

    def summary(self) -> dict:
        """``count``, ``mean``, ``max`` and the :data:`QUANTILES`, in seconds (None when empty)."""
        out = {
            "count": self.count,
            "mean": self.sum / self.count if self.count else None,
            "max": self.max if self.count else None,
        }
        out.update(zip((name for name, _ in QUANTILES), self.quantiles([q for _, q in QUANTILES])))
        return out


_BUCKET_RATIO = 10.0 ** (1 / BUCKETS_PER_DECADE)


def _round_time(seconds: float | None) -> float | None:
    return None if seconds is None else float(f"{seconds:.4g}")


class WorkerStats:
    """What one worker (the application itself, or a Dask worker) did."""

    __slots__ = (
        "batch_sizes",
        "batches",
        "joined_at",
        "latency",
        "lost_at",
        "messages",
        "name",
        "stages",
        "state",
    )

    def __init__(self, name: str, joined_at: float):
        self.name = name
        self.state = "active"
        self.joined_at = joined_at
        self.lost_at: float | None = None
        self.messages = 0
        self.batches = 0
        self.latency = Histogram()
        self.stages: dict[str, Histogram] = {}
        self.batch_sizes = [0] * (len(BATCH_SIZE_EDGES) + 1)

    def copy(self) -> WorkerStats:
        other = WorkerStats(self.name, self.joined_at)
        other.state, other.lost_at = self.state, self.lost_at
        other.messages, other.batches = self.messages, self.batches
        other.latency = self.latency.copy()
        other.stages = {k: h.copy() for k, h in self.stages.items()}
        other.batch_sizes = self.batch_sizes.copy()
        return other


@dataclass
class Sample:
    """One second of the throughput history: rates over the second that ended at ``t``."""

    t: float
    messages_in: float
    messages_out: float
    bytes_in: float
    bytes_out: float
    rejected: float
    latency_p50: float | None
    latency_p99: float | None
    workers: dict[str, float]


@dataclass
class Snapshot:
    """A consistent copy of every measurement, taken under the lock."""

    name: str
    taken_at: float
    started_at: float
    ready: bool
    status: str
    stage_names: list[str]
    classes: list[str]
    messages_in: int
    messages_out: int
    bytes_in: int
    bytes_out: int
    batches: int
    rejected: dict[str, int]
    connections_open: int
    connections_total: int
    connection_errors: dict[str, int]
    class_counts: list[int]
    labelled: int
    correct: int
    confusion: dict[tuple[str, str], int]
    workers: list[WorkerStats]
    worker_events: list[dict]
    history: list[Sample] = field(default_factory=list)
    model_swaps: list[dict] = field(default_factory=list)
    model_swaps_total: int = 0
    model_swaps_refused: int = 0
    swap_refusals: list[dict] = field(default_factory=list)
    #: role (``source``, ``sink``) -> what a connector that counts reports (see
    #: :attr:`Metrics.connectors`)
    connectors: dict[str, dict] = field(default_factory=dict)
    #: what the model monitor reports (see :attr:`Metrics.monitor`): ``drift``,
    #: ``estimated_accuracy``; empty without one
    monitor: dict = field(default_factory=dict)

    @property
    def last_swap_refused(self) -> dict | None:
        """The last refusal, ``{time, reason}``; None until one."""
        return self.swap_refusals[-1] if self.swap_refusals else None

    def latency(self) -> Histogram:
        """End-to-end latency of all workers together."""
        total = Histogram()
        for w in self.workers:
            total.add(w.latency)
        return total

    def stages(self) -> dict[str, Histogram]:
        """Per-stage latency of all workers together, in pipeline order."""
        out: dict[str, Histogram] = {}
        for stage in self.stage_names:
            out[stage] = Histogram()
        for w in self.workers:
            for stage, hist in w.stages.items():
                out.setdefault(stage, Histogram()).add(hist)
        return out

    def batch_sizes(self) -> list[int]:
        return [sum(column) for column in zip(*(w.batch_sizes for w in self.workers))] or [0] * (
            len(BATCH_SIZE_EDGES) + 1
        )


class Metrics:
    """Counters and histograms for one application process (``name``).

    ``stage_names`` are the pipeline's stages in order (decode, the model's
    steps or its fused kernel, encode); ``classes`` the model's class labels.
    """

    def __init__(self, name: str = "worker-1", stage_names=(), classes=(), clock=time.time):
        self.name = name
        self.stage_names = list(stage_names)
        self.classes = [str(c) for c in classes]
        self._clock = clock
        self._lock = threading.Lock()
        self.started_at = clock()
        self._ready = False
        self._stopping = False
        self.messages_in = 0
        self.bytes_in = 0
        self.messages_out = 0
        self.bytes_out = 0
        self.batches = 0
        self.rejected: Counter = Counter()
        self.connections_open = 0
        self.connections_total = 0
        self.connection_errors: Counter = Counter()
        self._class_counts = np.zeros(len(self.classes), dtype=np.int64)
        self._pending_class_counts: list[np.ndarray] = []
        self.labelled = 0
        self.correct = 0
        self.confusion: Counter = Counter()
        self._workers: dict[str, WorkerStats] = {}
        self._events: deque = deque(maxlen=100)
        self._swaps: deque = deque(maxlen=100)
        self._swaps_total = 0
        self._refused_total = 0
        self._refusals: deque = deque(maxlen=100)
        self._history: deque[Sample] = deque(maxlen=HISTORY_SECONDS)
        self._last_sample: tuple | None = None
        #: role (``source``, ``sink``) -> a connector's ``counters()``: ``{connector, where,
        #: counters: {event: total}, gauges: {name: now}}``, read at each snapshot
        self.connectors: dict[str, Callable[[], dict | None]] = {}
        #: the model monitor's report (digitstream.monitor.Monitor.report), read at each
        #: snapshot
        self.monitor: Callable[[], dict] | None = None

    # ------------------------------------------------ called by the application
    @property
    def ready(self) -> bool:
        """Set once the model is loaded and the source listens, cleared when stopping."""
        return self._ready

    @ready.setter
    def ready(self, value: bool) -> None:
        if self._ready and not value:
            self._stopping = True
        self._ready = bool(value)

    @property
    def status(self) -> str:
        """``"starting"``, ``"ready"`` or ``"stopping"``."""
        return "ready" if self._ready else ("stopping" if self._stopping else "starting")

    def connection_opened(self) -> None:
        self.connections_open += 1
        self.connections_total += 1

    def connection_closed(self) -> None:
        self.connections_open -= 1

    def connection_error(self, kind: str) -> None:
        """A connection ended badly: ``kind`` is e.g. ``frame_too_large``, ``partial_frame``."""
        self.connection_errors[kind] += 1

    def frames_received(self, n: int, nbytes: int) -> None:
        self.messages_in += n
        self.bytes_in += nbytes

    def batch_done(self, result, latency_seconds: float) -> None:
        """A batch's results were written: ``latency_seconds`` from its frames complete.

        ``result`` is a :class:`~digitstream.pipeline.BatchResult`; its
        ``worker`` names who computed it (the application's own name if empty).
        """
        n = result.count
        worker_name = result.worker or self.name
        with self._lock:
            worker = self._workers.get(worker_name)
            if worker is None:
                worker = self._join(worker_name)
            worker.messages += n
            worker.batches += 1
            worker.batch_sizes[bisect_left(BATCH_SIZE_EDGES, n)] += 1
            worker.latency.observe(latency_seconds, n)
            stages = worker.stages
            for stage, seconds in result.stage_seconds:
                hist = stages.get(stage)
                if hist is None:
                    hist = stages[stage] = Histogram()
                hist.observe(seconds, n)
            self.messages_out += n
            self.bytes_out += len(result.output)
            self.batches += 1
            if result.rejected:
                self.rejected.update(result.rejected)
            # summed FOLD_BATCHES at a time: cheaper than an add per batch, and quick enough
            # not to hold up the event loop (as a second's worth at once did)
            pending = self._pending_class_counts
            pending.append(result.class_counts)
            if len(pending) >= FOLD_BATCHES:
                self._fold_class_counts()
            if result.labelled:
                self.labelled += result.labelled
                self.correct += result.correct
                if result.confusion:
                    self.confusion.update(result.confusion)

    def labels_joined(self, labelled: int, correct: int, confusion: Counter) -> None:
        """Labels that arrived after their inputs (``run --labels``), joined to the answers
        given: counted in the live accuracy as inline labels are."""
        with self._lock:
            self.labelled += labelled
            self.correct += correct
            self.confusion.update(confusion)

    def worker_event(self, name: str, event: str) -> None:
        """A worker ``"joined"`` or was ``"lost"`` (engines that have workers call this)."""
        with self._lock:
            worker = self._workers.get(name)
            if event == "joined":
                if worker is None:
                    self._join(name)
                else:
                    worker.state, worker.lost_at = "active", None
                    self._events.append({"time": self._clock(), "worker": name, "event": "joined"})
            else:
                if worker is None:
                    worker = self._join(name)
                worker.state, worker.lost_at = event, self._clock()
                self._events.append({"time": worker.lost_at, "worker": name, "event": event})

    def model_swapped(
        self, when: float, old_hash: str, new_hash: str, at: dict[int, int], stage_names
    ) -> None:
        """A new model serves from ``at`` (connection id -> first sequence number it answers)."""
        with self._lock:
            self.stage_names = list(stage_names)
            self._swaps_total += 1
            self._swaps.append(
                {
                    "time": when,
                    "old_hash": old_hash,
                    "new_hash": new_hash,
                    "at": {str(conn): seq for conn, seq in at.items()},
                }
            )

    def model_swap_refused(self, when: float, reason: str) -> None:
        """A bundle found at the model path was not swapped in; the old model serves on."""
        with self._lock:
            self._refused_total += 1
            self._refusals.append({"time": when, "reason": reason})

    def _join(self, name: str) -> WorkerStats:
        now = self._clock()
        worker = self._workers[name] = WorkerStats(name, now)
        self._events.append({"time": now, "worker": name, "event": "joined"})
        return worker

    # ------------------------------------------------------------ for readers
    @property
    def class_counts(self) -> np.ndarray:
        """Predictions per class so far (rejected inputs excluded)."""
        with self._lock:
            return self._fold_class_counts().copy()

    def _fold_class_counts(self) -> np.ndarray:
        pending, self._pending_class_counts = self._pending_class_counts, []
        width = len(self._class_counts)
        pending = [counts for counts in pending if len(counts) == width]
        if pending:
            rows = np.concatenate(pending).reshape(len(pending), width)
            self._class_counts += rows.sum(axis=0, dtype=np.int64)
        return self._class_counts

    def sample(self) -> Sample | None:
        """Close one interval of the throughput history; call it about once a second."""
        now = self._clock()
        with self._lock:
            latency = Histogram()
            for w in self._workers.values():
                latency.add(w.latency)
            totals = (
                now,
                self.messages_in,
                self.messages_out,
                self.bytes_in,
                self.bytes_out,
                sum(self.rejected.values()),
                latency,
                {name: w.messages for name, w in self._workers.items()},
            )
        last, self._last_sample = self._last_sample, totals
        if last is None:
            return None
        elapsed = now - last[0]
        if elapsed <= 0:
            return None
        p50, p99 = totals[6].minus(last[6]).quantiles((0.5, 0.99))
        # rounded once here, as every poll of /api/stats sends the whole history
        sample = Sample(
            t=round(now, 3),
            messages_in=round((totals[1] - last[1]) / elapsed, 1),
            messages_out=round((totals[2] - last[2]) / elapsed, 1),
            bytes_in=round((totals[3] - last[3]) / elapsed),
            bytes_out=round((totals[4] - last[4]) / elapsed),
            rejected=round((totals[5] - last[5]) / elapsed, 1),
            latency_p50=_round_time(p50),
            latency_p99=_round_time(p99),
            workers={
                name: round((count - last[7].get(name, 0)) / elapsed, 1)
                for name, count in totals[7].items()
            },
        )
        with self._lock:
            self._history.append(sample)
        return sample

    def snapshot(self, history: bool = True) -> Snapshot:
        with self._lock:
            return Snapshot(
                name=self.name,
                taken_at=self._clock(),
                started_at=self.started_at,
                ready=self._ready,
                status=self.status,
                stage_names=list(self.stage_names),
                classes=list(self.classes),
                messages_in=self.messages_in,
                messages_out=self.messages_out,
                bytes_in=self.bytes_in,
                bytes_out=self.bytes_out,
                batches=self.batches,
                rejected=dict(self.rejected),
                connections_open=self.connections_open,
                connections_total=self.connections_total,
                connection_errors=dict(self.connection_errors),
                class_counts=self._fold_class_counts().tolist(),
                labelled=self.labelled,
                correct=self.correct,
                confusion=dict(self.confusion),
                workers=[w.copy() for w in self._workers.values()],
                worker_events=list(self._events),
                history=list(self._history) if history else [],
                model_swaps=list(self._swaps),
                model_swaps_total=self._swaps_total,
                model_swaps_refused=self._refused_total,
                swap_refusals=[dict(r) for r in self._refusals],
                connectors={
                    role: report
                    for role, counters in self.connectors.items()
                    if (report := counters()) is not None
                },
                monitor=self.monitor() if self.monitor is not None else {},
            )
