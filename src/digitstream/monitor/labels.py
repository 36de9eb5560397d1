"""Labels that arrive later: records ``{"id": ..., "label": ...}`` joined by id to the
predictions made for inputs that carried that id.

``run --labels ADDR_OR_URL`` reads them from any registered source, as ``--in`` reads
input (:class:`LabelFeed`): on TCP, ``run`` listens on ``HOST:PORT`` for framed JSON
records; on a broker, one message each. A record whose label comes from a broker is
acknowledged once it is joined (or counted as unknown).

:class:`LabelJoin` holds the predictions awaiting a label: of every served input that had an
id and no label of its own (one with an inline label is scored already), its predicted class,
at most ``capacity`` of them; past that the oldest are dropped and counted as ``expired``.
A label finds its prediction by id (ids are compared as text: ``5`` and ``"5"`` are one
id), which it then takes: a second label for the same id, a label for an id never seen or
already expired or dropped, is counted as ``unknown``, never an error; a record that is not
``{"id": string or number, "label": string or number}`` is counted as ``invalid``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

log = logging.getLogger("digitstream.monitor")


def id_key(value) -> str | None:
    """An id as the join compares it: its text (None: not an id)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return json.dumps(value)


class LabelJoin:
    """Predictions awaiting their labels, by id; see the module doc. ``classes`` are the
    model's class labels as text (a true label is its text, as inline labels are)."""

    def __init__(self, classes: list[str], capacity: int = 100_000):
        self.classes = list(classes)
        self.capacity = capacity
        self._codes = {c: i for i, c in enumerate(self.classes)}
        self.pending: OrderedDict[str, int] = OrderedDict()
        self.received = self.matched = self.unknown = self.expired = self.invalid = 0

    def predictions(self, result) -> list[str]:
        """Hold the predictions of a served result's messages that carry an id and no label;
        their ids (as compared)."""
        ids, predicted = result.ids, result.predicted
        if ids is None or predicted is None:
            return []
        awaiting = predicted >= 0
        if result.true is not None:
            awaiting &= result.true < 0
        rows = np.flatnonzero(awaiting).tolist()
        keys = [id_key(ids[i]) for i in rows]
        codes = predicted.tolist()
        held = [(key, codes[i]) for key, i in zip(keys, rows) if key is not None]
        pending = self.pending
        pending.update(held)
        excess = len(pending) - self.capacity
        if excess > 0:
            self.expired += excess
            for _ in range(excess):
                pending.popitem(last=False)
        return [key for key, _ in held]

    def labels(self, records: list) -> list[tuple[str, int, int]]:
        """Join label records; for each matched one ``(id, true code, predicted code)``, the
        true code being the class's index, or the number of classes for a label the model
        has no class for."""
        matched = []
        other = len(self.classes)
        pending, codes = self.pending, self._codes
        for record in records:
            if not isinstance(record, dict):
                self.invalid += 1
                continue
            key, label = id_key(record.get("id")), record.get("label")
            if key is None or label is None or id_key(label) is None:
                self.invalid += 1
                continue
            self.received += 1
            predicted = pending.pop(key, None)
            if predicted is None:
                self.unknown += 1
                continue
            self.matched += 1
            text = label if isinstance(label, str) else str(label)
            matched.append((key, codes.get(text, other), predicted))
        return matched

    def report(self) -> dict:
        return {
            "received": self.received,
            "matched": self.matched,
            "unknown": self.unknown,
            "expired": self.expired,
            "pending": len(self.pending),
            "invalid": self.invalid,
            "capacity": self.capacity,
        }


def parse_records(payloads) -> list:
    """The JSON records of a batch's payloads (a payload that is not JSON: None)."""
    records = []
    for payload in payloads.to_list():
        try:
            records.append(json.loads(payload))
        except (ValueError, UnicodeDecodeError):
            records.append(None)
    return records


class LabelFeed:
    """Reads label records from ``source`` (any registered source, as ``--in``) and hands
    each batch of them to ``take``; a batch's receipt goes back once it is taken."""

    def __init__(self, source, take: Callable[[list], None]):
        self.source = source
        self._take = take
        self._accepting: asyncio.Task | None = None
        self._streams: set[asyncio.Task] = set()

    async def start(self, sink) -> None:
        """Start reading (``sink``: the run's, which the source may ask about)."""
        await self.source.start(sink)
        self._accepting = asyncio.create_task(self._accept(), name="labels")

    def describe(self) -> str:
        return self.source.describe()

    async def _accept(self) -> None:
        async for stream in self.source.streams():
            task = asyncio.create_task(self._read(stream), name=f"labels {stream.id}")
            self._streams.add(task)
            task.add_done_callback(self._streams.discard)

    async def _read(self, stream) -> None:
        try:
            async for batch in stream.batches():
                try:
                    self._take(parse_records(batch.payloads))
                except Exception:  # a bug here must not stop the labels, nor the run
                    log.exception("labels from stream %s could not be joined", stream.id)
                if batch.receipt is not None:
                    batch.receipt.delivered()
        except Exception:
            log.exception("labels stream %s ended by a fault", stream.id)
        finally:
            stream.close()

    async def close(self) -> None:
        """Stop reading and let the source go."""
        with contextlib.suppress(Exception):
            await self.source.drain()
        tasks = [t for t in (self._accepting, *self._streams) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.source.close()
