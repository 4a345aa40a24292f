"""The relay: signed POSTs of every outcome, at least once, in order per order, retried on a
schedule, a 410 disabling the endpoint, VTEX's results re-posted as VTEX sent them."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import SecretStr
from standardwebhooks import Webhook

from omsd.daemon.ops.metrics import Metrics
from omsd.daemon.ops.waiting import Watermark
from omsd.daemon.pipeline.processor import Processor
from omsd.daemon.relay import relay as relay_mod
from omsd.daemon.relay.relay import RETRY_AFTER_MAX_S, SCHEDULE, Relay, alarm_name
from omsd.daemon.relay.webhooks import Endpoint, endpoints
from omsd.state.events import AnyEntry, IntentReceived, IntentRecorded, NotificationReceived, StatusChanged
from omsd.state.models import Policy
from omsd.state.store import Store
from tests.helpers import FakeClock, quiet_health, until
from tests.machine_helpers import HELD, MKT, at, status
from tests.store_helpers import NOW, answer_fetch, entry

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # base64 of 24 bytes


@dataclass
class Receiver:
    """The connector's side: records every POST; `answer` decides each status."""

    answer: Callable[[dict[str, Any]], int] = lambda body: 200
    retry_after: str = "100"  # with a 429
    location: str = "/moved"  # with a 3xx
    got: list[tuple[str, dict[str, str], str]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        text = await request.text()
        self.got.append((request.path_qs, dict(request.headers), text))
        body: dict[str, Any] = {}
        if request.path.startswith("/hooks"):
            body = Webhook(SECRET).verify(text, dict(request.headers))
        status = self.answer(body)
        headers = {"Retry-After": self.retry_after} if status == 429 else {}
        if 300 <= status < 400:
            headers["Location"] = self.location
        return web.Response(status=status, headers=headers)

    def bodies(self, path: str = "/hooks") -> list[dict[str, Any]]:
        return [Webhook(SECRET).verify(t, h) for p, h, t in self.got if p.startswith(path)]


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    r = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", r.handle)
    server = TestServer(app)
    await server.start_server()
    try:
        yield r, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@dataclass
class Running:
    relay: Relay
    mark: Watermark
    clock: FakeClock
    metrics: Metrics
    stop: asyncio.Event
    task: asyncio.Task[None]


async def running(store: Store, base: str, *, vtex: bool = False) -> Running:
    mark, clock, metrics, stop = (
        Watermark((await store.outcomes.bounds())[1]),
        FakeClock(NOW),
        Metrics(),
        asyncio.Event(),
    )
    session = aiohttp.ClientSession()
    eps = endpoints(
        relay_url=f"{base}/hooks",
        relay_vtex_url=f"{base}/connector" if vtex else None,
        secret=SecretStr(SECRET),
        account="shop",
    )
    relay = Relay(
        store, eps, session, mark, quiet_health(), metrics, timeout_s=5, concurrency=8, clock=clock.wall,
        jitter=lambda: 0.5, idle_s=0.02,
    )  # fmt: skip

    async def run() -> None:
        try:
            await relay.run(stop)
        finally:
            await session.close()

    task = asyncio.create_task(run())
    await until(lambda: _endpoints(store, len(eps)), what="endpoints registered")
    return Running(relay, mark, clock, metrics, stop, task)


async def _endpoints(store: Store, n: int) -> bool:
    return len(await store.outcomes.endpoints()) == n


async def stopped(r: Running) -> None:
    r.stop.set()
    await asyncio.wait_for(r.task, timeout=10)


async def outcomes(store: Store, mark: Watermark, *events: AnyEntry) -> None:
    await store.journal.append([entry(e) for e in events], now=NOW)
    await Processor(store, Policy(), on_outcomes=mark.advance).drain()


def intent_on(order_id: str, mkt: str, t: float) -> list[AnyEntry]:
    """A held order and its intent, then its cancel: two outcomes for the order."""
    held = StatusChanged(order_id=order_id, source="feed", state=HELD, current_change=at(t))
    wish = IntentRecorded(order_id=order_id, marketplace_order_id=mkt, source="api")
    cancel = StatusChanged(order_id=order_id, source="feed", state="canceled", current_change=at(t + 1))
    return [held, wish, cancel]


async def test_each_outcome_is_a_signed_post_with_a_stable_id(store: Store, receiver: tuple[Receiver, str]) -> None:
    """Standard Webhooks: the receiver verifies the signature; webhook-id is the outcome's id; the body is the event."""
    rec, base = receiver
    r = await running(store, base)
    await outcomes(store, r.mark, *intent_on("A-1-01", "1", 1))
    await until(lambda: len(rec.got) == 2, what="two deliveries")
    await stopped(r)
    bodies = rec.bodies()
    assert [b["type"] for b in bodies] == ["intent.accepted", "intent.canceled"]
    assert [h["webhook-id"] for _, h, _ in rec.got] == [b["id"] for b in bodies]
    assert bodies[0]["seq"] == 1 and bodies[0]["order_id"] == "A-1-01" and "timestamp" in bodies[0]
    assert await store.outcomes.due("webhook", r.clock.wall() + timedelta(days=9), 10) == []  # all acknowledged


async def test_only_published_outcomes_are_pushed(store: Store, receiver: tuple[Receiver, str]) -> None:
    """The relay pushes an outcome only once it is published (the mark passed it), as the pull API shows it."""
    rec, base = receiver
    r = await running(store, base)
    await store.journal.append([entry(e) for e in intent_on("A-1-01", "1", 1)], now=NOW)
    await Processor(store, Policy(), on_outcomes=lambda seq: r.mark.advance(1)).drain()  # 2 committed, 1 published
    await until(lambda: len(rec.got) == 1, what="the published one")
    # Taken in the same turn as the first, the second would be delivered or pending by now.
    assert await store.outcomes.due("webhook", r.clock.wall() + timedelta(days=9), 10) == []
    assert [b["seq"] for b in rec.bodies()] == [1]
    r.mark.advance(2)
    await until(lambda: len(rec.got) == 2, what="the second, once published")
    await stopped(r)


async def test_a_failing_order_waits_alone_and_its_events_keep_their_order(
    store: Store, receiver: tuple[Receiver, str]
) -> None:
    """Order A's first delivery fails: B's go through meanwhile; A's arrive in order once retried."""
    rec, base = receiver
    failing = {"on": True}
    rec.answer = lambda body: 500 if failing["on"] and body.get("order_id") == "A-1-01" else 200
    r = await running(store, base)
    await outcomes(store, r.mark, *intent_on("A-1-01", "1", 1), *intent_on("B-2-01", "2", 1))
    await until(lambda: [b["order_id"] for b in rec.bodies()].count("B-2-01") == 2, what="B delivered")
    assert [(b["order_id"], b["type"]) for b in rec.bodies() if b["order_id"] == "A-1-01"] == [
        ("A-1-01", "intent.accepted")  # tried once; its second waits behind it
    ]
    failing["on"] = False
    r.clock.now += SCHEDULE[0] * 1.2
    await until(lambda: [b["order_id"] for b in rec.bodies()].count("A-1-01") == 3, what="A delivered after its retry")
    await stopped(r)
    a = [b["type"] for b in rec.bodies() if b["order_id"] == "A-1-01"]
    assert a == ["intent.accepted", "intent.accepted", "intent.canceled"]
    assert r.metrics.sample("omsd_relay_deliveries_total", endpoint="webhook", result="retried") == 1


async def test_retry_after_is_a_floor(store: Store, receiver: tuple[Receiver, str]) -> None:
    """A 429 with Retry-After: 100 is not retried before 100 s, whatever the schedule says."""
    rec, base = receiver
    rec.answer = lambda body: 429
    r = await running(store, base)
    await outcomes(store, r.mark, *intent_on("A-1-01", "1", 1))
    await until(lambda: len(rec.got) >= 1, what="a first attempt")
    await stopped(r)
    next_at = await store.outcomes.next_due("webhook")
    assert next_at is not None and next_at >= r.clock.wall() + timedelta(seconds=100)


async def test_410_disables_the_endpoint_until_an_operator_retries(
    store: Store, receiver: tuple[Receiver, str]
) -> None:
    """410 Gone: the endpoint is disabled (alarm, metric), nothing is lost; `retry` enables it again."""
    rec, base = receiver
    rec.answer = lambda body: 410
    r = await running(store, base)
    await outcomes(store, r.mark, *intent_on("A-1-01", "1", 1))
    health = r.relay._health
    await until(lambda: alarm_name("webhook") in health.alarms, what="the alarm")
    assert r.metrics.sample("omsd_relay_endpoint_disabled", endpoint="webhook") == 1
    assert health.problems(True) == [], "the connector's 410 does not make omsd unready"
    tried = len(rec.got)
    rec.answer = lambda body: 200
    await store.outcomes.retry("webhook", r.clock.wall())
    await until(lambda: len(rec.bodies()) >= tried + 2, what="delivered once enabled again")
    await until(lambda: alarm_name("webhook") not in health.alarms, what="the alarm cleared")
    await stopped(r)


async def test_a_delivery_is_given_up_after_the_schedule(store: Store, receiver: tuple[Receiver, str]) -> None:
    """After the last attempt the delivery is kept as failed (the pull API still has the outcome)."""
    rec, base = receiver
    rec.answer = lambda body: 500
    r = await running(store, base)
    await outcomes(store, r.mark, StatusChanged(order_id="A-1-01", source="feed", state=HELD, current_change=at(1)),
                   IntentRecorded(order_id="A-1-01", marketplace_order_id="1", source="api"))  # fmt: skip
    for attempt in range(1, len(SCHEDULE) + 2):
        await until(functools.partial(_made, rec, attempt), what=f"attempt {attempt}")
        r.clock.now += 86400
    await until(lambda: r.metrics.sample("omsd_relay_deliveries_total", endpoint="webhook", result="gave_up") == 1)
    await stopped(r)
    [state] = await store.outcomes.endpoints()
    assert (state.pending, state.failed) == (0, 1)
    assert len(rec.got) == len(SCHEDULE) + 1


async def test_deliveries_survive_a_restart_with_the_same_ids(store: Store, receiver: tuple[Receiver, str]) -> None:
    """Taken but not acknowledged when omsd stops: the next run delivers them, same webhook-id."""
    rec, base = receiver
    rec.answer = lambda body: 503
    first = await running(store, base)
    await outcomes(store, first.mark, *intent_on("A-1-01", "1", 1))
    await until(lambda: len(rec.got) >= 1, what="a refused attempt")
    await stopped(first)
    ids = {h["webhook-id"] for _, h, _ in rec.got}
    rec.answer = lambda body: 200
    second = await running(store, base)
    second.clock.now += 3600
    await until(lambda: len(rec.bodies()) >= 3, what="delivered after the restart")
    await stopped(second)
    assert ids <= {b["id"] for b in rec.bodies()}
    assert [b["type"] for b in rec.bodies()][-2:] == ["intent.accepted", "intent.canceled"]


async def test_vtex_results_are_reposted_as_vtex_sent_them(store: Store, receiver: tuple[Receiver, str]) -> None:
    """The VTEX-compatible endpoint gets each processing result's body unchanged, at the connector's VTEX route."""
    rec, base = receiver
    r = await running(store, base, vtex=True)
    body = '{"accountName":"shop","code":"EOI011","marketplaceOrderId":"9","flow":"ApproveOrder","errors":[]}'
    notice = NotificationReceived(
        marketplace_order_id="9", code="EOI011", flow="ApproveOrder", authenticated=True, body=body
    )
    await outcomes(store, r.mark, notice)
    await until(lambda: any(p.startswith("/connector") for p, _, _ in rec.got), what="re-posted")
    await until(lambda: len(rec.got) == 3, what="and the webhook's two")
    await stopped(r)
    [(path, headers, text)] = [g for g in rec.got if g[0].startswith("/connector")]
    assert path == "/connector/order-integration/notification/processing-result?an=shop" and text == body
    assert "webhook-signature" in headers  # signed too, for a connector that checks
    assert sorted(b["type"] for b in rec.bodies()) == ["intent.accepted", "vtex.processing_result"]


async def _taken_to(store: Store, seq: int) -> bool:
    return [e.cursor for e in await store.outcomes.endpoints()] == [seq]


def _made(rec: Receiver, attempts: int) -> bool:
    return len(rec.got) >= attempts


def test_an_endpoint_never_shows_its_secret() -> None:
    """repr of an endpoint names its url, never the secret."""
    [ep] = endpoints(relay_url="https://c.example/h", relay_vtex_url=None, secret=SecretStr(SECRET), account="a")
    assert SECRET not in repr(ep) and isinstance(ep, Endpoint)


@pytest.mark.parametrize("retry_after", ["1e12", "inf", "Fri, 31 Dec 9999 23:59:59 GMT"])
async def test_a_huge_retry_after_is_capped_and_the_relay_goes_on(
    store: Store, receiver: tuple[Receiver, str], retry_after: str
) -> None:
    """A Retry-After of inf, 1e12 s or the year 9999 waits at most RETRY_AFTER_MAX_S; the relay goes on."""
    rec, base = receiver
    rec.answer, rec.retry_after = (lambda body: 429), retry_after
    r = await running(store, base)
    await outcomes(store, r.mark, *intent_on("A-1-01", "1", 1))
    await until(lambda: r.metrics.sample("omsd_relay_deliveries_total", endpoint="webhook", result="retried") >= 1)
    next_at = await store.outcomes.next_due("webhook")
    assert next_at is not None and next_at <= r.clock.wall() + timedelta(seconds=RETRY_AFTER_MAX_S)
    rec.answer = lambda body: 200
    r.clock.now += RETRY_AFTER_MAX_S
    await until(lambda: len(rec.bodies()) == 3, what="delivered once the capped wait passed")
    assert not r.task.done()
    await stopped(r)


async def test_a_bug_in_one_attempt_is_a_failed_attempt(
    store: Store, receiver: tuple[Receiver, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception in one delivery is that attempt's failure (recorded, retried), not the relay's end."""
    rec, base = receiver
    rec.answer = lambda body: 429

    def broken(value: str | None) -> float:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(relay_mod, "parse_retry_after", broken)
    r = await running(store, base)
    await outcomes(store, r.mark, *intent_on("A-1-01", "1", 1))
    await until(lambda: r.metrics.sample("omsd_relay_deliveries_total", endpoint="webhook", result="retried") >= 1)
    assert not r.task.done()
    rows = await store.db.rows("SELECT last_error FROM relay_deliveries WHERE attempts = 1")
    assert [row["last_error"] for row in rows] == ["ZeroDivisionError: a bug"]
    monkeypatch.undo()
    rec.answer = lambda body: 200
    r.clock.now += SCHEDULE[0] * 1.2
    await until(lambda: len(rec.bodies()) == 3, what="delivered on the next attempt")
    await stopped(r)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_a_failed_attempt_never_followed(
    store: Store, receiver: tuple[Receiver, str], status: int
) -> None:
    """A 3xx is not followed (a 302 would turn the POST into a GET without body, counted as delivered): it fails,
    naming the status and where it pointed."""
    rec, base = receiver
    rec.answer = lambda body: status if body else 200  # to /moved on the same server, which would take anything
    r = await running(store, base)
    await outcomes(store, r.mark, *intent_on("A-1-01", "1", 1))
    await until(lambda: r.metrics.sample("omsd_relay_deliveries_total", endpoint="webhook", result="retried") >= 1)
    await stopped(r)
    assert [p for p, _, _ in rec.got] == ["/hooks"]  # tried once, not followed; the order's next waits behind it
    assert r.metrics.sample("omsd_relay_deliveries_total", endpoint="webhook", result="delivered") == 0
    rows = await store.db.rows("SELECT last_error FROM relay_deliveries WHERE attempts = 1")
    assert [row["last_error"] for row in rows] == [f"HTTP {status}: a redirect to 127.0.0.1 (not followed)"]


async def test_deliveries_whose_event_is_gone_are_dropped_and_reported(
    store: Store, receiver: tuple[Receiver, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deliveries whose outcome an older retention removed (it spared only pending ones) show in the endpoint's
    state; the relay drops them (error line, metric) instead of letting them block their order and the window."""
    monkeypatch.setattr(relay_mod, "WINDOW", 2)
    rec, base = receiver
    await store.outcomes.endpoint("webhook")
    await outcomes(store, Watermark(), *intent_on("A-1-01", "1", 1), *intent_on("B-2-01", "2", 1))  # seqs 1..4
    await store.outcomes.take("webhook", 10, NOW)
    async with store.db.tx() as conn:  # as an older omsd left them: given up, retried, their outcomes pruned
        await conn.execute("DELETE FROM outcomes WHERE seq IN (1, 3)")
    [state] = await store.outcomes.endpoints()
    assert (state.pending, state.orphaned) == (4, 2)
    r = await running(store, base)
    await outcomes(store, r.mark, *intent_on("C-3-01", "3", 1))  # seqs 5, 6: beyond the window of 2
    await until(lambda: len(rec.bodies()) == 4, what="the rest delivered")
    await stopped(r)
    assert sorted(b["seq"] for b in rec.bodies()) == [2, 4, 5, 6]
    assert r.metrics.sample("omsd_relay_deliveries_total", endpoint="webhook", result="dropped") == 2
    [state] = await store.outcomes.endpoints()
    assert (state.pending, state.orphaned) == (0, 0)


async def test_a_parked_intent_and_its_order_are_one_order_for_the_relay(
    store: Store, receiver: tuple[Receiver, str]
) -> None:
    """Deliveries are keyed by marketplace id when known: the intent.accepted of an intent parked by marketplace id
    (no VTEX id yet) holds back its order's later events, so a retried intent.accepted never arrives after them."""
    rec, base = receiver
    refused = {"n": 0}

    def answer(body: dict[str, Any]) -> int:
        if body.get("type") == "intent.accepted" and refused["n"] == 0:
            refused["n"] += 1
            return 500
        return 200

    rec.answer = answer
    r = await running(store, base)
    await outcomes(store, r.mark, IntentReceived(marketplace_order_id=MKT, source="api"))  # parked: order_id None
    await until(lambda: refused["n"] == 1, what="the first attempt of intent.accepted, refused")
    await outcomes(store, r.mark, status(HELD, t=1))
    await answer_fetch(store, HELD, t=2)  # linked: the parked intent applies to the order
    await outcomes(store, r.mark, status("canceled", t=3))
    await until(functools.partial(_taken_to, store, 2), what="intent.canceled taken")
    r.clock.now += SCHEDULE[0] * 1.5
    await until(lambda: len(rec.bodies()) == 3, what="both delivered")
    await stopped(r)
    assert [b["type"] for b in rec.bodies()] == ["intent.accepted", "intent.accepted", "intent.canceled"]
