"""`state.apply`: routing, the machine and supersession over a run of rows, pure; one row per behaviour."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omsd.state.apply import View, apply, needs, read
from omsd.state.batch import Batch, JournalRow
from omsd.state.events import (
    AnyEntry,
    IntentExpired,
    IntentReceived,
    IntentRecorded,
    NotificationReceived,
    StatusChanged,
    current_version,
)
from omsd.state.models import FetchOrder, Inflight, Order, Policy
from omsd.state.routing import derived_marketplace_id
from tests.machine_helpers import FREE, HELD, MKT, OID, T0, at, fetched, intent, order, status

POLICY = Policy()


def rows(*entries: AnyEntry | str) -> list[JournalRow]:
    """Journal rows at offsets 1, 2, ...; a string is a row that does not read (bad JSON)."""
    out = []
    for n, e in enumerate(entries, start=1):
        if isinstance(e, str):
            out.append(JournalRow(n, "status_changed", "feed", OID, e, None, T0))
        else:
            payload = e.model_dump_json()
            out.append(
                JournalRow(n, e.kind, "test", getattr(e, "order_id", None), payload, None, T0, current_version(e.kind))
            )
    return out


def run(*entries: AnyEntry | str, view: View | None = None) -> Batch:
    return apply([(r, read(r)) for r in rows(*entries)], view or View(), POLICY)


def unlinked(**kw: Any) -> Order:
    """An order seen in the feed (released), no marketplace id known, no intent."""
    values: dict[str, Any] = {"marketplace_order_id": None, "link_checked": False, "status": FREE, "held": False}
    return order("tracking", **(values | kw))


def by_mkt(o: Order) -> View:
    return View(orders={o.order_id: o}, by_marketplace_id={MKT: o})


def api_intent() -> IntentReceived:
    return IntentReceived(marketplace_order_id=MKT, source="api")


def held_notice(authenticated: bool = True) -> NotificationReceived:
    return NotificationReceived(
        marketplace_order_id=MKT, code="EOI011", flow="ApproveOrder", authenticated=authenticated
    )


@dataclass
class Case:
    entries: tuple[AnyEntry | str, ...]
    view: View = field(default_factory=View)
    parked: dict[str, tuple[str, int]] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)
    phase: str | None = None  # the order's phase after the batch (None: no order written)
    effects: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    expired: int = 0


CASES: dict[str, Case] = {
    "an intent by marketplace id, no order linked: parked": Case(
        (api_intent(),), parked={MKT: ("api", 1)}, notes=("intent_parked",)
    ),
    "an intent by marketplace id, order linked in the view: applied to it": Case(
        (api_intent(),), view=by_mkt(order(status=FREE, held=False)), phase="checking", effects=("fetch_order",)
    ),
    "an intent parked already: nothing more": Case((api_intent(),), view=View(parked={MKT: ("cli", 7)})),
    "an intent parked earlier in the batch, then its order linked by Get order: released at once": Case(
        (api_intent(), status(HELD, t=1), fetched(HELD, seq=1, t=2)),
        removed={MKT},
        phase="waiting_release",
        notes=("intent_parked", "intent_linked"),
    ),
    "an intent by marketplace id, an unlinked order whose id derives from it: its Get order now": Case(
        (api_intent(),),
        view=View(derived={MKT: unlinked()}),
        parked={MKT: ("api", 1)},
        phase="tracking",
        effects=("fetch_order",),
        notes=("intent_parked",),
    ),
    "an intent by marketplace id, the derived order looked up already: asked again": Case(
        (api_intent(),),
        view=View(derived={MKT: unlinked(link_checked=True)}),
        parked={MKT: ("api", 1)},
        phase="tracking",
        effects=("fetch_order",),
        notes=("intent_parked",),
    ),
    "the first event of an order whose id derives from a parked marketplace id: its Get order now": Case(
        (status(FREE, t=1),), view=View(parked={MKT: ("api", 7)}), phase="tracking", effects=("fetch_order",)
    ),
    "the event of an order looked up already: nothing more": Case(
        (status(FREE, t=1),),
        view=View(orders={OID: unlinked(link_checked=True)}, parked={MKT: ("api", 7)}),
        phase="tracking",
    ),
    "the link Get order names the parked id: the intent first, then the answer sends the approval": Case(
        (fetched(FREE, seq=5, t=2),),
        view=View(
            orders={OID: unlinked(inflight=Inflight(seq=5, kind="fetch", purpose="link_intent"))},
            parked={MKT: ("api", 7)},
        ),
        removed={MKT},
        phase="sending",
        effects=("send_approval",),
        notes=("intent_linked",),
    ),
    "an authenticated EOI011 notification without order: parked as an intent": Case(
        (held_notice(),), parked={MKT: ("notification", 1)}, notes=("intent_parked",)
    ),
    "an unauthenticated notification: unrouted, never an intent": Case(
        (held_notice(authenticated=False),), notes=("notification_unrouted",)
    ),
    "an expiry of the parked intent: dropped": Case(
        (IntentExpired(marketplace_order_id=MKT, parked_offset=7, ttl_s=1.0),),
        view=View(parked={MKT: ("api", 7)}),
        removed={MKT},
        notes=("intent_expired",),
        expired=1,
    ),
    "an intent expired, parked anew, then linked, in one batch: the new one is released": Case(
        (
            api_intent(),
            IntentExpired(marketplace_order_id=MKT, parked_offset=1, ttl_s=1.0),
            api_intent(),
            status(HELD, t=1),
            fetched(HELD, seq=0, t=2),
        ),
        removed={MKT},
        phase="waiting_release",
        effects=("fetch_order",),  # the order's first event asked its link lookup at once (#20)
        notes=("intent_parked", "intent_expired", "intent_parked", "intent_linked"),
        expired=1,
    ),
    "an expiry of an intent parked anew since: nothing": Case(
        (IntentExpired(marketplace_order_id=MKT, parked_offset=3, ttl_s=1.0),), view=View(parked={MKT: ("api", 7)})
    ),
    "a Get order asked, then a cancel in the same batch: the Get order is never written": Case(
        (status(FREE, t=1), intent(), status("canceled", t=2)), phase="rejected"
    ),
    "an intent naming the order under another marketplace id: refused, the order not written": Case(
        (intent(mkt="another"),), view=by_mkt(order(status=FREE, held=False)), notes=("intent_refused",)
    ),
    "a row that does not read: noted, kept, written to the known order's history": Case(
        ("{not json",), view=View(orders={OID: order()}), notes=("journal_entry_unreadable",)
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_apply(case: Case) -> None:
    """Each row of the table: what the batch parks, releases, writes, asks for and notes."""
    batch = run(*case.entries, view=case.view)
    assert batch.add_pending == case.parked
    assert batch.remove_pending == case.removed
    assert (batch.orders[OID].phase if OID in batch.orders else None) == case.phase
    assert tuple(e.kind for e in batch.effects) == case.effects
    assert tuple(n.event for n in batch.notes) == case.notes
    assert batch.expired == case.expired
    assert batch.offset == len(case.entries)


def test_a_rejected_row_is_kept_and_applies_nothing() -> None:
    """A `rejected` journal row (bad input kept for the operator) changes no order."""
    row = JournalRow(1, "rejected", "feed", OID, '{"raw": 1}', "bad", T0)
    batch = apply([(row, read(row))], View(), POLICY)
    assert batch.orders == {} and batch.history == [] and batch.unreadable == []


def test_an_unreadable_row_goes_to_the_history_of_its_order() -> None:
    """The order's history names the row it could not read; the batch lists it as unreadable."""
    batch = run("{not json", view=View(orders={OID: order()}))
    [row] = batch.unreadable
    assert row.journal_offset == 1 and row.order_id == OID
    [history] = batch.history
    assert history.cause.startswith("journal row 1 unreadable")


def test_needs_names_every_id_the_rows_name() -> None:
    """The view must cover the order ids and marketplace ids of every row, routed ones included."""
    entries = [(r, read(r)) for r in rows(api_intent(), status(HELD), fetched(HELD, mkt="999"))]
    assert needs(entries) == ({OID}, {MKT, "999"})
    # a status event names the marketplace id its order's id derives from
    assert needs([(r, read(r)) for r in rows(status(HELD))]) == ({OID}, {MKT})


def test_the_urgent_link_lookup_is_asked_at_the_approvals_purpose() -> None:
    """The Get order asked for an order whose id derives from a parked id is a `link_intent`
    (the effect runner asks it at the approval's priority), not a background `link`."""
    batch = run(api_intent(), view=View(derived={MKT: unlinked()}))
    [effect] = batch.effects
    assert isinstance(effect, FetchOrder) and effect.purpose == "link_intent" and effect.order_id == OID


def test_live_names_the_effect_each_order_waits_for() -> None:
    """`Batch.live` gives the store what to supersede: every pending effect but the one in flight."""
    batch = run(status(FREE, t=1), intent())
    [effect] = batch.effects
    assert batch.live() == {OID: effect.seq}


def test_the_same_rows_over_the_same_view_give_the_same_batch() -> None:
    """Pure: applying twice gives equal batches (a crash before the commit changes nothing)."""
    entries: list[Any] = [api_intent(), status(HELD, t=1), fetched(HELD, seq=0, t=2), status(FREE, t=3)]
    assert run(*entries) == run(*entries)


# ---- applying in batches over the store's views is applying all at once ------------------------

LINKED_IDS = {"MKP-1-01": "1", "MKP-2-01": "2", "SLR-77-09": "3"}  # the last id does not derive from its marketplace id
STATES = ["order-created", "order-accepted", HELD, FREE]


@st.composite
def linking_journal(draw: st.DrawFn) -> list[AnyEntry]:
    """Intents by marketplace id (or both ids), status events and Get order answers, in any order."""
    out: list[AnyEntry] = []
    for n in range(draw(st.integers(1, 25))):
        oid = draw(st.sampled_from(sorted(LINKED_IDS)))
        match draw(st.sampled_from(["intent", "both", "status", "fetched"])):
            case "intent":
                out.append(IntentReceived(marketplace_order_id=LINKED_IDS[oid], source="api"))
            case "both":
                out.append(IntentRecorded(order_id=oid, marketplace_order_id=LINKED_IDS[oid], source="api"))
            case "status":
                out.append(
                    StatusChanged(
                        order_id=oid, source="feed", state=draw(st.sampled_from(STATES)), current_change=at(n)
                    )
                )
            case _:
                state = draw(st.sampled_from(STATES))
                out.append(
                    fetched(state, seq=draw(st.integers(1, 4)), t=n, mkt=LINKED_IDS[oid]).model_copy(
                        update={"order_id": oid}
                    )
                )
    return out


def store_view(orders: dict[str, Order], parked: dict[str, tuple[str, int]], ids: set[str], mkts: set[str]) -> View:
    """What `Queries.view` would read from these rows."""
    linked = {o.marketplace_order_id: o for o in orders.values() if o.marketplace_order_id in mkts}
    derived: dict[str, Order] = {}
    for o in sorted(orders.values(), key=lambda o: o.order_id, reverse=True):  # the smallest id wins
        if o.marketplace_order_id is None and (d := derived_marketplace_id(o.order_id)) in mkts:
            derived[d] = o
    return View(
        orders={k: o for k, o in orders.items() if k in ids},
        by_marketplace_id=linked,
        parked={m: p for m, p in parked.items() if m in mkts},
        derived=derived,
    )


@settings(max_examples=300, deadline=None)
@given(journal=linking_journal(), cuts=st.sets(st.integers(1, 24)))
def test_batches_over_the_stores_views_give_what_one_pass_gives(journal: list[AnyEntry], cuts: set[int]) -> None:
    """The processor applies the journal in batches, each over what the store holds (the derived
    look-up included); a replay applies it in one pass from nothing: the orders and the parked
    intents come out the same."""
    entries = [(r, read(r)) for r in rows(*journal)]
    one_pass = apply(entries, View(), POLICY)
    orders: dict[str, Order] = {}
    parked: dict[str, tuple[str, int]] = {}
    bounds = [0, *sorted(c for c in cuts if c < len(entries)), len(entries)]
    for lo, hi in itertools.pairwise(bounds):
        chunk = entries[lo:hi]
        batch = apply(chunk, store_view(orders, parked, *needs(chunk)), POLICY)
        orders.update(batch.orders)
        for mkt in batch.remove_pending:
            parked.pop(mkt, None)
        parked.update(batch.add_pending)
    assert orders == one_pass.orders
    assert parked == one_pass.add_pending  # from nothing, what is parked at the end
