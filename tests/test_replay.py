"""`omsd replay`: rebuilding from the journal carries on every piece of open work."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import sqlite3
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from omsd.daemon.cli import main
from omsd.daemon.cli.render import Meter
from omsd.daemon.pipeline.processor import Processor
from omsd.daemon.tools import replay
from omsd.state.apply import Applier, read
from omsd.state.batch import Batch
from omsd.state.events import (
    AnyEntry,
    ApprovalAnswered,
    IntentExpired,
    IntentReceived,
    IntentRecorded,
    NotificationReceived,
    OrderFetched,
    Resync,
    StatusChanged,
    TimerFired,
)
from omsd.state.models import Policy
from omsd.state.statuses import Phase
from omsd.state.store import NewEntry, Store
from tests.machine_helpers import FREE, HELD, MKT, OID, at
from tests.store_helpers import NOW, answer_fetch, entry, status_entry

OTHER = "MKP-999-01"
POLICY = Policy()


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


def test_a_replay_writes_every_column_the_processor_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rebuilt orders rows equal the processor's, column by column (the marketplace id an
    unlinked order's id derives from, which the urgent link lookup searches, included)."""
    db = tmp_path / "o.db"
    monkeypatch.setenv("OMSD_DB", str(db))
    asyncio.run(_two_orders(db))
    before = _sql(db, "SELECT * FROM orders ORDER BY order_id")
    assert any(row[-1] is not None for row in before)  # a derived marketplace id to keep
    assert main(["replay"]) == 0
    assert _sql(db, "SELECT * FROM orders ORDER BY order_id") == before


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


# ---- a replay in bounded memory: chunks, a small cache, a scratch database -------------------

ORDER_IDS = st.sampled_from(["A-1", "A-2", "B-1"])
MKTS = st.sampled_from(["M1", "M2"])  # may both learn M1: two orders, one marketplace id
STATES = st.sampled_from([HELD, FREE, "order-accepted", "ready-for-handling", "canceled"])
SEQS = st.integers(1, 6)
AnyRow = AnyEntry | str | None  # an entry; an order id alone: a row that does not read; None: a rejected row


def _status(order_id: str, state: str, t: int) -> StatusChanged:
    return StatusChanged(order_id=order_id, source="feed", state=state, current_change=at(t))


def _fetched(order_id: str, seq: int, state: str, mkt: str | None) -> OrderFetched:
    return OrderFetched(order_id=order_id, seq=seq, status=state, marketplace_order_id=mkt, fetched_at=at(60))


def _notified(mkt: str, code: str, authenticated: bool) -> NotificationReceived:
    return NotificationReceived(marketplace_order_id=mkt, code=code, flow="ApproveOrder", authenticated=authenticated)


ROW: st.SearchStrategy[AnyRow] = st.one_of(
    st.builds(_status, ORDER_IDS, STATES, st.integers(0, 50)),
    st.builds(lambda m: IntentReceived(marketplace_order_id=m, source="api"), MKTS),
    st.builds(lambda o, m: IntentRecorded(order_id=o, marketplace_order_id=m, source="cli"), ORDER_IDS, MKTS),
    st.builds(_fetched, ORDER_IDS, SEQS, STATES, st.none() | MKTS),
    st.builds(
        lambda o, q, c: ApprovalAnswered(order_id=o, seq=q, code=c, http_status=200),
        ORDER_IDS,
        SEQS,
        st.sampled_from(["SOI003", "EOI011", "EOI008"]),
    ),
    st.builds(_notified, MKTS, st.sampled_from(["SOI002", "EOI011"]), st.booleans()),
    st.builds(lambda o, k: TimerFired(order_id=o, token=k, reason="held_recheck"), ORDER_IDS, SEQS),
    st.builds(lambda o: Resync(order_id=o, reason="test"), ORDER_IDS),
    st.builds(lambda m, k: IntentExpired(marketplace_order_id=m, parked_offset=k, ttl_s=1.0), MKTS, st.integers(1, 30)),
    ORDER_IDS,
    st.none(),
)


def _journal_entry(n: int, row: AnyRow) -> NewEntry:
    received = at(100 + n)
    if row is None:
        return NewEntry(kind="rejected", source="feed", payload='{"bad": true}', received_at=received, reason="bad")
    if isinstance(row, str):
        return NewEntry(kind="status_changed", source="feed", payload="{not json", received_at=received, order_id=row)
    return NewEntry.of(row, source="test", received_at=received)


async def _replayed_in_steps(db: Path, chunk: int, cache: int) -> tuple[Batch, dict[str, object]]:
    """The one-pass rebuild (every row applied by one Applier, all in memory: the replay
    before it streamed) and the state a streaming replay writes, chunk rows at a time with
    `cache` orders in memory."""
    async with await Store.open(db) as store:
        rows = await store.journal.since(0, limit=10_000)
        one_pass = Applier(POLICY, emit_effects=False, fresh=True)
        for row in rows:
            one_pass.apply(row, read(row))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(replay, "CHUNK_ROWS", chunk)
            mp.setattr(replay, "CACHE_ORDERS", cache)
            mp.setattr(replay, "EVICT_ORDERS", 1)
            plan = await replay.plan(store, POLICY)
            await replay.apply(store, plan, NOW)
        orders = await store.read.orders_by_id()
        state: dict[str, object] = {
            "orders": orders,
            "history": {k: await store.read.history(k) for k in orders},
            "parked": {m: (s, o) for m, s, o in await store.read.pending_intents()},
            "unreadable": [replace(u, found_at=None) for u in await store.read.unreadable_rows()],
        }
    return one_pass.finish(), state


@settings(max_examples=100, deadline=None)
@given(st.lists(ROW, max_size=30), st.integers(1, 7), st.integers(1, 3))
@example(  # A-2, then A-1 learn M1: the last intent under M1 goes to A-2, linked first, in any chunk
    [
        IntentReceived(marketplace_order_id="M1", source="api"),
        IntentReceived(marketplace_order_id="M1", source="api"),
        IntentRecorded(order_id="A-2", marketplace_order_id="M1", source="cli"),
        _status("A-1", HELD, 0),
        _fetched("A-1", 1, HELD, "M1"),
        IntentReceived(marketplace_order_id="M1", source="api"),
    ],
    2,  # rows a chunk
    1,  # orders in memory
)
def test_a_replay_in_steps_rebuilds_what_one_pass_does(rows: list[AnyRow], chunk: int, cache: int) -> None:
    """Chunks of any size and a cache of a few orders (the rest staged) give the one-pass state exactly."""
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "o.db"

        async def journal() -> None:
            async with await Store.open(db) as store:
                await store.journal.append([_journal_entry(n, r) for n, r in enumerate(rows)], now=NOW)

        asyncio.run(journal())
        batch, state = asyncio.run(_replayed_in_steps(db, chunk, cache))
    assert state["orders"] == batch.orders
    assert state["history"] == {k: [h for h in batch.history if h.order_id == k] for k in batch.orders}
    assert state["parked"] == batch.add_pending
    assert state["unreadable"] == batch.unreadable


def _scratch_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".scratch"))


async def test_the_staged_state_never_shows_in_the_directory(tmp_path: Path) -> None:
    """The scratch database is unlinked once attached: a replay killed at any point leaves no file behind."""
    db = tmp_path / "o.db"
    await _two_orders(db)
    async with await Store.open(db) as store:
        plan = await replay.plan(store, POLICY)
        assert plan.summary()["orders"] == 2
        assert _scratch_files(tmp_path) == []
        await replay.apply(store, plan, NOW)
        await plan.close()
    assert _scratch_files(tmp_path) == []


async def test_a_replay_that_fails_while_installing_changes_nothing(tmp_path: Path) -> None:
    """The rebuilt state goes in with one transaction: a failure inside it leaves every derived row as it was."""
    db = tmp_path / "o.db"
    await _two_orders(db)
    _corrupt(db, OID)
    before = [_sql(db, f"SELECT * FROM {t} ORDER BY 1") for t in ("orders", "timers", "history", "outbox", "cursor")]
    async with await Store.open(db) as store:
        plan = await replay.plan(store, POLICY)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("omsd.state.store.outbox.requeue_superseded", _fail)
            with pytest.raises(RuntimeError, match="disk on fire"):
                await replay.apply(store, plan, NOW)
    assert [
        _sql(db, f"SELECT * FROM {t} ORDER BY 1") for t in ("orders", "timers", "history", "outbox", "cursor")
    ] == before


async def _fail(*args: object) -> None:
    raise RuntimeError("disk on fire")
