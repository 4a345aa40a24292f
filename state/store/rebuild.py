"""A rebuilt state too big for memory: what `omsd replay` computes from the journal (the
orders, their history, unreadable rows, which order each marketplace id routes to),
staged in a scratch database (`Database.attach_scratch`) in bounded steps while the
journal is read, compared there with the stored state, and installed by `Derived.install`
in one transaction.

The rebuild (`daemon/tools/replay.py`) keeps a bounded cache of orders: what leaves it,
and every history row, comes here. Nothing here decides: the plan's rows come decided.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import aiosqlite

from ..batch import HistoryRow, UnreadableRow
from ..models import Effect, Order
from ..routing import derived_marketplace_id
from ..statuses import STUCK
from .db import Database, marks, parts
from .rows import iso

_DDL = """
CREATE TABLE scratch.orders (
    order_id             TEXT PRIMARY KEY,
    marketplace_order_id TEXT,
    phase                TEXT NOT NULL,
    status               TEXT,
    data                 TEXT NOT NULL,
    updated_at           TEXT,
    waits_for            INTEGER,
    timer_token          INTEGER,
    timer_reason         TEXT,
    timer_due            TEXT,
    touched              INTEGER NOT NULL,
    derived_marketplace_id TEXT
);
CREATE TABLE scratch.history (
    order_id       TEXT NOT NULL,
    journal_offset INTEGER NOT NULL,
    from_phase     TEXT,
    to_phase       TEXT NOT NULL,
    status         TEXT,
    cause          TEXT NOT NULL,
    at             TEXT NOT NULL
);
CREATE TABLE scratch.links (marketplace_order_id TEXT PRIMARY KEY, order_id TEXT NOT NULL);
CREATE TABLE scratch.unreadable (
    journal_offset INTEGER PRIMARY KEY,
    kind           TEXT NOT NULL,
    order_id       TEXT,
    error          TEXT NOT NULL,
    received_at    TEXT NOT NULL
);
CREATE TABLE scratch.selected (order_id TEXT PRIMARY KEY);
CREATE TABLE scratch.plan (
    order_id     TEXT PRIMARY KEY,
    stored       TEXT,
    rebuilt      TEXT,
    outbox_state TEXT,
    reissue      TEXT,
    recheck      INTEGER NOT NULL
);
"""

_WRITE_ORDER = "INSERT OR REPLACE INTO scratch.orders VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"

# The stored and the rebuilt order that could differ, or whose rebuilt order waits for an
# effect the outbox does not hold as pending, started or done. A superset: the caller
# compares the candidates itself. Data identical to the byte is the same order, and the
# common case: that test comes first.
_CANDIDATES = """
SELECT r.order_id, s.data, r.data, o.state FROM scratch.orders r
LEFT JOIN main.orders s ON s.order_id = r.order_id
LEFT JOIN main.outbox o ON o.order_id = r.order_id AND o.seq = r.waits_for
WHERE r.order_id > ? {only}
AND ((s.data IS NOT r.data AND (s.order_id IS NULL OR s.phase IS NOT r.phase OR s.status IS NOT r.status
      OR json_extract(s.data, '$.intent_source') IS NOT json_extract(r.data, '$.intent_source')
      OR json_extract(s.data, '$.timer') IS NOT json_extract(r.data, '$.timer')))
     OR (r.waits_for IS NOT NULL AND (o.state IS NULL OR o.state NOT IN ('pending', 'started', 'done'))))
ORDER BY r.order_id LIMIT ?
"""
_GONE = """
SELECT s.order_id, s.data FROM main.orders s
WHERE s.order_id > ? {only} AND NOT EXISTS (SELECT 1 FROM scratch.orders r WHERE r.order_id = s.order_id)
ORDER BY s.order_id LIMIT ?
"""
_ONLY = "AND {alias}.order_id IN (SELECT order_id FROM scratch.selected)"


@dataclass(frozen=True, slots=True)
class Candidate:
    """An order as stored and as rebuilt (None: absent), and the outbox's state of the
    effect the rebuilt one waits for (None: not in the outbox, or it waits for none)."""

    order_id: str
    stored: str | None
    rebuilt: str | None
    outbox_state: str | None


@dataclass(frozen=True, slots=True)
class PlanRow:
    """An order the plan shows (it differs, or needs a call): the candidate it came from,
    the effect to queue again, and whether to re-check it with a resync."""

    candidate: Candidate
    reissue: Effect | None = None
    recheck: bool = False


class Rebuild:
    """The staged state of one rebuild, on the store's connection (see the module)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @classmethod
    async def begin(cls, db: Database) -> Rebuild:
        await db.attach_scratch(_DDL)
        return cls(db)

    async def close(self) -> None:
        await self._db.detach_scratch()

    # ---- staging, while the journal is read ----------------------------------------------
    async def orders(self, order_ids: Collection[str]) -> dict[str, tuple[Order, int]]:
        """The staged orders among `order_ids`, with the last offset that applied to each."""
        found: dict[str, tuple[Order, int]] = {}
        for part in parts(list(order_ids)):
            sql = f"SELECT data, touched FROM scratch.orders WHERE order_id IN ({marks(part)})"  # noqa: S608
            for r in await self._db.rows(sql, part):
                order = Order.model_validate_json(r[0])
                found[order.order_id] = (order, int(r[1]))
        return found

    async def links(self, marketplace_order_ids: Collection[str]) -> dict[str, str]:
        """The order each of these marketplace ids routes to (those linked to none left out)."""
        found: dict[str, str] = {}
        for part in parts(list(marketplace_order_ids)):
            sql = (
                "SELECT marketplace_order_id, order_id FROM scratch.links "  # noqa: S608 - placeholders only
                f"WHERE marketplace_order_id IN ({marks(part)})"
            )
            found.update((r[0], r[1]) for r in await self._db.rows(sql, part))
        return found

    async def write(
        self,
        orders: Iterable[tuple[Order, int]],
        history: Sequence[HistoryRow] = (),
        unreadable: Sequence[UnreadableRow] = (),
        links: Mapping[str, str] | None = None,
    ) -> None:
        """Stage orders (each with the last offset that applied to it; a staged order is
        replaced), history rows (appended, in order), unreadable rows, and links (the first
        link of a marketplace id stays)."""
        async with self._scratch_tx() as conn:
            await conn.executemany(_WRITE_ORDER, (_order_row(o, touched) for o, touched in orders))
            await conn.executemany(
                "INSERT INTO scratch.history VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (h.order_id, h.journal_offset, h.from_phase, h.to_phase, h.status, h.cause, iso(h.at))
                    for h in history
                ],
            )
            await conn.executemany(
                "INSERT OR REPLACE INTO scratch.unreadable VALUES (?, ?, ?, ?, ?)",
                [(u.journal_offset, u.kind, u.order_id, u.error, iso(u.received_at)) for u in unreadable],
            )
            if links:
                await conn.executemany("INSERT OR IGNORE INTO scratch.links VALUES (?, ?)", links.items())

    # ---- the plan -------------------------------------------------------------------------
    async def select(self, *, key: str | None = None, touched_from: int | None = None) -> int:
        """Keep the orders a partial replay rewrites in `selected`: those whose VTEX or
        marketplace id is `key` (stored or rebuilt), or the rebuilt ones a journal row from
        offset `touched_from` on applied to. Returns how many."""
        async with self._scratch_tx() as conn:
            if key is not None:
                await conn.execute(
                    "INSERT OR IGNORE INTO scratch.selected SELECT order_id FROM main.orders "
                    "WHERE order_id = ?1 OR marketplace_order_id = ?1 UNION SELECT order_id FROM scratch.orders "
                    "WHERE order_id = ?1 OR marketplace_order_id = ?1",
                    (key,),
                )
            if touched_from is not None:
                await conn.execute(
                    "INSERT OR IGNORE INTO scratch.selected SELECT order_id FROM scratch.orders WHERE touched >= ?",
                    (touched_from,),
                )
        rows = await self._db.rows("SELECT COUNT(*) FROM scratch.selected")
        return int(rows[0][0])

    async def compared(self, *, selected: bool) -> int:
        """How many orders the plan compares: every stored or rebuilt one, or the selected."""
        if selected:
            rows = await self._db.rows("SELECT COUNT(*) FROM scratch.selected")
        else:
            rows = await self._db.rows(
                "SELECT (SELECT COUNT(*) FROM scratch.orders) + (SELECT COUNT(*) FROM main.orders s "
                "WHERE NOT EXISTS (SELECT 1 FROM scratch.orders r WHERE r.order_id = s.order_id))"
            )
        return int(rows[0][0])

    async def candidates(self, *, selected: bool, page: int = 1000) -> AsyncIterator[list[Candidate]]:
        """The orders whose stored and rebuilt states could differ or that may need a call
        (see `_CANDIDATES`: a superset), by order id, `page` at a time; then the stored
        orders the journal no longer gives."""
        rebuilt_sql = _CANDIDATES.format(only=_ONLY.format(alias="r") if selected else "")
        last = ""
        while rows := await self._db.rows(rebuilt_sql, (last, page)):
            last = rows[-1][0]
            yield [Candidate(r[0], r[1], r[2], r[3]) for r in rows]
        gone_sql = _GONE.format(only=_ONLY.format(alias="s") if selected else "")
        last = ""
        while rows := await self._db.rows(gone_sql, (last, page)):
            last = rows[-1][0]
            yield [Candidate(r[0], r[1], None, None) for r in rows]

    async def record(self, rows: Sequence[PlanRow]) -> None:
        """Keep the orders the plan shows, for `install` (their calls) and `shown`."""
        async with self._scratch_tx() as conn:
            await conn.executemany(
                "INSERT OR REPLACE INTO scratch.plan VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        p.candidate.order_id,
                        p.candidate.stored,
                        p.candidate.rebuilt,
                        p.candidate.outbox_state,
                        p.reissue.model_dump_json() if p.reissue is not None else None,
                        p.recheck,
                    )
                    for p in rows
                ],
            )

    async def shown(self, page: int = 1000) -> AsyncIterator[list[Candidate]]:
        """The orders the plan shows, as compared, by order id, `page` at a time."""
        last = ""
        while rows := await self._db.rows(
            "SELECT order_id, stored, rebuilt, outbox_state FROM scratch.plan WHERE order_id > ? "
            "ORDER BY order_id LIMIT ?",
            (last, page),
        ):
            last = rows[-1][0]
            yield [Candidate(r[0], r[1], r[2], r[3]) for r in rows]

    async def rechecks(self) -> list[str]:
        """The orders the plan re-checks with a resync (an approval of unknown outcome)."""
        rows = await self._db.rows("SELECT order_id FROM scratch.plan WHERE recheck ORDER BY order_id")
        return [r[0] for r in rows]

    def _scratch_tx(self) -> AbstractAsyncContextManager[aiosqlite.Connection]:
        return self._db.tx(deferred=True)


def _order_row(order: Order, touched: int) -> tuple[object, ...]:
    timer, inflight = order.timer, order.inflight
    return (
        order.order_id,
        order.marketplace_order_id,
        STUCK if order.stuck is not None else order.phase,  # as derived.py writes the phase column
        order.status,
        order.model_dump_json(),
        iso(order.updated_at) if order.updated_at is not None else None,
        inflight.seq if inflight is not None else None,
        timer.token if timer is not None else None,
        timer.reason if timer is not None else None,
        iso(timer.due_at) if timer is not None else None,
        touched,
        derived_marketplace_id(order.order_id),
    )
