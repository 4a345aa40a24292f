"""The journal: append-only rows with offsets (and the feed handles journaled with them),
read back in offset order. The only source of truth: every other table is derived from it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime
from typing import Any

import aiosqlite

from ..batch import JournalRow
from ..events import current_version
from .db import Database, StoreError, marks
from .rows import Appended, NewEntry, from_iso, iso
from .schema import ROUTED_KINDS

ROUTED_ID = "json_extract(payload, '$.marketplace_order_id')"  # the journal_routed index's expression
_INSERT = (
    "INSERT INTO journal (kind, version, source, order_id, dedup_key, event_id, payload, reason, received_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_ROW = 'SELECT "offset", kind, source, order_id, payload, reason, received_at, version FROM journal'
_CHUNK = f'{_ROW} WHERE "offset" > ? AND "offset" <= ? ORDER BY "offset" LIMIT ?'
_AFTER = f'{_ROW} WHERE "offset" > ? ORDER BY "offset" LIMIT ?'
_KEYS_PER_LOOKUP = 400  # two parameters per key: well under SQLite's limit of 32,766


class Journal:
    def __init__(self, db: Database) -> None:
        self._db = db

    # ---- intake -------------------------------------------------------------------------
    async def append(self, entries: Sequence[NewEntry], acks: Iterable[str] = (), *, now: datetime) -> list[Appended]:
        """Append entries (duplicates by dedup key or event id are skipped) and record
        feed handles to commit, all in one durable transaction."""
        async with self._db.tx() as conn:
            results = await insert_many(conn, entries)
            await conn.executemany(
                "INSERT OR IGNORE INTO feed_acks (handle, received_at) VALUES (?, ?)",
                [(handle, iso(now)) for handle in acks],
            )
        return results

    # ---- feed handles -------------------------------------------------------------------------
    async def pending_acks(self, limit: int = 100) -> list[str]:
        rows = await self._db.rows("SELECT handle FROM feed_acks ORDER BY received_at LIMIT ?", (limit,))
        return [r["handle"] for r in rows]

    async def acks_done(self, handles: Sequence[str]) -> None:
        async with self._db.tx() as conn:
            await conn.executemany("DELETE FROM feed_acks WHERE handle = ?", [(h,) for h in handles])

    async def acks_failed(self, handles: Sequence[str], error: str, drop_before: datetime) -> int:
        """Count a failed commit; handles older than `drop_before` are dropped (VTEX has
        made their items visible again by now, and dedup absorbs the redelivery)."""
        async with self._db.tx() as conn:
            await conn.executemany(
                "UPDATE feed_acks SET attempts = attempts + 1, last_error = ? WHERE handle = ?",
                [(error, h) for h in handles],
            )
            cur = await conn.execute("DELETE FROM feed_acks WHERE received_at < ?", (iso(drop_before),))
            return cur.rowcount

    # ---- reading ------------------------------------------------------------------------------
    async def last_offset(self) -> int:
        rows = await self._db.rows('SELECT COALESCE(MAX("offset"), 0) AS o FROM journal')
        return int(rows[0]["o"])

    async def after(self, offset: int, limit: int = 200) -> list[JournalRow]:
        return await self._chunk(offset, None, limit)

    async def tail(
        self,
        limit: int = 50,
        *,
        order_id: str | None = None,
        kind: str | None = None,
        marketplace_order_id: str | None = None,
    ) -> list[JournalRow]:
        where, params = journal_filter(order_id, marketplace_order_id, kind)
        rows = await self._db.rows(
            f'SELECT * FROM journal WHERE 1 {where} ORDER BY "offset" DESC LIMIT ?',  # noqa: S608 - fixed fragments
            (*params, limit),
        )
        return [journal_row(r) for r in reversed(rows)]

    async def since(
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
        where, params = journal_filter(order_id, marketplace_order_id, kind)
        rows = await self._db.rows(
            f'SELECT * FROM journal WHERE "offset" > ? {where} ORDER BY "offset" LIMIT ?',  # noqa: S608 - fixed fragments
            (after, *params, limit),
        )
        return [journal_row(r) for r in rows]

    async def chunks(
        self, after: int = 0, upto: int | None = None, size: int = 20_000
    ) -> AsyncIterator[list[JournalRow]]:
        """The journal after offset `after` (up to `upto`, inclusive), in offset order, `size` rows at a time."""
        end = upto if upto is not None else await self.last_offset()
        while after < end:
            chunk = await self._chunk(after, end, size)
            if not chunk:
                return
            after = chunk[-1].offset
            yield chunk

    async def _chunk(self, after: int, end: int | None, size: int) -> list[JournalRow]:
        """Up to `size` rows after offset `after` (up to `end`, inclusive; None: the last)."""
        sql, params = (_CHUNK, (after, end, size)) if end is not None else (_AFTER, (after, size))
        async with self._db.reading() as conn, conn.execute(sql, params) as cur:
            cur.row_factory = None  # plain tuples: cheaper than sqlite3.Row for a million rows
            rows = await cur.fetchall()
        return [JournalRow(o, k, s, oid, p, r, from_iso(at), v) for o, k, s, oid, p, r, at, v in rows]

    async def export(
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
            clause, extra = journal_filter(order_id, marketplace_order_id or order_id, None)
            where.append(clause.removeprefix(" AND "))
            params += extra
        if kinds:
            where.append(f"kind IN ({marks(kinds)})")
            params += list(kinds)
        while True:
            rows = await self._db.rows(
                f'SELECT * FROM journal WHERE {" AND ".join(where)} ORDER BY "offset" LIMIT 5000',  # noqa: S608
                params,
            )
            if not rows:
                return
            for r in rows:
                yield dict(r)
            params[0] = rows[-1]["offset"]


async def insert(conn: aiosqlite.Connection, entry: NewEntry) -> Appended:
    """One entry, inside the caller's transaction; a duplicate (by dedup key or event id) is skipped."""
    if entry.dedup_key is not None or entry.event_id is not None:
        async with conn.execute(
            "SELECT 1 FROM journal WHERE dedup_key = ? OR event_id = ?",
            (entry.dedup_key, entry.event_id),
        ) as cur:
            if await cur.fetchone() is not None:
                return Appended(offset=None, duplicate=True)
    cur = await conn.execute(_INSERT, row_values(entry))
    return Appended(offset=cur.lastrowid, duplicate=False)


async def insert_many(conn: aiosqlite.Connection, entries: Sequence[NewEntry]) -> list[Appended]:
    """`insert` for many entries in a few statements (one lookup of the keys already
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
    await conn.executemany(_INSERT, [row_values(e) for e in fresh])
    # The only writer, inside its transaction: the new rows are the ones past `before`,
    # their offsets rising in the order they were inserted.
    async with conn.execute('SELECT "offset" FROM journal WHERE "offset" > ? ORDER BY "offset"', (before,)) as cur:
        offsets = [int(r[0]) for r in await cur.fetchall()]
    if len(offsets) != len(fresh):
        raise StoreError(f"journal append: {len(fresh)} rows inserted, {len(offsets)} found")
    for n, offset in zip(fresh_at, offsets, strict=True):
        results[n] = Appended(offset=offset, duplicate=False)
    return results


async def append_staged(conn: aiosqlite.Connection) -> int:
    """The entries an ingest staged (`staging.Staging`, scratch table `staged`), appended in
    the order staged, inside the caller's transaction. An entry journaled meanwhile by
    another process, with the same key, is left out. Returns how many rows it added."""
    columns = "kind, version, source, order_id, dedup_key, event_id, payload, reason, received_at"
    cur = await conn.execute(
        f"INSERT OR IGNORE INTO main.journal ({columns}) SELECT {columns} FROM scratch.staged ORDER BY n"  # noqa: S608
    )
    return int(cur.rowcount)


def row_values(entry: NewEntry) -> tuple[object, ...]:
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
            async with conn.execute(f"SELECT {column} FROM journal WHERE {column} IN ({marks(chunk)})", chunk) as cur:  # noqa: S608
                found.update(str(r[0]) for r in await cur.fetchall())
    return found_keys, found_ids


def journal_filter(order_id: str | None, mkt: str | None, kind: str | None) -> tuple[str, list[Any]]:
    """` AND ...` conditions (and their parameters) for one order's rows and one kind: its
    own rows, and the intents and notifications that came under its marketplace id."""
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


def journal_row(r: sqlite3.Row) -> JournalRow:
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
