"""The store and the processor on real SQLite files in tmp_path."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import get_args

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omsd.daemon.cli import main
from omsd.daemon.ops.metrics import Metrics
from omsd.daemon.pipeline.effects import FETCH_PRIORITY
from omsd.daemon.pipeline.linking import LOOKUP_GRACE_S, ParkedIntents
from omsd.daemon.pipeline.processor import Processor
from omsd.daemon.vtex.budget import Priority
from omsd.state.events import (
    UPCASTERS,
    VERSIONS,
    AnyEntry,
    IntentExpired,
    IntentReceived,
    IntentRecorded,
    NotificationReceived,
    StatusChanged,
    UnreadableEntry,
    read_entry,
)
from omsd.state.models import FetchOrder, Policy
from omsd.state.statuses import Phase
from omsd.state.store import NewEntry, SchemaTooNew, Store, StoreError
from omsd.state.store.schema import MIGRATIONS, SCHEMA_VERSION
from tests.machine_helpers import FREE, HELD, MKT, OID, at
from tests.store_helpers import NOW, answer_fetch, entry, fail_fetch, status_entry


async def test_append_is_durable_and_deduplicated(tmp_path: Path) -> None:
    """An entry is on disk when append returns; the same dedup key or event id is skipped."""
    async with await Store.open(tmp_path / "db") as store:
        first = await store.journal.append([status_entry(HELD, 1, "E1")], acks=["h1"], now=NOW)
        again = await store.journal.append([status_entry(HELD, 1, "E1")], acks=["h2"], now=NOW)
        other_id_same_change = await store.journal.append([status_entry(HELD, 1, "E9")], now=NOW)
        assert not first[0].duplicate and again[0].duplicate and other_id_same_change[0].duplicate
    # A separate connection (another process) sees the rows and both handles to commit.
    conn = sqlite3.connect(tmp_path / "db")
    assert conn.execute("SELECT COUNT(*) FROM journal").fetchone()[0] == 1
    assert {r[0] for r in conn.execute("SELECT handle FROM feed_acks")} == {"h1", "h2"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    calls=st.lists(
        st.lists(st.tuples(st.sampled_from([None, "k1", "k2", "k3"]), st.sampled_from([None, "e1", "e2"])), max_size=6),
        min_size=1,
        max_size=4,
    )
)
async def test_appending_many_at_once_is_appending_one_by_one(
    tmp_path_factory: pytest.TempPathFactory, calls: list[list[tuple[str | None, str | None]]]
) -> None:
    """A group commit skips exactly the entries one-by-one appends would skip (a dedup key or event
    id journaled already, or earlier in the same call) and gives each new row its own offset."""
    db = tmp_path_factory.mktemp("many") / "db"
    keys: set[str] = set()
    ids: set[str] = set()
    async with await Store.open(db) as store:
        for n, call in enumerate(calls):
            entries = [
                NewEntry(
                    kind="rejected",
                    source="test",
                    payload=f"{n}.{i}",
                    reason="r",
                    received_at=NOW,
                    dedup_key=k,
                    event_id=e,
                )
                for i, (k, e) in enumerate(call)
            ]
            results = await store.journal.append(entries, now=NOW)
            for new, (k, e), got in zip(entries, call, results, strict=True):
                expect_duplicate = k in keys or e in ids
                assert got.duplicate is expect_duplicate, (call, k, e)
                if not expect_duplicate:
                    keys.update(x for x in (k,) if x is not None)
                    ids.update(x for x in (e,) if x is not None)
                    row = (await store.journal.since(got.offset - 1, 1))[0]  # type: ignore[operator]
                    assert (row.offset, row.payload) == (got.offset, new.payload)


async def test_crash_between_journal_write_and_processor_commit(tmp_path: Path) -> None:
    """Events journaled but not yet applied are applied after a restart, once."""
    db = tmp_path / "db"
    async with await Store.open(db) as store:
        await store.journal.append(
            [status_entry(HELD, 1), entry(IntentRecorded(order_id=OID, marketplace_order_id=MKT, source="api"))],
            now=NOW,
        )
        assert await store.read.processor_offset() == 0
        # "crash": the process ends here, before the processor ran.
    async with await Store.open(db) as store:
        processor = Processor(store, Policy())
        assert await processor.drain() == 2
        order = await store.read.load_order(OID)
        assert order is not None and order.phase == Phase.WAITING_RELEASE
        assert await store.read.processor_offset() == 2
        assert await processor.drain() == 0  # nothing applied twice


async def test_processor_commit_is_atomic(tmp_path: Path) -> None:
    """If the processor's transaction fails on its last statement, neither order rows,
    outbox, history nor offset move; once the fault is gone the same batch applies."""
    db = tmp_path / "db"
    async with await Store.open(db) as store:
        await store.journal.append(
            [status_entry(FREE, 1), entry(IntentRecorded(order_id=OID, marketplace_order_id=MKT, source="api"))],
            now=NOW,
        )
        processor = Processor(store, Policy())
        fault = sqlite3.connect(db)
        # The cursor is written last in commit_batch: everything before it is inside the transaction.
        fault.execute("CREATE TRIGGER fail BEFORE UPDATE ON cursor BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")
        fault.commit()
        with pytest.raises(StoreError, match="disk I/O error"):
            await processor.run_once()
        assert await store.read.processor_offset() == 0
        assert await store.read.load_order(OID) is None
        assert await store.outbox.counts() == {}
        assert await store.read.history(OID) == []
        fault.execute("DROP TRIGGER fail")
        fault.commit()
        fault.close()
        await processor.drain()
        assert (await store.read.load_order(OID)).phase == Phase.CHECKING  # type: ignore[union-attr]
        assert await store.outbox.counts() == {"pending": 1}


async def test_replay_rebuilds_the_same_state(tmp_path: Path) -> None:
    """Resetting derived state and applying the journal again gives identical order rows."""
    async with await Store.open(tmp_path / "db") as store:
        await store.journal.append(
            [
                status_entry(HELD, 1),
                entry(IntentRecorded(order_id=OID, marketplace_order_id=MKT, source="api")),
                status_entry(FREE, 2),
            ],
            now=NOW,
        )
        processor = Processor(store, Policy())
        await processor.drain()
        await answer_fetch(store, FREE, t=2)
        await processor.drain()
        before = await store.read.load_order(OID)
        assert before is not None and before.phase == Phase.SENDING
        await store.derived.reset(now=NOW)
        assert await store.read.load_order(OID) is None
        await Processor(store, Policy()).drain()
        assert await store.read.load_order(OID) == before
        assert await store.outbox.counts() == {"done": 1, "superseded": 1}


LATER = NOW + timedelta(seconds=LOOKUP_GRACE_S)  # the intents parked at NOW have had their grace


def parked_job(store: Store, metrics: Metrics | None = None, **kw: object) -> ParkedIntents:
    options: dict[str, object] = {"ttl_s": 3600.0, "lookups_per_run": 5, "clock": lambda: LATER}
    options.update(kw)
    return ParkedIntents(store, metrics or Metrics(), lambda: None, **options)  # type: ignore[arg-type]


# An order id that does not derive from MKT (VTEX's ids usually do; the job is for those that don't).
ODD = "SLR-00987-01"


async def test_intent_by_marketplace_id_is_parked_until_linked(tmp_path: Path) -> None:
    """An intent naming only the marketplace id waits parked; when no order's id derives from it,
    the lookup job's Get order links it, then it applies."""
    async with await Store.open(tmp_path / "db") as store:
        processor = Processor(store, Policy())
        await store.journal.append([entry(IntentReceived(marketplace_order_id=MKT, source="api"))], now=NOW)
        await processor.drain()
        assert [p[0] for p in await store.read.pending_intents()] == [MKT]
        await store.journal.append([status_entry(HELD, 1, order_id=ODD)], now=NOW)
        await processor.drain()
        assert await store.outbox.counts() == {}  # first sight asks no Get order
        metrics = Metrics()
        assert await parked_job(store, metrics).run_once() == 1
        assert await parked_job(store, metrics).run_once() == 0  # the same lookup is not asked twice
        await processor.drain()
        await answer_fetch(store, HELD, t=1)  # the lookup links the ids
        await processor.drain()
        order = await store.read.load_order(ODD)
        assert order is not None and order.has_intent and order.phase == Phase.WAITING_RELEASE
        assert await store.read.pending_intents() == []
        assert metrics.sample("omsd_link_lookups_total", trigger="job") == 1


async def test_a_derived_order_is_looked_up_at_once_at_the_approvals_priority(tmp_path: Path) -> None:
    """An intent parked on a marketplace id, and an order whose id derives from it: its Get order
    is asked in the step that parks the intent (or first sees the order), on the release
    path, and its answer both releases the intent and confirms the approval: no job, no
    second Get order."""
    for intent_first in (True, False):
        async with await Store.open(tmp_path / f"db{intent_first}") as store:
            metrics = Metrics()
            processor = Processor(store, Policy(), metrics=metrics)
            intent_row = entry(IntentReceived(marketplace_order_id=MKT, source="api"))
            rows = [intent_row, status_entry(FREE, 1)] if intent_first else [status_entry(FREE, 1), intent_row]
            for row in rows:
                await store.journal.append([row], now=NOW)
                await processor.drain()
            [pending] = await store.outbox.claim(10, now=NOW)
            assert isinstance(pending.effect, FetchOrder) and pending.effect.purpose == "link_intent"
            assert FETCH_PRIORITY[pending.effect.purpose] == Priority.CHECK  # the release path's
            assert metrics.sample("omsd_link_lookups_total", trigger="intent") == 1
            await store.outbox.requeue(pending.id)
            await answer_fetch(store, FREE, t=1)
            await processor.drain()
            order = await store.read.load_order(OID)
            assert order is not None and order.phase == Phase.SENDING, intent_first
            assert await store.read.pending_intents() == []
            [put] = await store.outbox.claim(10, now=NOW)
            assert put.effect.kind == "send_approval"


async def test_no_job_lookup_for_an_intent_parked_moments_ago(tmp_path: Path) -> None:
    """Within its grace a parked intent gets no background lookup: the order whose id derives from
    it is being looked up at once, and guesses among the other unlinked orders would be wasted."""
    async with await Store.open(tmp_path / "db") as store:
        processor = Processor(store, Policy())
        await store.journal.append([entry(IntentReceived(marketplace_order_id=MKT, source="api"))], now=NOW)
        await store.journal.append([status_entry(HELD, 1, order_id=ODD)], now=NOW)
        await processor.drain()
        early = NOW + timedelta(seconds=LOOKUP_GRACE_S - 1)
        assert await parked_job(store, clock=lambda: early).run_once() == 0
        assert await parked_job(store).run_once() == 1


async def test_no_lookup_without_a_parked_intent(tmp_path: Path) -> None:
    """Orders seen in the feed cost no Get order while no intent is parked."""
    async with await Store.open(tmp_path / "db") as store:
        await store.journal.append([status_entry(HELD, 1)], now=NOW)
        await Processor(store, Policy()).drain()
        assert await store.read.link_candidates(10) == []
        assert await parked_job(store).run_once() == 0
        assert await store.outbox.counts() == {}


async def test_lookup_job_sees_orders_the_processor_applied_after_an_idle_run(tmp_path: Path) -> None:
    """A run that found no candidate (the order's event not applied yet) does not blind the next
    run once the processor has applied it."""
    async with await Store.open(tmp_path / "db") as store:
        processor = Processor(store, Policy())
        await store.journal.append([entry(IntentReceived(marketplace_order_id=MKT, source="api"))], now=NOW)
        await processor.drain()
        job = parked_job(store)
        await store.journal.append([status_entry(HELD, 1, order_id=ODD)], now=NOW)
        assert await job.run_once() == 0  # not applied yet
        assert await job.run_once() == 0
        await processor.drain()
        assert await job.run_once() == 1


async def test_link_candidates_prefer_the_derived_id_and_skip_closed_orders(tmp_path: Path) -> None:
    """Lookups go first to the order whose VTEX id contains the parked marketplace id (here its
    urgent lookup failed), never to closed orders, orders with a known marketplace id, or more
    than the bound per run."""
    async with await Store.open(tmp_path / "db") as store:
        entries = [entry(IntentReceived(marketplace_order_id="777", source="api"))]
        for i, (oid, state) in enumerate(
            [("A-1-01", HELD), ("B-2-01", "invoiced"), ("GHB-777-01", FREE), ("C-3-01", "canceled"), ("D-4-01", HELD)]
        ):
            ev = StatusChanged(order_id=oid, source="feed", state=state, current_change=at(i))
            entries.append(entry(ev, dedup_key=f"s:{oid}"))
        entries.append(entry(IntentRecorded(order_id="D-4-01", marketplace_order_id="444", source="api")))
        await store.journal.append(entries, now=NOW)
        processor = Processor(store, Policy())
        await processor.drain()
        assert [oid for oid, _ in await store.read.link_candidates(10)] == ["A-1-01"]  # GHB's is in flight
        await fail_fetch(store)
        await processor.drain()
        assert [oid for oid, _ in await store.read.link_candidates(10)] == ["GHB-777-01", "A-1-01"]
        assert [oid for oid, _ in await store.read.link_candidates(1)] == ["GHB-777-01"]


async def test_a_wave_of_lookups_in_flight_does_not_block_the_next(tmp_path: Path) -> None:
    """Background lookups still queued (a saturated budget) do not hold the next run back, but at
    most two runs' worth are in flight at once."""
    async with await Store.open(tmp_path / "db") as store:
        entries = [entry(IntentReceived(marketplace_order_id=MKT, source="api"))]
        entries += [status_entry(HELD, i, order_id=f"SLR-{i:05d}-01") for i in range(12)]
        await store.journal.append(entries, now=NOW)
        processor = Processor(store, Policy())
        await processor.drain()
        job = parked_job(store, lookups_per_run=5)
        assert await job.run_once() == 5
        await processor.drain()
        assert await job.run_once() == 5  # the first five wait unanswered
        await processor.drain()
        assert await job.run_once() == 0
        assert await store.outbox.link_lookups_in_flight() == 10


async def test_parked_intent_expires_with_a_record(tmp_path: Path) -> None:
    """An intent parked longer than its time to live is dropped, journaled as intent_expired and counted;
    a replay of the journal agrees."""
    async with await Store.open(tmp_path / "db") as store:
        processor = Processor(store, Policy(), metrics=(metrics := Metrics()))
        await store.journal.append([entry(IntentReceived(marketplace_order_id=MKT, source="api"))], now=NOW)
        await processor.drain()
        early = parked_job(store, ttl_s=60.0, clock=lambda: NOW + timedelta(seconds=59))
        assert await early.run_once() == 0
        late = parked_job(store, ttl_s=60.0, clock=lambda: NOW + timedelta(seconds=61))
        assert await late.run_once() == 1
        await processor.drain()
        assert await store.read.pending_intents() == []
        assert [r.kind for r in await store.journal.tail(1)] == ["intent_expired"]
        assert metrics.sample("omsd_intents_expired_total") == 1
        assert await late.run_once() == 0
        await store.derived.reset(now=NOW)
        await Processor(store, Policy()).drain()
        assert await store.read.pending_intents() == []


async def test_intent_parked_anew_in_the_batch_of_an_expiry_is_kept(tmp_path: Path) -> None:
    """An intent sent again right after its predecessor expired is parked with its own offset."""
    async with await Store.open(tmp_path / "db") as store:
        [parked] = await store.journal.append([entry(IntentReceived(marketplace_order_id=MKT, source="api"))], now=NOW)
        await Processor(store, Policy()).drain()
        [_, again] = await store.journal.append(
            [
                entry(IntentExpired(marketplace_order_id=MKT, parked_offset=parked.offset or 0, ttl_s=1.0)),
                entry(IntentReceived(marketplace_order_id=MKT, source="cli")),
            ],
            now=NOW,
        )
        await Processor(store, Policy()).drain()
        assert await store.read.pending_intents() == [(MKT, "cli", again.offset)]


async def test_expiry_leaves_a_linked_intent_alone(tmp_path: Path) -> None:
    """An expiry that arrives after the intent was linked (or parked anew) changes nothing."""
    async with await Store.open(tmp_path / "db") as store:
        metrics = Metrics()
        processor = Processor(store, Policy(), metrics=metrics)
        [parked] = await store.journal.append([entry(IntentReceived(marketplace_order_id=MKT, source="api"))], now=NOW)
        await store.journal.append(
            [
                entry(IntentRecorded(order_id=OID, marketplace_order_id=MKT, source="api")),
                entry(IntentExpired(marketplace_order_id=MKT, parked_offset=parked.offset or 0, ttl_s=1.0)),
            ],
            now=NOW,
        )
        await processor.drain()
        order = await store.read.load_order(OID)
        assert order is not None and order.has_intent and await store.read.pending_intents() == []
        assert metrics.sample("omsd_intents_expired_total") == 0


async def test_notification_routes_by_marketplace_id(tmp_path: Path) -> None:
    """A result notification reaches the order whose marketplace id it names."""
    async with await Store.open(tmp_path / "db") as store:
        processor = Processor(store, Policy())
        await store.journal.append(
            [
                status_entry(HELD, 1),
                entry(IntentRecorded(order_id=OID, marketplace_order_id=MKT, source="api")),
                entry(
                    NotificationReceived(
                        marketplace_order_id=MKT, code="SOI002", flow="ApproveOrder", authenticated=True
                    )
                ),
            ],
            now=NOW,
        )
        await processor.drain()
        order = await store.read.load_order(OID)
        # It reached the order: SOI002 with no approval of omsd's in flight asks Get order.
        assert order is not None and order.phase == Phase.CHECKING and order.last_code is None
        assert "notification SOI002 for no approval of omsd's" in (await store.read.history(OID))[-1].cause


async def test_timers_fire_once_and_survive_restart(tmp_path: Path) -> None:
    """A stored timer survives a restart and becomes exactly one TimerFired event."""
    db = tmp_path / "db"
    async with await Store.open(db) as store:
        await store.journal.append(
            [status_entry(HELD, 1), entry(IntentRecorded(order_id=OID, marketplace_order_id=MKT, source="api"))],
            now=NOW,
        )
        await Processor(store, Policy(held_recheck_s=60)).drain()
        due = await store.outbox.next_timer_due()
        assert due is not None
    async with await Store.open(db) as store:
        assert await store.outbox.fire_due_timers(due - timedelta(seconds=1)) == 0
        assert await store.outbox.fire_due_timers(due) == 1
        assert await store.outbox.fire_due_timers(due + timedelta(seconds=5)) == 0
        processor = Processor(store, Policy(held_recheck_s=60))
        await processor.drain()
        order = await store.read.load_order(OID)
        assert order is not None and order.phase == Phase.CHECKING


async def test_superseded_effects_are_not_performed(tmp_path: Path) -> None:
    """A cancel that arrives before a pending approval is performed withdraws it."""
    async with await Store.open(tmp_path / "db") as store:
        processor = Processor(store, Policy())
        await store.journal.append(
            [status_entry(FREE, 1), entry(IntentRecorded(order_id=OID, marketplace_order_id=MKT, source="api"))],
            now=NOW,
        )
        await processor.drain()
        await answer_fetch(store, FREE, t=1)
        await store.journal.append([status_entry("canceled", 5)], now=NOW)
        await processor.drain()  # both the answer (→ send) and the cancel in one batch
        assert await store.outbox.claim(10, now=NOW) == []
        assert (await store.read.load_order(OID)).phase == Phase.REJECTED  # type: ignore[union-attr]


@pytest.mark.parametrize("start", range(SCHEMA_VERSION))
async def test_migrations_from_every_old_version(tmp_path: Path, start: int) -> None:
    """A database at any older schema version migrates forward and keeps its rows."""
    db = tmp_path / "db"
    conn = sqlite3.connect(db)
    for version in range(1, start + 1):
        conn.executescript(MIGRATIONS[version - 1])
        conn.execute(f"PRAGMA user_version={version}")
    if start >= 1:
        conn.execute(
            "INSERT INTO journal (kind, source, payload, received_at) "
            "VALUES ('rejected', 'feed', '{}', '2026-11-01T00:00:00+00:00')"
        )
    conn.commit()
    conn.close()
    async with await Store.open(db) as store:
        assert await store.db.schema_version() == SCHEMA_VERSION
        assert await store.journal.last_offset() == (1 if start >= 1 else 0)
        assert [r.version for r in await store.journal.tail()] == ([1] if start >= 1 else [])
        assert await store.read.history(OID) == []
        assert await store.read.unreadable_rows() == []


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
        await store.journal.append([], acks=["h1"], now=NOW)
        assert await store.journal.acks_failed(["h1"], "503", drop_before=NOW - timedelta(seconds=240)) == 0
        assert await store.journal.pending_acks() == ["h1"]
        assert await store.journal.acks_failed(["h1"], "503", drop_before=NOW + timedelta(seconds=1)) == 1
        assert await store.journal.pending_acks() == []


async def test_an_event_the_machine_cannot_apply_stops_its_order_not_the_processor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug on one event does not stop the processor: the event is not skipped but leaves its
    order stuck (the reason in its history, its later events held), and other orders go on."""
    from omsd.state.machine import decide as real

    def flaky(order: object, event: object, now: object, policy: object) -> object:
        if getattr(event, "state", None) == "handling" and getattr(event, "order_id", None) == OID:
            raise RuntimeError("boom")
        return real(order, event, now, policy)  # type: ignore[arg-type]

    monkeypatch.setattr("omsd.state.apply.decide", flaky)
    other = StatusChanged(order_id="MKP-9-01", source="feed", state="handling", current_change=at(2))
    async with await Store.open(tmp_path / "db") as store:
        await store.journal.append(
            [status_entry(HELD, 1), status_entry("handling", 2), status_entry("canceled", 3), entry(other)], now=NOW
        )
        processor = Processor(store, Policy())
        assert await processor.drain() == 4
        order = await store.read.load_order(OID)
        assert order is not None and order.status == HELD and order.stuck is not None and order.stuck.held == 1
        causes = [h.cause for h in await store.read.history(OID)]
        assert any("not applied: RuntimeError: boom" in c for c in causes)
        applied = await store.read.load_order("MKP-9-01")
        assert applied is not None and applied.status == "handling"


# ---- journal versions -------------------------------------------------------------------
GOLDEN = Path(__file__).parent / "golden"


def golden_lines(version: int) -> list[str]:
    return (GOLDEN / f"events-v{version}.jsonl").read_text().splitlines()


@pytest.mark.parametrize("line", golden_lines(1), ids=lambda line: json.loads(line)["kind"])
def test_rows_written_by_version_1_are_read(line: str) -> None:
    """A journal row of every kind, as omsd wrote it at version 1, reads back with nothing lost."""
    raw = json.loads(line)
    read = read_entry(raw["kind"], 1, line)
    assert read.kind == raw["kind"]
    assert _kept(raw, read.model_dump(mode="json"))


def _kept(written: object, read: object) -> bool:
    """Everything the old row held reads back the same (fields added since, with their
    defaults, may come on top, also inside nested records such as a snapshot's order)."""
    if isinstance(written, dict) and isinstance(read, dict):
        return all(key in read and _kept(value, read[key]) for key, value in written.items())
    return written == read


def test_golden_rows_cover_every_kind() -> None:
    """The golden file holds one row per entry kind (a new kind needs its golden row)."""
    kinds = {cls.model_fields["kind"].default for cls in get_args(AnyEntry)}
    assert sorted(json.loads(line)["kind"] for line in golden_lines(1)) == sorted(kinds)


async def test_old_version_is_upcast_before_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row written at an older version goes through its upcaster, then the machine."""
    monkeypatch.setitem(VERSIONS, "resync", 2)
    monkeypatch.setitem(
        UPCASTERS, ("resync", 1), lambda raw: {**{k: v for k, v in raw.items() if k != "why"}, "reason": raw["why"]}
    )
    old = json.dumps({"kind": "resync", "order_id": OID, "why": "operator check"})
    async with await Store.open(tmp_path / "db") as store:
        await store.journal.append(
            [NewEntry(kind="resync", source="operator", order_id=OID, payload=old, received_at=NOW, version=1)], now=NOW
        )
        await Processor(store, Policy()).drain()
        assert await store.read.unreadable_rows() == []
        assert [h.cause for h in await store.read.history(OID)] == [
            "resync (operator check) of an order without intent"
        ]


def test_a_version_newer_than_known_is_unreadable() -> None:
    """A row from a newer omsd is refused by the reader, not guessed at."""
    with pytest.raises(UnreadableEntry, match="newer than this omsd reads"):
        read_entry("resync", 2, json.dumps({"kind": "resync", "order_id": OID, "reason": "r"}))


BAD_ROWS: dict[str, tuple[int, dict[str, object]]] = {
    "unknown field": (1, {"kind": "status_changed", "order_id": OID, "source": "feed", "state": HELD, "sauce": "x"}),
    "newer version": (2, {"kind": "status_changed", "order_id": OID, "source": "feed", "state": HELD}),
}


async def journal_with_unreadable_row(db: Path, version: int, payload: dict[str, object]) -> tuple[Processor, Metrics]:
    """Order known, then the bad row (offset 2), then a cancel; applied by a processor with metrics."""
    bad = NewEntry(
        kind="status_changed",
        source="feed",
        order_id=OID,
        payload=json.dumps(payload),
        received_at=NOW,
        version=version,
    )
    async with await Store.open(db) as store:
        await store.journal.append([status_entry(HELD, 1), bad, status_entry("canceled", 3)], now=NOW)
        metrics = Metrics()
        processor = Processor(store, Policy(), metrics=metrics)
        assert await processor.drain() == 3
    return processor, metrics


@pytest.mark.parametrize(("version", "payload"), BAD_ROWS.values(), ids=BAD_ROWS.keys())
async def test_an_unreadable_row_is_recorded_counted_and_listed(
    tmp_path: Path, version: int, payload: dict[str, object]
) -> None:
    """An unreadable row is never skipped silently: the order's history names it, the
    processor and the metric count it, the store lists it; later rows still apply."""
    _, metrics = await journal_with_unreadable_row(tmp_path / "db", version, payload)
    assert metrics.sample("omsd_journal_unreadable_total") == 1
    async with await Store.open(tmp_path / "db") as store:
        order = await store.read.load_order(OID)
        assert order is not None and order.status == "canceled"
        [row] = await store.read.unreadable_rows()
        assert (row.journal_offset, row.kind, row.order_id) == (2, "status_changed", OID)
        causes = [h.cause for h in await store.read.history(OID)]
        assert any(c.startswith(f"journal row 2 unreadable: {row.error}") for c in causes)
        assert (await store.read.stats())["unreadable"] == 1


def test_omsd_journal_unreadable_lists_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`omsd journal --unreadable` prints each unreadable row with its offset and error."""
    version, payload = BAD_ROWS["newer version"]
    asyncio.run(journal_with_unreadable_row(tmp_path / "db", version, payload))
    monkeypatch.setenv("OMSD_DB", str(tmp_path / "db"))
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["journal", "--unreadable"]) == 0
    out = capsys.readouterr().out
    assert "status_changed" in out and "version 2 is newer than this omsd reads" in out


@pytest.mark.parametrize("steps", [0, 1, 2, 3, 4, 6, 8])
async def test_a_cancelled_write_leaves_no_transaction_open(tmp_path: Path, steps: int) -> None:
    """A writer cancelled anywhere inside its transaction (even while BEGIN is in flight)
    rolls back, and the next write works: no 'transaction within a transaction'."""
    async with await Store.open(tmp_path / "db") as store:
        task = asyncio.create_task(store.journal.append([status_entry(HELD, 1, "E1")], acks=["h1"], now=NOW))
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        [appended] = await store.journal.append([status_entry(FREE, 2, "E2")], now=NOW)
        assert appended.offset is not None
    conn = sqlite3.connect(tmp_path / "db")
    assert conn.execute("SELECT COUNT(*) FROM journal WHERE event_id = 'E2'").fetchone()[0] == 1
