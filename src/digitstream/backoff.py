"""Waiting between attempts at something that failed: one policy for every retry loop.

A :class:`Backoff` waits ``first`` seconds after the first failure, twice that
after the next, up to ``longest``; a success starts it over. It logs one
WARNING line when an outage begins (not one per attempt) and one INFO line when
it ends, saying how long it lasted, so a flapping peer does not flood the log.
"""

from __future__ import annotations

import asyncio
import logging
import time


class Backoff:
    """The waits of one retry loop; ``what`` names it in the log (``writing redis://...``)."""

    def __init__(
        self,
        what: str,
        first: float = 0.05,
        longest: float = 2.0,
        log: logging.Logger | None = None,
        quiet: bool = False,
    ):
        self.what = what
        self.first = first
        self.longest = longest
        self.delay = first
        self.log = log or logging.getLogger("digitstream")
        #: no log lines (the caller says what it wants itself)
        self.quiet = quiet
        #: when the current outage began (monotonic seconds), None while things work
        self.failing_since: float | None = None
        #: attempts that failed, over the whole life of the loop
        self.failures = 0
        #: outages (runs of failures) so far
        self.outages = 0

    def next_delay(self) -> float:
        """The wait before the next attempt, and the one after it doubled (up to ``longest``)."""
        delay = self.delay
        self.delay = min(self.delay * 2, self.longest)
        return delay

    def note_failure(self, exc: BaseException | str | None = None) -> bool:
        """Count a failure; True if it begins an outage (logged then, unless quiet)."""
        self.failures += 1
        if self.failing_since is not None:
            return False
        self.failing_since = time.monotonic()
        self.outages += 1
        if not self.quiet:
            reason = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
            self.log.warning("%s: %s; retrying with backoff", self.what, reason)
        return True

    async def failed(self, exc: BaseException | str | None = None) -> None:
        """Count a failure, then wait before the next attempt."""
        self.note_failure(exc)
        await asyncio.sleep(self.next_delay())

    def succeeded(self) -> None:
        """The attempt worked: the next failure starts from ``first`` again."""
        if self.failing_since is not None and not self.quiet:
            self.log.info("%s: back after %.1f s", self.what, time.monotonic() - self.failing_since)
        self.failing_since = None
        self.delay = self.first
