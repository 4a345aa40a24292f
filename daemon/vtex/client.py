"""The VTEX client: one aiohttp session, one shared throttle, typed answers and errors.

Every call carries the AppKey/AppToken pair, `Accept` and `Content-Type`
(VTEX's OpenAPI files declare all four required on every operation). A 429
pauses the calls in its scope until its `Retry-After` (seconds or HTTP date; 60 s
when absent, as VTEX's feed guide asks) and then retries, a bounded number of
times. The scope is `OMSD_RETRY_AFTER_SCOPE`: `route` (the default) pauses the
calls to the same VTEX operation (the feed's GET and commit are one), `account`
pauses every call (docs/vtex-decisions.md). The pause is checked after a send
slot is granted, so no call queued for a slot slips out inside it.
Calls leave evenly through a sliding window (`rate.SendWindow`): no one-second window
holds more than the rate, and at most a tenth of it leaves at once; 429s that show
a limit lower the rate, which recovers slowly once they stop (daemon/vtex/rate.py).
Every call names a priority class; under a saturated budget the gate in front of
the throttle serves commits, then approvals, then feed reads, then the rest, with
a minimum share for the last two (daemon/vtex/budget.py).
Network errors, timeouts and 5xx are retried with capped backoff for idempotent
calls only; the approval PUT is never blindly repeated (the machine re-checks
the order with Get order instead).
Get orders are coalesced: one in flight per order, and a call for an order whose Get
order is still queued for a slot (not sent) takes that call's answer, which is as
fresh as its own would be (`omsd_vtex_get_orders_coalesced_total`).
What the client learned (the adapted rate, the Retry-After pauses still open) is
`learned()`, and `restore()` starts from it after a restart (daemon/vtex/memory.py)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Protocol
from urllib.parse import quote

import aiohttp
from pydantic import ValidationError

from ..config.settings import Settings
from ..ops.logs import get_logger
from ..ops.metrics import Metrics
from .budget import Priority, PriorityGate
from .errors import AuthFailed, BadResponse, NotFound, RateLimited, VtexRejected, VtexUnavailable
from .models import ApprovalResponse, FeedConfig, HookConfig, OrderSnapshot
from .rate import AdaptiveRate, SendWindow, spread

log = get_logger("omsd.vtex")


FIRST_RETRY_S = 0.1  # an idempotent call answered 5xx (or lost) is tried again this soon, once


FEED = "/api/orders/feed"


FEED_CONFIG = "/api/orders/feed/config"


HOOK_CONFIG = "/api/orders/hook/config"


ORDER = "/api/oms/pvt/orders/{order_id}"


ORDER_STATUS = "/api/order-integration/orders/status"


Sleep = Callable[[float], Awaitable[None]]
Call = Literal["get_order", "approve"]  # the calls the effect runner makes
CALL_ROUTES: dict[Call, str] = {"get_order": ORDER, "approve": ORDER_STATUS}


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None when
    absent or unreadable ("inf" and "nan" included: no wait is infinite)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


@dataclass(frozen=True, slots=True)
class Learned:
    """What the client learned of VTEX's limits, for the next run to start from."""

    rate: float  # requests per second it holds itself to
    limit_rate: float | None  # the rate at which the last limit showed (None: none yet)
    pauses_s: dict[str, float] = field(default_factory=dict)  # scope -> seconds left of its Retry-After
    recent: str = ""  # the recent answers counted as evidence of a limit: 1 a 429, 0 not
    # seconds since the rate last changed, and since each answer counted as use (rate.AdaptiveRate.evidence)
    evidence: tuple[float, tuple[float, ...]] | None = None


@dataclass(slots=True)
class _OrderCall:
    """A Get order under way: queued for a slot until `sent`."""

    priority: Priority
    done: asyncio.Future[OrderSnapshot]
    sent: bool = False


class VtexApi(Protocol):
    """What the daemon needs from VTEX; the real client and test fakes implement it."""

    async def get_feed(self, maxlot: int) -> list[Any]: ...
    async def commit_feed(self, handles: list[str]) -> None: ...
    async def get_feed_config(self) -> FeedConfig | None: ...
    async def save_feed_config(self, body: Mapping[str, Any]) -> None: ...
    async def get_hook_config(self) -> HookConfig | None: ...
    async def save_hook_config(self, body: Mapping[str, Any]) -> None: ...
    async def get_order(self, order_id: str, *, priority: Priority = Priority.BACKGROUND) -> OrderSnapshot: ...
    async def approve(self, marketplace_order_id: str) -> ApprovalResponse: ...
    def paused_s(self, call: Call) -> float:
        """Seconds until a call of this kind may leave (a 429's Retry-After still open on its
        scope); 0 when it may go now."""
        ...


class VtexClient:
    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        *,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
        max_rate_limited: int = 5,
    ) -> None:
        self._settings = settings
        self._session = session
        self._base = settings.base_url
        self._sleep = sleep
        self._clock = clock
        self._paused_until: dict[str, float] = {}  # scope → end of its Retry-After pause
        self._rate = AdaptiveRate(settings.rate_limit_per_s, now=clock())
        self._adapt = settings.rate_adapt
        self._window = SendWindow()  # a new setting applies to the next call
        self._spread(self._rate.slots)
        self._gate = PriorityGate()
        self._metrics = metrics or Metrics()
        self._metrics.rate_effective.set(self._rate.rate)
        self._max_rate_limited = max_rate_limited
        self._timeout = aiohttp.ClientTimeout(total=settings.http_timeout_s)
        self._order_calls: dict[str, _OrderCall] = {}  # order id -> its Get order under way
        self.on_learned: Callable[[], None] = lambda: None  # told when the rate, a pause or the evidence changes

    def learned(self) -> Learned:
        rate, limit_rate, recent = self._rate.learned()
        now = self._clock()
        pauses = {scope: until - now for scope, until in self._paused_until.items() if until > now}
        return Learned(rate, limit_rate, pauses, recent, self._rate.evidence(now))

    def restore(self, learned: Learned) -> None:
        """Start from what an earlier run learned (the rate only when it adapts)."""
        now = self._clock()
        if self._adapt:
            self._rate.restore(learned.rate, learned.limit_rate, now, learned.recent, evidence=learned.evidence)
            self._spread(self._rate.slots)
            self._metrics.rate_effective.set(self._rate.rate)
        for scope, left in learned.pauses_s.items():
            if left > 0:
                self._paused_until[scope] = max(self._paused_until.get(scope, 0.0), now + left)

    def __repr__(self) -> str:
        return f"VtexClient(base={self._base!r}, account={self._settings.account!r})"

    def _headers(self) -> dict[str, str]:
        return {
            "X-VTEX-API-AppKey": self._settings.app_key,
            "X-VTEX-API-AppToken": self._settings.app_token.get_secret_value(),
            "Accept": "application/json",
            "Content-Type": "application/json",
        }

    async def _request(
        self,
        method: str,
        route: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        idempotent: bool,
        priority: Priority,
        on_sent: Callable[[], None] | None = None,
    ) -> tuple[int, Any]:
        """One logical call. Returns (status, parsed JSON or None) for any status < 500
        except 429; raises VtexUnavailable or RateLimited otherwise."""
        url = self._base + path
        scope = self._scope(route)
        failures = 0
        limited = 0
        while True:
            await self._slot(priority, scope)
            if on_sent is not None:
                on_sent()
            started = self._clock()
            status, retry_after, text, failure = await self._send(method, url, params, body)
            self._metrics.on_vtex_call(method, route, failure.kind if failure else status, self._clock() - started)
            error = failure.detail if failure else None
            if status == 429:
                limited += 1
                wait_s = parse_retry_after(retry_after)
                if wait_s is None:
                    wait_s = self._settings.rate_limited_wait_s
                self._paused_until[scope] = max(self._paused_until.get(scope, 0.0), self._clock() + wait_s)
                self.on_learned()
                self._metrics.rate_limited_wait.inc(wait_s)
                self._adjust_rate(limited=True)
                log.warning(
                    "vtex_rate_limited",
                    route=route,
                    scope=scope,
                    retry_after_s=wait_s,
                    attempt=limited,
                    rate_per_s=self._rate.rate,
                )
                if limited > self._max_rate_limited:
                    raise RateLimited(f"{method} {route}: 429 {limited} times", wait_s)
                continue
            code = None
            if error is None and status >= 500:
                code = _result_code(text)
                error = f"HTTP {status}{f' {code}' if code else ''}"  # EOI000 in the body says more than 500
            if error is not None:
                failures += 1
                if not idempotent or failures > self._settings.http_retries:
                    raise VtexUnavailable(f"{method} {route}: {error}", code=code)
                # The first retry is prompt (a lone 5xx is the common case and an approval may
                # wait on this call); later ones back off as before.
                delay = FIRST_RETRY_S if failures == 1 else min(30.0, 0.5 * 2 ** (failures - 1))
                self._metrics.retries.inc()
                log.debug("vtex_retry", route=route, error=error, attempt=failures, delay_s=delay)
                await self._sleep(delay)
                continue
            self._adjust_rate(limited=False)
            return status, _json_or_none(text)

    async def _send(
        self, method: str, url: str, params: Mapping[str, str] | None, body: Any
    ) -> tuple[int, str | None, str, _Failure | None]:
        """One HTTP exchange: (status, Retry-After, body text, why it failed); status 0 on failure."""
        try:
            async with self._session.request(
                method,
                url,
                params=params,
                data=None if body is None else json.dumps(body),
                headers=self._headers(),
                timeout=self._timeout,
            ) as resp:
                # bad bytes must not end a loop: decode with replacement characters
                return resp.status, resp.headers.get("Retry-After"), await resp.text(errors="replace"), None
        except TimeoutError:
            return 0, None, "", _Failure("timeout", f"timeout: no answer within {self._settings.http_timeout_s:g} s")
        except aiohttp.ClientError as exc:
            return 0, None, "", _Failure(type(exc).__name__, describe(exc))

    def _scope(self, route: str) -> str:
        """What a 429 on `route` pauses: that VTEX operation, or the whole account."""
        return route if self._settings.retry_after_scope == "route" else "account"

    def _paused(self, scope: str) -> bool:
        return self._clock() < self._paused_until.get(scope, 0.0)

    def paused_s(self, call: Call) -> float:
        """Seconds until a call of this kind may leave its scope's Retry-After pause (0: now)."""
        return max(0.0, self._paused_until.get(self._scope(CALL_ROUTES[call]), 0.0) - self._clock())

    async def _slot(self, priority: Priority, scope: str) -> None:
        """Take a throttle slot outside any 429 pause of `scope`, in priority order. One
        caller at a time passes the gate to the throttle, so the gate decides who goes
        next; a caller waits out its scope's pause before queueing at the gate, so a
        paused route holds up no other. A caller whose scope was paused while it waited
        leaves the gate without taking the slot (the next caller takes it: a pause on one
        route spends no slot of the others), waits the pause out and queues again, so
        nothing is sent before Retry-After has elapsed."""
        while True:
            while (wait := self._paused_until.get(scope, 0.0) - self._clock()) > 0:
                await self._sleep(wait)
            async with self._gate.turn(priority):
                while not self._paused(scope) and (wait := self._window.delay(self._clock())) > 0:
                    await self._sleep(wait)
                if not self._paused(scope):
                    self._window.take(self._clock())
                    return

    def _spread(self, slots: int) -> None:
        """Spend `slots` calls a second evenly (daemon/vtex/rate.py `spread`)."""
        self._window.set(*spread(slots))

    def _adjust_rate(self, *, limited: bool) -> None:
        """Feed an answer to the adaptive rate and apply the result to the throttle."""
        if not self._adapt:
            return
        now = self._clock()
        before = self._rate.rate
        rate = self._rate.on_429(now) if limited else self._rate.on_success(now)
        if rate != before:
            self._spread(self._rate.slots)
            self._metrics.rate_effective.set(rate)
        self.on_learned()  # every answer is evidence (of a limit, or of the rate used)

    @staticmethod
    def _raise_for(method: str, route: str, status: int, body: Any) -> None:
        code = body.get("code") if isinstance(body, dict) else None
        message = f"{method} {route}: HTTP {status}" + (f" {code}" if code else "")
        if status == 404:
            raise NotFound(message, status, code)
        if status in (401, 403):
            raise AuthFailed(message, status, code)
        raise VtexRejected(message, status, code)

    # ---- feed ---------------------------------------------------------------------------
    async def get_feed(self, maxlot: int, *, priority: Priority = Priority.INTAKE) -> list[Any]:
        if not 1 <= maxlot <= 10:
            raise ValueError("maxlot must be within 1..10")
        params = {"maxlot": str(maxlot)}
        status, body = await self._request("GET", FEED, FEED, params=params, idempotent=True, priority=priority)
        if status != 200:
            self._raise_for("GET", FEED, status, body)
        if body is None:
            return []
        if not isinstance(body, list):
            raise BadResponse(f"GET {FEED}: expected a JSON array")
        return body

    async def commit_feed(self, handles: list[str], *, priority: Priority = Priority.COMMIT) -> None:
        if not handles:
            return
        payload = {"handles": handles}
        status, body = await self._request("POST", FEED, FEED, body=payload, idempotent=True, priority=priority)
        if not 200 <= status < 300:
            self._raise_for("POST", FEED, status, body)

    async def _get_config(self, route: str) -> dict[str, Any] | None:
        """A configuration object, or None when VTEX has none (404, or an empty 200)."""
        status, body = await self._request("GET", route, route, idempotent=True, priority=Priority.BACKGROUND)
        if status == 404 or (status == 200 and not body):
            return None
        if status != 200:
            self._raise_for("GET", route, status, body)
        if not isinstance(body, dict):
            raise BadResponse(f"GET {route}: expected a JSON object")
        return body

    async def _save_config(self, route: str, body: Mapping[str, Any]) -> None:
        status, answer = await self._request(
            "POST", route, route, body=dict(body), idempotent=True, priority=Priority.BACKGROUND
        )
        if not 200 <= status < 300:
            self._raise_for("POST", route, status, answer)

    async def get_feed_config(self) -> FeedConfig | None:
        raw = await self._get_config(FEED_CONFIG)
        return FeedConfig(raw=raw) if raw is not None else None

    async def save_feed_config(self, body: Mapping[str, Any]) -> None:
        await self._save_config(FEED_CONFIG, body)

    async def get_hook_config(self) -> HookConfig | None:
        raw = await self._get_config(HOOK_CONFIG)
        return HookConfig(raw=raw) if raw is not None else None

    async def save_hook_config(self, body: Mapping[str, Any]) -> None:
        """VTEX pings the hook URL before it saves: omsd's server must be listening."""
        await self._save_config(HOOK_CONFIG, body)

    # ---- orders -------------------------------------------------------------------------
    async def get_order(self, order_id: str, *, priority: Priority = Priority.BACKGROUND) -> OrderSnapshot:
        """Priority: APPROVAL right before an approval, BACKGROUND for what can wait.

        Coalesced: while a Get order of the same order waits for a slot at this priority or a
        more urgent one, this call takes its answer (it leaves later than this call was asked,
        so it is as fresh); while one is on the wire, this call waits for it to come back and
        then asks anew (one in flight per order). One queued at a lower priority is not
        waited for: this call goes ahead of it."""
        while (under_way := self._order_calls.get(order_id)) is not None:
            if under_way.sent:
                await asyncio.wait([under_way.done])
                continue
            if under_way.priority > priority:
                break
            self._metrics.get_orders_coalesced.inc()
            await asyncio.wait([under_way.done])
            if not under_way.done.cancelled():
                return under_way.done.result()  # its answer, or its error
            # it was cancelled (a shutdown): ask anew
        call = _OrderCall(priority, asyncio.get_running_loop().create_future())
        self._order_calls[order_id] = call

        def sent() -> None:
            call.sent = True

        try:
            snapshot = await self._get_order(order_id, priority, sent)
        except asyncio.CancelledError:
            call.done.cancel()
            raise
        except BaseException as exc:
            call.done.set_exception(exc)
            call.done.exception()  # retrieved: nobody may be waiting for it
            raise
        else:
            call.done.set_result(snapshot)
            return snapshot
        finally:
            if self._order_calls.get(order_id) is call:
                del self._order_calls[order_id]

    async def _get_order(self, order_id: str, priority: Priority, on_sent: Callable[[], None]) -> OrderSnapshot:
        path = ORDER.format(order_id=quote(order_id, safe=""))
        status, body = await self._request("GET", ORDER, path, idempotent=True, priority=priority, on_sent=on_sent)
        if status != 200:
            self._raise_for("GET", ORDER, status, body)
        try:
            return OrderSnapshot.model_validate(body)
        except ValidationError as exc:
            raise BadResponse(f"GET {ORDER}: unreadable order ({exc.error_count()} errors)") from None

    async def approve(self, marketplace_order_id: str, *, priority: Priority = Priority.APPROVAL) -> ApprovalResponse:
        """PUT marketplaceOrderStatus=approved. A result code in the body is an answer,
        whatever the HTTP status; without one, 4xx raises VtexRejected."""
        body = {
            "marketplaceOrderId": marketplace_order_id,
            "marketplaceOrderStatus": "approved",
            "connectorName": self._settings.connector_name,
            "connectorEndpoint": self._settings.notify_endpoint.get_secret_value(),  # the capability URL
        }
        status, answer = await self._request(
            "PUT",
            ORDER_STATUS,
            ORDER_STATUS,
            params={"an": self._settings.account},
            body=body,
            idempotent=False,
            priority=priority,
        )
        code = answer.get("code") if isinstance(answer, dict) else None
        if isinstance(code, str) and code:
            success = answer.get("success")
            message = answer.get("message")
            operation = answer.get("operationId")
            return ApprovalResponse(
                http_status=status,
                code=code,
                success=success if isinstance(success, bool) else None,
                message=message if isinstance(message, str) else None,
                operation_id=operation if isinstance(operation, str) else None,
            )
        if 200 <= status < 300:
            raise BadResponse(f"PUT {ORDER_STATUS}: HTTP {status} without a result code")
        self._raise_for("PUT", ORDER_STATUS, status, answer)
        raise AssertionError("unreachable")


@dataclass(frozen=True, slots=True)
class _Failure:
    """A call that got no HTTP answer: `kind` labels the metric (a bounded set of names),
    `detail` tells an operator what happened, naming the host."""

    kind: str
    detail: str


def describe(exc: aiohttp.ClientError) -> str:
    """A client error as an operator reads it: the host and the cause (the name did not
    resolve, the connection was refused, the certificate was not accepted, ...)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"cannot connect to {exc.host}:{exc.port}: its TLS certificate was refused ({exc.certificate_error})"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve {exc.host}: {exc.os_error.strerror or 'name not resolved'}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        err = exc.os_error
        why = os.strerror(err.errno) if isinstance(err.errno, int) and err.errno > 0 else (err.strerror or str(err))
        return f"cannot connect to {exc.host}:{exc.port}: {why}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without answering"
    return f"{type(exc).__name__}: {exc}"[:300]


def _result_code(text: str) -> str | None:
    """VTEX's result code (`EOI000`) when a body carries one (at most 40 characters of it)."""
    body = _json_or_none(text)
    code = body.get("code") if isinstance(body, dict) else None
    return code[:40] if isinstance(code, str) and code else None


def _json_or_none(text: str) -> Any:
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested too deep to parse
        return None
