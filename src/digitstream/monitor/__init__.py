"""Watching the model while it serves: drift against its reference profile, and its
accuracy estimated without labels.

::

    Flow (wherever X is decoded)          the application process
    batch --sketch--> BatchResult  ---->  Monitor.batch_done --> DriftMonitor (windows, tests)
                                                                  |
                               /api/stats, /metrics, the log <----'

- :mod:`~digitstream.monitor.profile`: the reference profile a bundle holds, and how
  ``train`` and ``digitstream profile`` build it;
- :mod:`~digitstream.monitor.sketch`: what a flow measures of each batch (a sample, binned);
- :mod:`~digitstream.monitor.drift`: the windows and the tests;
- :class:`Monitor`: what the application wires in: one call per served batch, one report
  per read.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from digitstream.monitor.accuracy import AccuracyWatch
from digitstream.monitor.drift import DriftMonitor, disabled
from digitstream.monitor.labels import LabelJoin

if TYPE_CHECKING:
    from digitstream.monitor.shadow import Shadow

log = logging.getLogger("digitstream.monitor")

__all__ = ["Monitor"]

#: a true label the model has no class for, in the confusion matrix (as pipeline.OTHER_LABEL)
OTHER_LABEL = "(other)"


class Monitor:
    """The model monitor of one run, starting with the ``profile`` of the model serving (the
    flow's: None without one, or with ``run --no-drift``, which ``drift`` says);
    ``window_messages`` and ``window_seconds`` bound the drift window (and the latter the
    accuracy window). With ``labels`` (``run --labels``), predictions of inputs with ids
    await late labels, at most ``label_window`` of them. ``classes`` are the model's class
    labels; ``metrics``, if given, counts late labels in the live accuracy."""

    def __init__(
        self,
        profile=None,
        drift: bool = True,
        window_messages: int = 20_000,
        window_seconds: float = 60.0,
        classes=(),
        labels: bool = False,
        label_window: int = 100_000,
        metrics=None,
    ):
        self.drift_on = drift
        self.window_messages = window_messages
        self.window_seconds = window_seconds
        self.classes = [str(c) for c in classes]
        self.metrics = metrics
        self._profile = profile
        self.drift: DriftMonitor | None = None
        self._judge_against(profile)
        self.accuracy = AccuracyWatch(window_seconds)
        self.join = LabelJoin(self.classes, label_window) if labels else None
        self._invalid_logged = 0.0
        #: the shadow model (run --shadow), set by the application
        self.shadow: Shadow | None = None

    def batch_done(self, result, flow, batch=None) -> None:
        """A served batch's result, the flow that served it, and the batch (for the shadow
        model, if there is one)."""
        if flow.profile is not self._profile:
            log.info("the model serving changed: drift windows start again against its profile")
            self._judge_against(flow.profile)
        if self.drift is not None:
            self.drift.add(result)
        if result.labelled:
            self.accuracy.add(result.labelled, result.correct)
        if self.join is not None:
            self.join.predictions(result)
        if self.shadow is not None and batch is not None:
            self.shadow.offer(batch, result, flow)

    def labels_received(self, records: list) -> None:
        """Label records that arrived (``run --labels``): joined to their predictions and
        counted in the live accuracy."""
        join = self.join
        assert join is not None, "labels without run --labels"
        invalid = join.invalid
        matched = join.labels(records)
        if matched:
            true = np.fromiter((t for _, t, _ in matched), dtype=np.intp, count=len(matched))
            predicted = np.fromiter((p for _, _, p in matched), dtype=np.intp, count=len(matched))
            correct = int(np.count_nonzero(true == predicted))
            self.accuracy.add(len(matched), correct)
            if self.shadow is not None:
                self.shadow.labels_joined(matched)
            if self.metrics is not None:
                texts = [*self.classes, OTHER_LABEL]
                confusion = Counter(
                    (texts[t], texts[p]) for t, p in zip(true.tolist(), predicted.tolist())
                )
                self.metrics.labels_joined(len(matched), correct, confusion)
        if join.invalid > invalid:
            now = time.monotonic()
            if now - self._invalid_logged >= 10.0:  # a flood of them: one line every 10 s
                self._invalid_logged = now
                log.warning(
                    'label records that are not {"id": ..., "label": ...} are counted as '
                    "invalid (%d so far)",
                    join.invalid,
                )

    def _judge_against(self, profile) -> None:
        self._profile = profile
        self.drift = (
            None
            if profile is None
            else DriftMonitor(profile, self.window_messages, self.window_seconds)
        )

    def report(self) -> dict:
        """What ``/api/stats`` and ``/metrics`` show of the monitor: ``drift``,
        ``estimated_accuracy``, ``labels``, ``accuracy`` (the window and drops) and
        ``shadow``."""
        if self.join is not None:
            labels = {"enabled": True, **self.join.report()}
        else:
            labels = {
                "enabled": False,
                "received": 0,
                "matched": 0,
                "unknown": 0,
                "expired": 0,
                "pending": 0,
            }
        report = {
            "labels": labels,
            "accuracy": self.accuracy.report(),
            "shadow": self.shadow.report() if self.shadow is not None else None,
        }
        if self.drift is None:
            reason = (
                "off (run --no-drift)"
                if not self.drift_on
                else "the model has no reference profile: `digitstream profile --model PATH "
                "--dataset SPEC` adds one"
            )
            return {**report, "drift": disabled(reason), "estimated_accuracy": None}
        return {
            **report,
            "drift": self.drift.report(),
            "estimated_accuracy": self.drift.estimated_accuracy,
        }
