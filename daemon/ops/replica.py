"""Replication as part of `omsd run`: restore on start, the Litestream child, the replica's
health, and the barrier that `OMSD_DURABILITY=replicated` waits on.

- **Restore on start**: when OMSD_DB does not exist and the replica holds a database,
  it is restored first (into a temporary file, then renamed into place), and the
  position restored to is logged. A replica that cannot be read stops the start (exit
  1, retried by the unit): omsd never starts empty beside a replica it could not read.
- **The child**: `litestream replicate` starts before the store opens and stops after
  it closed (so Litestream's connection is the last one and the write-ahead log is
  kept: the next start resumes incrementally instead of uploading the whole database).
  It is restarted with a backoff when it dies.
- **Health**, every CHECK_S: when Litestream last reached the replica (`GET /list`),
  and which of its local files the replica does not hold yet (`POST /sync` without
  waiting gives both positions). The replica is *behind* when Litestream does not
  answer, when no sync reached it for OMSD_REPLICA_SYNC_TIMEOUT_S, or when a sync
  omsd waited for failed and none succeeded since; the alarm `replica_down` (and
  /readyz) after OMSD_REPLICA_ALARM_S.
- **The barrier** (`synced`): returns once everything committed before the call is on
  the replica. One sync at a time; callers arriving while one is in flight share the
  next (it may have read the write-ahead log before their commit), so one sync covers
  every handle, intent and approval that came meanwhile. In `local` durability it
  returns at once; in `replicated` it raises ReplicaUnavailable while the replica is
  behind, so intake answers 503 rather than acknowledge what a lost disk would lose.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from datetime import UTC
from pathlib import Path
from urllib.parse import urlsplit

from omsd.state.store import Store, StoreError

from ..config.settings import ConfigError, Settings
from .health import Health
from .litestream import Layout, Litestream, ReplicaError, Restored, child_env, find_binary, restore, secrets_in
from .logs import get_logger, redact
from .metrics import Metrics
from .waiting import Watermark, wait_any

log = get_logger("omsd.replica")

ALARM = "replica_down"
CHECK_S = 1.0  # health check period; Litestream itself syncs every second
RESTART_MAX_S = 30.0
ASIDE = ".before-restore"  # suffix of a lost database's -wal/-shm moved aside by a restore


class ReplicaUnavailable(Exception):
    """The replica cannot be shown to hold what was committed; nothing is acknowledged."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SyncBarrier:
    """`wait()` returns once a sync that *began after it was called* succeeded. One sync
    runs at a time (FIFO); a caller that finds a later sync already done returns at
    once, and one whose sync failed gets that failure without trying again."""

    def __init__(self, sync: Callable[[], Awaitable[None]]) -> None:
        self._sync = sync
        self._lock = asyncio.Lock()
        self._begun = 0
        self._done = 0
        self._failed = 0
        self._error = ""
        self.rounds = 0

    async def wait(self) -> None:
        need = self._begun + 1  # the sync in flight, if any, may have read the WAL before our commit
        async with self._lock:
            if self._done >= need:
                return
            if self._failed >= need:
                raise ReplicaUnavailable(self._error)
            self._begun += 1
            number = self._begun
            self.rounds += 1
            try:
                await self._sync()
            except ReplicaUnavailable as exc:
                self._failed, self._error = number, exc.reason
                raise
            self._done = number


class Replica:
    """OMSD_REPLICA for one running daemon (see the module's docstring)."""

    def __init__(
        self,
        settings: Settings,
        health: Health,
        metrics: Metrics,
        *,
        check_s: float = CHECK_S,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.health = health
        self.metrics = metrics
        self.layout = Layout.of(settings.db)
        self.litestream: Litestream | None = None
        self._binary: Path | None = None
        self.barrier = SyncBarrier(self._sync)
        self.restored: Restored | None = None
        self.last_ok: float | None = None  # wall time: everything committed before it is on the replica
        self._failed_at: float | None = None
        self._failure = ""
        self._check_s = check_s
        self._wall = wall
        self._restart_s = 1.0
        self._since = wall()  # the replica counts as down from here until a first sync

    @property
    def enabled(self) -> bool:
        return self.settings.replica is not None

    async def prepare(self) -> Restored | None:
        """Before the store opens: find Litestream, write its configuration, and restore the
        database when it is missing and the replica holds one."""
        if self.settings.replica is None:
            return None
        try:
            binary = find_binary(self.settings.litestream_bin)
        except ReplicaError as exc:
            raise ConfigError(f"OMSD_REPLICA: {exc}") from None
        self._binary = binary
        self.layout.write_config(self.settings.replica)
        if not self.settings.db.exists():
            self.restored = await restore_missing(binary, self.layout, self.settings.replica_display)
        return self.restored

    async def start(self, keep_fd: int | None = None) -> None:
        """Start `litestream replicate` (it holds `keep_fd`, the database lock, until it exits)."""
        if self._binary is None or self.settings.replica is None:
            return
        self.litestream = Litestream(
            self._binary,
            self.layout,
            keep_fds=(keep_fd,) if keep_fd is not None else (),
            log_level=_litestream_level(self.settings.log_level),
        )
        redact(*secrets_in(child_env()), urlsplit(self.settings.replica).password)
        await self.litestream.start(self.settings.replica)
        log.info("replication_started", replica=self.settings.replica_display, durability=self.settings.durability)

    async def stop(self) -> None:
        """After the store closed: Litestream syncs what is left, then exits."""
        if self.litestream is not None:
            was_running = self.litestream.running
            code = await self.litestream.stop()  # also reaps a child that died by itself
            if was_running:
                log.info("replication_stopped", exit_code=code)

    async def first_sync(self) -> bool:
        """Once the store is open: one sync and one check, so the replica's state is known
        before the daemon serves (a sync fails until the database holds data). True when the
        sync reached the replica: everything the database holds is on it."""
        try:
            await self.barrier.wait()
        except ReplicaUnavailable:
            synced = False
        else:
            synced = True
        await self.check()
        return synced

    # ---- the barrier -------------------------------------------------------------
    async def synced(self) -> None:
        """Everything committed before this call is on the replica (replicated durability;
        at once otherwise). ReplicaUnavailable while the replica is behind."""
        if not self.settings.replicated:
            return
        problem = self.health.replica_problem
        if problem is not None:
            raise ReplicaUnavailable(problem)
        self.metrics.replica_waits.inc()
        await self.barrier.wait()

    async def durable(self) -> None:
        """`synced`, waiting as long as the replica is behind (an approval is sent only once
        the outbox row saying it was started is on the replica)."""
        while True:
            try:
                await self.synced()
                return
            except ReplicaUnavailable:
                await wait_any(self.health.replica_ok, within_s=self._check_s)

    async def _sync(self) -> None:
        ls = self.litestream
        if ls is None or not ls.running:
            self._sync_failed("litestream is not running")
        assert ls is not None
        began, started = time.monotonic(), self._wall()
        try:
            await ls.sync(wait=True, timeout_s=self.settings.replica_sync_timeout_s)
        except ReplicaError as exc:
            self._sync_failed(str(exc))
        self.metrics.replica_syncs.inc()
        self.metrics.replica_sync_seconds.observe(time.monotonic() - began)
        self._reached(started)

    def _sync_failed(self, reason: str) -> None:
        self.metrics.replica_sync_failures.inc()
        self._failed_at, self._failure = self._wall(), reason
        self.health.replica_behind(f"a sync failed: {reason}")
        raise ReplicaUnavailable(reason)

    def _reached(self, at: float) -> None:
        self.last_ok = max(self.last_ok or at, at)
        self.metrics.replica_last_sync.set(self.last_ok)

    # ---- the child and its health -------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`: restart Litestream when it dies, check the replica's health."""
        ls = self.litestream
        if ls is None or self.settings.replica is None:
            return
        healthy_since: float | None = None
        while not stop.is_set():
            if not ls.running:
                code = await ls.wait()
                self.metrics.replica_restarts.inc()
                self.health.replica_behind(f"litestream exited (code {code})")
                log.error("litestream_exited", exit_code=code, restart_in_s=self._restart_s)
                await self.check()
                await wait_any(stop, within_s=self._restart_s)
                if stop.is_set():
                    return
                self._restart_s = min(self._restart_s * 2, RESTART_MAX_S)
                healthy_since = None
                try:
                    await ls.start(self.settings.replica)
                except ReplicaError as exc:
                    log.error("litestream_start_failed", error=str(exc))
                    continue
            await self.check()
            if self.health.replica_problem is None:
                healthy_since = healthy_since or time.monotonic()
                if time.monotonic() - healthy_since > RESTART_MAX_S:
                    self._restart_s = 1.0
            await wait_any(stop, within_s=self._check_s)

    async def check(self) -> None:
        """One look at the replica: the metrics, whether it is behind, the alarm."""
        ls = self.litestream
        if ls is None:
            return
        now = self._wall()
        problem: str | None = None
        try:
            last = await ls.last_sync_at()
            answer = await ls.sync(wait=False, timeout_s=self.settings.replica_sync_timeout_s)
        except ReplicaError as exc:
            problem = f"litestream does not answer: {exc}"
        else:
            if last is not None:
                self._reached(last.timestamp())
            pending = self.layout.ltx_bytes_after(answer.replicated_txid) if answer.txid > answer.replicated_txid else 0
            self.metrics.replica_lag_bytes.set(pending)
        lag = now - self.last_ok if self.last_ok is not None else None
        self.metrics.replica_lag_seconds.set(max(0.0, lag) if lag is not None else 0.0)
        if problem is None:
            if lag is None or lag > self.settings.replica_sync_timeout_s:
                problem = "no sync has reached the replica yet" if lag is None else f"no sync reached it for {lag:.0f}s"
            elif self._failed_at is not None and (self.last_ok or 0) < self._failed_at:
                problem = f"a sync failed: {self._failure}"
        self.metrics.replica_up.set(1 if problem is None else 0)
        if problem is None:
            self.health.replica_current()
            if ALARM in self.health.alarms:
                self.health.clear_alarm(ALARM)
            return
        self.health.replica_behind(problem)
        since = self.last_ok if self.last_ok is not None else self._since
        if now - since > self.settings.replica_alarm_s:
            self.health.raise_alarm(ALARM, f"replication to {self.settings.replica_display} is down: {problem}")


async def publish(
    committed: Watermark, published: Watermark, durable: Callable[[], Awaitable[None]], stop: asyncio.Event
) -> None:
    """Replicated durability: outcomes reach their readers (the /v1/events routes, the relay,
    which read up to `published`) only once they are on the replica. A disk lost and
    restored from the replica then never takes back an event a connector was shown: its seq
    would be given to another event, and the connector, resuming after it, would miss that."""
    while not stop.is_set():
        risen = committed.risen()
        target = committed.value
        if target > published.value:
            await durable()
            published.advance(target)
        else:
            await wait_any(risen, stop, within_s=CHECK_S)


async def restore_missing(binary: Path, layout: Layout, display: str) -> Restored | None:
    """OMSD_DB is missing: restore the replica's latest state into it, if there is one.
    What a lost database left beside it is moved aside (its -wal and -shm: SQLite would
    apply them to the restored file) or removed (Litestream's state of it)."""
    db = layout.db
    for suffix in ("-wal", "-shm"):
        side = db.with_name(db.name + suffix)
        if side.exists():
            side.replace(side.with_name(side.name + ASIDE))
            log.warning("restore_moved_aside", path=str(side), to=side.name + ASIDE)
    shutil.rmtree(layout.meta, ignore_errors=True)
    tmp = db.with_name(f".{db.name}.restoring")
    for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    began = time.monotonic()
    restored = await restore(binary, layout, tmp, if_replica_exists=True)
    if restored is None:
        log.info("replica_empty", replica=display, hint="nothing to restore: starting with a new database")
        return None
    os.chmod(tmp, 0o600)
    os.replace(tmp, db)
    position = await journal_position(db)
    log.info(
        "database_restored",
        replica=display,
        txid=restored.txid,
        seconds=round(time.monotonic() - began, 3),
        bytes=db.stat().st_size,
        **position,
    )
    return Restored(db, restored.txid, restored.duration_ms)


async def journal_position(db: Path) -> dict[str, object]:
    """The last journal row a database holds: its offset and when it was received."""
    try:
        async with await Store.open_readonly(db) as store:
            last = int((await store.read.stats())["last_offset"])
            rows = await store.journal.after(last - 1, limit=1) if last else []
    except StoreError as exc:
        return {"journal": f"not read: {exc}"}
    at = rows[0].received_at.astimezone(UTC).isoformat() if rows else None
    return {"last_offset": last, "last_event_at": at}


def _litestream_level(level: str) -> str:
    return "info" if level == "debug" else "warn"
