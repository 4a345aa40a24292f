"""The outcome stream for the connector (`/v1/events`, bearer OMSD_API_TOKEN).

- `GET /v1/events?after=SEQ&limit=N&wait=S&type=T&order=ID` answers `{"events": [...],
  "next": SEQ}`; with `wait` it holds the request until an outcome after SEQ is committed
  (a long poll: the processor's commit wakes it) or S seconds pass. `next` is where to
  resume: past every outcome the server looked at, filtered out or not.
- `GET /v1/events/stream` is the same as Server-Sent Events: `id:` is the seq, `event:`
  the type, resuming from `Last-Event-ID` (or `?after=`), with a comment line as heartbeat.
- An `after` older than what retention kept answers `410 Gone` with the oldest seq still
  there (the Kubernetes watch convention): never a silent jump over lost outcomes. So does
  an `after` past the last seq ever written (a cursor from before a restore to an older
  copy), with `last`: the seqs after it will be given to events the reader has not seen.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp_sse import sse_response

from omsd.state.outcomes import TYPES
from omsd.state.store.outcomes import OutcomeRow

from ..intake import wire
from .common import ApiContext, authorized, ctx_of, error

LIMIT_MAX = 1000
LIMIT_DEFAULT = 100
WAIT_MAX_S = 60.0  # a long poll longer than a minute meets proxies' idle timeouts
STREAM_PAGE = 500
HEARTBEAT_S = 15.0
_SEQ = re.compile(r"[0-9]{1,18}")
_LIMIT = re.compile(r"[0-9]{1,4}")  # ASCII only: str.isdigit() also takes "²", which int() refuses
_KEY = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{wire.ORDER_ID_MAX - 1}}}")


class BadQuery(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Query:
    after: int
    limit: int
    wait_s: float
    types: tuple[str, ...]
    order: str | None


def _query(request: web.Request, *, after: str | None = None) -> Query:
    q = request.query
    for name in q:
        if name not in ("after", "limit", "wait", "type", "order"):
            raise BadQuery(f"unknown parameter {name[:40]!r}")
        if len(q.getall(name)) > 1 and name != "type":
            raise BadQuery(f"{name} must be given once")
    raw_after = after if after is not None else q.get("after", "0")
    if not _SEQ.fullmatch(raw_after):
        raise BadQuery("after must be a sequence number (0 or more)")
    raw_limit = q.get("limit", str(LIMIT_DEFAULT))
    if not _LIMIT.fullmatch(raw_limit) or not 1 <= int(raw_limit) <= LIMIT_MAX:
        raise BadQuery(f"limit must be 1..{LIMIT_MAX}")
    try:
        wait_s = float(q.get("wait", "0"))
    except ValueError:
        raise BadQuery(f"wait must be seconds, 0..{WAIT_MAX_S:g}") from None
    if not 0 <= wait_s <= WAIT_MAX_S:  # also refuses nan and inf
        raise BadQuery(f"wait must be seconds, 0..{WAIT_MAX_S:g}")
    types = tuple(t for value in q.getall("type", []) for t in value.split(",") if t)
    if unknown := [t for t in types if t not in TYPES]:
        raise BadQuery(f"unknown event type {unknown[0][:60]!r} (one of {', '.join(TYPES)})")
    order = q.get("order")
    if order is not None and not _KEY.fullmatch(order):
        raise BadQuery("order is not an order id or a marketplace order id")
    return Query(int(raw_after), int(raw_limit), wait_s, types, order)


async def _gone(ctx: ApiContext, after: int) -> web.Response | None:
    """410 when outcomes after `after` were removed by retention, or when `after` is past the
    last seq ever written here (the reader's cursor is from a database restored since to an
    older copy: the seqs after the last would be given to other events, which it would skip)."""
    oldest, last = await ctx.store.outcomes.bounds()
    if after > last:
        error = (
            f"after={after} is past the end of the stream (the last event is seq {last}; the database was "
            "restored to an older copy?): re-sync from your own records, then resume after last"
        )
        return web.json_response({"error": error, "oldest": oldest + 1, "resume_after": last, "last": last}, status=410)
    if after >= oldest:
        return None
    return web.json_response(
        {
            "error": f"events after {after} are no longer kept (OMSD_RETENTION_DAYS): resume from oldest",
            "oldest": oldest + 1,
            "resume_after": oldest,
            "last": last,
        },
        status=410,
    )


async def events(request: web.Request) -> web.Response:
    """GET /v1/events: the outcomes after a seq, at once or as soon as one is committed."""
    ctx = ctx_of(request)
    denied = authorized(request, write=False)
    if denied is not None:
        return denied
    try:
        q = _query(request)
    except BadQuery as exc:
        return error(400, str(exc))
    if (gone := await _gone(ctx, q.after)) is not None:
        return gone
    loop = asyncio.get_running_loop()
    deadline = loop.time() + q.wait_s
    seen = q.after
    mark = ctx.outcome_mark
    ctx.metrics.event_waiters.inc()
    try:
        while True:
            last = mark.value  # read before the query: whatever it misses is after `last`
            rows = await ctx.store.outcomes.after(seen, q.limit, types=q.types, order=q.order, upto=last)
            if rows or loop.time() >= deadline:
                break
            seen = max(seen, last)
            await mark.wait_above(seen, deadline - loop.time())
    finally:
        ctx.metrics.event_waiters.dec()
    full = len(rows) == q.limit
    resume = rows[-1].seq if full else max(seen, last, rows[-1].seq if rows else 0)
    return web.json_response({"events": [r.view() for r in rows], "next": resume})


async def stream(request: web.Request) -> web.StreamResponse:
    """GET /v1/events/stream: Server-Sent Events from `Last-Event-ID` (or `?after=`) on."""
    ctx = ctx_of(request)
    denied = authorized(request, write=False)
    if denied is not None:
        return denied
    try:
        q = _query(request, after=request.headers.get("Last-Event-ID"))
    except BadQuery as exc:
        return error(400, str(exc))
    if (gone := await _gone(ctx, q.after)) is not None:
        return gone
    seen = q.after
    mark = ctx.outcome_mark
    async with sse_response(request, ping_interval=HEARTBEAT_S) as sse:
        ctx.metrics.event_waiters.inc()
        try:
            while sse.is_connected():
                last = mark.value
                rows = await ctx.store.outcomes.after(seen, STREAM_PAGE, types=q.types, order=q.order, upto=last)
                for row in rows:
                    await sse.send(_data(row), id=str(row.seq), event=row.type)
                seen = rows[-1].seq if rows else max(seen, last)
                if len(rows) < STREAM_PAGE:
                    await mark.wait_above(seen, HEARTBEAT_S)
        except ConnectionError:
            pass  # the client went away
        finally:
            ctx.metrics.event_waiters.dec()
    return sse


def _data(row: OutcomeRow) -> str:
    view: dict[str, Any] = row.view()
    return json.dumps(view, separators=(",", ":"))
