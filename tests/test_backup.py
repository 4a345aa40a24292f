"""`omsd backup`: a consistent copy taken under a running daemon, restorable and replayable."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import stat
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from omsd.daemon.app import Daemon
from omsd.daemon.cli import main
from omsd.sim.server import Simulator
from omsd.state.statuses import Phase
from omsd.state.store import Store
from tests.helpers import approve, phase_of, until


async def _phases(store: Store) -> dict[str, str]:
    return {o.order_id: o.phase.value for o in await store.read.list_orders(limit=1000)}


async def _settled(daemon: Daemon, sim: Simulator) -> dict[str, str]:
    """Three orders at rest: one approved, one rejected, one held with an intent."""
    ends = {"B1": ("authorize", 0.2, Phase.APPROVED), "B2": ("reject", 0.2, Phase.REJECTED)}
    ends["B3"] = ("authorize", 3600.0, Phase.WAITING_RELEASE)  # decided long after the test
    for mkt, (decision, after, phase) in ends.items():
        order = sim.create(mkt, held=True, decision=decision, decide_after_s=after)
        await until(partial(_status_is, order, "waiting-for-manual-authorization"))
        await approve(daemon, mkt, order.order_id)
        await until(partial(_is, daemon, order.order_id, phase), what=f"{mkt} {phase}")
    assert daemon.store is not None
    return await _phases(daemon.store)


def _status_is(order: Any, status: str) -> bool:
    return bool(order.status == status)


async def _is(daemon: Daemon, order_id: str, phase: Phase) -> bool:
    return await phase_of(daemon, order_id) == phase.value


async def test_backup_under_a_running_daemon_restores_and_replays_to_the_same_orders(
    sim: Simulator, run_daemon: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backup taken while the daemon runs (its writes still in the WAL) is one file,
    mode 0600; restored elsewhere and replayed from its journal, it has the same orders."""
    db, copy, restored = tmp_path / "live.db", tmp_path / "backup.db", tmp_path / "restored" / "omsd.db"
    monkeypatch.setenv("OMSD_DB", str(db))
    monkeypatch.setenv("OMSD_MAX_ATTEMPTS", "20")  # the daemon's policy, for the replay
    async with run_daemon(sim, db=db) as daemon:
        live = await _settled(daemon, sim)
        assert Path(f"{db}-wal").stat().st_size > 0
        assert await asyncio.to_thread(main, ["backup", str(copy)]) == 0
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert not Path(f"{copy}-wal").exists()

    restored.parent.mkdir()
    shutil.copyfile(copy, restored)
    monkeypatch.setenv("OMSD_DB", str(restored))
    assert await asyncio.to_thread(main, ["replay"]) == 0
    async with await Store.open(restored) as store:
        assert await _phases(store) == live
    assert live["MKP-B1-01"] == "approved" and live["MKP-B2-01"] == "rejected"


async def _one_order_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    db = tmp_path / "omsd.db"
    monkeypatch.setenv("OMSD_DB", str(db))
    assert await asyncio.to_thread(main, ["init"]) == 0
    assert await asyncio.to_thread(main, ["approve", "M1"]) == 0
    return db


async def test_backup_refuses_to_replace_a_file_unless_forced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing PATH is left alone (exit 2, one line) unless --force, which replaces it."""
    await _one_order_db(tmp_path, monkeypatch)
    dest = tmp_path / "b.db"
    dest.write_text("keep me")
    capsys.readouterr()
    assert main(["backup", str(dest)]) == 2
    assert dest.read_text() == "keep me"
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["backup", str(dest), "--force"]) == 0
    async with await Store.open(dest, migrate=False) as store:
        assert await store.read.stats()  # a database, not the old file


async def test_backup_json_says_what_it_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json prints the source, the path, its size and the schema version of the copy."""
    db = await _one_order_db(tmp_path, monkeypatch)
    dest = tmp_path / "b.db"
    capsys.readouterr()
    assert main(["backup", str(dest), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    async with await Store.open(db) as store:
        version = await store.db.schema_version()
    assert out["source"] == str(db) and out["path"] == str(dest)
    assert out["bytes"] == dest.stat().st_size and out["schema_version"] == version


def test_backup_without_a_database_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No database at OMSD_DB: exit 2 naming it; neither the database nor the copy is created."""
    monkeypatch.setenv("OMSD_DB", str(tmp_path / "none.db"))
    assert main(["backup", str(tmp_path / "b.db")]) == 2
    assert "OMSD_DB" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["a?b.db", "a#b.db", "a%3Fb.db", "a?mode=ro#x.db"])
async def test_a_database_path_with_uri_characters_is_backed_up_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """`?`, `#` or `%` in OMSD_DB: the copy is the database (its journal, its schema), not an
    empty one, and no stray file appears beside it."""
    db = tmp_path / name
    monkeypatch.setenv("OMSD_DB", str(db))
    assert await asyncio.to_thread(main, ["init"]) == 0
    assert await asyncio.to_thread(main, ["approve", "M1"]) == 0
    before = set(tmp_path.iterdir())
    assert main(["backup", str(tmp_path / "b.db")]) == 0
    assert set(tmp_path.iterdir()) - before == {tmp_path / "b.db"}
    async with await Store.open(tmp_path / "b.db", migrate=False) as copy:
        assert await copy.journal.last_offset() == 1
        async with await Store.open(db) as original:
            assert await copy.db.schema_version() == await original.db.schema_version() > 0


@pytest.mark.parametrize("path", ["", "/", ".", "sub/"])
def test_backup_to_a_path_that_names_no_file_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], path: str
) -> None:
    """`backup ''`, `backup /`: one line, exit 2, nothing written (no ValueError traceback)."""
    db = tmp_path / "omsd.db"
    monkeypatch.setenv("OMSD_DB", str(db))
    assert main(["init"]) == 0
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    before = set(tmp_path.rglob("*"))
    assert main(["backup", path]) == 2
    err = capsys.readouterr().err
    assert "PATH must name the backup file" in err and "Traceback" not in err
    assert set(tmp_path.rglob("*")) == before


async def test_a_killed_backup_leaves_nothing_behind(tmp_path: Path) -> None:
    """`omsd backup` killed with SIGKILL in the middle of its copy (here: waiting for a lock the
    test holds) leaves no partial copy and no journal beside it."""
    db = tmp_path / "omsd.db"
    async with await Store.open(db):
        pass
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("PRAGMA journal_mode=DELETE")
    locker.execute("BEGIN EXCLUSIVE")  # the copy cannot read: it waits mid-backup
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "omsd.daemon",
            "backup",
            str(tmp_path / "b.db"),
            env={**os.environ, "OMSD_DB": str(db)},
        )
        await until(lambda: any(p.name.endswith(".tmp") for p in tmp_path.iterdir()), what="the copy started")
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await until(lambda: sorted(p.name for p in tmp_path.iterdir()) == ["omsd.db"], what="nothing left")
    finally:
        locker.execute("ROLLBACK")
        locker.close()
