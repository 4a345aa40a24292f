"""VTEX's routes: the order hook (its secret header) and the processing-result notification
(omsd's secret path, the capability URL sent as `connectorEndpoint`)."""

from __future__ import annotations

import hmac
from datetime import UTC, datetime

from aiohttp import web

from omsd.state.codes import APPROVAL_SUCCESS

from ..intake import entries, jsonsafe, wire
from ..ops.logs import get_logger
from .common import (
    AUTHENTICATED,
    PING_MAX,
    Unreadable,
    context_of,
    ctx_of,
    error,
    keep_rejected,
    read_bytes,
    read_json,
    read_json_text,
    validated,
)
from .guard import RateLimitedLog

log = get_logger("omsd.api")

NOTIFICATION_ROUTE = "/order-integration/notification/processing-result"


HOOK_ROUTE = "/vtex/hook"


def _hook_authorized(request: web.Request) -> bool:
    settings = ctx_of(request).settings
    if settings.hook_secret is None:
        return False
    given = request.headers.get(settings.hook_header, "")
    if not hmac.compare_digest(given.encode(), settings.hook_secret.get_secret_value().encode()):
        return False
    request[AUTHENTICATED] = True
    return True


def from_vtex(request: web.Request) -> bool:
    """The request proves VTEX's credential before its body is read: the hook's secret header,
    or the notification route's secret path (for the connection guard's reserved slots)."""
    ctx = context_of(request)
    if request.method != "POST" or ctx is None:
        return False
    settings = ctx.settings
    if settings.hook_secret is not None:
        given = request.headers.get(settings.hook_header, "").encode("utf-8", "replace")
        if hmac.compare_digest(given, settings.hook_secret.get_secret_value().encode()):
            return True
    key = request.match_info.get("key")
    return key is not None and hmac.compare_digest(
        key.encode("utf-8", "replace"), settings.notify_key.get_secret_value().encode()
    )


async def notification(request: web.Request) -> web.Response:
    """VTEX's processing-result notification (Channel Order API), on omsd's secret path.

    VTEX sends no credential; the path segment omsd put in `connectorEndpoint` is the
    capability. A wrong one answers like an unknown route, before the body is read."""
    ctx = ctx_of(request)
    given = request.match_info.get("key", "").encode("utf-8", "replace")
    if not hmac.compare_digest(given, ctx.settings.notify_key.get_secret_value().encode()):
        ctx.attack_logs.wrong_path.hit(remote=request.remote)
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
    ctx = ctx_of(request)
    raw, text, bad = await read_json_text(request, "notification")
    if bad is not None:
        return bad
    reason = _an_problem(request, ctx.settings.account)
    if reason is not None:
        await keep_rejected(request, "notification", raw, reason)
        return error(400, reason)
    env = await validated(request, wire.ResultEnvelope, raw, "notification")
    if isinstance(env, web.Response):
        return env
    now = datetime.now(UTC)
    [appended] = await ctx.store.journal.append(
        [entries.notification_entry(env, now, authenticated=authenticated, body=text)], now=now
    )
    ctx.wake()
    await ctx.durable()
    if authenticated and not appended.duplicate and env.flow == "ApproveOrder" and env.code not in APPROVAL_SUCCESS:
        ctx.metrics.on_approval_refused(env.code)
    log.debug(
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
    ctx = ctx_of(request)
    if not _hook_authorized(request):
        return await _hook_unauthenticated(request)
    raw, bad = await read_json(request, "hook")
    if bad is not None:
        return bad
    if wire.is_ping(raw):
        return web.json_response({"hookConfig": "pong"})
    pushed = entries.hook_item(raw, datetime.now(UTC))
    if pushed.entry is None or pushed.reason is not None:
        reason = pushed.reason or "unreadable push"
        await keep_rejected(request, "hook", raw, reason)
        return error(400, reason)
    if pushed.account != ctx.settings.account:
        reason = f"Origin.Account {str(pushed.account)[:60]!r} is not this account"
        await keep_rejected(request, "hook", raw, reason)
        log.warning("hook_wrong_account", remote=request.remote)
        return error(403, reason)
    [appended] = await ctx.store.journal.append([pushed.entry], now=pushed.entry.received_at)
    await ctx.durable()  # replicated durability: VTEX is told 200 once the push is on the replica
    ctx.health.push_ok()
    if appended.duplicate:
        ctx.metrics.duplicates.labels(source="hook").inc()
    else:
        ctx.metrics.events_in.labels(source="hook").inc()
        ctx.wake()
    return web.json_response({"received": True, "duplicate": appended.duplicate})


async def _hook_unauthenticated(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    return await hook_ping_or_401(request, ctx.attack_logs.hook_unauthorized, ctx.settings.hook_header)


async def hook_ping_or_401(request: web.Request, line: RateLimitedLog, header: str) -> web.Response:
    """Without the secret only VTEX's ping is answered (VTEX may send it before the
    header is configured): a body of at most PING_MAX bytes is read, nothing is kept;
    anything else is a 401 and a (rate-limited) `hook_unauthorized` line. A fleet's hook
    answers an unknown account the same way."""
    length = request.content_length
    if length is not None and length <= PING_MAX:
        try:
            if wire.is_ping(jsonsafe.parse_json(await read_bytes(request))):
                return web.json_response({"hookConfig": "pong"})
        except (jsonsafe.BadJson, Unreadable):
            pass
    line.hit(remote=request.remote, header=header)
    return error(401, f"missing or wrong {header} header")
