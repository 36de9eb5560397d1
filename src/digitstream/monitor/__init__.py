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

from digitstream.monitor.drift import DriftMonitor, disabled

log = logging.getLogger("digitstream.monitor")

__all__ = ["Monitor"]


class Monitor:
    """The model monitor of one run, starting with the ``profile`` of the model serving (the
    flow's: None without one, or with ``run --no-drift``, which ``drift`` says);
    ``window_messages`` and ``window_seconds`` bound the drift window."""

    def __init__(
        self,
        profile=None,
        drift: bool = True,
        window_messages: int = 20_000,
        window_seconds: float = 60.0,
    ):
        self.drift_on = drift
        self.window_messages = window_messages
        self.window_seconds = window_seconds
        self._profile = profile
        self.drift: DriftMonitor | None = None
        self._judge_against(profile)

    def batch_done(self, result, flow) -> None:
        """A served batch's result, and the flow that served it."""
        if flow.profile is not self._profile:
            log.info("the model serving changed: drift windows start again against its profile")
            self._judge_against(flow.profile)
        if self.drift is not None:
            self.drift.add(result)

    def _judge_against(self, profile) -> None:
        self._profile = profile
        self.drift = (
            None
            if profile is None
            else DriftMonitor(profile, self.window_messages, self.window_seconds)
        )

    def report(self) -> dict:
        """What ``/api/stats`` and ``/metrics`` show of the monitor."""
        if self.drift is None:
            reason = (
                "off (run --no-drift)"
                if not self.drift_on
                else "the model has no reference profile: `digitstream profile --model PATH "
                "--dataset SPEC` adds one"
            )
            return {"drift": disabled(reason), "estimated_accuracy": None}
        return {"drift": self.drift.report(), "estimated_accuracy": self.drift.estimated_accuracy}
