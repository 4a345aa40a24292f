"""The store: the one owner of SQLite, in parts by concern, over one database.

- `db` (`db.py`): the connection, transactions, errors, the write probe;
- `journal` (`journal.py`): append-only rows with offsets, and the feed handles to commit;
- `derived` (`derived.py`): the one writer of every row derived from the journal;
- `outbox` (`outbox.py`): effects to perform, and timers that come due;
- `outcomes` (`outcomes.py`): the outcome stream for the connector, and its relay's deliveries;
- `read` (`queries.py`): the derived rows, read;
- `retention` (`retention.py`): snapshots of quiet orders, the vacuum;
- `learned` (`learned.py`): what the daemon learned of VTEX, kept across restarts.
- `rebuild()` (`rebuild.py`): a replay's rebuilt state, staged in a scratch database;
- `staging()` (`staging.py`): an ingest's entries, staged there and appended in one transaction.

The store applies no domain rule: what to write comes decided (`state.apply`'s batch).
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Self

from ..batch import Batch, HistoryRow, JournalRow, UnreadableRow
from .db import Database, SchemaTooNew, StoreError, StoreUnwritable, database_bytes
from .derived import Derived
from .journal import Journal
from .learned import Learned
from .outbox import Outbox
from .outcomes import Outcomes
from .queries import Queries
from .rebuild import Candidate, PlanRow, Rebuild
from .retention import Retention
from .rows import Appended, ClaimClass, NewEntry, OutboxRow, ParkedIntent, Pruned, from_iso, iso
from .staging import Staging

__all__ = [
    "Appended",
    "Batch",
    "Candidate",
    "ClaimClass",
    "HistoryRow",
    "JournalRow",
    "NewEntry",
    "OutboxRow",
    "ParkedIntent",
    "PlanRow",
    "Pruned",
    "Rebuild",
    "SchemaTooNew",
    "Staging",
    "Store",
    "StoreError",
    "StoreUnwritable",
    "UnreadableRow",
    "database_bytes",
    "from_iso",
    "iso",
]


class Store:
    """One database and its parts (see the module's docstring)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.journal = Journal(db)
        self.derived = Derived(db)
        self.outbox = Outbox(db)
        self.outcomes = Outcomes(db)
        self.read = Queries(db)
        self.retention = Retention(db)
        self.learned = Learned(db)

    @property
    def path(self) -> Path:
        return self.db.path

    @classmethod
    async def open(cls, path: str | Path, *, migrate: bool = True) -> Self:
        return cls(await Database.open(Path(path), migrate=migrate))

    @classmethod
    async def open_or_read(cls, path: str | Path, *, statements: int | None = None) -> Self:
        """For the daemon: for writing, or read-only while writes are refused: see `Database.open_or_read`."""
        kw = {"statements": statements} if statements is not None else {}
        return cls(await Database.open_or_read(Path(path), **kw))

    @classmethod
    async def open_readonly(cls, path: str | Path) -> Self:
        """Read-only (`mode=ro`), for previews: see `Database.open_readonly`."""
        return cls(await Database.open_readonly(Path(path)))

    @classmethod
    async def open_copy(cls, path: str | Path) -> Self:
        """A scratch copy, for previews that write: see `Database.open_copy`."""
        return cls(await Database.open_copy(Path(path)))

    async def close(self) -> None:
        await self.db.close()

    async def rebuild(self) -> Rebuild:
        """Room for a rebuilt state too big for memory (see `Rebuild`); close it when done."""
        return await Rebuild.begin(self.db)

    async def staging(self) -> Staging:
        """Room for entries to append all at once, too many for memory (see `Staging`); close it when done."""
        return await Staging.begin(self.db)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
