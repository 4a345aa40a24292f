"""The effect runner on a real store, against a recording fake VTEX client."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from omsd.daemon.config.settings import Settings
from omsd.daemon.ops.metrics import Metrics
from omsd.daemon.pipeline.effects import EffectRunner
from omsd.daemon.pipeline.processor import Processor
from omsd.daemon.vtex.budget import Priority
from omsd.daemon.vtex.client import VtexApi
from omsd.daemon.vtex.errors import AuthFailed, NotFound, RateLimited, VtexRejected, VtexUnavailable
from omsd.daemon.vtex.fake import Answer, FakeVtex
from omsd.daemon.vtex.models import ApprovalResponse, OrderSnapshot
from omsd.state.events import (
    ApprovalAnswered,
    ApprovalFailed,
    Event,
    IntentRecorded,
    OrderFetched,
    OrderFetchFailed,
    StatusChanged,
)
from omsd.state.models import Effect, FetchOrder, Inflight, Order, Policy, SendApproval
from omsd.state.statuses import Phase
from omsd.state.store import Batch, NewEntry, Store
from tests.helpers import until
from tests.machine_helpers import FREE, MKT, OID, at, fetched

NOW = datetime(2026, 11, 1, 12, 30, tzinfo=UTC)


def _typed(fake: FakeVtex) -> VtexApi:
    return fake  # mypy checks the fake against the Protocol here


def fetch(order_id: str = OID, seq: int = 5) -> FetchOrder:
    return FetchOrder(order_id=order_id, seq=seq, purpose="pre_approval")


def send(order_id: str = OID, seq: int = 5, mkt: str = MKT) -> SendApproval:
    return SendApproval(order_id=order_id, seq=seq, marketplace_order_id=mkt)


async def queue(store: Store, *effects: Effect) -> None:
    """Put effects in the outbox as the processor would: each order waits for its effect."""
    orders = {
        e.order_id: Order(
            order_id=e.order_id,
            inflight=Inflight(seq=e.seq, kind="fetch" if e.kind == "fetch_order" else "send", purpose="test"),
        )
        for e in effects
    }
    assert len(orders) == len(effects), "one effect per order"
    await store.derived.commit(Batch(offset=0, effects=list(effects), orders=orders), now=NOW)


def rows(store: Store, sql: str) -> list[sqlite3.Row]:
    """Read the database through a second connection, as another process would."""
    conn = sqlite3.connect(store.path)
    conn.row_factory = sqlite3.Row
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


def outbox(store: Store) -> dict[int, str]:
    return {r["id"]: r["state"] for r in rows(store, "SELECT id, state FROM outbox")}


def journaled(store: Store) -> list[sqlite3.Row]:
    return rows(store, "SELECT kind, source, dedup_key, payload FROM journal ORDER BY offset")


def runner(store: Store, fake: FakeVtex, **kw: Any) -> EffectRunner:
    return EffectRunner(store, _typed(fake), clock=lambda: NOW, **kw)


async def run_until(r: EffectRunner, done: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    """Run the runner until `done` holds, then stop it and wait for it to return."""
    stop = asyncio.Event()
    task = asyncio.create_task(r.run(stop, poll_s=0.05))
    try:
        await until(lambda: task.done() or done(), timeout=10, what=what)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


def all_done(store: Store) -> Callable[[], bool]:
    return lambda: all(state == "done" for state in outbox(store).values())


def snapshot(status: str = FREE) -> OrderSnapshot:
    return OrderSnapshot.model_validate(
        {"orderId": OID, "status": status, "marketplaceOrderId": MKT, "lastChange": at(10).isoformat()}
    )


def answer(code: str, http_status: int = 200) -> ApprovalResponse:
    return ApprovalResponse(http_status=http_status, code=code, success=True, message=f"{code} message")


SEEN: dict[str, Any] = {"order_id": OID, "seq": 5}
CASES: list[tuple[str, Effect, Answer, Event]] = [
    (
        "fetch answered",
        fetch(),
        snapshot(),
        OrderFetched(**SEEN, status=FREE, marketplace_order_id=MKT, last_change=at(10), fetched_at=NOW),
    ),
    (
        "fetch 404",
        fetch(),
        NotFound("no such order", 404),
        OrderFetchFailed(**SEEN, error="no such order", not_found=True),
    ),
    ("fetch transient", fetch(), VtexUnavailable("timeout"), OrderFetchFailed(**SEEN, error="timeout", retryable=True)),
    (
        "put answered",
        send(),
        answer("SOI003"),
        ApprovalAnswered(**SEEN, code="SOI003", http_status=200, message="SOI003 message"),
    ),
    ("put rate limited", send(), RateLimited("429", 5.0), ApprovalFailed(**SEEN, error="429", retryable=True)),
    ("put transient", send(), VtexUnavailable("503"), ApprovalFailed(**SEEN, error="503", retryable=True)),
    (
        "put refused",
        send(),
        VtexRejected("400 no code", 400),
        ApprovalFailed(**SEEN, error="400 no code", retryable=False),
    ),
]


@pytest.mark.parametrize(("effect", "outcome", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_each_outcome_is_journaled_as_its_event(
    store: Store, effect: Effect, outcome: Answer, expected: Event
) -> None:
    """Each VTEX outcome of a call becomes one journal event, from source `effect`, and closes the row."""
    fake = FakeVtex()
    fake.orders[OID] = fake.approvals[MKT] = outcome
    await queue(store, effect)
    await run_until(runner(store, fake), all_done(store), "effect finished")
    [row] = journaled(store)
    assert row["source"] == "effect"
    assert row["kind"] == expected.kind
    assert type(expected).model_validate_json(row["payload"]) == expected
    assert len(fake.calls) == 1


async def test_refused_approval_codes_are_counted(store: Store) -> None:
    """A PUT is counted as sent, and an answer other than SOI002/SOI003 as refused by code."""
    fake = FakeVtex()
    fake.approvals[MKT] = answer("EOI011", 400)
    metrics = Metrics()
    await queue(store, send())
    await run_until(runner(store, fake, metrics=metrics), all_done(store), "put answered")
    assert metrics.sample("omsd_approvals_sent_total") == 1
    assert metrics.sample("omsd_approvals_refused_total", code="EOI011") == 1


async def test_each_result_is_journaled_once_under_the_rows_key(store: Store) -> None:
    """Each row's result is journaled exactly once, with dedup key `effect:<row id>`; a
    second run performs nothing again."""
    fake = FakeVtex()
    fake.orders = {f"O{i}": VtexUnavailable("timeout") for i in range(3)}
    fake.approvals[MKT] = answer("SOI003")
    await queue(store, *(fetch(f"O{i}") for i in range(3)), send())
    r = runner(store, fake)
    await run_until(r, all_done(store), "all performed")
    await run_until(r, lambda: True, "a second, idle run")
    keys = [row["dedup_key"] for row in journaled(store)]
    assert sorted(keys) == sorted(f"effect:{i}" for i in outbox(store))
    assert len(fake.calls) == 4


async def test_concurrency_bound_is_respected(store: Store) -> None:
    """No more calls are in flight, or rows claimed, than the concurrency allows."""
    fake = FakeVtex()
    fake.gate = asyncio.Event()
    fake.orders = {f"O{i}": snapshot() for i in range(5)}
    await queue(store, *(fetch(f"O{i}") for i in range(5)))
    stop = asyncio.Event()
    task = asyncio.create_task(runner(store, fake, concurrency=2).run(stop, poll_s=0.05))
    await until(lambda: fake.in_flight == 2, what="two calls in flight")
    assert sorted(outbox(store).values()) == ["pending", "pending", "pending", "started", "started"]
    fake.gate.set()
    await until(all_done(store), what="all performed")
    stop.set()
    await asyncio.wait_for(task, timeout=10)
    assert fake.most_in_flight == 2 and len(fake.calls) == 5


async def test_the_result_is_written_even_when_cancelled_during_the_write(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call whose result is decided is journaled even if the runner is cancelled while writing it."""
    fake = FakeVtex()
    fake.approvals[MKT] = answer("SOI003")
    writing, release = asyncio.Event(), asyncio.Event()
    real_finish = store.outbox.finish

    async def slow_finish(*args: Any, **kw: Any) -> Any:
        writing.set()
        await release.wait()
        return await real_finish(*args, **kw)

    monkeypatch.setattr(store.outbox, "finish", slow_finish)
    await queue(store, send())
    task = asyncio.create_task(runner(store, fake).run(asyncio.Event(), poll_s=0.05))
    await asyncio.wait_for(writing.wait(), timeout=10)
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert list(outbox(store).values()) == ["done"]
    assert [row["kind"] for row in journaled(store)] == ["approval_answered"]


@pytest.mark.parametrize(
    ("effect", "error"),
    [
        (fetch(), AuthFailed("401 refused", 401)),
        (send(), AuthFailed("403 forbidden", 403)),
        (fetch(), RuntimeError("a bug")),
    ],
    ids=["get order refused", "put refused", "unexpected error"],
)
async def test_a_fatal_error_ends_run(store: Store, effect: Effect, error: Exception) -> None:
    """Refused credentials (or any unexpected error) in a call end `run` with that error,
    instead of being lost in an unread task; the row stays `started` for recovery."""
    fake = FakeVtex()
    fake.orders[OID] = fake.approvals[MKT] = error
    await queue(store, effect)
    stop = asyncio.Event()
    with pytest.raises(ExceptionGroup) as raised:
        await asyncio.wait_for(runner(store, fake).run(stop, poll_s=0.05), timeout=10)
    assert raised.value.exceptions == (error,)
    assert list(outbox(store).values()) == ["started"]
    assert journaled(store) == []


async def test_recovery_reruns_a_get_order_and_never_resends_a_put(store: Store) -> None:
    """At start-up a started Get order is queued again; a started PUT is journaled as
    failed with an unknown outcome (source `recovery`, its row's key) and not resent."""
    await queue(store, fetch("O1"), send())
    assert len(await store.outbox.claim(10, now=NOW)) == 2  # a process claimed both, then died
    fake = FakeVtex()
    assert await runner(store, fake).recover() == 2
    assert sorted(outbox(store).values()) == ["done", "pending"]
    [row] = journaled(store)
    assert (row["kind"], row["source"], row["dedup_key"]) == ("approval_failed", "recovery", "effect:2")
    failed = ApprovalFailed(order_id=OID, seq=5, error="interrupted: outcome unknown", retryable=True)
    assert ApprovalFailed.model_validate_json(row["payload"]) == failed
    fake.orders["O1"] = snapshot()
    await run_until(runner(store, fake), all_done(store), "the Get order run again")
    assert fake.calls == [("get_order", "O1")]
    assert await runner(store, fake).recover() == 0


async def test_interrupted_send_is_rechecked_not_resent(store: Store) -> None:
    """A PUT started by a process that died becomes 'outcome unknown' and a Get order re-check."""
    processor = Processor(store, Policy())
    status = StatusChanged(order_id=OID, source="feed", state=FREE, current_change=at(1))
    intent = IntentRecorded(order_id=OID, marketplace_order_id=MKT, source="api")
    await store.journal.append([NewEntry.of(e, source="test", received_at=NOW) for e in (status, intent)], now=NOW)
    await processor.drain()
    [fetch_row] = await store.outbox.claim(10, now=NOW)
    result = fetched(FREE, seq=fetch_row.seq, t=1)
    await store.outbox.finish(fetch_row.id, NewEntry.of(result, source="effect", received_at=NOW), now=NOW)
    await processor.drain()
    [send_row] = await store.outbox.claim(10, now=NOW)
    assert send_row.effect.kind == "send_approval"
    # the process dies here, with the PUT in flight
    assert await runner(store, FakeVtex()).recover() == 1
    await processor.drain()
    order = await store.read.load_order(OID)
    assert order is not None and order.phase == Phase.CHECKING
    [recheck] = await store.outbox.claim(10, now=NOW)  # nothing is resent blindly: a Get order first
    assert isinstance(recheck.effect, FetchOrder)
    assert recheck.effect.purpose == "pre_approval"  # the order is known free: on the release path


def block_get_orders(fake: FakeVtex, orders: int) -> asyncio.Event:
    """Get orders of O0..O{orders-1} that wait (as out a 429 pause) until the event is set; the
    approval of MKT answers SOI003."""
    blocked = asyncio.Event()
    fake.orders = {f"O{i}": snapshot() for i in range(orders)}
    fake.approvals[MKT] = answer("SOI003")
    original = fake.get_order

    async def waiting_get_order(order_id: str, *, priority: Priority = Priority.BACKGROUND) -> OrderSnapshot:
        await blocked.wait()
        return await original(order_id, priority=priority)

    fake.get_order = waiting_get_order  # type: ignore[method-assign]
    return blocked


async def test_default_concurrency_lets_an_approval_pass_get_orders_waiting_for_the_budget(store: Store) -> None:
    """With the default OMSD_EFFECT_CONCURRENCY, an approval queued behind 16 Get orders that
    wait (e.g. out a 429 pause on their route) is still claimed and sent."""
    fake = FakeVtex()
    blocked = block_get_orders(fake, 16)
    await queue(store, *(fetch(f"O{i}") for i in range(16)), send())
    stop = asyncio.Event()
    concurrency = Settings.model_fields["effect_concurrency"].default
    task = asyncio.create_task(runner(store, fake, concurrency=concurrency).run(stop, poll_s=0.05))
    try:
        await until(lambda: ("approve", MKT) in fake.calls, what="the approval sent while Get orders wait")
    finally:
        blocked.set()
        stop.set()
        await asyncio.wait_for(task, timeout=10)


async def test_get_orders_waiting_out_a_pause_never_take_every_slot(store: Store) -> None:
    """More Get orders than slots, all waiting (their route paused by a 429): an approval queued
    behind them is still claimed and sent; a quarter of the slots stays for the other kind."""
    fake = FakeVtex()
    blocked = block_get_orders(fake, 10)
    await queue(store, *(fetch(f"O{i}") for i in range(10)), send())
    stop = asyncio.Event()
    task = asyncio.create_task(runner(store, fake, concurrency=4).run(stop, poll_s=0.05))
    try:
        await until(lambda: ("approve", MKT) in fake.calls, what="the approval sent while Get orders wait")
        assert sum(1 for state in outbox(store).values() if state == "started") == 3  # 3 Get orders of the 4 slots
    finally:
        blocked.set()
        stop.set()
        await asyncio.wait_for(task, timeout=10)


def speculative(order_id: str, seq: int = 5) -> FetchOrder:
    return FetchOrder(order_id=order_id, seq=seq, purpose="speculative")


def started(store: Store) -> list[str]:
    """The orders whose effect is claimed, oldest row first."""
    return [r["order_id"] for r in rows(store, "SELECT order_id FROM outbox WHERE state = 'started' ORDER BY id")]


async def test_claims_go_by_urgency_and_keep_a_reserve_for_what_can_wait(store: Store) -> None:
    """More effects than slots: approval PUTs are claimed first, then the release path's Get
    orders, oldest first, whatever their age against speculative checks; the checks that can wait
    keep their reserve (one slot of eight), so they are late, never starved."""
    fake = FakeVtex()
    fake.gate = asyncio.Event()  # every call stays in flight: what is claimed stays claimed
    later = [speculative(f"S{i}") for i in range(3)]
    checks = [fetch(f"C{i}") for i in range(8)]
    puts = [send(f"P{i}", mkt=f"M{i}") for i in range(2)]
    await queue(store, *later, *checks, *puts)
    stop = asyncio.Event()
    task = asyncio.create_task(runner(store, fake, concurrency=8).run(stop, poll_s=0.05))
    try:
        await until(lambda: fake.in_flight == 8, what="eight calls in flight")
        assert sorted(started(store)) == sorted(["S0", "P0", "P1", "C0", "C1", "C2", "C3", "C4"])
    finally:
        fake.gate.set()
        stop.set()
        await asyncio.wait_for(task, timeout=10)


async def test_a_call_whose_route_is_paused_waits_in_the_outbox(store: Store) -> None:
    """While a 429 pauses Get orders, they are not claimed (they would only hold slots): the
    approval behind them is; once the pause is over they are claimed and performed."""
    fake = FakeVtex()
    fake.orders = {f"O{i}": snapshot() for i in range(3)}
    fake.approvals[MKT] = answer("SOI003")
    fake.paused["get_order"] = 0.2
    await queue(store, *(fetch(f"O{i}") for i in range(3)), send())
    stop = asyncio.Event()
    task = asyncio.create_task(runner(store, fake).run(stop, poll_s=60))
    try:
        await until(lambda: ("approve", MKT) in fake.calls, what="the approval sent")
        assert fake.count("get_order") == 0 and started(store) == []
        del fake.paused["get_order"]  # the pause is over when the runner looks again
        await until(all_done(store), what="the Get orders performed after the pause")
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


async def test_what_can_wait_holds_no_more_than_its_reserve(store: Store) -> None:
    """Speculative checks alone in the outbox hold their reserve of the slots (one of eight),
    no more: claimed, they would wait at the back of the budget while the release path's Get
    orders, coming next, found no slot (as at the start of a backlog, before releases show)."""
    fake = FakeVtex()
    fake.gate = asyncio.Event()
    await queue(store, *(speculative(f"S{i}") for i in range(5)))
    stop = asyncio.Event()
    task = asyncio.create_task(runner(store, fake, concurrency=8).run(stop, poll_s=0.05))
    try:
        await until(lambda: fake.in_flight == 1, what="one speculative check in flight")
        await queue(store, *(fetch(f"C{i}") for i in range(9)))
        # Get orders hold at most three quarters of the slots (six of eight), the check included
        await until(lambda: fake.in_flight == 6, what="the release path's Get orders in five more slots")
        assert sorted(started(store)) == sorted(["S0", *(f"C{i}" for i in range(5))])
    finally:
        fake.gate.set()
        stop.set()
        await asyncio.wait_for(task, timeout=10)
