"""Routing by marketplaceOrderId: one row per case, no store."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from omsd.state.events import IntentReceived, IntentRecorded, NotificationReceived, ResultNotified
from omsd.state.models import Order
from omsd.state.routing import AlreadyParked, Decide, Park, Route, Unrouted, newly_linked, release, route
from tests.machine_helpers import MKT, OID

LINKED = Order(order_id=OID, marketplace_order_id=MKT)


def note(code: str, flow: str = "ApproveOrder", authenticated: bool = True) -> NotificationReceived:
    return NotificationReceived(
        marketplace_order_id=MKT, code=code, flow=flow, operation_id="op-1", message="m", authenticated=authenticated
    )


@dataclass
class Case:
    entry: NotificationReceived | IntentReceived
    linked: Order | None
    parked: bool
    expected: Route


ROUTES = {
    "notification for a linked order is decided for it": Case(
        note("SOI002"),
        LINKED,
        False,
        Decide(
            ResultNotified(
                order_id=OID,
                marketplace_order_id=MKT,
                code="SOI002",
                flow="ApproveOrder",
                operation_id="op-1",
                message="m",
                authenticated=True,
            )
        ),
    ),
    "unauthenticated notification for a linked order reaches no order": Case(
        note("SOI002", authenticated=False), LINKED, False, Unrouted(MKT, "SOI002")
    ),
    "unauthenticated EOI011 without order parks no intent": Case(
        note("EOI011", authenticated=False), None, False, Unrouted(MKT, "EOI011")
    ),
    "linked wins over a parked intent": Case(
        IntentReceived(marketplace_order_id=MKT, source="cli"),
        LINKED,
        True,
        Decide(IntentRecorded(order_id=OID, marketplace_order_id=MKT, source="cli")),
    ),
    "EOI011 approval notification without order parks an intent": Case(
        note("EOI011"), None, False, Park(MKT, "notification")
    ),
    "EOI011 approval notification with an intent parked adds nothing": Case(
        note("EOI011"), None, True, AlreadyParked(MKT)
    ),
    "other approval result without order is unrouted": Case(note("SOI002"), None, False, Unrouted(MKT, "SOI002")),
    "EOI011 of another flow without order is unrouted": Case(
        note("EOI011", flow="PlaceOrder"), None, False, Unrouted(MKT, "EOI011")
    ),
    "intent for a linked order is decided for it": Case(
        IntentReceived(marketplace_order_id=MKT, source="api"),
        LINKED,
        False,
        Decide(IntentRecorded(order_id=OID, marketplace_order_id=MKT, source="api")),
    ),
    "intent without order is parked with its source": Case(
        IntentReceived(marketplace_order_id=MKT, source="api"), None, False, Park(MKT, "api")
    ),
    "intent without order, one parked already, adds nothing": Case(
        IntentReceived(marketplace_order_id=MKT, source="cli"), None, True, AlreadyParked(MKT)
    ),
}


@pytest.mark.parametrize("case", ROUTES.values(), ids=ROUTES.keys())
def test_route(case: Case) -> None:
    """Each entry/knowledge combination routes to exactly one action."""
    assert route(case.entry, case.linked, case.parked) == case.expected


LINKS = {
    "first link": (None, LINKED, MKT),
    "order first seen already linked": (Order(order_id=OID), LINKED, MKT),
    "link known before": (LINKED, LINKED, None),
    "still unlinked": (Order(order_id=OID), Order(order_id=OID), None),
}


@pytest.mark.parametrize(("before", "after", "expected"), LINKS.values(), ids=LINKS.keys())
def test_newly_linked(before: Order | None, after: Order, expected: str | None) -> None:
    """A parked intent is released only by the decision that links the marketplace id."""
    assert newly_linked(before, after) == expected


RELEASES = {"api": "api", "cli": "cli", "notification": "notification", "legacy": "link"}


@pytest.mark.parametrize(("parked_source", "source"), RELEASES.items(), ids=RELEASES.keys())
def test_release(parked_source: str, source: str) -> None:
    """A released intent keeps its parked source; an unknown one is recorded as `link`."""
    assert release(OID, MKT, parked_source) == IntentRecorded(order_id=OID, marketplace_order_id=MKT, source=source)
