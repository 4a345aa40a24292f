"""The relay: every outcome pushed to the connector, at least once, in order per order.

Per endpoint, one loop takes the outcomes past its cursor into durable deliveries (at
most WINDOW pending at once), sends the due ones (each the oldest pending of its order,
so an order's events arrive in order; up to `relay_concurrency` orders at once), deletes
what the connector acknowledged (2xx) and schedules the rest again. The deliveries are
in the database: after a SIGKILL of omsd or of the receiver they go out again, with the
same `webhook-id` (receivers deduplicate by it). One failing order holds back only its
own events; one failing endpoint only its own; an order that keeps failing occupies at
most WINDOW deliveries.

Retries follow a schedule from seconds to hours (SCHEDULE, about 3 days in all) with
±20 % jitter; a `Retry-After` (429, 503) is a floor, capped at the schedule's longest
step (a receiver's "in 10^12 seconds" or "in the year 9999" must not park an order for
ever, nor overflow the clock). Redirects are not followed: a 3xx is a failed attempt whose
error names where it pointed (OMSD_RELAY_URL must be the final URL). Whatever goes wrong in
one attempt (an exception nobody foresaw) is that attempt's failure, retried like a 5xx.
After the last attempt the delivery is given up (kept as `failed`: `omsd relay status`
lists it, `omsd relay retry` sends it again; the outcome stays in the pull API). A `410
Gone` means "stop": the endpoint is disabled (alarm `relay_disabled_<name>`,
`omsd_relay_endpoint_disabled`) until `omsd relay retry` enables it; nothing is lost
meanwhile.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from urllib.parse import urljoin, urlsplit

import aiohttp

from omsd.state.store import Store
from omsd.state.store.outcomes import Delivery

from ..ops.health import Health
from ..ops.logs import get_logger
from ..ops.metrics import Metrics
from ..ops.waiting import Watermark, wait_any
from ..vtex.client import parse_retry_after
from .webhooks import Endpoint

log = get_logger("omsd.relay")

# Seconds before attempt n+1 (attempt 1 is at once): 71.7 hours in all, 15 attempts.
SCHEDULE: tuple[float, ...] = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 21600, 28800, 36000, 43200, 43200, 57600)
JITTER = 0.2
RETRY_AFTER_MAX_S = SCHEDULE[-1]  # a longer Retry-After (up to "the year 9999") waits this long
WINDOW = 1000  # deliveries pending per endpoint; the cursor waits beyond
IDLE_S = 1.0  # how often an idle endpoint looks again (the CLI's retry/replay write from outside)


def _host(url: str, location: str | None) -> str:
    """The host a redirect points at (a relative Location: the endpoint's own)."""
    try:
        return urlsplit(urljoin(url, location or "")).hostname or "?"
    except ValueError:
        return "?"


def alarm_name(endpoint: str) -> str:
    return f"relay_disabled_{endpoint}"


class Relay:
    def __init__(
        self,
        store: Store,
        endpoints: Sequence[Endpoint],
        session: aiohttp.ClientSession,
        mark: Watermark,
        health: Health,
        metrics: Metrics,
        *,
        timeout_s: float,
        concurrency: int,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        jitter: Callable[[], float] = random.random,
        idle_s: float = IDLE_S,
    ) -> None:
        self._store = store
        self.endpoints = list(endpoints)
        self._session = session
        self._mark = mark
        self._health = health
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._concurrency = concurrency
        self._clock = clock
        self._jitter = jitter
        self._idle_s = idle_s

    async def run(self, stop: asyncio.Event) -> None:
        """Serve every endpoint until `stop` (deliveries in flight finish)."""
        async with asyncio.TaskGroup() as tg:
            for endpoint in self.endpoints:
                tg.create_task(self._serve(endpoint, stop), name=f"relay-{endpoint.name}")

    async def _serve(self, endpoint: Endpoint, stop: asyncio.Event) -> None:
        outcomes = self._store.outcomes
        await outcomes.endpoint(endpoint.name)
        await outcomes.rekey(endpoint.name)
        await self._drop_orphans(endpoint)
        while not stop.is_set():
            if await self._disabled(endpoint):
                await wait_any(stop, within_s=self._idle_s)
                continue
            seen = self._mark.value
            await outcomes.take(endpoint.name, WINDOW, self._clock(), endpoint.types, upto=seen)
            due = await outcomes.due(endpoint.name, self._clock(), self._concurrency)
            if due:
                await self._deliver(endpoint, due)
                continue
            await self._rest(endpoint, seen, stop)

    async def _drop_orphans(self, endpoint: Endpoint) -> None:
        """Deliveries whose event an older omsd's retention removed cannot be sent: they go,
        said once (they would block their order, and fill the window, for ever)."""
        if dropped := await self._store.outcomes.drop_orphans(endpoint.name):
            self._metrics.relay_deliveries.labels(endpoint=endpoint.name, result="dropped").inc(dropped)
            log.error("relay_deliveries_dropped", endpoint=endpoint.name, count=dropped, reason="their events are gone")

    async def _rest(self, endpoint: Endpoint, seen: int, stop: asyncio.Event) -> None:
        """Wait for a new outcome, the next retry, a look from outside, or `stop`."""
        wait_s = self._idle_s
        if (next_at := await self._store.outcomes.next_due(endpoint.name)) is not None:
            wait_s = min(wait_s, max(0.0, (next_at - self._clock()).total_seconds()))
        if self._mark.value == seen:
            await wait_any(self._mark.risen(), stop, within_s=wait_s)

    async def _disabled(self, endpoint: Endpoint) -> bool:
        [state] = [s for s in await self._store.outcomes.endpoints() if s.name == endpoint.name]
        disabled = state.disabled_at is not None
        self._metrics.relay_disabled.labels(endpoint=endpoint.name).set(1 if disabled else 0)
        if disabled:
            self._health.raise_alarm(
                alarm_name(endpoint.name), f"the connector answered 410: {state.disabled_reason}", outside=True
            )
        else:
            self._health.clear_alarm(alarm_name(endpoint.name))
        return disabled

    async def _deliver(self, endpoint: Endpoint, due: list[Delivery]) -> None:
        results = await asyncio.gather(*(self._post(endpoint, d) for d in due))
        done = [d.outcome.seq for d, ok in zip(due, results, strict=True) if ok]
        if done:
            await self._store.outcomes.delivered(endpoint.name, done)
            self._metrics.relay_deliveries.labels(endpoint=endpoint.name, result="delivered").inc(len(done))

    async def _post(self, endpoint: Endpoint, delivery: Delivery) -> bool:
        """One attempt; True when the connector took it (2xx)."""
        retry_after: float | None = None
        try:
            request = endpoint.request(delivery.outcome)  # signed at the real time: receivers check it
            async with self._session.post(
                request.url,
                data=request.body.encode(),
                headers=request.headers,
                timeout=self._timeout,
                allow_redirects=False,  # followed, a 302 would be a GET without the event, answered 200
            ) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return True
                if resp.status == 410:
                    await self._disable(endpoint, f"HTTP 410 for event {delivery.outcome.seq}")
                    return False
                error = f"HTTP {resp.status}"
                if 300 <= resp.status < 400:
                    error += f": a redirect to {_host(request.url, resp.headers.get('Location'))} (not followed)"
                if resp.status in (429, 503):
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        except TimeoutError:
            error = "timeout"
        except aiohttp.ClientError as exc:
            error = type(exc).__name__
        except Exception as exc:  # a bug: this attempt failed; the relay and the other orders go on
            error = f"{type(exc).__name__}: {exc}"
            log.error("relay_attempt_error", endpoint=endpoint.name, seq=delivery.outcome.seq, error=error)
        await self._failed(endpoint, delivery, error, retry_after)
        return False

    async def _failed(self, endpoint: Endpoint, delivery: Delivery, error: str, retry_after: float | None) -> None:
        attempt = delivery.attempts + 1  # the attempts made so far, this one included
        if attempt > len(SCHEDULE):
            await self._store.outcomes.failed(endpoint.name, delivery.outcome.seq, next_at=None, error=error)
            self._metrics.relay_deliveries.labels(endpoint=endpoint.name, result="gave_up").inc()
            log.error("relay_gave_up", endpoint=endpoint.name, seq=delivery.outcome.seq, attempts=attempt, error=error)
            return
        delay = SCHEDULE[attempt - 1] * (1 + JITTER * (2 * self._jitter() - 1))
        delay = max(delay, min(retry_after or 0.0, RETRY_AFTER_MAX_S))
        next_at = self._clock() + timedelta(seconds=delay)
        await self._store.outcomes.failed(endpoint.name, delivery.outcome.seq, next_at=next_at, error=error)
        self._metrics.relay_deliveries.labels(endpoint=endpoint.name, result="retried").inc()
        log.debug("relay_retry", endpoint=endpoint.name, seq=delivery.outcome.seq, error=error, in_s=round(delay, 1))

    async def _disable(self, endpoint: Endpoint, reason: str) -> None:
        await self._store.outcomes.disable(endpoint.name, reason, self._clock())
        self._metrics.relay_deliveries.labels(endpoint=endpoint.name, result="disabled").inc()
        log.error("relay_endpoint_disabled", endpoint=endpoint.name, reason=reason)
