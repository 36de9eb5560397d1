"""Length-prefixed frames: a 4-byte big-endian unsigned length, then the payload.

The hot path is :func:`split_frames`, which the TCP source runs on the bytes a
socket read put in its buffer, to cut them into groups of complete payloads; the
listener and the tests use :class:`FrameSplitter`, its form for a stream that
arrives in pieces. A run of frames that all have the same length (the common
case: every image of a stream has the same size) is cut out with NumPy as one
``(n_frames, length)`` array, without a Python loop per frame. Frames of
varying lengths (JSON) in a read of 4 KiB or more are found by checking the whole
chain of headers at once (:func:`_chained`) and come out as places in the buffer
(:class:`Spans`), without an object per frame; so do the few frames of a read
that are cut one header at a time.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_FRAME = 1 << 20


class FrameTooLarge(ValueError):
    """A length header above the allowed maximum: the stream cannot be trusted further.

    ``groups`` are the complete payloads cut before the bad header, which is at
    ``offset``: they are still owed their answers.
    """

    def __init__(self, length: int, limit: int, groups: list | None = None, offset: int = 0):
        super().__init__(f"frame length {length} exceeds the limit of {limit} bytes")
        self.length = length
        self.limit = limit
        self.groups = groups or []
        self.offset = offset


@dataclass
class Spans:
    """Payloads that lie in one buffer: payload ``i`` is
    ``data[starts[i] : starts[i] + lengths[i]]`` (``data`` a uint8 array, read-only)."""

    data: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray

    def to_list(self) -> list[bytes]:
        if len(self.starts) == 0:
            return []
        # one copy of the bytes they lie in, then a slice of it per payload
        low = int(self.starts.min())
        ends = self.starts + self.lengths
        data = self.data[low : int(ends.max())].tobytes()
        return [data[b:e] for b, e in zip((self.starts - low).tolist(), (ends - low).tolist())]


@dataclass
class Payloads:
    """Complete frame payloads, in stream order.

    Exactly one of ``fixed``, ``items`` and ``spans`` is set: ``fixed`` is a
    read-only ``(n, length)`` uint8 array when every payload has the same length,
    ``items`` a list of ``bytes`` otherwise, or ``spans`` the same as places in one
    buffer (the frames of one read, cut without an object per payload).
    """

    fixed: np.ndarray | None = None
    items: list[bytes] | None = None
    spans: Spans | None = None

    def __len__(self) -> int:
        if self.fixed is not None:
            return len(self.fixed)
        if self.spans is not None:
            return len(self.spans.starts)
        assert self.items is not None
        return len(self.items)

    def __getitem__(self, index: int) -> bytes:
        if self.fixed is not None:
            return self.fixed[index].tobytes()
        if self.spans is not None:
            begin = int(self.spans.starts[index])
            return self.spans.data[begin : begin + int(self.spans.lengths[index])].tobytes()
        assert self.items is not None
        return self.items[index]

    def to_list(self) -> list[bytes]:
        if self.fixed is not None:
            return [row.tobytes() for row in self.fixed]
        if self.spans is not None:
            return self.spans.to_list()
        assert self.items is not None
        return list(self.items)

    def lengths(self) -> np.ndarray:
        """The payloads' lengths, as int64."""
        if self.fixed is not None:
            return np.full(len(self.fixed), self.fixed.shape[1], dtype=np.int64)
        if self.spans is not None:
            return self.spans.lengths
        assert self.items is not None
        return np.fromiter(map(len, self.items), dtype=np.int64, count=len(self.items))

    def as_spans(self) -> Spans:
        """The payloads as places in one buffer (joined, unless they already are)."""
        if self.spans is not None:
            return self.spans
        lengths = self.lengths()
        if self.fixed is not None:
            data = np.ascontiguousarray(self.fixed).reshape(-1)
        else:
            data = np.frombuffer(b"".join(self.to_list()), dtype=np.uint8)
        return Spans(data, np.cumsum(lengths) - lengths, lengths)

    @property
    def nbytes(self) -> int:
        """The bytes the frames took on the wire, headers included."""
        if self.fixed is not None:
            return (self.fixed.shape[1] + HEADER_SIZE) * len(self.fixed)
        return int(self.lengths().sum()) + HEADER_SIZE * len(self)

    def slice(self, start: int, stop: int) -> Payloads:
        """Payloads ``start:stop`` (the same object when that is all of them)."""
        if start == 0 and stop >= len(self):
            return self
        if self.fixed is not None:
            return Payloads(fixed=self.fixed[start:stop])
        if self.spans is not None:
            spans = self.spans
            return Payloads(
                spans=Spans(spans.data, spans.starts[start:stop], spans.lengths[start:stop])
            )
        assert self.items is not None
        return Payloads(items=self.items[start:stop])

    @staticmethod
    def joined(groups: list[Payloads]) -> list[Payloads]:
        """``groups`` with neighbouring fixed-width groups of one width joined into one."""
        if len(groups) < 2:
            return groups
        out: list[Payloads] = []
        run: list[np.ndarray] = []
        for group in groups:
            if group.fixed is not None and (not run or run[0].shape[1] == group.fixed.shape[1]):
                run.append(group.fixed)
                continue
            if run:
                out.append(Payloads(fixed=run[0] if len(run) == 1 else np.concatenate(run)))
                run = []
            if group.fixed is not None:
                run.append(group.fixed)
            else:
                out.append(group)
        if run:
            out.append(Payloads(fixed=run[0] if len(run) == 1 else np.concatenate(run)))
        return out

    @classmethod
    def from_list(cls, payloads: list[bytes]) -> Payloads:
        """Payloads from a list; the fixed form when all have one length."""
        if len(payloads) > 1 and all(len(p) == len(payloads[0]) for p in payloads):
            joined = np.frombuffer(b"".join(payloads), dtype=np.uint8)
            return cls(fixed=joined.reshape(len(payloads), len(payloads[0])))
        return cls(items=list(payloads))


def frame(payload: bytes) -> bytes:
    """One frame: header and payload."""
    return HEADER.pack(len(payload)) + payload


def frame_many(payloads: Iterable[bytes]) -> bytes:
    """Many frames, concatenated."""
    return b"".join(HEADER.pack(len(p)) + p for p in payloads)


def frame_fixed(rows: np.ndarray) -> bytes:
    """Frames of a ``(n, length)`` uint8 array, built in one go."""
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    n, length = rows.shape
    out = np.empty((n, HEADER_SIZE + length), dtype=np.uint8)
    out[:, :HEADER_SIZE] = np.frombuffer(HEADER.pack(length), dtype=np.uint8)
    out[:, HEADER_SIZE:] = rows
    return out.tobytes()


def iter_frames(data: bytes) -> Iterator[bytes]:
    """Every complete frame payload in ``data`` (a trailing partial frame is ignored)."""
    pos = 0
    view = memoryview(data)
    while pos + HEADER_SIZE <= len(data):
        (length,) = HEADER.unpack_from(data, pos)
        end = pos + HEADER_SIZE + length
        if end > len(data):
            break
        yield bytes(view[pos + HEADER_SIZE : end])
        pos = end


def count_frames(buf, start: int = 0, end: int | None = None) -> int:
    """How many complete frames ``buf[start:end]`` holds (a trailing partial one is not
    counted): for what a stop leaves behind, not for the hot path."""
    view = memoryview(buf).cast("B")
    end = len(view) if end is None else end
    pos, count = start, 0
    while pos + HEADER_SIZE <= end:
        (length,) = HEADER.unpack_from(view, pos)
        pos += HEADER_SIZE + length
        if pos > end:
            break
        count += 1
    return count


def split_frames(
    buf, start: int, end: int, max_frame: int = DEFAULT_MAX_FRAME, min_run: int = 32
) -> tuple[list[Payloads], int]:
    """Cut the complete frames out of ``buf[start:end]``.

    ``buf`` is any bytes-like object (bytes, or a NumPy uint8 array the caller
    fills); the payloads come back as views of it, so it must not be overwritten
    while they are in use. Returns the :class:`Payloads` groups in stream order and
    the offset where the first incomplete frame begins. A header above
    ``max_frame`` raises :class:`FrameTooLarge`.

    At least ``min_run`` frames of one length in a row are cut as one array; fewer
    stay with their neighbours. Frames whose lengths vary (JSON) often have a few of
    one length in a row by chance: cut out, each such run would split the frames
    around it into batches of their own, a few frames each.
    """
    view = memoryview(buf).cast("B")
    data = np.frombuffer(view, dtype=np.uint8)
    groups: list[Payloads] = []
    pos = start
    unpack = HEADER.unpack_from
    chains = _CHAINS_PER_READ
    run_here = -1  # where a run is known to begin
    if end - start >= _CHAIN_BYTES:
        if _run_at(view, start, end, min_run):
            run_here = start
        elif not _run_at(view, start, end, min_run, whole_read=True):
            chains -= 1
            groups, pos = _chained(data, start, end, max_frame, min_run)
    # the frames taken one header at a time: where their payloads begin, and how long
    starts: list[int] = []
    sizes: list[int] = []
    previous = -1  # the length of the frame just taken one by one
    while pos + HEADER_SIZE <= end:
        (length,) = unpack(view, pos)
        if length > max_frame:
            _loose(groups, data, starts, sizes)
            raise FrameTooLarge(length, max_frame, groups, pos)
        stride = HEADER_SIZE + length
        if length == previous or pos == run_here:
            # two in a row of one length: a run, if min_run of them are there
            first = pos if pos == run_here else pos - stride
            if first == run_here or _run_at(view, first, end, min_run):
                count = _uniform_run(data, first, end, stride)
                if first != pos:
                    starts.pop()  # the frame before is the run's first
                    sizes.pop()
                _loose(groups, data, starts, sizes)
                starts, sizes = [], []
                rows = data[first : first + count * stride].reshape(count, stride)
                groups.append(Payloads(fixed=rows[:, HEADER_SIZE:]))
                pos = first + count * stride
                previous = -1
                if chains and end - pos >= _CHAIN_BYTES and not _run_at(view, pos, end, min_run):
                    # frames of other lengths after the run: a chain again
                    chains -= 1
                    more, pos = _chained(data, pos, end, max_frame, min_run)
                    groups.extend(more)
                continue
        if pos + stride > end:
            break
        starts.append(pos + HEADER_SIZE)
        sizes.append(length)
        previous = length
        pos += stride
    _loose(groups, data, starts, sizes)
    return groups, pos


def _loose(groups: list[Payloads], data: np.ndarray, starts: list[int], sizes: list[int]) -> None:
    """Add the frames taken one by one (side by side in ``data``) to ``groups``: to the
    frames of a chain just before them, if there is one, as the same batch."""
    if not starts:
        return
    last = groups[-1].spans if groups else None
    if last is not None and int(last.starts[-1] + last.lengths[-1]) + HEADER_SIZE == starts[0]:
        groups[-1] = Payloads(
            spans=Spans(
                data,
                np.concatenate((last.starts, np.array(starts, dtype=np.int64))),
                np.concatenate((last.lengths, np.array(sizes, dtype=np.int64))),
            )
        )
    elif len(sizes) > 1 and sizes.count(sizes[0]) == len(sizes):
        # a few frames that all have one length (a slow stream's read) are one array too
        # (the form _spans gives a chain's, found here without NumPy: this is the path
        # of small reads, a few frames each)
        stride = HEADER_SIZE + sizes[0]
        begin = starts[0] - HEADER_SIZE
        rows = data[begin : begin + len(sizes) * stride].reshape(len(sizes), stride)
        groups.append(Payloads(fixed=rows[:, HEADER_SIZE:]))
    else:
        groups.append(
            Payloads(
                spans=Spans(data, np.array(starts, dtype=np.int64), np.array(sizes, dtype=np.int64))
            )
        )


#: frames of varying lengths are cut with NumPy (:func:`_chained`) from reads this long
_CHAIN_BYTES = 4096
#: at most this many chains are tried per read: each one is a pass over the rest of it
_CHAINS_PER_READ = 4


def _run_at(view: memoryview, pos: int, end: int, min_run: int, whole_read: bool = False) -> bool:
    """Whether ``min_run`` whole frames of one length begin at ``pos`` (with
    ``whole_read``, also two or more of one length that fill the read to its end:
    large frames of one length, fewer than ``min_run`` to a read).

    The last of them is looked at first: where lengths vary, it differs from the
    first far more often than the second does, and one header settles it."""
    if pos + HEADER_SIZE > end:
        return False
    unpack = HEADER.unpack_from
    (length,) = unpack(view, pos)
    stride = HEADER_SIZE + length
    count = min_run
    if pos + min_run * stride > end:
        count = (end - pos) // stride
        if not whole_read or count < 2:
            return False
    if unpack(view, pos + (count - 1) * stride)[0] != length:
        return False
    return all(unpack(view, pos + k * stride)[0] == length for k in range(1, count - 1))


def _chained(
    data: np.ndarray, start: int, end: int, max_frame: int, min_run: int
) -> tuple[list[Payloads], int]:
    """The frames from ``start`` on, found in a few passes instead of one header at a
    time, as far as they follow one another as :func:`split_frames` would walk them.

    Candidates are the places where a header below 64 KiB could begin and the byte
    after it equals the first payload's first byte (``{`` for JSON, which holds no
    zero bytes). The candidates are frames for as long as each one's length leads to
    the next: the walk itself, checked for every frame at once. A payload that holds
    something like a header, or one that begins otherwise, ends the chain there;
    :func:`split_frames` goes on from that frame one header at a time.
    """
    a = data[start:end]
    if len(a) <= HEADER_SIZE:
        return [], start
    # the byte after a header first (one a frame, in JSON), then the header's top bytes
    at = np.flatnonzero(a[HEADER_SIZE:] == a[HEADER_SIZE])
    at = at[(a[at] == 0) & (a[at + 1] == 0)]
    if len(at) == 0 or at[0] != 0:
        return [], start
    lengths = (a[at + 2].astype(np.int64) << 8) | a[at + 3]
    following = at + HEADER_SIZE + lengths
    broken = np.flatnonzero(following[:-1] != at[1:])
    linked = int(broken[0]) + 1 if len(broken) else len(at)
    # whole frames only, and none above the limit (the walk after it raises)
    count = int(np.searchsorted(following[:linked], len(a), side="right"))
    too_long = np.flatnonzero(lengths[:count] > max_frame)
    if len(too_long):
        count = int(too_long[0])
    if count == 0:
        return [], start
    at, lengths = at[:count] + start, lengths[:count]
    groups: list[Payloads] = []
    # runs of min_run or more frames of one length are arrays, as split_frames cuts them
    bounds = np.concatenate(([0], np.flatnonzero(np.diff(lengths)) + 1, [count]))
    long = np.flatnonzero(np.diff(bounds) >= min_run)
    loose = 0  # the first frame not yet in a group
    for first, stop in zip(bounds[long].tolist(), bounds[long + 1].tolist()):
        if loose < first:
            groups.append(_spans(data, at, lengths, loose, first))
        stride = HEADER_SIZE + int(lengths[first])
        begin = int(at[first])
        rows = data[begin : begin + (stop - first) * stride].reshape(stop - first, stride)
        groups.append(Payloads(fixed=rows[:, HEADER_SIZE:]))
        loose = stop
    if loose < count:
        groups.append(_spans(data, at, lengths, loose, count))
    return groups, int(at[-1] + HEADER_SIZE + lengths[-1])


def _spans(
    data: np.ndarray, at: np.ndarray, lengths: np.ndarray, first: int, stop: int
) -> Payloads:
    """Frames ``first:stop`` of a chain whose headers are at ``at`` in ``data``."""
    if stop - first > 1 and (lengths[first:stop] == lengths[first]).all():
        # frames of one length side by side: the fixed form, as from_list makes it
        rows = data[at[first] : at[stop - 1] + HEADER_SIZE + lengths[first]]
        return Payloads(fixed=rows.reshape(stop - first, -1)[:, HEADER_SIZE:])
    return Payloads(spans=Spans(data, at[first:stop] + HEADER_SIZE, lengths[first:stop]))


def _uniform_run(data: np.ndarray, pos: int, end: int, stride: int) -> int:
    """How many whole frames from ``pos`` on carry the same header as the first.

    The headers are compared in windows that grow eightfold, so that a run that ends
    soon (a few dozen frames of one length among frames of other lengths) costs a few
    headers, not a pass over the rest of the buffer."""
    total = (end - pos) // stride
    rows = data[pos : pos + total * stride].reshape(total, stride)
    headers = rows[:, :HEADER_SIZE].view(np.uint32)[:, 0]
    first = headers[0]
    done, window = 1, 8
    while done < total:
        stop = min(total, done + window)
        mismatch = np.flatnonzero(headers[done:stop] != first)
        if mismatch.size:
            return done + int(mismatch[0])
        done, window = stop, window * 8
    return total


class FrameSplitter:
    """Cut a byte stream, arriving in arbitrary pieces, into frame payloads.

    ``feed(data)`` returns the payloads completed by ``data`` as a list of
    :class:`Payloads` groups, in stream order; incomplete bytes are kept for
    the next call. A header above ``max_frame`` raises :class:`FrameTooLarge`.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME):
        self.max_frame = max_frame
        self._rest = b""

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._rest)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Payloads]:
        buf = self._rest + data if self._rest else bytes(data)
        try:
            groups, pos = split_frames(buf, 0, len(buf), self.max_frame)
        except FrameTooLarge:
            self._rest = b""
            raise
        self._rest = buf[pos:]
        return groups
