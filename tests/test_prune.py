"""Journal retention: `omsd prune` and the daemon's `retention` job keep one snapshot per quiet order."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from omsd.daemon.cli import main
from omsd.daemon.ops import lock, retention
from omsd.daemon.ops.jobs import Jobs, add_retention
from omsd.daemon.ops.notify import Progress
from omsd.daemon.pipeline.processor import Processor
from omsd.daemon.tools import replay
from omsd.sim.server import Simulator
from omsd.state.events import (
    SNAPSHOT_CAUSE,
    IntentReceived,
    IntentRecorded,
    NotificationReceived,
    OrderFetched,
    OrderSnapshot,
    StatusChanged,
)
from omsd.state.machine import decide
from omsd.state.models import Policy
from omsd.state.statuses import Phase
from omsd.state.store import NewEntry, Store, database_bytes
from omsd.state.store.schema import MIGRATIONS
from tests.helpers import approve, quiet_health, reached, until
from tests.machine_helpers import HELD, order

OLD = datetime(2026, 9, 1, tzinfo=UTC)
NOW = datetime(2026, 11, 1, tzinfo=UTC)  # OLD is 61 days before
HANDLING = "ready-for-handling"


def _entry(event: Any, when: datetime, **kw: Any) -> NewEntry:
    return NewEntry.of(event, source="test", received_at=when, **kw)


def _status(oid: str, state: str, when: datetime) -> NewEntry:
    ev = StatusChanged(order_id=oid, source="feed", state=state, current_change=when)
    return _entry(ev, when, dedup_key=f"status:{oid}:{state}:{when.isoformat()}")


async def _approved_by_marketplace_id(store: Store, oid: str, mkt: str, when: datetime) -> None:
    """An intent by marketplace id (parked), the order seen held and linked by Get order
    (the intent released), a notification under the marketplace id, then handling."""
    t = [when + timedelta(seconds=s) for s in range(5)]
    await store.journal.append([_entry(IntentReceived(marketplace_order_id=mkt, source="api"), t[0])], now=t[0])
    await store.journal.append([_status(oid, HELD, t[1])], now=t[1])
    await Processor(store, Policy()).drain()
    fetched = OrderFetched(order_id=oid, seq=1, status=HELD, marketplace_order_id=mkt, fetched_at=t[2])
    note = NotificationReceived(marketplace_order_id=mkt, code="EOI011", flow="ApproveOrder", authenticated=True)
    await store.journal.append([_entry(fetched, t[2]), _entry(note, t[3]), _status(oid, HANDLING, t[4])], now=t[4])
    await Processor(store, Policy()).drain()


async def _journal(store: Store) -> None:
    """Old: an approved order (routed intent and notification), a rejected one, a tracked
    one, an open (held) one, a dead one; recent: an approved one; old rejected input."""
    await _approved_by_marketplace_id(store, "A-1", "1", OLD)
    await _approved_by_marketplace_id(store, "NEW-1", "9", NOW - timedelta(days=2))
    intent = IntentRecorded(order_id="R-1", marketplace_order_id="2", source="cli")
    open_intent = IntentRecorded(order_id="O-1", marketplace_order_id="3", source="cli")
    await store.journal.append(
        [
            _status("R-1", HELD, OLD),
            _entry(intent, OLD),
            _status("R-1", "canceled", OLD + timedelta(seconds=1)),
            _status("T-1", "invoiced", OLD),
            _entry(
                OrderFetched(order_id="T-1", seq=1, status="invoiced", marketplace_order_id="5", fetched_at=OLD), OLD
            ),
            _status("O-1", HELD, OLD),
            _entry(open_intent, OLD),
            NewEntry(kind="rejected", source="feed", payload="not json {", reason="bad", received_at=OLD),
            NewEntry(kind="rejected", source="feed", payload="{}", reason="new", received_at=NOW, dedup_key="r2"),
        ],
        now=OLD,
    )
    await Processor(store, Policy()).drain()
    dead = order("dead").model_copy(update={"order_id": "D-1", "marketplace_order_id": "4", "updated_at": OLD})
    await store.journal.append([_entry(OrderSnapshot(order_id="D-1", order=dead), OLD)], now=OLD)
    await Processor(store, Policy()).drain()


def _rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return list(conn.execute(sql))


def _state(db: Path) -> tuple[list[Any], list[Any]]:
    orders = _rows(db, "SELECT order_id, phase, data, updated_at FROM orders ORDER BY order_id")
    history = _rows(
        db,
        "SELECT order_id, journal_offset, from_phase, to_phase, status, cause, at FROM history "
        "ORDER BY order_id, journal_offset, id",
    )
    return orders, history


def _kinds(db: Path, order_id: str) -> list[str]:
    return [r[0] for r in _rows(db, f"SELECT kind FROM journal WHERE order_id = '{order_id}' ORDER BY \"offset\"")]


async def _replay(db: Path, policy: Policy | None = None) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Replay the database: the plan's summary, and the views of the orders that differed."""
    async with await Store.open(db) as store:
        plan = await replay.plan(store, policy or Policy())
        await replay.apply(store, plan, NOW)
        differing = [o.view() async for page in plan.shown() for o in page if o.differences()]
    return plan.summary(), differing


async def test_prune_then_replay_gives_the_same_state(tmp_path: Path) -> None:
    """Quiet closed and tracked orders shrink to one snapshot row each; a replay rebuilds orders and history exactly."""
    db = tmp_path / "o.db"
    async with await Store.open(db) as store:
        await _journal(store)
        before = await store.read.orders_by_id()
        report = await retention.prune(store, 30, NOW)
        assert await store.read.orders_by_id() == before
    assert report.pruned.orders == 3  # T-1
    assert report.pruned.rejected_rows == 1
    for oid in ("A-1", "R-1", "T-1"):
        assert _kinds(db, oid) == ["order_snapshot"]
    assert _rows(db, "SELECT COUNT(*) FROM journal WHERE order_id IS NULL AND kind != 'rejected'") == [(2,)]  # NEW-1's
    assert _rows(db, "SELECT cause FROM history WHERE order_id = 'A-1'") == [(SNAPSHOT_CAUSE,)]
    assert len(_kinds(db, "O-1")) == 2 and len(_kinds(db, "NEW-1")) > 1
    pruned = _state(db)
    summary, _ = await _replay(db)
    assert summary["changed"] == 0
    assert _state(db) == pruned


@pytest.mark.parametrize("dry_run", [False, True])
async def test_a_prune_goes_through_its_candidates_a_page_at_a_time(tmp_path: Path, dry_run: bool) -> None:
    """Pages of one order (fewer than the candidates) prune, or preview, exactly what one page does."""
    whole, paged = tmp_path / "whole.db", tmp_path / "paged.db"
    reports = []
    for db, chunk in ((whole, 500), (paged, 1)):
        async with await Store.open(db) as store:
            await _journal(store)
            reports.append(await retention.prune(store, 30, NOW, dry_run=dry_run, chunk=chunk))
    assert reports[0].pruned == reports[1].pruned and reports[1].pruned.orders == 3
    assert _state(whole) == _state(paged)
    journal = 'SELECT "offset", kind, order_id, payload FROM journal ORDER BY "offset"'
    assert _rows(whole, journal) == _rows(paged, journal)


async def test_events_after_a_prune_apply_on_the_snapshot(tmp_path: Path) -> None:
    """A status change for a pruned order applies to its snapshot, live and in a replay alike."""
    db = tmp_path / "o.db"
    async with await Store.open(db) as store:
        await _journal(store)
        await retention.prune(store, 30, NOW)
        await store.journal.append([_status("A-1", "invoiced", NOW)], now=NOW)
        await Processor(store, Policy()).drain()
        assert (await store.read.load_order("A-1")).status == "invoiced"  # type: ignore[union-attr]
    live = _state(db)
    await _replay(db)
    assert _state(db) == live


async def test_open_dead_and_recent_orders_are_kept(tmp_path: Path) -> None:
    """Nothing of an open, a dead or a recently closed order is pruned; a second prune prunes nothing."""
    db = tmp_path / "o.db"
    async with await Store.open(db) as store:
        await _journal(store)
        kept = {oid: _kinds(db, oid) for oid in ("O-1", "D-1", "NEW-1")}
        await retention.prune(store, 30, NOW)
        assert {oid: _kinds(db, oid) for oid in kept} == kept
        again = await retention.prune(store, 30, NOW)
        assert again.pruned.orders == 0 and again.pruned.journal_rows == 0


def test_snapshot_sets_the_order() -> None:
    """The machine applies a snapshot as the order's whole state and decides nothing else."""
    closed = order("approved").model_copy(update={"updated_at": OLD})
    decision = decide(None, OrderSnapshot(order_id=closed.order_id, order=closed), OLD)
    assert decision.order == closed and decision.effects == () and decision.cause == SNAPSHOT_CAUSE


async def test_free_pages_go_back_to_the_disk(tmp_path: Path) -> None:
    """A database migrated from version 3 becomes incremental auto-vacuum; after a prune the file shrinks."""
    db = tmp_path / "o.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        for version in (1, 2, 3):
            conn.executescript(MIGRATIONS[version - 1])
            conn.execute(f"PRAGMA user_version={version}")
    async with await Store.open(db) as store:
        assert _rows(db, "PRAGMA auto_vacuum") == [(2,)]
        for n in range(300):
            await _approved_by_marketplace_id(store, f"A-{n}", str(n), OLD)
        await store.retention.reclaim()
        size = database_bytes(db)
        report = await retention.prune(store, 30, NOW)
        after = database_bytes(db)
    assert report.pruned.orders == 300
    assert report.freed_bytes >= size / 8  # every free page, not one per call (one page is 4 KB of ~1 MB)
    # The prune writes its snapshot rows first (which may take a page or two), then every
    # free page goes back: no free page is left, and the file shrank by what reclaim freed.
    assert _rows(db, "PRAGMA freelist_count") == [(0,)]
    assert size - report.freed_bytes <= after <= size - report.freed_bytes + 2 * 4096


# ---- the command -------------------------------------------------------------------------
@pytest.fixture
def old_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    db = tmp_path / "o.db"
    monkeypatch.setenv("OMSD_DB", str(db))

    async def build() -> None:
        async with await Store.open(db) as store:
            await _journal(store)

    asyncio.run(build())
    return db


def _digest(db: Path) -> str:
    return hashlib.sha256(db.read_bytes()).hexdigest()


def test_prune_command_dry_run_then_for_real(old_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--dry-run counts what would go and leaves the file byte-identical; then the prune does it."""
    before = _digest(old_db)
    assert main(["prune", "--dry-run", "--json"], clock=lambda: NOW) == 0
    preview = json.loads(capsys.readouterr().out)
    assert _digest(old_db) == before
    assert (
        preview["dry_run"] and preview["orders"] == 3 and preview["rejected_rows"] == 1
    )  # D-1 is dead, NEW-1 recent: kept
    assert main(["prune", "--older-than", "365", "--json"], clock=lambda: NOW) == 0
    assert json.loads(capsys.readouterr().out)["orders"] == 0
    assert main(["prune"], clock=lambda: NOW) == 0
    out = capsys.readouterr().out
    assert "pruned 3 orders" in out and "1 rejected" in out
    assert _kinds(old_db, "T-1") == ["order_snapshot"]


def test_prune_refuses_beside_the_daemon(old_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command is a writer: with the database owned by a daemon it exits 3 and says the daemon prunes."""
    with lock.hold(old_db):
        assert main(["prune"], clock=lambda: NOW) == 3
    err = capsys.readouterr().err
    assert "in use by omsd pid" in err and "OMSD_RETENTION_DAYS" in err


def test_prune_without_retention_needs_older_than(
    old_db: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With OMSD_RETENTION_DAYS=0 a bare `omsd prune` refuses (exit 2) instead of pruning everything."""
    monkeypatch.setenv("OMSD_RETENTION_DAYS", "0")
    assert main(["prune"], clock=lambda: NOW) == 2
    assert "--older-than" in capsys.readouterr().err


@pytest.mark.parametrize("days", ["-1", "36501", "1.5", "soon"])
def test_prune_refuses_an_age_that_is_no_age(old_db: Path, capsys: pytest.CaptureFixture[str], days: str) -> None:
    """--older-than -1 (or too large, or not a number) is a usage error naming the flag, not
    "retention is off"; nothing is pruned."""
    before = _digest(old_db)
    with pytest.raises(SystemExit) as exit_:
        main(["prune", "--older-than", days], clock=lambda: NOW)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--older-than" in err and "retention is off" not in err
    assert _digest(old_db) == before


def test_prune_older_than_0_prunes_every_closed_order(old_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--older-than 0 (with retention off or on) takes every closed order, the recent one too."""
    assert main(["prune", "--older-than", "0", "--dry-run", "--json"], clock=lambda: NOW) == 0
    assert json.loads(capsys.readouterr().out)["orders"] == 4  # NEW-1 too; D-1 (dead) is kept


# ---- the daemon's job ---------------------------------------------------------------------
async def test_the_retention_job_is_scheduled_unless_disabled(tmp_path: Path) -> None:
    """OMSD_RETENTION_DAYS > 0 schedules `retention`; 0 schedules nothing; the size gauge reads the file."""
    health = quiet_health()
    metrics = health.metrics
    jobs = Jobs(health, metrics, Progress())
    async with await Store.open(tmp_path / "o.db") as store:
        add_retention(jobs, store, 0)
        assert jobs.scheduler.get_job("retention") is None
        add_retention(jobs, store, 30)
        assert jobs.scheduler.get_job("retention") is not None
        await metrics.refresh(store, tmp_path / "o.db")
        assert metrics.sample("omsd_database_bytes") == (tmp_path / "o.db").stat().st_size + (
            (tmp_path / "o.db-wal").stat().st_size if (tmp_path / "o.db-wal").exists() else 0
        )


@pytest.mark.e2e
async def test_prune_and_replay_on_a_real_run(sim: Simulator, run_daemon: Any, tmp_path: Path) -> None:
    """A real run's journal (approved, rejected, parked then linked, held), pruned later, replays to the same state."""
    db = tmp_path / "omsd.db"
    async with run_daemon(sim, db=db) as daemon:
        policy = daemon.settings.policy()
        a = sim.create("PR1", held=True, decision="authorize", decide_after_s=0.3)
        r = sim.create("PR2", held=True, decision="reject", decide_after_s=0.3)
        h = sim.create("PR4", held=True, decision=None)  # stays held: an open order
        await approve(daemon, "PR1", a.order_id)
        await approve(daemon, "PR2", r.order_id)
        await approve(daemon, "PR3")  # parked until Get order links it
        c = sim.create("PR3", held=True, decision="authorize", decide_after_s=0.3)
        await approve(daemon, "PR4", h.order_id)
        for oid, phase in ((a.order_id, Phase.APPROVED), (r.order_id, Phase.REJECTED), (c.order_id, Phase.APPROVED)):
            await until(reached(daemon, oid, phase), what=f"{oid} {phase}")
        await until(reached(daemon, h.order_id, Phase.WAITING_RELEASE), what="held")
        await until(lambda: not sim.queue.messages, what="feed drained")
    async with await Store.open(db) as store:
        report = await retention.prune(store, 30, datetime.now(UTC) + timedelta(days=31))
    assert report.pruned.orders == 3
    assert len(_kinds(db, h.order_id)) > 1
    pruned = _state(db)
    _, differing = await _replay(db, policy)  # the daemon's timings: the held order's timer is rebuilt the same
    assert differing == []
    assert _state(db) == pruned
