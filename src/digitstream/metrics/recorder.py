"""What the application measures, recorded once per batch.

The engine calls these methods; the metrics server (:mod:`digitstream.metrics.server`)
reads them. Every call is per batch or per connection, never per message, so
recording costs nothing measurable on the hot path.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np

#: latency histogram bucket edges: log scale, 1 microsecond to 10 seconds, ~5% apart
LATENCY_EDGES = np.logspace(-6, 1, 7 * 48 + 1)


class LatencyHistogram:
    """Counts of observations per log-scale bucket; each batch adds ``n`` observations."""

    def __init__(self):
        self.counts = np.zeros(len(LATENCY_EDGES) + 1, dtype=np.int64)
        self.total = 0
        self.sum = 0.0

    def observe(self, seconds: float, n: int = 1) -> None:
        self.counts[int(np.searchsorted(LATENCY_EDGES, seconds))] += n
        self.total += n
        self.sum += seconds * n

    def quantile(self, q: float) -> float | None:
        if self.total == 0:
            return None
        rank = q * self.total
        index = int(np.searchsorted(np.cumsum(self.counts), rank, side="left"))
        index = min(index, len(LATENCY_EDGES) - 1)
        return float(LATENCY_EDGES[index])


class Metrics:
    """Counters and histograms for one application process (``name``)."""

    def __init__(self, name: str = "worker-1", stage_names=(), classes=()):
        self.name = name
        self.lock = threading.Lock()
        self.started = time.time()
        self.stage_names = list(stage_names)
        self.classes = [str(c) for c in classes]
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_in = 0
        self.batches = 0
        self.rejected: Counter = Counter()
        self.connection_errors: Counter = Counter()
        self.connections_open = 0
        self.connections_total = 0
        self.class_counts = np.zeros(len(self.classes), dtype=np.int64)
        self.latency = LatencyHistogram()
        self.stage_latency: dict[str, LatencyHistogram] = {}
        self.worker_messages: Counter = Counter()
        self.labelled = 0
        self.correct = 0
        self.ready = False

    # ---- called by the application
    def connection_opened(self) -> None:
        self.connections_open += 1
        self.connections_total += 1

    def connection_closed(self) -> None:
        self.connections_open -= 1

    def connection_error(self, kind: str) -> None:
        self.connection_errors[kind] += 1

    def frames_received(self, n: int, nbytes: int) -> None:
        self.messages_in += n
        self.bytes_in += nbytes

    def batch_done(self, result, latency_seconds: float) -> None:
        n = result.count
        with self.lock:
            self.batches += 1
            self.messages_out += n
            self.latency.observe(latency_seconds, n)
            for stage, seconds in result.stage_seconds:
                hist = self.stage_latency.get(stage)
                if hist is None:
                    hist = self.stage_latency[stage] = LatencyHistogram()
                hist.observe(seconds, n)
            if result.rejected:
                self.rejected.update(result.rejected)
            if len(result.class_counts) == len(self.class_counts):
                self.class_counts += result.class_counts
            self.worker_messages[result.worker or self.name] += n
            self.labelled += result.labelled
            self.correct += result.correct
