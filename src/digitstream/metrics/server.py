"""The metrics UI: plain HTTP served by the application itself (aiohttp).

``/`` dashboard, ``/metrics`` Prometheus text, ``/api/stats`` JSON,
``/healthz`` (the process is up) and ``/readyz`` (model loaded, source listening).
Read-only: no endpoint changes anything.
"""

from __future__ import annotations

import logging

from aiohttp import web

from digitstream.addresses import Address
from digitstream.errors import UserError

log = logging.getLogger("digitstream.metrics")


class MetricsServer:
    def __init__(self, app, addr: Address):
        self.app = app
        self.addr = addr
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{Address(self.addr.host, self.port or self.addr.port)}/"

    async def start(self) -> None:
        web_app = web.Application()
        web_app.router.add_get("/healthz", self._healthz)
        web_app.router.add_get("/readyz", self._readyz)
        web_app.router.add_get("/api/stats", self._stats)
        self._runner = web.AppRunner(web_app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.addr.host, self.addr.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise UserError(f"cannot serve metrics on {self.addr}: {exc.strerror or exc}") from None
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, request):
        return web.json_response({"status": "ok"})

    async def _readyz(self, request):
        ready = self.app.ready.is_set() and not self.app._stopping
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def _stats(self, request):
        m = self.app.metrics
        return web.json_response({
            "name": m.name,
            "messages_in": m.messages_in,
            "messages_out": m.messages_out,
            "rejected": dict(m.rejected),
            "connections_open": m.connections_open,
        })
