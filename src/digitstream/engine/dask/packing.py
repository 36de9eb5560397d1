"""A batch's payloads on the wire: as few buffers, never a Python object per message."""

from __future__ import annotations

import numpy as np

from digitstream.wire.framing import Payloads


def pack(payloads: Payloads):
    """Payloads as few buffers: the ``(n, length)`` array, or ``(blob, lengths)``."""
    if payloads.fixed is not None:
        return np.ascontiguousarray(payloads.fixed)
    return b"".join(payloads.to_list()), payloads.lengths()


def unpack(packed) -> Payloads:
    """The payloads :func:`pack` made ``packed`` of."""
    if isinstance(packed, np.ndarray):
        return Payloads(fixed=packed)
    blob, lengths = packed
    ends = np.cumsum(lengths).tolist()
    view = memoryview(blob)
    starts = [0, *ends[:-1]]
    return Payloads(items=[bytes(view[s:e]) for s, e in zip(starts, ends)])
