"""`omsd replay`: rebuild order state from the journal, then carry on the open work.

The rebuild is the processor's own code run in memory over the journal (the machine
is pure, so it gives the state the daemon had). Then, for every rebuilt order still
waiting on an effect, the outbox decides what is needed: an effect still pending,
started or done is left alone (done: its answer is in the journal, so an approval
sent and answered is never sent again); a Get order the outbox lost (superseded,
missing) is queued again; an approval whose outcome the outbox cannot tell is not
re-sent but re-checked with Get order (a `Resync` in the journal). Parked intents are
rebuilt with the orders, so a re-issued link lookup still releases them.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from omsd.state.apply import Applier, read
from omsd.state.batch import Batch, JournalRow
from omsd.state.events import Resync
from omsd.state.models import Effect, FetchOrder, Order, Policy
from omsd.state.statuses import TERMINAL_PHASES
from omsd.state.store import NewEntry, Store

COMPARED = ("phase", "status", "intent_source", "timer", "stuck")


@dataclass(slots=True)
class Rebuilt:
    """The derived state the journal up to `batch.offset` gives, computed in memory."""

    batch: Batch
    applied: int


async def rebuild(
    chunks: AsyncIterator[list[JournalRow]], policy: Policy, on_rows: Callable[[int], None] = lambda n: None
) -> Rebuilt:
    """Apply journal rows to an empty state, all in memory (`state.apply` from an empty
    view): no store look-ups, no effects, no transitions announced. Nothing is written."""
    applier = Applier(policy, emit_effects=False, fresh=True)
    applied = 0
    with _no_cycle_collection():
        async for rows in chunks:
            for row in rows:
                applier.apply(row, read(row))
            applied += len(rows)
            on_rows(len(rows))
    return Rebuilt(applier.finish(), applied)


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Pause Python's cycle collector while a rebuild holds millions of live objects:
    each full collection walks all of them again (docs/benchmarks.md measures it), and
    a rebuild makes no reference cycles (reference counting frees its garbage)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class UnknownOrder(LookupError):
    pass


@dataclass(frozen=True, slots=True)
class OrderPlan:
    """One order: its stored and rebuilt state and the calls the replay makes for it."""

    order_id: str
    before: Order | None
    after: Order | None
    reissue: tuple[Effect, ...] = ()
    recheck: bool = False  # an approval with no known outcome: re-check with Get order

    def differences(self) -> dict[str, tuple[Any, Any]]:
        old, new = _fields(self.before), _fields(self.after)
        return {k: (old[k], new[k]) for k in COMPARED if old[k] != new[k]}

    def calls(self) -> list[str]:
        out = [f"{e.kind} seq {e.seq}" + (f" ({e.purpose})" if isinstance(e, FetchOrder) else "") for e in self.reissue]
        return out + (["fetch_order (resync: approval outcome unknown)"] if self.recheck else [])

    def view(self) -> dict[str, Any]:
        diff = {k: {"stored": _plain(a), "rebuilt": _plain(b)} for k, (a, b) in self.differences().items()}
        return {"order_id": self.order_id, "differences": diff, "calls": self.calls()}


@dataclass(slots=True)
class Plan:
    rebuilt: Rebuilt
    only: set[str] | None  # None: every order
    cursor: int | None  # the processor offset to set (None: keep it)
    orders: list[OrderPlan] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        changed = sum(1 for o in self.orders if o.differences())
        actionable = sum(1 for o in self.orders if o.calls())
        return {
            "events": self.rebuilt.applied,
            "orders": len(self.orders),
            "unchanged": len(self.orders) - changed,
            "changed": changed,
            "newly_actionable": actionable,
        }


def _fields(order: Order | None) -> dict[str, Any]:
    return {k: getattr(order, k) if order is not None else None for k in COMPARED}


def _plain(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


async def plan(
    store: Store,
    policy: Policy,
    *,
    order: str | None = None,
    from_offset: int | None = None,
    to_offset: int | None = None,
    on_rows: Callable[[int], None] = lambda n: None,
) -> Plan:
    """What a replay would write and call. A replay of every order rebuilds the whole
    journal (up to `to_offset`) and moves the processor there; a replay of some orders
    (`order`, or those touched from `from_offset` on) rebuilds up to where the processor
    is (a preview: up to `to_offset` when given) and leaves the processor there."""
    partial = order is not None or from_offset is not None
    if to_offset is None and partial:
        to_offset = await store.read.processor_offset()
    rebuilt = await rebuild(store.journal.chunks(0, to_offset), policy, on_rows)
    stored = await store.read.orders_by_id()
    only = _selection(rebuilt, stored, order, from_offset) if partial else None
    result = Plan(rebuilt, only, None if partial else rebuilt.batch.offset)
    outbox = await store.outbox.states()
    ids = sorted(only if only is not None else set(stored) | set(rebuilt.batch.orders))
    for order_id in ids:
        result.orders.append(_order_plan(order_id, stored.get(order_id), rebuilt.batch.orders.get(order_id), outbox))
    return result


def _selection(rebuilt: Rebuilt, stored: dict[str, Order], key: str | None, from_offset: int | None) -> set[str]:
    if key is not None:
        orders = rebuilt.batch.orders
        found = {k for k, o in {**stored, **orders}.items() if key in (k, o.marketplace_order_id)}
        if not found:
            raise UnknownOrder(key)
        return found
    return {k for k, last in rebuilt.batch.touched.items() if last >= (from_offset or 0)}


def _order_plan(
    order_id: str, before: Order | None, after: Order | None, outbox: dict[tuple[str, int], str]
) -> OrderPlan:
    flight = after.inflight if after is not None and after.phase not in TERMINAL_PHASES else None
    if after is None or flight is None or outbox.get((order_id, flight.seq)) in ("pending", "started", "done"):
        return OrderPlan(order_id, before, after)
    if flight.kind == "send":
        return OrderPlan(order_id, before, after, recheck=True)
    fetch = FetchOrder(order_id=order_id, seq=flight.seq, purpose=flight.purpose)
    return OrderPlan(order_id, before, after, reissue=(fetch,))


async def apply(store: Store, result: Plan, now: datetime) -> None:
    """Write the plan: the rebuilt rows, the outbox, and a Resync per approval to re-check."""
    reissue = [e for o in result.orders for e in o.reissue]
    await store.derived.replace(result.rebuilt.batch, only=result.only, cursor=result.cursor, reissue=reissue, now=now)
    resyncs = [
        NewEntry.of(
            Resync(order_id=o.order_id, reason="replay: approval outcome unknown"), source="operator", received_at=now
        )
        for o in result.orders
        if o.recheck
    ]
    if resyncs:
        await store.journal.append(resyncs, now=now)
