"""Helpers for tests of a fleet: an accounts directory against a `SimFleet`, and a running `Fleet`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from omsd.daemon.config.accounts import load_fleet_settings
from omsd.daemon.fleet.fleet import Fleet
from omsd.sim.fleet import SimFleet
from omsd.sim.server import Simulator
from omsd.state.statuses import Phase
from tests.helpers import API_TOKEN, HOOK_SECRET, free_port

# What every account inherits from the main environment: short intervals (tests.helpers.fast_settings).
FAST = {
    "OMSD_POLL_INTERVAL_S": "0.05",
    "OMSD_RATE_LIMIT_PER_S": "200",
    "OMSD_HELD_RECHECK_S": "30",
    "OMSD_CONFIRM_TIMEOUT_S": "10",
    "OMSD_RETRY_BASE_S": "0.05",
    "OMSD_RETRY_CAP_S": "0.5",
    "OMSD_EOI008_RECHECK_S": "0.2",
    "OMSD_HTTP_TIMEOUT_S": "5",
    "OMSD_RATE_LIMITED_WAIT_S": "0.2",
    "OMSD_SHUTDOWN_GRACE_S": "5",
    "OMSD_MAX_ATTEMPTS": "20",
}


def main_env(root: Path, port: int, **extra: str) -> dict[str, str]:
    """The main environment of a fleet on loopback: shared settings and the accounts' defaults."""
    (root / "accounts.d").mkdir(exist_ok=True)
    (root / "state").mkdir(exist_ok=True)
    return {
        "OMSD_ACCOUNTS_DIR": str(root / "accounts.d"),
        "OMSD_STATE_ROOT": str(root / "state"),
        "OMSD_LISTEN": f"127.0.0.1:{port}",
        "OMSD_CONNECTOR_NAME": "omsd-fleet-test",
        "OMSD_CONNECTOR_ENDPOINT": f"http://127.0.0.1:{port}",
        "OMSD_API_TOKEN": API_TOKEN,
        **FAST,
        **extra,
    }


def account_file(sim: Simulator, extra: Mapping[str, str] | None = None, *, hook: bool = True) -> str:
    """A NAME.env for the simulator's account: its credentials, base URL and (by default) hook."""
    lines = {
        "OMSD_APP_KEY": sim.app_key,
        "OMSD_APP_TOKEN": sim.app_token,
        "OMSD_VTEX_BASE_URL": sim.base_url,
        **({"OMSD_SOURCE": "hook", "OMSD_HOOK_SECRET": f"{HOOK_SECRET}-{sim.account}"} if hook else {}),
        **(extra or {}),
    }
    return "".join(f"{k}={v}\n" for k, v in lines.items())


def write_accounts(env: Mapping[str, str], sims: SimFleet, **per_account: dict[str, str]) -> None:
    folder = Path(env["OMSD_ACCOUNTS_DIR"])
    for sim in sims:
        (folder / f"{sim.account}.env").write_text(account_file(sim, per_account.get(sim.account)))


@asynccontextmanager
async def running_fleet(env: Mapping[str, str], **kw: Any) -> AsyncIterator[Fleet]:
    """A fleet on `env` until the block ends (it must become ready within 30 s)."""
    fleet = Fleet(load_fleet_settings(env), Path(env["OMSD_ACCOUNTS_DIR"]), environ=env, **kw)
    stop = asyncio.Event()
    task = asyncio.create_task(fleet.run(stop))
    ready = asyncio.create_task(fleet.ready.wait())
    done, _ = await asyncio.wait([task, ready], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        task.result()
    assert fleet.ready.is_set(), "fleet did not become ready"
    try:
        yield fleet
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)


def fleet_port() -> int:
    return free_port()


def reached(fleet: Fleet, account: str, order_id: str, phase: Phase) -> Callable[[], Awaitable[bool]]:
    """A condition for `until`: the account's order is in `phase`."""

    async def check() -> bool:
        daemon = fleet.runners[account].daemon
        assert daemon is not None and daemon.store is not None
        order = await daemon.store.read.load_order(order_id)
        return order is not None and order.phase == phase

    return check


async def call(
    method: str, url: str, *, token: str | None = API_TOKEN, json: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """One request; the status and the JSON body (or the text)."""
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as s, s.request(method, url, json=json, headers=h) as r:
        try:
            return r.status, await r.json(content_type=None)
        except ValueError:
            return r.status, await r.text()
