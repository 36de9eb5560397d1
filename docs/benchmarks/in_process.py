"""In-process timings behind "Where the time goes" in BENCHMARKS.md.

    python docs/benchmarks/in_process.py

- cutting frames: ``split_frames`` on 8,192 json results, 8,192 labelled json
  images and 8,192 pickled images, in reads of 4 KiB, 64 KiB and 256 KiB, per frame;
- the u8 decision's steps alone on 8,192 rows of 64 pixels, one BLAS thread;
- json numbers: ``_fixed_layout`` on 256 pixel lists of the digits;
- labelled json: a decoder's whole batch of 4,096 images (labels and ids), and json
  output of 4,096 results with ids, per frame, the best of 15 rounds;
- the model: the fused runner of the benchmark's model on a batch of 8,192 digits, as
  u8 frames give it (float32, pixels known to lie within 255) and as pickle and json
  frames give it (float64), µs per batch, the best of 15 rounds; and the same with the
  product in blocks of 256 to 8,192 rows.

    python docs/benchmarks/in_process.py predict     # only the last
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits

from digitstream.codecs import inputs
from digitstream.codecs.outputs import JsonEncoder
from digitstream.memory import keep_batch_memory
from digitstream.wire.framing import frame_many, split_frames


def per_call(f, n: int = 200) -> float:
    f()
    start = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - start) / n * 1e6


def best_per_frame(f, frames: int, rounds: int = 15, calls: int = 5) -> float:
    """µs per frame of ``f``, which handles ``frames`` frames: the best of ``rounds``."""
    f()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            f()
        best = min(best, (time.perf_counter() - start) / calls / frames * 1e6)
    return best


def cut(data: bytes, chunk: int, repeats: int = 10) -> float:
    """µs per frame to cut ``data`` in reads of ``chunk`` bytes."""
    buf = np.frombuffer(data, np.uint8)
    frames, start = 0, time.perf_counter()
    for _ in range(repeats):
        pos = 0
        while True:
            end = min(len(data), pos + chunk)
            groups, pos_next = split_frames(buf, pos, end)
            frames += sum(map(len, groups))
            if end == len(data):
                break
            pos = pos_next
    return (time.perf_counter() - start) / frames * 1e6


def predict_batches() -> None:
    from digitstream.bench.session import prepare_model
    from digitstream.model import runner as runners
    from digitstream.model.bundle import load_bundle

    with tempfile.TemporaryDirectory() as directory:
        prepare_model(Path(directory))
        pipeline = load_bundle(Path(directory)).pipeline
    runner = runners.make_runner(pipeline)
    X = np.tile(load_digits().data, (5, 1))[:8192]
    single = X.astype(np.float32)
    u8, double = (
        lambda: runner.predict(single, max_abs=255.0),
        lambda: runner.predict(X),
    )
    for name, f in (
        ("u8 (float32)", u8),
        ("float64", double),
        ("float64 with confidence", lambda: runner.predict(X, want_confidence=True)),
    ):
        print(f"predict, 8,192 rows {name}: {best_per_frame(f, 1):.0f} µs a batch")
    default = getattr(runners, "PRODUCT_ROWS", None)
    if default is None:  # a revision that multiplies the whole batch at once
        return
    try:
        for rows in (256, 512, 1024, 2048, 8192):
            runners.PRODUCT_ROWS = rows
            print(
                f"predict in blocks of {rows:,} rows, u8 / float64: "
                f"{best_per_frame(u8, 1):.0f} / {best_per_frame(double, 1):.0f} µs a batch"
            )
    finally:
        runners.PRODUCT_ROWS = default


def main() -> None:
    threadpool_limits(1)
    keep_batch_memory()
    if sys.argv[1:] == ["predict"]:
        predict_batches()
        return
    digits = load_digits()
    X = np.tile(digits.data, (5, 1))[:8192]
    rng = np.random.default_rng(0)
    results = JsonEncoder(np.arange(10)).encode(
        1_000_000,
        rng.integers(0, 10, 8192),
        rng.random(8192) * 0.5 + 0.5,
        {},
        [f"d{i}" for i in range(8192)],
    )
    pickles = frame_many(inputs.encode_images(X, "pickle"))
    images = inputs.encode_images(
        X,
        "json",
        labels=np.tile(digits.target, 5)[:8192],
        ids=[f"img-{i}" for i in range(8192)],
    )
    labelled = frame_many(images)
    cases = (
        ("json results", results),
        ("labelled json images", labelled),
        ("pickled images", pickles),
    )
    for name, data in cases:
        for chunk in (4096, 65536, 262144):
            print(f"cut {name}, {chunk // 1024} KiB reads: {cut(data, chunk):.3f} µs a frame")

    Xu = X.astype(np.uint8)
    A = rng.standard_normal((64, 10)).astype(np.float32)
    b = rng.standard_normal((10, 1)).astype(np.float32)
    Xf = Xu.astype(np.float32)
    product = Xf @ A
    scores = np.ascontiguousarray(product.T)
    top = scores.max(axis=0)
    near = (scores >= top - 0.01).view(np.uint8)
    numbers = np.arange(10, dtype=np.uint8)[:, None]
    steps = {
        "uint8 -> float32": lambda: Xu.astype(np.float32),
        "X @ A": lambda: Xf @ A,
        "transposed copy": lambda: np.ascontiguousarray(product.T),
        "bias": lambda: np.add(scores, b, out=scores),
        "top": lambda: scores.max(axis=0),
        "near top": lambda: (scores >= top - 0.01).view(np.uint8),
        "count and index": lambda: (
            np.add.reduce(near, axis=0, dtype=np.uint8),
            np.add.reduce(near * numbers, axis=0, dtype=np.uint8),
        ),
    }
    for name, f in steps.items():
        print(f"u8 step {name}, 8,192 rows: {per_call(f):.0f} µs")

    payloads = inputs.encode_images(X, "json", labels=digits.target[:1].repeat(8192))
    raws = [image.pixels for image in inputs._json_images(payloads[:256])]
    text = b"".join(bytes(r) for r in raws)
    layout = per_call(lambda: inputs._fixed_layout(text, 256, 64))
    print(f"json numbers, 256 lists of 64: {layout:.0f} µs")

    n = 4096
    some = frame_many(images[:n])
    (batch,), _ = split_frames(np.frombuffer(some, np.uint8), 0, len(some))
    decoder = inputs.Decoder("json", 64)
    decode = best_per_frame(lambda: decoder.decode(batch), len(batch))
    print(f"labelled json decode, {len(batch):,} frames: {decode:.3f} µs a frame")
    encoder = JsonEncoder(np.arange(10))
    labels, confidence = rng.integers(0, 10, n), rng.random(n) * 0.5 + 0.5
    ids = [f"img-{i}" for i in range(n)]
    encode = best_per_frame(lambda: encoder.encode(1_000_000, labels, confidence, {}, ids), n)
    print(f"json encode, {n:,} results with ids: {encode:.3f} µs a frame")
    predict_batches()


if __name__ == "__main__":
    main()
