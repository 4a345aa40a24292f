"""The outcome stream and its relay's bookkeeping.

Outcomes are written by the processor's commit (`derived.py`), in the same transaction as
the state change that caused them; `seq` is SQLite's AUTOINCREMENT, so readers see it
gap-free and rising. Here they are read (`after`, `bounds`), kept for the retention, and
handed to the relay: each endpoint has a cursor, and takes outcomes past it into
`relay_deliveries` (at most a window's worth at a time), which it deletes once the
connector acknowledged them. A delivery is due only when it is the oldest pending one of
its order (keyed by marketplace id when known: `order_key`), so one order's events go out
in order, and a failing order holds back only its own.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiosqlite

from ..outcomes import Outcome
from .db import Database, marks
from .rows import from_iso, iso

_MAX_SEQ = 2**63 - 1


@dataclass(frozen=True, slots=True)
class OutcomeRow:
    seq: int
    id: str
    type: str
    occurred_at: datetime
    order_id: str | None
    marketplace_order_id: str | None
    data: dict[str, Any]

    def view(self) -> dict[str, Any]:
        """As the connector sees it (the pull API, the stream, the relay)."""
        return {
            "seq": self.seq,
            "id": self.id,
            "type": self.type,
            "occurred_at": self.occurred_at.isoformat(),
            "order_id": self.order_id,
            "marketplace_order_id": self.marketplace_order_id,
            "data": self.data,
        }


@dataclass(frozen=True, slots=True)
class Delivery:
    endpoint: str
    attempts: int
    outcome: OutcomeRow


@dataclass(frozen=True, slots=True)
class EndpointState:
    name: str
    cursor: int  # outcomes up to this seq are taken (delivered, or in `pending`/`failed`)
    disabled_at: datetime | None
    disabled_reason: str | None
    pending: int
    failed: int
    oldest_undelivered: datetime | None  # when the oldest outcome not yet delivered happened
    orphaned: int = 0  # deliveries (pending or failed) whose outcome is gone: an older retention removed it
    last_error: str | None = None  # why the oldest delivery that failed failed (HTTP 503, a certificate refused)


def order_key(order_id: str | None, marketplace_order_id: str | None) -> str:
    """What the relay keeps in order: the marketplace id when known, which every outcome of
    an intent carries from its parking on (its `intent.accepted` has no VTEX id yet, its
    order's later events have both); else the VTEX id."""
    return marketplace_order_id or order_id or "-"


async def write(conn: aiosqlite.Connection, outcomes: Iterable[Outcome]) -> int | None:
    """Insert outcomes inside the caller's transaction (an id already written is kept as it
    was: deriving again never rewrites the stream). Returns the last seq, None if none.
    An id already there is skipped by `NOT EXISTS`, not by `INSERT OR IGNORE`, which would
    spend an AUTOINCREMENT value on it and leave a gap in the seqs readers see."""
    rows = [
        (
            o.id,
            o.type,
            iso(o.occurred_at),
            o.order_id,
            o.marketplace_order_id,
            o.journal_offset,
            json.dumps(o.data),
            o.id,
        )
        for o in outcomes
    ]
    if not rows:
        return None
    await conn.executemany(
        "INSERT INTO outcomes (id, type, occurred_at, order_id, marketplace_order_id, journal_offset, data) "
        "SELECT ?, ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM outcomes WHERE id = ?)",
        rows,
    )
    async with conn.execute("SELECT COALESCE(MAX(seq), 0) FROM outcomes") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else None


class Outcomes:
    def __init__(self, db: Database) -> None:
        self._db = db

    # ---- the stream -------------------------------------------------------------------------
    async def after(
        self, seq: int, limit: int, *, types: Sequence[str] = (), order: str | None = None, upto: int | None = None
    ) -> list[OutcomeRow]:
        """Outcomes after `seq` (and up to `upto`), oldest first: all, or of these types, or of
        one order (its VTEX or its marketplace id)."""
        where, params = ["seq > ?"], list[Any]([seq])
        if upto is not None:
            where.append("seq <= ?")
            params.append(upto)
        if types:
            where.append(f"type IN ({marks(types)})")
            params += list(types)
        if order is not None:
            where.append("(order_id = ? OR marketplace_order_id = ?)")
            params += [order, order]
        rows = await self._db.rows(
            f"SELECT * FROM outcomes WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?",  # noqa: S608 - fixed fragments
            (*params, limit),
        )
        return [_row(r) for r in rows]

    async def bounds(self) -> tuple[int, int]:
        """(oldest, last): the smallest `after` that loses nothing (an `after` below it asks
        for outcomes the retention removed), and the last seq ever written (0: none yet)."""
        rows = await self._db.rows(
            "SELECT (SELECT MIN(seq) FROM outcomes) AS first, "
            "(SELECT seq FROM sqlite_sequence WHERE name = 'outcomes') AS last"
        )
        last = int(rows[0]["last"] or 0)
        first = rows[0]["first"]
        return (int(first) - 1 if first is not None else last), last

    async def prune(self, before: datetime) -> int:
        """Remove the outcomes before the first one that happened at or after `before`: a
        prefix of the stream, never a hole in it (`occurred_at` need not rise with `seq`: rows
        ingested keep their time, a clock can step back); and none a relay still has to
        deliver or gave up on (`omsd relay retry` sends it again), nor any after it. Returns
        how many went."""
        async with self._db.tx() as conn:
            cur = await conn.execute(
                # `+occurred_at`: scan by seq from the start (the prefix going), not the time index
                "DELETE FROM outcomes WHERE "
                "seq < COALESCE((SELECT seq FROM outcomes WHERE +occurred_at >= ? ORDER BY seq LIMIT 1), ?) "
                "AND seq < COALESCE((SELECT MIN(seq) FROM relay_deliveries), ?) "  # pending or given up
                "AND seq <= COALESCE((SELECT MIN(seq) FROM relay_endpoints WHERE disabled_at IS NULL), ?)",
                (iso(before), _MAX_SEQ, _MAX_SEQ, _MAX_SEQ),
            )
            return cur.rowcount

    # ---- the relay's bookkeeping --------------------------------------------------------------
    async def endpoint(self, name: str) -> EndpointState:
        """The endpoint's state, created (its cursor at the last outcome: a new endpoint gets
        what happens from now on; `rewind` sends older ones) when it is new."""
        async with self._db.tx() as conn:
            await conn.execute(
                "INSERT OR IGNORE INTO relay_endpoints (name, seq) "
                "VALUES (?, COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'outcomes'), 0))",
                (name,),
            )
        [state] = [s for s in await self.endpoints() if s.name == name]
        return state

    async def endpoints(self) -> list[EndpointState]:
        rows = await self._db.rows(
            "SELECT e.name, e.seq, e.disabled_at, e.disabled_reason, "
            "(SELECT COUNT(*) FROM relay_deliveries d WHERE d.endpoint = e.name AND d.state = 'pending') AS pending, "
            "(SELECT COUNT(*) FROM relay_deliveries d WHERE d.endpoint = e.name AND d.state = 'failed') AS failed, "
            "(SELECT COUNT(*) FROM relay_deliveries d WHERE d.endpoint = e.name "
            "AND NOT EXISTS (SELECT 1 FROM outcomes g WHERE g.seq = d.seq)) AS orphaned, "
            "(SELECT d.last_error FROM relay_deliveries d WHERE d.endpoint = e.name AND d.last_error IS NOT NULL "
            "ORDER BY d.seq LIMIT 1) AS last_error, "
            "(SELECT MIN(o.occurred_at) FROM outcomes o WHERE o.seq = COALESCE("
            "(SELECT MIN(d.seq) FROM relay_deliveries d WHERE d.endpoint = e.name AND d.state = 'pending' "
            "AND EXISTS (SELECT 1 FROM outcomes g WHERE g.seq = d.seq)), "
            "(SELECT MIN(o2.seq) FROM outcomes o2 WHERE o2.seq > e.seq))) AS oldest "
            "FROM relay_endpoints e ORDER BY e.name"
        )
        return [
            EndpointState(
                r["name"],
                int(r["seq"]),
                from_iso(r["disabled_at"]) if r["disabled_at"] else None,
                r["disabled_reason"],
                int(r["pending"]),
                int(r["failed"]),
                from_iso(r["oldest"]) if r["oldest"] else None,
                int(r["orphaned"]),
                r["last_error"],
            )
            for r in rows
        ]

    async def take(
        self, name: str, window: int, now: datetime, types: Sequence[str] = (), upto: int | None = None
    ) -> int:
        """Move outcomes past the endpoint's cursor (up to `upto`) into its deliveries, while
        fewer than `window` are pending; only those of `types` (all when empty). Returns how many."""
        async with self._db.tx() as conn:
            async with conn.execute(
                "SELECT e.seq, (SELECT COUNT(*) FROM relay_deliveries d "
                "WHERE d.endpoint = e.name AND d.state = 'pending') "
                "FROM relay_endpoints e WHERE e.name = ? AND e.disabled_at IS NULL",
                (name,),
            ) as cur:
                row = await cur.fetchone()
            if row is None or int(row[1]) >= window:
                return 0
            cursor, room = int(row[0]), window - int(row[1])
            async with conn.execute(
                "SELECT seq, type, order_id, marketplace_order_id FROM outcomes WHERE seq > ? AND seq <= ? "
                "ORDER BY seq LIMIT ?",
                (cursor, _MAX_SEQ if upto is None else upto, room),
            ) as cur:
                found = list(await cur.fetchall())
            if not found:
                return 0
            wanted = [r for r in found if not types or r["type"] in types]
            await conn.executemany(
                "INSERT OR IGNORE INTO relay_deliveries (endpoint, seq, order_key, next_at) VALUES (?, ?, ?, ?)",
                [(name, r["seq"], order_key(r["order_id"], r["marketplace_order_id"]), iso(now)) for r in wanted],
            )
            await conn.execute("UPDATE relay_endpoints SET seq = ? WHERE name = ?", (found[-1]["seq"], name))
            return len(wanted)

    async def due(self, name: str, now: datetime, limit: int) -> list[Delivery]:
        """Deliveries to make now: due, and each the oldest pending one of its order."""
        rows = await self._db.rows(
            "SELECT d.attempts, o.* FROM relay_deliveries d JOIN outcomes o ON o.seq = d.seq "
            "WHERE d.endpoint = ? AND d.state = 'pending' AND d.next_at <= ? AND d.seq = ("
            "SELECT MIN(x.seq) FROM relay_deliveries x WHERE x.endpoint = d.endpoint AND x.order_key = d.order_key "
            "AND x.state = 'pending') ORDER BY d.seq LIMIT ?",
            (name, iso(now), limit),
        )
        return [Delivery(name, int(r["attempts"]), _row(r)) for r in rows]

    async def next_due(self, name: str) -> datetime | None:
        """When the next delivery becomes due (among those at the head of their order)."""
        rows = await self._db.rows(
            "SELECT MIN(d.next_at) AS n FROM relay_deliveries d WHERE d.endpoint = ? AND d.state = 'pending' "
            "AND d.seq = (SELECT MIN(x.seq) FROM relay_deliveries x WHERE x.endpoint = d.endpoint "
            "AND x.order_key = d.order_key AND x.state = 'pending')",
            (name,),
        )
        return from_iso(rows[0]["n"]) if rows[0]["n"] else None

    async def delivered(self, name: str, seqs: Sequence[int]) -> None:
        async with self._db.tx() as conn:
            await conn.executemany(
                "DELETE FROM relay_deliveries WHERE endpoint = ? AND seq = ?", [(name, seq) for seq in seqs]
            )

    async def failed(self, name: str, seq: int, *, next_at: datetime | None, error: str) -> None:
        """A delivery failed: try again at `next_at`, or (None) give up on it."""
        async with self._db.tx() as conn:
            await conn.execute(
                "UPDATE relay_deliveries SET attempts = attempts + 1, last_error = ?, next_at = COALESCE(?, next_at), "
                "state = CASE WHEN ? IS NULL THEN 'failed' ELSE state END WHERE endpoint = ? AND seq = ?",
                (error[:500], iso(next_at) if next_at else None, iso(next_at) if next_at else None, name, seq),
            )

    async def disable(self, name: str, reason: str, now: datetime) -> None:
        async with self._db.tx() as conn:
            await conn.execute(
                "UPDATE relay_endpoints SET disabled_at = ?, disabled_reason = ? WHERE name = ?",
                (iso(now), reason[:500], name),
            )

    async def retry(self, name: str, now: datetime) -> int:
        """Enable the endpoint again and make every delivery it gave up on, or that waits out a
        backoff, due now. Returns how many it had given up on."""
        async with self._db.tx() as conn:
            await conn.execute(
                "UPDATE relay_endpoints SET disabled_at = NULL, disabled_reason = NULL WHERE name = ?", (name,)
            )
            cur = await conn.execute(
                "UPDATE relay_deliveries SET state = 'pending', next_at = ? WHERE endpoint = ? AND state = 'failed'",
                (iso(now), name),
            )
            await conn.execute(
                "UPDATE relay_deliveries SET next_at = ? WHERE endpoint = ? AND state = 'pending' AND next_at > ?",
                (iso(now), name, iso(now)),
            )
            return cur.rowcount

    async def rekey(self, name: str) -> None:
        """Key the endpoint's deliveries as `take` does now (an older omsd keyed them by VTEX
        id first): an order's deliveries taken before an upgrade stay in order with the rest."""
        async with self._db.tx() as conn:
            await conn.execute(
                "UPDATE relay_deliveries SET order_key = (SELECT COALESCE(o.marketplace_order_id, o.order_id, '-') "
                "FROM outcomes o WHERE o.seq = relay_deliveries.seq) WHERE endpoint = ? "
                "AND EXISTS (SELECT 1 FROM outcomes o WHERE o.seq = relay_deliveries.seq)",
                (name,),
            )

    async def drop_orphans(self, name: str) -> int:
        """Delete the endpoint's deliveries whose outcome is gone (an older omsd's retention
        spared only pending ones: a given-up delivery lost its outcome and, once retried,
        blocked its order and the window for ever). Returns how many went."""
        async with self._db.tx() as conn:
            cur = await conn.execute(
                "DELETE FROM relay_deliveries WHERE endpoint = ? "
                "AND NOT EXISTS (SELECT 1 FROM outcomes g WHERE g.seq = relay_deliveries.seq)",
                (name,),
            )
            return cur.rowcount

    async def rewind(self, name: str, from_seq: int) -> None:
        """Deliver again every outcome from `from_seq` on (the connector dedups by id)."""
        async with self._db.tx() as conn:
            await conn.execute("UPDATE relay_endpoints SET seq = ? WHERE name = ?", (max(0, from_seq - 1), name))


def _row(r: sqlite3.Row) -> OutcomeRow:
    return OutcomeRow(
        seq=int(r["seq"]),
        id=r["id"],
        type=r["type"],
        occurred_at=from_iso(r["occurred_at"]),
        order_id=r["order_id"],
        marketplace_order_id=r["marketplace_order_id"],
        data=json.loads(r["data"]),
    )
