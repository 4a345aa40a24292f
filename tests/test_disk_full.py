"""A full disk or a read-only database: intake pauses, nothing is lost, omsd resumes by itself."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from omsd.daemon.app import Daemon, DaemonFailed
from omsd.daemon.ops import lock
from omsd.daemon.ops import logs as logs_module
from omsd.daemon.ops.health import STORE_ALARM
from omsd.daemon.ops.jobs import Jobs, alarm_name
from omsd.daemon.ops.notify import Progress
from omsd.sim.server import Simulator
from omsd.state.statuses import Phase
from omsd.state.store import NewEntry, Store, StoreUnwritable
from tests.helpers import (
    RunDaemon,
    fast_settings,
    fill_up,
    free_port,
    quiet_health,
    reached,
    remount,
    run_cli,
    small_filesystem,
    until,
)

FILLER = "x" * 3000


async def fill(store: Store) -> None:
    """Make the database full: cap it at its size, then write until SQLite refuses."""
    await store.db.set_max_pages(await store.db.set_max_pages(None))
    now = datetime.now(UTC)
    reason = ""
    for _ in range(10_000):
        try:
            await store.journal.append(
                [NewEntry(kind="rejected", source="api", payload=FILLER, received_at=now)], now=now
            )
        except StoreUnwritable as exc:
            reason = exc.reason
            break
    assert "full" in reason, "the database never filled"


async def get(daemon: Daemon, path: str) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{daemon.url}{path}") as resp:
        return resp.status, await resp.json(), resp.headers


async def post(daemon: Daemon, path: str, body: Any) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as http, http.post(f"{daemon.url}{path}", json=body) as resp:
        return resp.status, await resp.json(), resp.headers


async def test_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """The database, its -wal and its -shm are 0600 even under umask 022."""
    old = os.umask(0o022)
    try:
        async with await Store.open(tmp_path / "omsd.db") as store:
            assert await store.db.writable()
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    finally:
        os.umask(old)
    assert modes == {"omsd.db": 0o600, "omsd.db-wal": 0o600, "omsd.db-shm": 0o600}


async def test_a_database_restored_with_a_wider_mode_is_made_private(tmp_path: Path) -> None:
    """A database file that is 0644 (a restore by `cp`) is 0600 once omsd opens it."""
    db = tmp_path / "omsd.db"
    async with await Store.open(db):
        pass
    db.chmod(0o644)
    async with await Store.open(db):
        assert stat.S_IMODE(db.stat().st_mode) == 0o600


async def test_a_full_database_raises_the_stores_own_error(tmp_path: Path) -> None:
    """A refused write is StoreUnwritable (no sqlite3 error leaves the store), the write
    probe says why, and once there is room again the probe and writes succeed."""
    async with await Store.open(tmp_path / "omsd.db") as store:
        before = await store.read.stats()
        await fill(store)
        reason = await store.db.probe_write()
        assert reason is not None and "full" in reason
        assert not await store.db.writable()
        await store.db.set_max_pages(1_000_000)
        assert await store.db.probe_write() is None
        assert (await store.read.stats())["acks_pending"] == before["acks_pending"]  # the probe leaves nothing


async def test_a_read_only_database_is_unwritable_not_a_crash(tmp_path: Path) -> None:
    """A database that refuses writes as read-only (here `PRAGMA query_only`: the tests
    run as root, who ignores file modes) raises StoreUnwritable, not a sqlite3 error."""
    async with await Store.open(tmp_path / "omsd.db") as store:
        await store.db.conn.execute("PRAGMA query_only=1")
        reason = await store.db.probe_write()
        assert reason is not None and "readonly" in reason
        with pytest.raises(StoreUnwritable):
            await store.journal.acks_done(["h"])


async def test_full_disk_pauses_intake_and_resumes_by_itself(sim: Simulator, run_daemon: RunDaemon) -> None:
    """Full: /readyz 503 with the reason, the alarm, no feed GET and no handle committed,
    POSTs 503 with Retry-After, /healthz 200 with the reason. Room again: ready, the
    order that waited in VTEX's feed is journaled and approved; nothing lost."""
    async with run_daemon(sim, store_probe_s=0.05) as daemon:
        store = daemon.store
        assert store is not None
        await fill(store)
        status, body, _ = await get(daemon, "/readyz")
        assert status == 503 and any(STORE_ALARM in p and "full" in p for p in body["problems"])
        assert STORE_ALARM in daemon.health.alarms
        gets, commits = sim.calls.get("feed_get", 0), sim.calls.get("feed_commit", 0)
        order = sim.create("F1")
        status, body, headers = await post(daemon, "/vtex/hook", {"hookConfig": "ping"})
        assert status == 503 and "full" in body["error"] and headers["Retry-After"] == "1"
        status, body, _ = await get(daemon, "/healthz")
        assert status == 200 and "full" in body["database"]
        probes = refused_probes(daemon)
        await until(lambda: refused_probes(daemon) >= probes + 10, what="the probe keeps trying")
        assert (sim.calls.get("feed_get", 0), sim.calls.get("feed_commit", 0)) == (gets, commits)

        await store.db.set_max_pages(1_000_000)
        await until(lambda: daemon.health.store_ok.is_set(), what="writable again")
        assert STORE_ALARM not in daemon.health.alarms
        await until(lambda: sim.calls.get("feed_commit", 0) > commits, what="intake resumed")
        await until_tracked(daemon, order.order_id)


async def until_tracked(daemon: Daemon, order_id: str) -> None:
    """The order's release reached omsd through the feed and was applied."""
    await until(reached(daemon, order_id, Phase.TRACKING), what="the waiting order reached omsd")


async def test_processor_survives_a_refused_commit(
    sim: Simulator, run_daemon: RunDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The processor's commit refused (disk full) does not end omsd: it raises the
    alarm, waits for the probe, and applies the same events once writes work."""
    async with run_daemon(sim, store_probe_s=0.05) as daemon:
        store = daemon.store
        assert store is not None
        real = store.derived.commit
        refused = asyncio.Event()

        async def full_once(*args: Any, **kw: Any) -> None:
            if not refused.is_set():
                refused.set()
                assert store.db.on_unwritable is not None
                store.db.on_unwritable("database or disk is full")
                raise StoreUnwritable("database or disk is full")
            await real(*args, **kw)

        monkeypatch.setattr(store.derived, "commit", full_once)
        order = sim.create("P1")
        await until(refused.is_set, what="a commit refused")
        await until_tracked(daemon, order.order_id)
        assert STORE_ALARM not in daemon.health.alarms


def test_sqlite_errors_map_by_code() -> None:
    """SQLITE_FULL, SQLITE_READONLY and SQLITE_IOERR are unwritable; other errors are not."""
    from omsd.state.store.db import StoreError, store_error

    def err(code: int) -> sqlite3.OperationalError:
        exc = sqlite3.OperationalError("x")
        exc.sqlite_errorcode = code
        return exc

    for code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR_WRITE):
        assert isinstance(store_error(err(code), "w"), StoreUnwritable)
    other = store_error(err(sqlite3.SQLITE_CONSTRAINT), "w")
    assert isinstance(other, StoreError) and not isinstance(other, StoreUnwritable)


async def test_a_job_refused_by_the_database_raises_no_job_alarm() -> None:
    """A scheduled job whose write the database refuses is not a failing job: only the
    database alarm speaks, so fixing the disk clears everything."""
    health = quiet_health()
    jobs = Jobs(health, health.metrics, Progress(), failures_before_alarm=1)
    runs: list[int] = []

    async def refused() -> None:
        runs.append(1)
        raise StoreUnwritable("database or disk is full")

    jobs.add("timers", refused, every_s=0.02)
    jobs.start()
    try:
        await until(lambda: len(runs) >= 3, what="the job ran three times")
    finally:
        jobs.shutdown()
    assert jobs.failures["timers"] == 0
    assert alarm_name("timers") not in health.alarms


@pytest.mark.parametrize(
    ("error", "code"), [(StoreUnwritable("database or disk is full"), 75), (RuntimeError("bug"), 1)]
)
def test_omsd_run_exits_75_when_the_database_refuses_writes(
    monkeypatch: pytest.MonkeyPatch, error: Exception, code: int
) -> None:
    """A fatal unwritable database ends `omsd run` with EX_TEMPFAIL (75), any other fatal error with 1."""
    from omsd.daemon import app
    from omsd.daemon.cli import main
    from omsd.daemon.cli import run as cli

    async def failing(settings: object) -> None:
        raise app.DaemonFailed(error)

    monkeypatch.setattr(cli, "load_settings", lambda: quiet_health().settings)
    monkeypatch.setattr(cli, "run_until_signalled", failing)
    assert main(["run"]) == code


async def test_starting_on_a_full_disk_waits_instead_of_exiting(
    sim: Simulator, run_daemon: RunDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started on a full database, omsd serves (not ready, the reason given), reads no
    feed, does not exit, and takes up its work once there is room."""
    real_open = Store.open

    async def open_full(path: str | Path, **kw: Any) -> Store:
        store = await real_open(path, **kw)
        await fill(store)
        return store

    monkeypatch.setattr(Store, "open_or_read", open_full)
    async with run_daemon(sim, store_probe_s=0.05) as daemon:
        store = daemon.store
        assert store is not None
        order = sim.create("S1")  # into the feed VTEX keeps, once omsd configured it
        status, body, _ = await get(daemon, "/readyz")
        assert status == 503 and any("full" in p for p in body["problems"])
        probes = refused_probes(daemon)
        await until(lambda: refused_probes(daemon) >= probes + 10, what="the probe keeps trying")
        assert sim.calls.get("feed_get", 0) == 0
        await store.db.set_max_pages(1_000_000)
        await until_tracked(daemon, order.order_id)


def refused_probes(daemon: Any) -> float:
    return float(daemon.metrics.sample("omsd_store_probes_total", result="refused"))


# ---- the probe's verdict, and starting on a full or read-only file system ---------------------


async def fill_but_a_few_pages(store: Store) -> None:
    """Full, but for a few free pages (about 24 KB): an 8 KB probe fits in them, real writes do not."""
    async with store.db.tx() as conn:
        await conn.execute("CREATE TABLE scratch (x BLOB)")
        await conn.executemany("INSERT INTO scratch VALUES (randomblob(4000))", [()] * 6)
    await fill(store)
    async with store.db.tx() as conn:
        await conn.execute("DROP TABLE scratch")
    assert await store.db.pages() > 0


async def test_the_probe_does_not_pass_where_only_its_own_pages_fit(tmp_path: Path) -> None:
    """A full database with a few free pages: the probe's row would fit in them but real writes
    do not, so the probe says full (it needs room for real writes), until there is room."""
    async with await Store.open(tmp_path / "omsd.db") as store:
        await fill_but_a_few_pages(store)
        now = datetime.now(UTC)
        big = [NewEntry(kind="rejected", source="api", payload=FILLER, received_at=now) for _ in range(50)]
        with pytest.raises(StoreUnwritable):
            await store.journal.append(big, now=now)
        reason = await store.db.probe_write()
        assert reason is not None and "full" in reason
        await store.db.set_max_pages(1_000_000)
        assert await store.db.probe_write() is None


async def test_readiness_does_not_flap_while_the_database_is_full(sim: Simulator, run_daemon: RunDaemon) -> None:
    """Full, with a few free pages a probe could use: /readyz stays 503 however often it is
    asked, and the alarm is cleared once, when there is room again (not in between)."""
    logs_module.configure("info", "json")  # alarm_cleared is an info line
    async with run_daemon(sim, store_probe_s=0.05) as daemon:
        store = daemon.store
        assert store is not None
        with capture_logs() as logs:
            await fill_but_a_few_pages(store)
            await until(lambda: STORE_ALARM in daemon.health.alarms, what="the alarm")
            for _ in range(30):
                status, _, _ = await get(daemon, "/readyz")
                assert status == 503
            probes = refused_probes(daemon)
            await until(lambda: refused_probes(daemon) >= probes + 5, what="probes keep refusing")
            assert daemon.health.store_problem is not None
            await store.db.set_max_pages(1_000_000)
            await until(lambda: daemon.health.store_ok.is_set(), what="writable again")
        changes = [e["event"] for e in logs if e.get("alarm") == STORE_ALARM]
        assert changes.count("alarm_cleared") == 1 and changes[-1] == "alarm_cleared"  # never in between


async def test_a_disk_with_less_than_the_margin_free_counts_as_full(tmp_path: Path) -> None:
    """On a real file system with less free than omsd keeps for real writes, the probe says full
    although its own row would fit; with room again it passes."""
    with small_filesystem(tmp_path / "fs", 16 * 1024) as fs:
        async with await Store.open(fs / "omsd.db") as store:
            filler = fill_up(fs, leave=256 * 1024)
            reason = await store.db.probe_write()
            assert reason is not None and "full" in reason and "free on its file system" in reason
            now = datetime.now(UTC)  # a real write still fits: the verdict is a margin, not the end
            await store.journal.append([NewEntry(kind="rejected", source="api", payload="x", received_at=now)], now=now)
            filler.unlink()
            assert await store.db.probe_write() is None


async def test_restarting_on_a_full_disk_without_wal_or_shm_serves_and_waits(
    sim: Simulator, run_daemon: RunDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clean stop removed -wal and -shm and the disk is full, so SQLite cannot size a new -shm:
    omsd still starts, serves (not ready, the reason given, reads answered), reads no feed, and
    takes up its work once there is room; the reading commands work meanwhile."""
    with small_filesystem(tmp_path / "fs", 16 * 1024) as fs:
        db = fs / "omsd.db"
        async with await Store.open(db):
            pass
        assert sorted(p.name for p in fs.iterdir()) == ["omsd.db"]
        filler = fill_up(fs)
        async with run_daemon(sim, db=db, store_probe_s=0.05) as daemon:
            assert daemon.store is not None and daemon.store.db.read_only is not None
            order = sim.create("FD1")
            status, body, _ = await get(daemon, "/readyz")
            assert status == 503 and any(STORE_ALARM in p for p in body["problems"])
            status, body, _ = await get(daemon, "/healthz")
            assert status == 200 and body["intake"] == "paused"
            status, _, _ = await get(daemon, "/v1/status")
            assert status in (200, 401)  # served (the token decides), not a database error
            monkeypatch.setenv("OMSD_DB", str(db))
            for command in (["status"], ["orders"], ["export"], ["journal"]):
                assert await run_cli(*command) == 0, command
            probes = refused_probes(daemon)
            await until(lambda: refused_probes(daemon) >= probes + 5, what="the probe keeps trying")
            assert sim.calls.get("feed_get", 0) == 0
            filler.unlink()
            await until(lambda: daemon.health.store_ok.is_set(), what="writable again")
            assert daemon.store.db.read_only is None
            await until_tracked(daemon, order.order_id)


async def test_starting_on_a_read_only_file_system_serves_and_waits(
    sim: Simulator, run_daemon: RunDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database's file system is read-only at start (its lock file there from an earlier
    run): omsd serves, not ready, the reading commands work, and it resumes once writable."""
    with small_filesystem(tmp_path / "fs", 16 * 1024) as fs:
        db = fs / "omsd.db"
        async with await Store.open(db):
            pass
        with lock.hold(db):
            pass
        remount(fs, "ro")
        async with run_daemon(sim, db=db, store_probe_s=0.05) as daemon:
            order = sim.create("RO1")
            status, body, _ = await get(daemon, "/readyz")
            assert status == 503 and any(STORE_ALARM in p for p in body["problems"])
            monkeypatch.setenv("OMSD_DB", str(db))
            assert await run_cli("status") == 0
            remount(fs, "rw")
            await until(lambda: daemon.health.store_ok.is_set(), what="writable again")
            await until_tracked(daemon, order.order_id)


async def test_a_read_only_file_system_without_a_lock_file_is_a_clear_temporary_failure(
    sim: Simulator, tmp_path: Path
) -> None:
    """No lock file and none can be made (read-only): not an OSError (exit 1) but the store's
    refusal, `omsd run`'s exit 75, naming the lock file."""
    with small_filesystem(tmp_path / "fs", 1024) as fs:
        db = fs / "omsd.db"
        async with await Store.open(db):
            pass
        remount(fs, "ro")
        daemon = Daemon(fast_settings(sim, db, free_port()))
        with pytest.raises(DaemonFailed) as failed:
            await asyncio.wait_for(daemon.run(asyncio.Event()), timeout=20)
        assert isinstance(failed.value.error, StoreUnwritable) and "lock file" in str(failed.value.error)
