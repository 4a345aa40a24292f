"""Reading the derived rows: orders, history, parked intents, counts. For the processor's
look-ups, the daemon's jobs, the HTTP routes and the operator's commands; never a write."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from ..apply import View
from ..batch import HistoryRow, UnreadableRow
from ..models import Order
from ..routing import derived_marketplace_id
from ..statuses import APPROVED_STATUSES, CANCEL_STATUSES, HELD, Phase, Status
from .db import Database, marks, parts
from .rows import ParkedIntent, from_iso, iso

# Statuses in which an order may still need an approval: neither canceling nor past approval.
_LINKABLE: tuple[str, ...] = tuple(sorted(s.value for s in Status if s not in CANCEL_STATUSES | APPROVED_STATUSES))


class Queries:
    def __init__(self, db: Database) -> None:
        self._db = db

    # ---- the processor's view --------------------------------------------------------------
    async def processor_offset(self) -> int:
        rows = await self._db.rows("SELECT \"offset\" FROM cursor WHERE name = 'processor'")
        return int(rows[0]["offset"])

    async def view(self, order_ids: Collection[str], marketplace_ids: Collection[str]) -> View:
        """What `state.apply` needs for a run of rows that names these ids, in a few queries."""
        return View(
            orders=await self.load_orders(order_ids),
            by_marketplace_id=await self.orders_by_marketplace_ids(marketplace_ids),
            parked=await self.pending_intents_for(marketplace_ids),
            derived=await self.unlinked_derived_from(marketplace_ids),
        )

    async def load_order(self, order_id: str) -> Order | None:
        rows = await self._db.rows("SELECT data FROM orders WHERE order_id = ?", (order_id,))
        return Order.model_validate_json(rows[0]["data"]) if rows else None

    async def order_by_marketplace_id(self, marketplace_order_id: str) -> Order | None:
        rows = await self._db.rows(
            "SELECT data FROM orders WHERE marketplace_order_id = ? ORDER BY updated_at DESC LIMIT 1",
            (marketplace_order_id,),
        )
        return Order.model_validate_json(rows[0]["data"]) if rows else None

    async def pending_intent(self, marketplace_order_id: str) -> tuple[str, int] | None:
        rows = await self._db.rows(
            "SELECT source, journal_offset FROM pending_intents WHERE marketplace_order_id = ?",
            (marketplace_order_id,),
        )
        return (rows[0]["source"], int(rows[0]["journal_offset"])) if rows else None

    async def load_orders(self, order_ids: Collection[str]) -> dict[str, Order]:
        """The stored orders among `order_ids` (absent ones are left out), in one query per 500."""
        found: dict[str, Order] = {}
        for part in parts(list(order_ids)):
            sql = f"SELECT data FROM orders WHERE order_id IN ({marks(part)})"  # noqa: S608 - placeholders only
            rows = await self._db.rows(sql, part)
            found.update((o.order_id, o) for o in (Order.model_validate_json(r["data"]) for r in rows))
        return found

    async def orders_by_marketplace_ids(self, marketplace_order_ids: Collection[str]) -> dict[str, Order]:
        """Per marketplace id, the order `order_by_marketplace_id` would return (the latest updated)."""
        found: dict[str, Order] = {}
        for part in parts(list(marketplace_order_ids)):
            rows = await self._db.rows(
                f"SELECT data FROM orders WHERE marketplace_order_id IN ({marks(part)}) ORDER BY updated_at",  # noqa: S608
                part,
            )
            for r in rows:  # ascending: the latest updated wins
                order = Order.model_validate_json(r["data"])
                found[order.marketplace_order_id or ""] = order
        return found

    async def unlinked_derived_from(self, marketplace_order_ids: Collection[str]) -> dict[str, Order]:
        """Per marketplace id, an order linked to none whose VTEX id derives from it (of a split
        order's, the smallest id, as `state.apply` picks; index `orders_derived`)."""
        found: dict[str, Order] = {}
        for part in parts(list(marketplace_order_ids)):
            rows = await self._db.rows(
                "SELECT derived_marketplace_id AS mkt, data FROM orders INDEXED BY orders_derived "  # noqa: S608
                f"WHERE marketplace_order_id IS NULL AND derived_marketplace_id IN ({marks(part)}) "
                "ORDER BY order_id DESC",
                part,
            )
            found.update((r["mkt"], Order.model_validate_json(r["data"])) for r in rows)  # the smallest id wins
        return found

    async def pending_intents_for(self, marketplace_order_ids: Collection[str]) -> dict[str, tuple[str, int]]:
        """`pending_intent` for many marketplace ids at once (those with none are left out)."""
        found: dict[str, tuple[str, int]] = {}
        for part in parts(list(marketplace_order_ids)):
            rows = await self._db.rows(
                "SELECT marketplace_order_id, source, journal_offset FROM pending_intents "  # noqa: S608
                f"WHERE marketplace_order_id IN ({marks(part)})",
                part,
            )
            found.update((r["marketplace_order_id"], (r["source"], int(r["journal_offset"]))) for r in rows)
        return found

    # ---- the operator's questions -------------------------------------------------------------
    async def find_order(self, key: str) -> Order | None:
        """By VTEX order id, else by marketplace order id."""
        return await self.load_order(key) or await self.order_by_marketplace_id(key)

    async def list_orders(self, phase: str | None = None, limit: int = 1000) -> list[Order]:
        if phase:
            rows = await self._db.rows(
                "SELECT data FROM orders WHERE phase = ? ORDER BY updated_at DESC LIMIT ?", (phase, limit)
            )
        else:
            rows = await self._db.rows("SELECT data FROM orders ORDER BY updated_at DESC LIMIT ?", (limit,))
        return [Order.model_validate_json(r["data"]) for r in rows]

    async def orders_by_id(self) -> dict[str, Order]:
        rows = await self._db.rows("SELECT data FROM orders")
        return {o.order_id: o for o in (Order.model_validate_json(r["data"]) for r in rows)}

    async def count_orders(self, phase: str | None = None) -> int:
        if phase:
            rows = await self._db.rows("SELECT COUNT(*) AS n FROM orders WHERE phase = ?", (phase,))
        else:
            rows = await self._db.rows("SELECT COUNT(*) AS n FROM orders")
        return int(rows[0]["n"])

    async def phase_counts(self) -> dict[str, int]:
        rows = await self._db.rows("SELECT phase, COUNT(*) AS n FROM orders GROUP BY phase")
        return {r["phase"]: int(r["n"]) for r in rows}

    async def history(self, order_id: str) -> list[HistoryRow]:
        rows = await self._db.rows("SELECT * FROM history WHERE order_id = ? ORDER BY id", (order_id,))
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

    async def last_causes(self, order_ids: Collection[str], to_phase: str) -> dict[str, str]:
        """Per order, the cause of its latest move into `to_phase` (one query per 500 orders)."""
        found: dict[str, str] = {}
        for part in parts(list(order_ids)):
            rows = await self._db.rows(
                f"SELECT order_id, cause FROM history WHERE order_id IN ({marks(part)}) AND to_phase = ? "  # noqa: S608
                "ORDER BY id",
                (*part, to_phase),
            )
            found.update((r["order_id"], r["cause"]) for r in rows)  # ascending: the latest wins
        return found

    async def parked_intents(self) -> list[ParkedIntent]:
        """Parked intents, oldest first, with the time their journal row was received."""
        rows = await self._db.rows(
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

    async def pending_intents(self) -> list[tuple[str, str, int]]:
        rows = await self._db.rows("SELECT * FROM pending_intents ORDER BY created_at")
        return [(r["marketplace_order_id"], r["source"], int(r["journal_offset"])) for r in rows]

    async def unreadable_rows(self) -> list[UnreadableRow]:
        """Journal rows the processor could not read, oldest first."""
        rows = await self._db.rows("SELECT * FROM unreadable ORDER BY journal_offset")
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

    async def stats(self) -> dict[str, Any]:
        rows = await self._db.rows(
            "SELECT (SELECT COUNT(*) FROM journal) AS journal, "
            "(SELECT COUNT(*) FROM journal WHERE kind = 'rejected') AS rejected, "
            "(SELECT COUNT(*) FROM feed_acks) AS acks_pending, "
            "(SELECT COUNT(*) FROM timers) AS timers, "
            "(SELECT COUNT(*) FROM pending_intents) AS pending_intents, "
            "(SELECT COUNT(*) FROM unreadable) AS unreadable, "
            "(SELECT \"offset\" FROM cursor WHERE name = 'processor') AS processor_offset, "
            '(SELECT COALESCE(MAX("offset"), 0) FROM journal) AS last_offset'
        )
        return dict(rows[0])

    async def oldest_unapplied(self) -> datetime | None:
        """When the oldest journal row the processor has not applied was received (None: caught up)."""
        rows = await self._db.rows(
            'SELECT received_at FROM journal WHERE "offset" > '
            '(SELECT "offset" FROM cursor WHERE name = \'processor\') ORDER BY "offset" LIMIT 1'
        )
        return from_iso(rows[0]["received_at"]) if rows else None

    # ---- the daemon's jobs ----------------------------------------------------------------------
    async def link_candidates(self, limit: int) -> list[tuple[str, int]]:
        """Orders worth a lazy link lookup while intents wait parked, as (order_id, seq):
        no intent, marketplace id unknown, not looked up yet, no call in flight, and a known
        status that may still need an approval (index `orders_unlinked`). Those whose VTEX id
        is `{affiliate}-{a parked marketplace id}-{n}` come first (VTEX's ids usually are,
        doc §3.6; a guess only, Get order decides), then held ones, then the newest. None
        while no intent is parked."""
        parked = {
            r["marketplace_order_id"] for r in await self._db.rows("SELECT marketplace_order_id FROM pending_intents")
        }
        if not parked or limit <= 0:
            return []
        rows = await self._db.rows(
            "SELECT order_id, status, updated_at, json_extract(data, '$.seq') AS seq "  # noqa: S608 - fixed fragments
            "FROM orders INDEXED BY orders_unlinked "
            f"WHERE marketplace_order_id IS NULL AND phase = 'tracking' AND status IN ({marks(_LINKABLE)}) "
            "AND json_extract(data, '$.link_checked') = 0 AND json_extract(data, '$.inflight') IS NULL",
            _LINKABLE,
        )
        rows.sort(key=lambda r: r["updated_at"], reverse=True)
        rows.sort(key=lambda r: (derived_marketplace_id(r["order_id"]) not in parked, r["status"] != HELD.value))
        return [(r["order_id"], int(r["seq"])) for r in rows[:limit]]

    async def oldest_parked_at(self) -> datetime | None:
        """When the journal row of the oldest parked intent was received (None: none parked)."""
        rows = await self._db.rows(
            'SELECT MIN(j.received_at) AS at FROM pending_intents p JOIN journal j ON j."offset" = p.journal_offset'
        )
        return from_iso(rows[0]["at"]) if rows and rows[0]["at"] else None

    async def parked_before(self, cutoff: datetime) -> list[tuple[str, int]]:
        """Parked intents whose journal entry was received before `cutoff`, as
        (marketplace_order_id, journal_offset): the journal's time, so a replay agrees."""
        rows = await self._db.rows(
            "SELECT p.marketplace_order_id, p.journal_offset FROM pending_intents p JOIN journal j "
            'ON j."offset" = p.journal_offset WHERE j.received_at < ? ORDER BY p.journal_offset',
            (iso(cutoff),),
        )
        return [(r["marketplace_order_id"], int(r["journal_offset"])) for r in rows]

    async def waiting_with_intent(self) -> list[str]:
        """Orders with an intent waiting for a status event (waiting_release), oldest first."""
        rows = await self._db.rows(
            "SELECT order_id FROM orders WHERE phase = ? ORDER BY updated_at", (Phase.WAITING_RELEASE.value,)
        )
        return [r["order_id"] for r in rows]

    async def parked_count(self) -> int:
        """Intents parked until an order is linked to their marketplace id."""
        rows = await self._db.rows("SELECT COUNT(*) AS n FROM pending_intents")
        return int(rows[0]["n"])

    async def intents_waiting(self) -> int:
        """Intents that wait for an event: orders in waiting_release plus parked intents."""
        rows = await self._db.rows(
            "SELECT (SELECT COUNT(*) FROM orders WHERE phase = ?) + (SELECT COUNT(*) FROM pending_intents) AS n",
            (Phase.WAITING_RELEASE.value,),
        )
        return int(rows[0]["n"])
