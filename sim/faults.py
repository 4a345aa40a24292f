"""Switchable misbehaviour: what VTEX documents can go wrong (429 with Retry-After, 5xx,
lost answers, duplicates, short batches, pushes given up), and the UNCONFIRMED readings
of the doc that a client must survive either way (EOI011 synchronous or notified, hook
pushes without LastState/CurrentChange)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Faults:
    """Switchable misbehaviour of the VTEX API routes (not of /_sim)."""

    latency_s: tuple[float, float] = (0.0, 0.0)
    rate_429: float = 0.0
    retry_after: str = "seconds"  # seconds | date | none (§1.5: Retry-After, RFC 6585)
    retry_after_s: float = 1.0
    rate_5xx: float = 0.0
    rate_drop: float = 0.0
    rate_eoi000: float = 0.0  # approval PUT answered EOI000 (nothing done)
    duplicate_rate: float = 0.0  # feed: also deliver an in-flight message again (§1.1)
    notification_duplicate_rate: float = 0.0
    short_batches: bool = True  # §1.1: a GET does not necessarily return all messages
    eoi011_sync: bool = False  # §3.4 UNCONFIRMED: EOI011 in the PUT's answer instead of by notification
    notify_delay_s: tuple[float, float] = (0.02, 0.2)
    refuse_commits: int = 0  # the next N feed commits get 503 (and delete nothing)
    hook_duplicate_rate: float = 0.0  # §2.4 UNCONFIRMED: a push is delivered twice
    hook_give_up_rate: float = 0.0  # §2.4: a push is never delivered (VTEX gave up on it)
    hook_without_current_change: bool = False  # §2.3: pushes shaped like the guide's example


class FaultInjector:
    """Applies `Faults` to every `/api/` request before the route sees it."""

    def __init__(self, faults: Faults, rng: random.Random) -> None:
        self.faults = faults
        self._rng = rng
        self.rate_limited = 0

    def _chance(self, rate: float) -> bool:
        return bool(rate) and self._rng.random() < rate

    def too_many_requests(self) -> web.Response:
        f = self.faults
        self.rate_limited += 1
        headers = {}
        if f.retry_after == "seconds":
            headers["Retry-After"] = str(int(f.retry_after_s) if f.retry_after_s >= 1 else f.retry_after_s)
        elif f.retry_after == "date":
            headers["Retry-After"] = format_datetime(
                datetime.now(UTC) + timedelta(seconds=f.retry_after_s), usegmt=True
            )
        return web.json_response({"error": "Too Many Requests"}, status=429, headers=headers)

    async def apply(self, request: web.Request, handler: Handler) -> web.StreamResponse | None:
        """A faulty answer for this request, or None to let it through."""
        f = self.faults
        lo, hi = f.latency_s
        if hi > 0:
            await asyncio.sleep(self._rng.uniform(lo, hi))
        if self._chance(f.rate_429):
            return self.too_many_requests()
        if self._chance(f.rate_drop):
            if request.method == "PUT" and self._rng.random() < 0.5:
                await handler(request)  # processed, but the answer is lost
            if request.transport is not None:
                request.transport.close()
            raise web.HTTPServiceUnavailable()
        if self._chance(f.rate_5xx):
            if request.method == "PUT" and self._rng.random() < 0.5:
                await handler(request)  # enqueued, and still a 503: the outcome is unknown
            return web.json_response({"error": "Service Unavailable"}, status=503)
        return None

    def eoi000(self) -> bool:
        return self._chance(self.faults.rate_eoi000)
