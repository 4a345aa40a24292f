"""`omsd replay`: rebuild order state from the journal, then carry on the open work.

The rebuild is the processor's own code (`state.apply`) run over the journal from an
empty state (the machine is pure, so it gives the state the daemon had), a chunk of rows
at a time and in bounded memory: the orders touched last stay in memory, the others and
every history row are staged in a scratch database (`Store.rebuild`). The plan compares
the staged state with the stored one there, and `apply` installs it in one transaction:
a replay stopped before that (killed, out of disk) leaves the database as it was.

Then, for every rebuilt order still waiting on an effect, the outbox decides what is
needed: an effect still pending, started or done is left alone (done: its answer is in
the journal, so an approval sent and answered is never sent again); a Get order the
outbox lost (superseded, missing) is queued again; an approval whose outcome the outbox
cannot tell is not re-sent but re-checked with Get order (a `Resync` in the journal).
Parked intents are rebuilt with the orders, so a re-issued link lookup still releases them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from omsd.state.apply import Applier, View, needs, read
from omsd.state.batch import Batch
from omsd.state.events import IntentReceived, NotificationReceived, Resync
from omsd.state.models import Effect, FetchOrder, Order, Policy
from omsd.state.statuses import TERMINAL_PHASES
from omsd.state.store import Candidate, NewEntry, PlanRow, Rebuild, Store

from .bulk import no_cycle_collection

COMPARED = ("phase", "status", "intent_source", "timer", "stuck")
CHUNK_ROWS = 5_000  # journal rows applied in one step
CACHE_ORDERS = 20_000  # orders kept in memory between steps, the most recently touched ...
EVICT_ORDERS = 2_000  # ... and how many leave at once for the scratch database when it is full
_ROUTED = (NotificationReceived, IntentReceived)  # entries routed by marketplace id (`state.routing`)


@dataclass(slots=True)
class Rebuilt:
    """What a rebuild read: the journal up to `offset`, `applied` rows; the intents it left
    parked (marketplace id -> source, offset). The orders and history are staged."""

    offset: int
    applied: int
    parked: dict[str, tuple[str, int]] = field(default_factory=dict)


async def rebuild(
    store: Store,
    staged: Rebuild,
    policy: Policy,
    *,
    upto: int | None = None,
    on_rows: Callable[[int], None] = lambda n: None,
) -> Rebuilt:
    """Apply the journal (up to `upto`) to an empty state, `CHUNK_ROWS` at a time: each
    chunk is applied (`state.apply`, no effects, no transitions announced) over what the
    chunks before gave, and the rebuilt state goes to `staged`. Nothing else is written."""
    orders = _Orders(staged, CACHE_ORDERS)
    parked: dict[str, tuple[str, int]] = {}
    offset = applied = 0
    with no_cycle_collection():
        async for rows in store.journal.chunks(0, upto, CHUNK_ROWS):
            entries = [(row, read(row)) for row in rows]
            order_ids, _ = needs(entries)
            # Parked intents are all in memory: only routing needs a marketplace id's order.
            routed = {e.marketplace_order_id for _, e in entries if isinstance(e, _ROUTED)}
            links = await staged.links(routed) if routed else {}
            applier = Applier(policy, await orders.view(order_ids, links, parked), emit_effects=False, fresh=True)
            for row, entry in entries:
                applier.apply(row, entry)
            batch = applier.finish()
            orders.update(batch)
            for mkt in batch.remove_pending:  # removals first, as the store writes them
                parked.pop(mkt, None)
            for mkt, intent in batch.add_pending.items():
                parked.setdefault(mkt, intent)
            linked = {mkt: k for mkt, k in applier.links().items() if mkt not in links}
            await staged.write(orders.evict(), batch.history, batch.unreadable, linked)
            offset = batch.offset
            applied += len(rows)
            on_rows(len(rows))
        await staged.write(orders.flush())
    return Rebuilt(offset, applied, parked)


class _Orders:
    """The orders a rebuild has reached: those touched last in memory (at most `size`),
    the others in the scratch database, written there when they leave memory (or at the
    end), each with the last offset that applied to it."""

    def __init__(self, staged: Rebuild, size: int) -> None:
        self._staged = staged
        self._size = size
        self._cache: OrderedDict[str, tuple[Order, int]] = OrderedDict()
        self._dirty: set[str] = set()  # changed since they were staged
        self._spilled = False  # any order left memory yet (until then, one not in memory does not exist)

    async def view(self, order_ids: set[str], links: dict[str, str], parked: dict[str, tuple[str, int]]) -> View:
        """What a chunk naming these ids needs: the orders, and the order each marketplace
        id it names was linked to first (an id absent here does not exist yet)."""
        cache = self._cache
        found: dict[str, Order] = {}
        missing: list[str] = []
        for order_id in order_ids.union(links.values()):
            hit = cache.get(order_id)
            if hit is None:
                missing.append(order_id)
            else:
                found[order_id] = hit[0]
        if missing and self._spilled:
            for order_id, hit in (await self._staged.orders(missing)).items():
                cache[order_id] = hit
                found[order_id] = hit[0]
        by_marketplace_id = {mkt: found[k] for mkt, k in links.items() if k in found}
        return View(orders=found, by_marketplace_id=by_marketplace_id, parked=parked)

    def update(self, batch: Batch) -> None:
        cache, dirty, touched = self._cache, self._dirty, batch.touched
        for order_id, order in batch.orders.items():
            cache[order_id] = (order, touched[order_id])
            cache.move_to_end(order_id)
            dirty.add(order_id)

    def evict(self) -> list[tuple[Order, int]]:
        """The changed orders among those that leave memory, the least recently touched."""
        cache, dirty = self._cache, self._dirty
        if len(cache) <= self._size:
            return []
        out: list[tuple[Order, int]] = []
        self._spilled = True
        while len(cache) > self._size - EVICT_ORDERS:
            order_id, hit = cache.popitem(last=False)
            if order_id in dirty:
                dirty.discard(order_id)
                out.append(hit)
        return out

    def flush(self) -> list[tuple[Order, int]]:
        """Every order changed since it was staged (the end of a rebuild)."""
        out = [self._cache[order_id] for order_id in self._dirty]
        self._dirty.clear()
        return out


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
    """What a replay would write and call: the rebuilt state (staged), and per order
    compared, whether it differs or needs a call (the orders shown are kept staged too)."""

    staged: Rebuild
    rebuilt: Rebuilt
    partial: bool  # some orders only (`--order`, `--from-offset`): the others are left alone
    cursor: int | None  # the processor offset to set (None: keep it)
    orders: int = 0
    changed: int = 0
    actionable: int = 0

    def summary(self) -> dict[str, int]:
        return {
            "events": self.rebuilt.applied,
            "orders": self.orders,
            "unchanged": self.orders - self.changed,
            "changed": self.changed,
            "newly_actionable": self.actionable,
        }

    async def shown(self) -> AsyncIterator[list[OrderPlan]]:
        """The orders that differ or need a call, by order id, a page at a time."""
        async for page in self.staged.shown():
            yield [_order_plan(c) for c in page]

    async def close(self) -> None:
        """Let the staged state go (closing the store does it too)."""
        await self.staged.close()


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
    staged = await store.rebuild()
    try:
        rebuilt = await rebuild(store, staged, policy, upto=to_offset, on_rows=on_rows)
        if order is not None:
            if not await staged.select(key=order):
                raise UnknownOrder(order)
        elif partial:
            await staged.select(touched_from=from_offset or 0)
        result = Plan(staged, rebuilt, partial, None if partial else rebuilt.offset)
        result.orders = await staged.compared(selected=partial)
        async for candidates in staged.candidates(selected=partial):
            shown: list[PlanRow] = []
            for c in candidates:
                p = _order_plan(c)
                differs, calls = bool(p.differences()), bool(p.calls())
                if differs or calls:
                    shown.append(PlanRow(c, p.reissue[0] if p.reissue else None, p.recheck))
                    result.changed += differs
                    result.actionable += calls
            await staged.record(shown)
    except BaseException:
        await staged.close()
        raise
    return result


def _order_plan(c: Candidate) -> OrderPlan:
    before = Order.model_validate_json(c.stored) if c.stored is not None else None
    after = Order.model_validate_json(c.rebuilt) if c.rebuilt is not None else None
    flight = after.inflight if after is not None and after.phase not in TERMINAL_PHASES else None
    if after is None or flight is None or c.outbox_state in ("pending", "started", "done"):
        return OrderPlan(c.order_id, before, after)
    if flight.kind == "send":
        return OrderPlan(c.order_id, before, after, recheck=True)
    fetch = FetchOrder(order_id=c.order_id, seq=flight.seq, purpose=flight.purpose)
    return OrderPlan(c.order_id, before, after, reissue=(fetch,))


async def apply(store: Store, result: Plan, now: datetime) -> None:
    """Write the plan: the rebuilt rows, the outbox, and a Resync per approval to re-check."""
    await store.derived.install(selected=result.partial, parked=result.rebuilt.parked, cursor=result.cursor, now=now)
    resyncs = [
        NewEntry.of(Resync(order_id=k, reason="replay: approval outcome unknown"), source="operator", received_at=now)
        for k in await result.staged.rechecks()
    ]
    if resyncs:
        await store.journal.append(resyncs, now=now)
