"""The store and the processor on real SQLite files in tmp_path."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from omsd.daemon.processor import Processor
from omsd.state.events import IntentReceived, IntentRecorded, NotificationReceived, StatusChanged
from omsd.state.models import Policy
from omsd.state.schema import MIGRATIONS, SCHEMA_VERSION
from omsd.state.statuses import Phase
from omsd.state.store import NewEntry, SchemaTooNew, Store
from tests.machine_helpers import FREE, HELD, MKT, OID, at, fetched

NOW = datetime(2026, 11, 1, tzinfo=UTC)


def entry(event: StatusChanged | IntentRecorded | IntentReceived | NotificationReceived, **kw: str | None) -> NewEntry:
    order_id = getattr(event, "order_id", None)
    return NewEntry(
        kind=event.kind, source="test", order_id=order_id, payload=event.model_dump_json(), received_at=NOW, **kw
    )


async def answer_fetch(store: Store, state: str, t: float) -> None:
    """Play the effect runner for the one pending Get order: journal its answer."""
    [fetch] = await store.claim_effects(10)
    assert fetch.effect.kind == "fetch_order"
    result = fetched(state, seq=fetch.seq, t=t)
    await store.finish_effect(
        fetch.id,
        NewEntry(kind=result.kind, source="effect", order_id=OID, payload=result.model_dump_json(), received_at=NOW),
    )


def status_entry(state: str, t: float, event_id: str | None = None) -> NewEntry:
    ev = StatusChanged(order_id=OID, source="feed", state=state, current_change=at(t), event_id=event_id)
    return entry(ev, dedup_key=f"status:{OID}:{state}:{t}", event_id=event_id)


async def test_append_is_durable_and_deduplicated(tmp_path: Path) -> None:
    """An entry is on disk when append returns; the same dedup key or event id is skipped."""
    async with await Store.open(tmp_path / "db") as store:
        first = await store.append([status_entry(HELD, 1, "E1")], acks=["h1"])
        again = await store.append([status_entry(HELD, 1, "E1")], acks=["h2"])
        other_id_same_change = await store.append([status_entry(HELD, 1, "E9")])
        assert not first[0].duplicate and again[0].duplicate and other_id_same_change[0].duplicate
    # A separate connection (another process) sees the rows and both handles to commit.
    conn = sqlite3.connect(tmp_path / "db")
    assert conn.execute("SELECT COUNT(*) FROM journal").fetchone()[0] == 1
    assert {r[0] for r in conn.execute("SELECT handle FROM feed_acks")} == {"h1", "h2"}


async def test_crash_between_journal_write_and_processor_commit(tmp_path: Path) -> None:
    """Events journaled but not yet applied are applied after a restart, once."""
    db = tmp_path / "db"
    async with await Store.open(db) as store:
        await store.append(
            [status_entry(HELD, 1), entry(IntentRecorded(order_id=OID, marketplace_order_id=MKT, source="api"))]
        )
        assert await store.processor_offset() == 0
        # "crash": the process ends here, before the processor ran.
    async with await Store.open(db) as store:
        processor = Processor(store, Policy())
        assert await processor.drain() == 2
        order = await store.load_order(OID)
        assert order is not None and order.phase == Phase.WAITING_RELEASE
        assert await store.processor_offset() == 2
        assert await processor.drain() == 0  # nothing applied twice


async def test_processor_commit_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the processor's transaction fails, neither order rows, outbox nor offset move."""
    async with await Store.open(tmp_path / "db") as store:
        await store.append(
            [status_entry(FREE, 1), entry(IntentRecorded(order_id=OID, marketplace_order_id=MKT, source="api"))]
        )
        processor = Processor(store, Policy())
        original = store.commit_batch

        async def failing(batch: object) -> None:
            async with store._tx() as conn:
                await conn.execute('UPDATE cursor SET "offset" = 99')
                raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(store, "commit_batch", failing)
        with pytest.raises(sqlite3.OperationalError):
            await processor.run_once()
        assert await store.processor_offset() == 0
        assert await store.load_order(OID) is None
        assert await store.outbox_counts() == {}
        monkeypatch.setattr(store, "commit_batch", original)
        await processor.drain()
        assert (await store.load_order(OID)).phase == Phase.CHECKING  # type: ignore[union-attr]
        assert await store.outbox_counts() == {"pending": 1}


async def test_replay_rebuilds_the_same_state(tmp_path: Path) -> None:
    """Resetting derived state and applying the journal again gives identical order rows."""
    async with await Store.open(tmp_path / "db") as store:
        await store.append(
            [
                status_entry(HELD, 1),
                entry(IntentRecorded(order_id=OID, marketplace_order_id=MKT, source="api")),
                status_entry(FREE, 2),
            ]
        )
        processor = Processor(store, Policy())
        await processor.drain()
        await answer_fetch(store, FREE, t=2)
        await processor.drain()
        before = await store.load_order(OID)
        assert before is not None and before.phase == Phase.SENDING
        await store.reset_derived()
        assert await store.load_order(OID) is None
        await Processor(store, Policy(), emit_effects=False).drain()
        assert await store.load_order(OID) == before
        assert await store.outbox_counts() == {"done": 1, "superseded": 1}


async def test_intent_by_marketplace_id_is_parked_until_linked(tmp_path: Path) -> None:
    """An intent naming only the marketplace id waits for Get order to link it, then applies."""
    async with await Store.open(tmp_path / "db") as store:
        processor = Processor(store, Policy())
        await store.append([entry(IntentReceived(marketplace_order_id=MKT, source="api"))])
        await processor.drain()
        assert [p[0] for p in await store.pending_intents()] == [MKT]
        await store.append([status_entry(HELD, 1)])
        await processor.drain()
        await answer_fetch(store, HELD, t=1)  # the first-sight Get order links the ids
        await processor.drain()
        order = await store.load_order(OID)
        assert order is not None and order.has_intent and order.phase == Phase.WAITING_RELEASE
        assert await store.pending_intents() == []


async def test_notification_routes_by_marketplace_id(tmp_path: Path) -> None:
    """A result notification reaches the order whose marketplace id it names."""
    async with await Store.open(tmp_path / "db") as store:
        processor = Processor(store, Policy())
        await store.append(
            [
                entry(IntentRecorded(order_id=OID, marketplace_order_id=MKT, source="api")),
                entry(NotificationReceived(marketplace_order_id=MKT, code="SOI002", flow="ApproveOrder")),
            ]
        )
        await processor.drain()
        order = await store.load_order(OID)
        assert order is not None and order.phase == Phase.APPROVED


async def test_timers_fire_once_and_survive_restart(tmp_path: Path) -> None:
    """A stored timer survives a restart and becomes exactly one TimerFired event."""
    db = tmp_path / "db"
    async with await Store.open(db) as store:
        await store.append(
            [status_entry(HELD, 1), entry(IntentRecorded(order_id=OID, marketplace_order_id=MKT, source="api"))]
        )
        await Processor(store, Policy(held_recheck_s=60)).drain()
        due = await store.next_timer_due()
        assert due is not None
    async with await Store.open(db) as store:
        assert await store.fire_due_timers(due - timedelta(seconds=1)) == 0
        assert await store.fire_due_timers(due) == 1
        assert await store.fire_due_timers(due + timedelta(seconds=5)) == 0
        processor = Processor(store, Policy(held_recheck_s=60))
        await processor.drain()
        order = await store.load_order(OID)
        assert order is not None and order.phase == Phase.CHECKING


async def test_superseded_effects_are_not_performed(tmp_path: Path) -> None:
    """A cancel that arrives before a pending approval is performed withdraws it."""
    async with await Store.open(tmp_path / "db") as store:
        processor = Processor(store, Policy())
        await store.append(
            [status_entry(FREE, 1), entry(IntentRecorded(order_id=OID, marketplace_order_id=MKT, source="api"))]
        )
        await processor.drain()
        await answer_fetch(store, FREE, t=1)
        await store.append([status_entry("canceled", 5)])
        await processor.drain()  # both the answer (→ send) and the cancel in one batch
        assert await store.claim_effects(10) == []
        assert (await store.load_order(OID)).phase == Phase.REJECTED  # type: ignore[union-attr]


@pytest.mark.parametrize("start", range(SCHEMA_VERSION))
async def test_migrations_from_every_old_version(tmp_path: Path, start: int) -> None:
    """A database at any older schema version migrates forward and keeps its rows."""
    db = tmp_path / "db"
    conn = sqlite3.connect(db)
    for version in range(1, start + 1):
        conn.executescript(MIGRATIONS[version - 1])
        conn.execute(f"PRAGMA user_version={version}")
    if start >= 1:
        conn.execute("INSERT INTO journal (kind, source, payload, received_at) VALUES ('rejected', 'feed', '{}', 'x')")
    conn.commit()
    conn.close()
    async with await Store.open(db) as store:
        assert await store.schema_version() == SCHEMA_VERSION
        assert await store.last_offset() == (1 if start >= 1 else 0)
        assert await store.history(OID) == []


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A database written by a newer omsd is not touched."""
    db = tmp_path / "db"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaTooNew):
        await Store.open(db)


async def test_failed_acks_are_dropped_after_visibility_timeout(tmp_path: Path) -> None:
    """Handles whose commit keeps failing are kept for retry, then dropped once VTEX has
    made their items visible again (the redelivery is deduplicated)."""
    async with await Store.open(tmp_path / "db") as store:
        await store.append([], acks=["h1"])
        assert await store.acks_failed(["h1"], "503", drop_before=datetime.now(UTC) - timedelta(seconds=240)) == 0
        assert await store.pending_acks() == ["h1"]
        assert await store.acks_failed(["h1"], "503", drop_before=datetime.now(UTC) + timedelta(seconds=1)) == 1
        assert await store.pending_acks() == []


async def test_an_event_the_machine_cannot_apply_is_skipped_and_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug on one event does not stop the processor: the event is skipped, the reason is
    in the order's history, and the next events (and orders) are applied."""
    from omsd.state.machine import decide as real

    def flaky(order: object, event: object, now: object, policy: object) -> object:
        if getattr(event, "state", None) == "handling":
            raise RuntimeError("boom")
        return real(order, event, now, policy)  # type: ignore[arg-type]

    monkeypatch.setattr("omsd.daemon.processor.decide", flaky)
    async with await Store.open(tmp_path / "db") as store:
        await store.append([status_entry(HELD, 1), status_entry("handling", 2), status_entry("canceled", 3)])
        processor = Processor(store, Policy())
        assert await processor.drain() == 3
        order = await store.load_order(OID)
        assert order is not None and order.status == "canceled"
        causes = [h.cause for h in await store.history(OID)]
        assert any("not applied: RuntimeError: boom" in c for c in causes)
