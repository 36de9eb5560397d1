"""Bad input end to end (issue 5): what is sent, what comes back, and that the
application keeps serving with nothing lost.

Four applications run for the whole module (see ``SERVED``), each with its own
listener; every test sends on fresh connections and compares the listener's
new frames and the application's counters (``/api/stats``) before and after.
A valid image follows every bad one, so each test also shows that the
connection, and the application, still serve.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pytest

from digitstream.codecs.inputs import INPUT_FORMATS, encode_images, reason_kind
from digitstream.wire.framing import HEADER, frame, frame_many
from helpers import (
    HOST,
    TIMEOUT,
    AppProcess,
    Collector,
    app_counts,
    memory_of,
    raise_open_files,
    reference_frames,
    send_bytes,
    wait_for,
)

#: formats served by a running application in this module: ``auto`` (the seed's default,
#: which takes pickle, npy and json), json (answered in JSON), u8 and f32. Every format's
#: decoder also meets the same bad payloads in-process, and test_e2e.py runs each format end
#: to end; an application per format would cost more start-up than a 2-core machine has.
SERVED = ("auto", "json", "u8", "f32")
#: the u8 application runs with a small --max-frame, for the oversized-header case
SMALL_MAX_FRAME = 4096
#: start-up on a loaded machine can take many times its usual second or two
START_TIMEOUT = 180


class Served:
    """One running application and its listener."""

    def __init__(self, fmt: str, app: AppProcess, collector: Collector):
        self.fmt = fmt
        self.app = app
        self.collector = collector
        self.json_output = fmt == "json"

    def counts(self) -> dict:
        return app_counts(self.app.stats())

    def exchange(self, payloads: list[bytes], timeout: float = TIMEOUT) -> list[str]:
        """Send ``payloads`` on one new connection; the result frames they get."""
        before = self.collector.count()
        send_bytes(self.app.in_port, frame_many(payloads))
        return self.collector.wait_count(before + len(payloads), timeout)[before:]

    def new_results(self, before: int, n: int) -> list[str]:
        return self.collector.wait_count(before + n)[before:]


#: the json application starts under this soft limit on open files, lower than the
#: 500 connections it must serve at once: it raises the limit itself
LOW_OPEN_FILES = 256


def _start_with_open_files_limit(limit: int, start):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, soft), hard))
    try:
        return start()  # the child inherits the limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def served(model_dir):
    """An application per input format (``auto`` is the seed's default), started together.
    The json one answers in JSON, so the ``error`` field is checked too."""
    raise_open_files(2048)  # for the 500 client sockets of this process
    started: dict[str, Served] = {}
    try:
        for fmt in ("json", *(f for f in SERVED if f != "json")):
            collector = Collector()
            args = [] if fmt == "auto" else ["--input-format", fmt]
            if fmt == "json":
                args += ["--output-format", "json"]
            if fmt == "u8":
                args += ["--max-frame", str(SMALL_MAX_FRAME)]
            app = _start_with_open_files_limit(
                LOW_OPEN_FILES if fmt == "json" else 1 << 30,
                lambda: AppProcess(model_dir, collector.port, *args))
            started[fmt] = Served(fmt, app, collector)
        for s in started.values():
            s.app.wait_ready(START_TIMEOUT)
        yield started
    finally:
        for s in started.values():  # all stop at once; stop() then waits for each
            if s.app.proc.poll() is None:
                s.app.signal()
        for s in started.values():
            s.app.stop()
            s.collector.close()


@pytest.fixture(scope="module")
def labels(seed_pipeline, digits):
    return seed_pipeline.predict(digits.X)


def valid(fmt: str, digits, i: int) -> bytes:
    encoding = "pickle" if fmt == "auto" else fmt
    return encode_images(digits.X[i:i + 1], encoding, ids=[f"valid-{i}"])[0]


def npy_bytes(array, allow_pickle=False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def json_bytes(pixels) -> bytes:
    return json.dumps({"pixels": pixels}).encode()


ones = [1.0] * 64
# Per format: (payload, words the reason must hold, metrics reason)
BAD = {
    "pickle": [
        (b"\x80\x04this is not a pickle", "bad pickle", "pickle"),
        (b"\x80\x02]q\x00(K\x01K\x02e", "bad pickle", "pickle"),  # cut short
        (pickle.dumps([1.0] * 64), "pickle holds list, expected a NumPy array", "pickle"),
        (pickle.dumps(np.ones(63)), "expected 64 values, got 63", "size"),
        (pickle.dumps(np.ones((8, 9))), "expected 64 values, got 72", "size"),
        (pickle.dumps(np.full(64, np.nan)), "NaN or infinity", "non_finite"),
        (pickle.dumps(np.r_[np.ones(63), np.inf]), "NaN or infinity", "non_finite"),
        (pickle.dumps(np.array([1, "a"] * 32, dtype=object)), "dtype object", "pickle"),
        (pickle.dumps(np.array(["a"] * 64)), "<U1", "pickle"),
        (pickle.dumps(np.zeros(64, dtype=complex)), "complex128", "pickle"),
        (pickle.dumps(np.zeros(64, dtype=[("a", "<f8")])), "not a plain numeric type", "pickle"),
    ],
    "npy": [
        (b"\x93NUMPY\x01\x00\x10\x00{'descr': <junk}", "bad npy header", "npy"),
        (b"\x93NUMPY\x01\x00\xff\x00{'descr': '<f8'}", "npy header is truncated", "npy"),
        (b"hello, not an npy file", "not an npy payload", "npy"),
        (npy_bytes(np.ones(65)), "expected 64 values, got shape (65,)", "size"),
        (npy_bytes(np.ones(64))[:-100], "npy payload holds 412 data bytes, expected 512", "npy"),
        (npy_bytes(np.full(64, np.inf)), "NaN or infinity", "non_finite"),
        (npy_bytes(np.array([None] * 64), allow_pickle=True), "npy dtype object", "npy"),
        (npy_bytes(np.array(["ab"] * 64)), "npy dtype <U2", "npy"),
        (npy_bytes(np.zeros(64, dtype=complex)), "complex128", "npy"),
        (npy_bytes(np.asfortranarray(np.ones((8, 8)))), "fortran-ordered", "npy"),
    ],
    "u8": [
        (bytes(63), "expected 64 bytes (64 u8 values), got 63", "size"),
        (bytes(65), "expected 64 bytes (64 u8 values), got 65", "size"),
    ],
    "f32": [
        (bytes(255), "expected 256 bytes (64 f32 values), got 255", "size"),
        (np.full(64, np.nan, "<f4").tobytes(), "NaN or infinity", "non_finite"),
        (np.r_[np.ones(63), -np.inf].astype("<f4").tobytes(), "NaN or infinity", "non_finite"),
    ],
    "f64": [
        (bytes(8 * 63), "expected 512 bytes (64 f64 values), got 504", "size"),
        (np.full(64, np.nan).tobytes(), "NaN or infinity", "non_finite"),
        (np.r_[np.inf, np.ones(63)].tobytes(), "NaN or infinity", "non_finite"),
    ],
    "json": [
        (b'{"pixels": [1, 2,', "bad json", "json"),
        (b"\xff\xfe\x00\x00", "bad json", "json"),
        (b"[1, 2, 3]", 'expected an object with "pixels"', "json"),
        (b'{"label": 3}', 'expected an object with "pixels"', "json"),
        (json_bytes(ones[:63]), "expected 64 values, got 63", "size"),
        (json_bytes(ones[:63] + [float("nan")]), "NaN or infinity", "non_finite"),
        (json_bytes(ones[:63] + [float("inf")]), "NaN or infinity", "non_finite"),
        (b'{"pixels": [' + b"1," * 63 + b"1e999]}", "NaN or infinity", "non_finite"),
        (json_bytes(ones[:63] + ["1"]), '"pixels" must be a flat list of numbers', "json"),
        (json_bytes(ones[:63] + [True]), '"pixels" must be a flat list of numbers', "json"),
        (json_bytes(ones[:63] + [None]), '"pixels" must be a flat list of numbers', "json"),
        (json_bytes([ones[:32], ones[:32]]), '"pixels" must be a flat list of numbers', "json"),
        (json_bytes(ones[:63] + [10**400]), "out of range", "json"),
    ],
}
# auto tells the formats apart by their first bytes: npy magic, "{", else pickle
BAD["auto"] = BAD["pickle"] + [b for b in BAD["npy"] if b[0].startswith(b"\x93NUMPY")] \
    + [b for b in BAD["json"] if b[0].startswith(b"{")]


@pytest.mark.parametrize("fmt", [*INPUT_FORMATS, "auto"])
def test_every_decoder_names_what_was_expected_and_what_came(fmt, digits):
    """In-process, every format (the served ones below do the same over sockets)."""
    from digitstream.codecs.inputs import Decoder
    from digitstream.wire.framing import Payloads

    out = Decoder(fmt, 64).decode(Payloads(items=[b for b, _, _ in BAD[fmt]] + [valid(fmt, digits, 0)]))
    assert sorted(out.errors) == list(range(len(BAD[fmt])))
    for i, (_, words, kind) in enumerate(BAD[fmt]):
        assert words in out.errors[i] and reason_kind(out.errors[i]) == kind, (out.errors[i], words)
    assert np.array_equal(out.X[-1], digits.X[0])


def interleave(bad: list[bytes], good: list[bytes]) -> list[bytes]:
    """good[0], bad[0], good[1], bad[1], ..., good[-1]: every bad payload between two valid ones."""
    out = [good[0]]
    for b, g in zip(bad, good[1:]):
        out += [b, g]
    return out


def check_answers(s: Served, answers: list[str], expected: list[tuple[str, str] | int],
                  first_seq: int = 0) -> None:
    """``expected`` holds, per frame, the label of a valid image or (reason words, kind)."""
    assert len(answers) == len(expected)
    for seq, (answer, want) in enumerate(zip(answers, expected), start=first_seq):
        if s.json_output:
            obj = json.loads(answer)
            assert obj["seq"] == seq, (obj, seq)
            if isinstance(want, tuple):
                assert "label" not in obj and want[0] in obj["error"], (obj, want)
                assert reason_kind(obj["error"]) == want[1], obj
            else:
                assert obj["label"] == want and "error" not in obj, (obj, want)
        elif isinstance(want, tuple):
            assert answer.startswith("error: ") and want[0] in answer, (answer, want)
            assert reason_kind(answer[len("error: "):]) == want[1], answer
        else:
            assert answer == str(np.array([want])), (answer, want)


def rejected_since(s: Served, before: dict) -> Counter:
    after = s.counts()
    return Counter(after["rejected"]) - Counter(before["rejected"])


@pytest.mark.parametrize("fmt", SERVED)
def test_undecodable_wrong_size_non_finite_and_non_numeric(fmt, served, digits, labels):
    """Each bad payload gets its own error frame at its place, counted by reason; the valid
    image after it is classified."""
    s = served[fmt]
    bad = BAD[fmt]
    good_index = list(range(100, 100 + len(bad) + 1))
    before = s.counts()
    payloads = interleave([b for b, _, _ in bad], [valid(fmt, digits, i) for i in good_index])
    answers = s.exchange(payloads)
    expected = interleave([(words, kind) for _, words, kind in bad], [labels[i] for i in good_index])
    check_answers(s, answers, expected)
    assert rejected_since(s, before) == Counter(kind for _, _, kind in bad)
    after = s.counts()
    assert after["messages_in"] - before["messages_in"] == len(payloads)
    assert after["messages_out"] - before["messages_out"] == len(payloads)


@pytest.mark.parametrize("fmt", SERVED)
def test_a_zero_length_frame_gets_an_error_frame(fmt, served, digits, labels):
    s = served[fmt]
    before = s.counts()
    answers = s.exchange([b"", valid(fmt, digits, 7), b"", b""])
    empty = ("empty payload", "empty")
    check_answers(s, answers, [empty, labels[7], empty, empty])
    assert rejected_since(s, before) == Counter(empty=3)


class _Call:
    """A pickle that calls ``function(*args)`` when plain ``pickle.loads`` reads it."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def attack_pickles(target) -> list[tuple[str, bytes]]:
    """Pickles that create the file ``target`` (named ``*.npy``, as numpy.save insists) when
    unpickled with plain ``pickle.loads``."""
    import builtins
    import importlib
    import subprocess as sp

    path = str(target)
    py_create = f"open({path!r}, 'w').close()"
    attacks = [
        ("os.system", _Call(os.system, f"touch {path}")),
        ("builtins.eval", _Call(builtins.eval, py_create)),
        ("builtins.exec", _Call(builtins.exec, py_create)),
        ("builtins.open", _Call(builtins.open, path, "w")),
        ("subprocess.Popen", _Call(sp.Popen, ["touch", path])),
        ("subprocess.call", _Call(sp.call, ["touch", path])),
        ("numpy.save", _Call(np.save, path, np.zeros(1))),
    ]
    out = [(f"{name}, protocol {p}", pickle.dumps(obj, protocol=p))
           for name, obj in attacks for p in range(pickle.HIGHEST_PROTOCOL + 1)]
    # importlib.import_module('os') then getattr(module, 'system')('touch ...'), by hand
    chain = (b"\x80\x02cbuiltins\ngetattr\n(cimportlib\nimport_module\n(X\x02\x00\x00\x00ostR"
             b"X\x06\x00\x00\x00systemtR(X" + len(f"touch {path}").to_bytes(4, "little")
             + f"touch {path}".encode() + b"tR.")
    out.append(("importlib.import_module", chain))
    # the same call through the opcodes that create objects without REDUCE
    command = f"touch {path}".encode()
    out.append(("INST os.system", b"(S'" + command + b"'\nios\nsystem\n."))
    out.append(("OBJ os.system", b"(cos\nsystem\nS'" + command + b"'\no."))
    # a global inside NumPy's own modules that is not on the allow-list
    out.append(("numpy.testing runstring", pickle.dumps(
        _Call(importlib.import_module("numpy.testing._private.utils").runstring,
              f"open({path!r}, 'w').close()", {}))))
    return out


def test_attack_pickles_do_create_the_file_when_unpickled_plainly(tmp_path):
    """The control for the tests below: each attack pickle is live. Plain ``pickle.loads``
    reads them in a throwaway process, each aimed at a file of its own."""
    names = [name for name, _ in attack_pickles(tmp_path / "x.npy")]
    targets = [tmp_path / f"control-{i}.npy" for i in range(len(names))]
    payloads = [attack_pickles(target)[i][1] for i, target in enumerate(targets)]
    script = ("import pickle, struct, sys\n"
              "data = sys.stdin.buffer.read()\n"
              "pos = 0\n"
              "while pos < len(data):\n"
              "    (n,) = struct.unpack_from('>I', data, pos)\n"
              "    try:\n"
              "        pickle.loads(data[pos + 4:pos + 4 + n])\n"
              "    except Exception:\n"
              "        pass\n"
              "    pos += 4 + n\n")
    subprocess.run([sys.executable, "-c", script], input=frame_many(payloads), timeout=TIMEOUT,
                   capture_output=True, cwd=tmp_path)
    for name, target in zip(names, targets):
        wait_for(target.exists, what=f"{name} to create its file")


def test_pickles_naming_forbidden_globals_run_nothing_in_process(tmp_path):
    from digitstream.codecs.inputs import Decoder
    from digitstream.wire.framing import Payloads

    target = tmp_path / "created-by-an-attack.npy"
    attacks = attack_pickles(target)
    for fmt in ("pickle", "auto"):
        out = Decoder(fmt, 64).decode(Payloads(items=[data for _, data in attacks]))
        assert sorted(out.errors) == list(range(len(attacks)))
        assert all(reason_kind(r) == "pickle" for r in out.errors.values())
    assert not target.exists()


def test_pickles_naming_forbidden_globals_run_nothing(served, digits, labels, tmp_path):
    fmt = "auto"
    s = served[fmt]
    target = tmp_path / "created-by-an-attack.npy"
    attacks = attack_pickles(target)
    before = s.counts()
    good = list(range(300, 300 + len(attacks) + 1))
    answers = s.exchange(interleave([data for _, data in attacks],
                                    [valid(fmt, digits, i) for i in good]))
    for (name, _), answer in zip(attacks, answers[1::2]):
        assert answer.startswith("error: bad pickle: "), (name, answer)
        assert "forbidden global" in answer or "not allowed" in answer, (name, answer)
    assert answers[0::2] == [str(np.array([labels[i]])) for i in good]
    assert rejected_since(s, before) == Counter(pickle=len(attacks))
    assert not target.exists()


def pickle_bombs() -> list[tuple[str, bytes]]:
    real = pickle.dumps(np.ones(64), protocol=2)
    shape_at = real.index(b"K@\x85")  # the (64,) shape in the array's state

    def with_shape(shape_opcodes: bytes) -> bytes:
        return real[:shape_at] + shape_opcodes + real[shape_at + 3:]

    huge = (1 << 62).to_bytes(8, "little")
    return [
        ("deep nesting, 1 MiB of MARK", b"\x80\x02" + b"(" * ((1 << 20) - 3) + b"."),
        ("deep nesting, 1 MiB of empty lists", b"]" * ((1 << 20) - 1) + b"."),
        ("deep nesting under the size cap", b"\x80\x02" + b"]" * 3000 + b"a" * 2999 + b"."),
        ("one list referenced 3,000 times", b"\x80\x02]q\x00(" + b"h\x00" * 3000 + b"e."),
        ("a list nested in itself", b"\x80\x02]q\x00h\x00a" * 1000 + b"."),
        ("BINBYTES8 of 2**62 bytes", b"\x80\x04\x8e" + huge + b"x."),
        ("BINUNICODE8 of 2**62 bytes", b"\x80\x04\x8d" + huge + b"x."),
        ("BYTEARRAY8 of 2**62 bytes", b"\x80\x05\x96" + huge + b"x."),
        ("FRAME of 2**62 bytes", b"\x80\x04\x95" + huge + b"x."),
        ("LONG4 of 2 GiB", b"\x80\x02\x8b\xff\xff\xff\x7fx."),
        ("BINSTRING of 2 GiB", b"\x80\x02T\xff\xff\xff\x7fx."),
        ("BINBYTES of 2 GiB", b"\x80\x03B\xff\xff\xff\x7fx."),
        ("shape (10**12,) in __setstate__", with_shape(b"\x8a\x05\x00\x10\xa5\xd4\xe8\x85")),
        ("shape (2**31-1, 2**31-1)", with_shape(b"J\xff\xff\xff\x7fJ\xff\xff\xff\x7f\x86")),
        ("shape (-1,)", with_shape(b"J\xff\xff\xff\xff\x85")),
        ("_frombuffer of shape (2**40,)", b"\x80\x02cnumpy._core.numeric\n_frombuffer\n(C\x08"
         + bytes(8) + b"cnumpy\ndtype\nU\x02f8\x89\x88\x87R\x8a\x06\x00\x00\x00\x00\x00\x01\x85"
         b"U\x01Ct" + b"R."),
        ("dtype with a subarray of 2**31 values", b"\x80\x02cnumpy\ndtype\nU\x10(2147483647,)f8"
         b"\x89\x88\x87R."),
        ("numpy.ndarray called with 2**40 values", b"\x80\x02cnumpy\nndarray\n\x8a\x06"
         + bytes(5) + b"\x01\x85U\x02u1\x86R."),
    ]


def test_pickle_bombs_are_rejected_in_bounded_time_and_memory(served, digits, labels):
    s = served["auto"]
    pid = s.app.proc.pid
    rss_before, peak_before = memory_of(pid)
    before = s.counts()
    bombs = pickle_bombs()
    good = list(range(500, 500 + len(bombs) + 1))
    start = time.monotonic()
    answers = s.exchange(interleave([data for _, data in bombs],
                                    [valid("auto", digits, i) for i in good]))
    elapsed = time.monotonic() - start
    rss_after, peak_after = memory_of(pid)
    for (name, _), answer in zip(bombs, answers[1::2]):
        assert answer.startswith("error: bad pickle: "), (name, answer)
    assert answers[0::2] == [str(np.array([labels[i]])) for i in good]
    assert rejected_since(s, before) == Counter(pickle=len(bombs))
    # About 2.3 MiB of bombs: they cost milliseconds and no lasting memory; the bounds are
    # loose so that a busy machine cannot fail them.
    assert elapsed < 20, f"{len(bombs)} bombs took {elapsed:.1f} s"
    assert peak_after - peak_before < 64 << 20, (peak_before, peak_after)
    assert rss_after - rss_before < 64 << 20, (rss_before, rss_after)
    print(f"\n{len(bombs)} pickle bombs answered in {elapsed * 1000:.0f} ms; application RSS "
          f"{rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB, peak "
          f"{peak_before / 2**20:.0f} -> {peak_after / 2**20:.0f} MiB")


def _recv_until_closed(sock: socket.socket, timeout: float = TIMEOUT) -> bool:
    """True once the peer has closed ``sock`` (end of stream or reset), within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def test_a_header_above_max_frame_closes_only_that_connection(served, digits, labels):
    s = served["u8"]
    before = s.counts()
    other = socket.create_connection((HOST, s.app.in_port), timeout=TIMEOUT)
    bad = socket.create_connection((HOST, s.app.in_port), timeout=TIMEOUT)
    try:
        start = s.collector.count()
        other.sendall(frame_many(valid("u8", digits, i) for i in range(10)))
        assert s.new_results(start, 10) == [str(np.array([labels[i]])) for i in range(10)]
        length = SMALL_MAX_FRAME + 1
        bad.sendall(frame_many(valid("u8", digits, i) for i in range(20, 23))
                    + HEADER.pack(length) + bytes(100))
        # the frames before the bad header are answered, then the connection is closed
        assert s.new_results(start + 10, 3) == [str(np.array([labels[i]])) for i in range(20, 23)]
        assert _recv_until_closed(bad)
        peer = "%s:%d" % bad.getsockname()
        wait_for(lambda: any(peer in line and f"frame length {length} exceeds" in line
                             for line in s.app.log().splitlines()),
                 what="a log line naming the peer and the length")
        other.sendall(frame_many(valid("u8", digits, i) for i in range(30, 40)))
        assert s.new_results(start + 13, 10) == [str(np.array([labels[i]])) for i in range(30, 40)]
    finally:
        other.close()
        bad.close()
    after = s.counts()
    assert after["connection_errors"].get("frame_too_large", 0) \
        == before["connection_errors"].get("frame_too_large", 0) + 1
    assert after["messages_in"] - before["messages_in"] == 23


def test_a_connection_closing_mid_frame_loses_only_the_partial_frame(served, digits, labels):
    s = served["f32"]
    before = s.counts()
    start = s.collector.count()
    whole = [valid("f32", digits, i) for i in range(40, 45)]
    partial = frame(valid("f32", digits, 45))[:4 + 100]
    sock = socket.create_connection((HOST, s.app.in_port), timeout=TIMEOUT)
    sock.sendall(frame_many(whole) + partial)
    peer = "%s:%d" % sock.getsockname()
    sock.close()
    assert s.new_results(start, 5) == [str(np.array([labels[i]])) for i in range(40, 45)]
    wait_for(lambda: any(peer in line and "104 bytes of a partial frame dropped" in line
                         for line in s.app.log().splitlines()),
             what="the partial-frame log line")
    after = s.counts()
    assert after["messages_in"] - before["messages_in"] == 5
    assert after["connection_errors"].get("partial_frame", 0) \
        == before["connection_errors"].get("partial_frame", 0) + 1
    assert s.exchange([valid("f32", digits, 46)]) == [str(np.array([labels[46]]))]
    assert s.collector.count() == start + 6


def test_slow_and_silent_connections_do_not_slow_the_others(served, digits, labels):
    """A client that sends one byte a second, and twenty that connect and send nothing, while a
    normal client's 1,797 images are classified: the normal client is answered in full while
    the slow one is still on its first frame."""
    s = served["u8"]
    baseline = s.counts()["connections_open"]
    silent = [socket.create_connection((HOST, s.app.in_port), timeout=TIMEOUT) for _ in range(20)]
    slow = socket.create_connection((HOST, s.app.in_port), timeout=TIMEOUT)
    slow_frame = frame(valid("u8", digits, 60))
    dripped = [0]
    stop = threading.Event()

    def drip():  # one byte a second (the wait is the pace, not a synchronisation)
        while dripped[0] < len(slow_frame) - 1 and not stop.wait(1.0):
            slow.sendall(slow_frame[dripped[0]:dripped[0] + 1])
            dripped[0] += 1

    dripper = threading.Thread(target=drip)
    dripper.start()
    try:
        wait_for(lambda: s.counts()["connections_open"] >= baseline + 21,
                 what="the silent and slow clients to be connected")
        start = s.collector.count()
        t0 = time.monotonic()
        send_bytes(s.app.in_port, frame_many(encode_images(digits.X, "u8")))
        answers = s.new_results(start, len(digits.X))
        elapsed = time.monotonic() - t0
        assert answers == [str(np.array([label])) for label in labels]
        assert dripped[0] < len(slow_frame) - 1, "the slow client finished first"
        assert elapsed < 10, f"{elapsed:.1f} s for 1,797 images next to a slow client"
    finally:
        stop.set()
        dripper.join(TIMEOUT)
    slow.sendall(slow_frame[dripped[0]:])  # the slow client, too, is answered
    assert s.new_results(start + len(digits.X), 1) == [str(np.array([labels[60]]))]
    for sock in [slow, *silent]:
        sock.close()
    wait_for(lambda: s.counts()["connections_open"] == baseline, what="the connections to close")
    print(f"\n1,797 images answered in {elapsed * 1000:.0f} ms beside 1 slow and 20 silent clients")


def _open_files_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max open files"))
    return int(line.split()[3])


def test_500_connections_at_once_are_all_served(served, digits, labels):
    """500 clients connect, all stay connected, each sends two images with ids; every answer
    arrives, in order per connection. The application was started under a soft limit of 256
    open files and raised it itself."""
    s = served["json"]
    n = 500
    assert _open_files_limit(s.app.proc.pid) >= 2 * n
    baseline = s.counts()["connections_open"]
    socks = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection((HOST, s.app.in_port), timeout=TIMEOUT))
        wait_for(lambda: s.counts()["connections_open"] >= baseline + n,
                 what=f"{n} connections open at once")
        start = s.collector.count()
        for c, sock in enumerate(socks):
            rows = [c % len(digits.X), (c + 1) % len(digits.X)]
            sock.sendall(frame_many(encode_images(digits.X[rows], "json", ids=[f"{c}-0", f"{c}-1"])))
        results = [json.loads(t) for t in s.new_results(start, 2 * n)]
    finally:
        for sock in socks:
            sock.close()
    position = {r["id"]: i for i, r in enumerate(results)}
    assert len(position) == 2 * n
    by_id = {r["id"]: r for r in results}
    for c in range(n):
        assert position[f"{c}-0"] < position[f"{c}-1"]
        assert [by_id[f"{c}-{k}"]["seq"] for k in (0, 1)] == [0, 1]
        assert by_id[f"{c}-0"]["label"] == labels[c % len(digits.X)]
        assert by_id[f"{c}-1"]["label"] == labels[(c + 1) % len(digits.X)]
    wait_for(lambda: s.counts()["connections_open"] == baseline, what="the connections to close")


def _garbage(rng, fmt: str, digits, n: int) -> list[bytes]:
    """Random payloads: random bytes of random lengths, and valid payloads with bytes changed."""
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            out.append(rng.bytes(int(rng.integers(0, 1500))))
        else:
            changed = bytearray(valid(fmt, digits, int(rng.integers(0, len(digits.X)))))
            for at in rng.integers(0, len(changed), size=int(rng.integers(1, 6))):
                changed[at] = int(rng.integers(0, 256))
            out.append(bytes(changed))
    return out


@pytest.mark.parametrize("fmt", SERVED)
def test_after_random_garbage_valid_frames_are_answered(fmt, served, digits, labels):
    """Four clients each send 250 random payloads, then valid images; one more sends unframed
    random bytes. Every frame is answered once, the valid ones correctly, and the application
    serves a new client afterwards."""
    s = served[fmt]
    rng = np.random.default_rng(list(SERVED).index(fmt))
    before = s.counts()
    start = s.collector.count()
    sent = 0
    for c in range(4):
        payloads = _garbage(rng, fmt, digits, 250) + [valid(fmt, digits, i) for i in range(c, c + 5)]
        answers = s.exchange(payloads)
        sent += len(payloads)
        assert len(answers) == len(payloads)
        if s.json_output:
            assert [json.loads(a).get("label") for a in answers[-5:]] == list(labels[c:c + 5])
        else:
            assert answers[-5:] == [str(np.array([label])) for label in labels[c:c + 5]]
    # unframed random bytes after some random frames: the reference receiver says how many
    # frames they hold before a header above the limit or an incomplete frame ends them
    max_frame = SMALL_MAX_FRAME if fmt == "u8" else 1 << 20
    raw = frame_many(_garbage(rng, fmt, digits, 20)) + rng.bytes(3000)
    frames, _ = reference_frames(raw, max_frame)
    count = s.collector.count()
    sock = socket.create_connection((HOST, s.app.in_port), timeout=TIMEOUT)
    sock.sendall(raw)
    sock.shutdown(socket.SHUT_WR)
    assert _recv_until_closed(sock)
    sock.close()
    assert len(s.collector.wait_count(count + len(frames))) == count + len(frames)
    sent += len(frames)
    answers = s.exchange([valid(fmt, digits, 9)])
    sent += 1
    if s.json_output:
        assert json.loads(answers[0])["label"] == labels[9]
    else:
        assert answers == [str(np.array([labels[9]]))]
    after = s.counts()
    assert after["messages_in"] - before["messages_in"] == sent
    assert after["messages_out"] - before["messages_out"] == sent
    assert s.collector.count() - start == sent
