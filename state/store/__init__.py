"""The one class that owns SQLite: journal, derived order rows, outbox, timers.

Every public method is one atomic unit: it takes the store's lock and runs in
its own `BEGIN IMMEDIATE` transaction (sqlite3's implicit transactions are off),
so coroutines sharing the connection never join each other's transactions.
`synchronous=FULL` in WAL mode: when a method returns, its write is on disk,
which is what lets the feed poller commit a handle to VTEX right after.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiosqlite

from ..events import SNAPSHOT_CAUSE, AnyEntry, OrderSnapshot, TimerFired, current_version
from ..models import EFFECT_ADAPTER, Effect, Order, is_superseded
from ..statuses import APPROVED_STATUSES, CANCEL_STATUSES, HELD, Phase, Status
from .schema import MIGRATIONS, ROUTED_KINDS, SCHEMA_VERSION, VACUUM_AT


class StoreError(Exception):
    """The database cannot be used as it is."""


class StoreUnwritable(StoreError):
    """The database refuses writes: the disk (or `max_page_count`) is full, the file
    is read-only, or an I/O error. Temporary as far as omsd knows: nothing was written."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# SQLite's primary result codes that mean "cannot write now" rather than "bad SQL".
UNWRITABLE_CODES = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR})
PROBE_BYTES = 8192  # more than a page: the probe needs pages of its own, as real writes do
FILE_MODE = 0o600


def store_error(exc: sqlite3.Error, context: str) -> StoreError:
    """The project's error for a sqlite3 one: StoreUnwritable when the write was refused."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in UNWRITABLE_CODES:
        return StoreUnwritable(str(exc))
    return StoreError(f"{context}: {exc}")


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


@dataclass(frozen=True, slots=True)
class ParkedIntent:
    """An approval intent that names a marketplace order id no VTEX order is linked to yet."""

    marketplace_order_id: str
    source: str
    journal_offset: int
    since: datetime | None  # when the intent was journaled (None: its row is gone)


@dataclass(slots=True)
class Pruned:
    """What a prune removed (or, previewed, would remove)."""

    orders: int = 0  # orders whose rows were replaced by one snapshot each
    journal_rows: int = 0  # their journal rows removed (the snapshots not counted)
    history_rows: int = 0
    outbox_rows: int = 0
    rejected_rows: int = 0

    def add(self, other: Pruned) -> None:
        self.orders += other.orders
        self.journal_rows += other.journal_rows
        self.history_rows += other.history_rows
        self.outbox_rows += other.outbox_rows
        self.rejected_rows += other.rejected_rows


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
        # Told when SQLite refuses a write (with why), and when a probe writes again.
        self.on_unwritable: Callable[[str], None] | None = None
        self.on_writable: Callable[[], None] | None = None

    # ---- lifecycle ---------------------------------------------------------------
    @classmethod
    async def open(cls, path: str | Path, *, migrate: bool = True) -> Self:
        path = Path(path)
        try:
            _create_private(path)
            conn = await aiosqlite.connect(path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
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
            _tighten(path)
        except sqlite3.Error as exc:
            await conn.close()
            raise store_error(exc, f"cannot use database {path}") from exc
        except BaseException:
            await conn.close()
            raise
        return store

    @classmethod
    async def open_readonly(cls, path: str | Path) -> Self:
        """The database opened read-only (`mode=ro`): nothing this connection does can
        change the file. For previews (`omsd replay --dry-run`); no migration. Without a
        write-ahead log beside it (no process has it open) it is read as immutable, which
        keeps SQLite from creating an empty `-wal` file next to it."""
        path = Path(path)
        wal = path.with_name(path.name + "-wal")
        mode = "mode=ro" if wal.exists() else "mode=ro&immutable=1"
        try:
            conn = await aiosqlite.connect(f"{path.resolve().as_uri()}?{mode}", uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        store = cls(conn, path)
        try:
            version = await store.schema_version()
        except sqlite3.Error as exc:
            await conn.close()
            raise StoreError(f"cannot read database {path}: {exc}") from exc
        if version != SCHEMA_VERSION:
            await conn.close()
            raise StoreError(f"database schema version {version} is not {SCHEMA_VERSION}: open it once without preview")
        return store

    @classmethod
    async def open_copy(cls, path: str | Path) -> Self:
        """An in-memory copy of the database (sqlite's backup API, the file opened
        read-only): a scratch store for previews that write (`omsd ingest --dry-run`)."""
        source = await cls.open_readonly(path)
        conn = await aiosqlite.connect(":memory:", isolation_level=None)
        try:
            await source._conn.backup(conn)
        finally:
            await source.close()
        conn.row_factory = sqlite3.Row
        return cls(conn, Path(path))

    async def close(self) -> None:
        await self._conn.close()

    async def set_max_pages(self, pages: int | None) -> int:
        """Cap the database's size in pages on this connection (None: only read it).
        Returns the current page count. For tests and operators who want headroom."""
        async with self._lock:
            if pages is not None:
                await self._conn.execute(f"PRAGMA max_page_count={int(pages)}")
            async with self._conn.execute("PRAGMA page_count") as cur:
                row = await cur.fetchone()
        return int(row[0]) if row else 0

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
                if version == VACUUM_AT:
                    await self._incremental_auto_vacuum()
                await self._conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _statements(MIGRATIONS[version - 1]):
                        await self._conn.execute(statement)
                    await self._conn.execute(f"PRAGMA user_version={version}")
                    await self._conn.execute("COMMIT")
                except BaseException:
                    await self._conn.execute("ROLLBACK")
                    raise

    async def _incremental_auto_vacuum(self) -> None:
        """Switch the file to incremental auto-vacuum. Only a VACUUM makes the setting take
        (even on a new file: WAL mode has written its header already). It rewrites the file:
        instant on a new one; on an older one it needs free disk space the size of the
        database, and without it fails and leaves the file as it was (at version 3)."""
        await self._conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        await self._conn.execute("VACUUM")

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction. A sqlite3 error leaves as StoreError (StoreUnwritable
        when SQLite refused the write); nothing was written either way."""
        async with self._lock:
            try:
                await self._conn.execute("BEGIN IMMEDIATE")
                yield self._conn
                await self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                await asyncio.shield(self._rollback())
                error = store_error(exc, "database write failed")
                if isinstance(error, StoreUnwritable) and self.on_unwritable is not None:
                    self.on_unwritable(error.reason)
                raise error from exc
            except BaseException:
                # Cancelled or failed anywhere, BEGIN and COMMIT included: aiosqlite runs
                # statements in order on its own thread even when the awaiting task is
                # cancelled, so a ROLLBACK queued now (shielded, under the lock) ends
                # whatever transaction is open; "no transaction is active" is fine.
                await asyncio.shield(self._rollback())
                raise

    async def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.OperationalError):
            await self._conn.execute("ROLLBACK")

    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            async with self._lock, self._conn.execute(sql, params) as cur:
                rows = await cur.fetchall()
        except sqlite3.Error as exc:
            raise store_error(exc, "database read failed") from exc
        return list(rows)

    async def probe_write(self) -> str | None:
        """Write and commit for real: a row bigger than a page (so SQLite must find
        pages for it, as real writes do), deleted in the same transaction. None when
        the write reached the disk, else why SQLite refused it."""
        try:
            async with self._tx() as conn:
                await conn.execute(
                    "INSERT INTO feed_acks (handle, received_at, last_error) VALUES (?, '', randomblob(?))",
                    (PROBE_HANDLE, PROBE_BYTES),
                )
                await conn.execute("DELETE FROM feed_acks WHERE handle = ?", (PROBE_HANDLE,))
        except StoreError as exc:
            return str(exc)
        if self.on_writable is not None:
            self.on_writable()
        return None

    async def writable(self) -> bool:
        """True when a real write commits (for health checks)."""
        return await self.probe_write() is None

    # ---- journal intake ------------------------------------------------------------
    async def append(self, entries: Sequence[NewEntry], acks: Iterable[str] = (), *, now: datetime) -> list[Appended]:
        """Append entries (duplicates by dedup key or event id are skipped) and record
        feed handles to commit (received `now`), all in one durable transaction."""
        async with self._tx() as conn:
            results = await self._insert_many(conn, entries)
            await conn.executemany(
                "INSERT OR IGNORE INTO feed_acks (handle, received_at) VALUES (?, ?)",
                [(handle, iso(now)) for handle in acks],
            )
        return results

    @staticmethod
    async def _insert_many(conn: aiosqlite.Connection, entries: Sequence[NewEntry]) -> list[Appended]:
        """`_insert` for many entries in a few statements (one lookup of the keys already
        journaled per chunk, one INSERT for all new rows): a group commit of hundreds of
        feed items costs a handful of trips to the database thread, not two per item.
        Same outcome as inserting one by one: an entry is a duplicate when its dedup key
        or its event id is journaled already, or came earlier in the same call."""
        seen_keys, seen_ids = await _journaled_keys(conn, entries)
        fresh: list[NewEntry] = []
        fresh_at: list[int] = []
        for n, entry in enumerate(entries):
            if entry.dedup_key in seen_keys or entry.event_id in seen_ids:
                continue
            if entry.dedup_key is not None:
                seen_keys.add(entry.dedup_key)
            if entry.event_id is not None:
                seen_ids.add(entry.event_id)
            fresh.append(entry)
            fresh_at.append(n)
        results = [Appended(offset=None, duplicate=True) for _ in entries]
        if not fresh:
            return results
        async with conn.execute('SELECT COALESCE(MAX("offset"), 0) FROM journal') as cur:
            before = int((await cur.fetchone())[0])  # type: ignore[index]
        await conn.executemany(_INSERT_JOURNAL, [_journal_values(e) for e in fresh])
        # The only writer, inside its transaction: the new rows are the ones past `before`,
        # their offsets rising in the order they were inserted.
        async with conn.execute('SELECT "offset" FROM journal WHERE "offset" > ? ORDER BY "offset"', (before,)) as cur:
            offsets = [int(r[0]) for r in await cur.fetchall()]
        if len(offsets) != len(fresh):
            raise StoreError(f"journal append: {len(fresh)} rows inserted, {len(offsets)} found")
        for n, offset in zip(fresh_at, offsets, strict=True):
            results[n] = Appended(offset=offset, duplicate=False)
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
        cur = await conn.execute(_INSERT_JOURNAL, _journal_values(entry))
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

    async def load_orders(self, order_ids: Collection[str]) -> dict[str, Order]:
        """The stored orders among `order_ids` (absent ones are left out), in one query per 500."""
        found: dict[str, Order] = {}
        for part in _parts(list(order_ids)):
            sql = f"SELECT data FROM orders WHERE order_id IN ({_marks(part)})"  # noqa: S608 - placeholders only
            rows = await self._all(sql, part)
            found.update((o.order_id, o) for o in (Order.model_validate_json(r["data"]) for r in rows))
        return found

    async def orders_by_marketplace_ids(self, marketplace_order_ids: Collection[str]) -> dict[str, Order]:
        """Per marketplace id, the order `order_by_marketplace_id` would return (the latest updated)."""
        found: dict[str, Order] = {}
        for part in _parts(list(marketplace_order_ids)):
            rows = await self._all(
                f"SELECT data FROM orders WHERE marketplace_order_id IN ({_marks(part)}) ORDER BY updated_at",  # noqa: S608
                part,
            )
            for r in rows:  # ascending: the latest updated wins
                order = Order.model_validate_json(r["data"])
                found[order.marketplace_order_id or ""] = order
        return found

    async def pending_intents_for(self, marketplace_order_ids: Collection[str]) -> dict[str, tuple[str, int]]:
        """`pending_intent` for many marketplace ids at once (those with none are left out)."""
        found: dict[str, tuple[str, int]] = {}
        for part in _parts(list(marketplace_order_ids)):
            rows = await self._all(
                f"SELECT marketplace_order_id, source, journal_offset FROM pending_intents WHERE marketplace_order_id IN ({_marks(part)})",  # noqa: S608, E501
                part,
            )
            found.update((r["marketplace_order_id"], (r["source"], int(r["journal_offset"]))) for r in rows)
        return found

    async def commit_batch(self, batch: Batch, *, now: datetime) -> int:
        """Write the processor's decisions and its new offset in one transaction.
        Effects already superseded (by a later event of the batch, or earlier pending
        ones by this batch) are never performed. Returns how many effects were written.
        One statement per kind of row (executemany), not one per row."""
        effects = [e for e in batch.effects if not is_superseded(batch.orders.get(e.order_id), e.seq)]
        stamp = iso(now)
        moved = list(batch.orders.items())
        async with self._tx() as conn:
            await conn.executemany(
                "INSERT OR IGNORE INTO outbox (order_id, seq, kind, payload, created_at) VALUES (?, ?, ?, ?, ?)",
                [(e.order_id, e.seq, e.kind, e.model_dump_json(), stamp) for e in effects],
            )
            await conn.executemany(
                "INSERT INTO orders (order_id, marketplace_order_id, phase, status, data, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(order_id) DO UPDATE SET "
                "marketplace_order_id = excluded.marketplace_order_id, phase = excluded.phase, "
                "status = excluded.status, data = excluded.data, updated_at = excluded.updated_at",
                [
                    (k, o.marketplace_order_id, o.phase, o.status, o.model_dump_json(), iso(o.updated_at or now))
                    for k, o in moved
                ],
            )
            await self._supersede_all(conn, dict(moved), stamp)
            retimed = [(k, o) for k, o in moved if (p := batch.before.get(k)) is None or p.timer != o.timer]
            await conn.executemany("DELETE FROM timers WHERE order_id = ?", [(k,) for k, _ in retimed])
            await conn.executemany(
                "INSERT INTO timers (order_id, token, reason, due_at) VALUES (?, ?, ?, ?)",
                [(k, o.timer.token, o.timer.reason, iso(o.timer.due_at)) for k, o in retimed if o.timer is not None],
            )
            await conn.executemany(
                "INSERT INTO history (order_id, journal_offset, from_phase, to_phase, status, cause, at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (h.order_id, h.journal_offset, h.from_phase, h.to_phase, h.status, h.cause, iso(h.at))
                    for h in batch.history
                ],
            )
            # first: an intent may expire and be parked anew in one batch
            await conn.executemany(
                "DELETE FROM pending_intents WHERE marketplace_order_id = ?", [(m,) for m in batch.remove_pending]
            )
            await conn.executemany(
                "INSERT OR IGNORE INTO pending_intents (marketplace_order_id, source, journal_offset, created_at) "
                "VALUES (?, ?, ?, ?)",
                [(mkt, source, offset, stamp) for mkt, (source, offset) in batch.add_pending.items()],
            )
            await conn.executemany(
                "INSERT OR REPLACE INTO unreadable (journal_offset, kind, order_id, error, received_at, found_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(u.journal_offset, u.kind, u.order_id, u.error, iso(u.received_at), stamp) for u in batch.unreadable],
            )
            await conn.execute("UPDATE cursor SET \"offset\" = ? WHERE name = 'processor'", (batch.offset,))
        return len(effects)

    @staticmethod
    async def _supersede_all(conn: aiosqlite.Connection, orders: dict[str, Order], stamp: str) -> None:
        """Mark the pending effects these orders no longer wait for as superseded."""
        stale: list[tuple[str, int]] = []
        for part in _parts(list(orders)):
            async with conn.execute(
                f"SELECT id, order_id, seq FROM outbox WHERE order_id IN ({_marks(part)}) AND state = 'pending'",  # noqa: S608
                part,
            ) as cur:
                stale += [
                    (stamp, r["id"]) for r in await cur.fetchall() if is_superseded(orders[r["order_id"]], r["seq"])
                ]
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

    async def started_effects(self) -> list[OutboxRow]:
        """Effects marked started and never finished (their process stopped mid-call)."""
        rows = await self._all("SELECT * FROM outbox WHERE state = 'started' ORDER BY id")
        return [_outbox_row(r) for r in rows]

    async def requeue_effect(self, outbox_id: int) -> None:
        """Put a started effect back to pending, to be claimed and performed again."""
        async with self._tx() as conn:
            await conn.execute("UPDATE outbox SET state = 'pending' WHERE id = ? AND state = 'started'", (outbox_id,))

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
        self,
        limit: int = 50,
        *,
        order_id: str | None = None,
        kind: str | None = None,
        marketplace_order_id: str | None = None,
    ) -> list[JournalRow]:
        where, params = _journal_filter(order_id, marketplace_order_id, kind)
        rows = await self._all(
            f'SELECT * FROM journal WHERE 1 {where} ORDER BY "offset" DESC LIMIT ?',  # noqa: S608 - fixed fragments
            (*params, limit),
        )
        return [_journal_row(r) for r in reversed(rows)]

    async def count_orders(self, phase: str | None = None) -> int:
        if phase:
            rows = await self._all("SELECT COUNT(*) AS n FROM orders WHERE phase = ?", (phase,))
        else:
            rows = await self._all("SELECT COUNT(*) AS n FROM orders")
        return int(rows[0]["n"])

    async def journal_since(
        self,
        after: int,
        limit: int = 1000,
        *,
        order_id: str | None = None,
        marketplace_order_id: str | None = None,
        kind: str | None = None,
    ) -> list[JournalRow]:
        """Rows after offset `after`, oldest first: all, or one order's (by its id, and the
        intents and notifications that came under its marketplace id), of one kind."""
        where, params = _journal_filter(order_id, marketplace_order_id, kind)
        rows = await self._all(
            f'SELECT * FROM journal WHERE "offset" > ? {where} ORDER BY "offset" LIMIT ?',  # noqa: S608 - fixed fragments
            (after, *params, limit),
        )
        return [_journal_row(r) for r in rows]

    async def parked_intents(self) -> list[ParkedIntent]:
        """Parked intents, oldest first, with the time their journal row was received."""
        rows = await self._all(
            "SELECT p.marketplace_order_id, p.source, p.journal_offset, j.received_at FROM pending_intents p "
            'LEFT JOIN journal j ON j."offset" = p.journal_offset ORDER BY p.journal_offset'
        )
        return [
            ParkedIntent(
                r["marketplace_order_id"],
                r["source"],
                int(r["journal_offset"]),
                from_iso(r["received_at"]) if r["received_at"] else None,
            )
            for r in rows
        ]

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
    async def journal_chunks(
        self, after: int = 0, upto: int | None = None, size: int = 20_000
    ) -> AsyncIterator[list[JournalRow]]:
        """The journal after offset `after` (up to `upto`, inclusive), in offset order, `size` rows at a time."""
        end = upto if upto is not None else await self.last_offset()
        while after < end:
            rows = await self._all(
                'SELECT * FROM journal WHERE "offset" > ? AND "offset" <= ? ORDER BY "offset" LIMIT ?',
                (after, end, size),
            )
            if not rows:
                return
            chunk = [_journal_row(r) for r in rows]
            after = chunk[-1].offset
            yield chunk

    async def ingest(self, entries: Sequence[NewEntry]) -> list[Appended]:
        """Append entries captured elsewhere, all or nothing. Besides the dedup keys, an
        entry without keys that matches a journal row exactly (kind, order, time, payload)
        is a duplicate, so ingesting the same export twice adds nothing."""
        results: list[Appended] = []
        async with self._tx() as conn:
            for entry in entries:
                if entry.dedup_key is None and entry.event_id is None:
                    async with conn.execute(
                        "SELECT 1 FROM journal WHERE order_id IS ? AND kind = ? AND received_at = ? AND payload = ?",
                        (entry.order_id, entry.kind, iso(entry.received_at), entry.payload),
                    ) as cur:
                        if await cur.fetchone() is not None:
                            results.append(Appended(offset=None, duplicate=True))
                            continue
                results.append(await self._insert(conn, entry))
        return results

    async def export_rows(
        self,
        *,
        after: int = 0,
        order_id: str | None = None,
        marketplace_order_id: str | None = None,
        kinds: Sequence[str] = (),
    ) -> AsyncIterator[dict[str, Any]]:
        """Journal rows as stored, in offset order: all, or those of one order (by its id, or
        routed to it by its marketplace id), of some kinds."""
        where, params = ['"offset" > ?'], list[Any]([after])
        if order_id is not None:
            # Routed rows of the routed kinds only: a rejected row's payload need not be JSON at all.
            clause, extra = _journal_filter(order_id, marketplace_order_id or order_id, None)
            where.append(clause.removeprefix(" AND "))
            params += extra
        if kinds:
            where.append(f"kind IN ({', '.join('?' * len(kinds))})")
            params += list(kinds)
        while True:
            rows = await self._all(
                f'SELECT * FROM journal WHERE {" AND ".join(where)} ORDER BY "offset" LIMIT 5000',  # noqa: S608
                params,
            )
            if not rows:
                return
            for r in rows:
                yield dict(r)
            params[0] = rows[-1]["offset"]

    async def orders_by_id(self) -> dict[str, Order]:
        rows = await self._all("SELECT data FROM orders")
        return {o.order_id: o for o in (Order.model_validate_json(r["data"]) for r in rows)}

    async def outbox_states(self) -> dict[tuple[str, int], str]:
        """(order id, seq) -> state of every outbox row."""
        rows = await self._all("SELECT order_id, seq, state FROM outbox")
        return {(r["order_id"], int(r["seq"])): r["state"] for r in rows}

    async def replace_derived(
        self, batch: Batch, *, only: set[str] | None, cursor: int | None, reissue: Sequence[Effect], now: datetime
    ) -> None:
        """Write a rebuilt state in one transaction: every derived row (`only` None), or
        those of the orders in `only`. Outbox rows their orders no longer wait for are
        superseded; `reissue` effects are queued again (a superseded row becomes pending)."""
        orders = {k: v for k, v in batch.orders.items() if only is None or k in only}
        async with self._tx() as conn:
            if only is None:
                for table in ("orders", "timers", "history", "pending_intents", "unreadable"):
                    await conn.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed names
            else:
                for table in ("orders", "timers", "history"):
                    await conn.executemany(f"DELETE FROM {table} WHERE order_id = ?", [(k,) for k in only])  # noqa: S608
            await self._write_rebuilt(conn, batch, orders, only is None, now)
            async with conn.execute(
                "SELECT id, order_id, seq FROM outbox WHERE state IN ('pending', 'started')"
            ) as cur:
                stale = [
                    (iso(now), r["id"])
                    for r in await cur.fetchall()
                    if (only is None or r["order_id"] in only) and is_superseded(orders.get(r["order_id"]), r["seq"])
                ]
            await conn.executemany("UPDATE outbox SET state = 'superseded', done_at = ? WHERE id = ?", stale)
            await conn.executemany(
                "INSERT INTO outbox (order_id, seq, kind, payload, created_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(order_id, seq) DO UPDATE SET state = 'pending', started_at = NULL, done_at = NULL "
                "WHERE state = 'superseded'",
                [(e.order_id, e.seq, e.kind, e.model_dump_json(), iso(now)) for e in reissue],
            )
            if cursor is not None:
                await conn.execute("UPDATE cursor SET \"offset\" = ? WHERE name = 'processor'", (cursor,))

    @staticmethod
    async def _write_rebuilt(
        conn: aiosqlite.Connection, batch: Batch, orders: dict[str, Order], everything: bool, now: datetime
    ) -> None:
        await conn.executemany(
            "INSERT INTO orders (order_id, marketplace_order_id, phase, status, data, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [
                (k, o.marketplace_order_id, o.phase, o.status, o.model_dump_json(), iso(o.updated_at or now))
                for k, o in orders.items()
            ],
        )
        await conn.executemany(
            "INSERT INTO timers (order_id, token, reason, due_at) VALUES (?, ?, ?, ?)",
            [(k, o.timer.token, o.timer.reason, iso(o.timer.due_at)) for k, o in orders.items() if o.timer is not None],
        )
        await conn.executemany(
            "INSERT INTO history (order_id, journal_offset, from_phase, to_phase, status, cause, at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (h.order_id, h.journal_offset, h.from_phase, h.to_phase, h.status, h.cause, iso(h.at))
                for h in batch.history
                if everything or h.order_id in orders
            ],
        )
        if not everything:
            await conn.executemany(
                "DELETE FROM pending_intents WHERE marketplace_order_id = ?",
                [(o.marketplace_order_id,) for o in orders.values() if o.marketplace_order_id is not None],
            )
            return
        await conn.executemany(
            "INSERT INTO pending_intents (marketplace_order_id, source, journal_offset, created_at) "
            "VALUES (?, ?, ?, ?)",
            [(mkt, source, offset, iso(now)) for mkt, (source, offset) in batch.add_pending.items()],
        )
        await conn.executemany(
            "INSERT INTO unreadable (journal_offset, kind, order_id, error, received_at, found_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(u.journal_offset, u.kind, u.order_id, u.error, iso(u.received_at), iso(now)) for u in batch.unreadable],
        )

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

    # ---- retention ----------------------------------------------------------------------
    async def prune_candidates(
        self, phases: Sequence[str], before: datetime, *, page: int = 500
    ) -> AsyncGenerator[list[str], None]:
        """Orders that a prune would reduce to a snapshot, oldest first, `page` at a time:
        in one of `phases`, unchanged since before `before`, waiting on nothing (no effect
        in flight, no timer), with rows to prune (not just their snapshot), no unreadable
        row, no parked intent and no other order on their marketplace id (its routed rows
        could be that order's). The list is taken once, into a temporary table, and read
        from there a page at a time: a first prune of a million quiet orders does not hold
        a million ids in memory (nor scan the orders once per page)."""
        marks = ", ".join("?" * len(phases))
        select = (
            f"SELECT o.order_id FROM orders o WHERE o.phase IN ({marks}) AND o.updated_at < ? "  # noqa: S608
            "AND json_extract(o.data, '$.inflight') IS NULL AND json_extract(o.data, '$.timer') IS NULL "
            "AND NOT EXISTS (SELECT 1 FROM unreadable u WHERE u.order_id = o.order_id) "
            "AND NOT EXISTS (SELECT 1 FROM pending_intents p WHERE p.marketplace_order_id = o.marketplace_order_id) "
            "AND NOT EXISTS (SELECT 1 FROM orders o2 WHERE o2.marketplace_order_id = o.marketplace_order_id "
            "AND o2.order_id != o.order_id) "
            "AND (EXISTS (SELECT 1 FROM journal j WHERE j.order_id = o.order_id AND j.kind != 'order_snapshot') "
            "OR (SELECT COUNT(*) FROM journal j WHERE j.order_id = o.order_id) > 1 "
            f"OR EXISTS (SELECT 1 FROM journal j WHERE j.order_id IS NULL AND j.kind IN {ROUTED_KINDS} "
            f"AND {ROUTED_ID} = o.marketplace_order_id)) "
            "ORDER BY o.updated_at"
        )
        params = (*phases, iso(before))
        try:
            async with self._lock:
                await self._conn.execute("DROP TABLE IF EXISTS temp.prune_candidates")
                await self._conn.execute(f"CREATE TEMP TABLE prune_candidates AS {select}", params)
            last = 0
            while rows := await self._all(
                "SELECT rowid, order_id FROM temp.prune_candidates WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (last, page),
            ):
                last = int(rows[-1]["rowid"])
                yield [r["order_id"] for r in rows]
        except sqlite3.Error as exc:
            raise store_error(exc, "database read failed") from exc
        finally:
            async with self._lock:
                with contextlib.suppress(sqlite3.Error):
                    await self._conn.execute("DROP TABLE IF EXISTS temp.prune_candidates")

    async def prune_orders(self, order_ids: Sequence[str], phases: Sequence[str], before: datetime) -> Pruned:
        """Replace each order's journal rows (its own, and those routed to it by its
        marketplace id) by one `order_snapshot` row at the offset of the last of them, and
        its history by the one row that snapshot gives; drop its finished outbox rows. One
        transaction; each order is checked again inside it (it may have moved since)."""
        done = Pruned()
        async with self._tx() as conn:
            cursor = await _processor_offset(conn)
            for order_id in order_ids:
                marks = ", ".join("?" * len(phases))
                async with conn.execute(
                    f"SELECT data FROM orders WHERE order_id = ? AND phase IN ({marks}) AND updated_at < ?",  # noqa: S608
                    (order_id, *phases, iso(before)),
                ) as cur:
                    row = await cur.fetchone()
                order = Order.model_validate_json(row["data"]) if row is not None else None
                if order is None or order.inflight is not None or order.timer is not None:
                    continue
                offsets = await _order_offsets(conn, order)
                if not offsets or max(offsets) > cursor:
                    continue  # the processor has not applied all of it yet
                done.add(await _snapshot(conn, order, offsets))
        return done

    async def prune_preview(self, order_ids: Sequence[str]) -> Pruned:
        """What `prune_orders` would remove, without writing."""
        out = Pruned(orders=len(order_ids))
        try:
            async with self._lock:
                for order_id in order_ids:
                    order = await self._load(order_id)
                    if order is not None:
                        out.journal_rows += len(await _order_offsets(self._conn, order))
                        out.history_rows += await _count(self._conn, "history", order_id)
                        out.outbox_rows += await _count(self._conn, "outbox", order_id)
        except sqlite3.Error as exc:
            raise store_error(exc, "database read failed") from exc
        return out

    async def count_rejected(self, before: datetime) -> int:
        """What `prune_rejected` would remove, without writing."""
        try:
            async with self._lock:
                return await _rejected(self._conn, before, delete=False)
        except sqlite3.Error as exc:
            raise store_error(exc, "database read failed") from exc

    async def _load(self, order_id: str) -> Order | None:
        async with self._conn.execute("SELECT data FROM orders WHERE order_id = ?", (order_id,)) as cur:
            row = await cur.fetchone()
        return Order.model_validate_json(row["data"]) if row is not None else None

    async def prune_rejected(self, before: datetime) -> int:
        """Remove rejected input received before `before`: kept for the operator, never applied."""
        async with self._tx() as conn:
            return await _rejected(conn, before, delete=True)

    async def reclaim(self) -> int:
        """Give free pages back to the filesystem (incremental vacuum, then a checkpoint that
        truncates the write-ahead log). Returns the bytes the database file shrank by."""
        try:
            async with self._lock:
                before = await self._pages()
                # executescript steps the pragma to its end; execute() would free one page only
                await self._conn.executescript("PRAGMA incremental_vacuum;")
                async with self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cur:
                    await cur.fetchall()
                after = await self._pages()
        except sqlite3.Error as exc:
            raise store_error(exc, "database vacuum failed") from exc
        return (before - after) * await self._page_size()

    async def _pages(self) -> int:
        async with self._conn.execute("PRAGMA page_count") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def _page_size(self) -> int:
        async with self._conn.execute("PRAGMA page_size") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0


async def _processor_offset(conn: aiosqlite.Connection) -> int:
    async with conn.execute("SELECT \"offset\" FROM cursor WHERE name = 'processor'") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _order_offsets(conn: aiosqlite.Connection, order: Order) -> list[int]:
    """The offsets of an order's journal rows: its own, and the intents and notifications
    that came under its marketplace id (routed to it, or kept unrouted)."""
    where, params = _journal_filter(order.order_id, order.marketplace_order_id, None)
    async with conn.execute(f'SELECT "offset" FROM journal WHERE 1 {where}', params) as cur:  # noqa: S608
        return [int(r[0]) for r in await cur.fetchall()]


async def _count(conn: aiosqlite.Connection, table: str, order_id: str) -> int:
    extra = " AND state NOT IN ('pending', 'started')" if table == "outbox" else ""
    async with conn.execute(f"SELECT COUNT(*) FROM {table} WHERE order_id = ?{extra}", (order_id,)) as cur:  # noqa: S608
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _snapshot(conn: aiosqlite.Connection, order: Order, offsets: list[int]) -> Pruned:
    """One order's rows and history replaced by a snapshot at its last offset (the row a
    replay applies there, and the history row it gives: see `machine._on_snapshot`)."""
    last, at = max(offsets), order.updated_at or datetime.now(UTC)
    history, outbox = await _count(conn, "history", order.order_id), await _count(conn, "outbox", order.order_id)
    await conn.executemany('DELETE FROM journal WHERE "offset" = ?', [(o,) for o in offsets])
    await conn.execute("DELETE FROM history WHERE order_id = ?", (order.order_id,))
    await conn.execute(
        "DELETE FROM outbox WHERE order_id = ? AND state NOT IN ('pending', 'started')", (order.order_id,)
    )
    snapshot = OrderSnapshot(order_id=order.order_id, order=order)
    await conn.execute(
        'INSERT INTO journal ("offset", kind, version, source, order_id, payload, received_at) '
        "VALUES (?, ?, ?, 'prune', ?, ?, ?)",
        (last, snapshot.kind, current_version(snapshot.kind), order.order_id, snapshot.model_dump_json(), iso(at)),
    )
    await conn.execute(
        "INSERT INTO history (order_id, journal_offset, from_phase, to_phase, status, cause, at) "
        "VALUES (?, ?, NULL, ?, ?, ?, ?)",
        (order.order_id, last, order.phase, order.status, SNAPSHOT_CAUSE, iso(at)),
    )
    return Pruned(orders=1, journal_rows=len(offsets), history_rows=history, outbox_rows=outbox)


async def _rejected(conn: aiosqlite.Connection, before: datetime, *, delete: bool) -> int:
    verb = "DELETE" if delete else "SELECT COUNT(*)"
    async with conn.execute(
        f"{verb} FROM journal WHERE kind = 'rejected' AND received_at < ?",
        (iso(before),),
    ) as cur:
        row = None if delete else await cur.fetchone()
        return cur.rowcount if delete else int(row[0]) if row else 0


PROBE_HANDLE = "omsd:write-probe"  # never a VTEX handle; never committed: written and deleted at once


def _create_private(path: Path) -> None:
    """Create the database file 0600 whatever the umask. SQLite gives the -wal and
    -shm files it creates later the mode of the database file."""
    if str(path) == ":memory:" or path.exists():
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def _tighten(path: Path) -> None:
    """Make the -wal and -shm files 0600 too, should they predate this omsd."""
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if side.stat().st_mode & 0o777 != FILE_MODE:
                side.chmod(FILE_MODE)


def _journal_filter(order_id: str | None, mkt: str | None, kind: str | None) -> tuple[str, list[Any]]:
    """` AND ...` conditions (and their parameters) for one order's rows and one kind."""
    where, params = "", list[Any]()
    if order_id is not None and mkt is not None:
        where += f" AND (order_id = ? OR (order_id IS NULL AND kind IN {ROUTED_KINDS} AND {ROUTED_ID} = ?))"
        params += [order_id, mkt]
    elif order_id is not None:
        where += " AND order_id = ?"
        params.append(order_id)
    elif mkt is not None:
        where += f" AND order_id IS NULL AND kind IN {ROUTED_KINDS} AND {ROUTED_ID} = ?"
        params.append(mkt)
    if kind:
        where += " AND kind = ?"
        params.append(kind)
    return where, params


ROUTED_ID = "json_extract(payload, '$.marketplace_order_id')"  # the journal_routed index's expression


# Statuses in which an order may still need an approval: neither canceling nor past approval.
_LINKABLE: tuple[str, ...] = tuple(sorted(s.value for s in Status if s not in CANCEL_STATUSES | APPROVED_STATUSES))


def _derived_marketplace_id(order_id: str) -> str | None:
    """`MKP-123-01` -> `123`: the marketplace id VTEX's examples derive the order id from."""
    head, sep, rest = order_id.partition("-")
    middle, sep2, _ = rest.rpartition("-")
    return middle if sep and sep2 and head and middle else None


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _parts(items: list[str], size: int = 500) -> list[list[str]]:
    """`items` in slices small enough for one statement's parameters."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def _marks(items: Sequence[object]) -> str:
    return ", ".join("?" * len(items))


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


def database_bytes(db: Path) -> float:
    """The database's size on disk: the file and its write-ahead log."""
    total = 0
    for path in (db, db.with_name(db.name + "-wal")):
        try:
            total += os.stat(path).st_size
        except OSError:
            continue
    return float(total)


_INSERT_JOURNAL = (
    "INSERT INTO journal (kind, version, source, order_id, dedup_key, event_id, payload, reason, received_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_KEYS_PER_LOOKUP = 400  # two parameters per key: well under SQLite's limit of 32,766


def _journal_values(entry: NewEntry) -> tuple[object, ...]:
    return (
        entry.kind,
        entry.version or current_version(entry.kind),
        entry.source,
        entry.order_id,
        entry.dedup_key,
        entry.event_id,
        entry.payload,
        entry.reason,
        iso(entry.received_at),
    )


async def _journaled_keys(conn: aiosqlite.Connection, entries: Sequence[NewEntry]) -> tuple[set[str], set[str]]:
    """The dedup keys and the event ids among `entries` that the journal holds already."""
    keys = sorted({e.dedup_key for e in entries if e.dedup_key is not None})
    ids = sorted({e.event_id for e in entries if e.event_id is not None})
    found_keys: set[str] = set()
    found_ids: set[str] = set()
    for column, wanted, found in (("dedup_key", keys, found_keys), ("event_id", ids, found_ids)):
        for start in range(0, len(wanted), _KEYS_PER_LOOKUP):
            chunk = wanted[start : start + _KEYS_PER_LOOKUP]
            marks = ", ".join("?" * len(chunk))
            async with conn.execute(f"SELECT {column} FROM journal WHERE {column} IN ({marks})", chunk) as cur:  # noqa: S608
                found.update(str(r[0]) for r in await cur.fetchall())
    return found_keys, found_ids
