"""omsd's own HTTP routes: approval intents, VTEX's result notifications, health.

Handlers only validate and journal; they never wait on VTEX. A bad request gets
a 4xx with the reason and is kept in the journal as `rejected`, for an operator.
Credentials (the hook's secret header, the /v1 bearer token) are checked before
a body is read. A rejected body from a request that proved no credential is kept
only as its first 2 KB, size and sha256, and at most REJECT_BURST of them per
client address (then one every 1/REJECT_PER_S seconds); the rest are counted
(omsd_rejected_bodies_dropped_total) and dropped, so nobody fills the disk from outside.
"""

from __future__ import annotations

import hmac
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from omsd.state.codes import APPROVAL_SUCCESS
from omsd.state.models import Order
from omsd.state.store import Store

from ..config.settings import NOTIFY_PREFIX, Settings
from ..intake import entries as intake
from ..ops.health import Health
from ..ops.logs import get_logger, redact
from ..ops.metrics import CONTENT_TYPE_LATEST, Metrics

log = get_logger("omsd.api")

MAX_BODY = 64 * 1024
PING_MAX = 256
"""The largest body the hook reads without its secret (VTEX's ping is 22 bytes)."""
UNAUTHENTICATED_KEEP = 2 * 1024
"""How much of a rejected body from an unauthenticated request is kept (plus size and sha256)."""
REJECT_BURST = 20
REJECT_PER_S = 0.2
REJECT_SOURCES = 1024
REJECT_BURST_ALL = 100
REJECT_PER_S_ALL = 1.0
NOTIFICATION_ROUTE = "/order-integration/notification/processing-result"
HOOK_ROUTE = "/vtex/hook"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApprovalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    marketplace_order_id: intake.MarketplaceOrderId = Field(alias="marketplaceOrderId")
    order_id: intake.OrderId | None = Field(default=None, alias="orderId")


class AppliedOffsets(Protocol):
    """What the routes need of the processor (a stub in tests)."""

    async def wait_for(self, offset: int, timeout_s: float) -> bool: ...


class Probe(Protocol):
    """Whether the database takes writes (`ops.probe.StoreProbe`): `ok` is the last answer,
    `fresh()` one at most a second old."""

    ok: bool

    async def fresh(self) -> bool: ...


@dataclass
class RejectBudget:
    """Token buckets, one per client address and one for all, that bound how many rejected
    bodies from unauthenticated requests are written to the journal."""

    burst: float = REJECT_BURST
    per_s: float = REJECT_PER_S
    burst_all: float = REJECT_BURST_ALL
    per_s_all: float = REJECT_PER_S_ALL
    max_sources: int = REJECT_SOURCES
    clock: Callable[[], float] = time.monotonic
    _buckets: OrderedDict[str, tuple[float, float]] = field(default_factory=OrderedDict)
    _all: tuple[float, float] | None = None

    def take(self, source: str) -> bool:
        """True when a body from `source` may be stored now (and count it)."""
        now = self.clock()
        ok, self._buckets[source] = _bucket(self._buckets.pop(source, None), now, self.burst, self.per_s)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)  # the least recently seen
        if not ok:
            return False
        ok, self._all = _bucket(self._all, now, self.burst_all, self.per_s_all)
        return ok


def _bucket(
    state: tuple[float, float] | None, now: float, burst: float, per_s: float
) -> tuple[bool, tuple[float, float]]:
    tokens, at = state or (burst, now)
    tokens = min(burst, tokens + (now - at) * per_s)
    if tokens >= 1:
        return True, (tokens - 1, now)
    return False, (tokens, now)


@dataclass
class ApiContext:
    settings: Settings
    store: Store
    processor: AppliedOffsets
    wake: Callable[[], None]
    health: Health
    metrics: Metrics
    probe: Probe
    reject_budget: RejectBudget = field(default_factory=RejectBudget)


ctx_key = web.AppKey("ctx", ApiContext)
AUTHENTICATED = web.RequestKey("authenticated", bool)
"""Set on a request once it proved a credential: its rejected bodies are kept whole (bounded)."""
BODY_BROKEN = web.RequestKey("body_broken", bool)
"""Set when the body did not decompress: the connection cannot carry another request."""
_Model = TypeVar("_Model", bound=BaseModel)
_ORDER_KEY = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{intake.ORDER_ID_MAX - 1}}}")


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
        resp = await handler(request)
        if request.get(BODY_BROKEN):
            resp.force_close()
        return resp
    except web.HTTPException:
        raise
    except Exception:
        log.exception("http_handler_failed", path=request.path, method=request.method)
        return _error(500, "internal error; see omsd's log")


async def _keep_rejected(request: web.Request, source: str, raw: Any, reason: str) -> None:
    """Journal a rejected (parsed) body, or the raw bytes of one that did not parse."""
    ctx = _ctx(request)
    authenticated = bool(request.get(AUTHENTICATED))
    if not authenticated and not ctx.reject_budget.take(request.remote or "-"):
        ctx.metrics.rejected_dropped.labels(source=source).inc()
        log.warning("request_rejected", source=source, reason=reason, kept=False)
        return
    now = datetime.now(UTC)
    limit = intake.REJECTED_BODY_MAX if authenticated else UNAUTHENTICATED_KEEP
    if isinstance(raw, bytes):
        entry = intake.rejected_body(source, raw, reason, now, limit=limit)
    else:
        entry = intake.rejected(source, raw, reason, now, limit=limit)
    await ctx.store.journal.append([entry], now=now)
    ctx.metrics.rejected.labels(source=source).inc()
    if not authenticated:
        ctx.metrics.rejected_truncated.labels(source=source).inc()
    log.warning("request_rejected", source=source, reason=entry.reason, kept=True)


class _Unreadable(Exception):
    def __init__(self, status: int, answer: str, reason: str, kept: dict[str, Any]) -> None:
        super().__init__(answer)
        self.status, self.answer, self.reason, self.kept = status, answer, reason, kept

    def response(self) -> web.Response:
        return _error(self.status, self.answer)


async def _read_bytes(request: web.Request) -> bytes:
    """The raw body, or _Unreadable: larger than MAX_BODY, or not decodable as its Content-Encoding."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _Unreadable(
            413, f"body larger than {MAX_BODY} bytes", "body too large", {"size": request.content_length}
        ) from None
    except (HttpProcessingError, web.RequestPayloadError):
        request.content.feed_eof()  # else aiohttp raises it again, with a traceback, discarding the rest
        request[BODY_BROKEN] = True
        encoding = request.headers.get("Content-Encoding", "")[:20]
        reason = f"body cannot be decoded as its Content-Encoding {encoding!r}"
        raise _Unreadable(400, reason, reason, {"encoding": encoding}) from None


async def _read_json(request: web.Request, source: str, *, keep: bool = True) -> tuple[Any, web.Response | None]:
    """The body as JSON (see intake.parse_json), or the error answer. With keep=False
    the caller decides whether the bad body is worth keeping."""
    try:
        data = await _read_bytes(request)
    except _Unreadable as exc:
        if keep:
            await _keep_rejected(request, source, exc.kept, exc.reason)
        return None, exc.response()
    try:
        return intake.parse_json(data), None
    except intake.BadJson as exc:
        if keep:
            await _keep_rejected(request, source, data, str(exc))
        return None, _error(400, str(exc))


async def _validated(request: web.Request, model: type[_Model], raw: Any, source: str) -> _Model | web.Response:
    """The body as `model`, or a 400 naming the first problem (the body kept as rejected)."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        reason = _validation_reason(exc)
        await _keep_rejected(request, source, raw, reason)
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
    request[AUTHENTICATED] = True
    return None


def _hook_authorized(request: web.Request) -> bool:
    settings = _ctx(request).settings
    if settings.hook_secret is None:
        return False
    given = request.headers.get(settings.hook_header, "")
    if not hmac.compare_digest(given.encode(), settings.hook_secret.get_secret_value().encode()):
        return False
    request[AUTHENTICATED] = True
    return True


async def approvals(request: web.Request) -> web.Response:
    """POST /v1/approvals: journal an approval intent, wait briefly for it to be applied."""
    ctx = _ctx(request)
    denied = _authorized(request, write=True)
    if denied is not None:
        return denied
    raw, bad = await _read_json(request, "api")
    if bad is not None:
        return bad
    req = await _validated(request, ApprovalRequest, raw, "api")
    if isinstance(req, web.Response):
        return req
    now = datetime.now(UTC)
    [appended] = await ctx.store.journal.append(
        [intake.intent_entry(req.marketplace_order_id, req.order_id, "api", now)], now=now
    )
    ctx.wake()
    offset = appended.offset or 0
    applied = await ctx.processor.wait_for(offset, timeout_s=2.0)
    order = (
        await ctx.store.read.load_order(req.order_id)
        if req.order_id
        else await ctx.store.read.order_by_marketplace_id(req.marketplace_order_id)
    )
    parked = order is None and await ctx.store.read.pending_intent(req.marketplace_order_id) is not None
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
    key = request.match_info["key"]
    if not _ORDER_KEY.fullmatch(key):
        return _error(400, "key is not an order id or a marketplace order id")
    order = await ctx.store.read.find_order(key)
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
    request[AUTHENTICATED] = True  # its rejected bodies are kept whole (bounded)
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
        await _keep_rejected(request, "notification", raw, reason)
        return _error(400, reason)
    env = await _validated(request, intake.ResultEnvelope, raw, "notification")
    if isinstance(env, web.Response):
        return env
    now = datetime.now(UTC)
    [appended] = await ctx.store.journal.append(
        [intake.notification_entry(env, now, authenticated=authenticated)], now=now
    )
    ctx.wake()
    if authenticated and not appended.duplicate and env.flow == "ApproveOrder" and env.code not in APPROVAL_SUCCESS:
        ctx.metrics.on_approval_refused(env.code)
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
    if not _hook_authorized(request):
        return await _hook_unauthenticated(request)
    raw, bad = await _read_json(request, "hook")
    if bad is not None:
        return bad
    if intake.is_ping(raw):
        return web.json_response({"hookConfig": "pong"})
    pushed = intake.hook_item(raw, datetime.now(UTC))
    if pushed.entry is None or pushed.reason is not None:
        reason = pushed.reason or "unreadable push"
        await _keep_rejected(request, "hook", raw, reason)
        return _error(400, reason)
    if pushed.account != ctx.settings.account:
        reason = f"Origin.Account {str(pushed.account)[:60]!r} is not this account"
        await _keep_rejected(request, "hook", raw, reason)
        log.warning("hook_wrong_account", remote=request.remote)
        return _error(403, reason)
    [appended] = await ctx.store.journal.append([pushed.entry], now=pushed.entry.received_at)
    ctx.health.push_ok()
    if appended.duplicate:
        ctx.metrics.duplicates.labels(source="hook").inc()
    else:
        ctx.metrics.events_in.labels(source="hook").inc()
        ctx.wake()
    return web.json_response({"received": True, "duplicate": appended.duplicate})


async def _hook_unauthenticated(request: web.Request) -> web.Response:
    """Without the secret only VTEX's ping is answered (VTEX may send it before the
    header is configured): a body of at most PING_MAX bytes is read, nothing is kept."""
    ctx = _ctx(request)
    length = request.content_length
    if length is not None and length <= PING_MAX:
        try:
            if intake.is_ping(intake.parse_json(await _read_bytes(request))):
                return web.json_response({"hookConfig": "pong"})
        except (intake.BadJson, _Unreadable):
            pass
    log.warning("hook_unauthorized", remote=request.remote, header=ctx.settings.hook_header)
    return _error(401, f"missing or wrong {ctx.settings.hook_header} header")


async def healthz(request: web.Request) -> web.Response:
    """The event loop answers; the daemon's loops are running."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 when nothing is wrong, else 503 with the problems. Writes at most one probe a
    second, whoever asks and however often."""
    ctx = _ctx(request)
    problems = ctx.health.problems(await ctx.probe.fresh())
    ctx.metrics.ready.set(0 if problems else 1)
    if problems:
        return web.json_response({"ready": False, "problems": problems}, status=503)
    return web.json_response({"ready": True})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text, with the gauges that are read from the store refreshed first. Reads only."""
    ctx = _ctx(request)
    await ctx.metrics.refresh(ctx.store, ctx.settings.db)
    ctx.metrics.ready.set(0 if ctx.health.problems(ctx.probe.ok) else 1)
    body = ctx.metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def status(request: web.Request) -> web.Response:
    """GET /v1/status: counts by phase and the store's offsets."""
    ctx = _ctx(request)
    denied = _authorized(request, write=False)
    if denied is not None:
        return denied
    return web.json_response({"phases": await ctx.store.read.phase_counts(), **await ctx.store.read.stats()})


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
