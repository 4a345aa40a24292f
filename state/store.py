"""The one class that owns SQLite: journal, derived order rows, outbox, timers.

Every public method is one atomic unit: it takes the store's lock and runs in
its own `BEGIN IMMEDIATE` transaction (sqlite3's implicit transactions are off),
so coroutines sharing the connection never join each other's transactions.
`synchronous=FULL` in WAL mode: when a method returns, its write is on disk,
which is what lets the feed poller commit a handle to VTEX right after.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiosqlite

from omsd.state.events import AnyEntry, ApprovalFailed, TimerFired, current_version
from omsd.state.models import EFFECT_ADAPTER, Effect, Order, is_superseded
from omsd.state.schema import MIGRATIONS, SCHEMA_VERSION
from omsd.state.statuses import APPROVED_STATUSES, CANCEL_STATUSES, HELD, Phase, Status


class StoreError(Exception):
    """The database cannot be used as it is."""


class SchemaTooNew(StoreError):
    def __init__(self, found: int, known: int) -> None:
        super().__init__(f"database schema version {found} is newer than this omsd knows ({known})")
        self.found = found
        self.known = known


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="microseconds")


def from_iso(text: str) -> datetime:
    return datetime.fromisoformat(text)


@dataclass(frozen=True, slots=True)
class NewEntry:
    """A journal row to append."""

    kind: str
    source: str
    payload: str
    received_at: datetime
    order_id: str | None = None
    dedup_key: str | None = None
    event_id: str | None = None
    reason: str | None = None
    version: int | None = None  # None: the current version of its kind

    @classmethod
    def of(
        cls,
        event: AnyEntry,
        *,
        source: str,
        received_at: datetime,
        dedup_key: str | None = None,
        event_id: str | None = None,
    ) -> NewEntry:
        """The journal row for an accepted event: its kind, order and JSON payload."""
        return cls(
            kind=event.kind,
            source=source,
            order_id=getattr(event, "order_id", None),
            payload=event.model_dump_json(),
            received_at=received_at,
            dedup_key=dedup_key,
            event_id=event_id,
        )


@dataclass(frozen=True, slots=True)
class Appended:
    offset: int | None  # None when the entry was a duplicate
    duplicate: bool


@dataclass(frozen=True, slots=True)
class JournalRow:
    offset: int
    kind: str
    source: str
    order_id: str | None
    payload: str
    reason: str | None
    received_at: datetime
    version: int = 1


@dataclass(frozen=True, slots=True)
class UnreadableRow:
    """A journal row the processor could not read: kept for the operator, never skipped silently."""

    journal_offset: int
    kind: str
    order_id: str | None
    error: str
    received_at: datetime
    found_at: datetime | None = None  # set by the store when it is recorded


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    order_id: str
    seq: int
    effect: Effect
    state: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class HistoryRow:
    order_id: str
    journal_offset: int
    from_phase: str | None
    to_phase: str
    status: str | None
    cause: str
    at: datetime


@dataclass(slots=True)
class Batch:
    """What the processor decided for a run of journal events, committed as one unit."""

    offset: int
    orders: dict[str, Order] = field(default_factory=dict)
    before: dict[str, Order | None] = field(default_factory=dict)
    effects: list[Effect] = field(default_factory=list)
    history: list[HistoryRow] = field(default_factory=list)
    add_pending: dict[str, tuple[str, int]] = field(default_factory=dict)
    remove_pending: set[str] = field(default_factory=set)
    unreadable: list[UnreadableRow] = field(default_factory=list)


class Store:
    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()
        self.path = path

    # ---- lifecycle ---------------------------------------------------------------
    @classmethod
    async def open(cls, path: str | Path, *, migrate: bool = True) -> Self:
        path = Path(path)
        try:
            conn = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        store = cls(conn, path)
        try:
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA synchronous=FULL")
            await conn.execute("PRAGMA busy_timeout=5000")
            version = await store.schema_version()
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(version, SCHEMA_VERSION)
            if migrate and version < SCHEMA_VERSION:
                await store.migrate()
        except sqlite3.Error as exc:
            await conn.close()
            raise StoreError(f"cannot use database {path}: {exc}") from exc
        except BaseException:
            await conn.close()
            raise
        return store

    async def close(self) -> None:
        await self._conn.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def schema_version(self) -> int:
        async with self._conn.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def migrate(self, target: int = SCHEMA_VERSION) -> None:
        """Apply forward migrations up to `target`, each in its own transaction."""
        async with self._lock:
            current = await self.schema_version()
            for version in range(current + 1, target + 1):
                await self._conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _statements(MIGRATIONS[version - 1]):
                        await self._conn.execute(statement)
                    await self._conn.execute(f"PRAGMA user_version={version}")
                    await self._conn.execute("COMMIT")
                except BaseException:
                    await self._conn.execute("ROLLBACK")
                    raise

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")

    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        async with self._lock, self._conn.execute(sql, params) as cur:
            rows = await cur.fetchall()
        return list(rows)

    async def writable(self) -> bool:
        """True when a write transaction can be taken (for health checks)."""
        try:
            async with self._tx() as conn:
                await conn.execute("UPDATE cursor SET name = name WHERE name = 'processor'")
        except sqlite3.Error:
            return False
        return True

    # ---- journal intake ------------------------------------------------------------
    async def append(self, entries: Sequence[NewEntry], acks: Iterable[str] = (), *, now: datetime) -> list[Appended]:
        """Append entries (duplicates by dedup key or event id are skipped) and record
        feed handles to commit (received `now`), all in one durable transaction."""
        results: list[Appended] = []
        async with self._tx() as conn:
            for entry in entries:
                results.append(await self._insert(conn, entry))
            await conn.executemany(
                "INSERT OR IGNORE INTO feed_acks (handle, received_at) VALUES (?, ?)",
                [(handle, iso(now)) for handle in acks],
            )
        return results

    @staticmethod
    async def _insert(conn: aiosqlite.Connection, entry: NewEntry) -> Appended:
        if entry.dedup_key is not None or entry.event_id is not None:
            async with conn.execute(
                "SELECT 1 FROM journal WHERE dedup_key = ? OR event_id = ?",
                (entry.dedup_key, entry.event_id),
            ) as cur:
                if await cur.fetchone() is not None:
                    return Appended(offset=None, duplicate=True)
        cur = await conn.execute(
            "INSERT INTO journal (kind, version, source, order_id, dedup_key, event_id, payload, reason, received_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.kind,
                entry.version or current_version(entry.kind),
                entry.source,
                entry.order_id,
                entry.dedup_key,
                entry.event_id,
                entry.payload,
                entry.reason,
                iso(entry.received_at),
            ),
        )
        return Appended(offset=cur.lastrowid, duplicate=False)

    async def pending_acks(self, limit: int = 100) -> list[str]:
        rows = await self._all("SELECT handle FROM feed_acks ORDER BY received_at LIMIT ?", (limit,))
        return [r["handle"] for r in rows]

    async def acks_done(self, handles: Sequence[str]) -> None:
        async with self._tx() as conn:
            await conn.executemany("DELETE FROM feed_acks WHERE handle = ?", [(h,) for h in handles])

    async def acks_failed(self, handles: Sequence[str], error: str, drop_before: datetime) -> int:
        """Count a failed commit; handles older than `drop_before` are dropped (VTEX has
        made their items visible again by now, and dedup absorbs the redelivery)."""
        async with self._tx() as conn:
            await conn.executemany(
                "UPDATE feed_acks SET attempts = attempts + 1, last_error = ? WHERE handle = ?",
                [(error, h) for h in handles],
            )
            cur = await conn.execute("DELETE FROM feed_acks WHERE received_at < ?", (iso(drop_before),))
            return cur.rowcount

    # ---- processor -----------------------------------------------------------------
    async def processor_offset(self) -> int:
        rows = await self._all("SELECT \"offset\" FROM cursor WHERE name = 'processor'")
        return int(rows[0]["offset"])

    async def last_offset(self) -> int:
        rows = await self._all('SELECT COALESCE(MAX("offset"), 0) AS o FROM journal')
        return int(rows[0]["o"])

    async def journal_after(self, offset: int, limit: int = 200) -> list[JournalRow]:
        rows = await self._all('SELECT * FROM journal WHERE "offset" > ? ORDER BY "offset" LIMIT ?', (offset, limit))
        return [_journal_row(r) for r in rows]

    async def load_order(self, order_id: str) -> Order | None:
        rows = await self._all("SELECT data FROM orders WHERE order_id = ?", (order_id,))
        return Order.model_validate_json(rows[0]["data"]) if rows else None

    async def order_by_marketplace_id(self, marketplace_order_id: str) -> Order | None:
        rows = await self._all(
            "SELECT data FROM orders WHERE marketplace_order_id = ? ORDER BY updated_at DESC LIMIT 1",
            (marketplace_order_id,),
        )
        return Order.model_validate_json(rows[0]["data"]) if rows else None

    async def pending_intent(self, marketplace_order_id: str) -> tuple[str, int] | None:
        rows = await self._all(
            "SELECT source, journal_offset FROM pending_intents WHERE marketplace_order_id = ?",
            (marketplace_order_id,),
        )
        return (rows[0]["source"], int(rows[0]["journal_offset"])) if rows else None

    async def commit_batch(self, batch: Batch, *, now: datetime) -> int:
        """Write the processor's decisions and its new offset in one transaction.
        Effects already superseded (by a later event of the batch, or earlier pending
        ones by this batch) are never performed. Returns how many effects were written."""
        effects = [e for e in batch.effects if not is_superseded(batch.orders.get(e.order_id), e.seq)]
        async with self._tx() as conn:
            for effect in effects:
                await conn.execute(
                    "INSERT OR IGNORE INTO outbox (order_id, seq, kind, payload, created_at) VALUES (?, ?, ?, ?, ?)",
                    (effect.order_id, effect.seq, effect.kind, effect.model_dump_json(), iso(now)),
                )
            for order_id, order in batch.orders.items():
                await conn.execute(
                    "INSERT INTO orders (order_id, marketplace_order_id, phase, status, data, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(order_id) DO UPDATE SET "
                    "marketplace_order_id = excluded.marketplace_order_id, phase = excluded.phase, "
                    "status = excluded.status, data = excluded.data, updated_at = excluded.updated_at",
                    (
                        order_id,
                        order.marketplace_order_id,
                        order.phase,
                        order.status,
                        order.model_dump_json(),
                        iso(order.updated_at or now),
                    ),
                )
                await self._supersede(conn, order, now)
                previous = batch.before.get(order_id)
                if previous is None or previous.timer != order.timer:
                    await conn.execute("DELETE FROM timers WHERE order_id = ?", (order_id,))
                    if order.timer is not None:
                        await conn.execute(
                            "INSERT INTO timers (order_id, token, reason, due_at) VALUES (?, ?, ?, ?)",
                            (order_id, order.timer.token, order.timer.reason, iso(order.timer.due_at)),
                        )
            for h in batch.history:
                await conn.execute(
                    "INSERT INTO history (order_id, journal_offset, from_phase, to_phase, status, cause, at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (h.order_id, h.journal_offset, h.from_phase, h.to_phase, h.status, h.cause, iso(h.at)),
                )
            for mkt in batch.remove_pending:  # first: an intent may expire and be parked anew in one batch
                await conn.execute("DELETE FROM pending_intents WHERE marketplace_order_id = ?", (mkt,))
            for mkt, (source, offset) in batch.add_pending.items():
                await conn.execute(
                    "INSERT OR IGNORE INTO pending_intents (marketplace_order_id, source, journal_offset, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    (mkt, source, offset, iso(now)),
                )
            await conn.executemany(
                "INSERT OR REPLACE INTO unreadable (journal_offset, kind, order_id, error, received_at, found_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (u.journal_offset, u.kind, u.order_id, u.error, iso(u.received_at), iso(now))
                    for u in batch.unreadable
                ],
            )
            await conn.execute("UPDATE cursor SET \"offset\" = ? WHERE name = 'processor'", (batch.offset,))
        return len(effects)

    @staticmethod
    async def _supersede(conn: aiosqlite.Connection, order: Order, now: datetime) -> None:
        async with conn.execute(
            "SELECT id, seq FROM outbox WHERE order_id = ? AND state = 'pending'", (order.order_id,)
        ) as cur:
            stale = [(iso(now), r["id"]) for r in await cur.fetchall() if is_superseded(order, r["seq"])]
        await conn.executemany("UPDATE outbox SET state = 'superseded', done_at = ? WHERE id = ?", stale)

    # ---- effects ----------------------------------------------------------------------
    async def claim_effects(self, limit: int, *, now: datetime) -> list[OutboxRow]:
        """Mark up to `limit` pending effects as started (at `now`) and return them."""
        async with self._tx() as conn:
            async with conn.execute(
                "SELECT * FROM outbox WHERE state = 'pending' ORDER BY id LIMIT ?", (limit,)
            ) as cur:
                rows = list(await cur.fetchall())
            await conn.executemany(
                "UPDATE outbox SET state = 'started', started_at = ? WHERE id = ?", [(iso(now), r["id"]) for r in rows]
            )
        return [_outbox_row(r) for r in rows]

    async def finish_effect(self, outbox_id: int, result: NewEntry, *, now: datetime) -> Appended:
        """Append the effect's result and close the outbox row (done at `now`), atomically."""
        async with self._tx() as conn:
            appended = await self._insert(conn, result)
            await conn.execute("UPDATE outbox SET state = 'done', done_at = ? WHERE id = ?", (iso(now), outbox_id))
        return appended

    async def recover_interrupted(self, now: datetime) -> int:
        """Effects started by a process that died. A Get order is simply run again; an
        approval PUT may or may not have reached VTEX, so it is recorded as failed with
        an unknown outcome and the machine re-checks the order before any resend."""
        async with self._tx() as conn:
            async with conn.execute("SELECT * FROM outbox WHERE state = 'started'") as cur:
                rows = [_outbox_row(r) for r in await cur.fetchall()]
            for row in rows:
                if row.effect.kind == "fetch_order":
                    await conn.execute("UPDATE outbox SET state = 'pending' WHERE id = ?", (row.id,))
                    continue
                event = ApprovalFailed(
                    order_id=row.order_id, seq=row.seq, error="interrupted: outcome unknown", retryable=True
                )
                await self._insert(
                    conn, NewEntry.of(event, source="recovery", received_at=now, dedup_key=f"effect:{row.id}")
                )
                await conn.execute("UPDATE outbox SET state = 'done', done_at = ? WHERE id = ?", (iso(now), row.id))
        return len(rows)

    async def fire_due_timers(self, now: datetime) -> int:
        """Turn due timers into TimerFired journal events, exactly once each."""
        async with self._tx() as conn:
            async with conn.execute("SELECT * FROM timers WHERE due_at <= ?", (iso(now),)) as cur:
                rows = list(await cur.fetchall())
            for r in rows:
                event = TimerFired(order_id=r["order_id"], token=r["token"], reason=r["reason"])
                key = f"timer:{event.order_id}:{event.token}"
                await self._insert(conn, NewEntry.of(event, source="timer", received_at=now, dedup_key=key))
                await conn.execute("DELETE FROM timers WHERE order_id = ? AND token = ?", (r["order_id"], r["token"]))
        return len(rows)

    async def next_timer_due(self) -> datetime | None:
        rows = await self._all("SELECT MIN(due_at) AS d FROM timers")
        value = rows[0]["d"]
        return from_iso(value) if value else None

    # ---- queries for operators --------------------------------------------------------
    async def find_order(self, key: str) -> Order | None:
        """By VTEX order id, else by marketplace order id."""
        return await self.load_order(key) or await self.order_by_marketplace_id(key)

    async def list_orders(self, phase: str | None = None, limit: int = 1000) -> list[Order]:
        if phase:
            rows = await self._all(
                "SELECT data FROM orders WHERE phase = ? ORDER BY updated_at DESC LIMIT ?", (phase, limit)
            )
        else:
            rows = await self._all("SELECT data FROM orders ORDER BY updated_at DESC LIMIT ?", (limit,))
        return [Order.model_validate_json(r["data"]) for r in rows]

    async def phase_counts(self) -> dict[str, int]:
        rows = await self._all("SELECT phase, COUNT(*) AS n FROM orders GROUP BY phase")
        return {r["phase"]: int(r["n"]) for r in rows}

    async def history(self, order_id: str) -> list[HistoryRow]:
        rows = await self._all("SELECT * FROM history WHERE order_id = ? ORDER BY id", (order_id,))
        return [
            HistoryRow(
                order_id=r["order_id"],
                journal_offset=r["journal_offset"],
                from_phase=r["from_phase"],
                to_phase=r["to_phase"],
                status=r["status"],
                cause=r["cause"],
                at=from_iso(r["at"]),
            )
            for r in rows
        ]

    async def journal_tail(
        self, limit: int = 50, *, order_id: str | None = None, kind: str | None = None
    ) -> list[JournalRow]:
        where, params = [], []
        if order_id:
            where.append("order_id = ?")
            params.append(order_id)
        if kind:
            where.append("kind = ?")
            params.append(kind)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self._all(
            f'SELECT * FROM journal {clause} ORDER BY "offset" DESC LIMIT ?',  # noqa: S608 - fixed fragments
            (*params, limit),
        )
        return [_journal_row(r) for r in reversed(rows)]

    async def link_candidates(self, limit: int) -> list[tuple[str, int]]:
        """Orders worth a lazy link lookup while intents wait parked, as (order_id, seq):
        no intent, marketplace id unknown, not looked up yet, no call in flight, and a known
        status that may still need an approval (index `orders_unlinked`). Those whose VTEX id
        is `{affiliate}-{a parked marketplace id}-{n}` come first (VTEX's ids usually are,
        doc §3.6; a guess only, Get order decides), then held ones, then the newest. None
        while no intent is parked."""
        parked = {
            r["marketplace_order_id"] for r in await self._all("SELECT marketplace_order_id FROM pending_intents")
        }
        if not parked or limit <= 0:
            return []
        marks = ", ".join("?" * len(_LINKABLE))
        rows = await self._all(
            "SELECT order_id, status, updated_at, json_extract(data, '$.seq') AS seq "  # noqa: S608 - fixed fragments
            "FROM orders INDEXED BY orders_unlinked "
            f"WHERE marketplace_order_id IS NULL AND phase = 'tracking' AND status IN ({marks}) "
            "AND json_extract(data, '$.link_checked') = 0 AND json_extract(data, '$.inflight') IS NULL",
            _LINKABLE,
        )
        rows.sort(key=lambda r: r["updated_at"], reverse=True)
        rows.sort(key=lambda r: (_derived_marketplace_id(r["order_id"]) not in parked, r["status"] != HELD.value))
        return [(r["order_id"], int(r["seq"])) for r in rows[:limit]]

    async def link_lookups_in_flight(self) -> int:
        """Link Get orders asked and not answered yet (pending or started in the outbox)."""
        rows = await self._all(
            "SELECT COUNT(*) AS n FROM outbox WHERE state IN ('pending', 'started') "
            "AND kind = 'fetch_order' AND json_extract(payload, '$.purpose') = 'link'"
        )
        return int(rows[0]["n"])

    async def parked_before(self, cutoff: datetime) -> list[tuple[str, int]]:
        """Parked intents whose journal entry was received before `cutoff`, as
        (marketplace_order_id, journal_offset): the journal's time, so a replay agrees."""
        rows = await self._all(
            "SELECT p.marketplace_order_id, p.journal_offset FROM pending_intents p JOIN journal j "
            'ON j."offset" = p.journal_offset WHERE j.received_at < ? ORDER BY p.journal_offset',
            (iso(cutoff),),
        )
        return [(r["marketplace_order_id"], int(r["journal_offset"])) for r in rows]

    async def waiting_with_intent(self) -> list[str]:
        """Orders with an intent waiting for a status event (waiting_release), oldest first."""
        rows = await self._all(
            "SELECT order_id FROM orders WHERE phase = ? ORDER BY updated_at", (Phase.WAITING_RELEASE.value,)
        )
        return [r["order_id"] for r in rows]

    async def intents_waiting(self) -> int:
        """Intents that wait for an event: orders in waiting_release plus parked intents."""
        rows = await self._all(
            "SELECT (SELECT COUNT(*) FROM orders WHERE phase = ?) + (SELECT COUNT(*) FROM pending_intents) AS n",
            (Phase.WAITING_RELEASE.value,),
        )
        return int(rows[0]["n"])

    async def pending_intents(self) -> list[tuple[str, str, int]]:
        rows = await self._all("SELECT * FROM pending_intents ORDER BY created_at")
        return [(r["marketplace_order_id"], r["source"], int(r["journal_offset"])) for r in rows]

    async def unreadable_rows(self) -> list[UnreadableRow]:
        """Journal rows the processor could not read, oldest first."""
        rows = await self._all("SELECT * FROM unreadable ORDER BY journal_offset")
        return [
            UnreadableRow(
                journal_offset=r["journal_offset"],
                kind=r["kind"],
                order_id=r["order_id"],
                error=r["error"],
                received_at=from_iso(r["received_at"]),
                found_at=from_iso(r["found_at"]),
            )
            for r in rows
        ]

    async def outbox_counts(self) -> dict[str, int]:
        rows = await self._all("SELECT state, COUNT(*) AS n FROM outbox GROUP BY state")
        return {r["state"]: int(r["n"]) for r in rows}

    async def stats(self) -> dict[str, Any]:
        rows = await self._all(
            "SELECT (SELECT COUNT(*) FROM journal) AS journal, "
            "(SELECT COUNT(*) FROM journal WHERE kind = 'rejected') AS rejected, "
            "(SELECT COUNT(*) FROM feed_acks) AS acks_pending, "
            "(SELECT COUNT(*) FROM timers) AS timers, "
            "(SELECT COUNT(*) FROM pending_intents) AS pending_intents, "
            "(SELECT COUNT(*) FROM unreadable) AS unreadable"
        )
        out = dict(rows[0])
        out["processor_offset"] = await self.processor_offset()
        out["last_offset"] = await self.last_offset()
        return out

    # ---- repair -------------------------------------------------------------------------
    async def reset_derived(self, *, now: datetime) -> None:
        """Forget everything derived from the journal so the processor rebuilds it.
        Pending effects are superseded (at `now`): replay recomputes and re-issues what is needed."""
        async with self._tx() as conn:
            await conn.execute("DELETE FROM orders")
            await conn.execute("DELETE FROM timers")
            await conn.execute("DELETE FROM history")
            await conn.execute("DELETE FROM pending_intents")
            await conn.execute("DELETE FROM unreadable")
            await conn.execute(
                "UPDATE outbox SET state = 'superseded', done_at = ? WHERE state IN ('pending', 'started')", (iso(now),)
            )
            await conn.execute("UPDATE cursor SET \"offset\" = 0 WHERE name = 'processor'")


# Statuses in which an order may still need an approval: neither canceling nor past approval.
_LINKABLE: tuple[str, ...] = tuple(sorted(s.value for s in Status if s not in CANCEL_STATUSES | APPROVED_STATUSES))


def _derived_marketplace_id(order_id: str) -> str | None:
    """`MKP-123-01` -> `123`: the marketplace id VTEX's examples derive the order id from."""
    head, sep, rest = order_id.partition("-")
    middle, sep2, _ = rest.rpartition("-")
    return middle if sep and sep2 and head and middle else None


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _journal_row(r: sqlite3.Row) -> JournalRow:
    return JournalRow(
        offset=r["offset"],
        kind=r["kind"],
        source=r["source"],
        order_id=r["order_id"],
        payload=r["payload"],
        reason=r["reason"],
        received_at=from_iso(r["received_at"]),
        version=r["version"],
    )


def _outbox_row(r: sqlite3.Row) -> OutboxRow:
    return OutboxRow(
        id=r["id"],
        order_id=r["order_id"],
        seq=r["seq"],
        effect=EFFECT_ADAPTER.validate_json(r["payload"]),
        state=r["state"],
        created_at=from_iso(r["created_at"]),
    )
