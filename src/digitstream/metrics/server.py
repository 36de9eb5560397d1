"""The metrics UI: plain HTTP served by the application itself (aiohttp).

=================  ==========================================================
``/``              the live dashboard (``static/``: no CDN, works offline)
``/metrics``       Prometheus text format (:mod:`digitstream.metrics.prometheus`)
``/api/stats``     JSON (:func:`digitstream.metrics.stats.stats_document`);
                   ``?window=N``: only the last N seconds of history;
                   ``?since=T``: only the history after Unix time T
``/healthz``       200 while the process serves HTTP
``/readyz``        200 once the model is loaded and the source listens;
                   503 before that and while stopping
=================  ==========================================================

Read-only: every endpoint answers GET (and HEAD); any other method is 405.
It runs on the application's event loop, so a handler must stay short: the
costliest, a snapshot and its JSON, takes about a millisecond.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from aiohttp import web

import digitstream
from digitstream.addresses import Address
from digitstream.errors import UserError
from digitstream.metrics import prometheus
from digitstream.metrics.stats import stats_document

if TYPE_CHECKING:
    from _typeshed import DataclassInstance
    from prometheus_client import CollectorRegistry

log = logging.getLogger("digitstream.metrics")

STATIC_DIR = Path(__file__).with_name("static")
READ_METHODS = frozenset({"GET", "HEAD"})
_SECURITY_HEADERS = {
    # the page loads nothing from elsewhere; saying so makes a stray CDN link fail loudly
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@web.middleware
async def _read_only(request: web.Request, handler):
    if request.method not in READ_METHODS:
        raise web.HTTPMethodNotAllowed(
            request.method, sorted(READ_METHODS), text="read-only: GET only\n"
        )
    response = await handler(request)
    response.headers.update(_SECURITY_HEADERS)
    return response


class MetricsServer:
    """Serves ``metrics`` (a :class:`~digitstream.metrics.recorder.Metrics`) on ``addr``.

    It reads, never changes: ``info()`` gives what the dashboard shows of the
    run (engine, ``cluster``, formats, ``addresses``), ``card()`` the model
    card of the bundle serving now (it follows a swap).
    """

    def __init__(self, metrics, addr: Address, info=dict, card=dict):
        self.metrics = metrics
        self.addr = addr
        self._info_of_run = info
        self._card_of_model = card
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task | None = None
        self._registry: CollectorRegistry | None = None

    @property
    def url(self) -> str:
        return f"http://{Address(self.addr.host, self.port or self.addr.port)}/"

    async def start(self) -> None:
        self._registry = prometheus.make_registry(self.metrics, self._card)  # follows a swap
        web_app = web.Application(middlewares=[_read_only])
        router = web_app.router
        router.add_get("/", self._index)
        router.add_get("/metrics", self._prometheus)
        router.add_get("/api/stats", self._stats)
        router.add_get("/healthz", self._healthz)
        router.add_get("/readyz", self._readyz)
        router.add_static("/static/", STATIC_DIR)
        self._runner = web.AppRunner(web_app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.addr.host, self.addr.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise UserError(f"cannot serve metrics on {self.addr}: {exc.strerror or exc}") from None
        self.port = self._runner.addresses[0][1]
        self.metrics.sample()  # the first interval of the throughput history starts now
        self._ticker = asyncio.create_task(self._tick())

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _tick(self) -> None:
        """Close one second of the throughput history on each wall-clock second."""
        while True:
            await asyncio.sleep(1.0 - time.time() % 1.0)
            try:
                self.metrics.sample()
            except Exception:  # a bug here must not stop the history, or the stream
                log.exception("metrics sample failed")

    def _card(self) -> dict:
        card = self._card_of_model()
        if card is None:
            return {}
        if isinstance(card, dict):
            return card
        # is_dataclass is true of a dataclass class too; asdict refuses that with a TypeError
        return asdict(cast("DataclassInstance", card)) if is_dataclass(card) else dict(vars(card))

    def _info(self) -> dict:
        info = dict(self._info_of_run())
        addresses = dict(info.get("addresses") or {})
        addresses["metrics"] = self.url
        info.update(version=digitstream.__version__, addresses=addresses, model=self._card())
        return info

    # ------------------------------------------------------------- handlers
    async def _index(self, request):
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def _prometheus(self, request):
        body = prometheus.render(self._registry)
        return web.Response(body=body, headers={"Content-Type": prometheus.CONTENT_TYPE_LATEST})

    async def _stats(self, request):
        try:
            window = int(request.query["window"]) if "window" in request.query else None
            since = float(request.query["since"]) if "since" in request.query else None
        except ValueError:
            raise web.HTTPBadRequest(
                text="window must be a whole number of seconds, since a Unix time\n"
            ) from None
        document = stats_document(
            self.metrics.snapshot(),
            self._info(),
            window=None if window is None else max(window, 0),
            since=since,
        )
        return web.Response(
            text=json.dumps(document, separators=(",", ":")),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def _healthz(self, request):
        return web.json_response({"status": "ok"})

    async def _readyz(self, request):
        status = self.metrics.status
        return web.json_response(
            {"ready": status == "ready", "status": status}, status=200 if status == "ready" else 503
        )
