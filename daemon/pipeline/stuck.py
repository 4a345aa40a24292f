"""Stuck orders: applying again the events of an order stuck on one it could not apply.

When `decide` raises (a bug, a value out of range), `state.apply` marks the order stuck on
that journal row (`Order.stuck`) and holds its later events: nothing is skipped, nothing is
applied out of order, and none of its effects is performed. A retry (`omsd retry`, every
start of the daemon) applies the order's rows again from that one on, up to where the
processor stands, with the processor's own code over the order as it was before the row:
the result is what the processor would have written had the row applied the first time,
outcomes for the connector included.
"""

from __future__ import annotations

from dataclasses import dataclass

from omsd.state.apply import Applier, View, needs, read
from omsd.state.batch import Batch, JournalRow
from omsd.state.models import Order, Policy
from omsd.state.outcomes import PROCESSING_RESULT
from omsd.state.store import Store

PAGE = 1000


@dataclass(frozen=True, slots=True)
class Reapplied:
    """A stuck order as stored, and the batch its rows give when applied again."""

    stored: Order
    batch: Batch

    @property
    def still_stuck(self) -> bool:
        """The same row fails again: nothing new to write."""
        after = self.batch.orders.get(self.stored.order_id)
        was = self.stored.stuck
        return (
            after is not None
            and after.stuck is not None
            and was is not None
            and (after.stuck.offset, after.stuck.error) == (was.offset, was.error)
        )


async def reapply(store: Store, policy: Policy, order_id: str, upto: int) -> Reapplied | None:
    """Apply the stuck order's journal rows again, from the row it is stuck on up to offset
    `upto` (the processor's): the batch to write for it alone. None when it is not stuck."""
    stored = await store.read.load_order(order_id)
    if stored is None or stored.stuck is None:
        return None
    rows = await _rows(store, stored, upto)
    entries = [(row, read(row)) for row in rows]
    view = await store.read.view(*needs(entries))
    base = None if stored.stuck.new else stored.model_copy(update={"stuck": None})
    orders = {k: o for k, o in view.orders.items() if k != order_id}
    by_mkt = {m: o for m, o in view.by_marketplace_id.items() if o.order_id != order_id}
    if base is not None:
        orders[order_id] = base
        if base.marketplace_order_id is not None:
            by_mkt[base.marketplace_order_id] = base
    applier = Applier(policy, View(orders, by_mkt, view.parked))
    for row, entry in entries:
        applier.apply(row, entry)
    return Reapplied(stored, _only(applier.finish(), order_id, upto, stored.marketplace_order_id))


async def _rows(store: Store, order: Order, upto: int) -> list[JournalRow]:
    """The order's rows (its own, and those routed to it by its marketplace id) from the one
    it is stuck on up to `upto`."""
    assert order.stuck is not None
    out: list[JournalRow] = []
    after = order.stuck.offset - 1
    while True:
        page = await store.journal.since(
            after, PAGE, order_id=order.order_id, marketplace_order_id=order.marketplace_order_id
        )
        out += [r for r in page if r.offset <= upto]
        if len(page) < PAGE or page[-1].offset >= upto:
            return out
        after = page[-1].offset


def _only(batch: Batch, order_id: str, offset: int, marketplace_order_id: str | None = None) -> Batch:
    """What the batch decided for this order (a routed row may have named another), at the
    processor's offset: the cursor does not move. Its outcomes too (the terminal event of
    its intent, an approval sent, ...), but not VTEX's processing results: those were
    written when their rows came (VTEX's word is passed on whatever omsd makes of it), and
    one routed now to this order would have another id and reach the connector twice."""
    out = Batch(offset=offset)
    after = batch.orders.get(order_id)
    mkts = {marketplace_order_id, after.marketplace_order_id if after is not None else None} - {None}
    if order_id in batch.orders:
        out.orders[order_id] = batch.orders[order_id]
        out.before[order_id] = batch.before.get(order_id)
        out.touched[order_id] = batch.touched.get(order_id, offset)
    out.effects = [e for e in batch.effects if e.order_id == order_id]
    out.history = [h for h in batch.history if h.order_id == order_id]
    out.transitions = [t for t in batch.transitions if t.order_id == order_id]
    out.notes = [n for n in batch.notes if n.fields.get("order_id") in (None, order_id)]
    out.outcomes = [
        o
        for o in batch.outcomes
        if o.type != PROCESSING_RESULT
        and (o.order_id == order_id or (o.order_id is None and o.marketplace_order_id in mkts))
    ]
    out.add_pending, out.remove_pending = batch.add_pending, batch.remove_pending
    return out
