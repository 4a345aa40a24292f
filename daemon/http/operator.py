"""The operator's routes: liveness, readiness, Prometheus metrics. None of them writes
(readiness asks the store probe, which writes at most once a second)."""

from __future__ import annotations

from aiohttp import web

from ..ops.metrics import CONTENT_TYPE_LATEST
from .common import (
    ctx_of,
)


async def healthz(request: web.Request) -> web.Response:
    """The event loop answers; the daemon's loops are running."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 when nothing is wrong, else 503 with the problems. Writes at most one probe a
    second, whoever asks and however often."""
    ctx = ctx_of(request)
    problems = ctx.health.problems(await ctx.probe.fresh())
    ctx.metrics.ready.set(0 if problems else 1)
    if problems:
        return web.json_response({"ready": False, "problems": problems}, status=503)
    return web.json_response({"ready": True})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text, with the gauges that are read from the store refreshed first. Reads only."""
    ctx = ctx_of(request)
    await ctx.metrics.refresh(ctx.store, ctx.settings.db)
    ctx.metrics.ready.set(0 if ctx.health.problems(ctx.probe.ok) else 1)
    body = ctx.metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
