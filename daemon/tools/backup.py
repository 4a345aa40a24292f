"""`omsd backup PATH`: a consistent copy of the database, taken while the daemon runs.

SQLite's online backup API copies every page, the write-ahead log's included, under
one read transaction: the copy is the database as of one commit, and the running
daemon's writers are not blocked (WAL readers do not block writers). The copy is
written beside its destination, checked, made self-contained (no -wal file), given
mode 0600 (it holds the journal, which holds order data) and renamed into place,
so a reader never sees a half-written backup and `--force` never destroys the old
one before the new one is whole.

This is a file-level copy, not a query: it names no table, so it lives here rather
than in the store, which owns the SQL.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omsd.state.store import StoreError


class BackupError(StoreError):
    """The backup was not written; the message says why."""


class BackupExists(BackupError):
    """The destination exists and overwriting it was not asked for."""


@dataclass(frozen=True)
class Backup:
    source: str
    path: str
    bytes: int
    schema_version: int
    taken_at: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def backup(db: Path, dest: Path, *, force: bool = False) -> Backup:
    """Copy the database at `db` to `dest` (mode 0600) while it may be in use."""
    if not db.exists():
        raise BackupError(f"no database at {db} (set OMSD_DB)")
    if dest.exists() and not force:
        raise BackupExists(f"{dest} exists: pass --force to replace it")
    if dest.exists() and dest.resolve() == db.resolve():
        raise BackupError(f"{dest} is the database itself")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        taken_at = datetime.now(UTC).isoformat(timespec="seconds")
        version = _copy(db, tmp)
        os.replace(tmp, dest)
    except OSError as exc:
        raise BackupError(f"cannot write {dest}: {exc.strerror or exc}") from None
    except sqlite3.Error as exc:
        raise BackupError(f"cannot back up {db}: {exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return Backup(str(db), str(dest), dest.stat().st_size, version, taken_at)


def _copy(db: Path, tmp: Path) -> int:
    """Page-copy `db` into the empty file `tmp`; return the copy's schema version."""
    # mode=rw: never create a database where there was none.
    src = sqlite3.connect(f"file:{db}?mode=rw", uri=True)
    try:
        src.execute("PRAGMA busy_timeout=5000")
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)  # all pages in one step: one consistent snapshot
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            [(check,)] = dst.execute("PRAGMA quick_check").fetchall()
            if check != "ok":
                raise sqlite3.DatabaseError(f"the copy fails its integrity check: {check}")
            [(version,)] = dst.execute("PRAGMA user_version").fetchall()
        finally:
            dst.close()
    finally:
        src.close()
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    return int(version)
