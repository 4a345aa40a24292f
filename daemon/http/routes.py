"""omsd's HTTP routes, by audience: the connector's API, VTEX's hook and notifications, the
operator's health and metrics."""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

from ..config.settings import NOTIFY_PREFIX
from ..ops.logs import redact
from . import events
from .common import (
    MAX_BODY,
    ApiContext,
    ctx_key,
    errors,
)
from .connector import approvals, show_order, status
from .operator import healthz, metrics, readyz
from .vtex import HOOK_ROUTE, NOTIFICATION_ROUTE, hook, notification, notification_unauthenticated


def build_app(ctx: ApiContext) -> web.Application:
    app = web.Application(middlewares=[errors], client_max_size=MAX_BODY)
    app[ctx_key] = ctx
    app.router.add_post("/v1/approvals", approvals)
    app.router.add_get("/v1/orders/{key}", show_order)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/events", events.events)
    app.router.add_get("/v1/events/stream", events.stream)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    # VTEX's routes also under the path of OMSD_CONNECTOR_ENDPOINT / OMSD_HOOK_URL, so a
    # proxy that forwards https://host/api/vtex/... unchanged reaches them. Results come
    # under the secret path omsd sends as connectorEndpoint; the bare route only on request.
    redact(ctx.settings.notify_key.get_secret_value())
    prefix = urlsplit(ctx.settings.connector_endpoint).path.rstrip("/")
    for base in {"", prefix}:
        app.router.add_post(f"{base}{NOTIFY_PREFIX}/{{key}}{NOTIFICATION_ROUTE}", notification)
        if ctx.settings.notify_allow_unauthenticated:
            app.router.add_post(base + NOTIFICATION_ROUTE, notification_unauthenticated)
    for path in {HOOK_ROUTE, urlsplit(ctx.settings.hook_endpoint).path or HOOK_ROUTE}:
        app.router.add_post(path, hook)
    return app
