"""A stream for fault tests: input always waiting, and the longest wait for a result."""

from __future__ import annotations

import threading
import time

import numpy as np

from digitstream.wire.framing import frame_fixed
from helpers import Collector, send_bytes

CHUNK = 250  # messages per send (and, with ``--max-batch CHUNK``, per batch)


class Stream:
    """Digits sent to ``port`` without a pause, ``CHUNK`` at a time, until :meth:`stop`:
    the input is always waiting (the application's back-pressure paces the sends)."""

    def __init__(self, port: int, rows: np.ndarray):
        self.rows = rows
        self.sent = 0
        self._sock = send_bytes(port, b"", close=False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = len(self.rows)
        while not self._stop.is_set():
            self._sock.sendall(frame_fixed(self.rows[np.arange(self.sent, self.sent + CHUNK) % n]))
            self.sent += CHUNK
            time.sleep(0.005)
        self._sock.close()

    def stop(self) -> int:
        """Stop sending; the number of messages sent."""
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the sender is stuck"
        return self.sent


class Gaps:
    """The longest time without a new result, from :meth:`start` on (sampled every 5 ms)."""

    def __init__(self, sink: Collector):
        self.sink = sink
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Gaps:
        self._thread.start()
        return self

    def _run(self) -> None:
        count, since = self.sink.count(), time.monotonic()
        while not self._stop.wait(0.005):
            now, seen = time.monotonic(), self.sink.count()
            if seen != count:
                count, since = seen, now
            self.longest = max(self.longest, now - since)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(5)
        return self.longest
