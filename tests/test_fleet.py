"""One process, many accounts: each served on its own routes, with its own database and credentials."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from omsd.sim.faults import Faults
from omsd.sim.fleet import SimFleet
from omsd.state.statuses import Phase
from tests.fleet_helpers import call, fleet_port, main_env, reached, running_fleet, write_accounts
from tests.helpers import API_TOKEN, HOOK_SECRET, until

pytestmark = pytest.mark.e2e


@pytest.fixture
async def sims() -> AsyncIterator[SimFleet]:
    async with SimFleet(["alpha", "beta"], seed=11, faults=Faults(notify_delay_s=(0.01, 0.05)), step_delay_s=0.02) as f:
        yield f


async def test_each_account_approves_its_own_orders_on_its_own_routes(tmp_path: Path, sims: SimFleet) -> None:
    """Two NAME.env files: each account's hook, intents and database are its own; both approve."""
    port = fleet_port()
    env = main_env(tmp_path, port)
    write_accounts(env, sims)
    async with running_fleet(env) as fleet:
        url = fleet.url
        orders = {}
        for sim in sims:
            order = orders[sim.account] = sim.create(f"{sim.account}-1", held=True, decision=None)
            await until(functools.partial(lambda o: o.status == "waiting-for-manual-authorization", order))
            body = {"marketplaceOrderId": order.marketplace_order_id, "orderId": order.order_id}
            status, answer = await call("POST", f"{url}/v1/accounts/{sim.account}/approvals", json=body)
            assert status == 202 and answer["accepted"] is True
        for sim in sims:
            sim.authorize(orders[sim.account].order_id)
        for sim in sims:
            order = orders[sim.account]
            await until(reached(fleet, sim.account, order.order_id, Phase.APPROVED), what="approved")
            assert (order.puts, order.approvals_applied, order.puts_while_held) == (1, 1, 0)
            assert sim.hook_config is not None and sim.hook_config["hook"]["url"].endswith(f"/vtex/hook/{sim.account}")
            assert sim.protocol_errors == []
        status, answer = await call("GET", f"{url}/v1/accounts/beta/orders/{orders['alpha'].order_id}")
        assert status == 404  # alpha's order is not beta's
        status, answer = await call("POST", f"{url}/v1/approvals", json={"marketplaceOrderId": "x"})
        assert status == 404 and "/v1/accounts/{account}/" in answer["error"]
    for name in ("alpha", "beta"):
        assert (tmp_path / "state" / name / "omsd.db").is_file()


async def test_an_accounts_own_token_opens_only_its_routes(tmp_path: Path, sims: SimFleet) -> None:
    """OMSD_API_TOKEN in alpha.env reaches alpha's routes, never beta's; the operator's reaches both."""
    port = fleet_port()
    env = main_env(tmp_path, port)
    own = "alpha-own-token-0123456789"
    write_accounts(env, sims, alpha={"OMSD_API_TOKEN": own})
    async with running_fleet(env) as fleet:
        assert (await call("GET", f"{fleet.url}/v1/accounts/alpha/status", token=own))[0] == 200
        assert (await call("GET", f"{fleet.url}/v1/accounts/beta/status", token=own))[0] == 401
        assert (await call("GET", f"{fleet.url}/v1/accounts/beta/status", token=API_TOKEN))[0] == 200
        assert (await call("GET", f"{fleet.url}/v1/accounts/nobody/status", token=own))[0] == 401
        assert (await call("GET", f"{fleet.url}/v1/accounts/nobody/status", token=API_TOKEN))[0] == 404


async def test_the_hook_of_an_unknown_account_answers_like_a_wrong_secret(tmp_path: Path, sims: SimFleet) -> None:
    """An outsider cannot tell an unknown account from a known one by its hook route."""
    port = fleet_port()
    env = main_env(tmp_path, port)
    write_accounts(env, sims)
    async with running_fleet(env) as fleet:
        push = {"Domain": "Fulfillment", "OrderId": "V-1-01", "State": "invoiced"}
        wrong = {"X-Omsd-Hook-Secret": "not-the-secret-0123456789"}
        known = await call("POST", f"{fleet.url}/vtex/hook/alpha", token=None, json=push, headers=wrong)
        unknown = await call("POST", f"{fleet.url}/vtex/hook/gamma", token=None, json=push, headers=wrong)
        assert known == unknown and known[0] == 401
        ping = {"hookConfig": "ping"}
        assert await call("POST", f"{fleet.url}/vtex/hook/gamma", token=None, json=ping) == (
            200,
            {"hookConfig": "pong"},
        )
        secret = {"X-Omsd-Hook-Secret": f"{HOOK_SECRET}-beta"}
        status, _ = await call("POST", f"{fleet.url}/vtex/hook/alpha", token=None, json=push, headers=secret)
        assert status == 401  # beta's secret does not open alpha's hook
