"""One process, many accounts: each served on its own routes, with its own database and credentials."""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import structlog

from omsd.daemon.fleet.fleet import Fleet
from omsd.daemon.intake import entries
from omsd.sim.faults import Faults
from omsd.sim.fleet import SimFleet
from omsd.state.statuses import Phase
from omsd.state.store import Store
from tests.fleet_helpers import account_file, call, fleet_port, main_env, reached, running_fleet, write_accounts
from tests.helpers import API_TOKEN, HOOK_SECRET, until

EXAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "examples"

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


async def test_an_account_with_refused_credentials_waits_alone_and_starts_once_fixed(
    tmp_path: Path, sims: SimFleet
) -> None:
    """beta's token is refused: beta fails and is retried with backoff, alpha approves meanwhile,
    the fleet is ready; fixed and reloaded, beta runs."""
    env = main_env(tmp_path, fleet_port())
    write_accounts(env, sims, beta={"OMSD_APP_TOKEN": "not-beta-s-token"})
    async with running_fleet(env, backoff_s=(0.1,)) as fleet:
        beta = fleet.runners["beta"]
        await until(lambda: beta.failures >= 2, what="beta retried")
        assert beta.last_error is not None and "AuthFailed" in beta.last_error
        status, body = await call("GET", f"{fleet.url}/readyz?account=beta", token=None)
        assert status == 503 and "not running" in body["problems"][0]
        status, body = await call("GET", f"{fleet.url}/readyz", token=None)
        assert status == 200 and body["unready"] == ["beta"] and body["accounts"]["alpha"]["ready"]
        status, body = await call("POST", f"{fleet.url}/v1/accounts/beta/approvals", json={"marketplaceOrderId": "b"})
        assert status == 503
        alpha = sims["alpha"]
        order = alpha.create("a-2", held=False)
        await call("POST", f"{fleet.url}/v1/accounts/alpha/approvals", json={"marketplaceOrderId": "a-2"})
        await until(reached(fleet, "alpha", order.order_id, Phase.APPROVED), what="alpha approves")
        write_accounts(env, sims)
        fleet.reload()
        await fleet.reloaded()
        await until(
            lambda: fleet.runners["beta"].daemon is not None and fleet.runners["beta"].daemon.ready.is_set(),
            what="beta runs",
        )
        assert (await call("GET", f"{fleet.url}/readyz?account=beta", token=None))[0] == 200
        assert fleet.runners["alpha"] is not beta


async def test_a_bad_file_is_that_accounts_error_only(tmp_path: Path, sims: SimFleet) -> None:
    """A NAME.env with a bad value, or one naming a process-wide setting: that account is not
    started and says why; the others run."""
    env = main_env(tmp_path, fleet_port())
    write_accounts(env, sims, beta={"OMSD_POLL_INTERVAL_S": "soon"})
    folder = Path(env["OMSD_ACCOUNTS_DIR"])
    (folder / "gamma.env").write_text("OMSD_APP_KEY=k\nOMSD_APP_TOKEN=t\nOMSD_LISTEN=0.0.0.0:1\n")
    async with running_fleet(env) as fleet:
        status, body = await call("GET", f"{fleet.url}/readyz", token=None)
        assert status == 200 and sorted(body["unready"]) == ["beta", "gamma"]
        assert "OMSD_POLL_INTERVAL_S" in body["accounts"]["beta"]["problems"][0]
        assert "OMSD_LISTEN: is shared by every account" in body["accounts"]["gamma"]["problems"][0]
        assert body["accounts"]["alpha"]["ready"] is True
        assert fleet.runners["beta"].daemon is None


async def test_reload_adds_changes_and_removes_accounts_without_touching_the_others(
    tmp_path: Path, sims: SimFleet
) -> None:
    """SIGHUP: a new file starts its account, a changed one restarts only that account, a
    removed one stops its intake and keeps its database; the untouched account runs on."""
    env = main_env(tmp_path, fleet_port())
    folder = Path(env["OMSD_ACCOUNTS_DIR"])
    alpha, beta = sims["alpha"], sims["beta"]
    (folder / "alpha.env").write_text(account_file(alpha))
    async with running_fleet(env) as fleet:
        untouched = fleet.runners["alpha"].daemon
        assert untouched is not None and set(fleet.runners) == {"alpha"}

        (folder / "beta.env").write_text(account_file(beta))
        fleet.reload()
        await fleet.reloaded()
        await until(lambda: _ready(fleet, "beta"), what="beta added")
        first_beta = fleet.runners["beta"].daemon

        (folder / "beta.env").write_text(account_file(beta, {"OMSD_MAXLOT": "5"}))
        fleet.reload()
        await fleet.reloaded()
        await until(lambda: _ready(fleet, "beta") and fleet.runners["beta"].daemon is not first_beta, what="beta anew")
        daemon = fleet.runners["beta"].daemon
        assert daemon is not None and daemon.settings.maxlot == 5

        (folder / "beta.env").unlink()
        fleet.reload()
        await fleet.reloaded()
        await until(lambda: "beta" not in fleet.directory.names(), what="beta removed")
        assert daemon.store is not None and not fleet.runners.get("beta")
        push = {"Domain": "Fulfillment", "OrderId": "V-1-01", "State": "invoiced"}
        headers = {"X-Omsd-Hook-Secret": f"{HOOK_SECRET}-beta"}
        status, _ = await call("POST", f"{fleet.url}/vtex/hook/beta", token=None, json=push, headers=headers)
        assert status == 401  # its intake stopped: the hook is no one's now
        assert fleet.runners["alpha"].daemon is untouched and untouched.ready.is_set()
    assert (tmp_path / "state" / "beta" / "omsd.db").is_file()


def _ready(fleet: Fleet, name: str) -> bool:
    runner = fleet.runners.get(name)
    return runner is not None and runner.daemon is not None and runner.daemon.ready.is_set()


async def test_the_notification_path_names_its_account_and_an_must_match(tmp_path: Path, sims: SimFleet) -> None:
    """Each account's capability path reaches that account only; `?an=` must name it."""
    env = main_env(tmp_path, fleet_port())
    write_accounts(env, sims)
    async with running_fleet(env) as fleet:
        key = fleet.directory.configured["alpha"].notify_key.get_secret_value()
        route = f"{fleet.url}/notify/{key}/order-integration/notification/processing-result"
        body = {"marketplaceOrderId": "M-1", "code": "EOI009", "flow": "ApproveOrder", "success": False}
        status, answer = await call("POST", f"{route}?an=alpha", token=None, json=body)
        assert status == 200 and answer["received"] is True
        assert (await call("POST", f"{route}?an=beta", token=None, json=body))[0] == 400
        wrong = f"{fleet.url}/notify/{'x' * 40}/order-integration/notification/processing-result?an=alpha"
        assert (await call("POST", wrong, token=None, json=body))[0] == 404
        alpha, beta = (fleet.runners[n].daemon for n in ("alpha", "beta"))
        assert alpha is not None and alpha.store is not None and beta is not None and beta.store is not None
        assert [r.kind for r in await alpha.store.journal.tail(2)] == ["notification_received", "rejected"]
        assert all(r.kind not in ("notification_received", "rejected") for r in await beta.store.journal.tail(5))


async def test_an_account_whose_database_refuses_writes_pauses_alone(tmp_path: Path, sims: SimFleet) -> None:
    """beta's database refuses writes: beta's intake answers 503, alpha's goes on, /healthz says which."""
    env = main_env(tmp_path, fleet_port(), OMSD_STORE_PROBE_S="300")
    write_accounts(env, sims)
    async with running_fleet(env) as fleet:
        beta = fleet.runners["beta"].daemon
        assert beta is not None
        beta.health.store_unwritable("disk full (test)")
        body = {"marketplaceOrderId": "m-1"}
        status, answer = await call("POST", f"{fleet.url}/v1/accounts/beta/approvals", json=body)
        assert status == 503 and "disk full (test)" in answer["error"]
        assert (await call("POST", f"{fleet.url}/v1/accounts/alpha/approvals", json=body))[0] == 202
        assert (await call("GET", f"{fleet.url}/healthz", token=None))[1]["paused"] == ["beta"]
        assert (await call("GET", f"{fleet.url}/readyz?account=beta", token=None))[0] == 503


async def test_rows_another_process_appends_are_applied_without_a_poll(tmp_path: Path, sims: SimFleet) -> None:
    """`omsd approve` writes to an account's database: the journal watcher wakes that account's
    processor (whose own poll, in a fleet, is minutes apart)."""
    env = main_env(tmp_path, fleet_port())
    write_accounts(env, sims)
    async with running_fleet(env, watch_every_s=0.05) as fleet:
        daemon = fleet.runners["alpha"].daemon
        assert daemon is not None and daemon.store is not None
        async with await Store.open(daemon.settings.db) as other:
            now = datetime.now(UTC)
            await other.journal.append([entries.intent_entry("from-cli", None, "cli", now)], now=now)
        store = daemon.store

        async def parked() -> bool:
            return await store.read.pending_intent("from-cli") is not None

        await until(parked, what="the intent is applied (parked)")


async def test_an_account_whose_loop_stops_beating_is_restarted_alone(tmp_path: Path, sims: SimFleet) -> None:
    """A stuck account is stopped and started again; the others are not touched."""
    env = main_env(tmp_path, fleet_port())
    write_accounts(env, sims)
    async with running_fleet(env, stall_s=0.5, backoff_s=(0.05,)) as fleet:
        alpha, beta = fleet.runners["alpha"], fleet.runners["beta"]
        first_alpha, first_beta = alpha.daemon, beta.daemon
        assert first_beta is not None
        first_beta.progress.beat("stuck-loop")  # registered once, never again: it looks stuck
        await until(
            lambda: beta.failures >= 1 and beta.daemon is not first_beta and _ready(fleet, "beta"), what="beta anew"
        )
        assert beta.last_error is not None and "stuck-loop" in beta.last_error
        assert beta.daemon is not first_beta and alpha.daemon is first_alpha and alpha.failures == 0


async def test_metrics_label_what_matters_per_account(tmp_path: Path, sims: SimFleet) -> None:
    """/metrics: orders by phase, alarms and VTEX calls per account; latency histograms once for the fleet."""
    env = main_env(tmp_path, fleet_port())
    write_accounts(env, sims)
    async with running_fleet(env) as fleet:
        status, text = await call("GET", f"{fleet.url}/metrics", token=None)
    assert status == 200
    lines = text.splitlines()
    assert 'omsd_orders{account="alpha",phase="approved"} 0.0' in lines
    assert 'omsd_orders{account="beta",phase="approved"} 0.0' in lines
    assert 'omsd_account_up{account="beta"} 1.0' in lines
    # a scrape that no probe preceded still says each account is ready, as its /readyz would
    assert 'omsd_ready{account="alpha"} 1.0' in lines and 'omsd_ready{account="beta"} 1.0' in lines
    assert sum(line.startswith("omsd_build_info{") for line in lines) == 1
    calls = [line for line in lines if line.startswith("omsd_vtex_requests_total{")]
    assert calls and all('account="' in line for line in calls)
    durations = [line for line in lines if line.startswith("omsd_vtex_request_duration_seconds_count{")]
    assert durations and not any("account=" in line for line in durations)
    assert sum(line.startswith("# TYPE omsd_alarm ") for line in lines) == 1


async def test_a_requests_log_lines_name_its_account(tmp_path: Path, sims: SimFleet) -> None:
    """Lines logged while serving /v1/accounts/beta/... carry account=beta (the operator reads one log)."""
    env = main_env(tmp_path, fleet_port())
    write_accounts(env, sims)
    async with running_fleet(env) as fleet:
        with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
            status, _ = await call("POST", f"{fleet.url}/v1/accounts/beta/approvals", json={"orderId": 7})
    assert status == 400
    rejected = [e for e in logs if e["event"] == "request_rejected"]
    assert rejected and all(e.get("account") == "beta" for e in rejected)


async def test_the_pull_example_reads_one_accounts_stream(tmp_path: Path, sims: SimFleet) -> None:
    """deploy/examples/pull_client.py --account NAME: that account's events, in seq order, and no other's."""
    env = main_env(tmp_path, fleet_port())
    write_accounts(env, sims)
    created = {}
    async with running_fleet(env) as fleet:
        for sim in sims:
            order = created[sim.account] = sim.create(f"{sim.account}-P")
            body = {"marketplaceOrderId": order.marketplace_order_id, "orderId": order.order_id}
            assert (await call("POST", f"{fleet.url}/v1/accounts/{sim.account}/approvals", json=body))[0] == 202
            await until(reached(fleet, sim.account, order.order_id, Phase.APPROVED), what="approved")
        streams, outputs = {}, {}
        for sim in sims:
            daemon = fleet.runners[sim.account].daemon
            assert daemon is not None and daemon.store is not None
            streams[sim.account] = [e.view() for e in await daemon.store.outcomes.after(0, 1000)]
            pull = await asyncio.create_subprocess_exec(
                sys.executable,
                str(EXAMPLES / "pull_client.py"),
                *("--cursor", str(tmp_path / f"{sim.account}.cursor"), "--until-idle", "--account", sim.account),
                env={**os.environ, "OMSD_URL": fleet.url, "OMSD_API_TOKEN": API_TOKEN},
                stdout=subprocess.PIPE,
            )
            out, _ = await pull.communicate()
            outputs[sim.account] = out.decode().splitlines()
    for account, stream in streams.items():
        mine = created[account]
        assert stream and all(e["marketplace_order_id"] == mine.marketplace_order_id for e in stream)
        assert {e["order_id"] for e in stream} <= {None, mine.order_id}
        lines = [f"{e['seq']} {e['type']} {e['order_id'] or e['marketplace_order_id']}" for e in stream]
        assert outputs[account] == lines
        assert (tmp_path / f"{account}.cursor").read_text() == str(stream[-1]["seq"])
