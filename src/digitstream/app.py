"""The streaming application behind ``digitstream run``.

Wiring only: the model bundle becomes a :class:`~digitstream.pipeline.Flow`,
an engine runs it on batches, the TCP source feeds the engine and the TCP sink
takes its results. Per connection, batches are submitted in order and their
results written in the same order; a bounded queue of batches in flight per
connection, and the sink's bounded queue, stop the source reading when the
downstream falls behind.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import time
from dataclasses import dataclass

import numpy as np

from digitstream.addresses import Address, is_loopback
from digitstream.codecs.inputs import smallest_payload
from digitstream.connectors.tcp import FrameSource, TcpSink
from digitstream.errors import UserError
from digitstream.pipeline import Batch, Flow
from digitstream.wire.framing import FrameTooLarge, Payloads

log = logging.getLogger("digitstream.app")


@dataclass
class AppConfig:
    in_addr: Address = Address("127.0.0.1", 8002)
    out_addr: Address = Address("127.0.0.1", 7002)
    metrics_addr: Address | None = Address("127.0.0.1", 5001)
    model_path: str = "models"
    input_format: str = "auto"
    output_format: str = "text"
    engine: str = "local"
    workers: int | None = None
    scheduler: str | None = None
    name: str = "worker-1"
    max_batch: int = 8192  # measured best for 64-pixel images: smaller adds per-batch overhead, larger leaves the cache
    max_delay: float = 0.0  # seconds
    max_frame: int = 1 << 20
    compile_model: bool = True
    in_flight: int = 4
    #: how often the --model path is checked for a new bundle, in seconds (0: only on SIGHUP)
    model_poll: float = 0.5
    #: on a stop signal, keep reading a connection until it is quiet this long ...
    drain_quiet: float = 0.2
    #: ... but no longer than this
    drain_grace: float = 5.0
    #: how long to wait for the listener to take the last results on a stop signal
    flush_timeout: float = 30.0


class _Connection:
    __slots__ = ("id", "source", "handler", "next_seq")

    def __init__(self, conn_id: int, source: FrameSource):
        self.id = conn_id
        self.source = source
        self.handler: asyncio.Task | None = None
        #: the first sequence number of the next batch, so also the frames received so far
        self.next_seq = 0


class Application:
    def __init__(self, config: AppConfig):
        self.config = config
        self.bundle = None
        self.flow: Flow | None = None
        self.engine = None
        self.sink: TcpSink | None = None
        self.metrics = None
        self.metrics_server = None
        self.server: asyncio.base_events.Server | None = None
        self.bound_in: Address | None = None
        self.connections: dict[int, _Connection] = {}
        self._ids = itertools.count(1)
        self.frames_in = 0  # complete frames received
        self.frames_out = 0  # result frames handed to the sink
        self._stop = asyncio.Event()
        self._stopping = False
        self.ready = asyncio.Event()
        self.watcher = None  # swaps in a new model bundle written to the --model path

    # ------------------------------------------------------------ start-up
    def load(self) -> None:
        from digitstream.model.bundle import load_bundle

        cfg = self.config
        self.bundle = load_bundle(cfg.model_path)
        self.flow = self.build_flow(self.bundle)
        runner = self.flow.runner
        smallest = smallest_payload(cfg.input_format, runner.n_features)
        if smallest > cfg.max_frame:
            raise UserError(f"the model takes {runner.n_features} features: one image is at least "
                            f"{smallest} bytes in the {cfg.input_format} input format, more than "
                            f"--max-frame {cfg.max_frame}")
        log.info("model %s: %s, %d features, classes %s%s", cfg.model_path,
                 " -> ".join(runner.stage_names), runner.n_features,
                 " ".join(str(c) for c in runner.classes), " (fused)" if runner.compiled else "")

    def build_flow(self, bundle) -> Flow:
        """The flow that serves ``bundle`` with this run's formats, at start and at a swap."""
        from digitstream.model.runner import make_runner

        cfg = self.config
        runner = make_runner(bundle.pipeline, compile=cfg.compile_model)
        return Flow(runner, cfg.input_format, cfg.output_format, worker=cfg.name)

    def _make_engine(self):
        cfg = self.config
        if cfg.engine == "dask":
            from digitstream.engine.dask import DaskEngine

            return DaskEngine(self.flow, self.bundle, cfg, metrics=self.metrics)
        from digitstream.engine.local import LocalEngine

        return LocalEngine(self.flow)

    async def start(self) -> None:
        cfg = self.config
        if self.flow is None:
            self.load()
        if cfg.metrics_addr is not None:
            from digitstream.metrics.recorder import Metrics

            self.metrics = Metrics(cfg.name, self.flow.stage_names, self.flow.runner.classes)
        self.engine = self._make_engine()
        await self.engine.start()
        if cfg.metrics_addr is not None:
            from digitstream.metrics.server import MetricsServer

            if not is_loopback(cfg.metrics_addr.host):
                log.warning("the metrics UI is bound to %s: anyone who can reach it can read it",
                            cfg.metrics_addr)
            self.metrics_server = MetricsServer(self, cfg.metrics_addr)
            await self.metrics_server.start()
        self.sink = TcpSink(cfg.out_addr)
        self.sink.start()
        try:
            loop = asyncio.get_running_loop()
            self.server = await loop.create_server(
                lambda: FrameSource(self._accepted, cfg.max_frame), cfg.in_addr.host,
                cfg.in_addr.port, backlog=1024)
        except OSError as exc:
            raise UserError(f"cannot listen on {cfg.in_addr}: {exc.strerror or exc}") from None
        port = self.server.sockets[0].getsockname()[1]
        self.bound_in = Address(cfg.in_addr.host, port)
        from digitstream.model.swap import ModelWatcher

        self.watcher = ModelWatcher(self, poll=cfg.model_poll)
        self.watcher.start()
        if self.metrics is not None:
            self.metrics.ready = True
        self.ready.set()
        log.info("listening on %s, results to %s%s", self.bound_in, cfg.out_addr,
                 f", metrics UI at {self.metrics_server.url}" if self.metrics_server else "")

    # ---------------------------------------------------------- the stream
    def _accepted(self, source: FrameSource) -> None:
        conn = _Connection(next(self._ids), source)
        if self._stopping:
            source.finish()
        self.connections[conn.id] = conn
        conn.handler = asyncio.get_running_loop().create_task(self._serve(conn))

    async def _serve(self, conn: _Connection) -> None:
        source = conn.source
        metrics = self.metrics
        if metrics:
            metrics.connection_opened()
        log.debug("connection %d from %s", conn.id, source.peer)
        # an engine that computes elsewhere (Dask) takes `capacity` batches at once:
        # one connection may keep all of them busy
        depth = max(self.config.in_flight, getattr(self.engine, "capacity", 0))
        results: asyncio.Queue = asyncio.Queue(maxsize=depth)
        deliver = asyncio.create_task(self._deliver(results))
        too_large = False
        try:
            await self._read_loop(conn, results)
        except FrameTooLarge as exc:
            too_large = True
            log.warning("connection %d from %s closed: %s", conn.id, source.peer, exc)
            if metrics:
                metrics.connection_error("frame_too_large")
        finally:
            if source.pending and not too_large:
                log.warning("connection %d from %s closed in the middle of a frame: "
                            "%d bytes of a partial frame dropped", conn.id, source.peer,
                            source.pending)
                if metrics:
                    metrics.connection_error("partial_frame")
            await results.put(None)
            await deliver
            source.close()
            self.connections.pop(conn.id, None)
            if metrics:
                metrics.connection_closed()
            log.debug("connection %d from %s done: %d frames", conn.id, source.peer, conn.next_seq)

    async def _read_loop(self, conn: _Connection, results: asyncio.Queue) -> None:
        cfg = self.config
        source = conn.source
        engine = self.engine
        metrics = self.metrics
        while True:
            groups = await source.read_groups()
            if groups is None:
                break
            if cfg.max_delay > 0:
                await self._fill(source, groups)
            received = time.perf_counter_ns()
            for group in _merge(groups):
                n = len(group)
                self.frames_in += n
                if metrics:
                    metrics.frames_received(n, group.nbytes)
                for start in range(0, n, cfg.max_batch):
                    part = _slice(group, start, start + cfg.max_batch)
                    batch = Batch(conn.id, conn.next_seq, part, received)
                    conn.next_seq += len(part)
                    # submit waits while the engine is full: reading stops there
                    await results.put((batch, await engine.submit(batch)))

    async def _fill(self, source: FrameSource, groups: list[Payloads]) -> None:
        """Wait for more frames until max_batch of them or max_delay has passed."""
        cfg = self.config
        deadline = time.monotonic() + cfg.max_delay
        while sum(map(len, groups)) < cfg.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            more = await source.read_groups(timeout=remaining)
            if not more:  # the end of the stream, or the deadline
                return
            groups.extend(more)

    async def _deliver(self, results: asyncio.Queue) -> None:
        sink = self.sink
        metrics = self.metrics
        while True:
            item = await results.get()
            if item is None:
                return
            batch, future = item
            result = await future
            await sink.write(result.output)
            self.frames_out += result.count
            if metrics:
                metrics.batch_done(result, (time.perf_counter_ns() - batch.received_ns) * 1e-9)

    # ------------------------------------------------------------ shutdown
    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("stopping: no new connections; answering what was received")
            self._stop.set()

    async def serve_until_stopped(self) -> int:
        await self._stop.wait()
        return await self.shutdown()

    async def shutdown(self) -> int:
        cfg = self.config
        self._stopping = True
        if self.watcher is not None:
            await self.watcher.close()
        if self.metrics is not None:
            self.metrics.ready = False
        if self.server is not None:
            self.server.close()
        handlers = [c.handler for c in self.connections.values() if c.handler]
        quiesce = [asyncio.create_task(self._quiesce(c)) for c in list(self.connections.values())]
        if handlers:
            await asyncio.gather(*handlers, return_exceptions=True)
        for task in quiesce:
            task.cancel()
        status = 0
        try:
            await asyncio.wait_for(self.sink.flush(), cfg.flush_timeout)
        except asyncio.TimeoutError:
            log.error("the listener at %s did not take the last %d result bytes within %.0f s",
                      cfg.out_addr, self.sink.queued_bytes, cfg.flush_timeout)
            status = 1
        await self.sink.close()
        if self.engine is not None:
            await self.engine.close()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        log.info("stopped: %d frames received, %d answered", self.frames_in, self.frames_out)
        return status

    async def _quiesce(self, conn: _Connection) -> None:
        """Read a connection until it is quiet (or the grace time ends), then end it."""
        cfg = self.config
        source = conn.source
        deadline = time.monotonic() + cfg.drain_grace
        while True:
            now = time.monotonic()
            quiet_for = now - source.last_rx
            if quiet_for >= cfg.drain_quiet or now >= deadline:
                break
            await asyncio.sleep(min(cfg.drain_quiet - quiet_for, deadline - now) + 0.001)
        source.finish()


def _merge(groups: list[Payloads]) -> list[Payloads]:
    """Join neighbouring fixed-width groups (from several reads) into one."""
    if len(groups) < 2:
        return groups
    merged: list[Payloads] = []
    for group in groups:
        last = merged[-1] if merged else None
        if (last is not None and last.fixed is not None and group.fixed is not None
                and last.fixed.shape[1] == group.fixed.shape[1]):
            merged[-1] = Payloads(fixed=np.concatenate([last.fixed, group.fixed]))
        else:
            merged.append(group)
    return merged


def _slice(group: Payloads, start: int, stop: int) -> Payloads:
    if start == 0 and stop >= len(group):
        return group
    if group.fixed is not None:
        return Payloads(fixed=group.fixed[start:stop])
    return Payloads(items=group.items[start:stop])


async def _main(config: AppConfig) -> int:
    app = Application(config)
    app.load()
    await app.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, app.request_stop)
    loop.add_signal_handler(signal.SIGHUP, app.watcher.request_reload)
    return await app.serve_until_stopped()


def run_app(config: AppConfig) -> int:
    """Run until SIGINT or SIGTERM; the exit status."""
    _raise_open_files_limit()
    return asyncio.run(_main(config))


def _raise_open_files_limit() -> None:
    # Every input connection is a file descriptor; the soft limit many shells set (1024,
    # even 256) would stop accepting long before the hard limit does.
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ImportError, ValueError, OSError) as exc:
        log.debug("open files limit left as it is: %s", exc)

