"""The batch JSON paths against the one-payload-at-a-time paths they replace: same
images, labels, ids and reasons for every input; the same output bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from digitstream.codecs.inputs import Decoded, Decoder, RejectedInput
from digitstream.codecs.outputs import JsonEncoder
from digitstream.wire.framing import Payloads

N = 4

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([10**400, -0, 2**63, 4.9e-324]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
)
pixel = st.one_of(
    st.integers(min_value=-1000, max_value=1000),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.floats(),
    st.sampled_from([0.5, 13.0, -0.0, 1e-5, 1e20, 10**400, "1", True, None, [1]]),
)


@st.composite
def payloads(draw) -> bytes:
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return draw(st.binary(max_size=20))
    size = N if choice > 2 else draw(st.integers(0, N + 1))
    decimals = draw(st.integers(0, 3))
    if draw(st.booleans()):
        values = [round(draw(st.floats(-999, 999)), decimals) for _ in range(size)]
    else:
        values = [draw(pixel) for _ in range(size)]
    obj: dict = {"pixels": values}
    for key in ("label", "id", "other"):
        if draw(st.integers(0, 3)) == 0:
            obj[key] = draw(scalars)
    if choice == 1:
        obj.pop("pixels")
    text = json.dumps(obj, separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])))
    if draw(st.integers(0, 9)) == 0:  # a duplicate key, an unusual spelling
        text = text.replace('{"pixels"', '{"pixels": [], "pixels"', 1)
    return text.encode()


def one_by_one(decoder: Decoder, items: list[bytes]):
    """What the per-payload path (``json.loads`` and its checks) gives each payload."""
    out = Decoded(np.zeros((len(items), decoder.n_features)))
    for i, payload in enumerate(items):
        try:
            out.X[i] = decoder._decode_one(payload, out, i)
        except RejectedInput as exc:
            out.errors[i] = str(exc)
    decoder._reject_non_finite(out.X, out.errors)
    labels = out.labels or [None] * len(items)
    ids = out.ids or [None] * len(items)
    return out.X, out.errors, labels, ids


def same(a, b) -> bool:
    return type(a) is type(b) and (a == b or (a != a and b != b))


@settings(max_examples=300, deadline=None)
@given(st.lists(payloads(), min_size=1, max_size=40), st.sampled_from(["json", "auto"]))
def test_batch_decode_equals_each_payload_alone(items, fmt):
    decoder = Decoder(fmt, N)
    X, errors, labels, ids = one_by_one(decoder, items)
    for group in (Payloads(items=items), Payloads.from_list(items)):
        out = decoder.decode(group)
        assert np.array_equal(out.X, X)
        assert np.array_equal(np.signbit(out.X), np.signbit(X))
        assert out.errors == errors
        got_labels = out.labels or [None] * len(items)
        got_ids = out.ids or [None] * len(items)
        assert all(map(same, got_labels, labels)) and all(map(same, got_ids, ids))
        assert (out.labels is None) == all(v is None for v in labels + ids)


@pytest.mark.parametrize(
    ("pixels", "width"),
    [
        ([b"[1,2]", b"3", b"[[4],5]"], 2),
        ([b"5", b"[[1,2]]"], 2),
        ([b"[1,2]", b"[3,4]", b"[]"], 2),
        ([b"[1,2]", b"[[3],[4]]", b"6"], 2),
        ([b"[1.5,2.5]", b"[3.5]", b"[4.5,5.5,6.5]"], 2),
        ([b"-5", b"[[2]]"], 1),
        ([b"[-1]", b"-3", b"[[4]]"], 1),
        ([b"[1]", b"[[2]]", b"3"], 1),
    ],
)
def test_values_that_are_not_flat_lists_among_flat_ones(pixels, width):
    # as many "[" as payloads, only the bytes of numbers and lists, but not n flat lists
    items = [b'{"pixels":' + p + b"}" for p in pixels]
    decoder = Decoder("json", width)
    X, errors, _, _ = one_by_one(decoder, items)
    out = decoder.decode(Payloads(items=items))
    assert np.array_equal(out.X, X) and out.errors == errors
    assert errors  # each of these batches holds a payload that is refused alone


def test_payloads_cannot_reach_into_each_other():
    decoder = Decoder("json", 1)
    items = [b'{"pixels":[1],"label":"x', b'"}', b'{"pixels":[2]},{"pixels":[3]}']
    out = decoder.decode(Payloads(items=items))
    assert sorted(out.errors) == [0, 1, 2]
    assert all(reason.startswith("bad json") for reason in out.errors.values())


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 6),
    st.lists(
        st.lists(st.integers(-(10**9), 10**9), min_size=3, max_size=3), min_size=1, max_size=30
    ),
    st.booleans(),
)
def test_numbers_of_one_layout_equal_float(decimals, rows, empty):
    # every number of the batch with the same count of decimals (the word-wise path),
    # from one digit up to past what a word holds, signs included; and an empty list
    check_one_layout(decimals, rows, empty)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 3),
    st.lists(st.lists(st.integers(-999, 9999), min_size=3, max_size=3), min_size=1, max_size=30),
    st.booleans(),
)
def test_short_numbers_of_one_layout_equal_float(decimals, rows, empty):
    # numbers of at most four bytes, as image pixels mostly are, read as 4-byte words
    check_one_layout(decimals, rows, empty)


def check_one_layout(decimals: int, rows: list[list[int]], empty: bool) -> None:
    width = 3
    texts = [
        [f"{v / 10**decimals:.{decimals}f}" if decimals else str(v) for v in row] for row in rows
    ]
    items = [b'{"pixels":[' + ",".join(row).encode() + b"]}" for row in texts]
    if empty:
        items.append(b'{"pixels":[]}')
    decoder = Decoder("json", width)
    X, errors, labels, ids = one_by_one(decoder, items)
    out = decoder.decode(Payloads(items=items))
    assert np.array_equal(out.X, X) and np.array_equal(np.signbit(out.X), np.signbit(X))
    assert out.errors == errors
    assert np.array_equal(X[: len(texts)], [[float(t) for t in row] for row in texts])


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 60),
    st.integers(0, 10**12),
    st.one_of(st.none(), st.lists(st.floats(), min_size=60, max_size=60)),
    st.one_of(
        st.none(),
        st.lists(
            st.one_of(st.none(), st.text(max_size=5), st.integers(), st.floats(-1e6, 1e6)),
            min_size=60,
            max_size=60,
        ),
    ),
    st.sets(st.integers(0, 59), max_size=3),
)
def test_batch_encode_equals_frame_by_frame(n, first, confidence, ids, errored):
    encoder = JsonEncoder(np.array(["a", "b", "c"]))
    index = np.arange(n) % 3
    conf = None if confidence is None else np.array(confidence[:n])
    errors = {i: "bad json: x" for i in errored if i < n}
    id_list = None if ids is None else ids[:n]
    try:
        expected = encoder._frames(first, 0, n, index, conf, errors, id_list)
    except (TypeError, ValueError):
        return
    assert encoder.encode(first, index, conf, errors, id_list) == expected


@pytest.mark.parametrize(
    "ids",
    [
        [None] * 40,
        [None, 7, "a-1", None] * 10,
        [3, -2, 10**30, 0] * 10,
        ["x", "", "é", None] * 10,
        ['q"uote', None] * 20,
    ],
)
def test_batch_encode_of_the_usual_ids_equals_frame_by_frame(ids):
    encoder = JsonEncoder(np.array([0, 1, 2]))
    index = np.arange(len(ids)) % 3
    conf = np.linspace(0.2, 1.0, len(ids))
    expected = encoder._frames(5, 0, len(ids), index, conf, {}, ids)
    assert encoder.encode(5, index, conf, {}, ids) == expected
    assert encoder.encode(5, index, conf, {3: "bad json: x"}, ids) == encoder._frames(
        5, 0, len(ids), index, conf, {3: "bad json: x"}, ids
    )


@pytest.mark.parametrize("first", [0, 9_990, 999_999_960, 10**17 - 30])
@pytest.mark.parametrize("ids", [None, "strings", "mixed"])
def test_batch_encode_across_a_power_of_ten_equals_frame_by_frame(first, ids):
    n = 64
    encoder = JsonEncoder(np.array([0, 1, 2]))
    index = np.arange(n) % 3
    conf = np.linspace(0.01, 1.0, n)
    id_list = {
        None: None,
        "strings": [f"img-{i * 37}" for i in range(n)],
        "mixed": [f"i{i}" if i % 3 else (None if i % 2 else i) for i in range(n)],
    }[ids]
    expected = encoder._frames(first, 0, n, index, conf, {}, id_list)
    assert encoder.encode(first, index, conf, {}, id_list) == expected
