"""What the daemon learned of the outside world and keeps across restarts (the VTEX
client's adapted rate and open Retry-After windows, when VTEX's configurations were last
read): named JSON records, read at start-up and overwritten as they change. Not derived
from the journal: a replay leaves them alone, and losing them costs only re-learning."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from .db import Database
from .rows import iso


class Learned:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def get(self, name: str) -> str | None:
        rows = await self._db.rows("SELECT data FROM vtex_learned WHERE name = ?", (name,))
        return str(rows[0]["data"]) if rows else None

    async def put(self, records: Mapping[str, str], *, now: datetime) -> None:
        """Write the records (name -> JSON text) in one transaction."""
        async with self._db.tx() as conn:
            await conn.executemany(
                "INSERT INTO vtex_learned (name, data, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET data = excluded.data, updated_at = excluded.updated_at",
                [(name, data, iso(now)) for name, data in records.items()],
            )
