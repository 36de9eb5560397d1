"""The streaming application behind ``digitstream run``: source -> engine -> sink.

Wiring only. :meth:`Application.serve_stream` is the pipeline: each batch of a
stream goes to the engine as it comes, and each result to the sink in the same
order. A bounded queue of batches in flight per stream, the engine's own
capacity and the sink's bounded queue stop the source reading when the
downstream falls behind. Whatever the engine does with a batch, it is answered
(:func:`~digitstream.engine.base.answer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
import threading
import time
from typing import TYPE_CHECKING

from digitstream.addresses import is_loopback
from digitstream.backoff import Backoff
from digitstream.batch import BatchResult, StreamId
from digitstream.codecs.inputs import smallest_payload
from digitstream.config import AppConfig
from digitstream.connectors.registry import make_sink, make_source
from digitstream.engine.base import Engine, EngineOptions, answer, make_engine
from digitstream.errors import UserError
from digitstream.model.stored import StoredPipeline
from digitstream.monitor import Monitor
from digitstream.monitor.labels import LabelFeed
from digitstream.pipeline import Flow, FlowOptions, failure_reason
from digitstream.sinks import Sink
from digitstream.sources import InputStream, Source

if TYPE_CHECKING:
    from digitstream.metrics.recorder import Metrics
    from digitstream.metrics.server import MetricsServer
    from digitstream.model.bundle import Bundle
    from digitstream.model.swap import ModelWatcher
    from digitstream.monitor.shadow import Shadow

__all__ = ["AppConfig", "Application", "Serving", "run_app"]

log = logging.getLogger("digitstream.app")


class Serving:
    """The model serving now and the one way to change it: what the model watcher gets.

    ``positions`` maps each open stream to the sequence number of its next batch.
    """

    def __init__(
        self,
        bundle,
        flow: Flow,
        options: FlowOptions,
        engine: Engine | None,
        positions: dict[StreamId, int],
    ):
        self.bundle = bundle
        self.flow = flow
        self.options = options
        self.engine = engine
        self.positions = positions

    def build_flow(self, bundle) -> Flow:
        """The flow that would serve ``bundle`` with this run's formats."""
        return Flow.build(bundle.pipeline, self.options, bundle.profile)

    async def switch(self, bundle, flow: Flow) -> dict[StreamId, int]:
        """Serve ``bundle`` with ``flow`` from each stream's next batch on; those
        sequence numbers (the switch points)."""
        if self.engine is not None:
            await self.engine.set_flow(flow, bundle)
        # nothing is awaited from the engine's switch to here: no batch was submitted between
        self.bundle, self.flow = bundle, flow
        return dict(self.positions)


class Application:
    """``digitstream run``: ``config`` says what to read, serve and write. ``source``,
    ``sink`` and ``bundle``, if given, are used instead of those ``config`` names (the
    in-memory parts of :mod:`digitstream.testing`, say)."""

    def __init__(
        self, config: AppConfig, source: Source | None = None, sink: Sink | None = None, bundle=None
    ):
        self.config = config
        self._given = (source, sink, bundle)
        self.flow_options = FlowOptions(
            config.input_format,
            config.output_format,
            config.compile_model,
            worker=config.name,
            drift=config.drift,
            # late labels find the predictions of the inputs they are for by id; the shadow
            # model's answers are compared with them
            predictions=config.labels is not None or config.shadow is not None,
        )
        self.serving: Serving | None = None
        self.engine: Engine | None = None
        self.source: Source | None = None
        self.sink: Sink | None = None
        self.metrics: Metrics | None = None
        self.metrics_server: MetricsServer | None = None
        # swaps in a new model bundle written to the --model path
        self.watcher: ModelWatcher | None = None
        # watches the model serving: drift, late labels (digitstream.monitor)
        self.monitor: Monitor | None = None
        self.label_feed: LabelFeed | None = None
        self.shadow: Shadow | None = None
        self.shadow_watcher: ModelWatcher | None = None
        self.positions: dict[StreamId, int] = {}
        self.frames_in = 0  # complete frames received
        self.frames_out = 0  # result frames handed to the sink
        self.frames_held = 0  # complete frames the source held, not yet batched, at a stop
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._streams: set[asyncio.Task] = set()
        self._accepting: asyncio.Task | None = None
        self._sink_faults = 0
        # its own log lines say what failed (with the count): the backoff only waits
        self._sink_backoff = Backoff("the sink", first=0.01, longest=1.0, log=log, quiet=True)
        # a bundle served from its stored arrays, and what loads its real pipeline
        self._stored: Bundle | None = None
        self._finishing: threading.Thread | None = None
        self._failed = False  # the model failed to load, or the sink for good: exit status 1

    @property
    def bundle(self):
        return self.serving.bundle if self.serving else None

    @property
    def flow(self) -> Flow | None:
        return self.serving.flow if self.serving else None

    # ------------------------------------------------------------ start-up
    def load(self) -> None:
        # start-up time: loaded only when the run needs it (metrics, the stored model)
        from digitstream.model.bundle import load_bundle, load_bundle_stored

        cfg = self.config
        bundle = self._given[2]
        if bundle is None and cfg.engine == "local" and cfg.compile_model:
            # a linear model is served from its stored arrays at once; scikit-learn is
            # loaded after start-up (finish_loading), for the rows near a tie
            bundle = load_bundle_stored(cfg.model_path)
            self._stored = bundle
        if bundle is None:
            bundle = load_bundle(cfg.model_path)
        flow = Flow.build(bundle.pipeline, self.flow_options, bundle.profile)
        runner = flow.runner
        smallest = smallest_payload(cfg.input_format, runner.n_features)
        if smallest > cfg.max_frame:
            raise UserError(
                f"the model takes {runner.n_features} features: one image is at least "
                f"{smallest} bytes in the {cfg.input_format} input format, more than "
                f"--max-frame {cfg.max_frame}"
            )
        self.serving = Serving(bundle, flow, self.flow_options, None, self.positions)
        if cfg.shadow is not None:
            self._load_shadow(bundle)
        log.info(
            "model %s: %s, %d features, classes %s%s",
            cfg.model_path,
            " -> ".join(runner.stage_names),
            runner.n_features,
            " ".join(str(c) for c in runner.classes),
            " (fused)" if runner.compiled else "",
        )

    def _load_shadow(self, served) -> None:
        """The shadow model (``run --shadow``), checked against the served one."""
        # start-up time: loaded only when the run needs it (a shadow model)
        from digitstream.model.bundle import load_bundle
        from digitstream.monitor.shadow import Shadow

        cfg = self.config
        assert cfg.shadow is not None
        shadow = load_bundle(cfg.shadow)
        classes = [str(c) for c in served.classes]
        if shadow.n_features != served.n_features or [str(c) for c in shadow.classes] != classes:
            raise UserError(
                f"the shadow model at {cfg.shadow} takes {shadow.n_features} features into "
                f"classes {' '.join(map(str, shadow.classes))}; the model served takes "
                f"{served.n_features} into {' '.join(classes)}: they must be the same"
            )
        self.shadow = Shadow(shadow, self.flow_options, classes, cfg.label_window)
        log.info(
            "shadow model %s: %s (%s)",
            cfg.shadow,
            " -> ".join(shadow.step_names),
            shadow.content_hash,
        )

    async def start(self) -> None:
        cfg = self.config
        if self.serving is None:
            self.load()
        serving = self.serving
        assert serving is not None
        if cfg.metrics_addr is not None:
            # start-up time: loaded only when the run needs it (metrics, the stored model)
            from digitstream.metrics.recorder import Metrics

            self.metrics = Metrics(cfg.name, serving.flow.stage_names, serving.flow.runner.classes)
        self.monitor = Monitor(
            serving.flow.profile,
            cfg.drift,
            cfg.drift_window,
            cfg.drift_seconds,
            classes=serving.flow.runner.classes,
            labels=cfg.labels is not None,
            label_window=cfg.label_window,
            metrics=self.metrics,
        )
        if self.metrics is not None:
            self.metrics.monitor = self.monitor.report
        if self.shadow is not None:
            self.monitor.shadow = self.shadow
            self.shadow.start()
        source = self._given[0] or make_source(cfg.in_addr, cfg, self.metrics)
        sink = self._given[1] or make_sink(cfg.out_addr, cfg)
        if self.metrics is not None:
            for role, part in (("source", source), ("sink", sink)):
                if part.counters() is not None:  # a connector that counts its entries
                    self.metrics.connectors[role] = part.counters
        options = EngineOptions(
            self.flow_options,
            scheduler=cfg.scheduler,
            workers=cfg.workers,
            in_flight=cfg.in_flight,
            batch_deadline=cfg.batch_deadline,
            tls_ca_file=cfg.tls_ca_file,
            tls_cert=cfg.tls_cert,
            tls_key=cfg.tls_key,
        )
        self.engine = serving.engine = make_engine(
            cfg.engine, serving.flow, serving.bundle, options, metrics=self.metrics
        )
        await self.engine.start()
        if self.metrics is not None:
            await self._serve_metrics(source, sink)
        self.sink = sink
        sink.on_failure = self._sink_failed
        await sink.start()
        self.source = source
        await source.start(sink)
        self._accepting = asyncio.create_task(self._accept(), name="streams")
        if cfg.labels is not None:
            labels = make_source(cfg.labels, dataclasses.replace(cfg, acked=False))
            self.label_feed = LabelFeed(labels, self.monitor.labels_received)
            await self.label_feed.start(sink)
            log.info("late labels from %s", self.label_feed.describe())
        # start-up time: loaded only when the run needs it (metrics, the stored model)
        from digitstream.model.swap import ModelWatcher

        self.watcher = ModelWatcher(cfg.model_path, serving, self.metrics, poll=cfg.model_poll)
        self.watcher.start()
        if self.shadow is not None and cfg.shadow is not None:
            self.shadow_watcher = ModelWatcher(
                cfg.shadow, self.shadow, poll=cfg.model_poll, role="shadow model"
            )
            self.shadow_watcher.start()
        if self.metrics is not None:
            self.metrics.ready = True
        # What start-up made (modules, the model) lives as long as the process: kept out of
        # the collector's full passes, which would otherwise walk it all (some 200,000
        # objects, tens of ms) in the middle of a batch now and then. A collection first
        # would find nothing to free here (start-up makes no cycles it drops) and take 0.1 s.
        gc.freeze()
        if self._stored is not None:
            self._finish_loading(self._stored)
        self.ready.set()
        log.info(
            "listening on %s, results to %s%s",
            source.describe(),
            sink.describe(),
            f", metrics UI at {self.metrics_server.url}" if self.metrics_server else "",
        )

    def pipeline_loaded(self) -> bool:
        """False while the pipeline of a model served from its stored arrays loads."""
        pipeline = self._stored.pipeline if self._stored is not None else None
        return not isinstance(pipeline, StoredPipeline) or pipeline.resolved

    def _finish_loading(self, bundle) -> None:
        """Load the real pipeline of a bundle served from its stored arrays, on a thread
        of its own; should it fail, the run stops (exit status 1)."""
        # start-up time: loaded only when the run needs it (metrics, the stored model)
        from digitstream.model.bundle import finish_loading

        loop = asyncio.get_running_loop()

        def failed(exc: BaseException) -> None:
            log.error("model %s could not be loaded: %s", bundle.path, failure_reason(exc))
            self._failed = True
            self.request_stop()

        def load() -> None:
            started = time.perf_counter()
            # The import makes a great many objects that live as long as the process and
            # next to no garbage: collections meanwhile would only slow it (and serving).
            was_enabled = gc.isenabled()
            gc.disable()
            try:
                finish_loading(bundle)
            except BaseException as exc:
                loop.call_soon_threadsafe(failed, exc)
                return
            finally:
                gc.freeze()  # kept out of full collections, as what start-up made
                if was_enabled:
                    gc.enable()
            log.info(
                "model %s: pipeline loaded by skops in %.1f s, the same map as its arrays",
                bundle.path,
                time.perf_counter() - started,
            )

        self._finishing = threading.Thread(target=load, name="model-load", daemon=True)
        self._finishing.start()

    async def _serve_metrics(self, source: Source, sink: Sink) -> None:
        # start-up time: loaded only when the run needs it (metrics, the stored model)
        from digitstream.metrics.server import MetricsServer

        cfg = self.config
        metrics_addr = cfg.metrics_addr
        assert metrics_addr is not None  # only called when the config asks for metrics
        if not is_loopback(metrics_addr.host):
            log.warning(
                "the metrics UI is bound to %s: anyone who can reach it can read it",
                metrics_addr,
            )
        engine = self.engine
        serving = self.serving
        assert serving is not None  # start() loaded the model first

        def info() -> dict:
            return {
                "engine": cfg.engine,
                "cluster": engine.state() if engine else None,
                "pipeline_loaded": self.pipeline_loaded(),
                "input_format": cfg.input_format,
                "output_format": cfg.output_format,
                "addresses": {
                    "in": source.describe(),
                    "out": sink.describe(),
                    **({"labels": self.label_feed.describe()} if self.label_feed else {}),
                },
            }

        self.metrics_server = MetricsServer(
            self.metrics, metrics_addr, info=info, card=lambda: serving.bundle.card
        )
        await self.metrics_server.start()

    # ---------------------------------------------------------- the stream
    async def _accept(self) -> None:
        assert self.source is not None  # start() set it before accepting
        async for stream in self.source.streams():
            task = asyncio.create_task(self.serve_stream(stream), name=f"stream {stream.id}")
            self._streams.add(task)
            task.add_done_callback(self._streams.discard)

    async def serve_stream(self, stream: InputStream) -> None:
        """source -> engine -> sink, for one stream: every batch submitted in order, every
        result written in the same order, until the stream ends."""
        engine, serving, metrics = self.engine, self.serving, self.metrics
        assert engine is not None and serving is not None  # streams come only after start()
        in_flight: asyncio.Queue = asyncio.Queue(
            maxsize=max(self.config.in_flight, engine.capacity)
        )
        delivering = asyncio.create_task(self._deliver(in_flight))
        try:
            try:
                async for batch in stream.batches():
                    self.frames_in += len(batch)
                    if metrics:
                        metrics.frames_received(len(batch), batch.payloads.nbytes)
                    self.positions[stream.id] = batch.end_seq
                    # the flow serving at submission answers for the batch if the engine cannot
                    flow = serving.flow
                    # submit waits while the engine is full: reading stops there
                    await in_flight.put((batch, await engine.submit(batch), flow))
            except Exception:
                log.exception(
                    "stream %s ended by a fault; what it sent before is answered", stream.id
                )
            await in_flight.put(None)
            await delivering
        finally:
            delivering.cancel()  # cancelled (a stop that ran out of time): the results go too
            self.positions.pop(stream.id, None)
            stream.close()

    async def _deliver(self, in_flight: asyncio.Queue) -> None:
        metrics = self.metrics
        while (item := await in_flight.get()) is not None:
            batch, future, flow = item
            result = await answer(batch, future, flow)
            result.receipt = batch.receipt
            await self._write(result)
            self.frames_out += result.count
            if metrics:
                metrics.batch_done(result, (time.perf_counter_ns() - batch.received_ns) * 1e-9)
            if self.monitor is not None:
                self.monitor.batch_done(result, flow, batch)

    async def _write(self, result: BatchResult) -> None:
        """Hand ``result`` to the sink; a sink that raises is tried again, never skipped."""
        sink = self.sink
        assert sink is not None  # results come only after start() set the sink
        backoff = self._sink_backoff
        while True:
            try:
                await sink.write(result)
                backoff.succeeded()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._sink_faults += 1
                if self._sink_faults == 1 or self._sink_faults % 1000 == 0:
                    log.error(
                        "the sink %s failed to take a result (%s); trying again "
                        "(%d failures so far)",
                        sink.describe(),
                        failure_reason(exc),
                        self._sink_faults,
                    )
                await backoff.failed(exc)

    def _sink_failed(self, exc: BaseException) -> None:
        self._failed = True
        self.request_stop()

    # ------------------------------------------------------------ shutdown
    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("stopping: no new connections; answering what was received")
            self._stop.set()

    async def serve_until_stopped(self) -> int:
        await self._stop.wait()
        return await self.shutdown()

    async def shutdown(self) -> int:
        """Answer what was received and deliver it, within the drain and flush bounds;
        the exit status (1 if results were left undelivered, the model failed to load or
        the sink failed)."""
        cfg = self.config
        if self.watcher is not None:
            await self.watcher.close()
        if self.label_feed is not None:
            await self.label_feed.close()
        if self.shadow_watcher is not None:
            await self.shadow_watcher.close()
        if self.shadow is not None:
            await self.shadow.close()
        if self.metrics is not None:
            self.metrics.ready = False
        status = 0
        if self.source is not None:
            await self.source.drain()
        try:
            await asyncio.wait_for(self._finish(), cfg.flush_timeout)
        except asyncio.TimeoutError:
            status = 1
        for task in [self._accepting, *self._streams]:
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in [self._accepting, *self._streams] if t), return_exceptions=True
        )
        if status:
            self.frames_held = self.source.held_frames() if self.source else 0
        if self.sink is not None:
            await self.sink.close()
        if status:
            # every frame received whose result did not leave this host: frames not yet in
            # a batch, batches not answered, results the sink held when it closed (what it
            # had handed to the kernel still leaves: the close is graceful)
            not_answered = self.frames_in - self.frames_out
            log.error(
                "%d results not delivered: the sink %s did not take them within %.0f s",
                self.frames_held + not_answered + (self.sink.undelivered if self.sink else 0),
                self.sink.describe() if self.sink else "?",
                cfg.flush_timeout,
            )
        if self.source is not None:
            await self.source.close()
        if self.engine is not None:
            await self.engine.close()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        if self._finishing is not None:  # a process does not exit in the middle of an import
            await asyncio.to_thread(self._finishing.join)
        if self._failed:
            status = 1
        log.info(
            "stopped: %d frames received, %d answered",
            self.frames_in + self.frames_held,
            self.frames_out,
        )
        return status

    async def _finish(self) -> None:
        """Every stream's last result handed to the sink, and the sink flushed."""
        if self._accepting is not None:
            await self._accepting
        while self._streams:
            await asyncio.gather(*self._streams, return_exceptions=True)
        if self.sink is not None:
            await self.sink.flush()


async def _main(config: AppConfig) -> int:
    app = Application(config)
    app.load()
    await app.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, app.request_stop)
    assert app.watcher is not None  # start() made it
    loop.add_signal_handler(signal.SIGHUP, app.watcher.request_reload)
    return await app.serve_until_stopped()


def run_app(config: AppConfig) -> int:
    """Run until SIGINT or SIGTERM; the exit status."""
    _raise_open_files_limit()
    return asyncio.run(_main(config))


def _raise_open_files_limit() -> None:
    # Every input connection is a file descriptor; the soft limit many shells set (1024,
    # even 256) would stop accepting long before the hard limit does.
    with contextlib.suppress(ImportError, ValueError, OSError):
        # optional: the resource module exists on Unix only
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
