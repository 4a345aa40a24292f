"""The command line with an accounts directory: `--account NAME`, and `omsd accounts`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from omsd.daemon.cli import main
from omsd.sim.fleet import SimFleet
from tests.fleet_helpers import fleet_port, main_env, running_fleet, write_accounts
from tests.helpers import run_cli

ACCOUNT = "OMSD_APP_KEY=vtexappkey-a-X\nOMSD_APP_TOKEN=token-of-the-account\n"


@pytest.fixture
def fleet_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A fleet's main environment in os.environ (no other OMSD_* variable)."""
    env = main_env(tmp_path, fleet_port())
    for key in [k for k in os.environ if k.startswith("OMSD_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def omsd(*args: str) -> int:
    """`main(args)`, with the environment as it was afterwards (`--account` makes it the account's)."""
    saved = dict(os.environ)
    try:
        return main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(saved)


async def omsd_async(*args: str) -> int:
    saved = dict(os.environ)
    try:
        return await run_cli(*args)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def accounts(env: dict[str, str], *names: str) -> None:
    for name in names:
        (Path(env["OMSD_ACCOUNTS_DIR"]) / f"{name}.env").write_text(ACCOUNT)


def test_a_command_needs_account_when_there_are_several(
    fleet_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Two accounts: `--account NAME` picks the database; without it, or with an unknown one, exit 2."""
    accounts(fleet_env, "alpha", "beta")
    state = Path(fleet_env["OMSD_STATE_ROOT"])
    (state / "alpha").mkdir()
    assert omsd("orders") == 2
    assert "--account NAME is required" in capsys.readouterr().err
    assert omsd("--account", "gamma", "orders") == 2
    assert "no gamma.env" in capsys.readouterr().err
    assert omsd("--account", "alpha", "init") == 0
    assert (state / "alpha" / "omsd.db").is_file() and not (state / "beta").exists()
    assert omsd("--account", "alpha", "approve", "M-1", "--order-id", "MKP-M-1-01") == 0
    assert omsd("--account", "alpha", "intents", "--json") == 0
    assert omsd("--account", "beta", "orders") == 2  # beta has no database yet
    assert omsd("--account", "alpha", "run") == 2  # run serves every account


def test_one_account_needs_no_account_option(fleet_env: dict[str, str]) -> None:
    """With one NAME.env the commands take it."""
    accounts(fleet_env, "solo")
    (Path(fleet_env["OMSD_STATE_ROOT"]) / "solo").mkdir()
    assert omsd("init") == 0
    assert (Path(fleet_env["OMSD_STATE_ROOT"]) / "solo" / "omsd.db").is_file()


async def test_omsd_accounts_lists_each_account_from_its_database_and_the_daemon(
    fleet_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Not running: each account with its counts; running: ready or why not; a bad file: invalid."""
    async with SimFleet(["alpha", "beta"], seed=3, step_delay_s=0.01) as sims:
        write_accounts(fleet_env, sims)
        (Path(fleet_env["OMSD_ACCOUNTS_DIR"]) / "gamma.env").write_text("OMSD_APP_KEY=k\n")
        async with running_fleet(fleet_env):
            assert await omsd_async("accounts", "--json") == 0
            running = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert await omsd_async("accounts", "--json") == 0
        stopped = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_name = {v["account"]: v for v in running}
    assert by_name["alpha"]["state"] == "ready" and by_name["alpha"]["open"] == 0 and by_name["alpha"]["lag"] == 0
    assert by_name["gamma"]["state"] == "invalid" and "OMSD_APP_TOKEN" in by_name["gamma"]["problems"][0]
    assert {v["account"]: v["state"] for v in stopped} == {
        "alpha": "not running",
        "beta": "not running",
        "gamma": "invalid",
    }
