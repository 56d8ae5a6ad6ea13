"""The operator's HTTP endpoint: GET /healthz for monitors and GET /metrics for Prometheus.

It binds to loopback by default ([ops] http_host): nothing here is for chat users, and /healthz names backends and
errors. Like the chat front-ends it only translates: the engine decides what is healthy and what the metrics are.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from engine.service import Engine

log = logging.getLogger(__name__)


class OpsServer:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.app = web.Application()
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/metrics", self._metrics)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> int:
        """Serve on host:port (port 0: any free port) and return the port bound."""
        # No access log: a scrape every few seconds would bury the job lines.
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        health = await self._engine.health()
        body: dict[str, Any] = {
            "status": "ok" if health.ok else "unhealthy",
            "problems": health.problems,
            "database": {"ok": health.database_error is None, "error": health.database_error},
            "backends": {
                status.kind.value: {
                    "available": status.available,
                    "healthy": status.healthy,
                    "paused": status.paused,
                    "in_flight": status.in_flight,
                    "capacity": status.capacity,
                    "detail": status.detail,
                }
                for status in health.backends
            },
            "workers": {
                "slots": health.worker_slots,
                "up": [
                    {
                        "slot": w.slot,
                        "pid": w.pid,
                        "device": w.device,
                        "jobs": w.jobs,
                        "busy": w.busy,
                        "rss_mb": w.rss_mb,
                    }
                    for w in health.workers
                ],
            },
        }
        return web.json_response(body, status=200 if health.ok else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await self._engine.metrics()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
