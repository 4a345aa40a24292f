"""Entries captured elsewhere (`omsd ingest`), staged in a scratch database
(`Database.attach_scratch`) a chunk at a time, with the journal's dedup, and appended
to the journal in one transaction: all or nothing, in bounded memory whatever the
input's size. Nothing reaches the journal before `append`; a stop before it (an error,
a kill) leaves the journal as it was, and the scratch file goes with the connection.
"""

from __future__ import annotations

from collections.abc import Sequence

from .db import Database, marks
from .journal import append_staged, row_values
from .rows import NewEntry, iso

_DDL = """
CREATE TABLE scratch.staged (
    n           INTEGER PRIMARY KEY,
    kind        TEXT NOT NULL,
    version     INTEGER NOT NULL,
    source      TEXT NOT NULL,
    order_id    TEXT,
    dedup_key   TEXT,
    event_id    TEXT,
    payload     TEXT NOT NULL,
    reason      TEXT,
    received_at TEXT NOT NULL,
    dedup_hash  INTEGER,
    event_hash  INTEGER
);
CREATE INDEX scratch.staged_dedup_hash ON staged(dedup_hash);
CREATE INDEX scratch.staged_event_hash ON staged(event_hash);
CREATE TABLE scratch.probe (n INTEGER PRIMARY KEY, order_id TEXT, kind TEXT, received_at TEXT, payload TEXT);
"""
_HASHED = {"dedup_key": "dedup_hash", "event_id": "event_hash"}
# The database's page cache while the staged rows go in: their keys land all over the
# journal's indexes (186,590 feed items: 2.4 s with SQLite's default 2 MiB, 1.5 s with 16).
APPEND_CACHE_KIB = 16 * 1024
_KEYS_PER_LOOKUP = 400  # four parameters per key over two queries: well under SQLite's limit
_COLUMNS = "kind, version, source, order_id, dedup_key, event_id, payload, reason, received_at"  # as `row_values`
# (journal.append_staged copies these columns into the journal)
_MARKS = "?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?"  # and the keys' hashes


class Staging:
    """One ingest's staged entries, on the store's connection (see the module)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.staged = 0
        self._probed = False  # entries without keys met: staged rows are indexed for their match

    @classmethod
    async def begin(cls, db: Database) -> Staging:
        await db.attach_scratch(_DDL)
        return cls(db)

    async def close(self) -> None:
        await self._db.detach_scratch()

    async def add(self, entries: Sequence[NewEntry]) -> list[bool]:
        """Stage entries that are not duplicates; True for each that is. As `Journal.append`
        decides, over the journal and what is staged before them: a duplicate has a dedup
        key or an event id seen already; an entry with neither is one when a row with the
        same order, kind, receipt time and payload is (so an export ingested twice adds
        nothing)."""
        seen_keys = await self._known("dedup_key", {e.dedup_key for e in entries if e.dedup_key is not None})
        seen_ids = await self._known("event_id", {e.event_id for e in entries if e.event_id is not None})
        matched = await self._matched(entries)
        exact: set[tuple[str | None, str, str, str]] = set()
        out: list[bool] = []
        fresh: list[tuple[object, ...]] = []
        for n, entry in enumerate(entries):
            key, event_id = entry.dedup_key, entry.event_id
            if key is None and event_id is None:
                same = (entry.order_id, entry.kind, iso(entry.received_at), entry.payload)
                duplicate = n in matched or same in exact
                exact.add(same)
            else:
                duplicate = key in seen_keys or event_id in seen_ids
                if not duplicate:
                    if key is not None:
                        seen_keys.add(key)
                    if event_id is not None:
                        seen_ids.add(event_id)
            out.append(duplicate)
            if not duplicate:
                fresh.append((*row_values(entry), _hash(key), _hash(event_id)))
        if fresh:
            async with self._db.tx(deferred=True) as conn:
                await conn.executemany(
                    f"INSERT INTO scratch.staged ({_COLUMNS}, dedup_hash, event_hash) VALUES ({_MARKS})",  # noqa: S608
                    fresh,
                )
            self.staged += len(fresh)
        return out

    async def append(self) -> int:
        """Append every staged entry to the journal, in the order staged, in one
        transaction (`journal.append_staged`). Returns how many rows it added."""
        async with self._db.cache(APPEND_CACHE_KIB), self._db.tx() as conn:
            return await append_staged(conn)

    async def _known(self, column: str, wanted: set[str]) -> set[str]:
        """The values among `wanted` that the journal, or the staged entries, hold in `column`.
        Staged keys are indexed by their hash (an index of numbers stays small and in the
        cache; keys are long texts): what it finds is checked against the keys themselves."""
        found: set[str] = set()
        values = sorted(wanted)
        for start in range(0, len(values), _KEYS_PER_LOOKUP):
            part = values[start : start + _KEYS_PER_LOOKUP]
            sql = (
                f"SELECT {column} FROM main.journal WHERE {column} IN ({marks(part)}) "  # noqa: S608 - fixed names
                f"UNION ALL SELECT {column} FROM scratch.staged WHERE {_HASHED[column]} IN ({marks(part)})"
            )
            found.update(str(r[0]) for r in await self._db.rows(sql, [*part, *(_hash(v) for v in part)]))
        return found & wanted

    async def _matched(self, entries: Sequence[NewEntry]) -> set[int]:
        """The positions of the entries without keys that match a journaled or staged row."""
        probes = [
            (n, e.order_id, e.kind, iso(e.received_at), e.payload)
            for n, e in enumerate(entries)
            if e.dedup_key is None and e.event_id is None
        ]
        if not probes:
            return set()
        async with self._db.tx(deferred=True) as conn:
            if not self._probed:  # (a feed dump has none: its staging does without this index)
                await conn.execute("CREATE INDEX scratch.staged_order ON staged(order_id, kind, received_at)")
                self._probed = True
            await conn.execute("DELETE FROM scratch.probe")
            await conn.executemany("INSERT INTO scratch.probe VALUES (?, ?, ?, ?, ?)", probes)
        rows = await self._db.rows(
            "SELECT p.n FROM scratch.probe p WHERE EXISTS (SELECT 1 FROM main.journal j WHERE j.order_id IS p.order_id "
            "AND j.kind = p.kind AND j.received_at = p.received_at AND j.payload = p.payload) OR EXISTS (SELECT 1 FROM "
            "scratch.staged s WHERE s.order_id IS p.order_id AND s.kind = p.kind AND s.received_at = p.received_at "
            "AND s.payload = p.payload)"
        )
        return {int(r[0]) for r in rows}


def _hash(key: str | None) -> int | None:
    """A key's hash for the staged index: Python's own, the same within this process, which
    is as long as the scratch database lives."""
    return hash(key) if key is not None else None
