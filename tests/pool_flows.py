"""Flows that misbehave in a worker process of the local engine's pool, for tests/test_pool.py.

The pool pickles its flow by reference to this module, so the worker processes
import it: the tests put this directory on their ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import signal
import time

from digitstream.pipeline import Flow

#: a payload that makes :class:`DyingFlow` kill the worker process classifying it
POISON = b"kill this worker"
#: a payload that :class:`StallingFlow` never finishes in a worker process
STALL = b"never answer this one"


class DyingFlow(Flow):
    """Killed by SIGKILL in any process but the test's own on a batch holding POISON."""

    home_pid = 0

    def process(self, batch):
        if os.getpid() != self.home_pid and POISON in batch.payloads.to_list():
            os.kill(os.getpid(), signal.SIGKILL)
        return super().process(batch)


class StallingFlow(Flow):
    """Sleeps for an hour in any process but the test's own on a batch holding STALL."""

    home_pid = 0

    def process(self, batch):
        if os.getpid() != self.home_pid and STALL in batch.payloads.to_list():
            time.sleep(3600)
        return super().process(batch)


class FaultyFlow(Flow):
    """Raises in any process but the test's own, as a bug past Flow's own guards would."""

    home_pid = 0

    def process(self, batch):
        if os.getpid() != self.home_pid:
            raise RuntimeError("a fault only worker processes have")
        return super().process(batch)


def recast(flow: Flow, cls: type) -> Flow:
    """``flow`` as an instance of ``cls``, at home in this process."""
    flow.__class__ = cls
    flow.home_pid = os.getpid()
    return flow
