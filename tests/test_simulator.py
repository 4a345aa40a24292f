"""The simulator behaves as VTEX documents; otherwise the end-to-end tests prove nothing."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from omsd.sim.feed import FeedQueue
from omsd.sim.orders import Orders, SimOrder
from omsd.sim.runtime import Runtime
from omsd.sim.server import DEFAULT_APP_KEY, DEFAULT_APP_TOKEN, Simulator, serve
from omsd.sim.statuses import FILTERABLE
from omsd.sim.validation import validate_feed_config
from tests.helpers import FakeClock, until

CONFIG = {
    "filter": {"type": "FromWorkflow", "status": ["waiting-for-manual-authorization", "canceled"]},
    "queue": {"visibilityTimeoutInSeconds": 240, "MessageRetentionPeriodInSeconds": 345600},
}


def queue(clock: FakeClock) -> FeedQueue:
    q = FeedQueue(random.Random(1), clock)
    q.visibility_timeout_s = 30
    return q


def test_each_delivery_gets_a_new_handle_and_comes_back_after_the_visibility_timeout() -> None:
    """An uncommitted item is invisible for the timeout, then redelivered with another handle."""
    clock = FakeClock()
    q = queue(clock)
    q.put({"eventId": "E1"})
    [first] = q.receive(10, short=False, duplicate_rate=0)
    assert q.receive(10, short=False, duplicate_rate=0) == []
    clock.now += 31
    [second] = q.receive(10, short=False, duplicate_rate=0)
    assert first["eventId"] == second["eventId"] and first["handle"] != second["handle"]
    assert q.delete(second["handle"])
    clock.now += 31
    assert q.receive(10, short=False, duplicate_rate=0) == []


def test_duplicates_and_short_batches_happen() -> None:
    """At-least-once: an in-flight item can be delivered again; a batch can be short or empty."""
    clock = FakeClock()
    q = queue(clock)
    for i in range(30):
        q.put({"eventId": f"E{i}"})
    sizes = set()
    dup_seen = False
    seen: set[str] = set()
    for _ in range(40):
        batch = q.receive(10, short=True, duplicate_rate=0.5)
        sizes.add(len(batch))
        for item in batch:
            dup_seen |= item["eventId"] in seen
            seen.add(item["eventId"])
    assert dup_seen
    assert 0 in sizes and any(0 < s < 10 for s in sizes)


def test_no_ordering() -> None:
    """Items do not come back in the order they were put."""
    clock = FakeClock()
    q = queue(clock)
    for i in range(10):
        q.put({"eventId": f"E{i}"})
    batch = q.receive(10, short=False, duplicate_rate=0)
    assert [b["eventId"] for b in batch] != [f"E{i}" for i in range(10)]


def test_retention_drops_old_items() -> None:
    """Items never committed expire after the retention period."""
    clock = FakeClock()
    q = queue(clock)
    q.retention_s = 100
    q.put({"eventId": "E1"})
    clock.now += 101
    assert q.receive(10, short=False, duplicate_rate=0) == []
    assert q.expired == 1


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (CONFIG, 200),
        ({"filter": CONFIG["filter"]}, 400),
        ({**CONFIG, "filter": {"type": "FromWorkflow", "status": []}}, 400),
        ({**CONFIG, "filter": {"type": "FromWorkflow", "status": ["x"], "expression": "a"}}, 409),
        ({**CONFIG, "filter": {"type": "FromOrders", "expression": 'status = "x"'}}, 400),
        ({**CONFIG, "queue": {"visibilityTimeoutInSeconds": 240, "MessageRetentionPeriodInSeconds": 100}}, 400),
        ({**CONFIG, "queue": {"visibilityTimeoutInSeconds": 240, "messageRetentionPeriodInSeconds": 345600}}, 400),
    ],
)
def test_feed_config_rules(body: Any, status: int) -> None:
    """The feed configuration is checked as VTEX documents it (409 for mixed filter kinds)."""
    assert validate_feed_config(body)[1] == status


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    s = Simulator(seed=5, step_delay_s=0.01)
    s.faults.notify_delay_s = (0.0, 0.01)
    await s.start()
    yield s
    await s.stop()


def headers(sim: Simulator) -> dict[str, str]:
    return {
        "X-VTEX-API-AppKey": sim.app_key,
        "X-VTEX-API-AppToken": sim.app_token,
        "Accept": "application/json",
        "Content-Type": "application/json",
    }


async def test_feed_is_404_until_configured_and_then_only_gets_new_changes(sim: Simulator) -> None:
    """No config: 404. A new feed receives only changes made after it is configured."""
    async with aiohttp.ClientSession(headers=headers(sim)) as s:
        async with s.get(f"{sim.base_url}/api/orders/feed", params={"maxlot": "10"}) as r:
            assert r.status == 404
        order = sim.create("S1", held=True, decision=None)
        await until(lambda: order.status == "waiting-for-manual-authorization")
        async with s.post(f"{sim.base_url}/api/orders/feed/config", json=CONFIG) as r:
            assert r.status == 200
        assert not sim.queue.messages
        sim.reject(order.order_id)
        await until(lambda: order.status == "canceled")
        states = [m.body["state"] for m in sim.queue.messages.values()]
        assert states == ["canceled"]  # `cancel` is outside the filter; nothing from before


async def test_requests_are_checked_against_the_contract(sim: Simulator) -> None:
    """Missing maxlot, maxlot > 10, missing headers and bad approval bodies are refused and recorded."""
    sim.feed_config = {
        "filter": {"type": "FromWorkflow", "status": ["x"]},
        "queue": {"visibilityTimeoutInSeconds": 240},
    }
    async with aiohttp.ClientSession() as s:
        h = headers(sim)
        async with s.get(f"{sim.base_url}/api/orders/feed", headers=h) as r:
            assert r.status == 400
        async with s.get(f"{sim.base_url}/api/orders/feed", params={"maxlot": "11"}, headers=h) as r:
            assert r.status == 400
        no_accept = {k: v for k, v in h.items() if k != "Accept"}
        async with s.get(f"{sim.base_url}/api/orders/feed", params={"maxlot": "1"}, headers=no_accept) as r:
            assert r.status == 400
        body = {
            "marketplaceOrderId": "1",
            "marketplaceOrderStatus": "APPROVED",
            "connectorName": "c",
            "connectorEndpoint": "http://x",
        }
        async with s.put(f"{sim.base_url}/api/order-integration/orders/status", json=body, headers=h) as r:
            assert r.status == 400
        wrong = {**h, "X-VTEX-API-AppToken": "nope"}
        async with s.get(f"{sim.base_url}/api/oms/pvt/orders/x", headers=wrong) as r:
            assert r.status == 401
    assert len(sim.protocol_errors) == 4


async def test_approval_results_arrive_by_notification(sim: Simulator) -> None:
    """PUT answers SOI003; the result comes later to connectorEndpoint: EOI011 while held,
    SOI002 once authorized, EOI009 when already approved or canceled, EOI008 when unknown."""
    received: list[dict[str, Any]] = []
    from aiohttp import web

    async def sink(request: web.Request) -> web.Response:
        assert request.query["an"] == sim.account
        received.append(await request.json())
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/cb/order-integration/notification/processing-result", sink)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    endpoint = f"http://127.0.0.1:{port}/cb"
    order = sim.create("N1", held=True, decision=None)
    await until(lambda: order.status == "waiting-for-manual-authorization")

    async def put(mkt: str) -> dict[str, Any]:
        body = {
            "marketplaceOrderId": mkt,
            "marketplaceOrderStatus": "approved",
            "connectorName": "c",
            "connectorEndpoint": endpoint,
        }
        async with (
            aiohttp.ClientSession() as s,
            s.put(
                f"{sim.base_url}/api/order-integration/orders/status",
                params={"an": sim.account},
                json=body,
                headers=headers(sim),
            ) as r,
        ):
            return await r.json()  # type: ignore[no-any-return]

    try:
        assert (await put("N1"))["code"] == "SOI003"
        await until(lambda: len(received) == 1)
        sim.authorize(order.order_id)
        await put("N1")
        await until(lambda: len(received) == 2)
        await until(lambda: order.status == "ready-for-handling")
        await put("N1")
        await put("unknown")
        await until(lambda: len(received) == 4)
    finally:
        await runner.cleanup()
    codes = [n["code"] for n in received]
    assert codes[:2] == ["EOI011", "SOI002"]
    assert sorted(codes[2:]) == ["EOI008", "EOI009"]
    assert order.approvals_applied == 1 and order.puts_while_held == 1
    assert {s for s, _ in order.history} <= FILTERABLE  # a FromWorkflow filter can see every change
    assert received[1]["flow"] == "ApproveOrder" and received[1]["success"] is True


async def test_429_carries_retry_after_in_the_configured_form(sim: Simulator) -> None:
    """Rate limiting answers 429 with Retry-After as seconds, an HTTP date, or not at all."""
    sim.faults.rate_429 = 1.0
    seen = {}
    async with aiohttp.ClientSession(headers=headers(sim)) as s:
        for form in ("seconds", "date", "none"):
            sim.faults.retry_after = form
            async with s.get(f"{sim.base_url}/api/oms/pvt/orders/x") as r:
                assert r.status == 429
                seen[form] = r.headers.get("Retry-After")
    assert seen["seconds"] == "1"
    assert seen["date"] is not None and seen["date"].endswith("GMT")
    assert seen["none"] is None


async def test_the_account_limit_is_a_sliding_second_over_every_route(sim: Simulator) -> None:
    """With an account limit, any second holds at most that many admitted requests, whatever the
    route; the next gets 429 with Retry-After (whole seconds until a place frees) and does not
    count against the window."""
    sim.faults.account_limit_per_s = 3
    async with aiohttp.ClientSession(headers=headers(sim)) as s:
        statuses = []
        for path in ("oms/pvt/orders/x", "orders/feed/config", "oms/pvt/orders/y", "orders/feed/config"):
            async with s.get(f"{sim.base_url}/api/{path}") as r:
                statuses.append(r.status)
                retry_after = r.headers.get("Retry-After")
    assert 429 not in statuses[:3] and statuses[3] == 429
    assert retry_after == "1"
    assert sim.account_limited == 1 and sim.rate_limited == 1
    assert len(sim.arrivals) == 4


async def test_held_orders_are_decided_after_a_delay(sim: Simulator) -> None:
    """A held order is authorized (→ release status) or rejected (→ cancel → canceled) later."""
    a = sim.create("H1", held=True, decision="authorize", decide_after_s=0.05)
    r = sim.create("H2", held=True, decision="reject", decide_after_s=0.05)
    await until(lambda: a.status == "waiting-ffmt-authorization" and r.status == "canceled")
    assert [s for s, _ in r.history][-2:] == ["cancel", "canceled"]
    assert a.was_held and r.was_held


def order_in(status: str, *, held: bool = False, authorized: bool = False) -> SimOrder:
    return SimOrder("MKP-1-01", "1", "MKP", status, datetime.now(UTC), held=held, authorized=authorized)


@pytest.mark.parametrize(
    ("status", "held", "code"),
    [
        ("order-accepted", False, "SOI002"),
        ("waiting-ffmt-authorization", False, "SOI002"),
        ("waiting-ffmt-authorization", True, "EOI011"),  # divergent, not yet authorized
        ("waiting-for-manual-authorization", False, "EOI011"),
        ("order-created", False, "EOI008"),
        ("cancel", False, "EOI009"),
        ("canceled", True, "EOI009"),  # rejected divergence: canceled, not waiting for the seller
        ("authorize-fulfillment", False, "EOI009"),
        ("ready-for-handling", False, "EOI009"),
        ("invoiced", False, "EOI009"),
        ("replaced", False, "EOI009"),
        ("payment-pending", False, "EOI009"),  # a marketplace-side status: no approval starts there
    ],
)
def test_approval_result_follows_vtex_status_rules(status: str, held: bool, code: str) -> None:
    """The ApproveOrder result for each status follows the reference's §3.4/§3.5/§4, not omsd's sets."""
    assert Orders(Runtime(1), 0.01).approval_code(order_in(status, held=held)) == code


@pytest.mark.parametrize("status", ["invoiced", "replaced", "canceled", "cancel", "request-cancel"])
def test_final_and_canceling_orders_cannot_be_rejected(status: str) -> None:
    """A seller's reject leaves a final or already canceling order as it is (§4)."""
    orders = Orders(Runtime(1), 0.01)
    order = order_in(status, held=True)
    orders.by_id[order.order_id] = order
    orders.reject(order.order_id)
    assert order.status == status and not order.history


def test_release_status_is_one_of_the_documented_readings() -> None:
    """Where an authorized order goes next is UNCONFIRMED: only the doc's readings are accepted."""
    with pytest.raises(ValueError, match="release_status"):
        Orders(Runtime(1), 0.01).create("R1", release_status="handling")


async def test_omsd_sim_prints_the_credentials_it_accepts(capsys: pytest.CaptureFixture[str]) -> None:
    """`omsd sim` prints its URL, account, AppKey and AppToken when it starts."""
    out: list[str] = []

    def printed() -> bool:
        out.append(capsys.readouterr().out)
        return "X-VTEX-API-AppToken" in "".join(out)

    task = asyncio.create_task(serve("127.0.0.1", 0, seed=1))
    try:
        await until(printed, what="credentials printed")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    text = "".join(out)
    assert "http://127.0.0.1:" in text and "simstore" in text
    assert DEFAULT_APP_KEY in text and DEFAULT_APP_TOKEN in text
