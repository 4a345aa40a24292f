"""The database: one SQLite connection, its transactions, its errors and its files.

Every write is one `BEGIN IMMEDIATE` transaction under the store's lock (sqlite3's
implicit transactions are off), so coroutines sharing the connection never join each
other's transactions. `synchronous=FULL` in WAL mode: when a write returns, it is on
disk, which is what lets the feed poller commit a handle to VTEX right after.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self

import aiosqlite

from .schema import MIGRATIONS, SCHEMA_VERSION, VACUUM_AT


class StoreError(Exception):
    """The database cannot be used as it is."""


class StoreUnwritable(StoreError):
    """The database refuses writes: the disk (or `max_page_count`) is full, the file
    is read-only, or an I/O error. Temporary as far as omsd knows: nothing was written."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SchemaTooNew(StoreError):
    def __init__(self, found: int, known: int) -> None:
        super().__init__(f"database schema version {found} is newer than this omsd knows ({known})")
        self.found = found
        self.known = known


# SQLite's primary result codes that mean "cannot write now" rather than "bad SQL".
# CANTOPEN: the -wal or -shm file cannot be made (a read-only file system).
UNWRITABLE_CODES = frozenset(
    {sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN}
)
PROBE_BYTES = 8192  # more than a page: the probe needs pages of its own, as real writes do
ROOM_BYTES = 8 * 2**20
"""The room a database needs to count as writable: free space on its file system, and pages
under `max_page_count`. A probe's few pages can fit where a real write's cannot (the free
pages of a full database, a write-ahead log's reused space on a full disk): without this
margin /readyz passed while the disk was full, and the alarm flapped."""
STATEMENTS = 128  # prepared statements a connection keeps (sqlite3's default)
PROBE_HANDLE = "omsd:write-probe"  # never a VTEX handle; never committed: written and deleted at once
FILE_MODE = 0o600


def store_error(exc: sqlite3.Error, context: str) -> StoreError:
    """The project's error for a sqlite3 one: StoreUnwritable when the write was refused."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in UNWRITABLE_CODES:
        return StoreUnwritable(str(exc))
    return StoreError(f"{context}: {exc}")


class Database:
    """The connection, its lock and its transactions; the store's parts share one."""

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self.conn = conn
        self.lock = asyncio.Lock()
        self.path = path
        # Told when SQLite refuses a write (with why), and when a probe writes again.
        self.on_unwritable: Callable[[str], None] | None = None
        self.on_writable: Callable[[], None] | None = None
        self.room_bytes = ROOM_BYTES
        # Open read-only because writes were refused at open (why): a probe opens it for
        # writing once they work (`open_or_read`).
        self.read_only: str | None = None
        self.unread_wal = False  # read without its write-ahead log (see `open_readonly`)
        self._full_at: int | None = None  # free bytes when SQLite last said "full"
        self.statements = STATEMENTS  # prepared statements kept by the connection

    # ---- lifecycle ---------------------------------------------------------------
    @classmethod
    async def open(cls, path: Path, *, migrate: bool = True, statements: int = STATEMENTS) -> Self:
        """Open for writing (created if missing, migrated). `statements`: how many prepared
        statements the connection keeps (a fleet holds a connection per account: fewer)."""
        try:
            _create_private(path)
            conn = await aiosqlite.connect(path, isolation_level=None, cached_statements=statements)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        db = cls(conn, path)
        db.statements = statements
        try:
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA synchronous=FULL")
            await conn.execute("PRAGMA busy_timeout=5000")
            version = await db.schema_version()
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(version, SCHEMA_VERSION)
            if migrate and version < SCHEMA_VERSION:
                await db.migrate()
            _tighten(path)
        except sqlite3.Error as exc:
            await conn.close()
            raise store_error(exc, f"cannot use database {path}") from exc
        except BaseException:
            await conn.close()
            raise
        return db

    @classmethod
    async def open_or_read(cls, path: Path, *, statements: int = STATEMENTS) -> Self:
        """For the daemon: open for writing; when the database refuses writes even to open (a
        full disk that cannot give the new -shm its size, a read-only file system), open it
        read-only instead, so that omsd serves reads and waits: `probe_write` opens it for
        writing once it can (`read_only` says why meanwhile). A database that needs a
        migration cannot be read by this version: the refusal stands."""
        try:
            return await cls.open(path, statements=statements)
        except StoreUnwritable as refused:
            try:
                db = await cls.open_readonly(path)
            except StoreError:
                raise refused from None
            db.read_only = refused.reason
            db.statements = statements
            return db

    @classmethod
    async def open_readonly(cls, path: Path) -> Self:
        """The database opened read-only (`mode=ro`): nothing this connection does can
        change the file. For previews (`omsd replay --dry-run`), the reading commands on a
        database that refuses writes, and the daemon until it can write; no migration.
        Without a write-ahead log beside it (no process has it open) it is read as
        immutable, which keeps SQLite from creating an empty `-wal`; with one that cannot be
        read (its -shm cannot be made: a full disk, a read-only file system) too, and a log
        with content is then left unread: `unread_wal` says so."""
        wal = path.with_name(path.name + "-wal")
        base = path.resolve().as_uri()  # noqa: ASYNC240 - once, at open
        if not wal.exists():
            return await cls._open_ro(path, f"{base}?mode=ro&immutable=1")
        try:
            return await cls._open_ro(path, f"{base}?mode=ro")
        except StoreError:
            db = await cls._open_ro(path, f"{base}?mode=ro&immutable=1")
            db.unread_wal = wal.stat().st_size > 0
            return db

    @classmethod
    async def _open_ro(cls, path: Path, uri: str) -> Self:
        try:
            conn = await aiosqlite.connect(uri, uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        db = cls(conn, path)
        try:
            version = await db.schema_version()
        except sqlite3.Error as exc:
            await conn.close()
            raise StoreError(f"cannot read database {path}: {exc}") from exc
        if version != SCHEMA_VERSION:
            await conn.close()
            raise StoreError(f"database schema version {version} is not {SCHEMA_VERSION}: open it once without preview")
        return db

    @classmethod
    async def open_copy(cls, path: Path) -> Self:
        """A copy of the database (sqlite's backup API, the file opened read-only) in a
        scratch file (`scratch_file`: gone when the copy is closed, or its process ends):
        a database to write to for previews (`omsd ingest --dry-run`). On disk, not in
        memory: a preview of a large database must not need its size in memory."""
        source = await cls.open_readonly(path)
        copy = scratch_file(path)
        try:
            conn = await aiosqlite.connect(copy, isolation_level=None)
            try:
                await source.conn.backup(conn)
                # No write-ahead log (it would be a file of its own, by name), no fsync.
                await conn.execute("PRAGMA journal_mode=OFF")
                await conn.execute("PRAGMA synchronous=OFF")
            except BaseException:
                await conn.close()
                raise
        except sqlite3.Error as exc:
            raise store_error(exc, f"cannot copy database {path}") from exc
        finally:
            copy.unlink(missing_ok=True)
            await source.close()
        conn.row_factory = sqlite3.Row
        return cls(conn, path)

    async def close(self) -> None:
        await self.conn.close()

    async def limit_cache(self, kib: int) -> None:
        """Cap this connection's page cache at `kib` KiB (SQLite's default is 2 MiB): a fleet
        holds one connection per account, most of them idle."""
        await self.conn.execute(f"PRAGMA cache_size=-{max(16, int(kib))}")

    # ---- scratch -------------------------------------------------------------------
    async def attach_scratch(self, ddl: str) -> None:
        """Attach a scratch database to this connection as `scratch` and create `ddl` in it:
        room for work too big for memory (a replay's rebuilt state, an ingest's staged rows).
        Its file (`scratch_file`) is removed from the directory once attached: it lives until
        `detach_scratch` or the connection closes, and a crash leaves nothing behind. No
        rollback journal, no fsync: what counts is copied from it into the database, in a
        transaction of the database's own. Works on a read-only connection too (previews)."""
        path = scratch_file(self.path)
        try:
            async with self.lock:
                await self.conn.execute("ATTACH DATABASE ? AS scratch", (str(path),))
                try:
                    await self.conn.execute("PRAGMA scratch.journal_mode=OFF")
                    await self.conn.execute("PRAGMA scratch.synchronous=OFF")
                    for statement in _statements(ddl):
                        await self.conn.execute(statement)
                except BaseException:
                    await self.conn.execute("DETACH DATABASE scratch")
                    raise
        except sqlite3.Error as exc:
            raise store_error(exc, "cannot make a scratch database") from exc
        finally:
            path.unlink(missing_ok=True)

    async def detach_scratch(self) -> None:
        """Let the scratch database go (its file with it)."""
        async with self.lock:
            with contextlib.suppress(sqlite3.Error):
                await self.conn.execute("DETACH DATABASE scratch")

    async def schema_version(self) -> int:
        async with self.conn.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def migrate(self, target: int = SCHEMA_VERSION) -> None:
        """Apply forward migrations up to `target`, each in its own transaction."""
        async with self.lock:
            current = await self.schema_version()
            for version in range(current + 1, target + 1):
                if version == VACUUM_AT:
                    await self._incremental_auto_vacuum()
                await self.conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _statements(MIGRATIONS[version - 1]):
                        await self.conn.execute(statement)
                    await self.conn.execute(f"PRAGMA user_version={version}")
                    await self.conn.execute("COMMIT")
                except BaseException:
                    await self.conn.execute("ROLLBACK")
                    raise

    async def _incremental_auto_vacuum(self) -> None:
        """Switch the file to incremental auto-vacuum. Only a VACUUM makes the setting take
        (even on a new file: WAL mode has written its header already). It rewrites the file:
        instant on a new one; on an older one it needs free disk space the size of the
        database, and without it fails and leaves the file as it was (at version 3)."""
        await self.conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        await self.conn.execute("VACUUM")

    async def set_max_pages(self, pages: int | None) -> int:
        """Cap the database's size in pages on this connection (None: only read it).
        Returns the current page count. For tests and operators who want headroom."""
        async with self.lock:
            if pages is not None:
                await self.conn.execute(f"PRAGMA max_page_count={int(pages)}")
            return await self.pages()

    @asynccontextmanager
    async def cache(self, kib: int) -> AsyncIterator[None]:
        """SQLite's page cache at `kib` KiB for the block (one big transaction), then as it was."""
        async with self.lock, self.conn.execute("PRAGMA main.cache_size") as cur:
            was = (await cur.fetchone() or (-2000,))[0]
        async with self.lock:
            await self.conn.execute(f"PRAGMA main.cache_size = -{int(kib)}")
        try:
            yield
        finally:
            async with self.lock:
                await self.conn.execute(f"PRAGMA main.cache_size = {int(was)}")

    async def checkpoint(self) -> None:
        """Copy the write-ahead log into the database and truncate it, if no reader holds
        it (then it stays as it is: the daemon's own checkpoints take over)."""
        async with self.lock:
            with contextlib.suppress(sqlite3.Error):
                async with self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cur:
                    await cur.fetchall()

    async def pages(self) -> int:
        async with self.conn.execute("PRAGMA page_count") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def page_size(self) -> int:
        async with self.conn.execute("PRAGMA page_size") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    # ---- transactions ------------------------------------------------------------------
    @asynccontextmanager
    async def tx(self, *, deferred: bool = False) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction. A sqlite3 error leaves as StoreError (StoreUnwritable
        when SQLite refused the write); nothing was written either way. `deferred`: for
        writes to the scratch database only, so that the database itself is not locked
        for writing (a preview beside the running daemon)."""
        async with self.lock:
            try:
                await self.conn.execute("BEGIN" if deferred else "BEGIN IMMEDIATE")
                yield self.conn
                await self.conn.execute("COMMIT")
            except sqlite3.Error as exc:
                await asyncio.shield(self._rollback())
                error = store_error(exc, "database write failed")
                if isinstance(error, StoreUnwritable):
                    self._refused(exc)
                    if self.on_unwritable is not None:
                        self.on_unwritable(error.reason)
                raise error from exc
            except BaseException:
                # Cancelled or failed anywhere, BEGIN and COMMIT included: aiosqlite runs
                # statements in order on its own thread even when the awaiting task is
                # cancelled, so a ROLLBACK queued now (shielded, under the lock) ends
                # whatever transaction is open; "no transaction is active" is fine.
                await asyncio.shield(self._rollback())
                raise

    async def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.OperationalError):
            await self.conn.execute("ROLLBACK")

    @asynccontextmanager
    async def reading(self, what: str = "database read failed") -> AsyncIterator[aiosqlite.Connection]:
        """The connection under the lock, for reads that take several statements."""
        try:
            async with self.lock:
                yield self.conn
        except sqlite3.Error as exc:
            raise store_error(exc, what) from exc

    async def rows(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """One read statement's rows."""
        try:
            async with self.lock, self.conn.execute(sql, params) as cur:
                found = await cur.fetchall()
        except sqlite3.Error as exc:
            raise store_error(exc, "database read failed") from exc
        return list(found)

    # ---- health ----------------------------------------------------------------------------
    async def probe_write(self) -> str | None:
        """None when the database takes writes, else why not: opened read-only at start, it
        is opened for writing first; there must be room for real writes (`room_bytes` free
        on the disk and under `max_page_count`, more than the free space was when SQLite
        last said full: a margin, so the verdict does not flap); and a row bigger than a page
        (so SQLite must find pages for it, as real writes do) is written and deleted in one
        committed transaction."""
        why = await self._open_for_writing() if self.read_only is not None else None
        if why is None:
            why = await self._short_of_room()
        if why is None:
            try:
                async with self.tx() as conn:
                    await conn.execute(
                        "INSERT INTO feed_acks (handle, received_at, last_error) VALUES (?, '', randomblob(?))",
                        (PROBE_HANDLE, PROBE_BYTES),
                    )
                    await conn.execute("DELETE FROM feed_acks WHERE handle = ?", (PROBE_HANDLE,))
            except StoreError as exc:
                return str(exc)  # tx() told on_unwritable
        elif self.on_unwritable is not None:
            self.on_unwritable(why)
        if why is not None:
            return why
        self._full_at = None
        if self.on_writable is not None:
            self.on_writable()
        return None

    async def _open_for_writing(self) -> str | None:
        """Replace the read-only connection by a writing one; why not, when it cannot be."""
        try:
            fresh = await Database.open(self.path, statements=self.statements)
        except StoreError as exc:
            return exc.reason if isinstance(exc, StoreUnwritable) else str(exc)
        async with self.lock:
            old, self.conn = self.conn, fresh.conn
            self.read_only, self.unread_wal = None, False
        await old.close()
        return None

    async def _short_of_room(self) -> str | None:
        """Why there is not room enough for real writes, or None."""
        need = self.room_bytes
        if self._full_at is not None:
            need = max(need, self._full_at + self.room_bytes)
        free = _free_bytes(self.path)
        if free is not None and free < need:
            return f"database or disk is full: less than {_mib(need)} free on its file system"
        try:
            async with self.lock:
                limit, count, unused, size = [
                    await self._pragma(name) for name in ("max_page_count", "page_count", "freelist_count", "page_size")
                ]
        except sqlite3.Error as exc:
            return str(store_error(exc, "database read failed"))
        room = (limit - count + unused) * size
        if room < self.room_bytes:
            return f"database or disk is full: less than {_mib(self.room_bytes)} of room under max_page_count"
        return None

    async def _pragma(self, name: str) -> int:
        async with self.conn.execute(f"PRAGMA {name}") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    def _refused(self, exc: sqlite3.Error) -> None:
        """SQLite said full with the file system nearly full: remember how much it had free,
        so that only more room (not the same room again) makes the database writable. (With
        plenty free, the limit was `max_page_count`, which `_short_of_room` checks itself.)"""
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_FULL:
            free = _free_bytes(self.path)
            if free is not None and free < 4 * self.room_bytes:
                self._full_at = free

    async def integrity(self) -> list[str]:
        """SQLite's `PRAGMA integrity_check`: ["ok"], or the problems it found."""
        rows = await self.rows("PRAGMA integrity_check")
        return [str(r[0]) for r in rows]

    async def writable(self) -> bool:
        """True when a real write commits."""
        return await self.probe_write() is None


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n // 1024} KiB"


def _free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the database's file system."""
    try:
        st = os.statvfs(path.parent if str(path.parent) else ".")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _create_private(path: Path) -> None:
    """Create the database file 0600 whatever the umask. SQLite gives the -wal and
    -shm files it creates later the mode of the database file."""
    if str(path) == ":memory:" or path.exists():
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def _tighten(path: Path) -> None:
    """Make the database and its -wal and -shm files 0600, should they predate this omsd or
    come from a restore by `cp` (a read-only file system, or another owner, leaves them)."""
    for suffix in ("", "-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        with contextlib.suppress(OSError):
            if side.stat().st_mode & 0o777 != FILE_MODE:
                side.chmod(FILE_MODE)


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def scratch_file(beside: Path) -> Path:
    """A new, empty, private (0600) file for a scratch database: beside the database, whose
    disk has room for it (a temporary directory is often memory), else in the system's
    temporary directory when the database's directory cannot be written."""
    for directory in (beside.parent, Path(tempfile.gettempdir())):
        try:
            fd, name = tempfile.mkstemp(prefix=f".{beside.name}.", suffix=".scratch", dir=directory)
        except OSError:
            continue
        os.close(fd)
        return Path(name)
    raise StoreError(f"cannot create a scratch file beside {beside} nor in {tempfile.gettempdir()}")


def database_bytes(db: Path) -> float:
    """The database's size on disk: the file and its write-ahead log."""
    total = 0
    for path in (db, db.with_name(db.name + "-wal")):
        try:
            total += os.stat(path).st_size
        except OSError:
            continue
    return float(total)


def parts(items: list[str], size: int = 500) -> list[list[str]]:
    """`items` in slices small enough for one statement's parameters."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def marks(items: Sequence[object]) -> str:
    """`?, ?, ?`: one placeholder per item."""
    return ", ".join("?" * len(items))
