"""In-memory parts, so a flow runs in a unit test without sockets.

:class:`MemorySource` hands out streams of payloads given up front, through the
same batching policy as the TCP source; :class:`MemorySink` keeps every result
frame per stream. :func:`run_in_memory` runs the whole application (source ->
engine -> sink) on them::

    from digitstream.testing import MemorySink, MemorySource, run_in_memory

    source = MemorySource({"a": payloads_a, "b": payloads_b}, max_batch=64)
    sink = MemorySink()
    asyncio.run(run_in_memory(pipeline, source, sink, input_format="u8"))
    assert len(sink.frames["a"]) == len(payloads_a)

Both can be told to fail, to test what the application does then:
``MemorySource(..., fail_after={"a": 10})`` ends stream ``a`` with an error after
its 10th payload, and ``MemorySink(fail=lambda result: ...)`` raises
``ConnectionError`` from ``write`` for the results it picks, before taking them.
"""

from __future__ import annotations

import asyncio
import hashlib
import pickle
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digitstream.batch import Batch, BatchResult, Receipt, StreamId
from digitstream.batching import BatchPolicy, batches
from digitstream.config import AppConfig
from digitstream.errors import UserError
from digitstream.sinks import Sink
from digitstream.sources import InputStream, Source
from digitstream.wire.framing import Payloads, iter_frames

__all__ = ["MemorySink", "MemorySource", "MemoryStream", "memory_bundle", "run_in_memory"]


class SourceFailure(ConnectionError):
    """The failure a :class:`MemorySource` stream was told to end with."""


class MemoryStream(InputStream):
    """One stream of a :class:`MemorySource`."""

    def __init__(
        self,
        source: MemorySource,
        stream_id: StreamId,
        payloads: list[bytes],
        policy: BatchPolicy,
        read_size: int,
        fail_after: int | None,
    ):
        self.source = source
        self.id = stream_id
        self.payloads = payloads
        self.policy = policy
        self.read_size = max(1, read_size)
        self.fail_after = fail_after
        #: set once the application has let go of the stream (its last result is written)
        self.closed = asyncio.Event()
        self._pos = 0
        self._finished = False

    async def _read(self, timeout: float | None) -> list[Payloads] | None:
        await asyncio.sleep(0)  # a read is a suspension point, as on a socket
        limit = len(self.payloads) if self.fail_after is None else self.fail_after
        if self._pos >= limit or self._finished:
            if self.fail_after is not None and not self._finished:
                raise SourceFailure(f"stream {self.id} failed after {self.fail_after} payloads")
            return None
        end = min(self._pos + self.read_size, limit)
        group = Payloads.from_list(self.payloads[self._pos : end])
        self._pos = end
        return [group]

    async def batches(self) -> AsyncIterator[Batch]:
        async for batch in batches(self.id, self._read, self.policy):
            batch.receipt = Receipt(self.source, self.id, batch.first_seq, batch.end_seq)
            yield batch

    def finish(self) -> None:
        self._finished = True

    def close(self) -> None:
        self.closed.set()


def _given_not_named(cls, *args, **kwargs):
    raise UserError(f"{cls.__name__} is given to the application, not named by a URL")


class MemorySource(Source):
    """Exactly once, in memory: streams of payloads given up front.

    ``streams`` maps a stream id to its payloads (bytes). Each read hands out
    ``read_size`` of them, as one socket read would; ``max_batch`` and
    ``max_delay`` are the batching policy. ``acknowledged`` records what the
    sink said was delivered, per stream.
    """

    guarantee = "exactly once: nothing outside the process to lose"

    def __init__(
        self,
        streams: dict[StreamId, list[bytes]],
        max_batch: int = 8192,
        max_delay: float = 0.0,
        read_size: int = 1000,
        fail_after: dict[StreamId, int] | None = None,
    ):
        policy = BatchPolicy(max_batch, max_delay)
        fail_after = fail_after or {}
        self.streams_given = [
            MemoryStream(self, sid, list(p), policy, read_size, fail_after.get(sid))
            for sid, p in streams.items()
        ]
        self.acknowledged: dict[StreamId, int] = {}
        self._drained = asyncio.Event()

    build = classmethod(_given_not_named)

    def describe(self) -> str:
        return "memory"

    async def start(self, sink: Sink) -> None:
        pass

    async def streams(self) -> AsyncIterator[MemoryStream]:
        for stream in self.streams_given:
            yield stream
        await self._drained.wait()

    async def drain(self) -> None:
        for stream in self.streams_given:
            stream.finish()
        self._drained.set()

    def acknowledge(self, receipt: Receipt) -> None:
        stream = receipt.stream
        assert receipt.first_seq == self.acknowledged.get(stream, 0), "receipts out of order"
        self.acknowledged[stream] = receipt.end_seq


class MemorySink(Sink):
    """Exactly once, in memory: every result frame, per stream, in the order taken.

    ``fail(result)`` (if given) picks results whose ``write`` raises ``ConnectionError``
    before taking them, as a broken connection would.
    """

    guarantee = "exactly once: nothing outside the process to lose"

    def __init__(self, fail: Callable[[BatchResult], bool] | None = None):
        self.fail = fail
        self.frames: dict[StreamId, list[bytes]] = defaultdict(list)
        self.results: list[BatchResult] = []
        self.failures = 0
        self._delivered: dict[StreamId, int] = {}

    build = classmethod(_given_not_named)

    def describe(self) -> str:
        return "memory"

    async def write(self, result: BatchResult) -> None:
        await asyncio.sleep(0)
        if self.fail is not None and self.fail(result):
            self.failures += 1
            raise ConnectionError("the sink was told to fail this write")
        expected = self._delivered.get(result.stream, 0)
        if result.first_seq != expected:
            raise AssertionError(
                f"stream {result.stream}: result from {result.first_seq} "
                f"written, {expected} expected"
            )
        self.results.append(result)
        self.frames[result.stream].extend(iter_frames(result.output))
        self._delivered[result.stream] = result.end_seq
        if result.receipt is not None:
            result.receipt.delivered()

    async def flush(self) -> None:
        pass

    def delivered(self, stream: StreamId) -> int:
        return self._delivered.get(stream, 0)

    @property
    def undelivered(self) -> int:
        return 0

    def texts(self, stream: StreamId) -> list[str]:
        return [f.decode("utf-8", "replace") for f in self.frames[stream]]


@dataclass(frozen=True)
class _MemoryBundle:
    pipeline: object
    card: dict
    path: Path
    n_features: int
    classes: np.ndarray
    step_names: list[str]
    content_hash: str
    profile: object = None  # a reference profile (digitstream.monitor.profile), if given


def memory_bundle(pipeline, profile=None) -> _MemoryBundle:
    """A fitted pipeline as the application serves a bundle, without writing it to disk."""
    # start-up time: scikit-learn's helpers load only when a flow is built
    from digitstream.model.runner import n_features_of, pipeline_steps

    digest = hashlib.sha256(pickle.dumps(pipeline)).hexdigest()
    steps = [name for name, _ in pipeline_steps(pipeline)]
    return _MemoryBundle(
        pipeline,
        {"steps": steps},
        Path("<memory>"),
        n_features_of(pipeline),
        np.asarray(pipeline.classes_),
        steps,
        f"sha256:{digest}",
        profile,
    )


async def run_in_memory(pipeline, source: MemorySource, sink: MemorySink, **options) -> int:
    """Run the application on ``source`` and ``sink`` with ``pipeline`` until every stream of
    the source has ended and its results are in the sink; the exit status. ``options`` are
    :class:`~digitstream.config.AppConfig` fields (``input_format="u8"``, say)."""
    # start-up time: the application (and scikit-learn) load only when a flow runs
    from digitstream.app import Application

    config = AppConfig(metrics_addr=None, model_poll=0, **options)
    app = Application(config, source=source, sink=sink, bundle=memory_bundle(pipeline))
    await app.start()
    await asyncio.gather(*(s.closed.wait() for s in source.streams_given))
    return await app.shutdown()
