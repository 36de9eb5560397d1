"""Every frame answered, whatever happens inside (issue: close the silent-loss paths).

Each test runs a real ``digitstream run`` and sends what a new user might: inputs the
model fails on, a bad header while a batch fills, a listener that half-closes, labelled
JSON in auto, ids that are not JSON numbers, thousands of invented labels, many clients
holding partial frames, a listener too slow for a stop signal, raw pixels in auto. Each
checks what comes back, and that the application still serves afterwards with nothing lost.
"""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import threading
import time

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from digitstream.codecs.inputs import encode_images
from digitstream.wire.framing import HEADER, FrameSplitter, frame_many
from helpers import (
    HOST,
    TIMEOUT,
    Collector,
    app_counts,
    frame_count_of,
    memory_of,
    send_bytes,
    wait_for,
)


def strict_json(text: str):
    """RFC 8259 JSON only: NaN, Infinity and -Infinity are refused."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def exchange(app, collector: Collector, payloads: list[bytes]) -> list[str]:
    before = collector.count()
    send_bytes(app.in_port, frame_many(payloads))
    return collector.wait_count(before + len(payloads))[before:]


def read_frames(sock: socket.socket, n: int) -> list[bytes]:
    splitter, frames = FrameSplitter(), []
    while len(frames) < n:
        data = sock.recv(1 << 16)
        assert data, f"connection closed after {len(frames)} of {n} frames"
        for group in splitter.feed(data):
            frames.extend(group.to_list())
    return frames


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        while sock.recv(1 << 16):
            pass
    except ConnectionResetError:
        pass
    return True


# --------------------------------------------------------------- model failures
def test_rows_the_model_fails_on_are_answered_at_their_place_and_the_connection_goes_on(
        start_app, collector, digits, expected_texts):
    """Finite but huge pixels (1e308) overflow the model's scores: those rows, and only
    those, get ``error: model failed: ...``, on the same connection, which goes on."""
    app = start_app(collector.port, "--input-format", "f64")
    X = digits.X[:300].copy()
    bad = [0, 10, 150, 299]
    X[bad] = 1e308
    sock = socket.create_connection((HOST, app.in_port), timeout=TIMEOUT)
    sock.sendall(frame_many(encode_images(X, "f64")))
    texts = collector.wait_count(300)
    for i, text in enumerate(texts):
        if i in bad:
            assert text.startswith("error: model failed: "), (i, text)
        else:
            assert text == expected_texts[i], (i, text)
    # the same connection is still served
    sock.sendall(frame_many(encode_images(digits.X[300:400], "f64")))
    assert collector.wait_count(400)[300:] == expected_texts[300:400]
    sock.close()
    counts = app_counts(app.stats())
    assert counts["rejected"] == {"model": len(bad)}
    assert counts["messages_in"] == counts["messages_out"] == 400


@pytest.fixture(scope="module")
def sqrt_model(tmp_path_factory, digits):
    """A user's pipeline whose first step fails on negative pixels (NaN after the square root)."""
    from digitstream.model.bundle import save_bundle

    pipeline = Pipeline([("sqrt", FunctionTransformer(np.sqrt)),
                         ("Logistic Regression", LogisticRegression(max_iter=3000))])
    pipeline.fit(digits.X, digits.y)
    directory = tmp_path_factory.mktemp("sqrt-model")
    save_bundle(pipeline, directory, {"dataset": "digits", "model": "sqrt-logistic"})
    return directory, pipeline


def test_a_user_pipeline_that_fails_on_some_inputs_answers_the_others(start_app, collector,
                                                                      digits, sqrt_model):
    directory, pipeline = sqrt_model
    app = start_app(collector.port, "--input-format", "json", "--output-format", "json",
                    model=directory)
    X = digits.X[:200].copy()
    bad = [3, 4, 120]
    X[bad, 7] = -1.0
    ids = [f"img-{i}" for i in range(200)]
    answers = [strict_json(t) for t in exchange(app, collector,
                                                encode_images(X, "json", labels=digits.y[:200],
                                                              ids=ids))]
    good = np.delete(np.arange(200), bad)
    expected = pipeline.predict(X[good])
    for i, answer in enumerate(answers):
        assert answer["seq"] == i and answer["id"] == ids[i]
        if i in bad:
            assert answer["error"].startswith("model failed: "), answer
    assert [a["label"] for i, a in enumerate(answers) if i not in bad] == expected.tolist()
    assert app_counts(app.stats())["rejected"] == {"model": len(bad)}


# ------------------------------------------------ a bad header while a batch fills
def test_a_bad_header_while_a_batch_fills_answers_the_frames_before_it(start_app, collector,
                                                                      digits, expected_texts):
    app = start_app(collector.port, "--input-format", "u8", "--max-delay-ms", "2000",
                    "--max-batch", "1000")
    sock = socket.create_connection((HOST, app.in_port), timeout=TIMEOUT)
    sock.sendall(frame_many(encode_images(digits.X[:5], "u8")))
    time.sleep(0.2)  # the batch is filling: it waits up to 2 s for 1000 frames
    sock.sendall(HEADER.pack(1 << 30))
    assert collector.wait_count(5) == expected_texts[:5]
    assert closed_by_peer(sock)
    sock.close()
    stats = app.stats()
    assert app_counts(stats)["connection_errors"] == {"frame_too_large": 1}
    assert app_counts(stats)["messages_out"] == 5
    assert exchange(app, collector, encode_images(digits.X[5:20], "u8")) == expected_texts[5:20]


# -------------------------------------------------------- a half-closing listener
class HalfClosingListener:
    """What ``nc -N -l`` and ``ncat -l ... < /dev/null`` do: accept, close the sending side
    at once, and go on reading."""

    def __init__(self):
        self.server = socket.create_server((HOST, 0))
        self.server.settimeout(TIMEOUT)
        self.port = self.server.getsockname()[1]
        self.frames: list[bytes] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        conn, _ = self.server.accept()
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(TIMEOUT)
        splitter = FrameSplitter()
        try:
            while data := conn.recv(1 << 16):
                for group in splitter.feed(data):
                    self.frames.extend(group.to_list())
        except OSError:
            pass
        conn.close()

    def close(self):
        self.server.close()
        self._thread.join(timeout=TIMEOUT)


def test_a_listener_that_closes_its_sending_side_still_gets_every_result(start_app, digits,
                                                                         expected_texts):
    listener = HalfClosingListener()
    try:
        app = start_app(listener.port)
        pickles = encode_images(digits.X, "pickle")
        send_bytes(app.in_port, frame_many(pickles))
        wait_for(lambda: len(listener.frames) >= len(pickles), what="every result")
        assert [f.decode() for f in listener.frames] == expected_texts
        app.signal(signal.SIGTERM)
        assert app.wait(timeout=20) == 0
        assert "still reads" in app.log()
    finally:
        listener.close()


# ----------------------------------------------------------- labelled JSON in auto
def test_labelled_json_in_auto_keeps_labels_and_ids(start_app, collector, digits,
                                                    expected_texts):
    app = start_app(collector.port, "--output-format", "json")
    ids = [f"auto-{i}" for i in range(300)]
    payloads = encode_images(digits.X[:300], "json", labels=digits.y[:300], ids=ids)
    payloads[100:110] = encode_images(digits.X[100:110], "pickle")  # auto: mixed formats
    answers = [strict_json(t) for t in exchange(app, collector, payloads)]
    assert [a.get("id") for a in answers] == ids[:100] + [None] * 10 + ids[110:]
    stats = app.stats()
    assert stats["accuracy"]["labelled"] == 290
    assert stats["accuracy"]["correct"] == sum(
        1 for i in range(300) if not 100 <= i < 110 and expected_texts[i] == f"[{digits.y[i]}]")


# ----------------------------------------------------- ids that are not JSON numbers
ODD_VALUES = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"9" * 400,
              b'"\\ud800"', b'{"a": 1}', b"[1, 2]", b"true", b'"\xe2\x82\xac"']


def test_every_json_output_frame_is_json_whatever_the_ids_and_labels(start_app, collector,
                                                                     digits):
    app = start_app(collector.port, "--output-format", "json")
    pixels = b"[" + b",".join(str(int(v)).encode() for v in digits.X[0]) + b"]"
    payloads = []
    for value in ODD_VALUES:
        payloads.append(b'{"pixels":' + pixels + b',"id":' + value + b"}")
        payloads.append(b'{"pixels":' + pixels + b',"label":' + value + b"}")
    answers = [strict_json(t) for t in exchange(app, collector, payloads)]
    assert len(answers) == len(payloads)
    for payload, answer in zip(payloads, answers):
        if "error" not in answer:  # what it carried is a string or a finite number
            assert isinstance(answer.get("id", ""), (str, int, float)), (payload, answer)
    refused = [a for a in answers if "error" in a]
    assert len(refused) == 16  # NaN, the infinities, objects, lists and booleans
    assert all('must be a string or a finite number' in a["error"] for a in refused)
    assert exchange(app, collector, encode_images(digits.X[:3], "json"))  # still serving


# ----------------------------------------------------------- invented labels
def test_thousands_of_invented_labels_keep_the_stats_bounded(start_app, collector, digits):
    app = start_app(collector.port, "--input-format", "json")
    n = 4000
    X = digits.X[np.arange(n) % len(digits.X)]
    labels = np.array([f"label-{i}" for i in range(n)], dtype=object)
    labels[:100] = digits.y[np.arange(100)]
    assert len(exchange(app, collector, encode_images(X, "json", labels=labels))) == n
    stats = app.stats()
    confusion = stats["accuracy"]["confusion"]
    assert len(confusion["labels"]) <= 11, confusion["labels"]
    assert "(other)" in confusion["labels"]
    assert sum(map(sum, confusion["matrix"])) == n == stats["accuracy"]["labelled"]


# ------------------------------------------------- many clients, partial frames
def test_many_clients_holding_partial_frames_are_bounded_and_let_go(start_app, collector,
                                                                     digits, expected_texts):
    limit_mb = 32
    app = start_app(collector.port, "--input-format", "json", "--max-buffered-mb",
                    str(limit_mb), "--max-connections", "400")
    exchange(app, collector, encode_images(digits.X[:10], "json"))  # warmed up
    base_rss, _ = memory_of(app.proc.pid)
    partial = HEADER.pack(1 << 20) + b'{"pixels":[' + b"0," * 250_000  # 0.5 MB of 1 MB
    clients = []
    try:
        for _ in range(150):  # 75 MB of partial frames against a 32 MB budget
            sock = socket.create_connection((HOST, app.in_port), timeout=TIMEOUT)
            sock.sendall(partial)
            clients.append(sock)
        # each is given a buffer for its frame in turn, and closed once it has sent nothing
        # for a second while others wait: all but those whose buffers fit the budget together
        fit = (limit_mb << 20) // ((1 << 20) + HEADER.size)
        wait_for(lambda: app_counts(app.stats())["connection_errors"].get("stalled", 0)
                 >= 150 - fit - 1, what="connections over the budget closed")
        # what the closed ones held goes back within a second (malloc_trim after the close);
        # the ones still open hold no more than the budget
        _, peak_rss = memory_of(app.proc.pid)
        held_rss = wait_for(lambda: (rss := memory_of(app.proc.pid)[0]) - base_rss
                            < (limit_mb + 12) << 20 and rss, timeout=10,
                            what="memory within the budget while the partial frames are held")
        closed = app_counts(app.stats())["connection_errors"]["stalled"]
        print(f"RSS {base_rss >> 20} MiB idle, peak {peak_rss >> 20} MiB, "
              f"{held_rss >> 20} MiB with the rest of the 150 partial frames of 0.5 MB held "
              f"against {limit_mb} MiB; {closed} connections closed")
        assert peak_rss - base_rss < (limit_mb + 150 * 128 // 1024 + 12) << 20
        assert "while other connections waited for room (run --max-buffered-mb 32)" in app.log()
        # the application still serves while they are held
        assert exchange(app, collector, encode_images(digits.X[:20], "json")) == expected_texts[:20]
    finally:
        for sock in clients:
            sock.close()
    wait_for(lambda: app_counts(app.stats())["connections_open"] == 0, what="all closed")
    wait_for(lambda: memory_of(app.proc.pid)[0] - base_rss < 24 << 20, timeout=10,
             what="the memory given back")
    print(f"RSS {memory_of(app.proc.pid)[0] >> 20} MiB once they closed")


def test_a_new_connection_at_the_limit_takes_the_place_of_an_idle_one(start_app, collector,
                                                                      digits, expected_texts):
    app = start_app(collector.port, "--input-format", "u8", "--max-connections", "8")
    held = [socket.create_connection((HOST, app.in_port), timeout=TIMEOUT) for _ in range(8)]
    try:
        wait_for(lambda: app_counts(app.stats())["connections_open"] == 8, what="8 open")
        # none of the 8 has sent a frame: the one open longest makes room for the 9th
        ninth = socket.create_connection((HOST, app.in_port), timeout=TIMEOUT)
        assert closed_by_peer(held[0])
        assert app_counts(app.stats())["connection_errors"] == {"evicted": 1}
        assert "closed to make room for a new one" in app.log()
        ninth.sendall(frame_many(encode_images(digits.X[:10], "u8")))
        assert collector.wait_count(10) == expected_texts[:10]
        ninth.close()
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: app_counts(app.stats())["connections_open"] == 0, what="all closed")
    assert exchange(app, collector, encode_images(digits.X[10:20], "u8")) == expected_texts[10:20]


def test_connections_past_the_limit_are_closed_on_arrival_while_all_make_progress(
        start_app, collector, digits):
    app = start_app(collector.port, "--input-format", "u8", "--max-connections", "8")
    stop = threading.Event()
    chunk = frame_many(encode_images(digits.X[:50], "u8"))

    def keep_sending(sock):
        try:
            while not stop.is_set():
                sock.sendall(chunk)
                stop.wait(0.01)
        except OSError:
            pass

    busy = [socket.create_connection((HOST, app.in_port), timeout=TIMEOUT) for _ in range(8)]
    senders = [threading.Thread(target=keep_sending, args=(s,)) for s in busy]
    for t in senders:
        t.start()
    try:
        wait_for(lambda: app_counts(app.stats())["connections_open"] == 8, what="8 open")
        wait_for(lambda: collector.count() >= 8 * 50, what="all 8 answered")
        extra = socket.create_connection((HOST, app.in_port), timeout=TIMEOUT)
        assert closed_by_peer(extra)
        extra.close()
        errors = app_counts(app.stats())["connection_errors"]
        assert errors == {"too_many_connections": 1}, errors
        assert "the most allowed (run --max-connections)" in app.log()
    finally:
        stop.set()
        for t in senders:
            t.join(TIMEOUT)
        for sock in busy:
            sock.close()
    wait_for(lambda: app_counts(app.stats())["connections_open"] == 0, what="all closed")


# -------------------------------------------- a stop signal and a listener too slow
def test_a_stop_signal_with_a_listener_that_does_not_read_holds_the_documented_bound(
        start_app, digits):
    """The listener accepts and never reads: on SIGTERM the application reads on for at
    most the drain grace (5 s), waits --flush-timeout for the listener, then says how many
    results it did not deliver and exits 1."""
    stuck = socket.create_server((HOST, 0))
    port = stuck.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(stuck.accept()), daemon=True).start()
    try:
        app = start_app(port, "--input-format", "u8", "--flush-timeout", "2")
        chunk = frame_many(encode_images(digits.X, "u8")) * 100
        sender = socket.create_connection((HOST, app.in_port), timeout=TIMEOUT)
        sender.settimeout(0.5)
        sent = 0
        try:
            while sent < 40 * len(chunk):  # until the application stops taking more
                sender.sendall(chunk)
                sent += len(chunk)
        except (TimeoutError, OSError):
            pass
        wait_for(lambda: app_counts(app.stats())["messages_in"] > 0, what="frames received")
        received = app_counts(app.stats())["messages_in"]
        started = time.monotonic()
        app.signal(signal.SIGTERM)
        status = app.wait(timeout=5 + 2 + 10)
        took = time.monotonic() - started
        sender.close()
        print(f"SIGTERM to exit {took:.1f} s (bound 5 + 2 s), status {status}")
        assert status == 1
        assert took < 5 + 2 + 5, took
        log = app.log()
        line = next(line for line in log.splitlines() if "results not delivered" in line)
        undelivered = int(line.split(" results not delivered")[0].rsplit(" ", 1)[1])
        print(line)
        assert 0 < undelivered <= max(received, undelivered)
    finally:
        stuck.close()
        for conn, _ in accepted:
            conn.close()


# ------------------------------------------------------------ raw pixels in auto
def test_raw_pixels_sent_to_auto_are_answered_with_how_to_fix_it(start_app, collector, digits,
                                                                 expected_texts):
    app = start_app(collector.port)
    texts = exchange(app, collector, encode_images(digits.X[:5], "u8")
                     + encode_images(digits.X[:5], "f32") + encode_images(digits.X[:5], "f64"))
    assert texts[:5] == ["error: bad pickle: 64 bytes that are not a pickle, .npy or JSON: "
                         "raw u8 pixels? run with --input-format u8"] * 5
    assert all("run with --input-format f32" in t for t in texts[5:10])
    assert all("run with --input-format f64" in t for t in texts[10:15])
    assert exchange(app, collector, encode_images(digits.X[:5], "pickle")) == expected_texts[:5]


def test_the_check_of_odd_values_is_exact():
    # the strict parser used above refuses what Python's json module accepts by default
    with pytest.raises(ValueError):
        strict_json('{"id": NaN}')
    assert math.isinf(json.loads("1e999"))


# ------------------------------------------------- SIGKILL of run, without --acked
def _socket_buffer_max(name: str) -> int:
    try:
        with open(f"/proc/sys/net/ipv4/{name}") as f:
            return int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 6 << 20


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_of_run_in_plain_mode_loses_only_what_it_held(seed, start_app, collector, digits,
                                                              expected_texts):
    """200,000 msg/s of u8 for 2.5 s; ``run`` is killed (SIGKILL) at a random moment of a
    seeded schedule. What reached the listener is a prefix of the stream (order kept, nothing
    twice); what is lost is what the application and the sockets between held, which the
    buffers bound. RELIABILITY.md has the figures."""
    rng = np.random.default_rng(seed)
    kill_at = float(rng.uniform(0.5, 2.0))
    app = start_app(collector.port, "--input-format", "u8")
    per_tick = 2000  # every 10 ms: 200,000 messages a second
    frames = frame_many(encode_images(digits.X, "u8"))
    stream = frames * (per_tick // len(digits.X) + 2)
    frame_size = len(frames) // len(digits.X)
    sock = socket.create_connection((HOST, app.in_port), timeout=TIMEOUT)
    sent = sent_before_kill = 0
    started = time.monotonic()
    killed = False
    try:
        while sent < 500_000:
            now = time.monotonic() - started
            if not killed and now >= kill_at:
                app.proc.send_signal(signal.SIGKILL)
                killed = True
                sent_before_kill = sent
            offset = (sent % len(digits.X)) * frame_size
            sock.sendall(stream[offset:offset + per_tick * frame_size])
            sent += per_tick
            time.sleep(max(0.0, started + sent / 200_000 - time.monotonic()))
    except OSError:
        pass  # the application is gone
    finally:
        sock.close()
    assert killed, f"seed {seed}: the stream ended before the kill at {kill_at:.2f} s"
    app.proc.wait(timeout=TIMEOUT)
    # the dead application's socket is closed by the kernel: once the collector has read to
    # its end, everything that reached the listener is in hand
    wait_for(lambda: collector.connections >= 1 and collector._conn is None,
             what="the collector to read the dead application's connection to its end")
    got = collector.texts()
    expected = [expected_texts[i % len(digits.X)] for i in range(len(got))]
    assert got == expected, f"seed {seed}: the results are not a prefix of the stream"
    lost = sent - len(got)
    held_in = (_socket_buffer_max("tcp_wmem") + _socket_buffer_max("tcp_rmem")
               + (4 << 20)) // frame_size + 4 * 8192
    held_out = ((8 << 20) + (2 << 20) + _socket_buffer_max("tcp_wmem")) // len(b"\0\0\0\3[3]")
    print(f"seed {seed}: killed at {kill_at:.2f} s, {sent_before_kill} sent before the kill "
          f"({sent} in all), {len(got)} answered: {sent_before_kill - len(got)} of those lost")
    assert 0 <= lost <= held_in + held_out + per_tick, f"seed {seed}: {lost} lost"


def test_the_count_of_results_not_delivered_on_a_stop_is_the_loss(start_app, digits):
    """The listener accepts and reads nothing until ``run`` has exited on SIGTERM (its
    --flush-timeout passed); then it reads what the kernel still delivers. The line
    ``N results not delivered`` must be exactly the results of frames ``run`` received
    that never reached the listener: frames not yet batched, batches not answered, results
    queued or in asyncio's buffer; results in the kernel's buffer are delivered by the
    graceful close."""
    stuck = socket.create_server((HOST, 0))
    port = stuck.getsockname()[1]
    go = threading.Event()
    got = bytearray()

    def listen():
        conn, _ = stuck.accept()
        go.wait(60)
        conn.settimeout(TIMEOUT)
        while data := conn.recv(1 << 20):
            got.extend(data)
        conn.close()

    reader = threading.Thread(target=listen, daemon=True)
    reader.start()
    try:
        app = start_app(port, "--input-format", "u8", "--flush-timeout", "1")
        chunk = frame_many(encode_images(digits.X, "u8")) * 100
        sender = socket.create_connection((HOST, app.in_port), timeout=TIMEOUT)
        sender.settimeout(0.5)
        try:
            for _ in range(40):  # until the application stops taking more
                sender.sendall(chunk)
        except (TimeoutError, OSError):
            pass
        app.signal(signal.SIGTERM)
        assert app.wait(timeout=30) == 1
        sender.close()
        go.set()
        reader.join(TIMEOUT * 2)
        assert not reader.is_alive()
        log = app.log()
        line = next(line for line in log.splitlines() if "results not delivered" in line)
        stated = int(line.split(" results not delivered")[0].rsplit(" ", 1)[1])
        stopped = re.search(r"stopped: (\d+) frames received, (\d+) answered", log)
        assert stopped, log[-2000:]
        received, delivered = int(stopped[1]), frame_count_of(bytes(got))
        print(f"\nreceived {received:,}, reached the listener {delivered:,}, "
              f"stated lost {stated:,}")
        assert stated > 0
        assert stated == received - delivered
    finally:
        go.set()
        stuck.close()
