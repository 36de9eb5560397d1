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
        self._label_bytes = _Texts([label.encode() for label in self._labels])

    def encode(
        self, first_seq: int, class_index: np.ndarray, confidence, errors: dict[int, str], ids=None
    ) -> bytes:
        """Every frame of the batch; runs of frames without errors are built at once."""
        n = len(class_index)
        if not errors:
            return self._run(first_seq, 0, n, class_index, confidence, ids)
        parts = []
        start = 0
        for i in sorted(errors):
            if i > start:
                parts.append(self._run(first_seq, start, i, class_index, confidence, ids))
            parts.append(self._frames(first_seq, i, i + 1, class_index, confidence, errors, ids))
            start = i + 1
        if start < n:
            parts.append(self._run(first_seq, start, n, class_index, confidence, ids))
        return b"".join(parts)

    def _run(self, first_seq: int, start: int, stop: int, class_index, confidence, ids) -> bytes:
        """Frames ``start:stop``, none of them an error, built with a few NumPy operations
        for all of them: the same bytes as :meth:`_frames` writes one by one."""
        n = stop - start
        seqs = _decimal_texts(first_seq + start, n) if n >= 16 else None
        run_ids = ids[start:stop] if ids is not None else None
        some_ids = run_ids is not None and run_ids.count(None) < n
        id_texts = _id_fields(run_ids) if some_ids and seqs is not None else None
        if seqs is None or (some_ids and id_texts is None):
            return self._frames(first_seq, start, stop, class_index, confidence, {}, ids)
        labels = self._label_bytes.take(class_index[start:stop])
        if confidence is None:
            probs = _Texts.constant(b"null", n)
        else:
            probs = _probability_texts(np.asarray(confidence[start:stop], dtype=np.float64))
        pieces = [
            _Texts.constant(b'{"seq":', n),
            seqs,
            _Texts.constant(b',"label":', n),
            labels,
            _Texts.constant(b',"probability":', n),
            probs,
            *(id_texts or ()),
            _Texts.constant(b"}", n),
        ]
        sizes = sum(piece.lengths for piece in pieces)
        header = _Texts(np.asarray(sizes, dtype=">u4").view(np.uint8).reshape(n, HEADER.size))
        return _join_rows(n, [header, *pieces])

    def _frames(
        self, first_seq: int, start: int, stop: int, class_index, confidence, errors, ids
    ) -> bytes:
        """Frames ``start:stop`` one by one (``errors`` indexed as the batch)."""
        labels = self._labels
        probs = confidence.tolist() if confidence is not None else None
        pack = HEADER.pack
        parts = []
        for i in range(start, stop):
            c = int(class_index[i])
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


class _Texts:
    """One byte string per frame, frame i's ``lengths[i]`` bytes long: row i of ``rows``
    holds it in its first ``lengths[i]`` bytes (every byte of its row when ``lengths`` is
    None), or ``packed`` holds them all end to end (and ``rows`` is None)."""

    def __init__(self, rows, lengths=None, packed=None):
        if isinstance(rows, list):
            width = max(map(len, rows), default=0)
            lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
            rows = np.frombuffer(b"".join(r.ljust(width, b" ") for r in rows), dtype=np.uint8)
            rows = rows.reshape(len(lengths), width)
        self.rows = rows
        self.packed = packed
        self.full = lengths is None
        if lengths is None:
            self.lengths = np.full(len(rows), rows.shape[1], dtype=np.int64)
            self.width = rows.shape[1]
        else:
            self.lengths = lengths
            self.width = rows.shape[1] if rows is not None else int(lengths.max(initial=0))

    @classmethod
    def constant(cls, text: bytes, n: int) -> _Texts:
        row = np.frombuffer(text, dtype=np.uint8)
        return cls(np.broadcast_to(row, (n, len(text))))

    def take(self, index: np.ndarray) -> _Texts:
        return _Texts(self.rows[index], self.lengths[index])


def _join_rows(n: int, pieces: list[_Texts]) -> bytes:
    """The texts of ``n`` frames, each frame's pieces in order, frames one after another:
    the pieces side by side as the columns of one matrix, read row by row where each
    piece's bytes are in use."""
    rows = np.empty((n, sum(piece.width for piece in pieces)), dtype=np.uint8)
    used = np.empty(rows.shape, dtype=bool)
    at = 0
    for piece in pieces:
        columns = slice(at, at + piece.width)
        at += piece.width
        if piece.full:
            rows[:, columns] = piece.rows
            used[:, columns] = True
            continue
        mask = np.arange(piece.width) < piece.lengths[:, None]
        used[:, columns] = mask
        if piece.packed is None:
            rows[:, columns] = piece.rows
        else:
            rows[:, columns][mask] = piece.packed
    return rows[used].tobytes()


_TENS = 10 ** np.arange(0, 19, dtype=np.int64)
_POWERS = _TENS[1:]


def _decimal_texts(first: int, n: int) -> _Texts | None:
    """``str(first + i)`` for i < n, or None past what int64 holds."""
    if first < 0 or first + n >= 10**18:
        return None
    numbers = np.arange(first, first + n, dtype=np.int64)
    lengths = 1 + np.searchsorted(_POWERS, numbers, side="right")
    width = int(lengths[-1]) if n else 0
    # digit j of a number of L digits is (number // 10**(L - 1 - j)) % 10, for j < L
    place = np.maximum(lengths[:, None] - 1 - np.arange(width), 0)
    digits = numbers[:, None] // _TENS[place] % 10
    rows = (digits + 48).astype(np.uint8)
    return _Texts(rows, None if int(lengths[0]) == width else lengths)


#: bytes of a string that JSON (with ``ensure_ascii``, as :func:`json.dumps` writes it)
#: leaves as they are: printable ASCII but the quote and the backslash
_PLAIN_BYTES = np.zeros(256, dtype=bool)
_PLAIN_BYTES[0x20:0x7F] = True
_PLAIN_BYTES[[ord('"'), ord("\\")]] = False


def _id_fields(values) -> list[_Texts] | None:
    """Each frame's ``,"id":...`` field as :meth:`JsonEncoder._frames` writes it (empty
    for a frame without an id), as pieces in order; None when an id is not a string that
    is its own JSON text between quotes, an int or None."""
    kinds = set(map(type, values))
    if not kinds <= {str, int, type(None)}:
        return None
    strings = values if kinds == {str} else [v for v in values if type(v) is str]
    if strings:
        try:
            data = "\x00".join(strings).encode("ascii")
        except UnicodeEncodeError:
            return None
        codes = np.frombuffer(data, dtype=np.uint8)
        separators = codes == 0
        ends = np.flatnonzero(separators)
        text = codes[~separators]
        if len(ends) != len(strings) - 1 or not _PLAIN_BYTES[text].all():
            return None
        if kinds == {str}:
            n = len(values)
            bounds = np.concatenate(([-1], ends, [len(codes)]))
            lengths = np.subtract(bounds[1:], bounds[:-1]) - 1
            return [
                _Texts.constant(b',"id":"', n),
                _Texts(None, lengths, text),
                _Texts.constant(b'"', n),
            ]
    fields = [
        "" if v is None else f',"id":"{v}"' if type(v) is str else f',"id":{v}' for v in values
    ]
    lengths = np.fromiter(map(len, fields), dtype=np.int64, count=len(fields))
    return [_Texts(None, lengths, np.frombuffer("".join(fields).encode("ascii"), np.uint8))]


_PLACES = 6
_SCALE = 10.0**_PLACES
_FRACTION = 10 ** np.arange(_PLACES - 1, -1, -1, dtype=np.int64)


def _probability_texts(p: np.ndarray) -> _Texts:
    """:func:`_probability` of every value: ``repr(round(p, 6))``, or ``null``.

    For 0.0001 <= p <= 1 the rounded value is k / 10**6 with k the integer nearest to
    p * 10**6 (computed exactly unless that product lies within 1e-6 of a half, which is
    left to :func:`round`), and its ``repr`` is ``0.`` and k's six digits without the
    trailing zeros (``1.0`` for k = 10**6). Every other value is written by
    :func:`_probability` itself.
    """
    n = len(p)
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = p * _SCALE
        k = np.rint(scaled)
        simple = (k >= 100) & (k <= _SCALE) & (np.abs(np.abs(scaled - k) - 0.5) > 1e-6)
    k = np.where(simple, k, 0).astype(np.int64)
    digits = (k[:, None] // _FRACTION) % 10
    nonzero = digits != 0
    # the digits up to the last non-zero one (k = 10**6 has none: "1.0")
    kept = _PLACES - np.argmax(nonzero[:, ::-1], axis=1)
    rows = np.empty((n, 2 + _PLACES), dtype=np.uint8)
    rows[:, 0] = ord("0")
    rows[:, 1] = ord(".")
    rows[:, 2:] = digits + 48
    lengths = 2 + kept
    whole = k == 10**_PLACES
    rows[whole, :3] = np.frombuffer(b"1.0", dtype=np.uint8)
    lengths[whole] = 3
    odd = np.flatnonzero(~simple)
    if len(odd):
        texts = [_probability(v).encode() for v in p[odd].tolist()]
        width = max(rows.shape[1], *map(len, texts))
        if width > rows.shape[1]:
            rows = np.concatenate([rows, np.zeros((n, width - rows.shape[1]), np.uint8)], axis=1)
        for i, text in zip(odd.tolist(), texts):
            rows[i, : len(text)] = np.frombuffer(text, dtype=np.uint8)
            lengths[i] = len(text)
    return _Texts(rows, lengths)


def make_encoder(fmt: str, classes: np.ndarray):
    if fmt == "text":
        return TextEncoder(classes)
    if fmt == "json":
        return JsonEncoder(classes)
    raise ValueError(f"unknown output format {fmt!r}; expected text or json")
