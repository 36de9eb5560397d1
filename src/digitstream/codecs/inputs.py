"""Input payload formats: images to bytes (the sender) and bytes to images (the application).

Formats (one image per payload):

* ``pickle``: a pickled NumPy array, as the seed's sender makes it. Read through
  :mod:`digitstream.codecs.safe_pickle`, never plain ``pickle.loads``.
* ``npy``: the bytes of a ``.npy`` file of one image, read without pickle.
* ``u8``, ``f32``, ``f64``: the raw pixels, little-endian.
* ``json``: ``{"pixels": [...], "label": 3, "id": "..."}``, label and id optional.
* ``auto`` (application only): what the seed's sender sends, byte for byte,
  plus ``.npy`` and JSON payloads, told apart by their first byte.

A decoder turns a batch of payloads into one ``(n, n_features)`` float64 array
and a reason for every payload it rejects. Rejected rows are zeros in the array;
they are answered with an error, never dropped.
"""

from __future__ import annotations

import io
import json
import math
import operator
import pickle
import secrets
from dataclasses import dataclass, field

import msgspec
import numpy as np
from numpy.lib import format as npy_format

from digitstream.codecs.safe_pickle import NUMERIC_KINDS, PickleTemplates, restricted_loads
from digitstream.formats import AUTO, INPUT_FORMATS, RAW_DTYPE_NAMES, RUN_INPUT_FORMATS
from digitstream.wire.framing import Payloads

__all__ = [
    "INPUT_FORMATS",
    "Decoded",
    "Decoder",
    "RejectedInput",
    "encode_images",
    "reason_kind",
    "smallest_payload",
]

RAW_DTYPES = {name: np.dtype(code) for name, code in RAW_DTYPE_NAMES.items()}
NPY_MAGIC = npy_format.MAGIC_PREFIX


_JSON_TYPES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    bool: "true or false",
    type(None): "null",
    int: "a number",
    float: "a number",
}


class RejectedInput(ValueError):
    """One payload that cannot be classified; the message is the reason sent back."""


@dataclass
class Decoded:
    """A batch of images decoded from payloads.

    ``X`` has shape (n, n_features), C-contiguous, float64 (float32 for a
    batch of ``u8`` or ``f32`` payloads all of the right size); the rows named in
    ``errors`` (index -> reason) are zeros. ``labels`` and ``ids`` hold what
    JSON payloads carried (None where absent), or are None for other formats.
    """

    X: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)
    labels: list | None = None
    ids: list | None = None


# ------------------------------------------------------------------ encoding
def encode_images(X: np.ndarray, fmt: str, labels=None, ids=None) -> list[bytes]:
    """One payload per row of ``X`` (shape (n, n_features)) in format ``fmt``."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"expected images of shape (n, n_features), got {X.shape}")
    if fmt in RAW_DTYPES:
        dtype = RAW_DTYPES[fmt]
        if dtype.kind == "u":
            X = np.clip(np.rint(X), 0, 255)
        data = np.ascontiguousarray(X, dtype=dtype)
        width = data.shape[1] * dtype.itemsize
        raw = data.tobytes()
        return [raw[i : i + width] for i in range(0, len(raw), width)]
    rows = np.ascontiguousarray(X, dtype=np.float64)
    if fmt == "pickle":
        return [pickle.dumps(row) for row in rows]
    if fmt == "npy":
        header = _npy_header(rows.shape[1])
        return [header + row.tobytes() for row in rows]
    if fmt == "json":
        out = []
        for i, row in enumerate(rows):
            obj = {"pixels": row.tolist()}
            if labels is not None:
                obj["label"] = labels[i].item() if hasattr(labels[i], "item") else labels[i]
            if ids is not None:
                obj["id"] = ids[i]
            out.append(json.dumps(obj, separators=(",", ":")).encode())
        return out
    raise ValueError(f"unknown input format {fmt!r}; expected one of {', '.join(INPUT_FORMATS)}")


def _npy_header(n_features: int) -> bytes:
    buffer = io.BytesIO()
    npy_format.write_array_header_1_0(
        buffer, {"descr": "<f8", "fortran_order": False, "shape": (n_features,)}
    )
    return buffer.getvalue()


# ------------------------------------------------------------------ decoding
class Decoder:
    """Turns :class:`Payloads` into a :class:`Decoded` batch for one format."""

    def __init__(self, fmt: str, n_features: int):
        if fmt not in RUN_INPUT_FORMATS:
            raise ValueError(f"unknown input format {fmt!r}")
        self.fmt = fmt
        self.n_features = n_features
        #: a bound on abs(pixel) every decoded image keeps, when the format implies one
        self.max_abs = 255.0 if fmt == "u8" else None
        self._templates = PickleTemplates(n_features) if fmt in ("pickle", AUTO) else None
        #: in auto, a payload of exactly this many bytes that is nothing else is named as raw pixels
        self._raw_sizes = {n_features * d.itemsize: name for name, d in RAW_DTYPES.items()}
        # The longest honest pickle of an image: protocol 0 escapes a byte in up to 6 and a
        # value takes up to 16 bytes. Anything longer is refused before the unpickler runs,
        # so a pickle bomb costs at most milliseconds and a few MiB.
        self.max_pickle = 1024 + 6 * 16 * n_features

    def decode(self, payloads: Payloads) -> Decoded:
        n = len(payloads)
        if payloads.fixed is not None:
            whole = self._decode_whole(payloads.fixed)
            if whole is not None:
                out = Decoded(whole)
                if self.fmt != "u8":  # bytes are always finite
                    self._reject_non_finite(whole, out.errors)
                return out
        X = np.zeros((n, self.n_features), dtype=np.float64)
        out = Decoded(X)
        todo: np.ndarray | range | list[int] = (
            self._decode_fixed(payloads.fixed, X) if payloads.fixed is not None else range(n)
        )
        if self.fmt in ("json", AUTO) and len(todo):
            todo = self._decode_json_batch(payloads, todo, out)
        for i in todo:
            try:
                X[i] = self._decode_one(payloads[i], out, int(i))
            except RejectedInput as exc:
                out.errors[int(i)] = str(exc)
        self._reject_non_finite(X, out.errors)
        return out

    def _decode_whole(self, rows: np.ndarray) -> np.ndarray | None:
        """The common case in one or two NumPy calls: every payload of the group is
        raw pixels of the right size, or the seed's pickle layout; else None."""
        length = rows.shape[1]
        if self.fmt in RAW_DTYPES:
            dtype = RAW_DTYPES[self.fmt]
            if length != self.n_features * dtype.itemsize:
                return None
            if dtype.itemsize > 1:
                rows = np.ascontiguousarray(rows).view(dtype)
            # Bytes and float32 values are exact in float32, which the model scores
            # at twice the speed of float64; f64 pixels stay as they are.
            return rows.astype(np.float64 if dtype.itemsize == 8 else np.float32)
        if self._templates is not None and length in self._templates.lengths:
            return self._templates.match_all(rows)
        return None

    # A whole group of same-length payloads at once; returns the rows left to do one by one.
    def _decode_fixed(self, rows: np.ndarray, X: np.ndarray):
        n, length = rows.shape
        if self._templates is not None and length in self._templates.lengths:
            ok, pixels = self._templates.match(rows)
            X[ok] = pixels[ok]
            return np.flatnonzero(~ok)
        if self.fmt in ("npy", "auto") and length > len(NPY_MAGIC):
            return self._decode_npy_fixed(rows, X)
        return range(n)

    def _decode_npy_fixed(self, rows: np.ndarray, X: np.ndarray):
        first = rows[0].tobytes()
        try:
            header_len, dtype = _npy_layout(first, self.n_features)
        except RejectedInput:
            return range(len(rows))
        if rows.shape[1] != header_len + self.n_features * dtype.itemsize:
            return range(len(rows))  # one by one, each gets the size reason
        same = (rows[:, :header_len] == rows[0, :header_len]).all(axis=1)
        data = np.ascontiguousarray(rows[same, header_len:])
        X[same] = data.view(dtype).astype(np.float64, copy=False)
        return np.flatnonzero(~same)

    def _decode_one(self, payload: bytes, out: Decoded, index: int) -> np.ndarray:
        if not payload:
            raise RejectedInput("empty payload")
        fmt = self.fmt
        if fmt == "auto":
            fmt = (
                "npy"
                if payload.startswith(NPY_MAGIC)
                else "json"
                if payload[:1] == b"{"
                else "pickle"
            )
        if fmt in RAW_DTYPES:
            dtype = RAW_DTYPES[fmt]
            expected = self.n_features * dtype.itemsize
            if len(payload) != expected:
                raise RejectedInput(
                    f"expected {expected} bytes ({self.n_features} {fmt} values), "
                    f"got {len(payload)}"
                )
            return np.frombuffer(payload, dtype=dtype)
        if fmt == "pickle":
            if len(payload) > self.max_pickle:
                raise RejectedInput(
                    f"bad pickle: {len(payload)} bytes, more than a pickled image of "
                    f"{self.n_features} values takes ({self.max_pickle})"
                )
            try:
                array = restricted_loads(payload)
            except pickle.UnpicklingError as exc:
                raw = self._raw_sizes.get(len(payload)) if self.fmt == AUTO else None
                if raw is not None:
                    raise RejectedInput(
                        f"bad pickle: {len(payload)} bytes that are not a pickle, .npy or JSON: "
                        f"raw {raw} pixels? run with --input-format {raw}"
                    ) from None
                raise RejectedInput(f"bad pickle: {exc}") from None
            return self._image(array)
        if fmt == "npy":
            header_len, dtype = _npy_layout(payload, self.n_features)
            expected = header_len + self.n_features * dtype.itemsize
            if len(payload) != expected:
                raise RejectedInput(
                    f"npy payload holds {len(payload) - header_len} data bytes, "
                    f"expected {expected - header_len}"
                )
            return np.frombuffer(payload, dtype=dtype, offset=header_len)
        return self._decode_json(payload, out, index)

    def _decode_json_batch(self, payloads: Payloads, todo, out: Decoded) -> list[int]:
        """The JSON payloads among ``todo`` in a few calls for all of them; returns the
        rows left to :meth:`_decode_one`.

        Only payloads that :meth:`_decode_json` would accept with the same values are
        taken here: an object with a flat list of ``n_features`` plain numbers (no
        exponent, at most 15 digits, so that the vectorised conversion is exact) and a
        label and id that are strings or finite numbers, nothing else. Every other
        payload, malformed or merely unusual, goes through :meth:`_decode_json` itself,
        so its reason and its label and id are exactly what it alone gets.
        """
        if isinstance(todo, range) and len(todo) == len(payloads):
            indices: list[int] = list(todo)
            items = payloads.to_list()
        else:
            indices = [int(i) for i in todo]
            items = [payloads[i] for i in indices]
        rest: list[int] = []
        if self.fmt == AUTO:
            json_at = [k for k, p in enumerate(items) if p[:1] == b"{"]
            if len(json_at) < len(items):
                chosen = set(json_at)
                rest = [i for k, i in enumerate(indices) if k not in chosen]
                indices = [indices[k] for k in json_at]
                items = [items[k] for k in json_at]
        if not items:
            return rest
        images = _json_images(items)
        if None in images:
            taken = [k for k, image in enumerate(images) if image is not None]
            raws = [images[k].pixels for k in taken]  # type: ignore[union-attr]
        else:
            taken = list(range(len(images)))
            raws = list(map(_PIXELS, images))
        # every payload of the batch: its rows are written in place (those not taken
        # stay zeros, as in out.X)
        direct = len(taken) == len(out.X)
        rows = out.X if direct else np.zeros((len(taken), self.n_features), dtype=np.float64)
        ok = np.zeros(len(taken), dtype=bool)
        for start in range(0, len(raws), _JSON_CHUNK):
            stop = start + _JSON_CHUNK
            rows[start:stop], ok[start:stop] = _pixel_rows(raws[start:stop], self.n_features)
        if ok.all():
            done = taken
        else:
            done = [taken[j] for j in np.flatnonzero(ok).tolist()]
            rows = rows[ok]
        if done:
            at = indices if len(done) == len(indices) else [indices[k] for k in done]
            if not direct:
                out.X[at] = rows
            chosen_images: list = images if len(done) == len(images) else [images[k] for k in done]
            labels = list(map(_LABEL, chosen_images))
            ids = list(map(_ID, chosen_images))
            if labels.count(None) < len(labels) or ids.count(None) < len(ids):
                if out.labels is None or out.ids is None:
                    out.labels, out.ids = [None] * len(out.X), [None] * len(out.X)
                if len(at) == len(out.X):
                    out.labels, out.ids = labels, ids
                else:
                    for i, label, ident in zip(at, labels, ids):
                        out.labels[i] = label
                        out.ids[i] = ident
        if len(done) == len(items):
            return rest
        finished = set(done)
        return sorted(rest + [i for k, i in enumerate(indices) if k not in finished])

    def _decode_json(self, payload: bytes, out: Decoded, index: int) -> np.ndarray:
        try:
            obj = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise RejectedInput(f"bad json: {str(exc)[:120]}") from None
        if not isinstance(obj, dict) or "pixels" not in obj:
            raise RejectedInput('bad json: expected an object with "pixels"')
        pixels = obj["pixels"]
        # type(), not isinstance(): true and false are ints to Python, not numbers to JSON
        if not isinstance(pixels, list) or not set(map(type, pixels)) <= {int, float}:
            if isinstance(pixels, list):
                at = next(i for i, v in enumerate(pixels) if type(v) not in (int, float))
                came = f"{_JSON_TYPES.get(type(pixels[at]), 'a value')} at index {at}"
            else:
                came = _JSON_TYPES.get(type(pixels), "a value")
            raise RejectedInput(f'bad json: "pixels" must be a flat list of numbers, got {came}')
        label, ident = obj.get("label"), obj.get("id")
        for name, value in (("label", label), ("id", ident)):
            if not _json_scalar(value):
                raise RejectedInput(
                    f'bad json: "{name}" must be a string or a finite number, '
                    f"got {_JSON_TYPES.get(type(value), 'a value')}"
                    f"{' that is not finite' if isinstance(value, float) else ''}"
                )
        try:
            image = self._image(np.array(pixels, dtype=np.float64))
        except OverflowError:
            raise RejectedInput("bad json: a pixel value is out of range") from None
        if label is not None or ident is not None:
            if out.labels is None or out.ids is None:
                n = len(out.X)
                out.labels, out.ids = [None] * n, [None] * n
            out.labels[index] = label
            out.ids[index] = ident
        return image

    def _image(self, array: np.ndarray) -> np.ndarray:
        if array.dtype.kind not in NUMERIC_KINDS:
            raise RejectedInput(f"expected numbers, got an array of dtype {array.dtype}")
        if array.size != self.n_features:
            raise RejectedInput(
                f"expected {self.n_features} values, got {array.size} (shape {array.shape})"
            )
        return array.reshape(-1)

    @staticmethod
    def _reject_non_finite(X: np.ndarray, errors: dict[int, str]) -> None:
        finite = np.isfinite(X).all(axis=1)
        if not finite.all():
            for index in np.flatnonzero(~finite):
                i = int(index)
                if i not in errors:
                    errors[i] = "image holds NaN or infinity"
                X[i] = 0.0


def _npy_layout(payload: bytes, n_features: int) -> tuple[int, np.dtype]:
    """Header length and dtype of a one-image ``.npy`` payload, read without pickle."""
    if not payload.startswith(NPY_MAGIC) or len(payload) < 10:
        raise RejectedInput("not an npy payload (bad magic)")
    major = payload[6]
    if major not in (1, 2, 3):
        raise RejectedInput(f"npy version {major} is not supported")
    size_bytes = 2 if major == 1 else 4
    header_end = 8 + size_bytes + int.from_bytes(payload[8 : 8 + size_bytes], "little")
    if header_end > len(payload) or header_end > 65536:
        raise RejectedInput("npy header is truncated")
    stream = io.BytesIO(payload)
    # NumPy's own reader: a literal dict, checked, never evaluated as code (version 3 differs
    # from 2 only in allowing UTF-8 field names, which a plain numeric dtype has none of)
    read_header = (
        npy_format.read_array_header_1_0 if major == 1 else npy_format.read_array_header_2_0
    )
    try:
        npy_format.read_magic(stream)
        shape, fortran, dtype = read_header(stream, max_header_size=65536)
    except EOFError:
        raise RejectedInput("npy header is truncated") from None
    except Exception as exc:
        raise RejectedInput(f"bad npy header ({type(exc).__name__})") from None
    if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.hasobject:
        raise RejectedInput(f"npy dtype {dtype} is not a plain numeric type")
    size = math.prod(shape)
    if size != n_features:
        raise RejectedInput(f"expected {n_features} values, got shape {shape}")
    if fortran and len(shape) > 1:
        raise RejectedInput("fortran-ordered npy payloads are not supported")
    return stream.tell(), dtype


class _JsonImage(msgspec.Struct, forbid_unknown_fields=True):
    """The one shape of JSON image the batch path takes; anything else is decoded alone."""

    pixels: msgspec.Raw
    label: str | int | float | None = None
    id: str | int | float | None = None


#: numbers are converted this many lists at a time, so the work stays in the CPU cache
_JSON_CHUNK = 256
_JSON_BATCH = msgspec.json.Decoder(list[_JsonImage | str])
_PIXELS, _LABEL, _ID = (operator.attrgetter(name) for name in ("pixels", "label", "id"))
_JSON_ONE = msgspec.json.Decoder(_JsonImage)


def _json_images(items: list[bytes]) -> list[_JsonImage | None]:
    """Each payload as a :class:`_JsonImage`, or None where it is not one.

    The payloads are parsed as one JSON array, separated by a string no sender can
    know (a fresh random one per batch). The array is taken only if it holds exactly
    those separators, each on its own between two values: then every payload was
    parsed on its own as one whole value, and none could reach into its neighbour.
    Otherwise each payload is parsed alone.
    """
    n = len(items)
    nonce = secrets.token_hex(16)
    separator = b',"' + nonce.encode() + b'",'
    try:
        values = _JSON_BATCH.decode(b"[" + separator.join(items) + b"]")
    except Exception:  # any failure: the payloads one by one say which
        values = None
    if values is not None and len(values) == 2 * n - 1 and values[1::2].count(nonce) == n - 1:
        images = values[::2]
        if set(map(type, images)) == {_JsonImage}:
            return images  # type: ignore[return-value]  # every one a _JsonImage
        return [v if type(v) is _JsonImage else None for v in images]
    out: list[_JsonImage | None] = []
    for payload in items:
        try:
            out.append(_JSON_ONE.decode(payload))
        except Exception:
            out.append(None)
    return out


#: after ``[`` and JSON whitespace are dropped and ``]`` becomes ``;``, a flat list of
#: plain numbers holds only these bytes
_PLAIN = b"0123456789.-,;"
_DROP = b"[ \t\n\r"
_ENDS = bytes.maketrans(b"]", b";")
_COMMA, _END, _MINUS, _DOT, _ZERO = (ord(c) for c in ",;-.0")
#: the most digits a number may have for ``digits / 10**k`` to be exact before the division
_MAX_DIGITS = 15
_POW10 = 10.0 ** np.arange(_MAX_DIGITS + 1)


#: the bytes of a flat list of plain numbers other than its ``[``
_UNBRACKETED = b"0123456789.-,]"
_WHITESPACE = b" \t\n\r"
_OPEN, _CLOSE = ord("["), ord("]")
#: the word of one number, by its count of digits: their places, with the low four bits
#: of each (an ASCII digit's value); the digits are the word's top bytes
_DIGITS_64 = np.array(
    [(0x0F0F0F0F0F0F0F0F << (8 * (8 - k))) & (2**64 - 1) for k in range(9)], dtype=np.uint64
)
_DIGITS_32 = np.array(
    [(0x0F0F0F0F << (8 * (4 - k))) & (2**32 - 1) for k in range(5)], dtype=np.uint32
)
#: the bytes above byte ``i`` of a word, for i = -1 .. 7
_ABOVE_64 = np.array([(2**64 - 1) << (8 * i) & (2**64 - 1) for i in range(9)], dtype=np.uint64)
_ABOVE_32 = np.array([(2**32 - 1) << (8 * i) & (2**32 - 1) for i in range(5)], dtype=np.uint32)


def _digit_values(words: np.ndarray, digits: np.ndarray, decimals: int) -> np.ndarray:
    """The numbers that ``words`` (uint32 or uint64, little-endian) end with: each the
    last bytes before its separator, ``digits`` digits, a point before the last
    ``decimals`` of them when there are any.

    The point is taken out and the digits are summed pairwise, then by fours, then by
    eights, each step a multiply and a shift for all numbers at once (SWAR).
    """
    u = words.dtype.type
    wide = words.dtype.itemsize == 8
    if decimals:
        # the point is the byte below the last ``decimals``; the bytes below it move up one
        upper = (_ABOVE_64 if wide else _ABOVE_32)[words.dtype.itemsize - decimals]
        words = (words & upper) | ((words << u(8)) & (~upper & ~u(0xFF)))
    number = words & np.take(_DIGITS_64 if wide else _DIGITS_32, digits)
    number = (number * u(10 * 2**8 + 1)) >> u(8)
    pairs = u(0x00FF00FF00FF00FF if wide else 0x00FF00FF)
    number = ((number & pairs) * u(100 * 2**16 + 1)) >> u(16)
    if wide:
        number = ((number & u(0x0000FFFF0000FFFF)) * u(10000 * 2**32 + 1)) >> u(32)
    return number


def _fixed_layout(text: bytes, n: int, width: int) -> np.ndarray | None:
    """The common layout in a few passes over the bytes: ``text`` is ``n`` valid JSON
    values side by side, of the bytes of ``_UNBRACKETED`` and ``n`` times ``[`` (no
    whitespace). When they are flat lists of ``width`` numbers each, every number with the
    same count of decimals and at most 8 digits (7 with a point), their values as an
    (n, width) array; else None.

    Each number is read as the word (4 bytes, or 8 where a number is longer) that ends
    at its separator, and converted with a few integer operations for all numbers at
    once (:func:`_digit_values`). ``digits / 10**q`` is then exact to the last bit, as
    ``float()`` rounds it.
    """
    a = np.frombuffer(text, dtype=np.uint8)
    ends = (a == _COMMA) | (a == _CLOSE)
    decimals = 0
    if b"." in text:
        dots = a == _DOT
        decimals = int(ends.argmax()) - int(dots.argmax()) - 1
        shift = decimals + 1
        if not (
            1 <= decimals <= 6
            and np.array_equal(dots[:-shift], ends[shift:])
            and not dots[-shift:].any()
            and not ends[:shift].any()
        ):
            return None
    at = np.flatnonzero(ends)
    if len(at) != n * width or not (a[at[width - 1 :: width]] == _CLOSE).all():
        return None
    # the bytes of each number: those after the separator before it (or its list's "[")
    size = np.empty_like(at)
    size[0] = at[0] - 1
    np.subtract(at[1:], at[:-1], out=size[1:])
    size[1:] -= 1
    size[width::width] -= 1
    # word i holds the bytes before byte i of text, the last of them its highest byte
    padded = np.frombuffer(bytes(8) + text + b"\0", dtype=np.uint8)
    negative = None
    if b"-" in text:
        # the first byte of each number (one past the text after a list within a list)
        negative = padded[8:][at - size] == _MINUS
        size -= negative
    longest = int(size.max())
    digits = size - 1 if decimals else size
    # Every number has a digit. Then no list is empty and none holds a list: its "]"
    # would be next to a "," or "]". So each of the n "[" begins a flat list of one
    # value, no value is a bare number, and the n lists hold ``width`` numbers each.
    if longest > 8 or digits.min() < 1:
        return None
    if longest <= 4:
        view = np.ndarray((len(a) + 1,), dtype="<u4", buffer=padded, offset=4, strides=(1,))
    else:
        view = np.ndarray((len(a) + 1,), dtype="<u8", buffer=padded, strides=(1,))
    values = _digit_values(np.take(view, at), digits, decimals).astype(np.float64)
    if decimals:
        values /= 10.0**decimals
    if negative is not None:
        values[negative] = (-values if decimals else 0.0 - values)[negative]
    return values.reshape(n, width)


def _flat_number_list(raw: bytes) -> bool:
    return (
        raw[:1] == b"["
        and raw.count(b"[") == 1
        and not raw.translate(_ENDS, _DROP).translate(None, _PLAIN)
    )


def _pixel_rows(raws: list, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The values of JSON arrays (each a valid JSON value) as an (n, width) float64 array,
    and which rows are exact: a flat list of ``width`` numbers without exponent and with
    at most 15 digits, converted to the nearest double as ``float()`` converts it (and an
    integer ``-0`` to 0.0, as JSON's integers are). The other rows are zeros and False.
    """
    n = len(raws)
    joined = b"".join(raws)
    # the "[" and whatever else a flat list of plain numbers does not hold
    others = joined.translate(None, _UNBRACKETED)
    opens = b"[" * n
    flat = others == opens
    spaced = not flat and others.translate(None, _WHITESPACE) == opens
    compact = joined.translate(None, _WHITESPACE) if spaced else joined
    if n and (flat or spaced):
        values = _fixed_layout(compact, n, width)
        if values is not None:
            return values, np.ones(n, dtype=bool)
    rows = np.zeros((n, width), dtype=np.float64)
    ok = np.zeros(n, dtype=bool)
    if n == 0:
        return rows, ok
    if flat or spaced:
        lengths = np.fromiter(map(len, raws), dtype=np.int64, count=n)
        starts = np.cumsum(lengths) - lengths
        flat = bool((np.frombuffer(joined, dtype=np.uint8)[starts] == _OPEN).all())
    if flat:
        keep = np.arange(n)
        text = compact.translate(_ENDS, b"[")
    else:
        keep = np.array(
            [k for k, r in enumerate(raws) if _flat_number_list(bytes(r))], dtype=np.intp
        )
        if len(keep) == 0:
            return rows, ok
        text = b"".join([raws[k] for k in keep.tolist()]).translate(_ENDS, _DROP)
    a = np.frombuffer(text, dtype=np.uint8)
    ends = np.flatnonzero((a == _COMMA) | (a == _END))
    last = np.flatnonzero(a[ends] == _END)  # the last number of each list
    counts = np.diff(last, prepend=-1)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    size = ends - starts
    negative = a[starts] == _MINUS
    dots = np.flatnonzero(a == _DOT)
    dotted = np.zeros(len(ends), dtype=bool)
    decimals = np.zeros(len(ends), dtype=np.int64)
    if len(dots) == len(ends) and (dots < ends).all() and (dots > starts).all():
        dotted[:] = True
        decimals = ends - dots - 1
    elif len(dots):
        at = np.searchsorted(ends, dots)
        dotted[at] = True
        decimals[at] = ends[at] - dots - 1
    digits = size - negative - dotted
    good = (digits >= 1) & (digits <= _MAX_DIGITS)
    values = np.zeros(len(ends), dtype=np.float64)
    # numbers of one layout (length, sign, decimals) are read as one block of digits
    key = np.where(
        good, (size * 2 + negative) * (_MAX_DIGITS + 2) + np.where(dotted, decimals + 1, 0), 0
    )
    for layout in np.flatnonzero(np.bincount(key)).tolist():
        if layout == 0:
            continue
        signed, dot = divmod(layout, _MAX_DIGITS + 2)
        length, neg = divmod(signed, 2)
        at = np.flatnonzero(key == layout)
        columns = np.arange(length)
        if neg:
            columns = columns[1:]
        if dot:
            columns = columns[columns != length - dot]
        block = a[starts[at][:, None] + columns].astype(np.float64) - _ZERO
        number = block @ _POW10[len(columns) - 1 :: -1]
        if dot:
            number /= _POW10[dot - 1]
            values[at] = -number if neg else number
        else:
            values[at] = 0.0 - number if neg else number
    listed = len(last)
    bad = np.bincount(np.repeat(np.arange(listed), counts), weights=~good, minlength=listed)
    whole = (counts == width) & (bad == 0)
    first = last - counts + 1
    rows[keep[whole]] = values[first[whole][:, None] + np.arange(width)]
    ok[keep[whole]] = True
    return rows, ok


def _json_scalar(value) -> bool:
    """A label or id that JSON output can carry: absent, a string, or a finite number."""
    if value is None or isinstance(value, (str, int)):
        return not isinstance(value, bool)
    return isinstance(value, float) and math.isfinite(value)


_REASON_KINDS = (
    ("empty payload", "empty"),
    ("bad pickle", "pickle"),
    ("bad json", "json"),
    ("decode failed", "decode"),
    ("model failed", "model"),
    ("encode failed", "encode"),
    ("engine failed", "engine"),
    ("npy", "npy"),
    ("not an npy", "npy"),
    ("bad npy", "npy"),
    ("fortran-ordered npy", "npy"),
    ("image holds NaN", "non_finite"),
    ("expected numbers", "dtype"),
    ("expected", "size"),
)


def reason_kind(reason: str) -> str:
    """A short, fixed name for a rejection reason, for metrics labels."""
    for prefix, kind in _REASON_KINDS:
        if reason.startswith(prefix):
            return kind
    return "other"


def smallest_payload(fmt: str, n_features: int) -> int:
    """The fewest bytes one image of ``n_features`` values can take in ``fmt`` (one byte a
    value where the format allows it): a model whose images cannot fit ``--max-frame`` in
    the input format could never be sent one."""
    if fmt == AUTO:
        return min(smallest_payload(f, n_features) for f in ("pickle", "npy", "json"))
    if fmt in RAW_DTYPES:
        return n_features * RAW_DTYPES[fmt].itemsize
    if fmt == "json":
        return len('{"pixels":[]}') + 2 * n_features - 1
    zeros = np.zeros(n_features, dtype="u1")
    if fmt == "pickle":
        return len(pickle.dumps(zeros, protocol=pickle.HIGHEST_PROTOCOL))
    buffer = io.BytesIO()
    np.save(buffer, zeros)
    return len(buffer.getvalue())
