"""One process owns a database: `omsd run`, `omsd replay` and `omsd ingest` hold an
exclusive lock on `<db>.lock` while they work.

`fcntl.flock` on an open file: the kernel releases it when the process ends, however
it ends, so a crashed daemon never leaves a stale lock behind. The lock is named after
the database file the path resolves to, so a symlink (or `..`) cannot open a second
owner on the same file. The file holds the owner's pid, for the message a second process
prints. On a read-only file system an existing lock file is locked read-only (flock needs
no write), and a full disk only loses the pid. Reading commands take no lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from omsd.state.store import StoreUnwritable

# The lock file cannot be created or written now: the file system is read-only or full.
_UNWRITABLE = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM})


class DatabaseBusy(Exception):
    """Another process owns the database."""

    def __init__(self, db: Path, pid: int | None) -> None:
        self.db = db
        self.pid = pid
        # The omsd that took the lock is gone, yet the lock is held: by the Litestream it
        # started (which holds it until its last sync is done).
        self.orphaned = pid is not None and not _alive(pid)
        if self.orphaned:
            super().__init__(
                f"database {db} is still locked by the Litestream of omsd pid {pid}, which is gone "
                f"(lock file {lock_path(db)}): it exits after its last sync; try again in a few seconds"
            )
        else:
            owner = f"omsd pid {pid}" if pid is not None else "another process"
            super().__init__(f"database {db} is in use by {owner} (lock file {lock_path(db)}); stop it first")


def lock_path(db: Path) -> Path:
    """`<db>.lock` beside the file `db` resolves to (through symlinks)."""
    real = Path(os.path.realpath(db))
    return real.with_name(real.name + ".lock")


@contextlib.contextmanager
def hold(db: str | Path) -> Iterator[int]:
    """Own `db` until the block ends; raises DatabaseBusy when another process owns it, and
    StoreUnwritable when no lock file exists and none can be created (a read-only file system).
    Gives the lock's descriptor: a child given it (Litestream) holds the lock until it
    exits too."""
    fd = _open(lock_path(Path(db)))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatabaseBusy(Path(db), _owner(fd)) from None
        with contextlib.suppress(OSError):  # read-only or full: the pid is only for the message
            pid = f"{os.getpid()}\n".encode()
            os.pwrite(fd, pid, 0)  # over the old pid's bytes: no new block on a full disk
            os.ftruncate(fd, len(pid))
        yield fd
    finally:
        os.close(fd)  # releases the lock; the file stays (unlinking it would race a new owner)


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # readable: another user may lock it read-only
    except OSError as exc:
        if exc.errno not in _UNWRITABLE:
            raise
        try:
            return os.open(path, os.O_RDONLY)
        except OSError:
            raise StoreUnwritable(f"cannot create the lock file {path}: {os.strerror(exc.errno)}") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner(db: str | Path) -> int | None:
    """The pid of the process that owns `db` now, or None when none does. Read from the
    kernel's table of locks (/proc/locks), so looking takes no lock a starting daemon could
    trip over; where that table cannot be read, None."""
    try:
        st = os.stat(lock_path(Path(db)))
        with open("/proc/locks") as table:
            lines = table.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4242 fd:01:123456 0 EOF" (a blocked waiter has "->" first)
        if len(fields) < 6 or fields[1] != "FLOCK" or fields[3] != "WRITE":
            continue
        major, minor, inode = [*fields[5].split(":"), "", "", ""][:3]
        try:
            device = os.makedev(int(major, 16), int(minor, 16))
            if int(inode) == st.st_ino and device == st.st_dev:
                return int(fields[4])
        except ValueError:
            continue
    return None


def _owner(fd: int) -> int | None:
    with contextlib.suppress(ValueError, OSError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None
