"""Outcome events derived as the journal is applied: what each story tells the connector,
and the property that every intent ends in exactly one terminal outcome."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from omsd.state.apply import Applier, View, apply, read
from omsd.state.batch import Batch, JournalRow
from omsd.state.events import (
    AnyEntry,
    ApprovalAnswered,
    ApprovalFailed,
    IntentExpired,
    IntentReceived,
    IntentRecorded,
    NotificationReceived,
    OrderFetched,
    OrderFetchFailed,
    Resync,
    StatusChanged,
    TimerFired,
    current_version,
)
from omsd.state.models import Order, Policy
from omsd.state.outcomes import TERMINAL
from omsd.state.statuses import TERMINAL_PHASES
from tests.machine_helpers import FREE, HELD, MKT, OID, T0, answered, fetched, intent, notified, send_failed, status

POLICY = Policy(max_attempts=3, max_eoi008=2)


def row(n: int, e: AnyEntry) -> JournalRow:
    at = T0 + timedelta(seconds=n)
    return JournalRow(
        n, e.kind, "test", getattr(e, "order_id", None), e.model_dump_json(), None, at, current_version(e.kind)
    )


def run(*entries: AnyEntry, view: View | None = None) -> Batch:
    rows = [row(n, e) for n, e in enumerate(entries, start=1)]
    return apply([(r, read(r)) for r in rows], view or View(), POLICY)


def types(batch: Batch) -> list[str]:
    return [o.type for o in batch.outcomes]


def by_mkt() -> IntentReceived:
    return IntentReceived(marketplace_order_id=MKT, source="api")


def notice(code: str, *, authenticated: bool = True, body: str | None = None) -> NotificationReceived:
    return NotificationReceived(
        marketplace_order_id=MKT, code=code, flow="ApproveOrder", authenticated=authenticated, body=body
    )


# ---- stories ------------------------------------------------------------------------------
def test_an_approval_that_goes_through() -> None:
    """Intent, Get order, PUT enqueued (with VTEX's operation id), SOI002: accepted, sent, confirmed."""
    enqueued = ApprovalAnswered(order_id=OID, seq=2, code="SOI003", http_status=200, operation_id="op-1")
    batch = run(status(FREE, t=1), intent(), fetched(FREE, seq=1, t=2), enqueued, notified("SOI002"))
    assert types(batch) == ["intent.accepted", "approval.sent", "approval.confirmed"]
    sent = batch.outcomes[1]
    assert sent.data["operation_id"] == "op-1" and sent.data["code"] == "SOI003"
    assert {o.order_id for o in batch.outcomes} == {OID} and {o.marketplace_order_id for o in batch.outcomes} == {MKT}


def test_a_canceled_order_ends_its_intent_as_canceled() -> None:
    """A cancel before any approval: the intent ends as intent.canceled, never as sent."""
    assert types(run(status(HELD, t=1), intent(), status("canceled", t=2))) == ["intent.accepted", "intent.canceled"]


def test_a_parked_intent_is_accepted_once_and_linked_without_a_second() -> None:
    """Parked by marketplace id: accepted at once (order unknown); the link applies it without a second accepted."""
    batch = run(by_mkt(), status(HELD, t=1), fetched(HELD, seq=0, t=2))
    assert types(batch) == ["intent.accepted"]
    [accepted] = batch.outcomes
    assert accepted.order_id is None and accepted.marketplace_order_id == MKT and accepted.data["parked"] is True


def test_a_parked_intent_that_expires_ends_as_expired() -> None:
    """Expiry of the parked intent: intent.expired, its subject the marketplace id."""
    batch = run(by_mkt(), IntentExpired(marketplace_order_id=MKT, parked_offset=1, ttl_s=60.0))
    assert types(batch) == ["intent.accepted", "intent.expired"]
    assert batch.outcomes[1].data == {"ttl_s": 60.0, "parked_offset": 1}


def test_vtex_refusing_for_good_is_refused_and_giving_up_is_dead() -> None:
    """EOI009 until the budget is spent: approval.refused with the code; 5xx until it is spent: order.dead."""
    refused = run(
        status(FREE, t=1), intent(), fetched(FREE, seq=1, t=2), answered("EOI009", seq=2),
        fetched(FREE, seq=3, t=3), answered("EOI009", seq=4), fetched(FREE, seq=5, t=4), answered("EOI009", seq=6),
    )  # fmt: skip
    assert types(refused)[-1] == "approval.refused" and refused.outcomes[-1].data["code"] == "EOI009"
    failed = run(status(FREE, t=1), intent(), fetched(FREE, seq=1, t=2), send_failed(seq=2, retryable=False))
    assert types(failed) == ["intent.accepted", "approval.refused"] and failed.outcomes[-1].data["code"] is None
    dead = run(
        status(FREE, t=1), intent(),
        OrderFetchFailed(order_id=OID, seq=1, error="HTTP 503"), TimerFired(order_id=OID, token=2, reason="retry"),
        OrderFetchFailed(order_id=OID, seq=3, error="HTTP 503"), TimerFired(order_id=OID, token=4, reason="retry"),
        OrderFetchFailed(order_id=OID, seq=5, error="HTTP 503"),
    )  # fmt: skip
    assert types(dead) == ["intent.accepted", "order.dead"] and dead.outcomes[-1].data["error"] == "Get order: HTTP 503"


def test_an_authenticated_notification_is_passed_on_with_its_body() -> None:
    """VTEX's result reaches the connector as received (before what omsd makes of it); an unauthenticated one never."""
    body = '{"code":"SOI002","marketplaceOrderId":"123"}'
    order = Order(order_id=OID, marketplace_order_id=MKT, status=FREE, intent_source="api", phase="awaiting_result")
    batch = run(notice("SOI002", body=body), view=View(orders={OID: order}, by_marketplace_id={MKT: order}))
    assert types(batch) == ["vtex.processing_result", "approval.confirmed"]
    assert batch.outcomes[0].data["body"] == body and batch.outcomes[0].order_id == OID
    assert types(run(notice("SOI002", authenticated=False))) == []
    assert types(run(notice("SOI002"))) == ["vtex.processing_result"]  # no order yet: its subject is the marketplace id


def test_outcome_ids_are_stable_and_a_rebuild_derives_none() -> None:
    """Applying the same rows again gives the same ids (the store keeps the first); a replay's rebuild derives none."""
    entries: list[Any] = [status(HELD, t=1), intent(), status("canceled", t=2)]
    assert [o.id for o in run(*entries).outcomes] == [o.id for o in run(*entries).outcomes]
    rebuild = Applier(POLICY, fresh=True)
    for n, e in enumerate(entries, start=1):
        r = row(n, e)
        rebuild.apply(r, read(r))
    assert rebuild.finish().outcomes == []


def test_a_retried_dead_order_that_succeeds_is_confirmed_after_dead() -> None:
    """The one exception: an operator's retry reopens a dead intent, which may then be confirmed."""
    batch = run(
        status(FREE, t=1), intent(), fetched(FREE, seq=1, t=2), send_failed(seq=2, retryable=False),
        Resync(order_id=OID, reason="operator retry"), fetched("handling", seq=3, t=3),
    )  # fmt: skip
    assert types(batch) == ["intent.accepted", "approval.refused", "approval.confirmed"]


# ---- the property ----------------------------------------------------------------------------
STATUSES = ("order-created", "order-accepted", HELD, FREE, "canceled", "handling")
CODES = ("SOI003", "SOI002", "EOI011", "EOI009", "EOI008", "EOI000")


def _step(data: st.DataObject, order: Order | None, parked: dict[str, tuple[str, int]], n: int) -> AnyEntry:
    """One thing that may happen next: VTEX, the connector, omsd's own answers and timers, an operator."""
    flight = order.inflight if order is not None else None
    stale = 1000 + data.draw(st.integers(0, 9))  # an answer to an effect the order no longer waits for
    fetch_seq = flight.seq if flight is not None and flight.kind == "fetch" else stale
    send_seq = flight.seq if flight is not None and flight.kind == "send" else stale
    at = T0 + timedelta(seconds=n + data.draw(st.integers(-3, 3)))
    kind = data.draw(st.sampled_from(("status", "intent", "by_mkt", "fetched", "fetch_failed", "answered",
                                       "failed", "notice", "timer", "expire", "resync")))  # fmt: skip
    match kind:
        case "status":
            return StatusChanged(
                order_id=OID, source="feed", state=data.draw(st.sampled_from(STATUSES)), current_change=at
            )
        case "intent":
            return IntentRecorded(order_id=OID, marketplace_order_id=MKT, source="api")
        case "by_mkt":
            return IntentReceived(marketplace_order_id=MKT, source="cli")
        case "fetched":
            state = data.draw(st.sampled_from(STATUSES))
            return OrderFetched(
                order_id=OID, seq=fetch_seq, status=state, marketplace_order_id=MKT, last_change=at, fetched_at=at
            )
        case "fetch_failed":
            return OrderFetchFailed(order_id=OID, seq=fetch_seq, error="x", not_found=data.draw(st.booleans()))
        case "answered":
            return ApprovalAnswered(order_id=OID, seq=send_seq, code=data.draw(st.sampled_from(CODES)), http_status=200)
        case "failed":
            return ApprovalFailed(order_id=OID, seq=send_seq, error="x", retryable=data.draw(st.booleans()))
        case "notice":
            return notice(data.draw(st.sampled_from(CODES)))
        case "timer":
            token = order.timer.token if order is not None and order.timer is not None else 0
            return TimerFired(order_id=OID, token=token, reason="retry")
        case "expire":
            offset = parked[MKT][1] if MKT in parked else 0
            return IntentExpired(marketplace_order_id=MKT, parked_offset=offset, ttl_s=1.0)
        case _:
            return Resync(order_id=OID, reason="operator retry")


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_every_intent_ends_in_exactly_one_terminal_outcome(data: st.DataObject) -> None:
    """Over any interleaving of VTEX's events, intents (by order id or parked by marketplace id),
    omsd's answers (stale or not), notifications, timers, expiries and operator retries:
    safety, no terminal outcome without an intent and never two for one opening (the
    intent, or an operator's retry of a dead order); liveness, once the order is final (or
    the parked intent expired) its terminal outcome is there."""
    applier = Applier(POLICY)
    n = 0

    def apply_one(entry: AnyEntry) -> None:
        nonlocal n
        n += 1
        r = row(n, entry)
        applier.apply(r, read(r))

    for _ in range(data.draw(st.integers(1, 40))):
        apply_one(_step(data, applier.batch.orders.get(OID), applier.batch.add_pending, n))
    # Then VTEX closes the order and any parked intent expires: every intent must end.
    if MKT in applier.batch.add_pending:
        apply_one(IntentExpired(marketplace_order_id=MKT, parked_offset=applier.batch.add_pending[MKT][1], ttl_s=1.0))
    order = applier.batch.orders.get(OID)
    if order is not None and order.has_intent and order.phase not in TERMINAL_PHASES:
        closing = data.draw(st.sampled_from(("canceled", "handling")))
        apply_one(
            StatusChanged(order_id=OID, source="hook", state=closing, current_change=T0 + timedelta(seconds=n + 10))
        )
    order = applier.batch.orders.get(OID)

    # The order's story as the connector hears it, with an operator's retries of a dead order
    # (which reopen its intent) marked where they happened.
    facts = applier.finish().outcomes
    timeline = [(o.journal_offset, k, o.type) for k, o in enumerate(facts)]  # emitted order within a row
    timeline += [
        (h.journal_offset, -1, "reopened") for h in applier.batch.history if h.from_phase == "dead" != h.to_phase
    ]
    state = "none"  # none: no intent yet; open: an intent waits for its end; ended
    for _, _, kind in sorted(timeline):
        if kind == "intent.accepted":
            state = "open"  # a new intent, or another one for the same order (they end together)
        elif kind == "reopened":
            assert state == "ended"
            state = "open"
        elif kind in TERMINAL:
            assert state == "open", f"{kind} while {state}: a terminal outcome needs an open intent"
            state = "ended"
    if (order is not None and order.has_intent) or MKT in applier.batch.remove_pending:
        assert state == "ended", "the order is final (or its parked intent expired) and its intent has not ended"
