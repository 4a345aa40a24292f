"""One process owns a database; commands that write never create one by accident."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from omsd.daemon.app import Daemon, DaemonFailed
from omsd.daemon.cli import main
from omsd.daemon.cli.common import EXIT_BUSY, EXIT_CONFIG
from omsd.daemon.ops.lock import DatabaseBusy, hold
from omsd.sim.server import Simulator
from tests.helpers import fast_settings, free_port


async def _omsd(db: Path, *args: str) -> tuple[int, str, str]:
    """`omsd ARGS` in a separate process on `db`."""
    env = {**os.environ, "OMSD_DB": str(db)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "omsd.daemon",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_replay_and_ingest_refuse_beside_a_running_daemon(
    sim: Simulator, run_daemon: Any, tmp_path: Path
) -> None:
    """A second process's replay or ingest exits 3 naming the daemon's pid; reading commands still work,
    and `approve` names the daemon that will act on the intent."""
    db = tmp_path / "omsd.db"
    capture = tmp_path / "items.jsonl"
    capture.write_text('{"orderId": "A-1", "state": "invoiced", "currentChange": "2026-11-01T10:00:00Z"}\n')
    async with run_daemon(sim, db=db):
        for args in (["replay"], ["ingest", str(capture)]):
            code, _, err = await _omsd(db, *args)
            assert code == EXIT_BUSY, err
            assert f"pid {os.getpid()}" in err
        for args in (["orders", "--json"], ["status"], ["journal"], ["replay", "--dry-run", "--json"]):
            code, out, err = await _omsd(db, *args)
            assert code == 0, (args, err)
        assert json.loads(out)["summary"]["dry_run"] is True
        code, out, err = await _omsd(db, "approve", "M-9")  # says who acts on the intent
        assert code == 0 and f"the running daemon (pid {os.getpid()}) acts on it" in out, err


async def test_a_second_daemon_on_the_same_database_stops(sim: Simulator, run_daemon: Any, tmp_path: Path) -> None:
    """A second daemon on a database a daemon owns fails at once, naming the owner."""
    db = tmp_path / "omsd.db"
    async with run_daemon(sim, db=db):
        second = Daemon(fast_settings(sim, db, free_port()))
        with pytest.raises(DaemonFailed) as failed:
            await asyncio.wait_for(second.run(asyncio.Event()), timeout=20)
        assert isinstance(failed.value.error, DatabaseBusy) and failed.value.error.pid == os.getpid()


def test_the_lock_dies_with_its_owner(tmp_path: Path) -> None:
    """Once the owner lets go (or exits), the database can be owned again."""
    db = tmp_path / "o.db"
    with hold(db), pytest.raises(DatabaseBusy), hold(db):
        pass
    with hold(db):
        pass


@pytest.mark.parametrize(
    "args",
    [["approve", "M-1"], ["retry", "M-1"], ["replay"], ["ingest", "-"], ["orders"], ["export"]],
)
def test_commands_refuse_a_missing_database(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong OMSD_DB is an error (exit 2), never a new empty database."""
    db = tmp_path / "typo.db"
    monkeypatch.setenv("OMSD_DB", str(db))
    assert main(args) == EXIT_CONFIG
    assert "no database" in capsys.readouterr().err
    assert not db.exists()


def test_init_creates_the_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`omsd init` is the offline way to create a database; approve then works on it."""
    monkeypatch.setenv("OMSD_DB", str(tmp_path / "o.db"))
    assert main(["init"]) == 0
    assert main(["approve", "M-1"]) == 0


def test_a_symlink_to_the_database_is_the_same_owner(tmp_path: Path) -> None:
    """The lock belongs to the file the path resolves to: a second owner through a symlink
    (or a path with `..`) is refused like one through the same name."""
    db = tmp_path / "omsd.db"
    db.touch()
    (tmp_path / "alias.db").symlink_to(db)
    (tmp_path / "sub").mkdir()
    with hold(db):
        for other in (tmp_path / "alias.db", tmp_path / "sub" / ".." / "omsd.db"):
            with pytest.raises(DatabaseBusy), hold(other):
                pass
