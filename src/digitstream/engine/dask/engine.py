"""The engine in the run process: the cluster's start and end, batches out, models in."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from digitstream.batch import Batch, BatchResult
from digitstream.engine.base import EngineOptions
from digitstream.engine.dask.logs import _quiet_abandoned_clients, _reason, log
from digitstream.engine.dask.packing import pack
from digitstream.engine.dask.scheduler import (
    CONNECT_TIMEOUT,
    PROBE_TIMEOUT,
    SchedulerLink,
    SchedulerLost,
)
from digitstream.engine.dask.slots import _Slots
from digitstream.engine.dask.worker import FlowSpec, ModelPlugin, _hex, classify
from digitstream.errors import BundleError, UserError
from digitstream.pipeline import Flow

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from distributed import Client

#: a task that raised is run again this many times before the batch is computed locally
TASK_RETRIES = 2
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
    # The nanny's environment for its workers: one BLAS thread each, and without Dask's
    # MALLOC_TRIM_THRESHOLD_, which, set at all, turns off glibc's adaptive mmap threshold:
    # every array of a batch is then mapped and unmapped afresh (the seed's model took
    # 1.3 ms for 8,192 messages on such a worker, against 0.5 ms).
    "distributed.nanny.pre-spawn-environ": {
        "OMP_NUM_THREADS": 1,
        "MKL_NUM_THREADS": 1,
        "OPENBLAS_NUM_THREADS": 1,
    },
}
#: the module the local cluster's workers preload: it defines ``dask_setup``
WORKER_PRELOAD = "digitstream.engine.dask.worker"
#: a batch's deadline is at least this many times the recent round trip of a batch, so
#: that a cluster slow for every batch (a heavy model, a long queue) raises no false alarm
DEADLINE_ROUND_TRIPS = 4


def scheduler_address(text: str, tls: bool = False) -> str:
    """``HOST:PORT`` or ``SCHEME://HOST:PORT`` as Dask's address (``tcp://`` by default,
    ``tls://`` when ``tls``)."""
    return text if "://" in text else f"{'tls' if tls else 'tcp'}://{text}"


def _security(options: EngineOptions) -> Any:
    """Dask's ``Security`` for the scheduler: the files given, else Dask's configuration
    (``distributed.comm.tls.*``); UserError for a file that is not there, or for a
    ``tls://`` address with no certificate from either."""
    # optional dependency: distributed (the dask extra)
    import dask
    from distributed.security import Security

    given = {
        "tls_ca_file": options.tls_ca_file,
        "tls_client_cert": options.tls_cert,
        "tls_client_key": options.tls_key,
    }
    files = {k: v for k, v in given.items() if v}
    for path in files.values():
        if not Path(path).is_file():
            raise UserError(f"TLS file {path} not found")
    if files:
        return Security(require_encryption=True, **files)
    address = options.scheduler or ""
    if address.startswith("tls://") and not dask.config.get("distributed.comm.tls.ca-file"):
        raise UserError(
            f"{address} needs a certificate: --tls-ca-file, --tls-cert and --tls-key (or "
            "Dask's distributed.comm.tls configuration)"
        )
    return Security()


class DaskEngine:
    """Runs the flow's batches on a Dask cluster; see the package docstring.

    ``options`` says where the cluster is: ``scheduler`` (a running cluster)
    or ``workers`` (a local cluster of that many worker processes); how much
    it may hold: ``in_flight`` (batches per worker); and, in ``flow``, the
    formats and ``compile_model`` the workers build their flows with.
    ``metrics``, if given, hears of workers joining and leaving
    (``worker_event``).
    """

    name = "dask"

    def __init__(self, flow: Flow, bundle, options: EngineOptions, metrics=None):
        self.flow = flow
        self.bundle = bundle
        self.options = options
        self.metrics = metrics
        self.in_flight = options.in_flight
        #: the LocalCluster of ``--workers``, once started; Dask types it for blocking use
        self.cluster: Any = None
        self.local_fallbacks = 0  # batches the cluster could not compute, computed here
        self._quiet_until = 0.0
        self._run_id = uuid.uuid4().hex[:12]
        self._slots = _Slots()
        self._held_messages = 0  # messages of the batches in flight
        self._attempts = 0
        self._round_trip = 0.0  # seconds, a moving average over batches answered in time
        self.link = SchedulerLink(
            self._slots,
            self.in_flight,
            f"digitstream-{self._run_id}-",
            self._send_model,
            lambda: self._held_messages,
            metrics,
        )
        self._plugin_name = f"digitstream-model-{_hex(bundle.content_hash)[:12]}-{self._run_id}"
        self._plugin_hash = bundle.content_hash  # the model of the plugin named above
        #: registered by this run: the model's, and retiring ones
        self._plugins = [self._plugin_name]
        self._swaps = 0
        self._by_spec: Counter = Counter()  # FlowSpec -> batches submitted and not yet answered
        self._drained: dict[FlowSpec, list[asyncio.Future]] = {}
        self._retiring: set[asyncio.Task] = set()
        self._spec = FlowSpec.of(bundle.content_hash, options.flow)

    @property
    def capacity(self) -> int:
        """Batches the cluster takes at once now: ``in_flight`` per worker."""
        return self._slots.size

    @property
    def client(self) -> Client | None:
        """The client of the scheduler serving now; None while it is lost."""
        return self.link.client

    @property
    def address(self) -> str:
        """The scheduler's address."""
        return self.link.address

    @property
    def workers(self) -> dict[str, str]:
        """The cluster's workers now: address -> label."""
        return self.link.workers

    def state(self) -> dict:
        """Where batches go now, for ``/api/stats`` (``cluster``)."""
        link = self.link
        return {
            "scheduler": link.address,
            "local_cluster": self.cluster is not None,
            "connected": not link.lost,
            "workers": len(link.workers),
            "reconnects": link.reconnects,
            "in_process_batches": self.local_fallbacks,
        }

    # ---------------------------------------------------------- lifecycle
    async def start(self) -> None:
        try:
            # optional dependency: without it, the error below
            from distributed import Client
        except ImportError:
            raise UserError(
                "--engine dask needs Dask distributed: pip install 'digitstream[dask]'"
            ) from None
        options = self.options
        if not log.isEnabledFor(logging.DEBUG):
            # Dask logs every connection, plugin and nanny at INFO: the application's own
            # lines would drown (``run -v`` shows them)
            logging.getLogger("distributed").setLevel(logging.WARNING)
        _quiet_abandoned_clients()
        if options.scheduler:
            security = _security(options)
            address = scheduler_address(options.scheduler, tls=security.require_encryption)
            try:
                client = await asyncio.wait_for(
                    Client(
                        address,
                        asynchronous=True,
                        timeout=CONNECT_TIMEOUT,
                        set_as_default=False,
                        security=security,
                    ),
                    CONNECT_TIMEOUT + 5,
                )
            except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
                raise UserError(
                    f"cannot reach the Dask scheduler at {address} within "
                    f"{CONNECT_TIMEOUT:.0f} s: {_reason(exc)}"
                ) from None
            self.link.connected(client, address, local=False, security=security)
            where = f"the Dask scheduler at {address}"
        else:
            # optional dependency: distributed (the dask extra)
            import dask
            from distributed import LocalCluster

            dask.config.set(LOCAL_CLUSTER_CONFIG)  # this process runs the scheduler too
            n = options.workers or 1
            # no dashboard; the scheduler's small HTTP server (health, metrics) on any free
            # loopback port rather than on 8787, which another cluster may hold
            self.cluster = await LocalCluster(
                host="127.0.0.1",
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                asynchronous=True,
                preload=[WORKER_PRELOAD],
                scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
            )
            client = await Client(self.cluster, asynchronous=True, set_as_default=False)
            self.link.connected(client, self.cluster.scheduler_address, local=True)
            where = f"a local Dask cluster at {self.link.address}"
        try:
            await self._register_model(client)
        except BaseException:
            await self.close()
            raise
        await self.link.follow()
        log.info(
            "engine: %s; %d worker(s), up to %d batches in flight per worker",
            where,
            len(self.link.workers),
            self.in_flight,
        )
        if not self.link.workers:
            log.warning("no Dask worker yet: input waits until one joins")

    async def _register_model(self, client: Client) -> None:
        plugin = await _model_plugin(self._plugin_name, self.bundle)
        try:
            await client.register_plugin(plugin, name=self._plugin_name)
        except Exception as exc:
            raise UserError(f"a Dask worker could not load the model: {_reason(exc)}") from None

    async def close(self) -> None:
        link = self.link
        await link.stop()
        for task in list(self._retiring):
            task.cancel()
        if link.client is not None and link.client.status == "running":
            link.unsubscribe()
            if self.cluster is None:
                # a shared cluster: its workers drop the model unless another run uses it
                for name in list(self._plugins):
                    await self._unregister(name)
        await link.close()
        if self.cluster is not None:
            await self.cluster.close()
            self.cluster = None

    # ------------------------------------------------------------ batches
    async def submit(self, batch: Batch) -> asyncio.Future[BatchResult]:
        """Wait until the cluster can take ``batch``, send it; a future of its result."""
        # the model is the one serving when the batch comes, however long it waits for a slot
        spec, flow = self._spec, self.flow
        self._by_spec[spec] += 1
        try:
            await self._slots.acquire()
        except BaseException:
            self._spec_done(spec)
            raise
        return asyncio.create_task(self._compute(batch, spec, flow))

    async def _compute(self, batch: Batch, spec: FlowSpec, flow: Flow) -> BatchResult:
        self._held_messages += len(batch)
        try:
            if self.link.lost:
                self.local_fallbacks += 1
                return flow.process(batch)
            return await self._on_cluster(batch, spec, flow)
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

    async def _on_cluster(self, batch: Batch, spec: FlowSpec, flow: Flow) -> BatchResult:
        link = self.link
        client, losses = link.client, link.losses
        assert client is not None  # connected, or the batch is computed here
        where = {}
        if link.suspects:
            healthy = link.healthy()
            if not healthy:
                # every worker is late: here, until one answers
                self.local_fallbacks += 1
                return flow.process(batch)
            where = {"workers": healthy, "allow_other_workers": False}
        self._attempts += 1
        key = f"digitstream-{self._run_id}-{batch.stream}-{batch.first_seq}-{self._attempts}"
        sent = time.monotonic()
        future = client.submit(
            classify,
            spec,
            batch.stream,
            batch.first_seq,
            pack(batch.payloads),
            key=key,
            retries=TASK_RETRIES,
            pure=False,
            **where,
        )
        # awaited through a task of our own, which the link cancels if the scheduler is
        # lost: a Dask future caught in a gather at that moment may never resolve
        waiter = asyncio.ensure_future(_result(client, future))
        link.waiters.add(waiter)
        kept = False  # the await outlives the batch: the link holds it (a suspect's batch)
        try:
            if self.options.batch_deadline > 0:
                for round_ in (1, 2):
                    await asyncio.wait({waiter}, timeout=self._deadline())
                    if waiter.done():
                        break
                    holder = await self._holder(client, future, losses)
                    if holder is None and round_ == 1:
                        continue  # on no worker: queued behind others, given one more deadline
                    if holder is not None:
                        link.suspect(holder, future, waiter)
                        kept = True
                    self.local_fallbacks += 1
                    return flow.process(batch)
            answer = await waiter
            self._round_trip += 0.1 * (time.monotonic() - sent - self._round_trip)
            return answer
        except asyncio.CancelledError:
            if link.losses != losses and waiter.cancelled():
                raise SchedulerLost(link.address) from None
            raise
        except Exception as exc:
            if isinstance(exc, OSError):
                # a connection to the scheduler broke: the client may be about to say it
                # lost the scheduler
                deadline = time.monotonic() + 1.0
                while (
                    client.status == "running"
                    and link.losses == losses
                    and time.monotonic() < deadline
                ):
                    await asyncio.sleep(0.05)
            if client.status != "running" or link.losses != losses:
                # the client cancels its futures as it loses the scheduler: that loss,
                # seen here before the watcher sees it
                link.lose(client)
                raise SchedulerLost(link.address) from None
            raise
        finally:
            link.waiters.discard(waiter)
            if not kept:
                waiter.cancel()
                future.release()

    def _deadline(self) -> float:
        """Seconds a batch may take on the cluster before the engine looks for it."""
        return max(self.options.batch_deadline, DEADLINE_ROUND_TRIPS * self._round_trip)

    async def _holder(self, client: Client, future, losses: int) -> str | None:
        """The worker that holds ``future``'s late batch (computing it, or holding its
        result), as the scheduler says; None for none. A scheduler that does not answer
        within PROBE_TIMEOUT is taken for lost: SchedulerLost."""
        link = self.link
        try:
            if future.status == "finished":
                found = await asyncio.wait_for(
                    client.scheduler.who_has(keys=[future.key]), PROBE_TIMEOUT
                )
                holders = list(found.get(future.key) or ())
            else:
                found = await asyncio.wait_for(
                    client.scheduler.processing(workers=None), PROBE_TIMEOUT
                )
                holders = [w for w, keys in found.items() if future.key in keys]
        except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
            if link.losses == losses and client is link.client:
                log.warning(
                    "a batch is late and the Dask scheduler at %s does not answer (%s)",
                    link.address,
                    _reason(exc) if str(exc) else f"nothing in {PROBE_TIMEOUT:.0f} s",
                )
                link.lose(client)
            raise SchedulerLost(link.address) from None
        return holders[0] if holders else None

    def _fell_back(self, batch: Batch, exc: Exception) -> None:
        self.local_fallbacks += 1
        now = time.monotonic()
        if now >= self._quiet_until:  # one line every few seconds, not one per batch
            self._quiet_until = now + 5.0
            log.warning(
                "%d batches so far computed in this process because the cluster could "
                "not; the latest (stream %s, from message %d): %s",
                self.local_fallbacks,
                batch.stream,
                batch.first_seq,
                _reason(exc),
            )

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
        link = self.link
        name = None
        while not link.lost:
            client = link.client
            assert client is not None
            name = self._new_plugin_name(bundle)
            plugin = await _model_plugin(name, bundle)
            self._plugins.append(name)
            try:
                await client.register_plugin(plugin, name=name)
            except Exception as exc:
                if client is link.client and not link.lost:
                    await self._unregister(name)
                    raise BundleError(f"a Dask worker could not load it: {_reason(exc)}") from None
            if client is link.client and not link.lost:
                break
            # that scheduler was lost meanwhile: the one there is now, if any, gets it
            if name in self._plugins:
                self._plugins.remove(name)
            name = None
        old_spec, old_plugin = self._spec, self._plugin_name
        self.flow, self.bundle = flow, bundle
        self._spec = old_spec.serving(bundle.content_hash)
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

    async def _unregister(self, name: str, client: Client | None = None) -> None:
        client = client or self.link.client
        try:
            if client is None:
                raise SchedulerLost(self.link.address)
            await asyncio.wait_for(client.unregister_worker_plugin(name), 5)
        except Exception as exc:  # the scheduler may be gone already
            log.debug("could not unregister the model plugin %s: %s", name, exc)
        if name in self._plugins:
            self._plugins.remove(name)

    async def _send_model(self, client: Client) -> None:
        """Register the model serving now on ``client``'s scheduler: its workers load it."""
        while True:
            bundle = self.bundle
            name = (
                self._plugin_name
                if bundle.content_hash == self._plugin_hash
                else self._new_plugin_name(bundle)
            )
            await client.register_plugin(await _model_plugin(name, bundle), name=name)
            if bundle is self.bundle:
                # what the lost scheduler held is gone with it
                self._plugin_name, self._plugin_hash, self._plugins = (
                    name,
                    bundle.content_hash,
                    [name],
                )
                return
            # swapped meanwhile: the model serving now goes instead
            await self._unregister(name, client)


async def _result(client: Client, future) -> BatchResult:
    """``future``'s result, gathered for its key alone.

    The client's own gather (``future.result()``) joins the keys asked for while
    one is pending into one request: a worker out of reach would hold the
    results of every other worker asked for with its own.
    """
    await cast("Awaitable[Any]", future.exception())  # waits for the task, gathers nothing
    if future.status == "finished":
        response = await client.scheduler.gather(keys=[future.key])
        if response["status"] == "OK":
            return response["data"][future.key]
    # an error raised, a cancellation, a result lost with its worker: as Dask says it
    return await cast("Awaitable[BatchResult]", future.result())


def _bundle_files(path: Path) -> tuple[dict[str, bytes], str]:
    """The files to ship for a bundle at ``path`` and the one to load ("" for the directory)."""
    if path.is_dir():
        files = {
            p.name: p.read_bytes()
            for p in sorted(path.iterdir())
            if p.is_file() and not p.name.startswith(".")
        }
        entry = ""
    else:
        files, entry = {path.name: path.read_bytes()}, path.name
    size = sum(map(len, files.values()))
    if size > MAX_BUNDLE_BYTES:
        raise UserError(
            f"the model bundle at {path} is {size / 2**20:.0f} MiB: too big to "
            f"send to the Dask workers"
        )
    return files, entry


async def _model_plugin(name: str, bundle) -> ModelPlugin:
    """The worker plugin ``name`` that loads ``bundle`` on every worker (its files read
    off the event loop); UserError if the bundle is too big to send."""
    files, entry = await asyncio.to_thread(_bundle_files, Path(bundle.path))
    return ModelPlugin(name, bundle.content_hash, files, entry)
