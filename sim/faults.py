"""Switchable misbehaviour: what VTEX documents can go wrong (429 with Retry-After, 5xx,
lost answers, duplicates, short batches, pushes given up), and the UNCONFIRMED readings
of the doc that a client must survive either way (EOI011 synchronous or notified, hook
pushes without LastState/CurrentChange).

An account-wide limit (`account_limit_per_s`): VTEX's rate limits are "per IP, account,
route" and undisclosed (doc §1.5, §5: Get order's is 6,000 a minute per account, whoever
sends them). The simulator can hold the whole account to a sliding window of one second:
a request that would make the last second hold more than the limit is answered 429 with
`Retry-After` (whole seconds until the window frees a place) and does not count."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
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
    account_limit_per_s: float = 0.0  # requests the whole account admits in any second (0: no limit)


@dataclass
class RetryAfterWindows:
    """The Retry-After windows the simulator announced, and the requests that arrived
    inside one: for the same route (VTEX's documented minimum: limits are "per IP,
    account, route") and for the account as a whole (the feed guide's "stop sending
    requests"). A route is a path template (`/api/orders/feed` for both the feed's GET
    and its commit). A request arriving within `in_flight_s` of the 429's departure may
    have left the client before the client read it: not counted."""

    in_flight_s: float = 0.05
    announced: list[tuple[str, float, float]] = field(default_factory=list)  # (route, 429 sent, window end)
    inside_route: int = 0
    inside_account: int = 0

    def announce(self, route: str, seconds: float, now: float) -> None:
        self.announced.append((route, now, now + seconds))

    def arrived(self, route: str, now: float) -> None:
        """Count a request arriving now against the windows still open."""
        self.announced = [w for w in self.announced if w[2] > now]
        inside = [r for r, sent, _ in self.announced if sent + self.in_flight_s < now]
        self.inside_account += bool(inside)
        self.inside_route += route in inside


def route_of(request: web.Request) -> str:
    """The route a request was matched to (its path template), or its path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else request.path


class FaultInjector:
    """Applies `Faults` to every `/api/` request before the route sees it."""

    def __init__(self, faults: Faults, rng: random.Random) -> None:
        self.faults = faults
        self._rng = rng
        self.rate_limited = 0
        self.account_limited = 0  # of `rate_limited`: refused by the account's limit
        self.windows = RetryAfterWindows()
        self.arrivals: list[tuple[float, str]] = []  # (monotonic time, route) of every API request
        self._admitted: deque[float] = deque()  # requests the account's limit let through, last second

    def _chance(self, rate: float) -> bool:
        return bool(rate) and self._rng.random() < rate

    def too_many_requests(self, route: str = "", retry_after_s: float | None = None) -> web.Response:
        f = self.faults
        self.rate_limited += 1
        headers = {}
        wait_s = f.retry_after_s if retry_after_s is None else retry_after_s
        if f.retry_after == "seconds":
            seconds = int(wait_s) if wait_s >= 1 else wait_s
            headers["Retry-After"] = str(seconds)
            self.windows.announce(route, seconds, time.monotonic())
        elif f.retry_after == "date":
            now = datetime.now(UTC)
            until = (now + timedelta(seconds=wait_s)).replace(microsecond=0)  # what the header can say
            headers["Retry-After"] = format_datetime(until, usegmt=True)
            self.windows.announce(route, (until - now).total_seconds(), time.monotonic())
        return web.json_response({"error": "Too Many Requests"}, status=429, headers=headers)

    async def apply(self, request: web.Request, handler: Handler) -> web.StreamResponse | None:
        """A faulty answer for this request, or None to let it through."""
        f = self.faults
        route = route_of(request)
        now = time.monotonic()
        self.windows.arrived(route, now)
        self.arrivals.append((now, route))
        if f.account_limit_per_s > 0 and (wait_s := self._over_account_limit(now)) is not None:
            self.account_limited += 1
            return self.too_many_requests(route, wait_s)
        lo, hi = f.latency_s
        if hi > 0:
            await asyncio.sleep(self._rng.uniform(lo, hi))
        if self._chance(f.rate_429):
            return self.too_many_requests(route)
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

    def _over_account_limit(self, now: float) -> float | None:
        """Seconds until the account's window frees a place (whole, at least 1), when the last
        second already holds its limit; else the request is admitted and counted."""
        admitted = self._admitted
        while admitted and admitted[0] <= now - 1.0:
            admitted.popleft()
        if len(admitted) < self.faults.account_limit_per_s:
            admitted.append(now)
            return None
        return float(max(1, math.ceil(admitted[0] + 1.0 - now)))

    def eoi000(self) -> bool:
        return self._chance(self.faults.rate_eoi000)
