"""Per-order timeline of the release → approval PUT path, for `latency.py --trace`.

Wraps (in this benchmark process only) the points an order passes on its way
from the simulator's status change to the approval PUT: the push or feed item
journaled, the processor's commit (its history causes and the effects it
queued), the effect claimed, each HTTP exchange of Get order and PUT (after the
throttle slot), timers fired and effect results journaled. Every mark is wall
time, as the simulator's change times are.

`report` prints, for the held orders, each step's p50 / p99 / max and the full
timeline of the slowest orders, so a tail shows which step holds it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from omsd.daemon.vtex.client import VtexClient
from omsd.state.store.derived import Derived
from omsd.state.store.journal import Journal
from omsd.state.store.outbox import Outbox

_order: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_order", default=None)


def _now() -> float:
    return datetime.now(UTC).timestamp()


@dataclass
class Trace:
    marks: dict[str, list[tuple[float, str]]] = field(default_factory=lambda: defaultdict(list))
    calls: list[tuple[float, str, str, str | None]] = field(default_factory=list)  # (slot granted, method, path, order)

    def mark(self, order_id: str | None, what: str, at: float | None = None) -> None:
        if order_id is not None:
            self.marks[order_id].append((_now() if at is None else at, what))

    def relabel(self, order_ids: dict[str, str]) -> None:
        """Move marks filed under a marketplace order id (the PUT names only that) to the order id."""
        for mkt, order_id in order_ids.items():
            if mkt in self.marks and mkt != order_id:
                self.marks[order_id].extend(self.marks.pop(mkt))


def _wrap(cls: type, name: str, make: Callable[[Any], Any], saved: list[tuple[type, str, Any]]) -> None:
    original = getattr(cls, name)
    saved.append((cls, name, original))
    setattr(cls, name, functools.wraps(original)(make(original)))


@contextlib.contextmanager
def tracing(trace: Trace, *, enabled: bool = True) -> Iterator[Trace]:
    """Install the wrappers for the duration of the block (nothing when not `enabled`)."""
    saved: list[tuple[type, str, Any]] = []
    if not enabled:
        yield trace
        return

    def append(original: Any) -> Any:
        async def wrapper(self: Any, entries: Any, *args: Any, **kwargs: Any) -> Any:
            result = await original(self, entries, *args, **kwargs)
            for e in entries:
                if e.source in ("hook", "feed", "api"):
                    trace.mark(e.order_id, f"{e.source} {e.kind} received", e.received_at.timestamp())
                    trace.mark(e.order_id, f"{e.source} {e.kind} journaled")
            return result

        return wrapper

    def commit_batch(original: Any) -> Any:
        async def wrapper(self: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
            result = await original(self, batch, *args, **kwargs)
            at = _now()
            for h in batch.history:
                trace.mark(h.order_id, f"applied: {h.from_phase}->{h.to_phase} ({h.cause})", at)
            for eff in batch.effects:
                trace.mark(eff.order_id, f"effect queued: {eff.kind} {getattr(eff, 'purpose', '')}", at)
            for order_id, order in batch.orders.items():
                if order.timer is not None:
                    due = order.timer.due_at.timestamp() - at
                    trace.mark(order_id, f"timer set: {order.timer.reason} in {due:.3f}s", at)
            return result

        return wrapper

    def claim(original: Any) -> Any:
        async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            rows = await original(self, *args, **kwargs)
            for r in rows:
                trace.mark(r.order_id, f"effect claimed: {r.effect.kind}")
            return rows

        return wrapper

    def finish(original: Any) -> Any:
        async def wrapper(self: Any, outbox_id: int, result: Any, *args: Any, **kwargs: Any) -> Any:
            appended = await original(self, outbox_id, result, *args, **kwargs)
            trace.mark(result.order_id, f"result journaled: {result.kind}")
            return appended

        return wrapper

    def fire(original: Any) -> Any:
        async def wrapper(self: Any, now: datetime) -> Any:
            rows = await self._db.rows("SELECT order_id, reason FROM timers WHERE due_at <= ?", (now.isoformat(),))
            n = await original(self, now)
            for r in rows:
                trace.mark(r["order_id"], f"timer fired: {r['reason']}")
            return n

        return wrapper

    def get_order(original: Any) -> Any:
        async def wrapper(self: VtexClient, order_id: str, *args: Any, **kwargs: Any) -> Any:
            token = _order.set(order_id)
            trace.mark(order_id, f"Get order called ({kwargs.get('priority', '-')!r})")
            try:
                return await original(self, order_id, *args, **kwargs)
            finally:
                trace.mark(order_id, "Get order returned")
                _order.reset(token)

        return wrapper

    def approve(original: Any) -> Any:
        async def wrapper(self: VtexClient, mkt: str, *args: Any, **kwargs: Any) -> Any:
            order_id = mkt
            token = _order.set(order_id)
            trace.mark(order_id, "PUT called")
            try:
                return await original(self, mkt, *args, **kwargs)
            finally:
                trace.mark(order_id, "PUT returned")
                _order.reset(token)

        return wrapper

    def send(original: Any) -> Any:
        async def wrapper(self: VtexClient, method: str, *args: Any, **kwargs: Any) -> Any:
            order_id = _order.get()
            trace.calls.append((_now(), method, urlsplit(args[0]).path, order_id))
            trace.mark(order_id, f"  {method} sent (slot granted)")
            answer = await original(self, method, *args, **kwargs)
            trace.mark(order_id, f"  {method} answered {answer[0]}{' ' + answer[3] if answer[3] else ''}")
            return answer

        return wrapper

    _wrap(Journal, "append", append, saved)
    _wrap(Derived, "commit", commit_batch, saved)
    _wrap(Outbox, "claim", claim, saved)
    _wrap(Outbox, "finish", finish, saved)
    _wrap(Outbox, "fire_due_timers", fire, saved)
    _wrap(VtexClient, "get_order", get_order, saved)
    _wrap(VtexClient, "approve", approve, saved)
    _wrap(VtexClient, "_send", send, saved)
    try:
        yield trace
    finally:
        for cls, name, original in reversed(saved):
            setattr(cls, name, original)


STEPS: list[tuple[str, Callable[[str], bool]]] = [
    ("push/item received", lambda w: w.endswith("status_changed received")),
    ("journaled", lambda w: w.endswith("status_changed journaled")),
    ("processor applied", lambda w: w.startswith("applied:")),
    ("effect claimed", lambda w: w == "effect claimed: fetch_order"),
    ("Get order sent", lambda w: w == "  GET sent (slot granted)"),
    ("Get order answered", lambda w: w.startswith("  GET answered")),
    ("answer journaled", lambda w: w == "result journaled: order_fetched"),
    ("PUT claimed", lambda w: w == "effect claimed: send_approval"),
    ("PUT sent", lambda w: w == "  PUT sent (slot granted)"),
]


def _pct(values: list[float], q: float) -> str:
    if not values:
        return "—"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000:,.0f}"


def report(trace: Trace, releases: dict[str, tuple[float, float]], slowest: int = 5) -> str:
    """`releases`: order id → (release time, first PUT reaching the simulator), wall seconds."""
    steps: dict[str, list[float]] = defaultdict(list)
    lines: list[str] = []
    for order_id, (released, put) in releases.items():
        after = sorted((t, w) for t, w in trace.marks.get(order_id, []) if t >= released - 0.001)
        prev, prev_name = released, "release"
        for name, match in STEPS:
            hit = next((t for t, w in after if match(w) and t >= prev - 0.001), None)
            if hit is None:
                continue
            steps[f"{prev_name} → {name}"].append(hit - prev)
            prev, prev_name = hit, name
        steps[f"{prev_name} → PUT at simulator"].append(put - prev)
    lines.append("| step | n | p50 (ms) | p99 (ms) | max (ms) |")
    lines.append("|---|---|---|---|---|")
    for name, values in steps.items():
        lines.append(f"| {name} | {len(values)} | {_pct(values, 0.5)} | {_pct(values, 0.99)} | {_pct(values, 1.0)} |")
    lines.append(f"\n{_calls(trace)}")
    worst = sorted(releases.items(), key=lambda kv: kv[1][0] - kv[1][1])[:slowest]
    for order_id, (released, put) in worst:
        lines.append(f"\n{order_id}: release → PUT {(put - released) * 1000:,.0f} ms")
        for t, w in sorted(trace.marks.get(order_id, [])):
            if t >= released - 2.0:
                lines.append(f"  {(t - released) * 1000:+9.1f} ms  {w}")
        lines.append(f"  {(put - released) * 1000:+9.1f} ms  PUT reached the simulator")
    return "\n".join(lines)


def _calls(trace: Trace) -> str:
    """What the budget was spent on, and how full the busiest one-second windows were."""
    kinds: dict[str, int] = defaultdict(int)
    for _, method, path, _ in trace.calls:
        kinds[f"{method} {'/api/oms/pvt/orders/{id}' if path.startswith('/api/oms/pvt/orders/') else path}"] += 1
    times = sorted(t for t, *_ in trace.calls)
    busiest: dict[int, int] = defaultdict(int)
    j = 0
    for i, t in enumerate(times):
        while times[j] <= t - 1.0:
            j += 1
        busiest[i - j + 1] += 1
    spread = ", ".join(f"{n} calls: {k}" for n, k in sorted(busiest.items(), reverse=True)[:4])
    return f"calls: {dict(kinds)}\ncalls in the one-second window ending at each call (top counts): {spread}"


def for_run(trace: Trace, held: list[Any], release_time: Callable[[Any], datetime | None]) -> str:
    """The report for a run's held orders (SimOrder: ids, first PUT; `release_time` reads the release)."""
    trace.relabel({o.marketplace_order_id: o.order_id for o in held})
    releases = {
        o.order_id: (released.timestamp(), o.put_at[0].timestamp())
        for o in held
        if o.put_at and (released := release_time(o)) is not None
    }
    return report(trace, releases)
