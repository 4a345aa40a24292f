"""omsd's own HTTP routes: approval intents, VTEX's result notifications, health.

Handlers only validate and journal; they never wait on VTEX. A bad request gets
a 4xx with the reason and is kept in the journal as `rejected`, for an operator.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from omsd.daemon import intake
from omsd.daemon.health import Health
from omsd.daemon.logs import get_logger, redact
from omsd.daemon.metrics import CONTENT_TYPE_LATEST, Metrics
from omsd.daemon.settings import NOTIFY_PREFIX, Settings
from omsd.state.codes import APPROVAL_SUCCESS
from omsd.state.models import Order
from omsd.state.store import Store

log = get_logger("omsd.api")

MAX_BODY = 64 * 1024
NOTIFICATION_ROUTE = "/order-integration/notification/processing-result"
HOOK_ROUTE = "/vtex/hook"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApprovalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    marketplace_order_id: str = Field(alias="marketplaceOrderId", min_length=1, max_length=200)
    order_id: str | None = Field(default=None, alias="orderId", min_length=1, max_length=200)


class AppliedOffsets(Protocol):
    """What the routes need of the processor (a stub in tests)."""

    async def wait_for(self, offset: int, timeout_s: float) -> bool: ...


@dataclass
class ApiContext:
    settings: Settings
    store: Store
    processor: AppliedOffsets
    wake: Callable[[], None]
    health: Health
    metrics: Metrics


ctx_key = web.AppKey("ctx", ApiContext)
_Model = TypeVar("_Model", bound=BaseModel)


def order_view(order: Order | None) -> dict[str, Any] | None:
    if order is None:
        return None
    return {
        "orderId": order.order_id,
        "marketplaceOrderId": order.marketplace_order_id,
        "phase": order.phase.value,
        "status": order.status,
        "held": order.held,
        "intent": order.intent_source,
        "approvalsSent": order.sent,
        "attempts": order.attempts,
        "lastCode": order.last_code,
        "lastError": order.last_error,
        "nextCheckAt": order.timer.due_at.isoformat() if order.timer else None,
        "updatedAt": order.updated_at.isoformat() if order.updated_at else None,
    }


def _error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


def _validation_reason(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "body"
    return f"{where}: {err.get('msg', 'invalid')}"


def _ctx(request: web.Request) -> ApiContext:
    return request.app[ctx_key]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("http_handler_failed", path=request.path, method=request.method)
        return _error(500, "internal error; see omsd's log")


async def _keep_rejected(ctx: ApiContext, source: str, raw: Any, reason: str) -> None:
    entry = intake.rejected(source, raw, reason, datetime.now(UTC))
    await ctx.store.append([entry], now=entry.received_at)
    ctx.metrics.rejected.labels(source=source).inc()
    log.warning("request_rejected", source=source, reason=reason)


async def _read_json(request: web.Request, source: str, *, keep: bool = True) -> tuple[Any, web.Response | None]:
    """The body as JSON, or the error answer. With keep=False the caller decides
    whether the bad body is worth keeping (an unauthenticated one is not)."""
    ctx = _ctx(request)
    try:
        text = await request.text()
    except web.HTTPRequestEntityTooLarge:
        if keep:
            await _keep_rejected(ctx, source, {"size": request.content_length}, "body too large")
        return None, _error(413, f"body larger than {MAX_BODY} bytes")
    try:
        return json.loads(text), None
    except ValueError:
        if keep:
            await _keep_rejected(ctx, source, text[:2000], "body is not JSON")
        return None, _error(400, "body is not JSON")


async def _validated(ctx: ApiContext, model: type[_Model], raw: Any, source: str) -> _Model | web.Response:
    """The body as `model`, or a 400 naming the first problem (the body kept as rejected)."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        reason = _validation_reason(exc)
        await _keep_rejected(ctx, source, raw, reason)
        return _error(400, reason)


def _authorized(request: web.Request, *, write: bool) -> web.Response | None:
    """None when the request may go on, else the 401/403 answer."""
    token = _ctx(request).settings.api_token
    if token is None:
        if write:
            return _error(403, "OMSD_API_TOKEN is not set: /v1 writes are refused")
        return None
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    expected = token.get_secret_value()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        log.warning("api_unauthorized", path=request.path, remote=request.remote)
        return _error(401, "missing or wrong bearer token")
    return None


def _hook_authorized(request: web.Request) -> bool:
    settings = _ctx(request).settings
    if settings.hook_secret is None:
        return False
    given = request.headers.get(settings.hook_header, "")
    return hmac.compare_digest(given.encode(), settings.hook_secret.get_secret_value().encode())


async def approvals(request: web.Request) -> web.Response:
    """POST /v1/approvals: journal an approval intent, wait briefly for it to be applied."""
    ctx = _ctx(request)
    denied = _authorized(request, write=True)
    if denied is not None:
        return denied
    raw, bad = await _read_json(request, "api")
    if bad is not None:
        return bad
    req = await _validated(ctx, ApprovalRequest, raw, "api")
    if isinstance(req, web.Response):
        return req
    now = datetime.now(UTC)
    [appended] = await ctx.store.append(
        [intake.intent_entry(req.marketplace_order_id, req.order_id, "api", now)], now=now
    )
    ctx.wake()
    offset = appended.offset or 0
    applied = await ctx.processor.wait_for(offset, timeout_s=2.0)
    order = (
        await ctx.store.load_order(req.order_id)
        if req.order_id
        else await ctx.store.order_by_marketplace_id(req.marketplace_order_id)
    )
    parked = order is None and await ctx.store.pending_intent(req.marketplace_order_id) is not None
    log.info("approval_intent", marketplace_order_id=req.marketplace_order_id, order_id=req.order_id, offset=offset)
    return web.json_response(
        {"accepted": True, "offset": offset, "applied": applied, "waitingForLink": parked, "order": order_view(order)},
        status=202,
    )


async def show_order(request: web.Request) -> web.Response:
    """GET /v1/orders/{key}: one order by VTEX or marketplace order id."""
    ctx = _ctx(request)
    denied = _authorized(request, write=False)
    if denied is not None:
        return denied
    order = await ctx.store.find_order(request.match_info["key"])
    if order is None:
        return _error(404, "no such order")
    return web.json_response(order_view(order))


async def notification(request: web.Request) -> web.Response:
    """VTEX's processing-result notification (Channel Order API), on omsd's secret path.

    VTEX sends no credential; the path segment omsd put in `connectorEndpoint` is the
    capability. A wrong one answers like an unknown route, before the body is read."""
    ctx = _ctx(request)
    given = request.match_info.get("key", "").encode("utf-8", "replace")
    if not hmac.compare_digest(given, ctx.settings.notify_key.get_secret_value().encode()):
        log.warning("notification_wrong_path", remote=request.remote)
        raise web.HTTPNotFound()
    return await _notification(request, authenticated=True)


async def notification_unauthenticated(request: web.Request) -> web.Response:
    """The bare route, served only with OMSD_NOTIFY_ALLOW_UNAUTHENTICATED: journaled for the
    record, never acted on (no intent, no order closed)."""
    return await _notification(request, authenticated=False)


def _an_problem(request: web.Request, account: str) -> str | None:
    """`?an=` must be there once and name this account (VTEX always sends it, §3.3)."""
    given = request.query.getall("an", [])
    if not given:
        return "an is required (?an=ACCOUNT)"
    if len(given) > 1:
        return "an must be given once"
    if given[0] != account:
        return f"an={given[0][:60]!r} is not this account"
    return None


async def _notification(request: web.Request, *, authenticated: bool) -> web.Response:
    ctx = _ctx(request)
    raw, bad = await _read_json(request, "notification")
    if bad is not None:
        return bad
    reason = _an_problem(request, ctx.settings.account)
    if reason is not None:
        await _keep_rejected(ctx, "notification", raw, reason)
        return _error(400, reason)
    env = await _validated(ctx, intake.ResultEnvelope, raw, "notification")
    if isinstance(env, web.Response):
        return env
    now = datetime.now(UTC)
    [appended] = await ctx.store.append([intake.notification_entry(env, now, authenticated=authenticated)], now=now)
    ctx.wake()
    if authenticated and not appended.duplicate and env.flow == "ApproveOrder" and env.code not in APPROVAL_SUCCESS:
        ctx.metrics.approvals_refused.labels(code=env.code).inc()
    log.info(
        "notification_received",
        marketplace_order_id=env.marketplace_order_id,
        code=env.code,
        flow=env.flow,
        authenticated=authenticated,
        duplicate=appended.duplicate,
    )
    return web.json_response({"received": True, "duplicate": appended.duplicate})


async def hook(request: web.Request) -> web.Response:
    """VTEX's order hook. Answers within milliseconds: it only journals."""
    ctx = _ctx(request)
    raw, bad = await _read_json(request, "hook", keep=_hook_authorized(request))
    if bad is not None:
        return bad
    if intake.is_ping(raw):
        return web.json_response({"hookConfig": "pong"})
    if not _hook_authorized(request):
        log.warning("hook_unauthorized", remote=request.remote, header=ctx.settings.hook_header)
        return _error(401, f"missing or wrong {ctx.settings.hook_header} header")
    pushed = intake.hook_item(raw, datetime.now(UTC))
    if pushed.entry is None or pushed.reason is not None:
        reason = pushed.reason or "unreadable push"
        await _keep_rejected(ctx, "hook", raw, reason)
        return _error(400, reason)
    if pushed.account != ctx.settings.account:
        reason = f"Origin.Account {str(pushed.account)[:60]!r} is not this account"
        await _keep_rejected(ctx, "hook", raw, reason)
        log.warning("hook_wrong_account", remote=request.remote)
        return _error(403, reason)
    [appended] = await ctx.store.append([pushed.entry], now=pushed.entry.received_at)
    ctx.health.push_ok()
    if appended.duplicate:
        ctx.metrics.duplicates.labels(source="hook").inc()
    else:
        ctx.metrics.events_in.labels(source="hook").inc()
        ctx.wake()
    return web.json_response({"received": True, "duplicate": appended.duplicate})


async def healthz(request: web.Request) -> web.Response:
    """The event loop answers; the daemon's loops are running."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 when nothing is wrong, else 503 with the problems."""
    ctx = _ctx(request)
    problems = ctx.health.problems(await ctx.store.writable())
    if problems:
        return web.json_response({"ready": False, "problems": problems}, status=503)
    return web.json_response({"ready": True})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text, with the gauges that are read from the store refreshed first."""
    ctx = _ctx(request)
    await ctx.metrics.refresh(ctx.store, ctx.settings.db)
    ctx.health.problems(await ctx.store.writable())
    body = ctx.metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def status(request: web.Request) -> web.Response:
    """GET /v1/status: counts by phase and the store's offsets."""
    ctx = _ctx(request)
    denied = _authorized(request, write=False)
    if denied is not None:
        return denied
    return web.json_response({"phases": await ctx.store.phase_counts(), **await ctx.store.stats()})


def build_app(ctx: ApiContext) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY)
    app[ctx_key] = ctx
    app.router.add_post("/v1/approvals", approvals)
    app.router.add_get("/v1/orders/{key}", show_order)
    app.router.add_get("/v1/status", status)
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
