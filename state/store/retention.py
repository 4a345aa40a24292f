"""Retention: a quiet closed order's journal rows and history become one snapshot row;
rejected input older than the retention goes; free pages go back to the filesystem."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncGenerator, Sequence
from datetime import UTC, datetime

import aiosqlite

from ..batch import HistoryRow
from ..events import SNAPSHOT_CAUSE, OrderSnapshot, current_version
from ..models import Order
from .db import Database, marks, store_error
from .derived import write_history
from .journal import ROUTED_ID, journal_filter
from .rows import Pruned, iso
from .schema import ROUTED_KINDS


class Retention:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def candidates(
        self, phases: Sequence[str], before: datetime, *, page: int = 500
    ) -> AsyncGenerator[list[str], None]:
        """Orders that a prune would reduce to a snapshot, oldest first, `page` at a time:
        in one of `phases`, unchanged since before `before`, waiting on nothing (no effect
        in flight, no timer), with rows to prune (not just their snapshot), no unreadable
        row, no parked intent and no other order on their marketplace id (its routed rows
        could be that order's). The list is taken once, into a temporary table, and read
        from there a page at a time: a first prune of a million quiet orders does not hold
        a million ids in memory (nor scan the orders once per page)."""
        select = (
            f"SELECT o.order_id FROM orders o WHERE o.phase IN ({marks(phases)}) AND o.updated_at < ? "  # noqa: S608
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
            async with self._db.reading() as conn:
                await conn.execute("DROP TABLE IF EXISTS temp.prune_candidates")
                await conn.execute(f"CREATE TEMP TABLE prune_candidates AS {select}", params)
            last = 0
            while rows := await self._db.rows(
                "SELECT rowid, order_id FROM temp.prune_candidates WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (last, page),
            ):
                last = int(rows[-1]["rowid"])
                yield [r["order_id"] for r in rows]
        finally:
            async with self._db.lock:
                with contextlib.suppress(sqlite3.Error):
                    await self._db.conn.execute("DROP TABLE IF EXISTS temp.prune_candidates")

    async def prune(self, order_ids: Sequence[str], phases: Sequence[str], before: datetime) -> Pruned:
        """Replace each order's journal rows (its own, and those routed to it by its
        marketplace id) by one `order_snapshot` row at the offset of the last of them, and
        its history by the one row that snapshot gives; drop its finished outbox rows. One
        transaction; each order is checked again inside it (it may have moved since)."""
        done = Pruned()
        async with self._db.tx() as conn:
            async with conn.execute("SELECT \"offset\" FROM cursor WHERE name = 'processor'") as cur:
                row = await cur.fetchone()
            cursor = int(row[0]) if row else 0
            for order_id in order_ids:
                async with conn.execute(
                    f"SELECT data FROM orders WHERE order_id = ? AND phase IN ({marks(phases)}) AND updated_at < ?",  # noqa: S608
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

    async def preview(self, order_ids: Sequence[str]) -> Pruned:
        """What `prune` would remove, without writing."""
        out = Pruned(orders=len(order_ids))
        async with self._db.reading() as conn:
            for order_id in order_ids:
                async with conn.execute("SELECT data FROM orders WHERE order_id = ?", (order_id,)) as cur:
                    row = await cur.fetchone()
                if row is not None:
                    order = Order.model_validate_json(row["data"])
                    out.journal_rows += len(await _order_offsets(conn, order))
                    out.history_rows += await _count(conn, "history", order_id)
                    out.outbox_rows += await _count(conn, "outbox", order_id)
        return out

    async def count_rejected(self, before: datetime) -> int:
        """What `prune_rejected` would remove, without writing."""
        async with self._db.reading() as conn:
            return await _rejected(conn, before, delete=False)

    async def prune_rejected(self, before: datetime) -> int:
        """Remove rejected input received before `before`: kept for the operator, never applied."""
        async with self._db.tx() as conn:
            return await _rejected(conn, before, delete=True)

    async def reclaim(self, *, truncate: bool = True) -> int:
        """Give free pages back to the filesystem (incremental vacuum, then a checkpoint that
        truncates the write-ahead log). Returns the bytes the database file shrank by.
        Without `truncate` the checkpoint is PASSIVE: while another process reads the log
        (Litestream holds a read transaction), a TRUNCATE waits the whole busy timeout,
        blocking every writer, and cannot finish anyway."""
        db = self._db
        try:
            async with db.lock:
                before = await db.pages()
                # executescript steps the pragma to its end; execute() would free one page only
                await db.conn.executescript("PRAGMA incremental_vacuum;")
                mode = "TRUNCATE" if truncate else "PASSIVE"
                async with db.conn.execute(f"PRAGMA wal_checkpoint({mode})") as cur:
                    await cur.fetchall()
                after = await db.pages()
        except sqlite3.Error as exc:
            raise store_error(exc, "database vacuum failed") from exc
        return (before - after) * await db.page_size()


async def _order_offsets(conn: aiosqlite.Connection, order: Order) -> list[int]:
    """The offsets of an order's journal rows: its own, and the intents and notifications
    that came under its marketplace id (routed to it, or kept unrouted)."""
    where, params = journal_filter(order.order_id, order.marketplace_order_id, None)
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
    await write_history(conn, [HistoryRow(order.order_id, last, None, order.phase, order.status, SNAPSHOT_CAUSE, at)])
    return Pruned(orders=1, journal_rows=len(offsets), history_rows=history, outbox_rows=outbox)


async def _rejected(conn: aiosqlite.Connection, before: datetime, *, delete: bool) -> int:
    verb = "DELETE" if delete else "SELECT COUNT(*)"
    async with conn.execute(f"{verb} FROM journal WHERE kind = 'rejected' AND received_at < ?", (iso(before),)) as cur:
        row = None if delete else await cur.fetchone()
        return cur.rowcount if delete else int(row[0]) if row else 0
