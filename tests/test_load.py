"""Load (issue 5): eight senders at once, in mixed formats, every output present, each
connection's order kept, nothing twice, memory bounded.

Three applications run side by side (``--input-format u8``, ``f32`` and ``auto``, the
last fed pickle, npy and json), each writing its results (the seed's text, ``[3]``) to
its own ``digitstream listen`` process. Eight clients connect and send together. Each
client sends only images of two classes of its own (within its application), in a
pseudo-random pattern of the two, so a result's label says which client it answers, and
the labels of one client's results, in the order they arrive, must be exactly the
client's pattern: a result missing, doubled, or out of place shows.

Each sender sends 500,000 messages, as the issue asks (about 30 s here, most of it the
json client); ``DIGITSTREAM_LOAD_MESSAGES=50000`` runs a tenth of it while iterating.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import numpy as np

from digitstream.codecs.inputs import encode_images
from digitstream.wire.framing import frame_many
from helpers import HOST, TIMEOUT, AppProcess, ListenProcess, app_counts, memory_of, wait_for

MESSAGES = int(os.environ.get("DIGITSTREAM_LOAD_MESSAGES") or 500_000)
START_TIMEOUT = 180
#: (application, input format of the client, the client's two classes)
CLIENTS = [
    ("u8", "u8", (0, 1)), ("u8", "u8", (2, 3)),
    ("f32", "f32", (4, 5)), ("f32", "f32", (6, 7)),
    ("auto", "pickle", (0, 1)), ("auto", "pickle", (2, 3)),
    ("auto", "npy", (4, 5)), ("auto", "json", (6, 7)),
]
PATTERN = 360  # images in one client's cycle


def _cycle(digits, seed_pipeline, classes, rng) -> tuple[np.ndarray, np.ndarray]:
    """PATTERN confidently classified images of the two classes in a random order, and their
    labels."""
    proba = seed_pipeline.predict_proba(digits.X)
    label = seed_pipeline.classes_[proba.argmax(axis=1)]
    pools = [np.flatnonzero((label == c) & (proba.max(axis=1) > 0.99)) for c in classes]
    which = rng.integers(0, 2, size=PATTERN)
    rows = np.array([rng.choice(pools[w]) for w in which])
    return digits.X[rows], np.asarray(classes)[which]


def test_eight_senders_at_once_in_mixed_formats(model_dir, digits, seed_pipeline, tmp_path):
    rng = np.random.default_rng(8)
    apps: dict[str, AppProcess] = {}
    listeners: dict[str, ListenProcess] = {}
    files = {name: tmp_path / f"{name}.out" for name in ("u8", "f32", "auto")}
    peaks = {name: 0 for name in files}
    stop_sampling = threading.Event()
    sampler = None
    try:
        for name, output in files.items():
            listeners[name] = ListenProcess(output, timeout=START_TIMEOUT)
            args = [] if name == "auto" else ["--input-format", name]
            apps[name] = AppProcess(model_dir, listeners[name].port, *args)
        for app in apps.values():
            app.wait_ready(START_TIMEOUT)
        idle = {name: memory_of(app.proc.pid)[0] for name, app in apps.items()}

        cycles, expected = [], []
        for _, fmt, classes in CLIENTS:
            images, labels = _cycle(digits, seed_pipeline, classes, rng)
            cycles.append(frame_many(encode_images(images, fmt)))
            expected.append(labels)
        repeats, rest = divmod(MESSAGES, PATTERN)

        def tail_of(cycle: bytes, n: int) -> bytes:
            pos = 0
            for _ in range(n):
                pos += 4 + int.from_bytes(cycle[pos:pos + 4], "big")
            return cycle[:pos]

        start = threading.Barrier(len(CLIENTS))
        errors: list[BaseException] = []

        def send(app: AppProcess, cycle: bytes):
            try:
                with socket.create_connection((HOST, app.in_port), timeout=TIMEOUT * 4) as sock:
                    start.wait(TIMEOUT)
                    for _ in range(repeats):
                        sock.sendall(cycle)
                    sock.sendall(tail_of(cycle, rest))
            except BaseException as exc:  # reported below
                errors.append(exc)

        def sample():
            while not stop_sampling.wait(0.1):
                for name, app in apps.items():
                    try:
                        peaks[name] = max(peaks[name], memory_of(app.proc.pid)[0])
                    except (OSError, KeyError):  # it has exited
                        pass

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.monotonic()
        senders = [threading.Thread(target=send, args=(apps[app_name], cycle))
                   for (app_name, _, _), cycle in zip(CLIENTS, cycles)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(TIMEOUT * 10)
        assert not errors, errors
        assert not any(t.is_alive() for t in senders)
        per_app = {name: MESSAGES * sum(1 for a, _, _ in CLIENTS if a == name) for name in apps}
        for name, app in apps.items():
            wait_for(lambda app=app, name=name: app_counts(app.stats())["messages_out"]
                     == per_app[name],
                     timeout=TIMEOUT * 4, interval=0.1, what=f"every message of {name} answered")
        elapsed = time.monotonic() - t0
        peaks_hwm = {name: memory_of(app.proc.pid)[1] for name, app in apps.items()}
        for app in apps.values():
            app.signal(signal.SIGTERM)  # flush to the listener and exit
        for app in apps.values():
            assert app.wait(TIMEOUT * 2) == 0
    finally:
        stop_sampling.set()
        if sampler is not None:
            sampler.join(TIMEOUT)
        for app in apps.values():
            app.stop()
        for listener in listeners.values():
            listener.stop(timeout=TIMEOUT * 2)
    for name, output in files.items():
        # every result is a 7-byte frame: header 3, then "[d]"
        frames = np.frombuffer(output.read_bytes(), dtype=np.uint8).reshape(-1, 7)
        assert len(frames) == per_app[name], (name, len(frames))
        assert (frames[:, :4] == [0, 0, 0, 3]).all() and (frames[:, 4] == ord("[")).all()
        found = frames[:, 5].astype(np.int64) - ord("0")
        for (app_name, fmt, classes), labels in zip(CLIENTS, expected):
            if app_name != name:
                continue
            mine = found[np.isin(found, classes)]
            assert len(mine) == MESSAGES, f"{fmt} {classes}: {len(mine)} results"
            assert np.array_equal(mine, np.resize(labels, MESSAGES)), \
                f"{fmt} {classes}: a result out of place"
    total = MESSAGES * len(CLIENTS)
    for name in apps:
        assert peaks[name] - idle[name] < 1 << 30, (name, idle[name], peaks[name])
    print(f"\n{len(CLIENTS)} senders x {MESSAGES:,} = {total:,} messages in {elapsed:.1f} s "
          f"({total / elapsed:,.0f}/s); every result present once, in order; RSS idle -> peak "
          + ", ".join(f"{n} {idle[n] / 2**20:.0f} -> {max(peaks[n], peaks_hwm[n]) / 2**20:.0f} MiB"
                      for n in apps))
