"""Swap without stopping: a new bundle written to ``run``'s ``--model`` path
replaces the model serving, between two batches.

**Noticing it.** Every ``poll`` seconds (0.5 by default) the watcher looks at
the size, modification time and inode of ``model.json``, ``pipeline.skops`` and
``profile.json`` (or of the single ``.skops`` file and its profile); SIGHUP makes it load
the path at once. A bundle directory is taken as soon as its card names the
content hash of its pipeline file, which :func:`~digitstream.model.bundle.save_bundle`
(and any writer that renames ``model.json`` into place last) makes true only
once both files are whole. A directory whose card and pipeline disagree, or a
single ``.skops`` file, which has no card to vouch for it, is taken once its
files have been left alone for ``settle`` seconds: before that a writer may be
between its renames, or half way through a copy.

**Checking it.** The bundle is loaded off the event loop with the same
loader as at start (content hash, trusted types only, fitted classifier),
must take the same number of features and predict the same classes as the
model serving, and must classify a test batch. Anything else leaves the old
model serving, with one WARNING line naming the reason (an unexpected
error: an ERROR line with its traceback), counted in the
metrics (``model_swaps_refused`` and ``last_swap_refused`` in ``/api/stats``,
``digitstream_model_swaps_refused_total``); the same files are not tried again
until they change (or SIGHUP asks).

**Switching.** The new flow goes to the engine (:meth:`set_flow`; the Dask
engine first ships the bundle to every worker). The engine switches with
nothing awaited after it, on the event loop that submits batches, so each
batch, and every message in it, is answered by exactly one model: a batch
submitted before the switch by the old one, every batch after by the new.
The switch point is, per open connection, the sequence number of its next
batch; it goes in one INFO line and in the metrics (``model_swaps`` in
``/api/stats``, ``digitstream_model_swaps_total``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from digitstream.errors import UserError
from digitstream.model.bundle import (
    CARD_FILE,
    PIPELINE_FILE,
    BundleError,
    load_bundle,
    peek,
    profile_path,
)

log = logging.getLogger("digitstream.swap")

POLL_SECONDS = 0.5
SETTLE_SECONDS = 2.0

# per file: (inode, size, mtime in ns), or None if it cannot be stat'ed
_FileStat = tuple[int, int, int] | None
_Signature = tuple[_FileStat, ...]


class ModelWatcher:
    """Watches ``path`` (run's ``--model``) and swaps a new bundle found there into ``serving``.

    ``serving`` (a :class:`~digitstream.app.Serving`) holds the bundle and flow
    serving now, builds the flow for a new bundle and switches to it, returning
    each open stream's switch point; ``metrics``, if given, records swaps and
    refusals. ``poll`` is in seconds (0: only on :meth:`request_reload`);
    ``clock`` is monotonic seconds; ``role`` names the model in log lines ("model", or
    "shadow model" for ``run --shadow``'s).
    """

    def __init__(
        self,
        path,
        serving,
        metrics=None,
        poll: float = POLL_SECONDS,
        settle: float = SETTLE_SECONDS,
        clock=time.monotonic,
        role: str = "model",
    ):
        self.role = role
        self.serving = serving
        self.metrics = metrics
        self.path = Path(path)
        self.poll = poll
        self.settle = settle
        self._clock = clock
        # None at first: the files may have changed between the app's load and now
        self._acted_on: _Signature | None = None  # the signature last loaded (or found unchanged)
        self._seen: _Signature | None = None  # the files' signature at the last look ...
        self._seen_since = 0.0  # ... and since when they have looked like that
        self._reload = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def request_reload(self) -> None:
        """Load the model path now, even if its files look unchanged (SIGHUP)."""
        self._reload.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._reload.wait(), self.poll or None)
            forced = self._reload.is_set()
            self._reload.clear()
            try:
                await self.check(forced)
            except Exception:  # a bug here must not stop the stream, nor later swaps
                log.exception(
                    "looking for a new %s at %s failed; the one serving stays", self.role, self.path
                )

    async def check(self, forced: bool = False) -> None:
        """Look at the model path once; swap in a new bundle if one is there and complete.

        ``forced`` (SIGHUP): load it whatever its files look like.
        """
        signature = self._signature()
        now = self._clock()
        if not forced:
            if signature == self._acted_on:
                return
            if signature != self._seen:
                self._seen, self._seen_since = signature, now
            digest, vouched = await asyncio.to_thread(self._peek)
            if not vouched and now - self._seen_since < self.settle:
                return
            if digest == self.serving.bundle.content_hash and (vouched or not self.path.is_dir()):
                self._acted_on = signature  # touched, or the same model written again
                return
        self._acted_on = self._seen = signature
        await self._swap("SIGHUP" if forced else "new files")

    def _signature(self) -> _Signature:
        files = (
            [self.path / CARD_FILE, self.path / PIPELINE_FILE]
            if self.path.is_dir()
            else [self.path]
        )
        files.append(profile_path(self.path))
        signature: list[_FileStat] = []
        for file in files:
            try:
                stat = file.stat()
            except OSError:
                signature.append(None)
            else:
                signature.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
        return tuple(signature)

    def _peek(self) -> tuple[str | None, bool]:
        """The content hash of the bundle's files (None if unreadable), and whether a
        card names that hash (a bundle directory whose writer has finished)."""
        return peek(self.path)

    async def _swap(self, trigger: str) -> None:
        serving = self.serving
        old = serving.bundle
        try:
            bundle = await asyncio.to_thread(load_bundle, self.path)
            if bundle.content_hash == old.content_hash:
                log.log(
                    logging.INFO if trigger == "SIGHUP" else logging.DEBUG,
                    "%s: the %s at %s is the one serving (%s); nothing to swap",
                    trigger,
                    self.role,
                    self.path,
                    old.content_hash,
                )
                return
            flow = await asyncio.to_thread(self._prepare, bundle, old)
            # each open stream's switch point: the sequence number of its next batch
            at = await serving.switch(flow=flow, bundle=bundle)
        except (UserError, OSError) as exc:
            reason = str(exc) if isinstance(exc, UserError) else f"cannot read it: {exc}"
            self._refused(trigger, reason)
            return
        except Exception as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            reason = f"unexpected {type(exc).__name__}" + (f": {first_line}" if first_line else "")
            self._refused(trigger, reason, unexpected=True)
            return
        when = time.time()
        if self.metrics is not None:
            self.metrics.model_swapped(
                when, old.content_hash, bundle.content_hash, at, flow.stage_names
            )
        points = ", ".join(
            f"stream {stream} -> {seq}"
            for stream, seq in sorted(at.items(), key=lambda kv: str(kv[0]))
        )
        log.info(
            "%s swapped at %s (%s): %s -> %s; the new model answers from message: %s",
            self.role,
            datetime.fromtimestamp(when).astimezone().isoformat(timespec="milliseconds"),
            trigger,
            old.content_hash,
            bundle.content_hash,
            points or ("no connection open" if self.role == "model" else "its next batch"),
        )

    def _refused(self, trigger: str, reason: str, unexpected: bool = False) -> None:
        """The bundle at the model path was not swapped in: one log line (an ERROR with
        the traceback if ``unexpected``, else a WARNING) and the metrics' count."""
        log.log(
            logging.ERROR if unexpected else logging.WARNING,
            "%s at %s not swapped in (%s): %s; still serving %s",
            self.role,
            self.path,
            trigger,
            reason,
            self.serving.bundle.content_hash,
            exc_info=unexpected,
        )
        if self.metrics is not None:
            self.metrics.model_swap_refused(time.time(), reason)

    def _prepare(self, bundle, old):
        """The flow that serves ``bundle`` in place of ``old``; BundleError if it cannot."""
        if bundle.n_features != old.n_features:
            raise BundleError(
                f"it takes {bundle.n_features} features, the model serving takes {old.n_features}"
            )
        new_classes = [str(c) for c in bundle.classes]
        old_classes = [str(c) for c in old.classes]
        if new_classes != old_classes:
            raise BundleError(
                f"it predicts classes {' '.join(new_classes)}, the model serving "
                f"{' '.join(old_classes)} (restart run to change the classes)"
            )
        try:
            flow = self.serving.build_flow(bundle)
            flow.runner.predict(np.zeros((2, bundle.n_features)), want_confidence=True)
        except Exception as exc:
            raise BundleError(
                f"the pipeline fails on a test batch: "
                f"{(str(exc) or type(exc).__name__).splitlines()[0]}"
            ) from None
        return flow
