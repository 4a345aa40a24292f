"""The pure state machine: one row per edge, plus properties over any interleaving."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omsd.state.events import Event
from omsd.state.machine import backoff_s, decide
from omsd.state.models import FetchOrder, Inflight, Order, Policy, SendApproval, Timer
from omsd.state.statuses import CANCEL_STATUSES, HELD, Phase, Status, is_cancel
from tests.machine_helpers import (
    FREE,
    MKT,
    OID,
    answered,
    at,
    fetch_failed,
    fetched,
    future_status,
    intent,
    link_lookup,
    notified,
    order,
    resync,
    send_failed,
    status,
    timer,
)
from tests.machine_helpers import HELD as HELD_S

POLICY = Policy(max_attempts=4, max_eoi008=2)


@dataclass
class Edge:
    name: str
    before: Order | None
    event: Event
    phase: str
    effects: list[str] = field(default_factory=list)  # "fetch:<purpose>" or "send"
    check: dict[str, Any] = field(default_factory=dict)


def _effects(effects: tuple[Any, ...]) -> list[str]:
    out = []
    for e in effects:
        out.append(f"fetch:{e.purpose}" if isinstance(e, FetchOrder) else "send")
    return out


EDGES = [
    Edge("first sight asks no Get order", None, status("order-created"), "tracking", []),
    Edge("first sight of a held order asks no Get order", None, status(HELD_S), "tracking", [], {"held": True}),
    Edge(
        "resync of an unlinked order looks the link up",
        order("tracking", marketplace_order_id=None, link_checked=False),
        resync(),
        "tracking",
        ["fetch:link"],
    ),
    Edge(
        "resync of an unlinked order with a lookup in flight asks no second one",
        order("tracking", marketplace_order_id=None, inflight=Inflight(seq=5, kind="fetch", purpose="link")),
        resync(),
        "tracking",
    ),
    Edge("resync of a linked order without intent does nothing", order("tracking"), resync(), "tracking"),
    Edge(
        "an intent parked on the derived id: the link is looked up at once",
        order("tracking", marketplace_order_id=None, link_checked=False),
        link_lookup(),
        "tracking",
        ["fetch:link_intent"],
    ),
    Edge(
        "an intent parked on the derived id: it replaces a background lookup still queued",
        order("tracking", marketplace_order_id=None, inflight=Inflight(seq=5, kind="fetch", purpose="link")),
        link_lookup(),
        "tracking",
        ["fetch:link_intent"],
    ),
    Edge(
        "an urgent lookup in flight: nothing more",
        order("tracking", marketplace_order_id=None, inflight=Inflight(seq=5, kind="fetch", purpose="link_intent")),
        link_lookup(),
        "tracking",
    ),
    Edge("a linked order needs no lookup", order("tracking"), link_lookup(), "tracking"),
    Edge(
        "an intent while the urgent lookup of a free order is in flight: that Get order is the check",
        order(
            "tracking",
            status=FREE,
            held=False,
            marketplace_order_id=None,
            inflight=Inflight(seq=5, kind="fetch", purpose="link_intent"),
        ),
        intent(),
        "checking",
        [],
        {"inflight": Inflight(seq=5, kind="fetch", purpose="link_intent")},
    ),
    Edge(
        "the urgent lookup's answer decides the approval",
        order("checking", purpose="link_intent"),
        fetched(FREE, seq=5),
        "sending",
        ["send"],
    ),
    Edge("resync of an order never seen asks nothing", None, resync(), "tracking"),
    Edge(
        "a transient link failure leaves the link to look up again",
        order(
            "tracking",
            marketplace_order_id=None,
            link_checked=False,
            inflight=Inflight(seq=5, kind="fetch", purpose="link"),
        ),
        fetch_failed(5),
        "tracking",
        [],
        {"link_checked": False, "inflight": None},
    ),
    Edge(
        "tracking records held",
        order("tracking", status=FREE, held=False),
        status(HELD_S),
        "tracking",
        [],
        {"held": True, "status": HELD_S},
    ),
    Edge(
        "intent on held order waits",
        order("tracking"),
        intent(),
        "waiting_release",
        [],
        {"timer_reason": "held_recheck"},
    ),
    Edge(
        "intent on free order checks",
        order("tracking", status=FREE, held=False),
        intent(),
        "checking",
        ["fetch:pre_approval"],
    ),
    Edge("intent on unknown order: a speculative check", None, intent(), "checking", ["fetch:speculative"]),
    Edge(
        "a release while a speculative check waits: the check moves to the release path",
        order("checking", status="order-accepted", held=False, purpose="speculative"),
        status(FREE, 10, last_state=HELD_S),
        "checking",
        ["fetch:pre_approval"],
    ),
    Edge(
        "a free status while a speculative check of an unknown order waits: on the release path",
        order("checking", status=None, status_at=None, held=False, purpose="speculative"),
        status(FREE, 10, last_state="order-accepted"),
        "checking",
        ["fetch:pre_approval"],
    ),
    Edge(
        "the event of a status a Get order told first says it left the hold: a release",
        order(
            "waiting_release",
            status="order-accepted",
            status_at=at(10),
            creating_checks=1,
            timer=Timer(token=5, reason="creating_recheck", due_at=at(105)),
        ),
        status("order-accepted", 10, last_state=HELD_S),
        "checking",
        ["fetch:pre_approval"],
        {"released_at": at(10)},
    ),
    Edge(
        "a creation status while a speculative check waits: that check is the one",
        order("checking", status=None, status_at=None, held=False, purpose="speculative"),
        status("order-accepted", 10),
        "checking",
        [],
        {"inflight": Inflight(seq=5, kind="fetch", purpose="speculative")},
    ),
    Edge(
        "the hold shows while a speculative check waits: it waits for the release instead",
        order("checking", status="order-accepted", held=False, purpose="speculative"),
        status(HELD_S, 10),
        "waiting_release",
        [],
        {"inflight": None, "timer_reason": "held_recheck"},
    ),
    Edge(
        "a newer hold while the release's check waits: it waits for the next release instead",
        order("checking", status=FREE, status_at=at(5)),
        status(HELD_S, 10, last_state=FREE),
        "waiting_release",
        [],
        {"inflight": None, "timer_reason": "held_recheck"},
    ),
    Edge(
        "an older hold while the release's check waits: the check goes on",
        order("checking", status=FREE, status_at=at(20)),
        status(HELD_S, 10),
        "checking",
        [],
        {"inflight": Inflight(seq=5, kind="fetch", purpose="pre_approval")},
    ),
    Edge(
        "the hold shows while an intent's link lookup waits: the lookup goes on (it links the intent)",
        order("checking", status=FREE, status_at=at(5), purpose="link_intent"),
        status(HELD_S, 10, last_state=FREE),
        "checking",
        [],
        {"inflight": Inflight(seq=5, kind="fetch", purpose="link_intent")},
    ),
    Edge("release seen: check", order("waiting_release"), status(FREE, 10), "checking", ["fetch:pre_approval"]),
    Edge(
        "older release never moves status back",
        order("waiting_release", status_at=at(20)),
        status(FREE, 10),
        "waiting_release",
        [],
        {"status": HELD_S},
    ),
    Edge("cancel while waiting rejects", order("waiting_release"), status("cancel"), "rejected"),
    Edge("Get order confirms free: send", order("checking"), fetched(FREE), "sending", ["send"]),
    Edge(
        "Get order still held: wait",
        order("checking"),
        fetched(HELD_S),
        "waiting_release",
        [],
        {"timer_reason": "held_recheck"},
    ),
    Edge("Get order canceled: reject", order("checking"), fetched("canceled"), "rejected"),
    Edge("Get order past approval: approved", order("checking"), fetched("ready-for-handling"), "approved"),
    Edge("stale Get order answer ignored", order("checking"), fetched(FREE, seq=4), "checking"),
    Edge("no marketplace id: dead", order("checking", marketplace_order_id=None), fetched(FREE, mkt=None), "dead"),
    Edge(
        "Get order fails: retry later",
        order("checking"),
        fetch_failed(),
        "retry_wait",
        [],
        {"timer_reason": "retry", "attempts": 1},
    ),
    Edge(
        "Get order 404 for an order never seen: re-check later",
        order("checking", status=None, status_at=None, held=False),
        fetch_failed(not_found=True),
        "retry_wait",
        [],
        {"eoi008": 1, "last_code": "EOI008"},
    ),
    Edge(
        "Get order 404 for an order VTEX showed: ask again at once, once",
        order("checking"),
        fetch_failed(not_found=True),
        "checking",
        ["fetch:pre_approval"],
        {"eoi008": 0, "stale_checks": 1},
    ),
    Edge(
        "Get order 404 again for an order VTEX showed: re-check later",
        order("checking", stale_checks=1),
        fetch_failed(not_found=True),
        "retry_wait",
        [],
        {"eoi008": 1},
    ),
    Edge(
        "a newer status ends a wait after a 404",
        order("retry_wait", status=None, status_at=None, held=False, eoi008=1, last_code="EOI008"),
        status("order-created", 10),
        "checking",
        ["fetch:speculative"],
    ),
    Edge(
        "a release ends a wait after EOI008",
        order("retry_wait", status="order-created", eoi008=1, last_code="EOI008", held=False),
        status(FREE, 10, last_state=HELD_S),
        "checking",
        ["fetch:pre_approval"],
        {"timer": None},
    ),
    Edge(
        "a hold ends a wait after a failure: wait for the release instead",
        order("retry_wait", status=FREE, status_at=at(0)),
        status(HELD_S, 10),
        "waiting_release",
        [],
        {"timer_reason": "held_recheck", "attempts": 1},
    ),
    Edge(
        "the same status again keeps the wait",
        order("retry_wait", status=FREE, status_at=at(10)),
        status(FREE, 10),
        "retry_wait",
        [],
        {"timer_reason": "retry"},
    ),
    Edge(
        "EOI008 for a PUT older than the known status: check again at once",
        order("sending", status=FREE, status_at=at(30), sent_on=at(10)),
        answered("EOI008", http_status=400),
        "checking",
        ["fetch:pre_approval"],
        {"eoi008": 1},
    ),
    Edge(
        "SOI003: awaiting result",
        order("sending"),
        answered("SOI003"),
        "awaiting_result",
        [],
        {"timer_reason": "confirm_timeout"},
    ),
    Edge("SOI002 in the answer: approved", order("sending"), answered("SOI002"), "approved"),
    Edge(
        "EOI011 in the answer: wait for release",
        order("sending"),
        answered("EOI011", http_status=400),
        "waiting_release",
        [],
        {"eoi011": 1, "held": True},
    ),
    Edge("EOI009: re-check with Get order", order("sending"), answered("EOI009"), "checking", ["fetch:after_refusal"]),
    Edge("EOI008: re-check later", order("sending"), answered("EOI008"), "retry_wait", [], {"eoi008": 1}),
    Edge("EOI000: backoff", order("sending"), answered("EOI000", http_status=500), "retry_wait", [], {"attempts": 1}),
    Edge("EOI001 with budget spent: dead", order("sending", attempts=3), answered("EOI001"), "dead"),
    Edge(
        "PUT failed, outcome unknown: Get order at once",
        order("sending"),
        send_failed(),
        "checking",
        ["fetch:pre_approval"],
        {"attempts": 1, "timer": None},
    ),
    Edge("second PUT failure in a row: backoff", order("sending", attempts=1), send_failed(), "retry_wait"),
    Edge("refused without code: dead", order("sending"), send_failed(retryable=False), "dead"),
    Edge("SOI002 notification: approved", order("awaiting_result"), notified("SOI002"), "approved"),
    Edge("EOI011 notification: wait", order("awaiting_result"), notified("EOI011"), "waiting_release"),
    Edge(
        "EOI009 notification: re-check",
        order("awaiting_result"),
        notified("EOI009"),
        "checking",
        ["fetch:after_refusal"],
    ),
    Edge("status past approval confirms", order("awaiting_result"), status("authorize-fulfillment"), "approved"),
    Edge(
        "no confirmation in time: re-check",
        order("awaiting_result"),
        timer(reason="confirm_timeout"),
        "checking",
        ["fetch:confirm"],
    ),
    Edge(
        "re-check after timeout still free: resend",
        order("checking", purpose="confirm"),
        fetched(FREE),
        "sending",
        ["send"],
        {"attempts": 1},
    ),
    Edge("retry timer: re-check", order("retry_wait"), timer(), "checking", ["fetch:pre_approval"]),
    Edge("stale timer ignored", order("retry_wait"), timer(token=4), "retry_wait"),
    Edge(
        "after EOI011 a same-time status does not release",
        order("waiting_release", status=FREE, status_at=at(10), await_newer_than=at(10)),
        status(FREE, 10),
        "waiting_release",
    ),
    Edge(
        "after EOI011 a newer free status releases",
        order("waiting_release", status=FREE, status_at=at(10), await_newer_than=at(10)),
        status(FREE, 11),
        "checking",
        ["fetch:pre_approval"],
    ),
    Edge(
        "held re-check timer: check",
        order("waiting_release"),
        timer(reason="held_recheck"),
        "checking",
        ["fetch:speculative"],
    ),
    Edge(
        "EOI011 notification without intent creates one",
        order("tracking"),
        notified("EOI011"),
        "waiting_release",
        [],
        {"intent_source": "notification"},
    ),
    Edge("SOI002 notification without intent is recorded", order("tracking"), notified("SOI002"), "tracking"),
    Edge("approved stays approved", order("approved"), status("canceled"), "approved"),
    Edge("rejected stays rejected", order("rejected"), intent(), "rejected"),
    Edge(
        "resync revives dead", order("dead", attempts=4), resync(), "checking", ["fetch:speculative"], {"attempts": 0}
    ),
    Edge("resync leaves approved alone", order("approved"), resync(), "approved"),
    Edge("intent on canceled order rejects", order("tracking", status="canceled", canceled=True), intent(), "rejected"),
    Edge(
        "intent with another marketplace id refused",
        order("tracking"),
        intent("999"),
        "tracking",
        [],
        {"intent_source": None},
    ),
    Edge("Get order with another marketplace id: dead", order("checking"), fetched(FREE, mkt="999"), "dead"),
    Edge(
        "EOI009 notification while sending applies",
        order("sending"),
        notified("EOI009"),
        "checking",
        ["fetch:after_refusal"],
    ),
    Edge("error notification for an older attempt ignored", order("retry_wait"), notified("EOI000"), "retry_wait"),
    Edge(
        "older canceled still rejects (final in VTEX)",
        order("waiting_release", status_at=at(50)),
        status("canceled", 10),
        "rejected",
    ),
    Edge("EOI008 beyond its budget: dead", order("sending", eoi008=2), answered("EOI008"), "dead"),
    Edge(
        "PlaceOrder results are recorded only",
        order("awaiting_result"),
        notified("EOI011", flow="PlaceOrder"),
        "awaiting_result",
    ),
    # A creation status used to wait a held re-check interval (10 min) per Get order, twice:
    # sending early only costs an EOI008 (not integrated) or EOI011 (held) answer, so the
    # order is now tried after one short creation re-check instead.
    Edge(
        "Get order shows the order still being created: short re-check",
        order("checking"),
        fetched("order-accepted"),
        "waiting_release",
        [],
        {"creating_checks": 1, "timer_reason": "creating_recheck", "await_newer_than": None},
    ),
    Edge(
        "creation re-check timer: check, then try the order",
        order(
            "waiting_release",
            status="order-accepted",
            held=False,
            timer=Timer(token=5, reason="creating_recheck", due_at=at(5)),
        ),
        timer(reason="creating_recheck"),
        "checking",
        ["fetch:speculative"],
        {"creating_overdue": True},
    ),
    Edge(
        "still being created after the short re-check: approve",
        order("checking", creating_checks=1, creating_overdue=True),
        fetched("order-accepted"),
        "sending",
        ["send"],
    ),
    # The status omsd knows may be behind VTEX's (the feed lags up to a poll interval):
    # one Get order at once, before the short re-check, so an order already past its
    # creation is approved at once (was: intent → PUT after the 5 s re-check).
    Edge(
        "intent on an order being created: Get order at once",
        order("tracking", status="order-accepted", held=False),
        intent(),
        "checking",
        ["fetch:speculative"],
    ),
    Edge(
        "intent on an order a Get order found being created: short re-check",
        order("tracking", status="order-accepted", held=False, creating_checks=1),
        intent(),
        "waiting_release",
        [],
        {"timer_reason": "creating_recheck"},
    ),
    Edge(
        "a creation status left from the hold is a release: check at once",
        order("waiting_release"),
        status("order-accepted", 10, last_state=HELD_S),
        "checking",
        ["fetch:pre_approval"],
        {"released_at": at(10)},
    ),
    Edge(
        "a creation status newer than a known hold is a release",
        order("waiting_release"),
        status("order-accepted", 10),
        "checking",
        ["fetch:pre_approval"],
        {"released_at": at(10)},
    ),
    Edge(
        "Get order confirms a release into a creation status: send",
        order("checking", status="order-accepted", status_at=at(10), released_at=at(10)),
        fetched("order-accepted", t=10),
        "sending",
        ["send"],
    ),
    Edge(
        "a cancel status left from the hold is no release",
        order("waiting_release"),
        status("cancel", 10, last_state=HELD_S),
        "rejected",
        [],
        {"released_at": None},
    ),
    Edge(
        "a newer hold forgets the release",
        order("waiting_release", status="order-accepted", status_at=at(10), released_at=at(10)),
        status(HELD_S, 20),
        "waiting_release",
        [],
        {"released_at": None, "timer_reason": "held_recheck"},
    ),
    Edge(
        "after EOI011 a newer creation status releases",
        order("waiting_release", status=FREE, status_at=at(10), await_newer_than=at(10)),
        status("order-accepted", 11),
        "checking",
        ["fetch:pre_approval"],
        {"released_at": at(11)},
    ),
    Edge(
        "Get order older than the known release re-checks at once",
        order("checking", status=FREE, status_at=at(30)),
        fetched(HELD_S, t=20),
        "checking",
        ["fetch:pre_approval"],
        {"stale_checks": 1, "status": FREE},
    ),
    Edge(
        "stale Get orders again: re-check after a short backoff",
        order("checking", status=FREE, status_at=at(30), stale_checks=1),
        fetched(HELD_S, t=20),
        "retry_wait",
        [],
        {"stale_checks": 2, "timer_reason": "retry"},
    ),
    Edge(
        "Get order older than a known hold still waits",
        order("checking", status=HELD_S, status_at=at(30)),
        fetched(FREE, t=20),
        "waiting_release",
        [],
        {"timer_reason": "held_recheck"},
    ),
    Edge(
        "a future-dated status is recorded but not trusted for ordering",
        order("tracking", status=FREE, held=False),
        future_status(HELD_S),
        "tracking",
        [],
        {"status": FREE, "status_at": at(0), "flagged_status": HELD_S, "held": True},
    ),
    Edge(
        "a future-dated status with an intent: Get order decides",
        order("waiting_release", status=FREE, held=True, timer=None),
        future_status(HELD_S),
        "checking",
        ["fetch:pre_approval"],
        {"flagged_status": HELD_S},
    ),
    Edge(
        "a Get order asked after a flagged status settles it",
        order("checking", status=FREE, status_at=at(20), flagged_status=HELD_S, flagged_seq=4),
        fetched(FREE, t=20),
        "sending",
        ["send"],
        {"flagged_status": None},
    ),
    Edge(
        "released after the awaited PUT was decided: check again",
        order("awaiting_result", status=HELD_S, status_at=at(20), sent_on=at(10)),
        status(FREE, 30, last_state=HELD_S),
        "checking",
        ["fetch:confirm"],
        {"released_at": at(30)},
    ),
    # Found by the liveness property: a far-future status flagged meanwhile made the
    # release wait for the confirm timeout (120 s) instead of a Get order.
    Edge(
        "released after the awaited PUT was decided, a flagged status pending: check again",
        order("awaiting_result", status=HELD_S, status_at=at(20), sent_on=at(10), flagged_status=HELD_S, flagged_seq=5),
        status(FREE, 30, last_state=HELD_S),
        "checking",
        ["fetch:confirm"],
        {"released_at": at(30)},
    ),
    Edge(
        "released after the awaited PUT was decided, a flagged status pending: check again",
        order("awaiting_result", status=HELD_S, status_at=at(20), sent_on=at(10), flagged_status=HELD_S, flagged_seq=3),
        status(FREE, 30, last_state=HELD_S),
        "checking",
        ["fetch:confirm"],
        {"released_at": at(30)},
    ),
    Edge(
        "a release the awaited PUT was decided on changes nothing",
        order("awaiting_result", status=FREE, status_at=at(10), released_at=at(10), sent_on=at(10)),
        status("order-accepted", 30, last_state=FREE),
        "awaiting_result",
    ),
    Edge(
        "EOI011 older than the known status: check again",
        order("sending", status=FREE, status_at=at(30), sent_on=at(10)),
        answered("EOI011", http_status=400),
        "checking",
        ["fetch:pre_approval"],
        {"eoi011": 1},
    ),
    Edge(
        "EOI011 notification while a PUT is in flight: the PUT's answer decides",
        order("sending"),
        notified("EOI011"),
        "sending",
    ),
]


@pytest.mark.parametrize("edge", EDGES, ids=[e.name for e in EDGES])
def test_edge(edge: Edge) -> None:
    """Each (phase, event) edge lands in the documented phase with the documented effects."""
    decision = decide(edge.before, edge.event, at(100), POLICY)
    after = decision.order
    assert after.phase == edge.phase, decision.cause
    assert _effects(decision.effects) == edge.effects
    for key, value in edge.check.items():
        if key == "timer_reason":
            assert after.timer is not None and after.timer.reason == value
        else:
            assert getattr(after, key) == value, key


def test_send_carries_marketplace_order_id() -> None:
    """The approval names the marketplace order id, not the VTEX order id."""
    decision = decide(order("checking"), fetched(FREE), at(100), POLICY)
    [effect] = decision.effects
    assert isinstance(effect, SendApproval)
    assert effect.marketplace_order_id == MKT and effect.order_id == OID


def test_backoff_is_capped_jittered_and_deterministic() -> None:
    """Backoff doubles, stays within [50%, 100%] of the capped step, and is a pure function."""
    policy = Policy(retry_base_s=2, retry_cap_s=60)
    for attempt in range(1, 12):
        step = min(60, 2 * 2 ** (attempt - 1))
        value = backoff_s(OID, attempt, policy)
        assert step / 2 <= value <= step
        assert value == backoff_s(OID, attempt, policy)
    assert backoff_s("a", 3, policy) != backoff_s("b", 3, policy)


def test_timers_survive_as_data() -> None:
    """Waiting on a held order sets a held re-check timer at now + held_recheck_s."""
    decision = decide(order("tracking"), intent(), at(100), Policy(held_recheck_s=600))
    assert decision.order.timer is not None
    assert decision.order.timer.due_at == at(700)


def _play(o: Order | None, *events: Event) -> tuple[Order, list[str]]:
    """Apply events one second apart; return the order and every effect asked for."""
    effects: list[str] = []
    for i, event in enumerate(events):
        d = decide(o, event, at(100 + i), POLICY)
        o = d.order
        effects += _effects(d.effects)
    assert o is not None
    return o, effects


def test_stale_get_order_does_not_strand_a_newer_release() -> None:
    """Held, released, re-held, released again: a Get order answered before the last release
    (showing the re-hold) triggers a new Get order, and the approval follows at once."""
    o, effects = _play(order("waiting_release"), status(FREE, 10, last_state=HELD_S))
    assert effects == ["fetch:pre_approval"] and o.inflight is not None
    first = o.inflight.seq
    o, effects = _play(
        o,
        status(HELD_S, 20, last_state=FREE),
        status(FREE, 30, last_state=HELD_S),
        fetched(HELD_S, seq=first, t=20),
    )
    assert o.phase == Phase.CHECKING and effects == ["fetch:pre_approval"], o
    assert o.inflight is not None
    o, effects = _play(o, fetched(FREE, seq=o.inflight.seq, t=30))
    assert o.phase == Phase.SENDING and effects == ["send"]


def test_order_accepted_reading_is_tried_after_one_short_recheck() -> None:
    """A never-held order resting in order-accepted gets its approval after one Get order
    and one short wait."""
    o, effects = _play(None, status("order-created", 1), status("order-accepted", 2, last_state="order-created"))
    o, effects = _play(o, fetched("order-accepted", seq=1, t=2), intent())
    assert o.phase == Phase.CHECKING and effects == ["fetch:speculative"] and o.inflight is not None
    o, effects = _play(o, fetched("order-accepted", seq=o.inflight.seq, t=2))
    assert o.phase == Phase.WAITING_RELEASE and effects == []
    assert o.timer is not None and o.timer.reason == "creating_recheck"
    assert o.timer.due_at == at(100 + POLICY.creating_recheck_s)
    o, effects = _play(o, timer(o.timer.token, "creating_recheck"))
    assert effects == ["fetch:speculative"] and o.inflight is not None
    o, effects = _play(o, fetched("order-accepted", seq=o.inflight.seq, t=2))
    assert o.phase == Phase.SENDING and effects == ["send"]


def test_future_dated_hold_does_not_freeze_the_order() -> None:
    """A held event dated in year 9999, then the real release: the approval is sent."""
    o, _ = _play(order("tracking", status="order-accepted", held=False), future_status(HELD_S), intent())
    assert o.status == "order-accepted" and o.flagged_status == HELD_S
    assert o.inflight is not None
    check = o.inflight.seq
    o, effects = _play(o, status(FREE, 30, last_state=HELD_S), fetched(HELD_S, seq=check, t=25))
    assert o.status == FREE and o.inflight is not None, o
    o, effects = _play(o, fetched(FREE, seq=o.inflight.seq, t=30))
    assert o.phase == Phase.SENDING and effects == ["send"]


def test_future_dated_status_is_flagged_in_the_cause() -> None:
    """The history says which change time was not trusted."""
    d = decide(order("tracking"), future_status(FREE), at(100), POLICY)
    assert "not trusted" in d.cause and "9999" in d.cause


# ---- properties -------------------------------------------------------------------------

STATUSES = [s.value for s in Status] + ["some-future-status"]
WEIGHTED = st.one_of(
    st.sampled_from([HELD.value, "canceled", "cancel", FREE, "ready-for-handling", "order-accepted"]),
    st.sampled_from(STATUSES),
)
CODES = st.sampled_from(["SOI002", "SOI003", "EOI000", "EOI001", "EOI008", "EOI009", "EOI011", "EOI006"])

# One step of the world: ("status", state, t) | ("intent",) | ("result", index, state_or_code)
# | ("fail", index, retryable, not_found) | ("notify", code) | ("timer", token_delta) | ("resync",) | ("lookup",)
# | ("dup",)
STEP = st.one_of(
    st.tuples(st.just("status"), WEIGHTED, st.integers(0, 60)),
    st.tuples(st.just("intent")),
    st.tuples(st.just("result"), st.integers(0, 5), st.one_of(WEIGHTED, CODES)),
    st.tuples(st.just("fail"), st.integers(0, 5), st.booleans(), st.booleans()),
    st.tuples(st.just("notify"), CODES),
    st.tuples(st.just("timer"), st.integers(-1, 0)),
    st.tuples(st.just("resync")),
    st.tuples(st.just("lookup")),
    st.tuples(st.just("dup")),
)


def _approvable_now(o: Order) -> bool:
    return o.status != HELD.value and not is_cancel(_status(o.status)) and not o.canceled


def _status(value: str | None) -> Status | None:
    try:
        return Status(value) if value else None
    except ValueError:
        return None


@settings(max_examples=400, deadline=None)
@given(st.lists(STEP, max_size=40))
def test_never_approves_while_held_or_canceled(steps: list[tuple[Any, ...]]) -> None:
    """No ordering, duplication or interleaving of feed events, intents, effect results,
    notifications and timers yields an approval while the latest status is held or a cancel."""
    o: Order | None = None
    outbox: list[Any] = []  # effects emitted so far, answered in any order (or never)
    history: list[Event] = []
    seen_cancel = False
    for i, step in enumerate(steps):
        now = at(100 + i)
        kind = step[0]
        event: Event | None = None
        if kind == "status":
            event = status(step[1], step[2])
        elif kind == "intent":
            event = intent()
        elif kind in ("result", "fail") and outbox:
            effect = outbox[step[1] % len(outbox)]
            if isinstance(effect, FetchOrder):
                event = (
                    fetched(step[2], seq=effect.seq, t=60) if kind == "result" else fetch_failed(effect.seq, step[3])
                )
            else:
                code = step[2] if kind == "result" and step[2].startswith(("SOI", "EOI")) else "EOI000"
                event = answered(code, seq=effect.seq) if kind == "result" else send_failed(step[2], effect.seq)
        elif kind == "notify":
            event = notified(step[1])
        elif kind == "timer" and o is not None and o.timer is not None:
            event = timer(o.timer.token + step[1], o.timer.reason)
        elif kind == "resync":
            event = resync()
        elif kind == "lookup":
            event = link_lookup()
        elif kind == "dup" and history:
            event = history[-1]
        if event is None:
            continue
        history.append(event)
        before = o
        decision = decide(o, event, now, POLICY)
        o = decision.order
        observed = getattr(event, "state", None) or getattr(event, "status", None)
        seen_cancel = seen_cancel or observed == "canceled"
        for effect in decision.effects:
            outbox.append(effect)
            if isinstance(effect, SendApproval):
                assert _approvable_now(o), f"approval while {o.status}"
                assert o.phase == Phase.SENDING
                assert not seen_cancel
                assert o.has_intent
        if before is not None and before.phase in (Phase.APPROVED, Phase.REJECTED):
            assert o.phase == before.phase, "a closed order never reopens"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(WEIGHTED, st.integers(0, 100)), min_size=1, max_size=20))
def test_status_is_the_latest_by_change_time(events: list[tuple[str, int]]) -> None:
    """Whatever the delivery order, the recorded status is the one with the newest change time."""
    o: Order | None = None
    for state, t in events:
        o = decide(o, status(state, t), at(200), POLICY).order
    assert o is not None
    newest = max(t for _, t in events)
    assert o.status in {s for s, t in events if t == newest}


@settings(max_examples=200, deadline=None)
@given(st.permutations([HELD.value, FREE, "authorize-fulfillment", "ready-for-handling"]))
def test_any_delivery_order_of_the_happy_path_ends_approved(order_of: list[str]) -> None:
    """Feed events in any order, then the check and SOI002: approved exactly once."""
    times = {HELD.value: 1, FREE: 2, "authorize-fulfillment": 3, "ready-for-handling": 4}
    o = decide(None, intent(), at(0), POLICY).order
    sends = 0
    for state in order_of:
        d = decide(o, status(state, times[state]), at(10), POLICY)
        o = d.order
        sends += sum(isinstance(e, SendApproval) for e in d.effects)
    assert o.phase == Phase.APPROVED
    assert sends == 0  # the final status alone proves the approval: nothing to send


def test_cancel_statuses_are_never_approvable() -> None:
    """Every cancel status closes an open intent as rejected."""
    for s in CANCEL_STATUSES:
        d = decide(order("waiting_release"), status(s.value, 30), at(100), POLICY)
        assert d.order.phase == Phase.REJECTED, s


def test_send_guard_is_not_an_assert() -> None:
    """The guard in front of SendApproval survives `python -O`: it raises UnsafeApproval."""
    code = (
        "from datetime import UTC, datetime\n"
        "from omsd.state.machine import _Ctx, UnsafeApproval\n"
        "from omsd.state.models import Order, Policy\n"
        "held = Order(order_id='X', marketplace_order_id='M', status='waiting-for-manual-authorization')\n"
        "ctx = _Ctx(held, datetime.now(UTC), Policy())\n"
        "try:\n    ctx.send()\nexcept UnsafeApproval:\n    print('refused')\n"
        "else:\n    print('sent', ctx.effects)\n"
    )
    proc = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert proc.stdout.strip() == "refused"
