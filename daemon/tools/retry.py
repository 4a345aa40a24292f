"""`omsd retry`: give a dead (or stuck) order another go, and the rule for which may have one.

A retry is a `Resync` in the journal: the running daemon resets the order's retry budget and
re-checks it with Get order before anything is sent. For an order stuck on an event omsd could
not apply, the daemon first applies that event and the ones held behind it again (in order).
Closed orders (approved, rejected) and orders nobody asked to approve are left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from omsd.state.events import Resync
from omsd.state.models import Order
from omsd.state.statuses import Phase
from omsd.state.store import NewEntry, Store


class NotRetryable(Exception):
    """The order exists but a retry would do nothing; the message says why."""


class UnknownOrder(LookupError):
    pass


def why_not(order: Order) -> str | None:
    """Why `order` may not be retried, or None when it may (a stuck order always may)."""
    if order.stuck is not None:
        return None
    if order.phase in (Phase.APPROVED, Phase.REJECTED):
        return f"{order.order_id} is {order.phase.value}: closed, nothing to retry"
    if not order.has_intent:
        return f"{order.order_id} has no approval intent: nothing to retry (record one with `omsd approve`)"
    return None


async def targets(store: Store, key: str | None, phase: str = Phase.DEAD.value) -> list[Order]:
    """The order `key` names (either id), or every order in `phase` (dead, or stuck) when `key` is None."""
    if key is None:
        return await store.read.list_orders(phase, limit=1_000_000)
    order = await store.read.find_order(key)
    if order is None:
        raise UnknownOrder(key)
    if (why := why_not(order)) is not None:
        raise NotRetryable(why)
    return [order]


async def retry(store: Store, orders: Sequence[Order], now: datetime, reason: str = "operator retry") -> int:
    """Journal one resync per order (one transaction). Returns how many."""
    entries = [
        NewEntry.of(Resync(order_id=o.order_id, reason=reason), source="operator", received_at=now) for o in orders
    ]
    if entries:
        await store.journal.append(entries, now=now)
    return len(entries)
