"""Result frames: ``text`` (the seed's ``[3]``) and ``json``.

An encoder turns a whole batch of predictions into the framed bytes written
to the sink, in one go: for ``text`` every class's frame is built once and a
batch is one NumPy ``take``. A rejected input gets its error frame at its
place: ``error: <reason>`` in text, an ``"error"`` field in JSON.
"""

from __future__ import annotations

import json
import math

import numpy as np

from digitstream.formats import OUTPUT_FORMATS
from digitstream.wire.framing import HEADER, frame

__all__ = ["OUTPUT_FORMATS", "JsonEncoder", "TextEncoder", "make_encoder", "seed_label_text"]


def seed_label_text(label) -> str:
    """The seed's result string for one label: ``str`` of a one-element array, e.g. ``[3]``."""
    return str(np.array([label]))


def error_text(reason: str) -> str:
    return f"error: {reason}"


def _json(value) -> str:
    """``value`` as RFC 8259 JSON (no NaN or Infinity: ValueError instead)."""
    return json.dumps(value, allow_nan=False)


class TextEncoder:
    wants_confidence = False

    def __init__(self, classes: np.ndarray):
        frames = [frame(seed_label_text(c).encode()) for c in classes]
        self._frames = frames
        width = len(frames[0]) if frames else 0
        self._table = None
        if frames and all(len(f) == width for f in frames):
            self._table = np.frombuffer(b"".join(frames), dtype=np.uint8).reshape(
                len(frames), width
            )

    def _run(self, class_index: np.ndarray) -> bytes:
        if self._table is not None:
            return self._table.take(class_index, axis=0).tobytes()
        frames = self._frames
        return b"".join([frames[i] for i in class_index.tolist()])

    def encode(
        self, first_seq: int, class_index: np.ndarray, confidence, errors: dict[int, str], ids=None
    ) -> bytes:
        if not errors:
            return self._run(class_index)
        parts = []
        start = 0
        for i in sorted(errors):
            if i > start:
                parts.append(self._run(class_index[start:i]))
            parts.append(frame(error_text(errors[i]).encode()))
            start = i + 1
        if start < len(class_index):
            parts.append(self._run(class_index[start:]))
        return b"".join(parts)

    def error_frames(self, first_seq: int, count: int, reason: str, ids=None) -> bytes:
        """``count`` error frames saying ``reason``."""
        return frame(error_text(reason).encode("utf-8", "replace")) * count


class JsonEncoder:
    """One JSON object per frame: ``seq``, ``label``, ``probability`` (and ``id`` if the
    input carried one); a rejected input has ``seq`` and ``error``."""

    wants_confidence = True

    def __init__(self, classes: np.ndarray):
        self._labels = [_json(c.item() if hasattr(c, "item") else c) for c in classes]

    def encode(
        self, first_seq: int, class_index: np.ndarray, confidence, errors: dict[int, str], ids=None
    ) -> bytes:
        labels = self._labels
        probs = confidence.tolist() if confidence is not None else None
        pack = HEADER.pack
        parts = []
        for i, c in enumerate(class_index.tolist()):
            seq = first_seq + i
            if i in errors:
                body = f'{{"seq":{seq},"error":{_json(errors[i])}'
            else:
                prob = "null" if probs is None else _probability(probs[i])
                body = f'{{"seq":{seq},"label":{labels[c]},"probability":{prob}'
            if ids is not None and ids[i] is not None:
                body += f',"id":{_json(ids[i])}'
            data = (body + "}").encode()
            parts.append(pack(len(data)))
            parts.append(data)
        return b"".join(parts)

    def error_frames(self, first_seq: int, count: int, reason: str, ids=None) -> bytes:
        """``count`` error objects saying ``reason``, numbered from ``first_seq``, each with
        its id where ``ids`` has one."""
        text = _json(reason)
        parts = []
        for i in range(count):
            body = f'{{"seq":{first_seq + i},"error":{text}'
            if ids is not None and ids[i] is not None:
                try:
                    body += f',"id":{_json(ids[i])}'
                except (TypeError, ValueError):
                    pass  # the id was what failed to encode: the answer goes without it
            parts.append(frame((body + "}").encode()))
        return b"".join(parts)


def _probability(p: float) -> str:
    return repr(round(p, 6)) if math.isfinite(p) else "null"


def make_encoder(fmt: str, classes: np.ndarray):
    if fmt == "text":
        return TextEncoder(classes)
    if fmt == "json":
        return JsonEncoder(classes)
    raise ValueError(f"unknown output format {fmt!r}; expected text or json")
