"""VTEX's processing-result notification: only the capability URL omsd sent is trusted."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st

from omsd.daemon.config.settings import Settings
from omsd.daemon.http.routes import build_app
from omsd.daemon.ops import logs
from omsd.daemon.tools.check import run_checks
from omsd.sim.server import Simulator
from omsd.state.events import NotificationReceived, ResultNotified, Resync, read_entry
from omsd.state.machine import decide
from omsd.state.models import FetchOrder, Inflight, Order
from omsd.state.statuses import Phase
from omsd.state.store import NewEntry
from tests.api_helpers import api_context
from tests.api_helpers import settings as api_settings
from tests.helpers import API_TOKEN, until
from tests.machine_helpers import MKT, OID, at, order

NOTIFY = "/order-integration/notification/processing-result"
SECRET = "notify-secret-0123456789abcdef"
GOLDEN = Path(__file__).parent / "golden"


def settings(**kw: Any) -> Settings:
    """The routes' settings in feed mode with this module's notify secret."""
    values: dict[str, Any] = {"notify_secret": SECRET, "api_token": None, "hook_secret": None, "source": "feed"}
    return api_settings(**(values | kw))


class _Applied:
    async def wait_for(self, offset: int, timeout_s: float) -> bool:
        return True


async def client_for(store: Any, s: Settings) -> TestClient[Any, Any]:
    ctx = api_context(store, s, _Applied())
    client: TestClient[Any, Any] = TestClient(TestServer(build_app(ctx)))
    await client.start_server()
    return client


def envelope(code: str = "EOI011", mkt: str = "M-9", **kw: Any) -> dict[str, Any]:
    return {
        "marketplaceOrderId": mkt,
        "code": code,
        "flow": "ApproveOrder",
        "success": code.startswith("SOI"),
        "operationId": f"op-{code}-{mkt}",
        "message": "m",
        "accountName": "shop",
    } | kw


async def accepted(store: Any) -> list[dict[str, Any]]:
    """The notifications journaled as accepted (rejected rows left out)."""
    rows = await store.journal.tail(100)
    return [json.loads(r.payload) for r in rows if r.kind == "notification_received"]


# ---- the route --------------------------------------------------------------------------
@pytest.mark.parametrize("path", [NOTIFY, "/api/vtex" + NOTIFY], ids=["root", "endpoint path"])
async def test_bare_route_is_404_and_journals_nothing(store: Any, path: str) -> None:
    """Without the compatibility flag the route VTEX documents, without omsd's secret path, is 404."""
    client = await client_for(store, settings())
    try:
        resp = await client.post(path, params={"an": "shop"}, json=envelope())
        assert resp.status == 404
        assert await store.journal.last_offset() == 0
    finally:
        await client.close()


@pytest.mark.parametrize("key", ["wrong-secret-0123456789abcd", SECRET[:-1] + "X", SECRET + "X", "x"])
async def test_wrong_secret_path_is_404_and_journals_nothing(store: Any, key: str) -> None:
    """A path segment other than the secret answers like an unknown route: 404, nothing kept."""
    client = await client_for(store, settings())
    try:
        resp = await client.post(f"/api/vtex/notify/{key}{NOTIFY}", params={"an": "shop"}, json=envelope())
        assert resp.status == 404
        assert await store.journal.last_offset() == 0
    finally:
        await client.close()


@pytest.mark.parametrize(
    "query", ["", "?an=other", "?an=", "?an=shop&an=shop", "?an=shop&an=other"], ids=lambda q: q or "none"
)
async def test_an_is_required_and_must_be_the_account(store: Any, query: str) -> None:
    """On the secret path, a missing, empty, repeated or foreign `an` is a 400 and is not acted on."""
    client = await client_for(store, settings())
    try:
        resp = await client.post(f"/api/vtex/notify/{SECRET}{NOTIFY}{query}", json=envelope())
        assert resp.status == 400 and "an" in (await resp.json())["error"]
        assert await accepted(store) == []
    finally:
        await client.close()


@pytest.mark.parametrize("prefix", ["", "/api/vtex"], ids=["root", "endpoint path"])
async def test_secret_path_journals_an_authenticated_notification(store: Any, prefix: str) -> None:
    """The secret path (also under the connector endpoint's path) accepts and marks it authenticated."""
    client = await client_for(store, settings())
    try:
        resp = await client.post(f"{prefix}/notify/{SECRET}{NOTIFY}", params={"an": "shop"}, json=envelope())
        assert resp.status == 200
        assert [n["authenticated"] for n in await accepted(store)] == [True]
    finally:
        await client.close()


async def test_compatibility_flag_serves_the_bare_route_unauthenticated(store: Any) -> None:
    """OMSD_NOTIFY_ALLOW_UNAUTHENTICATED=true: the bare route journals, marked unauthenticated."""
    client = await client_for(store, settings(notify_allow_unauthenticated=True))
    try:
        resp = await client.post(NOTIFY, params={"an": "shop"}, json=envelope())
        assert resp.status == 200
        assert [n["authenticated"] for n in await accepted(store)] == [False]
        resp = await client.post(NOTIFY, json=envelope(mkt="M-10"))
        assert resp.status == 400
    finally:
        await client.close()


def test_the_endpoint_sent_to_vtex_carries_the_secret_path() -> None:
    """connectorEndpoint = OMSD_CONNECTOR_ENDPOINT + /notify/<secret>; without a secret set, one
    is derived from the app token (not the token itself) and changes with it."""
    assert settings().notify_endpoint.get_secret_value() == f"https://omsd.example.com/api/vtex/notify/{SECRET}"
    derived = settings(notify_secret=None)
    key = derived.notify_key.get_secret_value()
    assert len(key) >= 32 and "app-token" not in key
    assert derived.notify_endpoint.get_secret_value().endswith(f"/notify/{key}")
    assert settings(notify_secret=None, app_token="another-token-0123456789").notify_key != derived.notify_key


@pytest.mark.parametrize("bad", ["short", "has/slash-0123456789", "has space 0123456789", "q?x=1-0123456789abc"])
def test_a_notify_secret_must_be_long_and_path_safe(bad: str) -> None:
    """OMSD_NOTIFY_SECRET: 16+ characters that need no escaping in a URL path."""
    with pytest.raises(ValueError, match="notify_secret"):
        settings(notify_secret=bad)


def test_settings_repr_hides_the_secret() -> None:
    """repr/str of Settings never show the notification secret, set or derived."""
    for s in (settings(), settings(notify_secret=None)):
        key = s.notify_key.get_secret_value()
        assert key not in repr(s) and key not in str(s) and key not in repr(s.notify_endpoint)


# ---- the machine: forged results act on nothing -----------------------------------------
def notified(code: str, authenticated: bool) -> ResultNotified:
    return ResultNotified(
        order_id=OID, marketplace_order_id=MKT, code=code, flow="ApproveOrder", authenticated=authenticated
    )


MACHINE = {
    "unauthenticated EOI011 makes no intent": (order("tracking"), notified("EOI011", False), "tracking", []),
    "unauthenticated SOI002 closes nothing": (
        order("awaiting_result"),
        notified("SOI002", False),
        "awaiting_result",
        [],
    ),
    "SOI002 with no approval sent: Get order": (
        order("waiting_release"),
        notified("SOI002", True),
        "checking",
        ["speculative"],
    ),
    "SOI002 while retrying: Get order": (order("retry_wait"), notified("SOI002", True), "checking", ["pre_approval"]),
    "SOI002 while a Get order is in flight: it decides": (order("checking"), notified("SOI002", True), "checking", []),
    "SOI002 while sending closes": (order("sending"), notified("SOI002", True), "approved", []),
    "SOI002 awaiting the result closes": (order("awaiting_result"), notified("SOI002", True), "approved", []),
    "authenticated EOI011 makes an intent": (order("tracking"), notified("EOI011", True), "waiting_release", []),
}


@pytest.mark.parametrize(("before", "event", "phase", "fetches"), MACHINE.values(), ids=MACHINE.keys())
def test_notification_edges(before: Order, event: ResultNotified, phase: str, fetches: list[str]) -> None:
    """A notification closes an order only for omsd's own approval, and only when authenticated."""
    decision = decide(before, event, at(30))
    assert decision.order.phase == phase
    assert [e.purpose for e in decision.effects if isinstance(e, FetchOrder)] == fetches
    assert decision.order.sent == before.sent
    if not event.authenticated:
        assert decision.order.intent_source == before.intent_source


@given(
    phase=st.sampled_from(list(Phase)),
    code=st.sampled_from(["SOI001", "SOI002", "SOI003", "EOI000", "EOI008", "EOI009", "EOI011", "X"]),
    flow=st.sampled_from(["ApproveOrder", "PlaceOrder", "Unknown"]),
)
def test_an_unauthenticated_notification_changes_nothing(phase: Phase, code: str, flow: str) -> None:
    """Whatever the order's phase and the code, a notification not by the secret path leaves
    the order as it was and asks for nothing."""
    before = order(phase.value)
    event = ResultNotified(order_id=OID, marketplace_order_id=MKT, code=code, flow=flow, authenticated=False)
    decision = decide(before, event, at(30))
    assert decision.effects == ()
    assert decision.order.model_copy(update={"updated_at": None}) == before.model_copy(update={"updated_at": None})


def test_soi002_for_no_approval_of_omsds_never_closes_with_nothing_sent() -> None:
    """The reported forgery: SOI002 for an order waiting for release, sent=0, does not close it."""
    before = order("waiting_release", inflight=None)
    assert before.sent == 0
    decision = decide(before, notified("SOI002", True), at(30))
    assert decision.order.phase != Phase.APPROVED
    assert decision.order.inflight == Inflight(seq=decision.order.seq, kind="fetch", purpose="speculative")


# ---- the journal: the flag is versioned ---------------------------------------------------
def test_rows_written_before_the_flag_read_as_trusted() -> None:
    """Version 1 rows came from an omsd that acted on every notification: replay keeps that."""
    for line in (GOLDEN / "events-v1.jsonl").read_text().splitlines():
        raw = json.loads(line)
        if raw["kind"] in ("notification_received", "result_notified"):
            entry = read_entry(raw["kind"], 1, line)
            assert isinstance(entry, NotificationReceived | ResultNotified) and entry.authenticated


def test_version_2_rows_are_read_with_their_flag() -> None:
    """The golden rows of version 2 read back with everything they held, the flag (and a
    failure's code) included (fields a later version added come with their defaults)."""
    lines = (GOLDEN / "events-v2.jsonl").read_text().splitlines()
    kinds = ["approval_answered", "approval_failed", "notification_received", "result_notified"]
    assert sorted(json.loads(line)["kind"] for line in lines) == kinds
    for line in lines:
        raw = json.loads(line)
        read = read_entry(raw["kind"], 2, line).model_dump(mode="json")
        assert {k: read[k] for k in raw} == raw
        assert all(read[k] is None for k in read.keys() - raw.keys())
    assert NotificationReceived(marketplace_order_id="m", code="c", flow="f").authenticated is False


def test_version_3_notifications_keep_the_body_as_received() -> None:
    """A version 3 notification row reads back whole: VTEX's body is kept byte for byte."""
    [line] = (GOLDEN / "events-v3.jsonl").read_text().splitlines()
    raw = json.loads(line)
    read = read_entry("notification_received", 3, line)
    assert read.model_dump(mode="json") == raw
    assert isinstance(read, NotificationReceived) and read.body == raw["body"]


# ---- end to end against the simulator ----------------------------------------------------
async def post(url: str, body: dict[str, Any], an: str | None) -> int:
    params = {"an": an} if an else {}
    async with aiohttp.ClientSession() as s, s.post(url, params=params, json=body) as resp:
        return resp.status


async def approve(url: str, mkt: str, order_id: str) -> None:
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    body = {"marketplaceOrderId": mkt, "orderId": order_id}
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/approvals", json=body, headers=headers) as resp:
        assert resp.status == 202


async def _tracked(daemon: Any, order_id: str) -> bool:
    return await load(daemon, order_id) is not None


async def load(daemon: Any, order_id: str) -> Order | None:
    order: Order | None = await daemon.store.read.load_order(order_id)
    return order


async def test_forged_eoi011_on_the_bare_route_never_approves(sim: Simulator, run_daemon: Any) -> None:
    """Compatibility flag on: a forged EOI011 is journaled but makes no intent; the order is
    released later and omsd sends no PUT for it."""
    async with run_daemon(sim, notify_allow_unauthenticated=True) as daemon:
        order_ = sim.create("F1", held=True, decision=None)
        await until(lambda: order_.status == "waiting-for-manual-authorization")
        # Ids are linked lazily; an operator's resync of the tracked order links it.
        await until(lambda: _tracked(daemon, order_.order_id), what="omsd tracks the order")
        now = datetime.now(UTC)
        await daemon.store.journal.append(
            [NewEntry.of(Resync(order_id=order_.order_id, reason="link"), source="operator", received_at=now)], now=now
        )
        daemon.processor.wake.set()
        await until(lambda: _linked(daemon, order_.order_id), what="omsd links the order")
        assert await post(daemon.url + NOTIFY, envelope("EOI011", "F1"), sim.account) == 200
        assert await post(daemon.url + NOTIFY, envelope("EOI011", "F-unknown"), sim.account) == 200
        await until(lambda: _offset_applied(daemon), what="notifications applied")
        sim.authorize(order_.order_id)
        await until(lambda: _status_is_not_held(daemon, order_.order_id), what="omsd sees the release")
        current = await load(daemon, order_.order_id)
        assert current is not None and not current.has_intent and current.phase == Phase.TRACKING
        assert await daemon.store.read.pending_intents() == []
    assert sim.calls.get("put", 0) == 0


@pytest.mark.parametrize("route", ["bare", "secret"])
async def test_forged_soi002_closes_nothing(sim: Simulator, run_daemon: Any, route: str) -> None:
    """SOI002 for an order omsd sent no approval for: not closed (the secret path asks Get
    order instead); omsd still approves it once the seller releases it."""
    async with run_daemon(sim, notify_allow_unauthenticated=True) as daemon:
        order_ = sim.create("S1", held=True, decision=None)
        await until(lambda: order_.status == "waiting-for-manual-authorization")
        await approve(daemon.url, "S1", order_.order_id)
        await until(lambda: _phase(daemon, order_.order_id, Phase.WAITING_RELEASE), what="waiting for release")
        gets = sim.calls.get("get_order", 0)
        url = daemon.settings.notify_endpoint.get_secret_value() + NOTIFY if route == "secret" else daemon.url + NOTIFY
        assert await post(url, envelope("SOI002", "S1"), sim.account) == 200
        await until(lambda: _offset_applied(daemon), what="notification applied")
        if route == "secret":
            await until(lambda: sim.calls.get("get_order", 0) > gets, what="a Get order instead")
            await until(lambda: _phase(daemon, order_.order_id, Phase.WAITING_RELEASE), what="still held")
        current = await load(daemon, order_.order_id)
        assert current is not None and current.phase != Phase.APPROVED and current.sent == 0
        sim.authorize(order_.order_id)
        await until(lambda: _phase(daemon, order_.order_id, Phase.APPROVED), what="approved for real")
    assert order_.approvals_applied == 1


async def test_results_reach_omsd_on_the_secret_path(sim: Simulator, run_daemon: Any) -> None:
    """End to end: the PUT's connectorEndpoint carries the secret path, VTEX's result comes
    there, is journaled as authenticated, and nothing ever reaches the bare route."""
    async with run_daemon(sim) as daemon:
        order_ = sim.create("R1", held=True, decision="authorize", decide_after_s=0.2)
        await until(lambda: order_.status == "waiting-for-manual-authorization")
        await approve(daemon.url, "R1", order_.order_id)
        await until(lambda: _phase(daemon, order_.order_id, Phase.APPROVED))
        await until(lambda: any(n["code"] == "SOI002" for n in sim.notifications_sent))
        await until(lambda: _offset_applied(daemon))
        notes = await accepted(daemon.store)
        assert notes and all(n["authenticated"] for n in notes)
    assert sim.channel.notification_failures == 0 and not sim.protocol_errors


async def test_the_secret_never_reaches_logs_metrics_or_check(sim: Simulator, run_daemon: Any) -> None:
    """Across an approval, wrong paths and the bare route, the secret is in no log line, not in
    /metrics and not in `omsd check`'s output."""
    out = io.StringIO()
    logs.configure("debug", "json", stream=out)
    async with run_daemon(sim) as daemon:
        key = daemon.settings.notify_key.get_secret_value()
        order_ = sim.create("L1", held=False)
        await approve(daemon.url, "L1", order_.order_id)
        await until(lambda: _phase(daemon, order_.order_id, Phase.APPROVED))
        await until(lambda: any(n["code"] == "SOI002" for n in sim.notifications_sent))
        endpoint = daemon.settings.notify_endpoint.get_secret_value()
        assert await post(endpoint + NOTIFY, envelope("SOI002", "L1"), "other") == 400
        assert await post(endpoint + NOTIFY, {"code": 5}, sim.account) == 400
        assert await post(endpoint.replace(key, key[::-1]) + NOTIFY, envelope(), sim.account) == 404
        assert await post(daemon.url + NOTIFY, envelope(), sim.account) == 404
        async with aiohttp.ClientSession() as s, s.get(f"{daemon.url}/metrics") as resp:
            metrics = await resp.text()
        checks = await run_checks(daemon.settings, bind_test=False)
    text = out.getvalue()
    assert "notification_received" in text and "notification_wrong_path" in text and "order_transition" in text
    assert key not in text and key not in metrics
    assert all(key not in r.detail for r in checks)


async def _linked(daemon: Any, order_id: str) -> bool:
    o = await load(daemon, order_id)
    return o is not None and o.marketplace_order_id is not None


async def _status_is_not_held(daemon: Any, order_id: str) -> bool:
    o = await load(daemon, order_id)
    return o is not None and o.status not in (None, "waiting-for-manual-authorization")


async def _phase(daemon: Any, order_id: str, phase: Phase) -> bool:
    o = await load(daemon, order_id)
    return o is not None and o.phase == phase


async def _offset_applied(daemon: Any) -> bool:
    return bool(daemon.processor.offset >= await daemon.store.journal.last_offset())
