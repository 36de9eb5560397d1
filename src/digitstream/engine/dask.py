"""The Dask engine: batches are classified on the workers of a Dask cluster.

::

    run process                          scheduler                 each worker
    TCP source -> Batch --task-------->  keeps the task  -------->  Flow.process
    TCP sink  <- BatchResult <---------  result  <-----------------'  (model loaded once)

The TCP source, the sink and the metrics stay in the ``run`` process; only the
scheduler's port needs to be reachable from it.

**The model.** The bundle's files travel once, inside a worker plugin
(:class:`ModelPlugin`). The scheduler keeps the plugin and hands it to every
worker, including workers that join later, so no worker needs a shared disk,
only digitstream installed. A worker writes the files to its local directory
and loads them with the same loader as ``run`` (skops, untrusted types
refused, content hash checked): the model is never unpickled. It is loaded
once per worker process and kept, keyed by its content hash. A model swapped
in while running (:meth:`DaskEngine.set_flow`) travels the same way, in a
plugin of its own; each batch names the hash of the model serving when it was
submitted, and the old model's plugin is dropped once its last batch is
answered.

**A batch** is one task whose key is unique to (run, connection, first
sequence number). Its payloads go as one array (or one bytes blob and a
lengths array), never as a Python object per message. The task is a pure
function of its arguments, which the scheduler holds until the result is
taken: when a worker dies, the scheduler runs the task again elsewhere, and
the application still receives exactly one result per batch. The
application awaits results per connection in submission order, so the
output keeps its order whichever worker finishes first.

**Back-pressure.** :meth:`DaskEngine.submit` waits while ``in_flight x
workers`` batches are out; the application's read loop waits on it, so the
source stops reading when the cluster falls behind. The limit follows the
workers as they join and leave; with no worker left it is zero: the batches
already sent wait on the scheduler and reading stops until a worker joins.

**The scheduler lost.** The scheduler forgets the tasks it held, and the
client's futures with them: every batch out, and every later one, is computed
in this process, so no message is lost, and none is answered twice (a batch's
result is taken from exactly one place). Meanwhile a background task tries
the same address again, waiting 0.5 s, then twice as long each time, up to
10 s; an attempt is a TCP connect first, so a scheduler still down costs
nothing. Once a scheduler answers there and has a worker, the model plugin is
registered on it again (a new scheduler knows no plugin) and the batches
submitted from then on go to the cluster. A local cluster (``--workers``) is
not restarted: it ran in this process, so losing it means something broke
here; the batches stay in this process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digitstream.errors import UserError
from digitstream.pipeline import Batch, BatchResult, Flow
from digitstream.wire.framing import Payloads

log = logging.getLogger("digitstream.engine.dask")

#: how long ``run`` waits for a scheduler at start before giving up
CONNECT_TIMEOUT = 5.0
#: a task that raised is run again this many times before the batch is computed locally
TASK_RETRIES = 2
#: the watcher's fallback poll of the scheduler's workers; joins and losses arrive sooner as events
WORKER_POLL = 2.0
#: after the scheduler is lost: the first wait before trying it again, doubled after each try
RECONNECT_FIRST = 0.5
#: ... up to this
RECONNECT_MAX = 10.0
#: bundle files larger than this are not shipped (a bundle is a model and its card)
MAX_BUNDLE_BYTES = 1 << 30
#: Dask settings of the local cluster (``--workers``). Its dashboard-side sampling (a
#: profiler at 100 Hz in every worker, a 50 Hz tick in every process) cost an idle
#: two-worker cluster 14% of a core here, 2% without; no dashboard runs to show it.
#: A cluster of your own takes the same as DASK_DISTRIBUTED__... environment variables.
LOCAL_CLUSTER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "1s",
}

try:
    from distributed import WorkerPlugin
except ImportError:  # pragma: no cover - the engine is unusable, start() says so
    WorkerPlugin = object


# ============================================================ on the worker
@dataclass(frozen=True)
class FlowSpec:
    """What a worker needs to build the run's :class:`Flow` from a loaded model."""

    content_hash: str
    input_format: str
    output_format: str
    compile_model: bool


class _WorkerState:
    """Models and flows of this process, shared by the worker's threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.bundles: dict[str, object] = {}  # content hash -> loaded Bundle
        self.users: Counter = Counter()  # content hash -> plugins (runs) using it
        self.flows: dict[FlowSpec, Flow] = {}
        self.loads: Counter = Counter()  # content hash -> times loaded from bytes


_STATE = _WorkerState()


def model_loads() -> dict[str, int]:
    """How many times this process loaded each model (by content hash).

    Run it on every worker with ``client.run(model_loads)``.
    """
    with _STATE.lock:
        return dict(_STATE.loads)


def worker_label(name, address: str) -> str:
    """A worker's name in results and metrics: the name it was given, else its address."""
    if isinstance(name, str) and name and name != address and not name.isdigit():
        return name
    return address


class ModelPlugin(WorkerPlugin):
    """Carries a model bundle's files to every worker and loads them there, once."""

    def __init__(self, name: str, content_hash: str, files: dict[str, bytes], entry: str):
        self.name = name
        self.content_hash = content_hash
        self.files = files  # file name -> bytes
        self.entry = entry  # "" for a bundle directory, else the file to load
        self.loaded = False

    def setup(self, worker) -> None:
        with _STATE.lock:
            if self.content_hash not in _STATE.bundles:
                _STATE.bundles[self.content_hash] = self._load(Path(worker.local_directory))
                _STATE.loads[self.content_hash] += 1
            _STATE.users[self.content_hash] += 1
            self.loaded = True

    def teardown(self, worker) -> None:
        # Dask tears down a plugin whose setup failed too: that one holds no model, and
        # must not release one that another plugin (a model swapped back in) holds
        if not self.loaded:
            return
        with _STATE.lock:
            _STATE.users[self.content_hash] -= 1
            if _STATE.users[self.content_hash] <= 0:
                del _STATE.users[self.content_hash]
                _STATE.bundles.pop(self.content_hash, None)
                for spec in [s for s in _STATE.flows if s.content_hash == self.content_hash]:
                    del _STATE.flows[spec]

    def _load(self, local_directory: Path):
        from digitstream.model.bundle import load_bundle

        directory = local_directory / "digitstream-models" / _hex(self.content_hash)[:32]
        directory.mkdir(parents=True, exist_ok=True)
        for file_name, data in self.files.items():
            target = directory / Path(file_name).name  # names only: nothing escapes the directory
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        bundle = load_bundle(str(directory / self.entry) if self.entry else str(directory))
        if bundle.content_hash != self.content_hash:
            raise ValueError(f"the model loaded on this worker has content hash "
                             f"{bundle.content_hash}, the application's has {self.content_hash}")
        log.info("model %s loaded on this worker", _hex(self.content_hash)[:12])
        return bundle


def _worker_flow(spec: FlowSpec) -> Flow:
    flow = _STATE.flows.get(spec)
    if flow is not None:
        return flow
    from distributed import get_worker

    from digitstream.model.runner import make_runner

    worker = get_worker()
    with _STATE.lock:
        flow = _STATE.flows.get(spec)
        if flow is None:
            bundle = _STATE.bundles.get(spec.content_hash)
            if bundle is None:
                # the plugin's setup failed or has not run here: say so, the task is retried
                raise RuntimeError(f"model {_hex(spec.content_hash)[:12]} is not loaded on worker "
                                   f"{worker.address} (see that worker's log)")
            runner = make_runner(bundle.pipeline, compile=spec.compile_model)
            flow = Flow(runner, spec.input_format, spec.output_format,
                        worker=worker_label(worker.name, worker.address))
            _STATE.flows[spec] = flow
    return flow


def dask_setup(worker) -> None:
    """Preload of the local cluster's worker processes (``--workers``): ignore SIGINT.

    Ctrl-C in a terminal reaches the whole process group, these workers too;
    ``run`` then answers what it received, which needs them, and stops them itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def classify(spec: FlowSpec, conn_id: int, first_seq: int, packed) -> BatchResult:
    """The task: one batch through the run's flow on this worker."""
    flow = _worker_flow(spec)
    return flow.process(Batch(conn_id, first_seq, unpack(packed), 0))


# ------------------------------------------------------- payloads on the wire
def pack(payloads: Payloads):
    """Payloads as few buffers: the ``(n, length)`` array, or ``(blob, lengths)``."""
    if payloads.fixed is not None:
        return np.ascontiguousarray(payloads.fixed)
    items = payloads.items
    lengths = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
    return b"".join(items), lengths


def unpack(packed) -> Payloads:
    if isinstance(packed, np.ndarray):
        return Payloads(fixed=packed)
    blob, lengths = packed
    ends = np.cumsum(lengths).tolist()
    view = memoryview(blob)
    starts = [0, *ends[:-1]]
    return Payloads(items=[bytes(view[s:e]) for s, e in zip(starts, ends)])


# ======================================================== in the run process
class _Slots:
    """A semaphore whose size follows the cluster: ``in_flight`` per worker."""

    def __init__(self):
        self.size = 0
        self.used = 0
        self._changed = asyncio.Event()

    async def acquire(self) -> None:
        while self.used >= self.size:
            self._changed.clear()
            await self._changed.wait()
        self.used += 1

    def release(self) -> None:
        self.used -= 1
        self._changed.set()

    def resize(self, size: int) -> None:
        self.size = size
        self._changed.set()


def _bundle_files(path: Path) -> tuple[dict[str, bytes], str]:
    """The files to ship for a bundle at ``path`` and the one to load ("" for the directory)."""
    if path.is_dir():
        files = {p.name: p.read_bytes() for p in sorted(path.iterdir())
                 if p.is_file() and not p.name.startswith(".")}
        entry = ""
    else:
        files, entry = {path.name: path.read_bytes()}, path.name
    size = sum(map(len, files.values()))
    if size > MAX_BUNDLE_BYTES:
        raise UserError(f"the model bundle at {path} is {size / 2**20:.0f} MiB: too big to "
                        f"send to the Dask workers")
    return files, entry


def scheduler_address(text: str) -> str:
    """``HOST:PORT`` or ``tcp://HOST:PORT`` as Dask's address (``tcp://`` by default)."""
    return text if "://" in text else f"tcp://{text}"


class DaskEngine:
    """Runs the flow's batches on a Dask cluster; see the module docstring.

    ``config`` is the application's :class:`~digitstream.app.AppConfig`:
    ``scheduler`` (a running cluster) or ``workers`` (a local cluster of that
    many worker processes), ``in_flight`` (batches per worker), the formats and
    ``compile_model``. ``metrics``, if given, hears of workers joining and
    leaving (``worker_event``).
    """

    name = "dask"

    def __init__(self, flow: Flow, bundle, config, metrics=None):
        self.flow = flow
        self.bundle = bundle
        self.config = config
        self.metrics = metrics
        self.in_flight = config.in_flight
        self.client = None
        self.cluster = None
        self.workers: dict[str, str] = {}  # address -> label
        self.local_fallbacks = 0  # batches the cluster could not compute, computed here
        self._quiet_until = 0.0
        self._run_id = uuid.uuid4().hex[:12]
        self._slots = _Slots()
        self._held_messages = 0  # messages of the batches in flight
        self._attempts = 0
        self._watcher: asyncio.Task | None = None
        self._refresh_lock = asyncio.Lock()
        self._refreshes: set[asyncio.Task] = set()
        self._subscribed = False
        self._waiters: set[asyncio.Future] = set()  # awaits of results from the cluster
        self._scheduler_lost = False
        self._losses = 0  # scheduler connections lost so far
        self.reconnects = 0  # ... and made again
        self._reconnector: asyncio.Task | None = None
        self._dropping: set[asyncio.Task] = set()  # clients of lost schedulers, closing
        self.address = ""  # the scheduler's
        self._plugin_name = f"digitstream-model-{_hex(bundle.content_hash)[:12]}-{self._run_id}"
        self._plugin_hash = bundle.content_hash  # the model of the plugin named above
        self._plugins = [self._plugin_name]  # registered by this run: the model's, and retiring ones
        self._swaps = 0
        self._by_spec: Counter = Counter()  # FlowSpec -> batches submitted and not yet answered
        self._drained: dict[FlowSpec, list[asyncio.Future]] = {}
        self._retiring: set[asyncio.Task] = set()
        self._spec = FlowSpec(bundle.content_hash, config.input_format, config.output_format,
                              config.compile_model)

    @property
    def capacity(self) -> int:
        """Batches the cluster takes at once now: ``in_flight`` per worker."""
        return self._slots.size

    def state(self) -> dict:
        """Where batches go now, for ``/api/stats`` (``cluster``)."""
        return {
            "scheduler": self.address,
            "local_cluster": self.cluster is not None,
            "connected": not self._scheduler_lost,
            "workers": len(self.workers),
            "reconnects": self.reconnects,
            "in_process_batches": self.local_fallbacks,
        }

    # ---------------------------------------------------------- lifecycle
    async def start(self) -> None:
        try:
            from distributed import Client
        except ImportError:
            raise UserError("--engine dask needs Dask distributed: "
                            "pip install 'digitstream[dask]'") from None
        cfg = self.config
        if not log.isEnabledFor(logging.DEBUG):
            # Dask logs every connection, plugin and nanny at INFO: the application's own
            # lines would drown (``run -v`` shows them)
            logging.getLogger("distributed").setLevel(logging.WARNING)
        _quiet_abandoned_clients()
        if cfg.scheduler:
            address = scheduler_address(cfg.scheduler)
            try:
                self.client = await asyncio.wait_for(
                    Client(address, asynchronous=True, timeout=CONNECT_TIMEOUT,
                           set_as_default=False),
                    CONNECT_TIMEOUT + 5)
            except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
                raise UserError(f"cannot reach the Dask scheduler at {address} within "
                                f"{CONNECT_TIMEOUT:.0f} s: {_reason(exc)}") from None
            self.address = address
            where = f"the Dask scheduler at {address}"
        else:
            import dask
            from distributed import LocalCluster

            dask.config.set(LOCAL_CLUSTER_CONFIG)  # this process runs the scheduler too
            n = cfg.workers or 1
            # no dashboard; the scheduler's small HTTP server (health, metrics) on any free
            # loopback port rather than on 8787, which another cluster may hold
            self.cluster = await LocalCluster(
                host="127.0.0.1", n_workers=n, threads_per_worker=1, processes=True,
                dashboard_address=None, asynchronous=True, preload=[__name__],
                scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"})
            self.client = await Client(self.cluster, asynchronous=True, set_as_default=False)
            self.address = self.cluster.scheduler_address
            where = f"a local Dask cluster at {self.address}"
        try:
            await self._register_model()
        except BaseException:
            await self.close()
            raise
        self.client.subscribe_topic("all", self._on_event)
        self._subscribed = True
        await self._refresh()
        self._watcher = asyncio.create_task(self._watch(self.client))
        log.info("engine: %s; %d worker(s), up to %d batches in flight per worker", where,
                 len(self.workers), self.in_flight)
        if not self.workers:
            log.warning("no Dask worker yet: input waits until one joins")

    async def _register_model(self) -> None:
        plugin = await _model_plugin(self._plugin_name, self.bundle)
        try:
            await self.client.register_plugin(plugin, name=self._plugin_name)
        except Exception as exc:
            raise UserError(f"a Dask worker could not load the model: {_reason(exc)}") from None

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self._reconnector is not None:
            self._reconnector.cancel()
            try:
                await self._reconnector
            except BaseException:  # cancelled, as asked
                pass
            self._reconnector = None
        for task in list(self._retiring):
            task.cancel()
        if self.client is not None:
            if self.client.status == "running":
                if self._subscribed:
                    # else the scheduler's farewell event finds this client's comm closed
                    self.client.unsubscribe_topic("all")
                if self.cluster is None:
                    # a shared cluster: its workers drop the model unless another run uses it
                    for name in list(self._plugins):
                        await self._unregister(name)
            if self._scheduler_lost:
                # its reconnection attempts, cut short here, would log tracebacks about
                # what the error above already said
                logging.getLogger("distributed.client").setLevel(logging.CRITICAL)
            await self.client.close()
            self.client = None
        if self._dropping:
            await asyncio.wait(list(self._dropping))
        if self.cluster is not None:
            await self.cluster.close()
            self.cluster = None

    # ------------------------------------------------------------ batches
    async def submit(self, batch: Batch) -> "asyncio.Future[BatchResult]":
        """Wait until the cluster can take ``batch``, send it; a future of its result."""
        # the model is the one serving when the batch comes, however long it waits for a slot
        spec, flow = self._spec, self.flow
        self._by_spec[spec] += 1
        try:
            await self._slots.acquire()
        except BaseException:
            self._spec_done(spec)
            raise
        task = asyncio.create_task(self._compute(batch, spec, flow))
        return task

    async def _compute(self, batch: Batch, spec: FlowSpec, flow: Flow) -> BatchResult:
        self._held_messages += len(batch)
        try:
            if self._scheduler_lost:
                self.local_fallbacks += 1
                return flow.process(batch)
            return await self._on_cluster(batch, spec)
        except asyncio.CancelledError:
            raise
        except SchedulerLost:
            # the loss is logged once, for all its batches
            self.local_fallbacks += 1
            return flow.process(batch)
        except Exception as exc:
            # the cluster could not compute it (the task kept failing, or the scheduler
            # went away): computed here rather than lost or left out of the output
            self._fell_back(batch, exc)
            return flow.process(batch)
        finally:
            self._held_messages -= len(batch)
            self._slots.release()
            self._spec_done(spec)

    async def _on_cluster(self, batch: Batch, spec: FlowSpec) -> BatchResult:
        client, losses = self.client, self._losses
        self._attempts += 1
        key = f"digitstream-{self._run_id}-{batch.conn_id}-{batch.first_seq}-{self._attempts}"
        future = client.submit(classify, spec, batch.conn_id, batch.first_seq,
                               pack(batch.payloads), key=key, retries=TASK_RETRIES, pure=False)
        # awaited through a task of our own, which the watcher cancels if the scheduler is
        # lost: a Dask future caught in a gather at that moment may never resolve
        waiter = asyncio.ensure_future(future.result())
        self._waiters.add(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if self._losses != losses and waiter.cancelled():
                raise SchedulerLost(self.address) from None
            raise
        except Exception as exc:
            if isinstance(exc, OSError):
                # a connection to the scheduler broke: the client may be about to say it
                # lost the scheduler
                deadline = time.monotonic() + 1.0
                while (client.status == "running" and self._losses == losses
                       and time.monotonic() < deadline):
                    await asyncio.sleep(0.05)
            if client.status != "running" or self._losses != losses:
                # the client cancels its futures as it loses the scheduler: that loss,
                # seen here before the watcher sees it
                self._lose_scheduler(client)
                raise SchedulerLost(self.address) from None
            raise
        finally:
            self._waiters.discard(waiter)
            future.release()

    def _fell_back(self, batch: Batch, exc: Exception) -> None:
        self.local_fallbacks += 1
        now = time.monotonic()
        if now >= self._quiet_until:  # one line every few seconds, not one per batch
            self._quiet_until = now + 5.0
            log.warning("%d batches so far computed in this process because the cluster could "
                        "not; the latest (connection %d, from message %d): %s",
                        self.local_fallbacks, batch.conn_id, batch.first_seq, _reason(exc))

    # ------------------------------------------------------------- models
    async def set_flow(self, flow: Flow, bundle) -> None:
        """Serve ``bundle`` from the next batch on (``flow`` for batches computed here).

        Its files go to every worker first, in a plugin of their own, as the first
        model's did at start, and are loaded there (workers that join later get
        them from the scheduler). If a worker cannot load them: BundleError, and
        the model serving stays. Then the switch, with nothing awaited after it:
        a batch submitted before this returns uses the old model, one submitted
        after, the new. The old model stays on the workers until its last batch
        is answered. With the scheduler lost, the switch is all: the model goes to
        the cluster when it is back.
        """
        from digitstream.model.bundle import BundleError

        name = None
        while not self._scheduler_lost:
            client = self.client
            name = self._new_plugin_name(bundle)
            plugin = await _model_plugin(name, bundle)
            self._plugins.append(name)
            try:
                await client.register_plugin(plugin, name=name)
            except Exception as exc:
                if client is self.client and not self._scheduler_lost:
                    await self._unregister(name)
                    raise BundleError(f"a Dask worker could not load it: {_reason(exc)}") from None
            if client is self.client and not self._scheduler_lost:
                break
            # that scheduler was lost meanwhile: the one there is now, if any, gets it
            if name in self._plugins:
                self._plugins.remove(name)
            name = None
        old_spec, old_plugin = self._spec, self._plugin_name
        self.flow, self.bundle = flow, bundle
        self._spec = FlowSpec(bundle.content_hash, old_spec.input_format, old_spec.output_format,
                              old_spec.compile_model)
        if name is not None:
            self._plugin_name, self._plugin_hash = name, bundle.content_hash
            task = asyncio.create_task(self._retire(old_plugin, old_spec))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def _new_plugin_name(self, bundle) -> str:
        self._swaps += 1
        return f"digitstream-model-{_hex(bundle.content_hash)[:12]}-{self._run_id}-{self._swaps}"

    async def _retire(self, plugin_name: str, spec: FlowSpec) -> None:
        """Drop a swapped-out model's plugin once no batch submitted for it is left."""
        if self._by_spec[spec]:
            drained = asyncio.get_running_loop().create_future()
            self._drained.setdefault(spec, []).append(drained)
            await drained
        await self._unregister(plugin_name)

    def _spec_done(self, spec: FlowSpec) -> None:
        self._by_spec[spec] -= 1
        if self._by_spec[spec] <= 0:
            del self._by_spec[spec]
            for drained in self._drained.pop(spec, ()):
                if not drained.done():
                    drained.set_result(None)

    async def _unregister(self, name: str, client=None) -> None:
        client = client or self.client
        try:
            if client is None:
                raise SchedulerLost(self.address)
            await asyncio.wait_for(client.unregister_worker_plugin(name), 5)
        except Exception as exc:  # the scheduler may be gone already
            log.debug("could not unregister the model plugin %s: %s", name, exc)
        if name in self._plugins:
            self._plugins.remove(name)

    # ------------------------------------------------------------ workers
    def _on_event(self, event) -> None:
        # called in the client's message loop: anything slow goes to a task of its own
        _, message = event
        action = message.get("action") if isinstance(message, dict) else None
        if action == "remove-worker":
            ours = [k for k in message.get("processing-tasks", ()) if str(k).startswith(
                f"digitstream-{self._run_id}-")]
            if ours:
                log.warning("worker %s lost with %d batches in progress: they are computed again "
                            "on the other workers", self.workers.get(message.get("worker"),
                                                                     message.get("worker")),
                            len(ours))
        if action in ("add-worker", "remove-worker"):
            task = asyncio.create_task(self._refresh())
            self._refreshes.add(task)
            task.add_done_callback(self._refreshes.discard)

    async def _watch(self, client) -> None:
        next_refresh = time.monotonic() + WORKER_POLL
        while client is self.client and not self._scheduler_lost:
            await asyncio.sleep(0.2)
            if client.status != "running":
                self._lose_scheduler(client)
            elif time.monotonic() >= next_refresh:
                next_refresh = time.monotonic() + WORKER_POLL
                try:
                    await self._refresh()
                except Exception as exc:  # the scheduler may be briefly unreachable
                    log.debug("could not ask the scheduler for its workers: %s", exc)

    def _lose_scheduler(self, client) -> None:
        """``client`` lost the scheduler: every batch out, and every later one until
        it is back, is computed in this process (the scheduler forgot the tasks)."""
        if client is not self.client or self._scheduler_lost:
            return  # seen already
        self._scheduler_lost = True
        self._losses += 1
        local = self.cluster is not None
        log.error("Dask scheduler at %s lost, classifying in-process: the %d batches in flight "
                  "and all that follow%s", self.address, self._slots.used,
                  " (the local cluster is not restarted)" if local else
                  ", until it is back (trying it again in the background)")
        self._slots.resize(max(self._slots.size, self.in_flight))
        for waiter in list(self._waiters):
            waiter.cancel()
        # out of reach now, whatever became of them
        gone, self.workers = self.workers, {}
        if self.metrics is not None:
            for label in gone.values():
                self.metrics.worker_event(label, "lost")
        if local:
            return
        # its own reconnection would find a scheduler without the model: a new client will
        self._subscribed = False
        self._drop(self.client)
        self.client = None
        self._reconnector = asyncio.create_task(self._reconnect())

    def _drop(self, client) -> None:
        """Close ``client`` in the background.

        At once, as Dask's own blocking ``close`` does (``fast``): the plain one lets
        the client's own reconnection go on for seconds, and it may meet the next
        scheduler at this address, with whatever it held back to send.
        """
        async def close():
            fast_close = getattr(client, "_close", None)
            try:
                await asyncio.wait_for(fast_close(fast=True) if fast_close else client.close(),
                                       CONNECT_TIMEOUT)
            except Exception as exc:
                log.debug("closing the client of a lost scheduler: %s", _reason(exc))

        task = asyncio.create_task(close())
        self._dropping.add(task)
        task.add_done_callback(self._dropping.discard)

    async def _reconnect(self) -> None:
        """Try the scheduler's address until a scheduler with a worker answers, then
        send it the model and send it the batches again."""
        from distributed import Client

        delay = RECONNECT_FIRST
        client = None
        told_no_worker = told_no_model = False
        try:
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                if client is not None and client.status != "running":
                    self._drop(client)
                    client = None
                if client is None:
                    if not await _accepts(self.address):
                        continue
                    client = Client(self.address, asynchronous=True, timeout=CONNECT_TIMEOUT,
                                    set_as_default=False)
                    try:
                        await asyncio.wait_for(client, CONNECT_TIMEOUT + 5)
                    except Exception as exc:
                        log.debug("the Dask scheduler at %s: %s", self.address, _reason(exc))
                        self._drop(client)
                        client = None
                        continue
                    delay = RECONNECT_FIRST
                try:
                    info = await asyncio.wait_for(client.scheduler.identity(n_workers=-1),
                                                  CONNECT_TIMEOUT)
                except Exception as exc:
                    log.debug("the Dask scheduler at %s: %s", self.address, _reason(exc))
                    continue
                if not info.get("workers"):
                    if not told_no_worker:
                        told_no_worker = True
                        log.info("a Dask scheduler is back at %s without workers: classifying "
                                 "in-process until one joins", self.address)
                    delay = min(delay, WORKER_POLL)
                    continue
                try:
                    await self._send_model(client)
                except Exception as exc:
                    if client.status != "running":
                        log.debug("the Dask scheduler at %s: %s", self.address, _reason(exc))
                    elif not told_no_model:
                        told_no_model = True
                        log.error("the Dask workers at %s could not load the model: %s; "
                                  "classifying in-process, trying again", self.address,
                                  _reason(exc))
                    continue
                await self._resume(client, len(info["workers"]))
                client = None
                return
        finally:
            if client is not None and client is not self.client:
                self._drop(client)

    async def _send_model(self, client) -> None:
        """Register the model serving now on ``client``'s scheduler: its workers load it."""
        while True:
            bundle = self.bundle
            name = (self._plugin_name if bundle.content_hash == self._plugin_hash
                    else self._new_plugin_name(bundle))
            await client.register_plugin(await _model_plugin(name, bundle), name=name)
            if bundle is self.bundle:
                # what the lost scheduler held is gone with it
                self._plugin_name, self._plugin_hash, self._plugins = (
                    name, bundle.content_hash, [name])
                return
            # swapped meanwhile: the model serving now goes instead
            await self._unregister(name, client)

    async def _resume(self, client, n_workers: int) -> None:
        """From the next batch on, batches go to ``client``'s scheduler."""
        self.client = client
        self._scheduler_lost = False
        self.reconnects += 1
        client.subscribe_topic("all", self._on_event)
        self._subscribed = True
        self._watcher = asyncio.create_task(self._watch(client))
        try:
            await self._refresh()
        except Exception as exc:  # the watcher tries again
            log.debug("could not ask the scheduler for its workers: %s", exc)
        log.warning("Dask scheduler back at %s, %d worker(s): new batches go to the cluster",
                    self.address, len(self.workers) or n_workers)

    async def _refresh(self) -> None:
        """Bring the worker list, the in-flight limit and the metrics up to date."""
        async with self._refresh_lock:
            client = self.client
            if client is None or self._scheduler_lost:
                return
            info = await client.scheduler.identity(n_workers=-1)
            if client is not self.client or self._scheduler_lost:
                return  # an answer from a scheduler lost meanwhile
            now = {address: worker_label(w.get("name"), address)
                   for address, w in info.get("workers", {}).items()}
            old = self.workers
            joined = [a for a in now if a not in old]
            lost = [a for a in old if a not in now]
            self.workers = now
            waiting = self._slots.size == 0 and self._slots.used
            self._slots.resize(self.in_flight * len(now))
            metrics = self.metrics
            for address in joined:
                log.info("Dask worker joined: %s", now[address])
                if metrics is not None:
                    metrics.worker_event(now[address], "joined")
            for address in lost:
                log.warning("Dask worker lost: %s", old[address])
                if metrics is not None:
                    metrics.worker_event(old[address], "lost")
            if old and not now:
                log.error("all Dask workers are gone: %d batches (%d messages) wait on the "
                          "scheduler; no input is read until a worker joins",
                          self._slots.used, self._held_messages)
            elif now and waiting:
                log.info("a Dask worker joined: the %d waiting batches go on", self._slots.used)


async def _model_plugin(name: str, bundle) -> ModelPlugin:
    """The worker plugin ``name`` that loads ``bundle`` on every worker (its files read
    off the event loop); UserError if the bundle is too big to send."""
    files, entry = await asyncio.to_thread(_bundle_files, Path(bundle.path))
    return ModelPlugin(name, bundle.content_hash, files, entry)


async def _accepts(address: str) -> bool:
    """Whether a TCP connect to ``address`` succeeds (other schemes: assumed so)."""
    from distributed.comm import parse_address
    from distributed.comm.addressing import parse_host_port

    scheme, location = parse_address(address)
    if scheme != "tcp":
        return True
    host, port = parse_host_port(location)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True


class _AbandonedClientFilter(logging.Filter):
    """Drops what Dask logs as errors when this engine closes the client of a lost
    scheduler on purpose (it reconnects with a client of its own): that client's
    own reconnection, cut short or given up."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, asyncio.CancelledError):
            return False
        return not str(record.msg).startswith("Failed to reconnect to scheduler")


_ABANDONED_FILTER = _AbandonedClientFilter()


def _quiet_abandoned_clients() -> None:
    logger = logging.getLogger("distributed.client")
    if _ABANDONED_FILTER not in logger.filters:
        logger.addFilter(_ABANDONED_FILTER)


class SchedulerLost(ConnectionError):
    def __init__(self, address: str):
        super().__init__(f"lost the Dask scheduler at {address}")


def _hex(content_hash: str) -> str:
    return content_hash.rpartition(":")[2]


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
