"""One process owns a database: `omsd run`, `omsd replay` and `omsd ingest` hold an
exclusive lock on `<db>.lock` while they work.

`fcntl.flock` on an open file: the kernel releases it when the process ends, however
it ends, so a crashed daemon never leaves a stale lock behind. The file holds the
owner's pid, for the message a second process prints. Reading commands take no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class DatabaseBusy(Exception):
    """Another process owns the database."""

    def __init__(self, db: Path, pid: int | None) -> None:
        owner = f"omsd pid {pid}" if pid is not None else "another process"
        super().__init__(f"database {db} is in use by {owner} (lock file {lock_path(db)}); stop it first")
        self.db = db
        self.pid = pid


def lock_path(db: Path) -> Path:
    return db.with_name(db.name + ".lock")


@contextlib.contextmanager
def hold(db: str | Path) -> Iterator[None]:
    """Own `db` until the block ends; raises DatabaseBusy when another process owns it."""
    path = lock_path(Path(db))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatabaseBusy(Path(db), _owner(fd)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (unlinking it would race a new owner)


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
