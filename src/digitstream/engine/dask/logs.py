"""The engine's log: one logger for the whole package, and what it keeps out of Dask's."""

from __future__ import annotations

import asyncio
import logging

#: every module of the package logs here, under the engine's name
log = logging.getLogger("digitstream.engine.dask")


def _reason(exc: BaseException) -> str:
    """An exception as its type and the first line of its message, for a log line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _AbandonedClientFilter(logging.Filter):
    """Drops what Dask logs as errors when this engine closes the client of a lost
    scheduler on purpose (it reconnects with a client of its own): that client's
    own reconnection, cut short or given up."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, asyncio.CancelledError):
            return False
        return not str(record.msg).startswith("Failed to reconnect to scheduler")


_ABANDONED_FILTER = _AbandonedClientFilter()


def _quiet_abandoned_clients() -> None:
    logger = logging.getLogger("distributed.client")
    if _ABANDONED_FILTER not in logger.filters:
        logger.addFilter(_ABANDONED_FILTER)
