"""The watchdog withholds pings for a stuck loop; `omsd check` and `omsd feed|hook config`."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from omsd.daemon.ops.notify import SENT_KEPT, Notifier, Progress, watchdog_loop
from omsd.daemon.tools.check import _database
from omsd.sim.server import Simulator
from tests.helpers import FakeClock, run_cli


async def test_watchdog_pings_only_while_loops_progress(tmp_path: Path) -> None:
    """A loop that stopped beating for longer than WatchdogSec stops the pings."""
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        clock = FakeClock()
        progress = Progress(clock)
        tick = progress.beat("processor")
        notifier = Notifier(str(path), watchdog_usec=20_000)  # ping every 10 ms, window 20 ms of fake time
        stop = asyncio.Event()
        task = asyncio.create_task(watchdog_loop(notifier, progress, stop))
        await asyncio.sleep(0.05)
        pinged = notifier.sent.count("WATCHDOG=1")
        assert pinged >= 1
        clock.now += 1.0  # the processor has not turned for a second
        await asyncio.sleep(0.05)
        assert notifier.sent.count("WATCHDOG=1") == pinged
        tick()
        await asyncio.sleep(0.05)
        assert notifier.sent.count("WATCHDOG=1") > pinged
        stop.set()
        await task


def test_without_notify_socket_everything_is_a_no_op() -> None:
    """No NOTIFY_SOCKET: nothing is sent and no watchdog runs."""
    n = Notifier(None, None)
    n.ready("x")
    n.watchdog()
    assert not n.enabled and not n.sent and n.watchdog_interval_s is None


def test_sent_messages_are_bounded(tmp_path: Path) -> None:
    """A long-running daemon remembers only the latest sd_notify messages, not all of them."""
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        n = Notifier(str(path), watchdog_usec=None)
        for i in range(SENT_KEPT + 10):
            n.status(f"turn {i}")
            sock.recv(100)
        assert len(n.sent) == SENT_KEPT
        assert n.sent[-1] == f"STATUS=turn {SENT_KEPT + 9}"


async def test_feed_config_show_then_apply(sim_env: Simulator, capsys: pytest.CaptureFixture[str]) -> None:
    """show reports the missing configuration and changes nothing; apply --yes creates it."""
    assert await run_cli("feed", "config", "show") == 0
    out = capsys.readouterr().out
    assert "(none)" in out and "create the feed configuration" in out
    assert sim_env.feed_config is None
    assert await run_cli("feed", "config", "apply") == 2  # no terminal and no --yes: refuses
    assert sim_env.feed_config is None
    assert await run_cli("feed", "config", "apply", "--yes") == 0
    assert sim_env.feed_config is not None
    capsys.readouterr()
    assert await run_cli("feed", "config", "show") == 0
    assert "nothing to change" in capsys.readouterr().out


async def test_hook_config_show_masks_the_secret(
    sim_env: Simulator, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hook's secret header value never appears in `omsd hook config show`."""
    monkeypatch.setenv("OMSD_SOURCE", "both")
    monkeypatch.setenv("OMSD_HOOK_SECRET", "hook-secret-visible-nowhere")
    sim_env.hook_config = {
        "filter": {"type": "FromWorkflow", "status": ["canceled"]},
        "hook": {
            "url": "https://elsewhere.example.com/h",
            "headers": {"X-Omsd-Hook-Secret": "hook-secret-visible-nowhere"},
        },
    }
    assert await run_cli("hook", "config", "show") == 0
    out = capsys.readouterr().out
    assert "hook-secret-visible-nowhere" not in out
    assert "hook.url: https://elsewhere.example.com/h -> https://omsd.example.com/vtex/hook" in out


def _rows(out: str) -> dict[str, tuple[str, str]]:
    """`omsd check`'s tab-separated lines: check -> (result, detail)."""
    return {line.split("\t")[0]: (line.split("\t")[1], line.split("\t")[2]) for line in out.splitlines()[1:]}


async def test_a_fresh_install_passes_its_first_check_with_warnings(
    sim_env: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before the first `omsd run` VTEX has no feed configuration (run creates it) and the API
    token may be unset: both are warnings, exit 0. A filter missing a status omsd needs fails
    (exit 1) until `feed config apply`; then no warning is left about the feed."""
    assert await run_cli("check") == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["feed configuration"][0] == "warn" and "omsd run creates it" in rows["feed configuration"][1]
    assert rows["API token"] == (
        "warn",
        "OMSD_API_TOKEN is not set: every /v1 write (POST /v1/approvals) is refused with 403, and the /v1 reads "
        "(the outcome events, orders) are open to anyone who reaches OMSD_LISTEN",
    )
    sim_env.feed_config = {"filter": {"type": "FromWorkflow", "status": ["canceled"]}, "queue": {}}
    assert await run_cli("check") == 1
    assert _rows(capsys.readouterr().out)["feed configuration"][0] == "FAIL"
    assert await run_cli("feed", "config", "apply", "--yes") == 0
    capsys.readouterr()
    assert await run_cli("check") == 0
    assert _rows(capsys.readouterr().out)["feed configuration"][0] == "ok"


async def test_check_with_the_api_token_set_says_ok(
    sim_env: Simulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With OMSD_API_TOKEN set, its row passes without a warning (and never shows the token)."""
    monkeypatch.setenv("OMSD_API_TOKEN", "api-token-shown-nowhere-0123")
    await run_cli("check")
    out = capsys.readouterr().out
    assert _rows(out)["API token"][0] == "ok" and "api-token-shown-nowhere" not in out


async def test_check_names_a_missing_database_folder(
    sim_env: Simulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """OMSD_DB in a folder that does not exist: check says so (as `omsd run` does), not "not writable"."""
    monkeypatch.setenv("OMSD_DB", str(tmp_path / "missing" / "dir" / "omsd.db"))
    assert await run_cli("check") == 1
    result, detail = _rows(capsys.readouterr().out)["database"]
    assert result == "FAIL" and f"the folder {tmp_path}/missing/dir does not exist" in detail
    assert "not writable" not in detail


async def test_check_reports_refused_credentials(
    sim_env: Simulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong AppToken is named as a credentials problem."""
    monkeypatch.setenv("OMSD_APP_TOKEN", "wrong")
    assert await run_cli("check") == 1
    out = capsys.readouterr().out
    assert "credentials" in out and "wrong" not in out


async def test_under_a_unit_the_state_directory_is_systemds_to_create(tmp_path: Path) -> None:
    """`omsd --service check` before the first start: the unit's state directory does not
    exist yet (systemd creates it, StateDirectory=), which is a warning, not a failure."""
    db = tmp_path / "var" / "lib" / "omsd" / "omsd.db"
    assert (await _database(db, unit="omsd")).verdict == "warn"
    assert (await _database(db)).verdict == "FAIL"
