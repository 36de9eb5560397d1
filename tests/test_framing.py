"""Frame splitting: any way of cutting a stream into reads gives the same frames."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from digitstream.wire.framing import (
    FrameSplitter,
    FrameTooLarge,
    Payloads,
    frame,
    frame_fixed,
    frame_many,
    iter_frames,
)


def reference_frames(data: bytes) -> list[bytes]:
    """The simplest correct parser: one frame at a time."""
    frames, pos = [], 0
    while pos + 4 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        if pos + 4 + length > len(data):
            break
        frames.append(data[pos + 4 : pos + 4 + length])
        pos += 4 + length
    return frames


def split_all(data: bytes, cuts: list[int], max_frame: int = 1 << 20) -> tuple[list[bytes], int]:
    splitter = FrameSplitter(max_frame)
    out: list[bytes] = []
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        for group in splitter.feed(data[start:cut]):
            out.extend(group.to_list())
        start = cut
    return out, splitter.pending


payload_lists = st.lists(
    st.one_of(st.binary(max_size=40), st.sampled_from([b"", b"x" * 7, b"y" * 64])),
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(payloads=payload_lists, data=st.data())
def test_any_cut_gives_the_reference_frames(payloads, data):
    stream = frame_many(payloads)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    frames, pending = split_all(stream, cuts)
    assert frames == reference_frames(stream) == payloads
    assert pending == 0


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 300), width=st.integers(0, 70), data=st.data())
def test_uniform_runs_cut_anywhere(n, width, data):
    rows = np.arange(n * width, dtype=np.uint64).astype(np.uint8).reshape(n, width)
    stream = frame_fixed(rows) if n else b""
    partial = frame(data.draw(st.binary(max_size=10)))
    stream += partial[
        : data.draw(st.integers(0, len(partial) - 1))
    ]  # an incomplete frame at the end
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    frames, pending = split_all(stream, cuts)
    assert frames == reference_frames(stream)
    assert len(frames) >= n
    assert pending == len(stream) - sum(4 + len(f) for f in frames)


@settings(max_examples=2_000, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=5))
def test_random_bytes_never_raise_anything_but_too_large(blob, cuts):
    try:
        frames, _ = split_all(blob, [c for c in cuts if c <= len(blob)], max_frame=256)
    except FrameTooLarge as exc:
        assert exc.length > 256
    else:
        assert frames == reference_frames(blob)


def test_uniform_run_is_one_array_without_copy_per_frame():
    rows = np.random.default_rng(0).integers(0, 256, size=(1000, 64), dtype=np.uint8)
    groups = FrameSplitter().feed(frame_fixed(rows))
    assert len(groups) == 1 and groups[0].fixed is not None
    assert np.array_equal(groups[0].fixed, rows)


def test_mixed_lengths_come_out_in_order_as_groups():
    payloads = [b"a" * 5] * 40 + [b"bb", b"c" * 9] + [b"d" * 3] * 40 + [b""]
    groups = FrameSplitter().feed(frame_many(payloads))
    assert [p for g in groups for p in g.to_list()] == payloads
    assert [len(g) for g in groups if g.fixed is not None] == [40, 40]


def test_a_few_frames_of_one_length_stay_with_their_neighbours():
    # Lengths that vary, with runs of up to 31 equal ones: one group of them all.
    rng = np.random.default_rng(3)
    lengths = np.repeat(np.arange(200) % 50 + 1, rng.integers(1, 32, 200))
    payloads = [bytes([k % 256]) * int(n) for k, n in enumerate(lengths)]
    groups = FrameSplitter().feed(frame_many(payloads))
    assert len(groups) == 1 and groups[0].fixed is None
    assert groups[0].to_list() == payloads


def test_header_above_the_limit_raises():
    with pytest.raises(FrameTooLarge) as info:
        FrameSplitter(max_frame=100).feed(frame(b"x" * 101))
    assert info.value.length == 101


def test_frame_helpers_agree():
    payloads = [b"", b"abc", b"\x00" * 9]
    assert list(iter_frames(frame_many(payloads))) == payloads
    assert b"".join(frame(p) for p in payloads) == frame_many(payloads)
    fixed = Payloads.from_list([b"ab", b"cd"])
    assert fixed.fixed is not None and fixed.to_list() == [b"ab", b"cd"]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 6), st.integers(1, 70)), max_size=8),
    st.lists(st.integers(0, 4000), max_size=4),
)
def test_runs_of_any_length_anywhere_come_out_in_order(runs, cuts):
    """Runs of equal-length frames, of every length around ``min_run``, cut into reads
    anywhere: every frame once, in order; whole runs of 32 and more come out as arrays."""
    payloads = [
        bytes([k % 256]) * size for k, (size, repeat) in enumerate(runs) for _ in range(repeat)
    ]
    data = frame_many(payloads)
    splitter = FrameSplitter()
    got: list[bytes] = []
    start = 0
    for cut in sorted(c for c in cuts if c < len(data)) + [len(data)]:
        for group in splitter.feed(data[start:cut]):
            got.extend(group.to_list())
        start = cut
    assert got == payloads
    assert splitter.pending == 0
    groups = FrameSplitter().feed(data)
    for size, repeat in runs:
        if repeat >= 32 and len({s for s, _ in runs}) > 1:
            assert any(g.fixed is not None and g.fixed.shape[1] == size for g in groups)


# Reads of 4 KiB and more that do not begin with a run of one length are cut by
# following the chain of headers with NumPy, and so is what follows a run; these
# streams are long enough for that path.
def _json_like(draw_int, k: int) -> bytes:
    return b'{"id":' + str(k).encode() + b',"p":"' + b"x" * draw_int + b'"}'


chained_payloads = st.lists(
    st.one_of(
        st.one_of(
            st.integers(0, 300).map(lambda n: _json_like(n, n)),  # begins with "{", no zero bytes
            st.binary(max_size=12),  # anything, headers lookalikes included
            st.just(b""),
            st.just(b"{\x00\x00\x00\x05{abcd"),  # holds a header and a "{" after it
            st.just(b"{" + b"z" * 70_000),  # above 64 KiB
        ).map(lambda p: [p]),
        st.integers(2, 70).map(lambda n: [_json_like(9, 1)] * n),  # runs around min_run
    ),
    min_size=2,
    max_size=120,
).map(lambda pieces: [p for piece in pieces for p in piece])


@settings(max_examples=300, deadline=None)
@given(payloads=chained_payloads, data=st.data())
def test_long_reads_of_varying_frames_give_the_reference_frames(payloads, data):
    stream = frame_many(payloads) * data.draw(st.integers(1, 4))
    stream += frame(b"{tail")[: data.draw(st.integers(0, 8))]
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=6))
    frames, pending = split_all(stream, cuts)
    assert frames == reference_frames(stream)
    assert pending == len(stream) - sum(4 + len(f) for f in frames)


@settings(max_examples=200, deadline=None)
@given(payloads=chained_payloads, limit=st.integers(20, 400))
def test_long_reads_raise_at_the_first_frame_above_the_limit(payloads, limit):
    stream = frame_many(payloads + [_json_like(5, 0)] * 20)
    expected = reference_frames(stream)
    over = next((k for k, p in enumerate(expected) if len(p) > limit), None)
    if over is None:
        assert split_all(stream, [], max_frame=limit)[0] == expected
        return
    with pytest.raises(FrameTooLarge) as info:
        FrameSplitter(max_frame=limit).feed(stream)
    assert info.value.length == len(expected[over])
    assert [p for g in info.value.groups for p in g.to_list()] == expected[:over]
    assert info.value.offset == sum(4 + len(p) for p in expected[:over])


def test_varying_frames_are_cut_as_places_in_the_read():
    payloads = [_json_like(k % 37, k) for k in range(2_000)]
    groups = FrameSplitter().feed(frame_many(payloads))
    assert [g.spans is not None for g in groups] == [True]
    spans = groups[0]
    assert len(spans) == 2_000 and spans.to_list() == payloads
    assert spans[1234] == payloads[1234]
    assert spans.slice(10, 20).to_list() == payloads[10:20]
    assert spans.nbytes == sum(4 + len(p) for p in payloads)
    assert list(spans.lengths()) == [len(p) for p in payloads]


def test_long_runs_among_varying_frames_are_arrays():
    payloads = [_json_like(k % 7, k) for k in range(100)] + [b"{" + b"r" * 99] * 50
    payloads += [_json_like(k % 5, k) for k in range(100)]
    groups = FrameSplitter().feed(frame_many(payloads))
    assert [p for g in groups for p in g.to_list()] == payloads
    assert [len(g) for g in groups if g.fixed is not None] == [50]


def test_neighbours_of_one_length_stay_in_one_chain():
    # result frames: lengths that vary a little, often equal for a few frames in a row
    rng = np.random.default_rng(5)
    payloads = [_json_like(int(n), k) for k, n in enumerate(rng.integers(0, 3, 3_000))]
    payloads[:40] = [_json_like(1, 1)] * 40  # a run at the start of the read
    groups = FrameSplitter().feed(frame_many(payloads))
    assert [p for g in groups for p in g.to_list()] == payloads
    assert [g.fixed is not None for g in groups] == [True, False]
    assert len(groups[0]) == 40 and groups[1].spans is not None


def test_frames_after_a_broken_chain_join_its_batch():
    # a payload holding a header lookalike ends the chain; the walk goes on in its group
    payloads = [_json_like(k % 11, k) for k in range(300)]
    payloads[150] = b"{\x00\x00\x00\x05{abcd"
    groups = FrameSplitter().feed(frame_many(payloads))
    assert len(groups) == 1 and groups[0].spans is not None
    assert groups[0].to_list() == payloads


def test_large_frames_of_one_length_are_one_array():
    # fewer than 32 to a read (pickled images): one array, not a chain of places
    payloads = [bytes([0, 0, 0, k]) + b"\x00\x80" * 330 for k in range(12)]
    groups = FrameSplitter().feed(frame_many(payloads))
    assert len(groups) == 1 and groups[0].fixed is not None
    assert groups[0].to_list() == payloads
