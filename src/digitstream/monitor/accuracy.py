"""Accuracy from labels, inline or late: over a time window, and a change detector on the
error rate.

Labels come in groups (a batch's inline labels, a read of late ones), each counted as
``(labelled, correct)``. The window is per-second buckets over the last ``window_seconds``.

**An accuracy drop** is flagged with two one-sided Page-Hinkley tests on the error rate (the
test River's ``PageHinkley`` makes, here on counts): with ``x`` each label's error (0 or 1)
and ``x̄`` their mean since the last change, ``m_up`` sums ``x - x̄ - δ`` and drops below its
lowest value only as errors become more frequent by more than ``δ``; the test fires when it
has risen ``λ`` above that lowest value. ``λ`` is set from the error rate itself:
``σ² ln(1/α) / (2δ)``, with ``σ² = x̄(1 - x̄)``: for a reflected random walk of drift ``-δ``
and variance ``σ²``, the chance of ever rising ``λ`` is ``α`` (``1e-6`` here), so a steady
error rate, high or low, raises no alarm. A drop starts after 100 labels at the earliest (a
WARNING line); the statistics then start again from the change point the test found, and
the mirror-image test (errors becoming rarer by more than ``δ``) clears it (an INFO line).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque

log = logging.getLogger("digitstream.monitor")

#: the smallest change of the error rate the tests look for (one point of accuracy)
DELTA = 0.01
#: the chance of a false alarm from one steady stretch
ALPHA = 1e-6
#: labels since the last change before a test may fire
WARM_UP = 100


class _PageHinkley:
    """Both one-sided tests on error counts since the last change (``labels`` and
    ``errors`` of which were seen before the test started: the new regime's first ones)."""

    def __init__(self, labels: int = 0, errors: int = 0) -> None:
        self.labels = labels
        self.errors = errors
        self.up = self.lowest = 0.0  # errors becoming more frequent
        self.down = self.highest = 0.0  # ... rarer
        # (labels, errors) where `up` was lowest and `down` highest: the change points
        self.at_lowest = self.at_highest = (0, 0)

    def add(self, labelled: int, errors: int) -> None:
        self.labels += labelled
        self.errors += errors
        mean = self.errors / self.labels
        self.up += errors - labelled * (mean + DELTA)
        self.down += errors - labelled * (mean - DELTA)
        if self.up < self.lowest:
            self.lowest, self.at_lowest = self.up, (self.labels, self.errors)
        if self.down > self.highest:
            self.highest, self.at_highest = self.down, (self.labels, self.errors)

    @property
    def threshold(self) -> float:
        mean = self.errors / self.labels if self.labels else 0.0
        variance = max(mean * (1 - mean), DELTA)
        return variance * math.log(1 / ALPHA) / (2 * DELTA)

    def rose(self) -> bool:
        return self.labels >= WARM_UP and self.up - self.lowest > self.threshold

    def fell(self) -> bool:
        return self.labels >= WARM_UP and self.highest - self.down > self.threshold

    def since_change(self, up: bool) -> tuple[int, int]:
        """(labels, errors) since the change the ``up`` (or down) test saw."""
        labels, errors = self.at_lowest if up else self.at_highest
        return self.labels - labels, self.errors - errors


class AccuracyWatch:
    """Accuracy over the last ``window_seconds`` and its drops; see the module doc."""

    def __init__(self, window_seconds: float = 60.0, clock=time.time):
        self.window_seconds = window_seconds
        self._clock = clock
        self._buckets: deque[list] = deque()  # [second, labelled, correct]
        self._test = _PageHinkley()
        self.detected = False
        self.since: float | None = None
        self.episodes = 0

    def add(self, labelled: int, correct: int) -> None:
        """``labelled`` labels arrived, ``correct`` of them for the answer given."""
        if labelled <= 0:
            return
        now = self._clock()
        second = int(now)
        buckets = self._buckets
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += labelled
            buckets[-1][2] += correct
        else:
            buckets.append([second, labelled, correct])
        self._evict(now)
        test = self._test
        before = test.errors / test.labels if test.labels else 0.0
        test.add(labelled, labelled - correct)
        if not self.detected and test.rose():
            recent, errors = test.since_change(up=True)
            self.detected, self.since = True, now
            self.episodes += 1
            log.warning(
                "accuracy drop detected: error rate %.3f over the last %d labels, %.3f before "
                "(Page-Hinkley on the error rate)",
                errors / recent if recent else 0.0,
                recent,
                before,
            )
            # the new regime starts at the change, with what was seen of it
            self._test = _PageHinkley(recent, errors)
        elif self.detected and test.fell():
            recent, errors = test.since_change(up=False)
            lasted = now - (self.since or now)
            self.detected, self.since = False, None
            log.info(
                "accuracy drop cleared after %.0f s: error rate %.3f over the last %d labels",
                lasted,
                errors / recent if recent else 0.0,
                recent,
            )
            self._test = _PageHinkley(recent, errors)

    def _evict(self, now: float) -> None:
        buckets = self._buckets
        while buckets and buckets[0][0] <= now - self.window_seconds:
            buckets.popleft()

    def report(self) -> dict:
        """``window`` (``labelled``, ``correct``, ``accuracy``, ``seconds``) and ``drop``
        (``detected``, ``since``, ``episodes``)."""
        self._evict(self._clock())
        labelled = sum(b[1] for b in self._buckets)
        correct = sum(b[2] for b in self._buckets)
        return {
            "window": {
                "labelled": labelled,
                "correct": correct,
                "accuracy": correct / labelled if labelled else None,
                "seconds": self.window_seconds,
            },
            "drop": {"detected": self.detected, "since": self.since, "episodes": self.episodes},
        }
