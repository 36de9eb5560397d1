"""Input and output codecs: every format, the seed's pickles old and new, the safe unpickler."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest

from digitstream.codecs.inputs import INPUT_FORMATS, Decoder, encode_images, reason_kind
from digitstream.codecs.outputs import JsonEncoder, TextEncoder, seed_label_text
from digitstream.codecs.safe_pickle import PickleTemplates, UnsafePickle, restricted_loads
from digitstream.wire.framing import FrameSplitter, Payloads, frame_many
from helpers import py2_pickle


def decode(fmt: str, payloads: list[bytes], n_features: int = 64):
    decoder = Decoder(fmt, n_features)
    results = [decoder.decode(g) for g in FrameSplitter().feed(frame_many(payloads))]
    X = np.vstack([r.X for r in results])
    errors, offset = {}, 0
    for r in results:
        errors.update({offset + i: reason for i, reason in r.errors.items()})
        offset += len(r.X)
    return X, errors


@pytest.mark.parametrize("fmt", INPUT_FORMATS)
def test_every_format_round_trips_the_digits(fmt, digits):
    X, errors = decode(fmt, encode_images(digits.X, fmt, labels=digits.y))
    assert errors == {}
    assert np.array_equal(X, digits.X)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_auto_accepts_python3_pickles_of_every_protocol(protocol, digits):
    X, errors = decode("auto", [pickle.dumps(row, protocol=protocol) for row in digits.X])
    assert errors == {} and np.array_equal(X, digits.X)


@pytest.mark.parametrize("protocol", [0, 2])
def test_python2_cpickle_streams_are_understood(protocol, digits):
    rows = digits.X[:50]
    payloads = [py2_pickle(row, protocol) for row in rows]
    for payload, row in zip(payloads, rows):
        assert np.array_equal(restricted_loads(payload), row)
    X, errors = decode("pickle", payloads)
    assert errors == {} and np.array_equal(X, rows)


def test_numpy_before_2_module_names_load(digits):
    row = digits.X[7]
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps(row, protocol=protocol)
        if protocol < 4:
            old = data.replace(b"numpy._core", b"numpy.core")
            assert np.array_equal(restricted_loads(old), row)


def test_fast_path_and_unpickler_agree_on_every_image(digits):
    templates = PickleTemplates(64)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        payloads = [pickle.dumps(row, protocol=protocol) for row in digits.X]
        slow = np.array([restricted_loads(p) for p in payloads])
        assert np.array_equal(slow, digits.X)
        if protocol < 3:  # bytes are pickled as text: no fixed layout, always the slow path
            X, errors = decode("pickle", payloads)
            assert errors == {} and np.array_equal(X, slow)
            continue
        rows = np.frombuffer(b"".join(payloads), dtype=np.uint8).reshape(len(payloads), -1)
        ok, pixels = templates.match(rows)
        assert ok.all()
        assert np.array_equal(pixels, slow)


def test_a_changed_byte_outside_the_pixels_never_gives_a_wrong_image(digits):
    templates = PickleTemplates(64)
    decoder = Decoder("pickle", 64)
    rng = np.random.default_rng(1)
    row = digits.X[11]
    for protocol in (3, 4, 5):
        payload = pickle.dumps(row, protocol=protocol)
        offset = payload.find(row.tobytes())
        outside = [i for i in range(len(payload)) if not offset <= i < offset + 512]
        for position in outside:
            changed = bytearray(payload)
            changed[position] = (changed[position] + int(rng.integers(1, 256))) % 256
            rows = np.frombuffer(bytes(changed), dtype=np.uint8).reshape(1, -1)
            ok, _ = templates.match(rows)
            assert not ok[0], f"byte {position} of protocol {protocol} changed, fast path matched"
            result = decoder.decode(Payloads(fixed=rows))
            if 0 not in result.errors:  # the slow path read it: it must be the real content
                assert np.array_equal(result.X[0], restricted_loads(bytes(changed)).reshape(-1))


class _Exploit:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


def test_forbidden_globals_are_refused_and_nothing_runs(tmp_path):
    import builtins
    import subprocess

    target = tmp_path / "pwned"
    attacks = [
        _Exploit(os.system, f"touch {target}"),
        _Exploit(builtins.eval, f"open({str(target)!r}, 'w')"),
        _Exploit(builtins.exec, f"open({str(target)!r}, 'w')"),
        _Exploit(subprocess.Popen, ["touch", str(target)]),
    ]
    for attack in attacks:
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            with pytest.raises(pickle.UnpicklingError):
                restricted_loads(pickle.dumps(attack, protocol=protocol))
    assert not target.exists()
    X, errors = decode("auto", [pickle.dumps(attacks[0]), pickle.dumps(np.ones(64))])
    assert set(errors) == {0} and "forbidden global" in errors[0]
    assert reason_kind(errors[0]) == "pickle"
    assert np.array_equal(X[1], np.ones(64))
    assert not target.exists()


def test_allowed_names_cannot_be_misused():
    reconstruct_wrong_class = (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\ndtype\nK\x00\x85"
                               b"U\x01b\x87R.")
    with pytest.raises(UnsafePickle):
        restricted_loads(reconstruct_wrong_class)
    object_dtype = b"\x80\x02cnumpy\ndtype\nU\x02O8K\x00K\x01\x87R."
    with pytest.raises(UnsafePickle):
        restricted_loads(object_dtype)


def test_wrong_values_come_back_as_reasons():
    payloads = [
        b"",
        np.ones(63, dtype="u1").tobytes(),
        pickle.dumps(np.ones(10)),
        pickle.dumps(np.full(64, np.nan)),
        pickle.dumps(np.array(["a"] * 64)),
        pickle.dumps([1.0] * 64),
        b"\x80\x04garbage",
        np.ones(64, dtype="u1").tobytes(),
    ]
    X, errors = decode("u8", payloads[:2] + payloads[-1:])
    assert sorted(errors) == [0, 1] and "expected 64 bytes" in errors[1]
    assert np.array_equal(X[2], np.ones(64))
    X, errors = decode("pickle", payloads[2:7])
    assert sorted(errors) == [0, 1, 2, 3, 4]
    assert "expected 64 values" in errors[0]
    assert "NaN" in errors[1]
    assert reason_kind(errors[1]) == "non_finite"


def test_npy_payloads_are_read_without_pickle():
    buffer = io.BytesIO()
    np.save(buffer, np.array([object()] * 64, dtype=object), allow_pickle=True)
    X, errors = decode("npy", [buffer.getvalue()])
    assert "not a plain numeric type" in errors[0]
    buffer = io.BytesIO()
    np.save(buffer, np.arange(64, dtype="<i4").reshape(8, 8))
    X, errors = decode("npy", [buffer.getvalue()])
    assert errors == {} and np.array_equal(X[0], np.arange(64))


def test_json_carries_label_and_id():
    decoder = Decoder("json", 3)
    out = decoder.decode(Payloads(items=[b'{"pixels":[1,2,3],"label":7,"id":"a"}', b'{"pixels":[1]}',
                                         b"[1,2,3]", b'{"pixels":[1,2,"x"]}']))
    assert out.labels[0] == 7 and out.ids[0] == "a"
    assert sorted(out.errors) == [1, 2, 3]


def test_text_output_is_the_seeds_string():
    classes = np.arange(10)
    assert seed_label_text(np.int64(3)) == "[3]"
    encoder = TextEncoder(classes)
    data = encoder.encode(0, np.array([3, 0, 9]), None, {1: "bad pickle: x"})
    assert data == frame_many([b"[3]", b"error: bad pickle: x", b"[9]"])


def test_json_output_has_seq_label_probability():
    import json

    encoder = JsonEncoder(np.array(["cat", "dog"]))
    data = encoder.encode(10, np.array([1, 0]), np.array([0.75, 0.5]), {1: "empty payload"}, ["a", None])
    first, second = [json.loads(f) for f in FrameSplitter().feed(data)[0].to_list()]
    assert first == {"seq": 10, "label": "dog", "probability": 0.75, "id": "a"}
    assert second == {"seq": 11, "error": "empty payload"}
