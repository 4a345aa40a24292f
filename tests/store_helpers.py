"""Journal entries and effect answers for tests on a real store."""

from __future__ import annotations

from datetime import UTC, datetime

from omsd.state.events import (
    AnyEntry,
    OrderFetched,
    OrderFetchFailed,
    StatusChanged,
)
from omsd.state.store import NewEntry, OutboxRow, Store
from tests.machine_helpers import MKT, OID, at, fetched

NOW = datetime(2026, 11, 1, tzinfo=UTC)


def entry(event: AnyEntry, dedup_key: str | None = None, event_id: str | None = None) -> NewEntry:
    return NewEntry.of(event, source="test", received_at=NOW, dedup_key=dedup_key, event_id=event_id)


async def answer_fetch(store: Store, state: str, t: float, mkt: str = MKT) -> None:
    """Play the effect runner for the one pending Get order: journal its answer (the order
    named by the effect; VTEX says its marketplace id is `mkt`)."""
    [fetch] = await store.outbox.claim(10, now=NOW)
    assert fetch.effect.kind == "fetch_order"
    await _finish(
        store, fetch, fetched(state, seq=fetch.seq, t=t, mkt=mkt).model_copy(update={"order_id": fetch.order_id})
    )


async def fail_fetch(store: Store) -> None:
    """Play the effect runner for the one pending Get order: it failed (5xx, retryable)."""
    [fetch] = await store.outbox.claim(10, now=NOW)
    await _finish(store, fetch, OrderFetchFailed(order_id=fetch.order_id, seq=fetch.seq, error="HTTP 503"))


async def _finish(store: Store, row: OutboxRow, result: OrderFetched | OrderFetchFailed) -> None:
    entry = NewEntry(
        kind=result.kind, source="effect", order_id=row.order_id, payload=result.model_dump_json(), received_at=NOW
    )
    await store.outbox.finish(row.id, entry, now=NOW)


def status_entry(state: str, t: float, event_id: str | None = None, order_id: str = OID) -> NewEntry:
    ev = StatusChanged(order_id=order_id, source="feed", state=state, current_change=at(t), event_id=event_id)
    return entry(ev, dedup_key=f"status:{order_id}:{state}:{t}", event_id=event_id)
