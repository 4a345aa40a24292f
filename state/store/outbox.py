"""The outbox and the timers: effects the machine asked for, claimed and closed by the
effect runner; timers that come due and become journal events.

A row goes pending → started (claimed, its call under way) → done (its result journaled
in the same transaction), or → superseded when its order stopped waiting for it. The
policy for rows a stopped process left started is the effect runner's; here are the rows.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime

import aiosqlite

from ..events import TimerFired
from ..models import EFFECT_ADAPTER, Effect
from ..statuses import STUCK
from .db import Database, marks, parts
from .journal import insert
from .rows import Appended, ClaimClass, NewEntry, OutboxRow, from_iso, iso

_CLAIMABLE = "state = 'pending' AND order_id NOT IN (SELECT order_id FROM orders WHERE phase = ?)"


class Outbox:
    def __init__(self, db: Database) -> None:
        self._db = db

    # ---- effects ----------------------------------------------------------------------
    async def claim(
        self,
        limit: int,
        *,
        now: datetime,
        kinds: Mapping[str, int] | None = None,
        classes: Sequence[ClaimClass] | None = None,
    ) -> list[OutboxRow]:
        """Mark up to `limit` pending effects as started (at `now`) and return them. With
        `classes`, class by class in that order (the caller's priority), each oldest first
        and at most its `most`, returned in that order; without, oldest first. With `kinds`,
        at most that many of each kind named in all (the others not at all). Those of a stuck
        order wait (its pending effects are decided again when its events are)."""
        ordered = classes is not None
        if classes is None:
            classes = [ClaimClass(kind, most) for kind, most in (kinds or {"": limit}).items()]
        room = dict(kinds) if kinds is not None else None
        async with self._db.tx() as conn:
            rows: list[sqlite3.Row] = []
            for c in classes:
                most = min(c.most, (limit if c.upto is None else min(limit, c.upto)) - len(rows))
                if room is not None:
                    most = min(most, room.get(c.kind, 0))
                if most <= 0:
                    continue
                where, params = _CLAIMABLE, [STUCK]
                if c.kind:
                    where += " AND kind = ?"
                    params.append(c.kind)
                if c.purposes is not None:
                    where += f" AND json_extract(payload, '$.purpose') IN ({marks(c.purposes)})"
                    params.extend(c.purposes)
                sql = f"SELECT * FROM outbox WHERE {where} ORDER BY id LIMIT ?"  # noqa: S608
                async with conn.execute(sql, (*params, most)) as cur:
                    got = list(await cur.fetchall())
                await conn.executemany(
                    "UPDATE outbox SET state = 'started', started_at = ? WHERE id = ?",
                    [(iso(now), r["id"]) for r in got],
                )
                rows += got
                if room is not None:
                    room[c.kind] -= len(got)
        if not ordered:
            rows.sort(key=lambda r: int(r["id"]))
        return [_outbox_row(r) for r in rows]

    async def finish(self, outbox_id: int, result: NewEntry, *, now: datetime) -> Appended:
        """Append the effect's result and close the outbox row (done at `now`), atomically."""
        async with self._db.tx() as conn:
            appended = await insert(conn, result)
            await conn.execute("UPDATE outbox SET state = 'done', done_at = ? WHERE id = ?", (iso(now), outbox_id))
        return appended

    async def started(self) -> list[OutboxRow]:
        """Effects marked started and never finished (their process stopped mid-call)."""
        rows = await self._db.rows("SELECT * FROM outbox WHERE state = 'started' ORDER BY id")
        return [_outbox_row(r) for r in rows]

    async def requeue(self, outbox_id: int) -> None:
        """Put a started effect back to pending, to be claimed and performed again."""
        async with self._db.tx() as conn:
            await conn.execute("UPDATE outbox SET state = 'pending' WHERE id = ? AND state = 'started'", (outbox_id,))

    async def states(self) -> dict[tuple[str, int], str]:
        """(order id, seq) -> state of every outbox row."""
        rows = await self._db.rows("SELECT order_id, seq, state FROM outbox")
        return {(r["order_id"], int(r["seq"])): r["state"] for r in rows}

    async def last_id(self) -> int:
        """The newest outbox row's id (0: none)."""
        rows = await self._db.rows("SELECT COALESCE(MAX(id), 0) FROM outbox")
        return int(rows[0][0])

    async def queued_after(self, last_id: int, page: int = 1000) -> AsyncIterator[list[tuple[str, int]]]:
        """The effects queued since the row `last_id` (see `last_id`), as (order id, seq) in that
        order, `page` at a time."""
        key: tuple[str, int] = ("", -1)
        while rows := await self._db.rows(
            "SELECT order_id, seq FROM outbox WHERE id > ? AND (order_id, seq) > (?, ?) ORDER BY order_id, seq LIMIT ?",
            (last_id, *key, page),
        ):
            key = (rows[-1][0], int(rows[-1][1]))
            yield [(r[0], int(r[1])) for r in rows]

    async def counts(self) -> dict[str, int]:
        rows = await self._db.rows("SELECT state, COUNT(*) AS n FROM outbox GROUP BY state")
        return {r["state"]: int(r["n"]) for r in rows}

    async def link_lookups_in_flight(self) -> int:
        """Link Get orders asked and not answered yet (pending or started)."""
        rows = await self._db.rows(
            "SELECT COUNT(*) AS n FROM outbox WHERE state IN ('pending', 'started') "
            "AND kind = 'fetch_order' AND json_extract(payload, '$.purpose') = 'link'"
        )
        return int(rows[0]["n"])

    # ---- timers -----------------------------------------------------------------------
    async def fire_due_timers(self, now: datetime) -> int:
        """Turn due timers into TimerFired journal events, exactly once each."""
        async with self._db.tx() as conn:
            async with conn.execute("SELECT * FROM timers WHERE due_at <= ?", (iso(now),)) as cur:
                rows = list(await cur.fetchall())
            for r in rows:
                event = TimerFired(order_id=r["order_id"], token=r["token"], reason=r["reason"])
                key = f"timer:{event.order_id}:{event.token}"
                await insert(conn, NewEntry.of(event, source="timer", received_at=now, dedup_key=key))
                await conn.execute("DELETE FROM timers WHERE order_id = ? AND token = ?", (r["order_id"], r["token"]))
        return len(rows)

    async def next_timer_due(self) -> datetime | None:
        rows = await self._db.rows("SELECT MIN(due_at) AS d FROM timers")
        value = rows[0]["d"]
        return from_iso(value) if value else None


async def queue(conn: aiosqlite.Connection, effects: Iterable[Effect], stamp: str) -> None:
    """New pending rows, inside the caller's transaction (an effect already queued stays as it is)."""
    await conn.executemany(
        "INSERT OR IGNORE INTO outbox (order_id, seq, kind, payload, created_at) VALUES (?, ?, ?, ?, ?)",
        [(e.order_id, e.seq, e.kind, e.model_dump_json(), stamp) for e in effects],
    )


async def supersede(
    conn: aiosqlite.Connection,
    live: Mapping[str, int | None],
    stamp: str,
    *,
    started: bool = False,
    everyone: bool = False,
) -> None:
    """Mark superseded the pending (and, `started`, the started) rows of the orders in `live`
    whose sequence is not the one the order waits for (`live[order]`). `everyone`: every
    such row of any order, those of orders absent from `live` included."""
    states = "('pending', 'started')" if started else "('pending')"
    candidates: list[sqlite3.Row] = []
    if everyone:
        async with conn.execute(f"SELECT id, order_id, seq FROM outbox WHERE state IN {states}") as cur:  # noqa: S608
            candidates = list(await cur.fetchall())
    else:
        for part in parts(list(live)):
            sql = f"SELECT id, order_id, seq FROM outbox WHERE order_id IN ({marks(part)}) AND state IN {states}"  # noqa: S608
            async with conn.execute(sql, part) as cur:
                candidates += await cur.fetchall()
    stale = [(stamp, r["id"]) for r in candidates if live.get(r["order_id"]) != r["seq"]]
    await conn.executemany("UPDATE outbox SET state = 'superseded', done_at = ? WHERE id = ?", stale)


async def requeue_superseded(conn: aiosqlite.Connection, effects: Iterable[Effect], stamp: str) -> None:
    """Queue these effects again: a missing row is added, a superseded one is pending anew."""
    await conn.executemany(
        "INSERT INTO outbox (order_id, seq, kind, payload, created_at) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT(order_id, seq) DO UPDATE SET state = 'pending', started_at = NULL, done_at = NULL "
        "WHERE state = 'superseded'",
        [(e.order_id, e.seq, e.kind, e.model_dump_json(), stamp) for e in effects],
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
