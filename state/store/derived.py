"""The derived rows: orders, their timers, their history, parked intents, unreadable rows
and the processor's offset. Everything here can be rebuilt from the journal (`omsd
replay`); this module is their one writer, used by the processor's commit, by a replay's
install (of the state `rebuild.Rebuild` staged) and by a reset.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

import aiosqlite

from ..batch import Batch, HistoryRow, UnreadableRow
from ..models import EFFECT_ADAPTER, Order
from ..routing import derived_marketplace_id
from ..statuses import STUCK
from . import outbox, outcomes
from .db import Database
from .rows import iso

_UPSERT_ORDER = (
    "INSERT INTO orders (order_id, marketplace_order_id, phase, status, data, updated_at, derived_marketplace_id) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(order_id) DO UPDATE SET "
    "marketplace_order_id = excluded.marketplace_order_id, phase = excluded.phase, "
    "status = excluded.status, data = excluded.data, updated_at = excluded.updated_at, "
    "derived_marketplace_id = excluded.derived_marketplace_id"
)
_TABLES = ("orders", "timers", "history", "pending_intents", "unreadable")
_SELECTED = "order_id IN (SELECT order_id FROM scratch.selected)"  # a partial replay's orders (rebuild.py)


class Derived:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def commit(self, batch: Batch, *, now: datetime) -> int | None:
        """Write the processor's batch and its new offset in one transaction: the orders,
        their new effects (the outbox), the pending effects they no longer wait for marked
        superseded, timers, history, parked intents, unreadable rows, and the outcomes for
        the connector. Returns the last outcome seq when it wrote outcomes, else None."""
        stamp = iso(now)
        orders = batch.orders
        retimed = [k for k, o in orders.items() if (p := batch.before.get(k)) is None or p.timer != o.timer]
        async with self._db.tx() as conn:
            await outbox.queue(conn, batch.effects, stamp)
            await _orders(conn, orders.values(), now)
            await outbox.supersede(conn, batch.live(), stamp)
            await _timers(conn, orders, retimed)
            await write_history(conn, batch.history)
            await _parked(conn, batch.remove_pending, batch.add_pending, stamp)
            await _unreadable(conn, batch.unreadable, stamp)
            last = await outcomes.write(conn, batch.outcomes)
            await _cursor(conn, batch.offset)
        return last

    async def install(
        self, *, selected: bool, parked: Mapping[str, tuple[str, int]], cursor: int | None, now: datetime
    ) -> None:
        """Write a rebuilt state `Rebuild` staged (its scratch database's orders, history and
        unreadable rows; its plan's reissued effects) in one transaction: every derived row
        (not `selected`), or those of the orders `Rebuild.select` kept. Pending or started
        effects their orders no longer wait for are superseded; reissued effects are queued
        again. A full install writes the parked intents given; a partial one lets go of
        those parked under a selected order's marketplace id. Then the write-ahead log, which
        took every derived row, is truncated."""
        stamp = iso(now)
        where = f"WHERE {_SELECTED}" if selected else ""
        also = f"AND {_SELECTED}" if selected else ""
        async with self._db.tx() as conn:
            if selected:
                for table in ("orders", "timers", "history"):
                    await conn.execute(f"DELETE FROM main.{table} {where}")  # noqa: S608 - fixed fragments
                await conn.execute(
                    "DELETE FROM main.pending_intents WHERE marketplace_order_id IN "  # noqa: S608 - fixed fragments
                    f"(SELECT marketplace_order_id FROM scratch.orders WHERE marketplace_order_id IS NOT NULL {also})"
                )
            else:
                for table in _TABLES:
                    await conn.execute(f"DELETE FROM main.{table}")  # noqa: S608 - fixed names
                await _parked(conn, (), dict(parked), stamp)
                await conn.execute(
                    "INSERT OR REPLACE INTO main.unreadable (journal_offset, kind, order_id, error, received_at, "
                    "found_at) SELECT journal_offset, kind, order_id, error, received_at, ? FROM scratch.unreadable",
                    (stamp,),
                )
            await conn.execute(
                "INSERT INTO main.orders (order_id, marketplace_order_id, phase, status, data, updated_at, "  # noqa: S608
                "derived_marketplace_id) SELECT order_id, marketplace_order_id, phase, status, data, "
                f"COALESCE(updated_at, ?), derived_marketplace_id FROM scratch.orders "
                f"{where} ORDER BY order_id",
                (stamp,),
            )
            await conn.execute(
                "INSERT INTO main.timers (order_id, token, reason, due_at) SELECT order_id, timer_token, "  # noqa: S608
                f"timer_reason, timer_due FROM scratch.orders WHERE timer_token IS NOT NULL {also}"
            )
            # (a partial install: the history of the selected orders the rebuild gives)
            rebuilt = f"WHERE order_id IN (SELECT order_id FROM scratch.orders WHERE {_SELECTED})" if selected else ""  # noqa: S608
            await conn.execute(
                "INSERT INTO main.history (order_id, journal_offset, from_phase, to_phase, status, cause, at) "  # noqa: S608
                f"SELECT order_id, journal_offset, from_phase, to_phase, status, cause, at FROM scratch.history "
                f"{rebuilt} ORDER BY rowid"
            )
            # An effect, pending or started, that its order no longer waits for is never performed.
            await conn.execute(
                "UPDATE main.outbox SET state = 'superseded', done_at = ? WHERE state IN ('pending', 'started') "  # noqa: S608
                f"{also} AND seq IS NOT (SELECT r.waits_for FROM scratch.orders r WHERE r.order_id = outbox.order_id)",
                (stamp,),
            )
            async with conn.execute("SELECT reissue FROM scratch.plan WHERE reissue IS NOT NULL") as cur:
                reissue = [EFFECT_ADAPTER.validate_json(r[0]) for r in await cur.fetchall()]
            await outbox.requeue_superseded(conn, reissue, stamp)
            if cursor is not None:
                await _cursor(conn, cursor)
        await self._db.checkpoint()

    async def reset(self, *, now: datetime) -> None:
        """Forget everything derived from the journal so the processor rebuilds it. Pending
        and started effects are superseded: a replay recomputes and re-issues what is needed."""
        async with self._db.tx() as conn:
            for table in _TABLES:
                await conn.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed names
            await outbox.supersede(conn, {}, iso(now), started=True, everyone=True)
            await _cursor(conn, 0)


async def _orders(conn: aiosqlite.Connection, orders: Iterable[Order], now: datetime) -> None:
    await conn.executemany(
        _UPSERT_ORDER,
        [
            (
                o.order_id,
                o.marketplace_order_id,
                _phase(o),
                o.status,
                o.model_dump_json(),
                iso(o.updated_at or now),
                derived_marketplace_id(o.order_id),
            )
            for o in orders
        ],
    )


def _phase(order: Order) -> str:
    """The phase column: the machine's phase, or `stuck` for an order stuck on an event."""
    return STUCK if order.stuck is not None else order.phase


async def _timers(conn: aiosqlite.Connection, orders: dict[str, Order], which: Iterable[str]) -> None:
    """The `timers` table mirrors each order's one timer: rewrite those of `which`."""
    keys = list(which)
    await conn.executemany("DELETE FROM timers WHERE order_id = ?", [(k,) for k in keys])
    await conn.executemany(
        "INSERT INTO timers (order_id, token, reason, due_at) VALUES (?, ?, ?, ?)",
        [(k, t.token, t.reason, iso(t.due_at)) for k in keys if (t := orders[k].timer) is not None],
    )


async def write_history(conn: aiosqlite.Connection, rows: Iterable[HistoryRow]) -> None:
    """History rows, inside the caller's transaction (also the one a prune's snapshot leaves)."""
    await conn.executemany(
        "INSERT INTO history (order_id, journal_offset, from_phase, to_phase, status, cause, at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(h.order_id, h.journal_offset, h.from_phase, h.to_phase, h.status, h.cause, iso(h.at)) for h in rows],
    )


async def _parked(
    conn: aiosqlite.Connection, remove: Iterable[str], add: dict[str, tuple[str, int]], stamp: str
) -> None:
    # removals first: an intent may expire and be parked anew in one batch
    await conn.executemany("DELETE FROM pending_intents WHERE marketplace_order_id = ?", [(m,) for m in remove])
    await conn.executemany(
        "INSERT OR IGNORE INTO pending_intents (marketplace_order_id, source, journal_offset, created_at) "
        "VALUES (?, ?, ?, ?)",
        [(mkt, source, offset, stamp) for mkt, (source, offset) in add.items()],
    )


async def _unreadable(conn: aiosqlite.Connection, rows: Iterable[UnreadableRow], stamp: str) -> None:
    await conn.executemany(
        "INSERT OR REPLACE INTO unreadable (journal_offset, kind, order_id, error, received_at, found_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [(u.journal_offset, u.kind, u.order_id, u.error, iso(u.received_at), stamp) for u in rows],
    )


async def _cursor(conn: aiosqlite.Connection, offset: int) -> None:
    await conn.execute("UPDATE cursor SET \"offset\" = ? WHERE name = 'processor'", (offset,))
