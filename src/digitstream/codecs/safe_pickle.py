"""Pickled NumPy arrays, read without letting a pickle run anything.

Two readers, one contract:

* :func:`restricted_loads` unpickles with an allow-list: the globals NumPy's
  own array pickles name (``_reconstruct``, ``ndarray``, ``dtype``,
  ``_frombuffer``, and ``_codecs.encode`` that Python 3 uses for bytes in
  protocols 0-2), each wrapped so that it accepts only the arguments an array
  pickle passes; any other global is refused before it is imported. Setting
  an object's state (BUILD) is allowed only with the states NumPy writes, and
  the opcodes that create arbitrary objects are refused.
* :class:`PickleTemplates` is the fast path: a pickled float64 array of a known
  shape has a fixed byte layout in which only the pixel bytes vary. A whole
  batch of such payloads is compared with the layout at once and the pixels are
  cut straight out. A payload that differs anywhere outside the pixel bytes is
  left to :func:`restricted_loads`.

Both accept Python 3 pickles of every protocol and Python 2 ``cPickle``
protocol 0 and 2 streams; NumPy's module ``numpy.core`` (before 2.0) and
``numpy._core`` (2.0 and later) are both understood.
"""

from __future__ import annotations

import io
import pickle
import struct
from typing import ClassVar

import numpy as np

#: dtype kinds an image may arrive in: bool, signed, unsigned, float
NUMERIC_KINDS = frozenset("biuf")


class UnsafePickle(pickle.UnpicklingError):
    """The pickle names something outside the allow-list, or misuses an allowed name."""


def _checked_dtype(obj, align=False, copy=False):
    # Always a fresh copy: BUILD then sets the byte order on it, and must never
    # reach NumPy's shared built-in descriptors.
    dtype = np.dtype(obj, align=bool(align), copy=True)
    if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise UnsafePickle(f"dtype {dtype} is not a plain numeric type")
    return dtype


def _checked_reconstruct(subtype, shape, dtype):
    # NumPy's pickles always call _reconstruct(ndarray, (0,), b'b'); the real
    # shape and data arrive later through BUILD, which is checked below.
    if subtype is not np.ndarray or tuple(shape) != (0,):
        raise UnsafePickle("_reconstruct called with arguments no array pickle uses")
    return np.ndarray.__new__(np.ndarray, (0,), dtype="b")


def _checked_frombuffer(buf, dtype, shape, order):
    if not isinstance(dtype, np.dtype):
        dtype = _checked_dtype(dtype)
    if not isinstance(buf, (bytes, bytearray)):
        raise UnsafePickle("_frombuffer needs a bytes buffer")
    shape = _checked_shape(shape)
    count = int(np.prod(shape)) if shape else 1
    if count * dtype.itemsize != len(buf):
        raise UnsafePickle(
            f"buffer holds {len(buf)} bytes, shape {shape} of {dtype} "
            f"needs {count * dtype.itemsize}"
        )
    if order not in ("C", "F"):
        raise UnsafePickle(f"unknown array order {order!r}")
    return np.frombuffer(bytes(buf), dtype=dtype).reshape(shape, order=order)


def _checked_encode(text, encoding="utf-8"):
    # Python 3 pickles bytes in protocols 0-2 as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickle("_codecs.encode is allowed only as bytes pickling uses it")
    return text.encode("latin1")


def _checked_shape(shape) -> tuple[int, ...]:
    if (
        not isinstance(shape, tuple)
        or len(shape) > 32
        or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < (1 << 31) for d in shape
        )
    ):
        raise UnsafePickle(f"bad array shape {shape!r:.80}")
    return shape


def _build_dtype(dtype: np.dtype, state) -> None:
    # NumPy writes (3, '<', None, None, None, -1, -1, 0) for a plain number type;
    # other flags (the last value) would mark a float type as holding objects.
    if (
        not isinstance(state, tuple)
        or len(state) not in (8, 9)
        or state[0] not in (3, 4)
        or state[1] not in ("<", ">", "|", "=")
        or any(v is not None for v in state[2:5])
        or state[5:7] != (-1, -1)
        or type(state[7]) is not int
        or state[7] != 0
        or (len(state) == 9 and state[8] is not None)
    ):
        raise UnsafePickle(f"dtype state {state!r:.80} is not that of a plain number type")
    # dtype.__setstate__ exists at runtime; numpy's stubs leave it out
    dtype.__setstate__(state)  # type: ignore[attr-defined]
    if dtype.kind not in NUMERIC_KINDS:
        raise UnsafePickle(f"dtype {dtype} is not a plain numeric type")


def _build_array(array: np.ndarray, state) -> None:
    # NumPy writes (version, shape, dtype, is_fortran, raw bytes).
    if not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
        raise UnsafePickle(f"array state {state!r:.80} is not that of a NumPy array")
    _, shape, dtype, fortran, raw = state
    shape = _checked_shape(shape)
    if not isinstance(dtype, np.dtype) or dtype.kind not in NUMERIC_KINDS:
        raise UnsafePickle("array state names no plain numeric dtype")
    if not isinstance(fortran, (bool, int)):
        raise UnsafePickle("array state has a bad order flag")
    if isinstance(raw, str):  # Python 2 str, read as latin-1
        raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray)):
        raise UnsafePickle("array data must be bytes")
    count = int(np.prod(shape)) if shape else 1
    if count * dtype.itemsize != len(raw):
        raise UnsafePickle(
            f"array data holds {len(raw)} bytes, shape {shape} of {dtype} "
            f"needs {count * dtype.itemsize}"
        )
    # the stubs ask for a numpy.bool order flag; NumPy itself pickles a Python bool
    array.__setstate__((1, shape, dtype, bool(fortran), bytes(raw)))  # type: ignore[arg-type]


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _checked_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _checked_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _checked_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _checked_frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _checked_dtype,
    ("_codecs", "encode"): _checked_encode,
}
_CALLABLE = frozenset({_checked_reconstruct, _checked_frombuffer, _checked_dtype, _checked_encode})


class _RestrictedUnpickler(pickle._Unpickler):
    """Python's own unpickler with every opcode that calls or builds something checked.

    The pure-Python implementation is used on purpose: its opcode table can be
    overridden, so REDUCE calls only the wrapped functions above, BUILD only
    accepts the states NumPy writes, and the opcodes that create arbitrary
    objects are refused outright.
    """

    dispatch: ClassVar[dict] = dict(pickle._Unpickler.dispatch)
    #: the size of the whole pickle, bounding every size it declares; set before load()
    payload_size: int

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickle(f"forbidden global {module}.{name}") from None

    def persistent_load(self, pid):
        raise UnsafePickle("persistent ids are not allowed")

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if func not in _CALLABLE or not isinstance(args, tuple):
            raise UnsafePickle(
                f"calling {getattr(func, '__name__', type(func).__name__)} is not allowed"
            )
        self.stack[-1] = func(*args)

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is np.ndarray:
            _build_array(inst, state)
        elif isinstance(inst, np.dtype):
            _build_dtype(inst, state)
        else:
            raise UnsafePickle(f"setting the state of {type(inst).__name__} is not allowed")

    def load_bytearray8(self):
        # The stock reader allocates the declared size before reading: a pickle
        # bomb could ask for gigabytes in a few bytes.
        (size,) = struct.unpack("<Q", self.read(8))
        if size > self.payload_size:
            raise UnsafePickle(f"declared size {size} exceeds the {self.payload_size}-byte payload")
        data = self.read(size)
        if len(data) != size:
            raise pickle.UnpicklingError("pickle data was truncated")
        self.append(bytearray(data))

    def refuse(self):
        raise UnsafePickle("pickle opcode that builds arbitrary objects is not allowed")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8
    for _op in (
        pickle.NEWOBJ,
        pickle.NEWOBJ_EX,
        pickle.OBJ,
        pickle.INST,
        pickle.EXT1,
        pickle.EXT2,
        pickle.EXT4,
        pickle.PERSID,
        pickle.BINPERSID,
        pickle.NEXT_BUFFER,
        pickle.READONLY_BUFFER,
    ):
        dispatch[_op[0]] = refuse
    del _op


def restricted_loads(data: bytes) -> np.ndarray:
    """Unpickle ``data`` that must hold one numeric NumPy array.

    Raises :class:`pickle.UnpicklingError` (or a subclass) with a reason when
    the pickle is malformed, names anything but NumPy's array reconstruction,
    or holds anything but a numeric array. Nothing named in the pickle is
    imported or called unless it is on the allow-list, and allowed names are
    called only with the arguments NumPy's own pickles pass.
    """
    try:
        unpickler = _RestrictedUnpickler(io.BytesIO(data), encoding="latin1")
        unpickler.payload_size = len(data)
        obj = unpickler.load()
    except pickle.UnpicklingError:
        raise
    except (
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
        struct.error,
        OverflowError,
        MemoryError,
        RecursionError,
        UnicodeError,
    ) as exc:
        raise pickle.UnpicklingError(
            f"malformed pickle ({type(exc).__name__}: {exc})"[:200]
        ) from None
    if type(obj) is not np.ndarray:
        raise pickle.UnpicklingError(f"pickle holds {type(obj).__name__}, expected a NumPy array")
    if obj.dtype.kind not in NUMERIC_KINDS:
        raise pickle.UnpicklingError(f"array of dtype {obj.dtype}, expected numbers")
    return obj


class PickleTemplates:
    """Byte layouts of pickled float64 arrays of ``n_features`` values.

    ``match(rows)`` takes a ``(n, length)`` uint8 array of payloads and
    returns ``(ok, pixels)``: which rows match a layout exactly outside their
    pixel bytes, and the float64 pixels of those rows.
    """

    def __init__(self, n_features: int):
        self.n_features = n_features
        self.data_size = 8 * n_features
        self._by_length: dict[int, list[tuple[bytes, int]]] = {}
        for template, offset in self._build(n_features):
            entries = self._by_length.setdefault(len(template), [])
            if (template, offset) not in entries:
                entries.append((template, offset))

    @property
    def lengths(self) -> set[int]:
        return set(self._by_length)

    def _build(self, n_features: int):
        probe = np.arange(1, n_features + 1, dtype="<f8")
        marker = probe.tobytes()
        for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
            for variant in self._module_variants(pickle.dumps(probe, protocol=protocol)):
                offset = variant.find(marker)
                if offset < 0 or variant.find(marker, offset + 1) >= 0:
                    continue
                # A layout is trusted only if the restricted reader agrees with it.
                try:
                    check = restricted_loads(variant)
                except pickle.UnpicklingError:
                    continue
                if (
                    check.dtype == np.dtype("<f8")
                    and check.shape == (n_features,)
                    and np.array_equal(check, probe)
                ):
                    yield variant, offset

    @staticmethod
    def _module_variants(data: bytes):
        """The pickle as written, and as NumPy before 2.0 names its modules."""
        yield data
        for new, old in (
            (b"numpy._core.multiarray", b"numpy.core.multiarray"),
            (b"numpy._core.numeric", b"numpy.core.numeric"),
        ):
            if data.count(new) != 1:
                continue
            if data[:2] in (b"\x80\x02", b"\x80\x03"):
                yield data.replace(b"c" + new + b"\n", b"c" + old + b"\n")
            elif data[2:3] == b"\x95":  # FRAME: fix the 8-byte frame length
                short = b"\x8c" + bytes([len(new)]) + new
                if data.count(short) == 1:
                    body = data.replace(short, b"\x8c" + bytes([len(old)]) + old)
                    (frame_len,) = struct.unpack_from("<Q", body, 3)
                    fixed = struct.pack("<Q", frame_len - (len(new) - len(old)))
                    yield body[:3] + fixed + body[11:]

    def match_all(self, rows: np.ndarray) -> np.ndarray | None:
        """The float64 pixels if every row matches one layout exactly, else None."""
        for template, offset in self._by_length.get(rows.shape[1], ()):
            if _rows_equal(rows, template, 0, offset) and _rows_equal(
                rows, template, offset + self.data_size, len(template)
            ):
                return np.ascontiguousarray(rows[:, offset : offset + self.data_size]).view("<f8")
        return None

    def match(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, length = rows.shape
        ok = np.zeros(n, dtype=bool)
        pixels = np.zeros((n, self.n_features), dtype=np.float64)
        for template, offset in self._by_length.get(length, ()):
            todo = ~ok
            if not todo.any():
                break
            tpl = np.frombuffer(template, dtype=np.uint8)
            end = offset + self.data_size
            hit = (
                todo
                & (rows[:, :offset] == tpl[:offset]).all(axis=1)
                & (rows[:, end:] == tpl[end:]).all(axis=1)
            )
            if hit.any():
                data = np.ascontiguousarray(rows[hit, offset:end])
                pixels[hit] = data.view("<f8")
                ok |= hit
        return ok, pixels


def _rows_equal(rows: np.ndarray, template: bytes, start: int, stop: int) -> bool:
    """Whether every row's bytes ``start:stop`` equal the template's (compared 8 at a time)."""
    tpl = np.frombuffer(template, dtype=np.uint8)
    words = start + (stop - start) // 8 * 8
    if words > start:
        got = rows[:, start:words].view("<u8")
        if not np.array_equal(got, np.broadcast_to(tpl[start:words].view("<u8"), got.shape)):
            return False
    if stop > words:
        got = rows[:, words:stop]
        return bool(np.array_equal(got, np.broadcast_to(tpl[words:stop], got.shape)))
    return True
