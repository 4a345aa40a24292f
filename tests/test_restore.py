"""`omsd restore` (latest, --to TIME, --dry-run) with its integrity and replay checks, and
`omsd check`'s replica line, against a file:// replica a daemon wrote."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from omsd.daemon.config.settings import load_policy
from omsd.daemon.tools.check import run_checks
from omsd.daemon.tools.restore import RestoreReport, _check
from omsd.sim.server import Simulator
from omsd.state.statuses import Phase
from omsd.state.store import Store
from tests.helpers import approve, fast_settings, free_port, reached, run_cli, until
from tests.replica_helpers import file_replica, intents_in

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    db, replica = tmp_path / "omsd.db", file_replica(tmp_path / "replica")
    monkeypatch.setenv("OMSD_DB", str(db))
    monkeypatch.setenv("OMSD_REPLICA", replica)
    return {"db": db, "replica": replica}


async def replicated_run(sim: Simulator, run_daemon: Callable[..., Any], env: dict[str, Any], *mkts: str) -> None:
    async with run_daemon(sim, db=env["db"], replica=env["replica"], durability="replicated") as daemon:
        for mkt in mkts:
            assert (await approve(daemon, mkt))[0] == 202


async def test_restore_to_a_new_path_checks_the_copy(
    sim: Simulator, run_daemon: Callable[..., Any], env: dict[str, Any], tmp_path: Path, capsys: Any
) -> None:
    """The latest state restored beside the live database: integrity ok, every order
    rebuilt from the journal matches, the live database untouched."""
    order = sim.create("P1")
    async with run_daemon(sim, db=env["db"], replica=env["replica"], durability="replicated") as daemon:
        assert (await approve(daemon, order.marketplace_order_id, order.order_id))[0] == 202
        await until(reached(daemon, order.order_id, Phase.APPROVED))
    before = env["db"].stat().st_mtime_ns
    out = tmp_path / "copy.db"
    assert await run_cli("restore", "--output", str(out), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["integrity"] == "ok" and report["replay"]["differing_orders"] == 0
    assert report["replay"]["orders"] >= 1 and report["last_offset"] > 0
    async with await Store.open_readonly(out) as store:
        restored = await store.read.load_order(order.order_id)
    assert restored is not None and restored.phase == Phase.APPROVED
    assert env["db"].stat().st_mtime_ns == before
    assert out.stat().st_mode & 0o777 == 0o600


async def test_point_in_time_restore_leaves_out_what_came_later(
    sim: Simulator, run_daemon: Callable[..., Any], env: dict[str, Any], tmp_path: Path
) -> None:
    """--to TIME: the intent acknowledged before TIME is there, the one after is not."""
    async with run_daemon(sim, db=env["db"], replica=env["replica"], durability="replicated") as daemon:
        assert (await approve(daemon, "EARLY-1"))[0] == 202
        middle = datetime.now(UTC)
        # Litestream stamps its files to the second: the next one must be stamped later.
        await until(lambda: datetime.now(UTC) > middle + timedelta(seconds=1.1), what="a new second")
        assert (await approve(daemon, "LATE-1"))[0] == 202
    out = tmp_path / "then.db"
    assert await run_cli("restore", "--to", middle.isoformat(), "--output", str(out)) == 0
    assert "EARLY-1" in await intents_in(out) and "LATE-1" not in await intents_in(out)
    latest = tmp_path / "now.db"
    assert await run_cli("restore", "--output", str(latest)) == 0
    assert {"EARLY-1", "LATE-1"} <= await intents_in(latest)


async def test_dry_run_changes_nothing(
    sim: Simulator, run_daemon: Callable[..., Any], env: dict[str, Any], tmp_path: Path, capsys: Any
) -> None:
    """--dry-run restores into a temporary file, checks it and removes it."""
    await replicated_run(sim, run_daemon, env, "DRY-1")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert await run_cli("restore", "--dry-run", "--force") == 0
    assert "dry run" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == files


async def test_replacing_the_database_needs_force_and_keeps_the_old_one(
    sim: Simulator, run_daemon: Callable[..., Any], env: dict[str, Any], tmp_path: Path
) -> None:
    """An existing OMSD_DB is replaced only with --force, and kept beside, renamed."""
    await replicated_run(sim, run_daemon, env, "KEEP-1")
    assert await run_cli("restore") == 2
    assert await run_cli("restore", "--force") == 0
    kept = list(tmp_path.glob("omsd.db.before-restore-*"))
    assert [p.name for p in kept if not p.name.endswith(("-wal", "-shm"))]
    assert "KEEP-1" in await intents_in(env["db"])


async def test_restore_refuses_beside_the_running_daemon(
    sim: Simulator, run_daemon: Callable[..., Any], env: dict[str, Any]
) -> None:
    """The daemon owns OMSD_DB: restoring over it is refused with exit 3."""
    async with run_daemon(sim, db=env["db"], replica=env["replica"]):
        assert await run_cli("restore", "--force") == 3


async def test_restore_without_a_replica_setting_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: Any
) -> None:
    monkeypatch.setenv("OMSD_DB", str(tmp_path / "omsd.db"))
    monkeypatch.delenv("OMSD_REPLICA", raising=False)
    assert await run_cli("restore", "--dry-run") == 2
    assert "OMSD_REPLICA" in capsys.readouterr().err


async def test_an_empty_replica_is_a_failure_not_an_empty_database(env: dict[str, Any], capsys: Any) -> None:
    """Nothing was ever replicated there: exit 1 with Litestream's reason, no file made."""
    assert await run_cli("restore") == 1
    assert "restore failed" in capsys.readouterr().err
    assert not env["db"].exists()


async def test_the_replay_check_catches_derived_rows_the_journal_does_not_give(
    sim: Simulator, run_daemon: Callable[..., Any], env: dict[str, Any]
) -> None:
    """An order row that its journal does not rebuild fails the check (nothing would be
    replaced): the check has teeth."""
    order = sim.create("T1")
    async with run_daemon(sim, db=env["db"], replica=env["replica"]) as daemon:
        assert (await approve(daemon, order.marketplace_order_id, order.order_id))[0] == 202
        await until(reached(daemon, order.order_id, Phase.APPROVED))
    report = RestoreReport("r", "t", None, True)
    await _check(env["db"], load_policy(), report)
    assert report.ok
    with sqlite3.connect(env["db"]) as conn:
        conn.execute(
            "UPDATE orders SET data = json_set(data, '$.phase', 'dead'), phase = 'dead' WHERE order_id = ?",
            (order.order_id,),
        )
    report = RestoreReport("r", "t", None, True)
    await _check(env["db"], load_policy(), report)
    assert not report.ok and report.replay["differing_orders"] == 1


async def test_check_reports_the_replica(sim: Simulator, run_daemon: Callable[..., Any], env: dict[str, Any]) -> None:
    """`omsd check`: Litestream's version and what the replica holds; an unreadable replica fails."""
    await replicated_run(sim, run_daemon, env, "CHK-1")
    settings = fast_settings(sim, env["db"], free_port(), replica=env["replica"], durability="replicated")
    [line] = [r for r in await run_checks(settings, bind_test=False) if r.name == "replica"]
    assert line.ok and "txid" in line.detail and "replicated durability" in line.detail
    broken = fast_settings(sim, env["db"], free_port(), replica=env["replica"], litestream_bin=env["db"])
    [line] = [r for r in await run_checks(broken, bind_test=False) if r.name == "replica"]
    assert not line.ok and "OMSD_LITESTREAM_BIN" in line.detail
