"""`omsd replay`: rebuilding from the journal carries on every piece of open work."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import sqlite3
from pathlib import Path

import pytest

from omsd.daemon.cli import main
from omsd.daemon.cli.render import Meter
from omsd.daemon.pipeline.processor import Processor
from omsd.state.events import ApprovalAnswered, IntentReceived, IntentRecorded, Resync, StatusChanged
from omsd.state.models import Policy
from omsd.state.statuses import Phase
from omsd.state.store import NewEntry, Store
from tests.machine_helpers import FREE, HELD, MKT, OID
from tests.store_helpers import NOW, answer_fetch, entry, status_entry

OTHER = "MKP-999-01"


async def _linking_order(db: Path) -> None:
    """An order whose link lookup (Get order) is pending, with an intent parked on its marketplace id."""
    async with await Store.open(db) as store:
        # The order's id derives from the parked id: its first event asks the lookup at once (the
        # job's resync that follows finds it in flight and asks nothing more).
        lookup = entry(Resync(order_id=OID, reason="link lookup for a parked intent"))
        await store.journal.append(
            [entry(IntentReceived(marketplace_order_id=MKT, source="api")), status_entry(HELD, 1), lookup], now=NOW
        )
        await Processor(store, Policy()).drain()
        assert [p[0] for p in await store.read.pending_intents()] == [MKT]
        assert await store.outbox.counts() == {"pending": 1}


def _pending_effects(db: Path) -> list[tuple[str, int, str]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return list(conn.execute("SELECT order_id, seq, kind FROM outbox WHERE state = 'pending' ORDER BY id"))


async def test_replay_keeps_a_pending_link_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Get order pending at replay time is issued again, so the parked intent is still released."""
    db = tmp_path / "o.db"
    monkeypatch.setenv("OMSD_DB", str(db))
    await _linking_order(db)
    assert await asyncio.to_thread(main, ["replay"]) == 0
    assert _pending_effects(db) == [(OID, 1, "fetch_order")]
    async with await Store.open(db) as store:
        await answer_fetch(store, FREE, t=2)
        await Processor(store, Policy()).drain()
        order = await store.read.load_order(OID)
        assert order is not None and order.has_intent and order.phase == Phase.CHECKING
        assert await store.read.pending_intents() == []


def _sql(db: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        return list(conn.execute(sql, params))


async def _sending_order(db: Path) -> None:
    """OID held, intent, released, checked: its approval PUT is queued (seq 2)."""
    async with await Store.open(db) as store:
        intent = IntentRecorded(order_id=OID, marketplace_order_id=MKT, source="api")
        await store.journal.append([status_entry(HELD, 1), entry(intent), status_entry(FREE, 2)], now=NOW)
        processor = Processor(store, Policy())
        await processor.drain()
        await answer_fetch(store, FREE, t=2)
        await processor.drain()
        assert (await store.read.load_order(OID)).phase == Phase.SENDING  # type: ignore[union-attr]


async def _answer_send(db: Path) -> None:
    async with await Store.open(db) as store:
        [send] = await store.outbox.claim(10, now=NOW)
        assert send.effect.kind == "send_approval"
        answer = ApprovalAnswered(order_id=OID, seq=send.seq, code="SOI003", http_status=200)
        await store.outbox.finish(send.id, NewEntry.of(answer, source="effect", received_at=NOW), now=NOW)
        await Processor(store, Policy()).drain()
        assert (await store.read.load_order(OID)).phase == Phase.AWAITING_RESULT  # type: ignore[union-attr]


async def test_an_answered_approval_is_never_sent_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a replay, an approval the journal shows as sent and answered is neither re-sent nor re-checked."""
    db = tmp_path / "o.db"
    monkeypatch.setenv("OMSD_DB", str(db))
    await _sending_order(db)
    await _answer_send(db)
    before = _sql(db, "SELECT data FROM orders")
    assert await asyncio.to_thread(main, ["replay"]) == 0
    assert _sql(db, "SELECT data FROM orders") == before
    assert _pending_effects(db) == []
    assert _sql(db, "SELECT COUNT(*) FROM journal WHERE kind = 'resync'") == [(0,)]


async def test_an_approval_of_unknown_outcome_is_rechecked_not_resent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queued approval the outbox lost is not re-sent blindly: a resync re-checks the order with Get order."""
    db = tmp_path / "o.db"
    monkeypatch.setenv("OMSD_DB", str(db))
    await _sending_order(db)
    _sql(db, "UPDATE outbox SET state = 'superseded' WHERE kind = 'send_approval'")
    assert await asyncio.to_thread(main, ["replay"]) == 0
    assert _pending_effects(db) == []
    async with await Store.open(db) as store:
        await Processor(store, Policy()).drain()
    [(order_id, _, kind)] = _pending_effects(db)
    assert (order_id, kind) == (OID, "fetch_order")


async def _two_orders(db: Path) -> None:
    """OID waits for release (intent, held); OTHER is seen for the first time (link lookup pending)."""
    async with await Store.open(db) as store:
        intent = IntentRecorded(order_id=OID, marketplace_order_id=MKT, source="api")
        other = StatusChanged(order_id=OTHER, source="feed", state=FREE, current_change=NOW)
        await store.journal.append([status_entry(HELD, 1), entry(intent), entry(other)], now=NOW)
        await Processor(store, Policy()).drain()


def _corrupt(db: Path, order_id: str) -> None:
    _sql(db, "UPDATE orders SET phase = 'dead', data = json_set(data, '$.phase', 'dead') WHERE order_id = ?", order_id)


def _phases(db: Path) -> dict[object, object]:
    return {row[0]: row[1] for row in _sql(db, "SELECT order_id, phase FROM orders")}


@pytest.mark.parametrize("key", [OID, MKT])
def test_replay_of_one_order_by_either_id(key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--order` takes the VTEX or the marketplace id and rewrites that order only."""
    db = tmp_path / "o.db"
    monkeypatch.setenv("OMSD_DB", str(db))
    asyncio.run(_two_orders(db))
    _corrupt(db, OID)
    _corrupt(db, OTHER)
    assert main(["replay", "--order", key]) == 0
    assert _phases(db) == {OID: "waiting_release", OTHER: "dead"}


def test_replay_options_refused_or_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown order is exit 1; --to-offset with --order is a usage error (exit 2)."""
    db = tmp_path / "o.db"
    monkeypatch.setenv("OMSD_DB", str(db))
    asyncio.run(_two_orders(db))
    assert main(["replay", "--order", "nope"]) == 1
    assert main(["replay", "--order", OID, "--to-offset", "1"]) == 2


def test_replay_from_offset_rewrites_orders_touched_since(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--from-offset N` rebuilds the orders with journal entries from N on, and leaves the others."""
    db = tmp_path / "o.db"
    monkeypatch.setenv("OMSD_DB", str(db))
    asyncio.run(_two_orders(db))
    _corrupt(db, OID)
    _corrupt(db, OTHER)
    assert main(["replay", "--from-offset", "3"]) == 0
    assert _phases(db) == {OID: "dead", OTHER: "tracking"}


def test_replay_to_offset_rebuilds_as_of_then(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--to-offset N` rebuilds the state as of offset N and lets the processor apply the rest."""
    db = tmp_path / "o.db"
    monkeypatch.setenv("OMSD_DB", str(db))
    asyncio.run(_two_orders(db))
    assert main(["replay", "--to-offset", "1"]) == 0
    assert _phases(db) == {OID: "tracking"}
    assert _sql(db, 'SELECT "offset" FROM cursor') == [(1,)]


def _digests(db: Path) -> dict[str, str]:
    files = [p for p in (db, db.with_name(db.name + "-wal")) if p.exists()]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_dry_run_changes_nothing_and_shows_the_differences(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run leaves the database byte-identical and reports per order what differs and what it would call."""
    db = tmp_path / "o.db"
    monkeypatch.setenv("OMSD_DB", str(db))
    asyncio.run(_linking_order(db))
    _sql(db, "UPDATE outbox SET state = 'superseded'")
    _corrupt(db, OID)
    before = _digests(db)
    assert main(["replay", "--dry-run", "--json"]) == 0
    assert _digests(db) == before
    report = json.loads(capsys.readouterr().out)
    assert report["summary"] | {"offset": 0} == {
        "events": 3,
        "orders": 1,
        "unchanged": 0,
        "changed": 1,
        "newly_actionable": 1,
        "dry_run": True,
        "offset": 0,
    }
    [order] = report["orders"]
    assert order["differences"] == {"phase": {"stored": "dead", "rebuilt": "tracking"}}
    assert order["calls"] == ["fetch_order seq 1 (link_intent)"]
    assert main(["replay", "--dry-run"]) == 0
    assert "would call: fetch_order seq 1 (link_intent)" in capsys.readouterr().out
    assert main(["replay"]) == 0
    assert _pending_effects(db) == [(OID, 1, "fetch_order")]
    assert _phases(db) == {OID: "tracking"}


class _Terminal(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [True, False])
def test_progress_only_on_a_terminal(tty: bool) -> None:
    """Long work shows count, rate and ETA on a terminal, and nothing in a pipe."""
    stream = _Terminal(tty)
    meter = Meter("replayed", 1000, stream, every_s=0)
    meter(400)
    meter.close()
    text = stream.getvalue()
    if tty:
        assert "replayed 400/1,000 events" in text and "/s" in text and "ETA" in text
    else:
        assert text == ""


@pytest.mark.parametrize("command", [["replay", "--dry-run"], ["ingest", "--dry-run", "-"]])
def test_previews_leave_a_live_write_ahead_log_alone(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With another connection's un-checkpointed log beside it, a preview leaves db and -wal byte-identical."""
    db = tmp_path / "o.db"
    monkeypatch.setenv("OMSD_DB", str(db))
    monkeypatch.setattr(
        "sys.stdin",
        io.StringIO(
            json.dumps({"orderId": "A-1", "state": "invoiced", "handle": "h", "currentChange": "2026-11-01T10:00:00Z"})
        ),
    )
    asyncio.run(_two_orders(db))
    with contextlib.closing(sqlite3.connect(db)) as holder:
        holder.execute("PRAGMA wal_autocheckpoint=0")
        holder.execute("UPDATE orders SET updated_at = updated_at")
        holder.commit()
        before = _digests(db)
        assert set(before) == {"o.db", "o.db-wal"}
        assert main(command) == 0
        assert _digests(db) == before
