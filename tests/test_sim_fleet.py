"""The simulator serves many accounts: each its own credentials, orders, feed and hook."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from omsd.sim.fleet import SimFleet
from omsd.sim.server import Simulator
from tests.helpers import until

CONFIG = {
    "filter": {"type": "FromWorkflow", "status": ["waiting-for-manual-authorization", "canceled"]},
    "queue": {"visibilityTimeoutInSeconds": 240, "MessageRetentionPeriodInSeconds": 345600},
}


@pytest.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    async with SimFleet(["alpha", "beta"], seed=3, step_delay_s=0.01) as f:
        yield f


def headers(sim: Simulator) -> dict[str, str]:
    return {
        "X-VTEX-API-AppKey": sim.app_key,
        "X-VTEX-API-AppToken": sim.app_token,
        "Accept": "application/json",
        "Content-Type": "application/json",
    }


async def test_each_account_checks_its_own_credentials(fleet: SimFleet) -> None:
    """An account's credentials open its own routes only; another account's are a 401, as at VTEX."""
    alpha, beta = fleet["alpha"], fleet["beta"]
    assert alpha.app_token != beta.app_token and alpha.base_url != beta.base_url
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{alpha.base_url}/api/orders/feed/config", headers=headers(alpha)) as r:
            assert r.status == 404  # its own credentials: no configuration yet
        async with s.get(f"{beta.base_url}/api/orders/feed/config", headers=headers(alpha)) as r:
            assert r.status == 401


async def test_accounts_have_their_own_orders_and_feeds(fleet: SimFleet) -> None:
    """An order created in one account shows in its feed and Get order only."""
    alpha, beta = fleet["alpha"], fleet["beta"]
    async with aiohttp.ClientSession() as s:
        for sim in (alpha, beta):
            async with s.post(f"{sim.base_url}/api/orders/feed/config", json=CONFIG, headers=headers(sim)) as r:
                assert r.status == 200
        order = alpha.create("A1", held=True, decision=None)
        await until(lambda: order.status == "waiting-for-manual-authorization")
        assert alpha.queue.messages and not beta.queue.messages
        url = f"/api/oms/pvt/orders/{order.order_id}"
        async with s.get(f"{alpha.base_url}{url}", headers=headers(alpha)) as r:
            assert r.status == 200 and (await r.json())["hostname"] == "alpha"
        async with s.get(f"{beta.base_url}{url}", headers=headers(beta)) as r:
            assert r.status == 404
    assert alpha.protocol_errors == [] and beta.protocol_errors == []


def test_account_names_are_host_labels() -> None:
    """A name that could not be a VTEX host label, or a repeated one, is refused."""
    with pytest.raises(ValueError, match="account name"):
        SimFleet(["ok", "bad/name"])
    with pytest.raises(ValueError, match="account name"):
        SimFleet(["same", "same"])
