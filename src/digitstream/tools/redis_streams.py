"""``digitstream send --to redis://...`` and ``digitstream listen redis://...``.

The sender adds one entry per image to a stream, field ``data`` the same payload
bytes a TCP frame carries, ``label`` the image's true label and ``id`` its
position in what this command sends (from 0), pipelined many entries to a round
trip. The listener reads a result stream from its start, in its order, and
stores each result entry's ``data`` as one frame, so that ``digitstream read``
reads the file as one written from TCP; or prints one result per line.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

from redis.exceptions import RedisError

from digitstream.codecs.inputs import encode_images
from digitstream.connectors import Endpoint
from digitstream.connectors.redis import RedisURL, server_error
from digitstream.datasets import load_dataset
from digitstream.errors import UserError
from digitstream.tools.reader import write_lines
from digitstream.wire.framing import Payloads, frame_many

#: entries per round trip
CHUNK = 10_000


def redis_url(endpoint: Endpoint) -> RedisURL:
    return RedisURL.parse(endpoint.location, tls=endpoint.scheme == "rediss")


def connect(url: RedisURL):
    """A synchronous client whose server answered PING; UserError in one line if it did not."""
    client = url.client(sync=True)
    try:
        client.ping()
    except Exception as exc:
        raise server_error(url, exc) from None
    return client


def send_main(
    endpoint: Endpoint,
    fmt: str = "pickle",
    dataset: str = "digits",
    repeat: int = 1,
    rate: float | None = None,
) -> int:
    """``digitstream send --to redis://...``: returns the exit status."""
    url = redis_url(endpoint)
    data = load_dataset(dataset)
    payloads = encode_images(data.X, fmt, labels=data.y)
    labels = [str(label).encode() for label in data.y]
    client = connect(url)
    n = len(payloads)
    total = n * repeat
    chunk = CHUNK if not rate else max(1, min(CHUNK, int(rate / 100)))
    start = time.perf_counter()
    sent = 0
    try:
        while sent < total:
            if rate:
                delay = start + sent / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            pipe = client.pipeline(transaction=False)
            stop = min(total, sent + chunk)
            for k in range(sent, stop):
                i = k % n
                pipe.xadd(url.stream, {"data": payloads[i], "label": labels[i], "id": str(k)})
            pipe.execute()
            sent = stop
    except KeyboardInterrupt:
        print(f"send: interrupted after {sent:,} entries", file=sys.stderr)
        return 130
    except RedisError as exc:
        raise UserError(
            f"redis at {url.host}:{url.port} failed after {sent:,} entries: {exc}"
        ) from None
    seconds = time.perf_counter() - start
    size = sum(map(len, payloads)) * repeat
    print(
        f"sent {sent:,} entries ({size / 1e6:,.1f} MB of data) in {seconds:.3f} s, "
        f"{sent / seconds if seconds > 0 else float('inf'):,.0f} entries/s, to {url}",
        file=sys.stderr,
    )
    return 0


def listen_main(
    endpoint: Endpoint,
    output: str | None = None,
    count: int | None = None,
) -> int:
    """``digitstream listen redis://...``: returns the exit status. Follows the stream until
    ``count`` results are stored, or SIGINT / SIGTERM."""
    url = redis_url(endpoint)
    client = connect(url)
    stop = threading.Event()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if in_main_thread else None
    out = open(output, "wb") if output else sys.stdout.buffer  # noqa: SIM115 - closed below
    where = f", storing results in {output}" if output else ""
    print(f"listening on {url}{where}", file=sys.stderr)
    stored = 0
    last = b"0-0"
    try:
        while not stop.is_set() and (count is None or stored < count):
            want = CHUNK if count is None else min(CHUNK, count - stored)
            reply = client.xread({url.stream: last}, count=want, block=200)
            if not reply:
                continue
            entries = reply[0][1]
            last = entries[-1][0]
            results = [(fields or {}).get(b"data", b"") for _, fields in entries]
            if output:
                out.write(frame_many(results))
            else:
                write_lines([Payloads(items=results)], out)
            out.flush()
            stored += len(results)
    except KeyboardInterrupt:
        pass
    except RedisError as exc:
        raise UserError(
            f"redis at {url.host}:{url.port} failed after {stored:,} results: {exc}"
        ) from None
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        if output:
            out.close()
    print(
        f"received {stored:,} results from {url}" + (f", stored in {output}" if output else ""),
        file=sys.stderr,
    )
    return 0
