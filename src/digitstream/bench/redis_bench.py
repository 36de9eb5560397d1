"""``digitstream bench --redis``: the Redis Streams connector against a bare relay.

A ``redis-server`` of its own (as ``digitstream demo --redis`` starts it) holds a
stream filled up front. Measured, each on a fresh pair of streams:

* **relay**: the connector's own source and sink, with the same client, batch size
  and commit script, in one process of its own, writing each entry's ``data`` back as its
  result (read, write, acknowledge; no decoding, no model, no application): the
  ceiling of this Redis, client and connector;
* **digitstream**: one ``digitstream run`` consumer, per input format (u8, pickle);
* **digitstream, three consumers** in one group (u8): their total.

Each system starts on a stream already full, its group created past the entries;
once it is ready (a consumer waiting in its blocking read) the group is pointed
back at the start. Throughput is entries / (time of the last result entry - that
moment), both on Redis's clock (milliseconds), so start-up is not counted. A figure
is the median of ``runs`` runs.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

from digitstream.batch import BatchResult
from digitstream.batching import BatchPolicy
from digitstream.bench.report import broker_main
from digitstream.codecs.inputs import encode_images
from digitstream.config import DEFAULTS
from digitstream.connectors.redis import RedisSink, RedisSource, RedisURL
from digitstream.datasets import load_dataset
from digitstream.tools.redis_demo import start_redis
from digitstream.wire.framing import frame_fixed, frame_many

HOST = "127.0.0.1"


def _fill(client, stream: str, group: str, payloads: list[bytes], total: int) -> None:
    """``total`` entries in ``stream``, and ``group`` created past them: its consumers start
    and wait, and :func:`_release` hands them every entry at once."""
    for start in range(0, total, 10_000):
        pipe = client.pipeline(transaction=False)
        for k in range(start, min(total, start + 10_000)):
            pipe.xadd(stream, {"data": payloads[k % len(payloads)]})
        pipe.execute()
    client.xgroup_create(stream, group, id="$")


def _release(client, stream: str, group: str, payload: bytes) -> float:
    """Point ``group`` back at the stream's start, and add one entry, which wakes a consumer
    waiting in a blocking read; Redis's clock (ms) just before."""
    seconds, micros = client.time()
    client.xgroup_setid(stream, group, "0")
    client.xadd(stream, {"data": payload})
    return seconds * 1000 + micros / 1000


def _rate(client, stream: str, total: int, since_ms: float, procs=(), timeout=300) -> float:
    """Entries per second from ``since_ms`` to the time of the last of ``total`` results."""
    deadline = time.monotonic() + timeout
    while client.xlen(stream) < total:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a consumer exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{client.xlen(stream)} of {total} results in {timeout:.0f} s")
        time.sleep(0.01)
    last = client.xrevrange(stream, count=1)[0][0]
    return total / max((int(last.split(b"-")[0]) - since_ms) / 1000, 1e-3)


async def _relay(port: int, stream_in: str, stream_out: str, total: int, count: int) -> None:
    """Read with the connector's source, write each payload back as its result with its sink."""
    source = RedisSource(RedisURL(HOST, port, stream_in), "relay", "r", BatchPolicy(count))
    sink = RedisSink(RedisURL(HOST, port, stream_out))
    await sink.start()
    await source.start(sink)
    print("listening on", stream_in, flush=True)
    done = 0
    async for stream in source.streams():
        async for batch in stream.batches():
            payloads = batch.payloads
            output = (
                frame_fixed(payloads.fixed)
                if payloads.fixed is not None
                else frame_many(payloads.to_list())
            )
            result = BatchResult(
                batch.stream, batch.first_seq, len(batch), output, [], np.zeros(0, np.int64)
            )
            result.receipt = batch.receipt
            await sink.write(result)
            done += len(batch)
            if done >= total:
                await source.drain()
        break
    await sink.flush()
    await sink.close()
    await source.close()


def _ready(procs, directory: Path, tag: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for i, proc in enumerate(procs):
        log = directory / f"{tag}-{i}.log"
        while "listening on" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"consumer {i} did not start: see {log}")
            time.sleep(0.05)


def _consumers(model: Path, port: int, tag: str, fmt: str, n: int, directory: Path):
    procs = []
    for i in range(n):
        log = open(directory / f"{tag}-{i}.log", "wb")  # noqa: SIM115 - the child owns it
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "digitstream.cli",
                    "run",
                    "--in",
                    f"redis://{HOST}:{port}/{tag}-in",
                    "--out",
                    f"redis://{HOST}:{port}/{tag}-out",
                    "--group",
                    tag,
                    "--name",
                    f"c{i}",
                    "--input-format",
                    fmt,
                    "--model",
                    str(model),
                    "--no-metrics",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        log.close()
    return procs


def _stop(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def measure(model: Path, total: int = 200_000, runs: int = 3, log=print) -> dict[str, Any]:
    """Every figure (entries/s, medians of ``runs``), and the ratios to the relay."""
    data = load_dataset("digits")
    payloads = {fmt: encode_images(data.X, fmt) for fmt in ("u8", "pickle")}
    directory = Path(tempfile.mkdtemp(prefix="digitstream-redis-bench-"))
    server, port = start_redis(directory)
    client: Any = redis.Redis(HOST, port, socket_timeout=60)
    rates: dict[str, list[float]] = {}
    try:
        for run in range(runs):
            for fmt in ("u8", "pickle"):
                tag = f"relay-{fmt}-{run}"
                _fill(client, f"{tag}-in", "relay", payloads[fmt], total)
                with open(directory / f"{tag}-0.log", "wb") as relay_log:
                    relay = subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "digitstream.bench.redis_bench",
                            str(port),
                            f"{tag}-in",
                            f"{tag}-out",
                            str(total + 1),
                            str(DEFAULTS.max_batch),
                        ],
                        stdout=relay_log,
                        stderr=subprocess.STDOUT,
                    )
                try:
                    _ready([relay], directory, tag)
                    since = _release(client, f"{tag}-in", "relay", payloads[fmt][0])
                    rates.setdefault(f"relay_{fmt}", []).append(
                        _rate(client, f"{tag}-out", total + 1, since, [relay])
                    )
                finally:
                    _stop([relay])
                client.delete(f"{tag}-in", f"{tag}-out")
                for name, n in ((f"digitstream_{fmt}", 1), (f"digitstream_{fmt}_x3", 3)):
                    if n == 3 and fmt != "u8":
                        continue
                    tag = f"{name}-{run}".replace("_", "-")
                    _fill(client, f"{tag}-in", tag, payloads[fmt], total)
                    procs = _consumers(model, port, tag, fmt, n, directory)
                    try:
                        _ready(procs, directory, tag)
                        since = _release(client, f"{tag}-in", tag, payloads[fmt][0])
                        rates.setdefault(name, []).append(
                            _rate(client, f"{tag}-out", total + 1, since, procs)
                        )
                    finally:
                        _stop(procs)
                    client.delete(f"{tag}-in", f"{tag}-out")
            log(
                f"run {run + 1} of {runs}: "
                + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items())
            )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        shutil.rmtree(directory, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    return {
        "entries": total,
        "runs": runs,
        "entries_per_s": medians,
        "all_runs": rates,
        "ratios": {
            "u8_vs_relay": medians["digitstream_u8"] / medians["relay_u8"],
            "pickle_vs_relay": medians["digitstream_pickle"] / medians["relay_pickle"],
            "u8_three_consumers_vs_one": medians["digitstream_u8_x3"] / medians["digitstream_u8"],
        },
    }


def main(
    model_path: str = "models",
    quick: bool = False,
    json_path: str | None = None,
    runs: int | None = None,
) -> int:
    return broker_main(
        measure,
        model_path,
        quick,
        json_path,
        runs,
        lambda f: (
            f"Redis Streams, {f['entries']:,} entries, median of {f['runs']} runs",
            "entries",
            f["entries_per_s"],
        ),
    )


if __name__ == "__main__":  # the relay, as a process of its own: PORT IN OUT TOTAL COUNT
    port, stream_in, stream_out, total, count = sys.argv[1:6]
    asyncio.run(_relay(int(port), stream_in, stream_out, int(total), int(count)))
