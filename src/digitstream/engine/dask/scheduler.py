"""The engine's link to the Dask scheduler: the workers it reports, its loss, its return.

::

    connected --(the client stops running, or cancels a batch's future, or the
                 scheduler is silent for PROBE_TIMEOUT about a late batch)--> lost
    lost, local cluster (--workers): so until the engine closes
    lost, a scheduler of your own: its address tried in the background
        --(a scheduler with a worker answers there and takes the model)--> connected

While lost, the engine computes every batch in this process. The link keeps
the in-flight limit (:class:`~digitstream.engine.dask.slots._Slots`) at
``in_flight`` per worker while connected, and at no less than ``in_flight``
while lost. While connected it also keeps the *suspects*: workers that held a
batch past its deadline, to which no new batch goes until they answer it or
leave.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from digitstream.engine.dask.logs import _reason, log
from digitstream.engine.dask.slots import _Slots
from digitstream.engine.dask.worker import worker_label

if TYPE_CHECKING:
    from distributed import Client

#: how long ``run`` waits for a scheduler at start before giving up
CONNECT_TIMEOUT = 5.0
#: the watcher's fallback poll of the scheduler's workers; joins and losses arrive sooner as events
WORKER_POLL = 2.0
#: after the scheduler is lost: the first wait before trying it again, doubled after each try
RECONNECT_FIRST = 0.5
#: ... up to this
RECONNECT_MAX = 10.0
#: how long a question to the scheduler about a late batch may take before the scheduler
#: is taken for lost: it answers in milliseconds when it is there
PROBE_TIMEOUT = 2.0


class SchedulerLost(ConnectionError):
    def __init__(self, address: str):
        super().__init__(f"lost the Dask scheduler at {address}")


class SchedulerLink:
    """The client of the scheduler serving now, and what the engine knows through it.

    ``send_model(client)`` registers the model serving now on ``client``'s
    scheduler (a new scheduler knows no plugin); ``held_messages()`` counts the
    messages of the batches in flight, for the log. ``metrics``, if given,
    hears of workers joining and leaving.
    """

    def __init__(
        self,
        slots: _Slots,
        in_flight: int,
        task_prefix: str,
        send_model: Callable[[Client], Awaitable[None]],
        held_messages: Callable[[], int],
        metrics=None,
    ):
        self.client: Client | None = None
        self.address = ""  # the scheduler's
        self.local = False  # a cluster this process started: not tried again once lost
        self.workers: dict[str, str] = {}  # address -> label
        self.lost = False
        self.losses = 0  # scheduler connections lost so far
        self.reconnects = 0  # ... and made again
        #: awaits of results from the cluster, cancelled when the scheduler is lost
        self.waiters: set[asyncio.Future] = set()
        #: workers that held a batch past its deadline: no new batch goes to them until
        #: they answer one, or leave the cluster
        self.suspects: set[str] = set()
        #: TLS settings for connections to the scheduler (Dask's ``Security``), or None
        self.security: Any = None
        #: late batches' awaits, kept after the batch was computed here: the answer
        #: clears its worker of suspicion; the worker leaving drops the task
        self._strays: dict[asyncio.Future, tuple[Any, str]] = {}
        self.metrics = metrics
        self._slots = slots
        self._in_flight = in_flight
        self._task_prefix = task_prefix  # of the keys of this run's tasks
        self._send_model = send_model
        self._held_messages = held_messages
        self._subscribed = False
        self._watcher: asyncio.Task | None = None
        self._refresh_lock = asyncio.Lock()
        self._refreshes: set[asyncio.Task] = set()
        self._reconnector: asyncio.Task | None = None
        self._dropping: set[asyncio.Task] = set()  # clients of lost schedulers, closing

    def connected(self, client: Client, address: str, local: bool, security: Any = None) -> None:
        """``client`` is connected to the scheduler at ``address`` (with ``security``, which
        a reconnection uses too)."""
        self.client, self.address, self.local = client, address, local
        self.security = security

    # ------------------------------------------------------- late batches
    def healthy(self) -> list[str]:
        """The workers new batches may go to: all but the suspects."""
        return [a for a in self.workers if a not in self.suspects]

    def suspect(self, worker: str, future: Any, waiter: asyncio.Future) -> None:
        """``worker`` held ``future``'s batch past its deadline; the batch was answered
        elsewhere, and ``waiter`` (the await of ``future``) is kept to hear it answer."""
        if worker not in self.suspects:
            self.suspects.add(worker)
            log.warning(
                "Dask worker %s held a batch past its deadline: the batch is computed in "
                "this process, and no new batch goes to that worker until it answers",
                self.workers.get(worker, worker),
            )
        self._strays[waiter] = (future, worker)
        waiter.add_done_callback(self._stray_done)

    def _stray_done(self, waiter: asyncio.Future) -> None:
        future, worker = self._strays.pop(waiter, (None, ""))
        if future is None:
            return
        future.release()
        if waiter.cancelled() or waiter.exception() is not None:
            return
        if worker in self.suspects:
            self.suspects.discard(worker)
            log.warning(
                "Dask worker %s answered its late batch: it takes batches again",
                self.workers.get(worker, worker),
            )

    def _late_workers(self) -> set[str]:
        """The suspects, and the workers of late batches still kept."""
        return self.suspects | {w for _, w in self._strays.values()}

    def _forget(self, workers) -> None:
        """``workers`` left: their late batches are dropped, not computed again elsewhere."""
        gone = set(workers)
        self.suspects -= gone
        for waiter, (_, worker) in list(self._strays.items()):
            if worker in gone:
                waiter.cancel()

    async def follow(self) -> None:
        """Learn of workers joining and leaving, and of the scheduler's loss."""
        client = self.client
        assert client is not None
        client.subscribe_topic("all", self._on_event)
        self._subscribed = True
        await self._refresh()
        self._watcher = asyncio.create_task(self._watch(client))

    # ------------------------------------------------------------ workers
    def _on_event(self, event) -> None:
        # called in the client's message loop: anything slow goes to a task of its own
        _, message = event
        action = message.get("action") if isinstance(message, dict) else None
        if action == "remove-worker":
            ours = [
                k
                for k in message.get("processing-tasks", ())
                if str(k).startswith(self._task_prefix)
            ]
            if ours:
                log.warning(
                    "worker %s lost with %d batches in progress: they are computed again "
                    "on the other workers",
                    self.workers.get(message.get("worker"), message.get("worker")),
                    len(ours),
                )
        if action in ("add-worker", "remove-worker"):
            task = asyncio.create_task(self._refresh())
            self._refreshes.add(task)
            task.add_done_callback(self._refreshes.discard)

    async def _watch(self, client: Client) -> None:
        next_refresh = time.monotonic() + WORKER_POLL
        while client is self.client and not self.lost:
            await asyncio.sleep(0.2)
            if client.status != "running":
                self.lose(client)
            elif time.monotonic() >= next_refresh:
                next_refresh = time.monotonic() + WORKER_POLL
                try:
                    await self._refresh()
                except Exception as exc:  # the scheduler may be briefly unreachable
                    log.debug("could not ask the scheduler for its workers: %s", exc)

    async def _refresh(self) -> None:
        """Bring the worker list, the in-flight limit and the metrics up to date."""
        async with self._refresh_lock:
            client = self.client
            if client is None or self.lost:
                return
            info = await client.scheduler.identity(n_workers=-1)
            if client is not self.client or self.lost:
                return  # an answer from a scheduler lost meanwhile
            now = {
                address: worker_label(w.get("name"), address)
                for address, w in info.get("workers", {}).items()
            }
            old = self.workers
            joined = [a for a in now if a not in old]
            gone = [a for a in old if a not in now]
            self.workers = now
            self._forget(a for a in self._late_workers() if a not in now)
            slots = self._slots
            waiting = slots.size == 0 and slots.used
            slots.resize(self._in_flight * len(now))
            metrics = self.metrics
            for address in joined:
                log.info("Dask worker joined: %s", now[address])
                if metrics is not None:
                    metrics.worker_event(now[address], "joined")
            for address in gone:
                log.warning("Dask worker lost: %s", old[address])
                if metrics is not None:
                    metrics.worker_event(old[address], "lost")
            if old and not now:
                log.error(
                    "all Dask workers are gone: %d batches (%d messages) wait on the "
                    "scheduler; no input is read until a worker joins",
                    slots.used,
                    self._held_messages(),
                )
            elif now and waiting:
                log.info("a Dask worker joined: the %d waiting batches go on", slots.used)

    # ------------------------------------------------------ losing it
    def lose(self, client: Client) -> None:
        """``client`` lost the scheduler: every batch out, and every later one until
        it is back, is computed in this process (the scheduler forgot the tasks)."""
        if client is not self.client or self.lost:
            return  # seen already
        self.lost = True
        self.losses += 1
        log.error(
            "Dask scheduler at %s lost, classifying in-process: the %d batches in flight "
            "and all that follow%s",
            self.address,
            self._slots.used,
            " (the local cluster is not restarted)"
            if self.local
            else ", until it is back (trying it again in the background)",
        )
        self._slots.resize(max(self._slots.size, self._in_flight))
        for waiter in list(self.waiters):
            waiter.cancel()
        self._forget(self._late_workers())
        # out of reach now, whatever became of them
        gone, self.workers = self.workers, {}
        if self.metrics is not None:
            for label in gone.values():
                self.metrics.worker_event(label, "lost")
        if self.local:
            return
        # its own reconnection would find a scheduler without the model: a new client will
        self._subscribed = False
        self._drop(client)
        self.client = None
        self._reconnector = asyncio.create_task(self._reconnect())

    def _drop(self, client: Client) -> None:
        """Close ``client`` in the background.

        At once, as Dask's own blocking ``close`` does (``fast``): the plain one lets
        the client's own reconnection go on for seconds, and it may meet the next
        scheduler at this address, with whatever it held back to send.
        """

        async def close() -> None:
            fast_close = getattr(client, "_close", None)
            try:
                await asyncio.wait_for(
                    fast_close(fast=True) if fast_close else client.close(), CONNECT_TIMEOUT
                )
            except Exception as exc:
                log.debug("closing the client of a lost scheduler: %s", _reason(exc))

        task = asyncio.create_task(close())
        self._dropping.add(task)
        task.add_done_callback(self._dropping.discard)

    # ---------------------------------------------------- getting it back
    async def _reconnect(self) -> None:
        """Try the scheduler's address until a scheduler with a worker answers, then
        send it the model and send it the batches again."""
        # optional dependency: distributed (the dask extra)
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
                    client = Client(
                        self.address,
                        asynchronous=True,
                        timeout=CONNECT_TIMEOUT,
                        set_as_default=False,
                        security=self.security,
                    )
                    try:
                        await asyncio.wait_for(client, CONNECT_TIMEOUT + 5)
                    except Exception as exc:
                        log.debug("the Dask scheduler at %s: %s", self.address, _reason(exc))
                        self._drop(client)
                        client = None
                        continue
                    delay = RECONNECT_FIRST
                try:
                    info = await asyncio.wait_for(
                        client.scheduler.identity(n_workers=-1), CONNECT_TIMEOUT
                    )
                except Exception as exc:
                    log.debug("the Dask scheduler at %s: %s", self.address, _reason(exc))
                    continue
                if not info.get("workers"):
                    if not told_no_worker:
                        told_no_worker = True
                        log.info(
                            "a Dask scheduler is back at %s without workers: classifying "
                            "in-process until one joins",
                            self.address,
                        )
                    delay = min(delay, WORKER_POLL)
                    continue
                try:
                    await self._send_model(client)
                except Exception as exc:
                    if client.status != "running":
                        log.debug("the Dask scheduler at %s: %s", self.address, _reason(exc))
                    elif not told_no_model:
                        told_no_model = True
                        log.error(
                            "the Dask workers at %s could not load the model: %s; "
                            "classifying in-process, trying again",
                            self.address,
                            _reason(exc),
                        )
                    continue
                await self._resume(client, len(info["workers"]))
                client = None
                return
        finally:
            if client is not None and client is not self.client:
                self._drop(client)

    async def _resume(self, client: Client, n_workers: int) -> None:
        """From the next batch on, batches go to ``client``'s scheduler."""
        self.client = client
        self.lost = False
        self.reconnects += 1
        client.subscribe_topic("all", self._on_event)
        self._subscribed = True
        self._watcher = asyncio.create_task(self._watch(client))
        # said before anything is awaited: batches go to the cluster from here on
        log.warning(
            "Dask scheduler back at %s, %d worker(s): new batches go to the cluster",
            self.address,
            n_workers,
        )
        try:
            await self._refresh()
        except Exception as exc:  # the watcher tries again
            log.debug("could not ask the scheduler for its workers: %s", exc)

    # ------------------------------------------------------------ closing
    async def stop(self) -> None:
        """Stop watching the scheduler, and trying it again if it is lost."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        self._forget(self._late_workers())
        if self._reconnector is not None:
            self._reconnector.cancel()
            try:
                await self._reconnector
            except BaseException:  # cancelled, as asked
                pass
            self._reconnector = None

    def unsubscribe(self) -> None:
        """Stop hearing the scheduler's events, while the client still runs: else the
        scheduler's farewell event finds this client's comm closed."""
        if self._subscribed and self.client is not None:
            self.client.unsubscribe_topic("all")

    async def close(self) -> None:
        """Close the client, and wait for the clients of lost schedulers to close."""
        if self.client is not None:
            if self.lost:
                # its reconnection attempts, cut short here, would log tracebacks about
                # what the error at the loss already said
                logging.getLogger("distributed.client").setLevel(logging.CRITICAL)
            await self.client.close()
            self.client = None
        if self._dropping:
            await asyncio.wait(list(self._dropping))


async def _accepts(address: str) -> bool:
    """Whether a TCP connect to ``address`` succeeds (TLS runs over TCP; other schemes:
    assumed so)."""
    # optional dependency: distributed (the dask extra)
    from distributed.comm import parse_address
    from distributed.comm.addressing import parse_host_port

    scheme, location = parse_address(address)
    if scheme not in ("tcp", "tls"):
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
