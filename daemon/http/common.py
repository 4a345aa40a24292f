"""What every route shares: the context, reading and validating bodies, credentials, answers.

Handlers only validate and journal; they never wait on VTEX. A bad request gets a 4xx
with the reason and is kept in the journal as `rejected`, for an operator. Credentials
(the hook's secret header, the /v1 bearer token) are checked before a body is read. A
rejected body from a request that proved no credential is kept only as its first 2 KB,
size and sha256, and at most REJECT_BURST of them per client address (then one every
1/REJECT_PER_S seconds); the rest are counted (omsd_rejected_bodies_dropped_total) and
dropped, so nobody fills the disk from outside."""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel, SecretStr, ValidationError

from omsd.state.models import Order
from omsd.state.statuses import STUCK
from omsd.state.store import Store

from ..config.settings import Settings
from ..intake import entries, jsonsafe
from ..intake.wire import validation_reason
from ..ops.health import Health
from ..ops.logs import get_logger
from ..ops.metrics import Metrics
from ..ops.waiting import Watermark
from .guard import RateLimitedLog

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


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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


async def _local() -> None:
    """Local durability: journaled in the database is acknowledged."""


@dataclass
class AttackLogs:
    """The lines any client can cause by sending requests: each at most once a minute, with
    the number of occurrences it stands for (an attacker cannot grow the log)."""

    api_unauthorized: RateLimitedLog = field(
        default_factory=lambda: RateLimitedLog("api_unauthorized", level="warning", logger=log)
    )
    hook_unauthorized: RateLimitedLog = field(
        default_factory=lambda: RateLimitedLog("hook_unauthorized", level="warning", logger=log)
    )
    wrong_path: RateLimitedLog = field(
        default_factory=lambda: RateLimitedLog("notification_wrong_path", level="warning", logger=log)
    )


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
    outcome_mark: Watermark = field(default_factory=Watermark)  # the last outcome seq committed

    attack_logs: AttackLogs = field(default_factory=AttackLogs)
    # Returns once what was journaled before the call is as safe as acknowledging promises: at once
    # (local durability), or once on the replica (`Replica.synced`; ReplicaUnavailable: a 503)
    durable: Callable[[], Awaitable[None]] = _local
    # In a fleet: the operator's token (the main environment's OMSD_API_TOKEN), which opens every
    # account's /v1 routes besides the account's own token (`settings.api_token`, from NAME.env).
    operator_token: SecretStr | None = None


ctx_key = web.AppKey("ctx", ApiContext)


class Resolver(Protocol):
    """In a fleet's app (http/fleet.py): the running account a request is for, or None."""

    def __call__(self, request: web.Request) -> ApiContext | None: ...


resolver_key = web.AppKey("resolver", Resolver)


REQUEST_CTX = web.RequestKey("account_ctx", ApiContext)


AUTHENTICATED = web.RequestKey("authenticated", bool)
"""Set on a request once it proved a credential: its rejected bodies are kept whole (bounded)."""


BODY_BROKEN = web.RequestKey("body_broken", bool)
"""Set when the body did not decompress: the connection cannot carry another request."""


_Model = TypeVar("_Model", bound=BaseModel)


def order_view(order: Order | None) -> dict[str, Any] | None:
    """An order for the connector: `held` is VTEX's hold now, `wasHeld` whether it ever was."""
    if order is None:
        return None
    return {
        "orderId": order.order_id,
        "marketplaceOrderId": order.marketplace_order_id,
        "phase": STUCK if order.stuck is not None else order.phase.value,
        "stuck": order.stuck.model_dump(mode="json") if order.stuck is not None else None,
        "status": order.status,
        "held": order.held_now,
        "wasHeld": order.held,
        "intent": order.intent_source,
        "approvalsSent": order.sent,
        "attempts": order.attempts,
        "lastCode": order.last_code,
        "lastError": order.last_error,
        "nextCheckAt": order.timer.due_at.isoformat() if order.timer else None,
        "updatedAt": order.updated_at.isoformat() if order.updated_at else None,
        "waitingForLink": False,
    }


def parked_view(marketplace_order_id: str, source: str, offset: int) -> dict[str, Any]:
    """An intent parked under a marketplace id no VTEX order is linked to yet: the keys of
    `order_view`, with what is not known yet null."""
    return {
        "orderId": None,
        "marketplaceOrderId": marketplace_order_id,
        "phase": None,
        "stuck": None,
        "status": None,
        "held": False,
        "wasHeld": False,
        "intent": source,
        "intentOffset": offset,
        "approvalsSent": 0,
        "attempts": 0,
        "lastCode": None,
        "lastError": None,
        "nextCheckAt": None,
        "updatedAt": None,
        "waitingForLink": True,
    }


def error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


def ctx_of(request: web.Request) -> ApiContext:
    """The account this request is for: the one account's, or in a fleet the one its path names
    (the fleet's dispatch answered already when there is none)."""
    ctx = context_of(request)
    if ctx is None:
        raise web.HTTPNotFound()
    return ctx


def context_of(request: web.Request) -> ApiContext | None:
    """`ctx_of`, or None for a fleet's request that names no running account."""
    found: ApiContext | None = request.get(REQUEST_CTX)
    if found is not None:
        return found
    single = request.app.get(ctx_key)
    if single is not None:
        return single
    resolve = request.app.get(resolver_key)
    ctx: ApiContext | None = resolve(request) if resolve is not None else None
    if ctx is not None:
        request[REQUEST_CTX] = ctx
    return ctx


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        resp = await handler(request)
        if request.get(BODY_BROKEN):
            resp.force_close()
        return resp
    except web.HTTPException:
        raise
    except Exception:
        log.exception("http_handler_failed", path=request.path, method=request.method)
        return error(500, "internal error; see omsd's log")


async def keep_rejected(request: web.Request, source: str, raw: Any, reason: str) -> None:
    """Journal a rejected (parsed) body, or the raw bytes of one that did not parse."""
    ctx = ctx_of(request)
    authenticated = bool(request.get(AUTHENTICATED))
    if not authenticated and not ctx.reject_budget.take(request.remote or "-"):
        ctx.metrics.rejected_dropped.labels(source=source).inc()
        log.warning("request_rejected", source=source, reason=reason, kept=False)
        return
    now = datetime.now(UTC)
    limit = entries.REJECTED_BODY_MAX if authenticated else UNAUTHENTICATED_KEEP
    if isinstance(raw, bytes):
        entry = entries.rejected_body(source, raw, reason, now, limit=limit)
    else:
        entry = entries.rejected(source, raw, reason, now, limit=limit)
    await ctx.store.journal.append([entry], now=now)
    ctx.metrics.rejected.labels(source=source).inc()
    if not authenticated:
        ctx.metrics.rejected_truncated.labels(source=source).inc()
    log.warning("request_rejected", source=source, reason=entry.reason, kept=True)


class Unreadable(Exception):
    def __init__(self, status: int, answer: str, reason: str, kept: dict[str, Any]) -> None:
        super().__init__(answer)
        self.status, self.answer, self.reason, self.kept = status, answer, reason, kept

    def response(self) -> web.Response:
        return error(self.status, self.answer)


async def read_bytes(request: web.Request) -> bytes:
    """The raw body, or Unreadable: larger than MAX_BODY, or not decodable as its Content-Encoding."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise Unreadable(
            413, f"body larger than {MAX_BODY} bytes", "body too large", {"size": request.content_length}
        ) from None
    except (HttpProcessingError, web.RequestPayloadError):
        request.content.feed_eof()  # else aiohttp raises it again, with a traceback, discarding the rest
        request[BODY_BROKEN] = True
        encoding = request.headers.get("Content-Encoding", "")[:20]
        reason = f"body cannot be decoded as its Content-Encoding {encoding!r}"
        raise Unreadable(400, reason, reason, {"encoding": encoding}) from None


async def read_json(request: web.Request, source: str, *, keep: bool = True) -> tuple[Any, web.Response | None]:
    """The body as JSON (see jsonsafe.parse_json), or the error answer. With keep=False
    the caller decides whether the bad body is worth keeping."""
    value, _, bad = await read_json_text(request, source, keep=keep)
    return value, bad


async def read_json_text(
    request: web.Request, source: str, *, keep: bool = True
) -> tuple[Any, str, web.Response | None]:
    """`read_json`, and the body's text as received (UTF-8, as parse_json requires)."""
    try:
        data = await read_bytes(request)
    except Unreadable as exc:
        if keep:
            await keep_rejected(request, source, exc.kept, exc.reason)
        return None, "", exc.response()
    try:
        return jsonsafe.parse_json(data), data.decode("utf-8"), None
    except jsonsafe.BadJson as exc:
        if keep:
            await keep_rejected(request, source, data, str(exc))
        return None, "", error(400, str(exc))


async def validated(request: web.Request, model: type[_Model], raw: Any, source: str) -> _Model | web.Response:
    """The body as `model`, or a 400 naming the first problem (the body kept as rejected)."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        reason = validation_reason(exc)
        await keep_rejected(request, source, raw, reason)
        return error(400, reason)


def authorized(request: web.Request, *, write: bool) -> web.Response | None:
    """None when the request may go on, else the 401/403 answer."""
    ctx = ctx_of(request)
    tokens = [t for t in (ctx.settings.api_token, ctx.operator_token) if t is not None]
    if not tokens:
        if write:
            return error(403, "OMSD_API_TOKEN is not set: /v1 writes are refused")
        return None
    if not bearer_matches(request, tokens):
        ctx.attack_logs.api_unauthorized.hit(path=request.path[:64], remote=request.remote)
        return error(401, "missing or wrong bearer token")
    request[AUTHENTICATED] = True
    return None


def bearer_matches(request: web.Request, tokens: list[SecretStr]) -> bool:
    """The request's bearer token is one of `tokens`; every one is compared, in constant time."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    presented = given.strip().encode()
    matches = [hmac.compare_digest(presented, token.get_secret_value().encode()) for token in tokens]
    return scheme.lower() == "bearer" and any(matches)
