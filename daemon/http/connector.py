"""The connector's API (`/v1`, bearer OMSD_API_TOKEN): hand omsd an approval, look at an order."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from aiohttp import web

from ..intake import intents, wire
from ..ops.logs import get_logger
from .common import (
    authorized,
    ctx_of,
    error,
    keep_rejected,
    order_view,
    parked_view,
    read_json,
    validated,
)

log = get_logger("omsd.api")


ApprovalRequest = wire.ApprovalRequest  # the body; `omsd approve` validates its arguments the same way


_ORDER_KEY = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{wire.ORDER_ID_MAX - 1}}}")


async def approvals(request: web.Request) -> web.Response:
    """POST /v1/approvals: journal an approval intent, wait briefly for it to be applied."""
    ctx = ctx_of(request)
    denied = authorized(request, write=True)
    if denied is not None:
        return denied
    raw, bad = await read_json(request, "api")
    if bad is not None:
        return bad
    req = await validated(request, ApprovalRequest, raw, "api")
    if isinstance(req, web.Response):
        return req
    try:
        await intents.check(ctx.store, req)
    except intents.IntentRefused as exc:  # the order is known under another marketplace id
        await keep_rejected(request, "api", raw, exc.reason)
        return error(exc.status, exc.reason)
    appended = await intents.record(ctx.store, req, "api", datetime.now(UTC))
    ctx.wake()
    await ctx.durable()  # replicated durability: 202 only once the intent is on the replica
    offset = appended.offset or 0
    applied = await ctx.processor.wait_for(offset, timeout_s=2.0)
    order = (
        await ctx.store.read.load_order(req.order_id)
        if req.order_id
        else await ctx.store.read.order_by_marketplace_id(req.marketplace_order_id)
    )
    parked = order is None and await ctx.store.read.pending_intent(req.marketplace_order_id) is not None
    log.debug("approval_intent", marketplace_order_id=req.marketplace_order_id, order_id=req.order_id, offset=offset)
    return web.json_response(
        {"accepted": True, "offset": offset, "applied": applied, "waitingForLink": parked, "order": order_view(order)},
        status=202,
    )


async def show_order(request: web.Request) -> web.Response:
    """GET /v1/orders/{key}: one order by VTEX or marketplace order id, or the intent parked
    under a marketplace id (`waitingForLink: true`)."""
    ctx = ctx_of(request)
    denied = authorized(request, write=False)
    if denied is not None:
        return denied
    key = request.match_info["key"]
    if not _ORDER_KEY.fullmatch(key):
        return error(400, "key is not an order id or a marketplace order id")
    order = await ctx.store.read.find_order(key)
    if order is not None:
        return web.json_response(order_view(order))
    parked = await ctx.store.read.pending_intent(key)
    if parked is not None:  # an intent waits for its order: known, not yet linked
        return web.json_response(parked_view(key, *parked))
    return error(404, "no such order")


async def status(request: web.Request) -> web.Response:
    """GET /v1/status: counts by phase and the store's offsets."""
    ctx = ctx_of(request)
    denied = authorized(request, write=False)
    if denied is not None:
        return denied
    return web.json_response({"phases": await ctx.store.read.phase_counts(), **await ctx.store.read.stats()})
