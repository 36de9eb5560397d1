"""The seed's flow end to end over real sockets: every input format, the seed's
own sender, Python 2 pickles, a malicious pickle, several connections, SIGTERM."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import socket
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest

from digitstream.codecs.inputs import INPUT_FORMATS, encode_images
from digitstream.wire.framing import frame, frame_many
from helpers import HOST, TIMEOUT, py2_pickle, send_bytes, wait_for


def seed_sender(port: int, images: np.ndarray) -> None:
    """The seed's sender.py, ported to Python 3: each image pickled and framed, nothing else."""
    sock = socket.create_connection((HOST, port), timeout=TIMEOUT)
    for x in images:
        data = pickle.dumps(x)
        sock.sendall(struct.pack(">I", len(data)) + data)
    sock.close()


@pytest.mark.parametrize("fmt", INPUT_FORMATS)
def test_every_input_format_end_to_end(fmt, start_app, collector, digits, expected_texts):
    app = start_app(collector.port, "--input-format", fmt)
    send_bytes(app.in_port, frame_many(encode_images(digits.X, fmt, labels=digits.y)))
    assert collector.wait_count(len(digits.X)) == expected_texts


def test_the_seeds_sender_byte_for_byte(start_app, collector, digits, expected_texts):
    app = start_app(collector.port)  # no format flag, as the seed runs it
    seed_sender(app.in_port, digits.X)
    assert collector.wait_count(len(digits.X)) == expected_texts


@pytest.mark.parametrize("protocol", [0, 2])
def test_python2_pickles_are_classified(protocol, start_app, collector, digits, expected_texts):
    app = start_app(collector.port)
    send_bytes(app.in_port, frame_many(py2_pickle(row, protocol) for row in digits.X[:200]))
    assert collector.wait_count(200) == expected_texts[:200]


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_pickle_that_would_run_code_is_rejected(start_app, collector, digits, expected_texts,
                                                  tmp_path):
    target = tmp_path / "created-by-pickle"
    app = start_app(collector.port)
    evil = pickle.dumps(_System(f"touch {target}"))
    send_bytes(app.in_port, frame(evil) + frame(pickle.dumps(digits.X[0])))
    first, second = collector.wait_count(2)
    assert first.startswith("error: ") and "forbidden global" in first
    assert second == expected_texts[0]
    assert not target.exists()
    assert app.stats()["rejected"] == {"pickle": 1}


def test_connections_keep_their_own_order(start_app, collector, digits, seed_pipeline):
    app = start_app(collector.port, "--input-format", "json", "--output-format", "json")
    k, per = 6, 300
    payloads = {c: encode_images(digits.X[c * 100:c * 100 + per], "json",
                                 ids=[f"{c}-{i}" for i in range(per)]) for c in range(k)}
    threads = [threading.Thread(target=send_bytes, args=(app.in_port, frame_many(payloads[c])))
               for c in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    results = [json.loads(t) for t in collector.wait_count(k * per)]
    for c in range(k):
        mine = [r for r in results if r["id"].startswith(f"{c}-")]
        assert [r["id"] for r in mine] == [f"{c}-{i}" for i in range(per)]
        assert [r["seq"] for r in mine] == list(range(per))
        expected = seed_pipeline.predict(digits.X[c * 100:c * 100 + per])
        assert [r["label"] for r in mine] == expected.tolist()
        assert all(0 < r["probability"] <= 1 for r in mine)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_mid_stream_loses_nothing_received(sig, start_app, collector, digits):
    app = start_app(collector.port, "--input-format", "u8")
    chunk = frame_many(encode_images(digits.X, "u8"))
    sock = socket.create_connection((HOST, app.in_port), timeout=TIMEOUT)
    stop_sending = threading.Event()
    sent = [0]

    def keep_sending():
        try:
            while not stop_sending.is_set():
                sock.sendall(chunk)
                sent[0] += len(digits.X)
        except OSError:
            pass  # the application stopped reading and closed the connection

    sender = threading.Thread(target=keep_sending)
    sender.start()
    wait_for(lambda: collector.count() >= 5 * len(digits.X), what="results to flow")
    app.signal(sig)
    stop_sending.set()
    assert app.wait() == 0
    sock.close()
    sender.join(TIMEOUT)
    match = re.search(r"stopped: (\d+) frames received, (\d+) answered", app.log())
    assert match, app.log()
    received, answered = int(match[1]), int(match[2])
    assert received == answered > 0
    wait_for(lambda: collector.count() >= answered, what="every answered result at the listener")
    assert collector.count() == answered
    assert received <= sent[0]


def test_run_waits_for_the_listener(start_app, held_port, digits, expected_texts):
    from helpers import Collector

    app = start_app(held_port.port, "--input-format", "f64")
    send_bytes(app.in_port, frame_many(encode_images(digits.X[:50], "f64")))
    wait_for(lambda: "waiting for the listener" in app.log(), what="the waiting log line")
    late = Collector(held_port.port)
    try:
        assert late.wait_count(50) == expected_texts[:50]
    finally:
        late.close()


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "digitstream.cli", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_run_without_a_model_says_why(tmp_path):
    result = run_cli("run", "--model", str(tmp_path / "nothing"), "--in", f"{HOST}:0",
                     "--metrics", f"{HOST}:0")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error:")


def test_every_command_has_help():
    for command in ["train", "run", "send", "listen", "read", "demo", "bench", "inspect"]:
        result = run_cli(command, "--help")
        assert result.returncode == 0, result.stderr
        assert "Usage:" in result.stdout
