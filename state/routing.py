"""Routing of journal entries that name only a `marketplaceOrderId`.

The machine works per VTEX `orderId`. An approval intent or a processing-result
notification may name only the marketplace's id: `route` turns it into an event
for the linked order, parks the intent until Get order reveals the link, or
records it as unrouted. A notification that did not come by omsd's secret path is
always unrouted: it never makes an intent nor reaches an order. `newly_linked` and `release` turn a parked intent into
an `IntentRecorded` the moment an order learns its marketplace id.

An intent parked on a marketplace id is the connector asking for an approval now, so
finding its order is part of the approval, not background work: `lookup` asks Get order
at once for an order whose VTEX id derives from the parked id (when the intent is
parked, or when such an order is first seen), and `answers_parked` releases the intent
onto the order in the step that applies that Get order's answer, so the answer also
decides the approval.

Pure: the processor looks up the linked order and the parked intents and
performs what these functions return.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .codes import ResultCode
from .events import IntentReceived, IntentRecorded, LinkLookup, NotificationReceived, OrderFetched, ResultNotified
from .models import Order


@dataclass(frozen=True, slots=True)
class Decide:
    """Apply this event to its order."""

    event: ResultNotified | IntentRecorded


@dataclass(frozen=True, slots=True)
class Park:
    """No order is linked yet: keep the intent until one is."""

    marketplace_order_id: str
    source: str


@dataclass(frozen=True, slots=True)
class AlreadyParked:
    """An intent for this marketplace id is parked already: nothing to add."""

    marketplace_order_id: str


@dataclass(frozen=True, slots=True)
class Unrouted:
    """No order is linked and nothing to keep: the entry stays in the journal only."""

    marketplace_order_id: str
    code: str


Route = Decide | Park | AlreadyParked | Unrouted

# A parked intent keeps its source; any other becomes "link" (released by the link).
_RELEASED_AS: dict[str, Literal["api", "cli", "notification"]] = {
    "api": "api",
    "cli": "cli",
    "notification": "notification",
}


def route(entry: NotificationReceived | IntentReceived, linked: Order | None, parked: bool) -> Route:
    """What to do with an entry, given the order linked to its marketplace id (if any)
    and whether an intent for that id is parked already."""
    mkt = entry.marketplace_order_id
    if isinstance(entry, NotificationReceived) and not entry.authenticated:
        # Came by the bare route (compatibility): anyone could have sent it. Kept in the
        # journal for the record; it makes no intent and reaches no order.
        return Unrouted(mkt, entry.code)
    if linked is not None:
        return Decide(_event_for(entry, linked.order_id))
    match entry:
        case NotificationReceived(flow="ApproveOrder", code=ResultCode.HELD):
            source = "notification"  # VTEX holds an approval someone asked for: an intent
        case NotificationReceived():
            return Unrouted(mkt, entry.code)
        case IntentReceived():
            source = entry.source
    return AlreadyParked(mkt) if parked else Park(mkt, source)


def _event_for(entry: NotificationReceived | IntentReceived, order_id: str) -> ResultNotified | IntentRecorded:
    match entry:
        case NotificationReceived():
            return ResultNotified(
                order_id=order_id,
                marketplace_order_id=entry.marketplace_order_id,
                code=entry.code,
                flow=entry.flow,
                operation_id=entry.operation_id,
                message=entry.message,
                authenticated=entry.authenticated,
            )
        case IntentReceived():
            return IntentRecorded(
                order_id=order_id, marketplace_order_id=entry.marketplace_order_id, source=entry.source
            )


def newly_linked(before: Order | None, after: Order) -> str | None:
    """The marketplace id this decision linked to the order, if it linked one just now."""
    if after.marketplace_order_id is None:
        return None
    if before is not None and before.marketplace_order_id is not None:
        return None
    return after.marketplace_order_id


def release(order_id: str, marketplace_order_id: str, parked_source: str) -> IntentRecorded:
    """The parked intent, applied to the order now linked to its marketplace id."""
    source = _RELEASED_AS.get(parked_source, "link")
    return IntentRecorded(order_id=order_id, marketplace_order_id=marketplace_order_id, source=source)


def derived_marketplace_id(order_id: str) -> str | None:
    """`MKP-123-01` -> `123`: the marketplace id VTEX's ids usually derive from (doc §3.6).
    A guess only: Get order tells the real one."""
    head, sep, rest = order_id.partition("-")
    middle, sep2, _ = rest.rpartition("-")
    return middle if sep and sep2 and head and middle else None


def contradiction(order: Order | None, marketplace_order_id: str | None) -> str | None:
    """Why an intent naming this order and this marketplace id is refused: the order is
    known under another marketplace id (VTEX's word, or an earlier intent's). None when it
    is not known to contradict (an order unknown yet, or with no marketplace id: the intent
    links it). Another order under the same marketplace id is no contradiction: VTEX may
    split one marketplace order into several (`-01`, `-02`)."""
    if order is None or marketplace_order_id is None or order.marketplace_order_id is None:
        return None
    if order.marketplace_order_id == marketplace_order_id:
        return None
    return (
        f"orderId {order.order_id} belongs to marketplaceOrderId {order.marketplace_order_id}, "
        f"not {marketplace_order_id}"
    )


def lookup(order: Order | None, marketplace_order_id: str, *, again: bool) -> LinkLookup | None:
    """The urgent link lookup of an order whose id derives from `marketplace_order_id`, on
    which an intent waits parked; None when the order cannot be the one: unknown, linked,
    with an intent of its own, asked already, or (unless `again`: a new intent) looked up
    already (Get order told no marketplace id, or a different one)."""
    if order is None or order.marketplace_order_id is not None or order.has_intent:
        return None
    if order.inflight is not None and order.inflight.purpose == "link_intent":
        return None
    if order.link_checked and not again:
        return None
    return LinkLookup(order_id=order.order_id, marketplace_order_id=marketplace_order_id)


def answers_parked(before: Order | None, event: OrderFetched) -> str | None:
    """The marketplace id a Get order answer links to an order that has none and no intent:
    if an intent waits parked on it, it is released before the answer is applied, so the
    answer (fresh, omsd's own) is the approval's check and no second Get order is needed."""
    if before is None or before.marketplace_order_id is not None or before.has_intent:
        return None
    return event.marketplace_order_id
