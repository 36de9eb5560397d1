"""``digitstream send --to URL`` and ``digitstream listen URL`` for a broker's connector.

What is the same for every broker lives here: the data set encoded in the chosen
format, sent in chunks (paced with ``--rate``), with a summary line at the end;
and a result stream read from its start, in its order, each result stored as one
frame (so that ``digitstream read`` reads the file as one written from TCP) or
printed one per line, until ``--count`` results or SIGINT / SIGTERM. What is
particular to a broker is its connector's :class:`~digitstream.connectors.kit.Publisher`
and :class:`~digitstream.connectors.kit.ResultReader`.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

from digitstream.connectors.kit import Connector, Endpoint
from digitstream.errors import UserError
from digitstream.wire.framing import Payloads, frame_many

#: messages per chunk
CHUNK = 10_000


def send_main(
    connector: Connector,
    endpoint: Endpoint,
    fmt: str = "pickle",
    dataset: str = "digits",
    repeat: int = 1,
    rate: float | None = None,
) -> int:
    """``digitstream send --to URL``: one message per image; returns the exit status."""
    # start-up time: the data set and codecs load only when sending
    from digitstream.codecs.inputs import encode_images
    from digitstream.datasets import load_dataset

    assert connector.publisher is not None
    data = load_dataset(dataset)
    payloads = encode_images(data.X, fmt, labels=data.y)
    labels = [str(label).encode() for label in data.y]
    publisher = connector.publisher(endpoint)
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
            stop = min(total, sent + chunk)
            indices = [k % n for k in range(sent, stop)]
            publisher.publish(
                [payloads[i] for i in indices],
                [labels[i] for i in indices],
                [str(k).encode() for k in range(sent, stop)],
            )
            sent = stop
        publisher.flush()
    except KeyboardInterrupt:
        print(f"send: interrupted after {sent:,} messages", file=sys.stderr)
        return 130
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"{publisher.describe()} failed after {sent:,} messages: {_reason(exc)}"
        ) from None
    finally:
        publisher.close()
    seconds = time.perf_counter() - start
    size = sum(map(len, payloads)) * repeat
    print(
        f"sent {sent:,} messages ({size / 1e6:,.1f} MB of data) in {seconds:.3f} s, "
        f"{sent / seconds if seconds > 0 else float('inf'):,.0f} messages/s, "
        f"to {publisher.describe()}",
        file=sys.stderr,
    )
    return 0


def listen_main(
    connector: Connector,
    endpoint: Endpoint,
    output: str | None = None,
    count: int | None = None,
) -> int:
    """``digitstream listen URL``: returns the exit status. Follows the result stream from
    its start until ``count`` results are stored, or SIGINT / SIGTERM."""
    # start-up time: the data set and codecs load only when sending
    from digitstream.tools.reader import write_lines

    assert connector.result_reader is not None
    reader = connector.result_reader(endpoint)
    stop = threading.Event()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if in_main_thread else None
    out = open(output, "wb") if output else sys.stdout.buffer  # noqa: SIM115 - closed below
    where = f", storing results in {output}" if output else ""
    print(f"listening on {reader.describe()}{where}", file=sys.stderr)
    stored = 0
    try:
        while not stop.is_set() and (count is None or stored < count):
            want = CHUNK if count is None else min(CHUNK, count - stored)
            results = reader.read(want, 0.2)
            if not results:
                continue
            if output:
                out.write(frame_many(results))
            else:
                write_lines([Payloads(items=results)], out)
            out.flush()
            stored += len(results)
    except KeyboardInterrupt:
        pass
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"{reader.describe()} failed after {stored:,} results: {_reason(exc)}"
        ) from None
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        if output:
            out.close()
        reader.close()
    print(
        f"received {stored:,} results from {reader.describe()}"
        + (f", stored in {output}" if output else ""),
        file=sys.stderr,
    )
    return 0


def _reason(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
