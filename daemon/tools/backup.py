"""`omsd backup PATH`: a consistent copy of the database, taken while the daemon runs.

SQLite's online backup API copies every page, the write-ahead log's included, under
one read transaction: the copy is the database as of one commit, and the running
daemon's writers are not blocked (WAL readers do not block writers). The copy is
written beside its destination, checked, made self-contained (no -wal file), given
mode 0600 (it holds the journal, which holds order data) and renamed into place,
so a reader never sees a half-written backup and `--force` never destroys the old
one before the new one is whole. The copy keeps no rollback journal, and a small watcher
process removes it should the backup be killed mid-copy (even by SIGKILL), so nothing
partial is ever left behind.

This is a file-level copy, not a query: it names no table, so it lives here rather
than in the store, which owns the SQL.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omsd.state.store import StoreError


class BackupError(StoreError):
    """The backup was not written; the message says why."""


class BackupExists(BackupError):
    """The destination exists and overwriting it was not asked for."""


class BadPath(BackupError):
    """The destination names no file (empty, a folder)."""


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
    if dest.name in ("", ".", "..") or str(dest).endswith("/") or dest.is_dir():
        raise BadPath(f"PATH must name the backup file, not a folder ({str(dest) or 'empty'})")
    if dest.exists() and not force:
        raise BackupExists(f"{dest} exists: pass --force to replace it")
    if dest.exists() and dest.resolve() == db.resolve():
        raise BackupError(f"{dest} is the database itself")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    watcher: subprocess.Popen[bytes] | None = None
    try:
        watcher = _watch(tmp)  # before the file exists: there is no moment it could be left behind
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        taken_at = datetime.now(UTC).isoformat(timespec="seconds")
        version = _copy(db, tmp)
        os.replace(tmp, dest)
    except OSError as exc:
        raise BackupError(f"cannot write {dest}: {exc.strerror or exc}") from None
    except sqlite3.Error as exc:
        raise BackupError(f"cannot back up {db}: {exc}") from None
    finally:
        _remove(tmp)
        if watcher is not None:
            watcher.kill()
            watcher.wait()
    return Backup(str(db), str(dest), dest.stat().st_size, version, taken_at)


# Removes a killed backup's files: waits for its parent (the backup) to end, then unlinks its
# arguments (after a successful backup they are gone already, and it is killed anyway).
_WATCH = """
import os, sys, time
parent = int(sys.argv[1])
while os.getppid() == parent:
    time.sleep(0.05)
for path in sys.argv[2:]:
    try:
        os.unlink(path)
    except OSError:
        pass
"""
_SIDES = ("", "-journal", "-wal", "-shm")


def _watch(tmp: Path) -> subprocess.Popen[bytes]:
    """A small process that removes the partial copy should this one be killed mid-copy
    (SIGKILL included, which no handler sees): a backup never leaves a partial file."""
    paths = [str(tmp.with_name(tmp.name + side)) for side in _SIDES]
    return subprocess.Popen(  # noqa: S603 - our own interpreter, fixed code, paths as arguments
        [sys.executable, "-I", "-S", "-c", _WATCH, str(os.getpid()), *paths],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C for the backup is not one for its cleaner
    )


def _remove(tmp: Path) -> None:
    for side in _SIDES:
        with contextlib.suppress(FileNotFoundError):
            tmp.with_name(tmp.name + side).unlink()


def _copy(db: Path, tmp: Path) -> int:
    """Page-copy `db` into the empty file `tmp`; return the copy's schema version."""
    # A URI, so that mode=rw never creates a database where there was none; the path is
    # escaped (a `?` or `#` in it would otherwise start SQLite's query string).
    src = sqlite3.connect(f"{db.resolve().as_uri()}?mode=rw", uri=True)
    try:
        src.execute("PRAGMA busy_timeout=5000")
        dst = sqlite3.connect(tmp)
        try:
            dst.execute("PRAGMA journal_mode=OFF")  # no -journal beside the copy: a failed one is discarded whole
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
