"""Shared fixtures: the simulator on loopback and an in-process daemon wired to it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from omsd.daemon.app import Daemon
from omsd.daemon.ops import logs
from omsd.sim.faults import Faults
from omsd.sim.server import Simulator
from omsd.state.store import Store
from tests.api_helpers import Api, start
from tests.helpers import fast_settings, free_port


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    logs.configure("warning", "json")


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    s = Simulator(seed=11, faults=Faults(notify_delay_s=(0.01, 0.05)), step_delay_s=0.02)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture
def run_daemon(tmp_path: Path) -> Callable[..., Any]:
    """`async with run_daemon(sim, **settings) as daemon:` runs omsd until the block ends."""

    @asynccontextmanager
    async def runner(sim: Simulator, db: Path | None = None, **kw: Any) -> AsyncIterator[Daemon]:
        port = free_port()
        daemon = Daemon(fast_settings(sim, db or tmp_path / "omsd.db", port, **kw))
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        ready = asyncio.create_task(daemon.ready.wait())
        done, _ = await asyncio.wait([task, ready], timeout=20, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            ready.cancel()
            task.result()
        assert daemon.ready.is_set(), "daemon did not become ready"
        try:
            yield daemon
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=20)

    return runner


@pytest.fixture
async def sim_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    sim = Simulator(seed=2)
    await sim.start()
    for key, value in {
        "OMSD_ACCOUNT": sim.account,
        "OMSD_APP_KEY": sim.app_key,
        "OMSD_APP_TOKEN": sim.app_token,
        "OMSD_VTEX_BASE_URL": sim.base_url,
        "OMSD_DB": str(tmp_path / "o.db"),
        "OMSD_CONNECTOR_NAME": "c",
        "OMSD_CONNECTOR_ENDPOINT": "https://omsd.example.com",
        "OMSD_LISTEN": f"127.0.0.1:{free_port()}",
    }.items():
        monkeypatch.setenv(key, value)
    yield sim
    await sim.stop()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """A real store in the test's own folder."""
    async with await Store.open(tmp_path / "omsd.db") as s:
        yield s


@pytest.fixture
async def api(store: Store) -> AsyncIterator[Api]:
    """omsd's routes over aiohttp's test server, on `store`."""
    a = await start(store)
    try:
        yield a
    finally:
        await a.client.close()
