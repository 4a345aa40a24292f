"""omsd's HTTP routes, each called directly over aiohttp's test server with a real store."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from omsd.daemon.http.common import RejectBudget, order_view
from omsd.daemon.ops.probe import StoreProbe
from omsd.state.models import Order
from omsd.state.statuses import HELD, Phase
from omsd.state.store import Store
from tests.api_helpers import (
    API_TOKEN,
    AUTH,
    BARE_NOTIFY,
    NOTIFY,
    Api,
    envelope,
    hook_headers,
    push,
    settings,
    start,
)
from tests.helpers import FakeClock


@pytest.fixture
async def bare_api(store: Store) -> AsyncIterator[Api]:
    """The routes with the bare (unauthenticated) notification route enabled."""
    a = await start(store, settings(notify_allow_unauthenticated=True))
    try:
        yield a
    finally:
        await a.client.close()


async def call(api: Api, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
    resp = await api.client.request(method, path, json=body, **kw)
    return resp.status, await resp.json()


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": f"Basic {API_TOKEN}"}],
    ids=["missing", "wrong", "not bearer"],
)
async def test_approvals_need_the_bearer_token(api: Api, headers: dict[str, str]) -> None:
    """Without the right bearer token: 401, and the body is neither read nor kept."""
    status, body = await call(api, "POST", "/v1/approvals", {"marketplaceOrderId": "M-1"}, headers=headers)
    assert (status, body) == (401, {"error": "missing or wrong bearer token"})
    assert await api.ctx.store.journal.last_offset() == 0


async def test_approvals_are_refused_without_a_configured_token(store: Store) -> None:
    """With OMSD_API_TOKEN unset, writes are 403 whatever the header says."""
    api = await start(store, settings(api_token=None))
    try:
        status, body = await call(api, "POST", "/v1/approvals", {"marketplaceOrderId": "M-1"}, headers=AUTH)
    finally:
        await api.client.close()
    assert status == 403 and "OMSD_API_TOKEN" in body["error"]


async def test_approvals_bad_json_is_400_and_kept(api: Api) -> None:
    """A body that is not JSON: 400, kept as rejected for an operator."""
    status, body = await call(api, "POST", "/v1/approvals", data="{nope", headers=AUTH)
    assert (status, body) == (400, {"error": "body is not JSON"})
    [kept] = await api.rejected()
    assert kept.source == "api" and kept.reason == "body is not JSON" and kept.payload == json.dumps("{nope")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({}, "marketplaceOrderId: Field required"),
        ({"marketplaceOrderId": ""}, "marketplaceOrderId: String should have at least 1 character"),
        ({"marketplaceOrderId": "M-1", "color": "red"}, "color: Extra inputs are not permitted"),
        (["M-1"], "body: Input should be a valid dictionary or instance of ApprovalRequest"),
    ],
    ids=["missing", "empty", "extra", "list"],
)
async def test_approvals_bad_fields_are_400_and_kept(api: Api, payload: Any, reason: str) -> None:
    """A body with bad fields: 400 naming the field, kept as rejected, nothing else journaled."""
    status, body = await call(api, "POST", "/v1/approvals", payload, headers=AUTH)
    assert (status, body) == (400, {"error": reason})
    [kept] = await api.rejected()
    assert kept.reason == reason
    assert await api.ctx.store.journal.last_offset() == 1 and api.wakes == []


async def test_an_accepted_intent_without_order_id_waits_for_its_link(api: Api) -> None:
    """202 with the offset; the processor is woken and waited for; the intent is parked."""
    api.stub.apply = True
    status, body = await call(api, "POST", "/v1/approvals", {"marketplaceOrderId": "M-1"}, headers=AUTH)
    assert status == 202
    assert body == {"accepted": True, "offset": 1, "applied": True, "waitingForLink": True, "order": None}
    assert api.stub.waited == [1] and len(api.wakes) == 1


async def test_an_accepted_intent_with_order_id_shows_the_order(api: Api) -> None:
    """With the VTEX order id the answer carries the order's view once applied."""
    api.stub.apply = True
    payload = {"marketplaceOrderId": "M-2", "orderId": "V-2-01"}
    status, body = await call(api, "POST", "/v1/approvals", payload, headers=AUTH)
    assert status == 202 and body["applied"] is True and body["waitingForLink"] is False
    assert body["order"]["orderId"] == "V-2-01" and body["order"]["marketplaceOrderId"] == "M-2"
    assert set(body["order"]) >= {"phase", "status", "held", "intent", "approvalsSent", "nextCheckAt", "updatedAt"}


async def test_an_intent_not_applied_in_time_is_still_accepted(api: Api) -> None:
    """When the processor has not caught up, 202 says applied false and no order."""
    status, body = await call(
        api, "POST", "/v1/approvals", {"marketplaceOrderId": "M-3", "orderId": "V-3-01"}, headers=AUTH
    )
    assert status == 202
    assert body == {"accepted": True, "offset": 1, "applied": False, "waitingForLink": False, "order": None}


async def test_a_failing_handler_is_a_500_without_details(api: Api) -> None:
    """An unexpected error becomes a JSON 500 pointing at the log."""
    api.stub.fail = True
    status, body = await call(api, "POST", "/v1/approvals", {"marketplaceOrderId": "M-1"}, headers=AUTH)
    assert (status, body) == (500, {"error": "internal error; see omsd's log"})


async def test_an_oversized_body_is_413_and_kept(api: Api) -> None:
    """A body over 64 KiB: 413, kept as rejected with its size."""
    status, _ = await call(api, "POST", "/v1/approvals", data="x" * 70_000, headers=AUTH)
    assert status == 413
    [kept] = await api.rejected()
    assert kept.reason == "body too large"


async def test_show_order(api: Api) -> None:
    """/v1/orders/{key}: 401 without the token, 404 when unknown, the view by either id."""
    api.stub.apply = True
    await call(api, "POST", "/v1/approvals", {"marketplaceOrderId": "M-4", "orderId": "V-4-01"}, headers=AUTH)
    assert (await call(api, "GET", "/v1/orders/V-4-01"))[0] == 401
    assert await call(api, "GET", "/v1/orders/nope", headers=AUTH) == (404, {"error": "no such order"})
    for key in ("V-4-01", "M-4"):
        status, body = await call(api, "GET", f"/v1/orders/{key}", headers=AUTH)
        assert status == 200 and body["orderId"] == "V-4-01"


async def test_a_parked_intent_is_shown_not_404(api: Api) -> None:
    """/v1/orders/{marketplace id} of an intent that waits for its order: 200 with
    waitingForLink, the view's keys, the intent's source; an unknown id stays 404."""
    api.stub.apply = True
    await call(api, "POST", "/v1/approvals", {"marketplaceOrderId": "M-5"}, headers=AUTH)
    status, body = await call(api, "GET", "/v1/orders/M-5", headers=AUTH)
    assert status == 200 and body["waitingForLink"] is True
    assert body["orderId"] is None and body["marketplaceOrderId"] == "M-5" and body["intent"] == "api"
    assert set(body) >= set(order_view(Order(order_id="V-5-01")) or {})
    assert (await call(api, "GET", "/v1/orders/M-6", headers=AUTH))[0] == 404


@pytest.mark.parametrize(
    ("phase", "held"),
    [("waiting_release", True), ("approved", False), ("rejected", False)],
)
def test_held_is_the_hold_now_and_was_held_the_past(phase: str, held: bool) -> None:
    """An order VTEX holds now is `held`; once authorized and approved (or canceled) it is
    not, and `wasHeld` keeps that it was."""
    order = Order(order_id="V-7-01", status=HELD, held=True, phase=Phase(phase))
    if not held:
        order = order.model_copy(update={"status": "ready-for-handling" if phase == "approved" else HELD})
    view = order_view(order)
    assert view is not None and view["held"] is held and view["wasHeld"] is True


async def test_reads_are_open_without_a_configured_token(store: Store) -> None:
    """With OMSD_API_TOKEN unset, reads need no header."""
    api = await start(store, settings(api_token=None))
    try:
        assert (await call(api, "GET", "/v1/orders/nope"))[0] == 404
        status, body = await call(api, "GET", "/v1/status")
    finally:
        await api.client.close()
    assert status == 200 and "phases" in body and "last_offset" in body


async def test_hook_ping_needs_no_secret_and_journals_nothing(api: Api) -> None:
    """VTEX's ping is answered with pong before any authentication."""
    assert await call(api, "POST", "/vtex/hook", {"hookConfig": "ping"}) == (200, {"hookConfig": "pong"})
    assert await api.ctx.store.journal.last_offset() == 0


@pytest.mark.parametrize("secret", [None, "wrong-secret-0123456789"], ids=["missing", "wrong"])
async def test_hook_without_the_secret_is_401_and_not_kept(api: Api, secret: str | None) -> None:
    """A push without the right secret header: 401 (bad JSON too: the secret is checked
    before the body is read), nothing journaled."""
    status, body = await call(api, "POST", "/vtex/hook", push(), headers=hook_headers(secret))
    assert (status, body) == (401, {"error": "missing or wrong X-Omsd-Hook-Secret header"})
    assert (await call(api, "POST", "/vtex/hook", data="{nope", headers=hook_headers(secret)))[0] == 401
    assert await api.ctx.store.journal.last_offset() == 0


async def test_hook_bad_bodies_are_400_and_kept(api: Api) -> None:
    """An authenticated push that is not JSON or misses fields: 400 with the reason, kept."""
    assert (await call(api, "POST", "/vtex/hook", data="{nope", headers=hook_headers()))[0] == 400
    status, body = await call(api, "POST", "/vtex/hook", push(State="teleported"), headers=hook_headers())
    assert status == 400 and "unknown status" in body["error"]
    assert [r.source for r in await api.rejected()] == ["hook", "hook"]


async def test_hook_from_another_account_is_403_and_kept(api: Api) -> None:
    """A push whose Origin.Account is not ours: 403, kept as rejected."""
    status, body = await call(api, "POST", "/vtex/hook", push(Origin={"Account": "other"}), headers=hook_headers())
    assert status == 403 and "is not this account" in body["error"]
    assert len(await api.rejected()) == 1


async def test_hook_push_is_journaled_once(api: Api) -> None:
    """A good push is journaled and wakes the processor; the same push again is a duplicate."""
    assert await call(api, "POST", "/vtex/hook", push(), headers=hook_headers()) == (
        200,
        {"received": True, "duplicate": False},
    )
    assert await call(api, "POST", "/vtex/hook", push(), headers=hook_headers()) == (
        200,
        {"received": True, "duplicate": True},
    )
    assert len(api.wakes) == 1 and api.ctx.health.last_push_ok is not None


@pytest.mark.parametrize("path", [NOTIFY, "/api/vtex" + NOTIFY], ids=["root", "endpoint path"])
async def test_notification_is_journaled_once_per_operation(api: Api, path: str) -> None:
    """A result notification is journaled (also under the connector endpoint's path); the
    same operation and code again is a duplicate; a refused approval is counted once."""
    path += "?an=shop"
    assert await call(api, "POST", path, envelope()) == (200, {"received": True, "duplicate": False})
    assert await call(api, "POST", path, envelope()) == (200, {"received": True, "duplicate": True})
    assert len(api.wakes) == 2
    refused = api.ctx.metrics.registry.get_sample_value("omsd_approvals_refused_total", {"code": "EOI009"})
    assert refused == 1


async def test_notification_for_another_account_is_400_and_kept(api: Api) -> None:
    """`?an=` naming another account: 400, kept as rejected."""
    status, body = await call(api, "POST", NOTIFY + "?an=other", envelope())
    assert status == 400 and body["error"] == "an='other' is not this account"
    assert [r.source for r in await api.rejected()] == ["notification"]


async def test_notification_bad_envelope_is_400_and_kept(api: Api) -> None:
    """An envelope without its code: 400 naming the field, kept as rejected."""
    status, body = await call(api, "POST", NOTIFY + "?an=shop", {"marketplaceOrderId": "M-6"})
    assert (status, body) == (400, {"error": "code: Field required"})
    assert [r.reason for r in await api.rejected()] == ["code: Field required"]


async def test_healthz_answers(api: Api) -> None:
    """/healthz is 200 as long as the loop answers."""
    assert await call(api, "GET", "/healthz") == (200, {"status": "ok"})


async def test_readyz_lists_problems_until_all_is_confirmed(api: Api) -> None:
    """/readyz is 503 with the reasons, then 200 once configurations and a poll are confirmed."""
    status, body = await call(api, "GET", "/readyz")
    assert status == 503 and body["ready"] is False
    assert "feed configuration not confirmed at VTEX" in body["problems"]
    health = api.ctx.health
    health.feed_config_ok = health.hook_config_ok = True
    health.poll_ok()
    assert await call(api, "GET", "/readyz") == (200, {"ready": True})


async def test_metrics_are_prometheus_text_with_store_gauges(api: Api) -> None:
    """/metrics serves Prometheus text with the journal offset read from the store."""
    await call(api, "POST", "/vtex/hook", push(), headers=hook_headers())
    resp = await api.client.get("/metrics")
    text = await resp.text()
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    assert "omsd_journal_offset 1.0" in text and 'omsd_events_in_total{source="hook"} 1.0' in text


async def test_readers_do_not_write(api: Api) -> None:
    """/metrics never writes; /readyz probes the database at most once a second, however
    many ask (the probe is a real, fsynced write)."""
    metrics = api.ctx.metrics

    def probes() -> float:
        return metrics.sample("omsd_store_probes_total", result="ok") + metrics.sample(
            "omsd_store_probes_total", result="refused"
        )

    clock = FakeClock()
    api.ctx.probe = StoreProbe(api.ctx.store.db, metrics, every_s=5.0, clock=clock)
    for _ in range(20):
        assert (await api.client.get("/metrics")).status == 200
    assert probes() == 0
    for _ in range(50):
        await api.client.get("/readyz")
    assert probes() == 1  # fifty answers within the second, one probe
    clock.now += 1.0
    await api.client.get("/readyz")
    assert probes() == 2


async def raw_call(api: Api, path: str, data: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    resp = await api.client.post(path, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    return resp.status, await resp.json()


ROUTES = [("/v1/approvals", AUTH), ("/vtex/hook", hook_headers()), (NOTIFY, {})]
ROUTE_IDS = ["approvals", "hook", "notification"]
DEEP = b"[" * 5000 + b"]" * 5000


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"marketplaceOrderId": "M-\xff"}', "body is not UTF-8"),
        (b'{"marketplaceOrderId": "M-\xed\xa0\x80"}', "body is not UTF-8"),
        (DEEP, "body nests deeper than 64"),
        (b'{"marketplaceOrderId": "\\ud800", "OrderId": "\\udfff"}', "lone surrogate"),
        (b'{"marketplaceOrderId": NaN}', "body is not JSON"),
        (b'{"a": ' + b"9" * 5000 + b"}", "body is not JSON"),
    ],
    ids=["bad utf-8", "encoded surrogate", "deep nesting", "escaped surrogate", "NaN", "huge int"],
)
@pytest.mark.parametrize(("path", "headers"), ROUTES, ids=ROUTE_IDS)
async def test_malformed_bodies_are_400_with_a_reason(
    api: Api, path: str, headers: dict[str, str], data: bytes, reason: str
) -> None:
    """Bad bytes, deep nesting, surrogates, non-JSON constants: a 400 naming the problem on
    every route (these were 500s), and whatever is kept is valid UTF-8."""
    status, body = await raw_call(api, path, data, headers)
    assert status == 400 and reason in body["error"]
    for row in await api.rejected():
        assert row.payload.encode("utf-8") and json.loads(row.payload) is not None


@pytest.mark.parametrize(("path", "headers"), ROUTES, ids=ROUTE_IDS)
async def test_a_declared_charset_is_ignored_json_is_utf8(api: Api, path: str, headers: dict[str, str]) -> None:
    """An unknown or non-UTF-8 charset in Content-Type was a 500: the body is read as UTF-8."""
    resp = await api.client.post(
        path, data=b"{nope", headers={"Content-Type": "application/json; charset=x-no-such", **headers}
    )
    assert resp.status == 400 and (await resp.json())["error"] == "body is not JSON"


async def test_an_overflowing_change_time_in_a_push_is_400(api: Api) -> None:
    """`0001-01-01T00:00:00+14:00` overflowed when moved to UTC (a 500): now a 400, kept."""
    status, body = await call(
        api, "POST", "/vtex/hook", push(CurrentChange="0001-01-01T00:00:00+14:00"), headers=hook_headers()
    )
    assert status == 400 and "CurrentChange" in body["error"]
    assert [r.source for r in await api.rejected()] == ["hook"]


@pytest.mark.parametrize(
    "payload",
    [
        {"marketplaceOrderId": "M" * 101},
        {"marketplaceOrderId": "M-1", "orderId": "V" * 129},
        {"marketplaceOrderId": "a/b"},
    ],
    ids=["long marketplace id", "long order id", "slash"],
)
async def test_approval_ids_have_a_length_and_a_charset(api: Api, payload: dict[str, str]) -> None:
    """Ids longer than their limit or with characters outside VTEX's shapes: 400."""
    status, _ = await call(api, "POST", "/v1/approvals", payload, headers=AUTH)
    assert status == 400
    assert await api.ctx.store.journal.last_offset() == 1  # only the rejected row


async def test_an_overlong_order_id_push_is_400_and_kept_bounded(api: Api) -> None:
    """A 60,000-character OrderId (accepted, logged on every transition) is refused."""
    status, body = await call(api, "POST", "/vtex/hook", push(OrderId="9" * 60_000), headers=hook_headers())
    assert status == 400 and "OrderId" in body["error"]
    [kept] = await api.rejected()
    assert kept.order_id is None


async def test_show_order_refuses_a_key_that_is_no_id(api: Api) -> None:
    """/v1/orders/{key} with a key no order can have: 400, the store is not asked."""
    status, body = await call(api, "GET", "/v1/orders/" + "x" * 200, headers=AUTH)
    assert status == 400 and "not an order id" in body["error"]


async def test_hook_reads_no_body_before_the_secret(api: Api) -> None:
    """Without the secret only a ping-sized body is looked at: anything else is 401
    whatever it holds (bad JSON, deep nesting), and nothing is kept."""
    for data in (b"{nope", DEEP, json.dumps(push()).encode()):
        assert (await raw_call(api, "/vtex/hook", data))[0] == 401
    assert await raw_call(api, "/vtex/hook", b'{"hookConfig": "ping"}') == (200, {"hookConfig": "pong"})
    assert await api.ctx.store.journal.last_offset() == 0


async def test_unauthenticated_rejects_are_kept_truncated_with_size_and_digest(bare_api: Api) -> None:
    """A rejected notification body on the bare route (no credential) is kept as its first
    2 KB, size and sha256 (a 60 KB body was kept whole) and counted; the reason is kept too."""
    import hashlib

    api = bare_api
    raw = json.dumps({"marketplaceOrderId": "M-1", "pad": "x" * 60_000}).encode()
    assert (await raw_call(api, BARE_NOTIFY, raw))[0] == 400
    bad_utf8 = b"\xff" * 10_000
    assert (await raw_call(api, BARE_NOTIFY, bad_utf8))[0] == 400
    first, second = await api.rejected()
    assert len(first.payload) < 2600 and len(second.payload) < 4000
    summary = json.loads(second.payload)
    assert summary["size"] == 10_000 and summary["sha256"] == hashlib.sha256(bad_utf8).hexdigest()
    assert "base64" in summary and summary["truncated"] is True
    assert json.loads(first.payload)["truncated"] is True and first.reason == "code: Field required"
    assert api.ctx.metrics.sample("omsd_rejected_bodies_truncated_total", source="notification") == 2


async def test_unauthenticated_rejects_are_rate_limited_per_client(bare_api: Api) -> None:
    """Beyond its burst a client's rejected bodies are counted and dropped, not stored;
    the client still gets its 400."""
    api = bare_api
    clock = [0.0]
    api.ctx.reject_budget.clock = lambda: clock[0]
    for n in range(30):
        assert (await raw_call(api, BARE_NOTIFY, b"{nope %d" % n))[0] == 400
    assert len(await api.rejected()) == 20
    assert api.ctx.metrics.sample("omsd_rejected_bodies_dropped_total", source="notification") == 10
    clock[0] += 5.0  # one more token per 5 s
    await raw_call(api, BARE_NOTIFY, b"{nope again")
    await raw_call(api, BARE_NOTIFY, b"{nope and again")
    assert len(await api.rejected()) == 21


def test_the_reject_budget_has_a_ceiling_for_all_clients() -> None:
    """Many clients cannot add up to more than the shared bucket; forgotten clients are bounded."""
    budget = RejectBudget(clock=lambda: 0.0, max_sources=50)
    taken = sum(budget.take(f"10.0.{n // 250}.{n % 250}") for n in range(500))
    assert taken == 100 and len(budget._buckets) == 50


async def test_the_secret_notification_path_keeps_rejected_bodies_whole(api: Api) -> None:
    """A notification on omsd's capability path is authenticated: its rejected body is kept whole."""
    raw = json.dumps({"marketplaceOrderId": "M-1", "pad": "x" * 30_000}).encode()
    assert (await raw_call(api, f"{NOTIFY}?an=shop", raw))[0] == 400
    [kept] = await api.rejected()
    assert json.loads(kept.payload)["pad"] == "x" * 30_000
    assert api.ctx.metrics.sample("omsd_rejected_bodies_truncated_total", source="notification") == 0


async def test_authenticated_rejects_keep_their_body_up_to_64_kb(api: Api) -> None:
    """A rejected /v1 body (bearer token checked) is kept whole, however many."""
    clock = [0.0]
    api.ctx.reject_budget.clock = lambda: clock[0]
    big = {"marketplaceOrderId": "M-1", "pad": "y" * 30_000}
    for _ in range(25):
        assert (await call(api, "POST", "/v1/approvals", big | {"n": _}, headers=AUTH))[0] == 400
    kept = await api.rejected()
    assert len(kept) == 25 and json.loads(kept[0].payload)["pad"] == "y" * 30_000
    assert api.ctx.metrics.sample("omsd_rejected_bodies_truncated_total", source="api") == 0


@pytest.mark.parametrize(("path", "headers"), ROUTES, ids=ROUTE_IDS)
async def test_a_body_that_does_not_decompress_is_400(api: Api, path: str, headers: dict[str, str]) -> None:
    """`Content-Encoding: gzip` with bytes that are not gzip escaped as a 500 with a traceback."""
    resp = await api.client.post(path, data=b"garbage", headers={"Content-Encoding": "gzip", **headers})
    assert resp.status == 400 and "Content-Encoding" in (await resp.json())["error"]
    assert (await call(api, "GET", "/healthz"))[0] == 200


async def test_a_connection_whose_body_did_not_decompress_is_closed(api: Api) -> None:
    """After a ping-sized `gzip` body that is not gzip (read without the secret) the
    connection is closed: kept open, the next request on it never got an answer."""
    import asyncio

    resp = await api.client.post("/vtex/hook", data=b"x" * 10, headers={"Content-Encoding": "gzip"})
    assert resp.status == 401 and resp.headers.get("Connection", "").lower() == "close"
    followup = api.client.post("/vtex/hook", data=b"x" * 10, headers={"Content-Encoding": "gzip", **hook_headers()})
    assert (await asyncio.wait_for(followup, timeout=20)).status == 400
