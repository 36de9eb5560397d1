"""Random bytes against the framing and every decoder, in-process.

Each property runs at least 10,000 examples (issue 5). The inputs are not only
uniform random bytes, which rarely get past a format's first byte, but also
valid payloads with bytes changed, inserted, deleted or cut off, and for npy,
json and pickle, payloads built from the format's own parts in random order
and with random values: that is how a decoder's deeper branches are reached.

What must hold for every input: no exception escapes, every row either decodes
to finite numbers or has a reason that names what was wrong (and that maps to
a metrics reason other than "other"), and a batch decodes the same whether its
payloads arrive one by one or as one same-length block (the NumPy fast paths).
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from digitstream.codecs.inputs import INPUT_FORMATS, Decoder, encode_images, reason_kind
from digitstream.wire.framing import FrameSplitter, FrameTooLarge, Payloads
from helpers import reference_frames

N_FEATURES = 64
#: at least 10,000 (issue 5); FUZZ_EXAMPLES=... runs more, or fewer while iterating
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 10_000))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

_rng = np.random.default_rng(5)
_IMAGES = np.vstack([np.rint(_rng.uniform(0, 16, size=(3, N_FEATURES))), np.zeros((1, N_FEATURES))])


def _valid_payloads(fmt: str) -> list[bytes]:
    out = list(encode_images(_IMAGES, fmt, labels=[1, 2, 3, 4], ids=["a", "b", "c", "d"]))
    if fmt == "pickle":
        out += [pickle.dumps(_IMAGES[0], protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1)]
        out += [pickle.dumps(_IMAGES[1].astype(dt)) for dt in ("u1", "<i4", ">f8", "<f4", "?")]
        out.append(pickle.dumps(_IMAGES[2].reshape(8, 8)))
    return out


VALID = {fmt: _valid_payloads(fmt) for fmt in INPUT_FORMATS}


class Tape:
    """Choices read off a byte string that hypothesis draws in one go.

    One ``st.binary`` draw costs hypothesis about as much as one integer, while a
    composite strategy pays per draw; reading every choice off one byte string
    keeps 10,000 examples within seconds, and shrinking the bytes still shrinks
    the payload.
    """

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        value = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return value

    def below(self, n: int) -> int:
        return (self.byte() << 8 | self.byte()) % n if n > 0 else 0

    def pick(self, options):
        return options[self.below(len(options))]

    def blob(self, most: int) -> bytes:
        return bytes(self.byte() for _ in range(self.below(most + 1)))


def _mutated(tape: Tape) -> bytes:
    """A valid payload with a few bytes set, inserted, deleted, or the end cut off."""
    data = bytearray(tape.pick(ALL_VALID))
    for _ in range(1 + tape.below(4)):
        op = tape.pick(("set", "set", "insert", "delete", "truncate"))
        pos = tape.below(len(data) + 1)
        if op == "set" and pos < len(data):
            data[pos] = tape.byte()
        elif op == "insert":
            data[pos:pos] = tape.blob(9) or b"\x00"
        elif op == "delete":
            del data[pos:pos + 1 + tape.below(9)]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


# Values NumPy never writes in an npy header, and some it does.
_ODD = [None, True, -1, 0, 1, 64, 2**31, 2**64, -64, 1.5, float("nan"), "", "a", "<f8", "|u1", "<i4",
        ">f8", "O", "<U4", "f16", "V8", "S3", (), [], {}, (64,), (8, 8), (None,), ("a",), ((),), (-1, -64),
        (64, 1.5), [64], [("a", "<f8")], {"a": 1}]


def _npy(tape: Tape) -> bytes:
    """An npy header with odd values where NumPy puts descr, fortran_order and shape."""
    header = {"descr": "<f8", "fortran_order": False, "shape": (N_FEATURES,)}
    for _ in range(1 + tape.below(3)):
        header[tape.pick(("descr", "fortran_order", "shape", "extra"))] = tape.pick(_ODD)
    text = repr(header).encode("latin1", "replace")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    size = tape.pick((8 * N_FEATURES, 4 * N_FEATURES, N_FEATURES, 0)) + tape.pick((0, 0, -1, 1, -8, 8))
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + b"\x01" * max(size, 0)


_JSON_ODD = [None, True, "1", [], [1.0], {}, 1e308, -0.0, 10**400, 2**63, -2**70, float("nan"),
             float("inf"), -float("inf"), 1e-320, 17, -3, "x" * 40]


def _json(tape: Tape) -> bytes:
    """A valid JSON image with values replaced, the list cut short, or the fields changed."""
    pixels = tape.pick(_IMAGES).tolist()
    for _ in range(tape.below(4)):
        pixels[tape.below(N_FEATURES)] = tape.pick(_JSON_ODD)
    pixels = pixels[:tape.pick((N_FEATURES, N_FEATURES, N_FEATURES - 1, 1, 0))]
    obj = {"pixels": pixels}
    for _ in range(tape.below(3)):
        obj[tape.pick(("label", "id", "pixels", "other"))] = tape.pick(_JSON_ODD)
    if tape.below(10) == 0:
        obj = tape.pick(_JSON_ODD)
    return json.dumps(obj).encode()


# Pieces of NumPy's array pickles and of pickle bombs, put together in random order.
_PICKLE_PIECES = [
    b"\x80\x02", b"\x80\x04", b"\x80\x05", b"cnumpy.core.multiarray\n_reconstruct\n",
    b"cnumpy\nndarray\n", b"cnumpy\ndtype\n", b"cnumpy._core.numeric\n_frombuffer\n",
    b"c_codecs\nencode\n", b"cos\nsystem\n", b"cbuiltins\neval\n", b"K\x00", b"K@", b"J\xff\xff\xff\xff",
    b"\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f", b"U\x01b", b"U\x02f8", b"U\x01<", b"U\x01O",
    b"X\x02\x00\x00\x00f8", b"U\x06latin1", b"\x89", b"\x88", b"N", b"(", b")", b"t", b"\x85", b"\x86",
    b"\x87", b"R", b"b", b"]", b"}", b"e", b"a", b"s", b"q\x00", b"h\x00", b"0", b"2",
    b"C\x08" + b"\x00" * 8, b"B\x00\x02\x00\x00" + b"\x01" * 512, b"T\xff\xff\xff\x7f",
    b"\x8e\xff\xff\xff\xff\xff\xff\xff\x7f", b"\x96\x00\x00\x00\x00\x01\x00\x00\x00", b"\x81", b"\x93",
    b"\x95\xff\xff\xff\xff\xff\xff\xff\x7f", b"(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t",
    b"(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x01t", b"\x82\x01", b"P1\n", b".",
]


def _pickle(tape: Tape) -> bytes:
    return b"".join(tape.pick(_PICKLE_PIECES) for _ in range(1 + tape.below(16)))


ALL_VALID = [p for fmt in INPUT_FORMATS for p in VALID[fmt]]
_BUILDERS = (_mutated, _npy, _json, _pickle)


def _batch(choice: int, raw: bytes, tape_bytes: bytes) -> list[bytes]:
    """One payload (random bytes, or one built off the tape), alone or several times; copies may
    differ in one byte, so the same-length fast paths (four frames or more of one length) see
    blocks that are alike but not equal."""
    tape = Tape(tape_bytes)
    first = raw if choice == 0 else _BUILDERS[choice - 1](tape)
    batch = [first] * tape.pick((1, 1, 2, 4, 5))
    if first and len(batch) >= 4:
        for _ in range(tape.below(3)):
            changed = bytearray(first)
            changed[tape.below(len(first))] = tape.byte()
            batch[1 + tape.below(len(batch) - 1)] = bytes(changed)
    return batch


batches = st.builds(_batch, st.integers(0, len(_BUILDERS)), st.binary(max_size=8 * N_FEATURES + 80),
                    st.binary(max_size=64))


DECODERS = [Decoder(fmt, N_FEATURES) for fmt in (*INPUT_FORMATS, "auto")]


def check_batch(decoder: Decoder, payloads: list[bytes]) -> None:
    n = len(payloads)
    one_by_one = decoder.decode(Payloads(items=list(payloads)))
    as_block = decoder.decode(Payloads.from_list(payloads))
    for out in (one_by_one, as_block):
        assert out.X.shape == (n, decoder.n_features)
        # float32 only for u8 and f32 payloads of the right size (exact in float32)
        assert out.X.dtype == np.float64 or decoder.fmt in ("u8", "f32")
        assert np.isfinite(out.X).all()
        assert set(out.errors) <= set(range(n))
        for i, reason in out.errors.items():
            assert isinstance(reason, str) and reason, (i, reason)
            assert reason_kind(reason) != "other", reason
            assert not out.X[i].any()
    assert one_by_one.errors.keys() == as_block.errors.keys()
    assert np.array_equal(one_by_one.X, as_block.X)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # NumPy on odd dtype names, e.g. 'a'
@FUZZ
@given(batches)
def test_random_bytes_every_decoder(payloads):
    """Every example goes through every decoder (u8, f32, f64, npy, json, pickle, auto)."""
    for decoder in DECODERS:
        check_batch(decoder, payloads)


def _stream(kind: int, blob: bytes, tape_bytes: bytes) -> tuple[bytes, list[int]]:
    """Random bytes, or frames of random payloads (some alike, in a run), then random bytes;
    and where the reads are cut."""
    tape = Tape(tape_bytes)
    if kind == 0:
        stream = blob
    elif kind == 1:
        stream, pos = b"", 0
        while pos < len(blob):
            n = tape.below(41)
            stream += len(blob[pos:pos + n]).to_bytes(4, "big") + blob[pos:pos + n]
            pos += max(n, 1)
    else:
        payload = blob[:tape.below(9)]
        stream = (len(payload).to_bytes(4, "big") + payload) * (1 + tape.below(12)) + blob[-tape.below(13):]
    cuts = sorted({tape.below(len(stream) + 1) for _ in range(tape.below(5))})
    return stream, cuts


_streams = st.builds(_stream, st.integers(0, 2), st.binary(max_size=300), st.binary(max_size=24))


@FUZZ
@given(stream_and_cuts=_streams, max_frame=st.sampled_from([0, 1, 7, 40, 1 << 20]))
def test_random_bytes_framing(stream_and_cuts, max_frame):
    """Any bytes, cut into reads anywhere: the reference's frames, or FrameTooLarge at the first
    header above the limit, with every frame before it still handed out."""
    stream, cuts = stream_and_cuts
    splitter = FrameSplitter(max_frame)
    frames: list[bytes] = []
    raised = None
    start = 0
    for cut in cuts + [len(stream)]:
        try:
            for group in splitter.feed(stream[start:cut]):
                frames.extend(group.to_list())
        except FrameTooLarge as exc:
            raised = exc
            frames.extend(p for g in exc.groups for p in g.to_list())
            break
        start = cut
    expected, too_large = reference_frames(stream, max_frame)
    assert frames == expected
    assert (raised is not None) == too_large
    if raised is None:
        assert splitter.pending == len(stream) - sum(4 + len(f) for f in frames)
    else:
        assert raised.length > max_frame


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def json_flow():
    from sklearn.linear_model import LogisticRegression

    from digitstream.pipeline import Flow, FlowOptions

    X = np.vstack([_IMAGES, _IMAGES + 1])
    model = LogisticRegression(max_iter=500).fit(X, [0, 1, 2, 3] * 2)
    return Flow.build(model, FlowOptions("json", "json"))


@settings(FUZZ, max_examples=max(1, EXAMPLES // 5),
          suppress_health_check=[*FUZZ.suppress_health_check, HealthCheck.function_scoped_fixture])
@given(tapes=st.lists(st.binary(max_size=64), min_size=1, max_size=6))
def test_every_json_output_frame_is_strict_json(json_flow, tapes):
    """Fuzzed JSON payloads (odd values for pixels, labels and ids: NaN, infinities, huge
    numbers, objects, lists) through a whole flow with json output: one frame per payload,
    each valid RFC 8259 JSON with its sequence number."""
    from digitstream.batch import Batch
    from digitstream.wire.framing import iter_frames

    payloads = [_json(Tape(t)) for t in tapes]
    result = json_flow.process(Batch(1, 10, Payloads.from_list(payloads)))
    answers = [_strict_json(f.decode()) for f in iter_frames(result.output)]
    assert [a["seq"] for a in answers] == list(range(10, 10 + len(payloads)))
    for answer in answers:
        assert ("error" in answer) != ("label" in answer), answer
