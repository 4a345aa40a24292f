"""The VTEX client at the HTTP boundary, with aioresponses."""

from __future__ import annotations

import asyncio
import bisect
import re
import socket
from collections.abc import AsyncIterator, Coroutine
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from omsd.daemon.ops.metrics import Metrics
from omsd.daemon.vtex.budget import Priority
from omsd.daemon.vtex.client import FEED, ORDER, VtexClient, describe, parse_retry_after
from omsd.daemon.vtex.errors import AuthFailed, BadResponse, NotFound, RateLimited, VtexUnavailable
from omsd.daemon.vtex.models import FeedConfig, feed_config_body
from omsd.daemon.vtex.rate import MARGIN, spread
from tests.helpers import VTEX_TOKEN, FakeClock, until
from tests.helpers import settings as make_settings
from tests.http_mock import aioresponses

BASE = "https://shop.vtexcommercestable.com.br"
TOKEN = VTEX_TOKEN


class Sleeps:
    """A fake asyncio.sleep that records each wait and moves a fake clock by it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.calls: list[float] = []
        self.now = now

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def client(
    session: aiohttp.ClientSession, sleeps: Sleeps | None = None, *, max_rate_limited: int = 5, **kw: Any
) -> VtexClient:
    sleeps = sleeps or Sleeps()
    return VtexClient(make_settings(**kw), session, sleep=sleeps, clock=sleeps.clock, max_rate_limited=max_rate_limited)


def _calls(m: Any) -> list[Any]:
    return [call for calls in m.requests.values() for call in calls]


async def test_every_call_carries_auth_and_json_headers(session: aiohttp.ClientSession) -> None:
    """AppKey, AppToken, Accept and Content-Type go on GET, POST and PUT alike."""
    with aioresponses() as m:
        m.get(f"{BASE}/api/orders/feed?maxlot=10", payload=[])
        m.post(f"{BASE}/api/orders/feed", status=200)
        m.get(f"{BASE}/api/oms/pvt/orders/X-1", payload={"orderId": "X-1", "status": "handling"})
        m.put(re.compile(rf"{re.escape(BASE)}/api/order-integration/orders/status.*"), payload={"code": "SOI003"})
        c = client(session)
        await c.get_feed(10)
        await c.commit_feed(["h"])
        await c.get_order("X-1")
        await c.approve("M-1")
        calls = _calls(m)
    assert len(calls) == 4
    for call in calls:
        headers = call.kwargs["headers"]
        assert headers["X-VTEX-API-AppKey"] == "vtexappkey-shop-ABC"
        assert headers["X-VTEX-API-AppToken"] == TOKEN
        assert headers["Accept"] == "application/json"
        assert headers["Content-Type"] == "application/json"


async def test_approval_body_and_query_follow_the_openapi_file(session: aiohttp.ClientSession) -> None:
    """PUT ?an=account with the four required fields, status lower-case."""
    with aioresponses() as m:
        m.put(
            f"{BASE}/api/order-integration/orders/status?an=shop",
            payload={"code": "SOI003", "success": True, "message": "Order successfully enqueued"},
        )
        answer = await client(session).approve("M-1")
        [call] = _calls(m)
    assert answer.code == "SOI003" and answer.http_status == 200
    import json

    assert json.loads(call.kwargs["data"]) == {
        "marketplaceOrderId": "M-1",
        "marketplaceOrderStatus": "approved",
        "connectorName": "conn",
        "connectorEndpoint": make_settings().notify_endpoint.get_secret_value(),  # the secret path
    }
    assert json.loads(call.kwargs["data"])["connectorEndpoint"].startswith("https://omsd.example.com/vtex/notify/")
    assert call.kwargs["params"] == {"an": "shop"}


async def test_result_code_in_an_error_answer_is_an_answer(session: aiohttp.ClientSession) -> None:
    """EOI011 in a 400 body is returned as a result code, not raised."""
    with aioresponses() as m:
        m.put(
            f"{BASE}/api/order-integration/orders/status?an=shop",
            status=400,
            payload={"code": "EOI011", "success": False},
        )
        answer = await client(session).approve("M-1")
    assert answer.code == "EOI011" and answer.http_status == 400


@pytest.mark.parametrize("form", ["seconds", "date"])
async def test_429_honours_retry_after_in_both_forms(session: aiohttp.ClientSession, form: str) -> None:
    """A 429 pauses the client for Retry-After (delta-seconds or HTTP date), then retries."""
    value = "7" if form == "seconds" else format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    sleeps = Sleeps()
    with aioresponses() as m:
        m.get(f"{BASE}/api/orders/feed?maxlot=10", status=429, headers={"Retry-After": value})
        m.get(f"{BASE}/api/orders/feed?maxlot=10", payload=[{"x": 1}])
        items = await client(session, sleeps).get_feed(10)
    assert items == [{"x": 1}]
    [waited] = sleeps.calls
    if form == "seconds":
        assert waited == pytest.approx(7, abs=0.5)
    else:
        assert 25 <= waited <= 31


async def test_429_without_retry_after_waits_sixty_seconds(session: aiohttp.ClientSession) -> None:
    """Without Retry-After, omsd waits the minute VTEX's feed guide asks for."""
    sleeps = Sleeps()
    with aioresponses() as m:
        m.get(f"{BASE}/api/orders/feed?maxlot=10", status=429)
        m.get(f"{BASE}/api/orders/feed?maxlot=10", payload=[])
        await client(session, sleeps).get_feed(10)
    assert sleeps.calls == [pytest.approx(60, abs=0.5)]


@pytest.mark.parametrize(("scope", "waits"), [("account", [20]), ("route", [])])
async def test_a_429_pauses_other_operations_only_in_account_scope(
    session: aiohttp.ClientSession, scope: str, waits: list[float]
) -> None:
    """After a 429 on the feed, Get order waits for the pause under `account`, not under `route`."""
    sleeps = Sleeps()
    with aioresponses() as m:
        m.get(f"{BASE}/api/orders/feed?maxlot=10", status=429, headers={"Retry-After": "20"})
        m.get(f"{BASE}/api/oms/pvt/orders/X", payload={"orderId": "X"})
        settings = make_settings(retry_after_scope=scope)
        c = VtexClient(settings, session, sleep=sleeps, clock=sleeps.clock, max_rate_limited=0)
        with pytest.raises(RateLimited):
            await c.get_feed(10)  # gives up at once, leaving the pause in force
        assert sleeps.calls == []
        await c.get_order("X")
    assert sleeps.calls == waits


async def test_a_429_on_the_feed_read_pauses_the_feed_commit(session: aiohttp.ClientSession) -> None:
    """In `route` scope the feed's GET and its commit are one operation: a 429 on one pauses the other."""
    sleeps = Sleeps()
    with aioresponses() as m:
        m.get(f"{BASE}/api/orders/feed?maxlot=10", status=429, headers={"Retry-After": "20"})
        m.post(f"{BASE}/api/orders/feed", status=200)
        c = VtexClient(make_settings(), session, sleep=sleeps, clock=sleeps.clock, max_rate_limited=0)
        with pytest.raises(RateLimited):
            await c.get_feed(10)
        await c.commit_feed(["h1"])
    assert sleeps.calls == [20]


async def test_persistent_429_raises_rate_limited(session: aiohttp.ClientSession) -> None:
    """After the allowed number of waits the caller gets RateLimited with VTEX's delay."""
    with aioresponses() as m:
        for _ in range(10):
            m.get(f"{BASE}/api/orders/feed?maxlot=10", status=429, headers={"Retry-After": "3"})
        c = client(session, max_rate_limited=2)
        with pytest.raises(RateLimited) as err:
            await c.get_feed(10)
    assert err.value.retry_after_s == 3


async def test_5xx_is_retried_with_backoff_for_idempotent_calls(session: aiohttp.ClientSession) -> None:
    """GET retries on 5xx with growing delays and returns the eventual answer."""
    sleeps = Sleeps()
    with aioresponses() as m:
        m.get(f"{BASE}/api/oms/pvt/orders/X", status=503)
        m.get(f"{BASE}/api/oms/pvt/orders/X", status=502)
        m.get(f"{BASE}/api/oms/pvt/orders/X", payload={"orderId": "X", "status": "handling"})
        snap = await client(session, sleeps).get_order("X")
    assert snap.status == "handling"
    assert len(sleeps.calls) == 2 and sleeps.calls[1] > sleeps.calls[0]


async def test_first_5xx_retry_is_prompt(session: aiohttp.ClientSession) -> None:
    """A Get order answered 5xx once is tried again within 0.1 s, not after half a second."""
    sleeps = Sleeps()
    with aioresponses() as m:
        m.get(f"{BASE}/api/oms/pvt/orders/X", status=503)
        m.get(f"{BASE}/api/oms/pvt/orders/X", payload={"orderId": "X", "status": "handling"})
        await client(session, sleeps).get_order("X")
    assert len(sleeps.calls) == 1 and sleeps.calls[0] <= 0.1


async def test_5xx_beyond_the_budget_raises_unavailable(session: aiohttp.ClientSession) -> None:
    """Retries are bounded."""
    with aioresponses() as m:
        for _ in range(5):
            m.get(f"{BASE}/api/oms/pvt/orders/X", status=500)
        with pytest.raises(VtexUnavailable):
            await client(session, http_retries=2).get_order("X")
        assert len(_calls(m)) == 3


async def test_approval_put_is_never_retried_blindly(session: aiohttp.ClientSession) -> None:
    """A 5xx on the approval is raised at once: VTEX may have enqueued it."""
    with aioresponses() as m:
        m.put(f"{BASE}/api/order-integration/orders/status?an=shop", status=503)
        m.put(f"{BASE}/api/order-integration/orders/status?an=shop", payload={"code": "SOI003"})
        with pytest.raises(VtexUnavailable):
            await client(session).approve("M")
        assert len(_calls(m)) == 1


def test_connection_failures_name_the_host_and_the_cause() -> None:
    """Not "ClientConnectorDNSError": the host, and whether its name did not resolve or the
    connection was refused."""
    key = SimpleNamespace(host="shop.vtexcommercestable.com.br", port=443, ssl=True, is_ssl=True)
    dns = aiohttp.ClientConnectorDNSError(key, socket.gaierror(-2, "Name or service not known"))  # type: ignore[arg-type]
    assert describe(dns) == "cannot resolve shop.vtexcommercestable.com.br: Name or service not known"
    refused = aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "Connect call failed"))  # type: ignore[arg-type]
    assert describe(refused) == "cannot connect to shop.vtexcommercestable.com.br:443: Connection refused"


async def test_a_refused_connection_is_an_error_naming_host_and_cause(session: aiohttp.ClientSession) -> None:
    """A call to an address nothing listens on: VtexUnavailable saying so; the metric keeps
    the error's type as its label (a bounded set)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    metrics = Metrics()
    vtex = VtexClient(make_settings(vtex_base_url=f"http://127.0.0.1:{port}", http_retries=0), session, metrics=metrics)
    with pytest.raises(VtexUnavailable, match=f"cannot connect to 127.0.0.1:{port}: Connection refused"):
        await vtex.get_order("X")
    labels = {"route": "GET /api/oms/pvt/orders/{order_id}", "status": "ClientConnectorError"}
    assert metrics.sample("omsd_vtex_requests_total", **labels) == 1


async def test_timeouts_are_typed_and_retried(session: aiohttp.ClientSession) -> None:
    """A timeout is retried for GET and surfaces as VtexUnavailable, never as an aiohttp error."""
    with aioresponses() as m:
        for _ in range(3):
            m.get(f"{BASE}/api/oms/pvt/orders/X", exception=TimeoutError())
        with pytest.raises(VtexUnavailable, match="timeout"):
            await client(session, http_retries=2).get_order("X")
        assert len(_calls(m)) == 3


async def test_connection_errors_are_typed(session: aiohttp.ClientSession) -> None:
    """A dropped connection surfaces as VtexUnavailable."""
    with aioresponses() as m:
        m.put(f"{BASE}/api/order-integration/orders/status?an=shop", exception=aiohttp.ServerDisconnectedError())
        with pytest.raises(VtexUnavailable):
            await client(session).approve("M")


async def test_missing_feed_config_is_none_and_feed_404_is_not_found(session: aiohttp.ClientSession) -> None:
    """404 on the config reads as 'no configuration'; 404 on the feed raises NotFound."""
    with aioresponses() as m:
        m.get(f"{BASE}/api/orders/feed/config", status=404)
        m.get(f"{BASE}/api/orders/feed?maxlot=5", status=404)
        c = client(session)
        assert await c.get_feed_config() is None
        with pytest.raises(NotFound):
            await c.get_feed(5)


async def test_feed_config_read_in_both_spellings(session: aiohttp.ClientSession) -> None:
    """Retention and oldest-age are read whichever spelling VTEX uses."""
    raw = {
        "filter": {"type": "FromWorkflow", "status": ["canceled"]},
        "queue": {"visibilityTimeoutInSeconds": 240, "messageRetentionPeriodInSeconds": 345600},
        "quantity": 3,
        "aproximateAgeOfOldestMessageInSeconds": 12.5,
    }
    with aioresponses() as m:
        m.get(f"{BASE}/api/orders/feed/config", payload=raw)
        cfg = await client(session).get_feed_config()
    assert cfg is not None
    assert (cfg.retention_s, cfg.visibility_timeout_s, cfg.quantity, cfg.oldest_age_s) == (345600, 240, 3, 12.5)
    assert FeedConfig(raw={"approximateAgeOfOldestMessageInSeconds": 1}).oldest_age_s == 1


def test_feed_config_body_uses_the_schema_spelling() -> None:
    """The POST body has filter and queue, FromWorkflow statuses and a capital-M retention."""
    body = feed_config_body(make_settings())
    assert body["filter"]["type"] == "FromWorkflow"
    assert "waiting-for-manual-authorization" in body["filter"]["status"]
    assert body["queue"] == {"visibilityTimeoutInSeconds": 240, "MessageRetentionPeriodInSeconds": 345600}


async def test_auth_failure_is_typed(session: aiohttp.ClientSession) -> None:
    """401/403 raise AuthFailed, which callers treat as fatal."""
    with aioresponses() as m:
        m.get(f"{BASE}/api/orders/feed?maxlot=10", status=403)
        with pytest.raises(AuthFailed):
            await client(session).get_feed(10)


async def test_unreadable_order_is_a_bad_response(session: aiohttp.ClientSession) -> None:
    """A 200 Get order without orderId raises BadResponse."""
    with aioresponses() as m:
        m.get(f"{BASE}/api/oms/pvt/orders/X", payload={"status": 3})
        with pytest.raises(BadResponse):
            await client(session).get_order("X")


def test_maxlot_is_checked_before_sending() -> None:
    """maxlot outside 1..10 is refused by omsd itself."""
    import asyncio

    async def go() -> None:
        async with aiohttp.ClientSession() as s:
            await client(s).get_feed(11)

    with pytest.raises(ValueError, match="maxlot"):
        asyncio.run(go())


def test_parse_retry_after() -> None:
    """Seconds, dates in the past (0) and garbage (None)."""
    assert parse_retry_after("12") == 12
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_client_repr_and_errors_hold_no_secret() -> None:
    """Neither the client's repr nor the settings' repr shows the AppToken."""
    s = make_settings()
    assert TOKEN not in repr(s) and TOKEN not in str(s)


class LimitedServer:
    """A loopback VTEX whose Get order answers its first call 429 (held for a while, so
    more calls are in flight meanwhile); the feed GET always answers."""

    def __init__(self, retry_after_s: int, hold_s: float) -> None:
        self.retry_after_s = retry_after_s
        self.hold_s = hold_s
        self.orders = 0

    async def order(self, request: web.Request) -> web.Response:
        self.orders += 1
        if self.orders == 1:
            await asyncio.sleep(self.hold_s)
            return web.Response(status=429, headers={"Retry-After": str(self.retry_after_s)})
        return web.json_response({"orderId": request.match_info["order_id"]})

    async def feed(self, request: web.Request) -> web.Response:
        return web.json_response([])


class RecordingClient(VtexClient):
    """The real client, noting when each exchange left and when a 429 came back."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.sent: list[tuple[float, str]] = []
        self.limited_at: list[float] = []

    async def _send(self, method: str, url: str, params: Any, body: Any) -> tuple[int, str | None, str, Any]:
        self.sent.append((self._clock(), "feed" if url.endswith("/feed") else "order"))
        answer = await super()._send(method, url, params, body)
        if answer[0] == 429:
            self.limited_at.append(self._clock())
        return answer


@pytest.fixture
async def fake_vtex() -> AsyncIterator[tuple[LimitedServer, str]]:
    fake = LimitedServer(retry_after_s=2, hold_s=0.3)
    app = web.Application()
    app.router.add_get("/api/oms/pvt/orders/{order_id}", fake.order)
    app.router.add_get("/api/orders/feed", fake.feed)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("scope", ["route", "account"])
async def test_no_request_leaves_inside_a_retry_after_window(
    session: aiohttp.ClientSession, fake_vtex: tuple[LimitedServer, str], scope: str
) -> None:
    """Callers queued for a slot when a 429 on Get order comes back send no Get order before
    its Retry-After has elapsed; a feed GET asked meanwhile goes at once under `route` and
    waits too under `account`."""
    fake, base = fake_vtex
    settings = make_settings(vtex_base_url=base, rate_limit_per_s=20, retry_after_scope=scope)
    c = RecordingClient(settings, session)
    orders = asyncio.gather(*(c.get_order(f"X-{i}") for i in range(50)))
    await until(lambda: bool(c.limited_at), what="the 429")
    feeds = await asyncio.gather(*(c.get_feed(10) for _ in range(3)))
    snapshots = await orders
    assert {s.order_id for s in snapshots} == {f"X-{i}" for i in range(50)} and feeds == [[], [], []]
    [limited] = c.limited_at
    inside = [kind for t, kind in c.sent if limited < t < limited + fake.retry_after_s]
    assert inside == (["feed"] * 3 if scope == "route" else [])


RATE = "omsd_vtex_rate_limit_effective_per_second"


async def test_429s_in_a_row_lower_the_effective_rate_and_quiet_restores_it(session: aiohttp.ClientSession) -> None:
    """Three 429s in a row cut the throttle and the gauge to 70 %; 5 s of calls at that rate add 5 % back."""
    sleeps, metrics = Sleeps(), Metrics()
    with aioresponses() as m:
        for _ in range(3):
            m.get(f"{BASE}/api/oms/pvt/orders/X", status=429, headers={"Retry-After": "1"})
        m.get(f"{BASE}/api/oms/pvt/orders/X", payload={"orderId": "X"}, repeat=True)
        c = VtexClient(make_settings(rate_limit_per_s=10), session, sleep=sleeps, clock=sleeps.clock, metrics=metrics)
        assert metrics.sample(RATE) == 10
        await c.get_order("X")
        assert metrics.sample(RATE) == pytest.approx(7.0)
        assert (c._window.calls, c._window.period) == spread(7)
        cut_at = sleeps.now
        while sleeps.now < cut_at + 5.0:  # the send window spaces them: 7 per 1.05 s
            await c.get_order("X")
        await c.get_order("X")
    assert metrics.sample(RATE) == pytest.approx(7.5)
    assert (c._window.calls, c._window.period) == spread(7)


async def test_a_lone_429_pauses_but_keeps_the_rate(session: aiohttp.ClientSession) -> None:
    """One 429 among successes is waited out but shows no limit: the rate stays configured."""
    sleeps, metrics = Sleeps(), Metrics()
    with aioresponses() as m:
        m.get(f"{BASE}/api/oms/pvt/orders/X", status=429, headers={"Retry-After": "1"})
        m.get(f"{BASE}/api/oms/pvt/orders/X", payload={"orderId": "X"})
        c = VtexClient(make_settings(rate_limit_per_s=10), session, sleep=sleeps, clock=sleeps.clock, metrics=metrics)
        await c.get_order("X")
    assert sleeps.calls == [1.0]
    assert metrics.sample(RATE) == 10 and (c._window.calls, c._window.period) == spread(10)


async def test_without_adaptation_the_rate_stays_configured(session: aiohttp.ClientSession) -> None:
    """OMSD_RATE_ADAPT=false still pauses on 429s but keeps the configured rate, even for 429s in a row."""
    sleeps, metrics = Sleeps(), Metrics()
    with aioresponses() as m:
        for _ in range(3):
            m.get(f"{BASE}/api/oms/pvt/orders/X", status=429, headers={"Retry-After": "1"})
        m.get(f"{BASE}/api/oms/pvt/orders/X", payload={"orderId": "X"})
        settings = make_settings(rate_limit_per_s=10, rate_adapt=False)
        c = VtexClient(settings, session, sleep=sleeps, clock=sleeps.clock, metrics=metrics)
        await c.get_order("X")
    assert sleeps.calls == [1.0, 1.0, 1.0]
    assert metrics.sample(RATE) == 10 and (c._window.calls, c._window.period) == spread(10)


def busiest(times: list[float], period: float) -> int:
    """The most calls in any half-open window [t, t + period) (to within a nanosecond)."""
    times = sorted(times)
    return max((bisect.bisect_left(times, t + period - 1e-9) - i for i, t in enumerate(times)), default=0)


@pytest.mark.parametrize("rate", [20, 100])
async def test_many_callers_never_exceed_a_window(session: aiohttp.ClientSession, rate: int) -> None:
    """Many concurrent callers of every class: no 1 s window holds more than the rate, no 100 ms
    window more than a tenth of it, and the calls still use the whole rate."""
    sleeps = Sleeps()
    with aioresponses() as m:
        m.get(re.compile(rf"{BASE}/api/oms/pvt/orders/.*"), payload={"orderId": "X"}, repeat=True)
        m.get(f"{BASE}/api/orders/feed?maxlot=10", payload=[], repeat=True)
        m.post(f"{BASE}/api/orders/feed", status=200, repeat=True)
        c = RecordingClient(make_settings(rate_limit_per_s=rate), session, sleep=sleeps, clock=sleeps.clock)
        calls: list[Coroutine[Any, Any, object]] = [
            c.get_order(f"X-{n}", priority=Priority(n % 4)) for n in range(rate * 3)
        ]
        calls += [c.get_feed(10) for _ in range(rate)] + [c.commit_feed(["h"]) for _ in range(rate)]
        await asyncio.gather(*calls)
    times = [t for t, _ in c.sent]
    assert len(times) == rate * 5
    assert busiest(times, 1.0) == rate
    assert busiest(times, 0.1) == rate // 10
    # five seconds' worth, but for the margin
    assert max(times) - min(times) < 5.0 * (1 + MARGIN)


# ---- Get orders coalesced ------------------------------------------------------------------


class SlowOrders:
    """A loopback Get order that holds each answer until `release` is set, counting the calls
    per order and how many are on the wire at once."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.on_wire = 0
        self.most_on_wire: dict[str, int] = {}
        self.release = asyncio.Event()
        self.arrived = asyncio.Event()

    async def order(self, request: web.Request) -> web.Response:
        order_id = request.match_info["order_id"]
        self.calls[order_id] = self.calls.get(order_id, 0) + 1
        self.on_wire += 1
        self.most_on_wire[order_id] = max(self.most_on_wire.get(order_id, 0), self.on_wire)
        self.arrived.set()
        await self.release.wait()
        self.on_wire -= 1
        return web.json_response({"orderId": order_id, "status": "handling"})


@pytest.fixture
async def slow_orders() -> AsyncIterator[tuple[SlowOrders, str]]:
    fake = SlowOrders()
    app = web.Application()
    app.router.add_get("/api/oms/pvt/orders/{order_id}", fake.order)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield fake, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        fake.release.set()
        await runner.cleanup()


async def test_a_get_order_still_queued_answers_the_next_for_the_same_order(
    session: aiohttp.ClientSession, slow_orders: tuple[SlowOrders, str]
) -> None:
    """Two Get orders of one order while the first waits for a slot: one request, one answer for both."""
    fake, base = slow_orders
    metrics = Metrics()
    c = VtexClient(make_settings(vtex_base_url=base, rate_limit_per_s=2), session, metrics=metrics)
    fake.release.set()
    await c.get_order("OTHER")  # the window's one call for now: the next ones queue
    first = asyncio.create_task(c.get_order("A"))
    await until(lambda: "A" in c._order_calls, what="the first call queued")
    second = await c.get_order("A")
    assert (await first).order_id == second.order_id == "A"
    assert fake.calls["A"] == 1
    assert metrics.sample("omsd_vtex_get_orders_coalesced_total") == 1


async def test_one_get_order_on_the_wire_per_order(
    session: aiohttp.ClientSession, slow_orders: tuple[SlowOrders, str]
) -> None:
    """A Get order asked while one of the same order is on the wire waits for its answer, then
    asks anew (its answer may predate what the caller knows): never two on the wire at once."""
    fake, base = slow_orders
    c = VtexClient(make_settings(vtex_base_url=base, rate_limit_per_s=100), session)
    first = asyncio.create_task(c.get_order("A"))
    await asyncio.wait_for(fake.arrived.wait(), timeout=10)
    second = asyncio.create_task(c.get_order("A", priority=Priority.APPROVAL))
    await until(lambda: c._order_calls["A"].sent, what="the first on the wire")
    fake.release.set()
    await asyncio.gather(first, second)
    assert fake.calls["A"] == 2
    assert fake.most_on_wire["A"] == 1


async def test_an_urgent_get_order_does_not_wait_behind_a_queued_background_one(
    session: aiohttp.ClientSession, slow_orders: tuple[SlowOrders, str]
) -> None:
    """A Get order before an approval is not absorbed by a background one of the same order that
    still waits for a slot: it asks on its own, at its priority."""
    fake, base = slow_orders
    metrics = Metrics()
    c = VtexClient(make_settings(vtex_base_url=base, rate_limit_per_s=2), session, metrics=metrics)
    other = asyncio.create_task(c.get_order("OTHER"))  # on the wire (held), and the window full
    await asyncio.wait_for(fake.arrived.wait(), timeout=10)
    background = asyncio.create_task(c.get_order("A", priority=Priority.BACKGROUND))
    await until(lambda: "A" in c._order_calls, what="the background call queued")
    urgent = asyncio.create_task(c.get_order("A", priority=Priority.APPROVAL))
    # both reach VTEX while every answer is held: the urgent one waited for nobody's answer
    await until(lambda: fake.calls.get("A") == 2, what="both Get orders on the wire")
    fake.release.set()
    await asyncio.gather(other, background, urgent)
    assert metrics.sample("omsd_vtex_get_orders_coalesced_total") == 0


async def test_a_caller_whose_route_was_paused_while_queued_leaves_its_slot_to_the_next(
    session: aiohttp.ClientSession,
) -> None:
    """A Get order queued for a slot when a 429 pauses its route takes no slot on its turn: the
    feed read queued behind it leaves at once, in the slot the Get order would have spent."""
    clock = FakeClock()
    parked = asyncio.Event()

    async def sleep(seconds: float) -> None:  # only the pause is waited for: it lasts the test
        parked.set()
        await asyncio.Event().wait()

    c = VtexClient(make_settings(rate_limit_per_s=1, rate_adapt=False), session, sleep=sleep, clock=clock)
    order = c._scope(ORDER)
    async with c._gate.turn(Priority.COMMIT):  # the gate is busy: both callers queue
        queued = asyncio.create_task(c._slot(Priority.CHECK, order))
        feed = asyncio.create_task(c._slot(Priority.INTAKE, c._scope(FEED)))
        await asyncio.sleep(0)
        c._paused_until[order] = clock.now + 5  # a 429 on Get order comes back meanwhile
    await asyncio.wait_for(feed, timeout=10)
    await asyncio.wait_for(parked.wait(), timeout=10)
    assert len(c._window._sent) == 1  # the feed read's: the one slot a second was not spent on the pause
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued


def test_the_effect_runner_sees_how_long_a_call_stays_paused(session: aiohttp.ClientSession) -> None:
    """`paused_s` tells the effect runner how long Get orders (or approvals) stay paused by a 429."""
    clock = FakeClock()
    c = VtexClient(make_settings(), session, clock=clock)
    c._paused_until[c._scope(ORDER)] = clock.now + 2
    assert c.paused_s("get_order") == 2 and c.paused_s("approve") == 0
    clock.now += 3
    assert c.paused_s("get_order") == 0
