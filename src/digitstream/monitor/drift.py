"""Drift, live: sliding windows of the served batches' sketches, judged against the profile.

The application hands each served batch's result to :meth:`DriftMonitor.add`. Its sketch
(:mod:`digitstream.monitor.sketch`) and its predicted classes go into the open *chunk*; a
chunk closes after 1/16 of the window's messages and of :data:`WINDOW_ROWS` sampled rows,
or of its seconds, and the window is the newest chunks holding at least ``window_messages``
messages and ``WINDOW_ROWS`` sampled rows (dropping older ones), none of them older than
``window_seconds``. So the window is whole chunks, its memory is about 17 chunks of
``n_features * bins`` counts whatever the rate, and a saturated run, which sketches fewer
of its batches, still judges on enough rows. The window is judged each time a chunk
closes, at most 20 times a second (and when read).

**Three tests, one verdict.** Each compares a histogram of the window with the profile's:

- *inputs*: per feature, the Jensen-Shannon distance between the sampled rows' histogram
  and the reference part's; the statistic is their mean over features (the per-feature
  distances are the ``features`` scores, the heat map);
- *classes*: the distance between the predicted classes of every message in the window and
  those on the held-out part;
- *confidence*: the distance between the sampled rows' winning probabilities and those on
  the held-out part.

A statistic's null (its mean and spread over windows of the same size drawn from the
held-out part, :class:`~digitstream.monitor.profile.NullCurve`) turns it into a score: how
many standard deviations above that mean it lies. The window's ``score`` is the largest of
the three; drift is detected when it passes ``threshold`` (the profile's ``z``, 5), and
clears when it falls below half that, so a borderline window does not flap. A window with
fewer than 50 sampled rows (or messages, for the classes) gives no verdict: the state
stays as it was.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from digitstream.monitor.distance import js_distance
from digitstream.monitor.profile import Profile

log = logging.getLogger("digitstream.monitor")

#: chunks per window
CHUNKS = 16
#: sampled rows a window holds at least (if its time allows)
WINDOW_ROWS = 1024
#: the shortest time between two verdicts
JUDGE_SECONDS = 0.05
#: evaluations of the score kept for the dashboard's chart
HISTORY = 600


@dataclass
class _Chunk:
    started: float
    ended: float
    features: np.ndarray
    classes: np.ndarray
    confidence: np.ndarray
    messages: int = 0
    rows: int = 0

    def add(self, other: _Chunk, sign: int = 1) -> None:
        self.features += sign * other.features
        self.classes += sign * other.classes
        self.confidence += sign * other.confidence
        self.messages += sign * other.messages
        self.rows += sign * other.rows


@dataclass
class _Verdict:
    score: float | None = None
    tests: dict = field(default_factory=dict)
    features: np.ndarray | None = None  # each feature's distance
    classes: float | None = None
    estimated_accuracy: float | None = None


class DriftMonitor:
    """Windows of served batches judged against ``profile``; see the module doc.

    ``clock`` gives Unix seconds (the time drift was first seen is reported in them).
    """

    def __init__(
        self,
        profile: Profile,
        window_messages: int = 20_000,
        window_seconds: float = 60.0,
        clock=time.time,
    ):
        self.profile = profile
        self.window_messages = window_messages
        self.window_seconds = window_seconds
        self._clock = clock
        self._chunk_messages = max(1, window_messages // CHUNKS)
        self._chunk_rows = WINDOW_ROWS // CHUNKS
        self._chunk_seconds = window_seconds / CHUNKS
        self._judged_at = -float("inf")
        d, bins = profile.reference.shape
        self._shape = (d * bins, len(profile.classes), _confidence_bins(profile))
        self._reference = profile.reference
        self._closed: deque[_Chunk] = deque()
        self._totals = self._empty(0.0)  # of the closed chunks
        self._open: _Chunk | None = None
        self._dirty = False
        self._closed_since_judged = False
        self._verdict = _Verdict()
        self.detected = False
        self.since: float | None = None
        self.episodes = 0
        self._history: deque[tuple[float, float | None]] = deque(maxlen=HISTORY)

    def _empty(self, now: float) -> _Chunk:
        size, k, m = self._shape
        return _Chunk(
            now,
            now,
            np.zeros(size, dtype=np.int64),
            np.zeros(k, dtype=np.int64),
            np.zeros(m, dtype=np.int64),
        )

    # ------------------------------------------------------------- feeding
    def add(self, result) -> None:
        """A served batch's :class:`~digitstream.batch.BatchResult` (sketched by a flow
        with this monitor's profile)."""
        now = self._clock()
        chunk = self._open
        if chunk is None:
            chunk = self._open = self._empty(now)
        messages = int(result.class_counts.sum())
        if len(result.class_counts) == len(chunk.classes):
            chunk.classes += result.class_counts
            chunk.messages += messages
        counts = result.feature_counts
        if counts is not None and len(counts) == len(chunk.features):
            chunk.features += counts
            chunk.rows += result.sampled
        confidence = result.confidence_counts
        if confidence is not None and len(confidence) == len(chunk.confidence):
            chunk.confidence += confidence
        chunk.ended = now
        self._dirty = True
        full = chunk.messages >= self._chunk_messages and chunk.rows >= self._chunk_rows
        if full or now - chunk.started >= self._chunk_seconds:
            self._close(now)
        if now - self._judged_at >= JUDGE_SECONDS and self._closed_since_judged:
            self._judge(now)

    def _close(self, now: float) -> None:
        chunk = self._open
        if chunk is not None:
            self._open = None
            self._closed.append(chunk)
            self._totals.add(chunk)
            self._closed_since_judged = True
        self._evict(now)

    def _evict(self, now: float) -> None:
        closed, totals = self._closed, self._totals
        open_messages = self._open.messages if self._open is not None else 0
        open_rows = self._open.rows if self._open is not None else 0
        while closed and (
            (
                totals.messages + open_messages - closed[0].messages >= self.window_messages
                and totals.rows + open_rows - closed[0].rows >= WINDOW_ROWS
            )
            or closed[0].ended < now - self.window_seconds
        ):
            totals.add(closed.popleft(), -1)
            self._dirty = True

    # ------------------------------------------------------------- judging
    def _window(self) -> _Chunk:
        window = self._empty(0.0)
        window.add(self._totals)
        if self._open is not None:
            window.add(self._open)
        return window

    def _judge(self, now: float) -> None:
        self._dirty = self._closed_since_judged = False
        self._judged_at = now
        profile = self.profile
        window = self._window()
        tests: dict[str, dict] = {}
        features = None
        if window.rows:
            features = js_distance(window.features.reshape(self._reference.shape), self._reference)
            tests["inputs"] = _test(
                float(features.mean()), window.rows, profile.input_null, profile.z
            )
        classes = None
        if window.messages:
            classes = float(js_distance(window.classes, profile.predicted))
            tests["classes"] = _test(classes, window.messages, profile.classes_null, profile.z)
        estimate = None
        confidence_rows = int(window.confidence.sum())
        if profile.confidence is not None and confidence_rows:
            estimate = profile.confidence.expected_accuracy(window.confidence)
            if profile.confidence_null is not None:
                statistic = float(js_distance(window.confidence, profile.confidence.counts))
                tests["confidence"] = _test(
                    statistic, confidence_rows, profile.confidence_null, profile.z
                )
        scores = [t["score"] for t in tests.values() if t["score"] is not None]
        score = max(scores) if scores else None
        self._verdict = _Verdict(
            score=score,
            tests=tests,
            features=features,
            classes=None if classes is None else round(classes, 4),
            estimated_accuracy=estimate,
        )
        self._history.append((round(now, 3), None if score is None else round(score, 3)))
        if score is None:
            return
        if not self.detected and score > profile.z:
            self.detected, self.since = True, now
            self.episodes += 1
            log.warning(
                "drift detected: score %.1f over the threshold %.1f (%s), in a window of %d "
                "messages; the features furthest from the reference: %s",
                score,
                profile.z,
                _said(tests),
                window.messages,
                _furthest(features),
            )
        elif self.detected and score < profile.z / 2:
            lasted = now - (self.since or now)
            self.detected, self.since = False, None
            log.info(
                "drift cleared after %.0f s: score %.1f, under half the threshold %.1f (%s)",
                lasted,
                score,
                profile.z,
                _said(tests),
            )

    # ------------------------------------------------------------- reading
    def report(self) -> dict:
        """The ``drift`` section of ``/api/stats`` (see :mod:`digitstream.metrics.stats`)."""
        now = self._clock()
        if self._open is not None and now - self._open.started >= self._chunk_seconds:
            self._close(now)
        else:
            self._evict(now)
        if self._dirty:
            self._judge(now)
        verdict = self._verdict
        window = self._window()
        return {
            "enabled": True,
            "detected": self.detected,
            "score": None if verdict.score is None else round(verdict.score, 3),
            "threshold": self.profile.z,
            "since": self.since,
            "features": [] if verdict.features is None else np.round(verdict.features, 4).tolist(),
            "classes": verdict.classes,
            "window": window.messages,
            "rows": window.rows,
            "tests": verdict.tests,
            "episodes": self.episodes,
            "limits": {"messages": self.window_messages, "seconds": self.window_seconds},
            "image": _image_shape(self.profile.n_features),
            "history": {
                "t": [t for t, _ in self._history],
                "score": [s for _, s in self._history],
            },
        }

    @property
    def estimated_accuracy(self) -> float | None:
        """The label-free estimate of accuracy over the window (None without calibration)."""
        value = self._verdict.estimated_accuracy
        return None if value is None else round(value, 4)


def disabled(reason: str) -> dict:
    """The ``drift`` section when nothing is judged, and why."""
    return {
        "enabled": False,
        "reason": reason,
        "detected": False,
        "score": None,
        "threshold": None,
        "since": None,
        "features": [],
        "classes": None,
        "window": 0,
    }


def _test(statistic: float, n: int, null, z: float) -> dict:
    score = null.z(statistic, n)
    threshold = null.threshold(n, z)
    return {
        "statistic": round(statistic, 5),
        "n": n,
        "threshold": None if threshold is None else round(threshold, 5),
        "score": None if score is None else round(score, 3),
    }


def _said(tests: dict) -> str:
    return ", ".join(
        f"{name} {t['score']:.1f}" for name, t in tests.items() if t["score"] is not None
    )


def _furthest(features: np.ndarray | None, most: int = 5) -> str:
    if features is None:
        return "none sampled"
    order = np.argsort(features)[::-1][:most]
    return ", ".join(f"{int(i)} ({features[int(i)]:.2f})" for i in order)


def _confidence_bins(profile: Profile) -> int:
    return 0 if profile.confidence is None else len(profile.confidence.counts)


def _image_shape(n_features: int) -> list[int] | None:
    """Height and width of a square image of ``n_features`` pixels (None if not square)."""
    side = math.isqrt(n_features)
    return [side, side] if side * side == n_features else None
