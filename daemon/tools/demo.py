"""`omsd demo`: the simulator and one omsd in one process, on temporary databases.

omsd serves three seller accounts (a fleet: an accounts directory, a database per account,
one HTTP server), each against its own simulated VTEX account. A connector creates orders
through each account's Channel Order API and hands each approval to omsd, on the account's
own route; some orders are held for a price divergence and then
authorized or rejected by the "seller", some are put back on hold just as the
approval arrives, and the simulator injects the faults VTEX documents
(429 with Retry-After, 5xx, duplicates, short batches, malformed items).
The demo ends with a summary and exits 0 only when every order reached the end
it should, each approved order was approved exactly once, and no approval was
sent while an order was held.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import socket
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from rich.console import Console
from rich.live import Live
from rich.table import Table
from standardwebhooks import Webhook

from omsd.sim.faults import Faults
from omsd.sim.fleet import SimFleet
from omsd.sim.server import Simulator
from omsd.state.statuses import Phase

from ..config.accounts import load_fleet_settings
from ..fleet.fleet import Fleet
from ..ops import logs


@dataclass(frozen=True)
class Planned:
    marketplace_order_id: str
    kind: str  # free | held-authorized | held-rejected | held-flip
    expected: Phase
    give_order_id: bool
    account: str = ""


KINDS = (
    ("free", Phase.APPROVED),
    ("held-authorized", Phase.APPROVED),
    ("held-rejected", Phase.REJECTED),
    ("held-flip", Phase.APPROVED),
)


def plan(count: int, accounts: list[str] | None = None) -> list[Planned]:
    """A fixed mix: 40% free, 35% held then authorized, 15% held then rejected,
    10% put back on hold when the approval arrives; the orders dealt to the accounts in turn."""
    names = accounts or [""]
    shares = {"free": 0.40, "held-authorized": 0.35, "held-rejected": 0.15}
    out: list[Planned] = []
    counts = {k: int(count * v) for k, v in shares.items()}
    counts["held-flip"] = count - sum(counts.values())
    n = 0
    for kind, expected in KINDS:
        for _ in range(counts[kind]):
            n += 1
            out.append(Planned(f"DEMO{n:04d}", kind, expected, give_order_id=n % 2 == 0, account=names[n % len(names)]))
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Connector:
    """The connector's receiver for omsd's relay: verifies each POST's signature, handles each
    event once (a retry repeats a webhook-id), and keeps what it heard per order."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self._hook = Webhook(secret)
        self.seen: set[str] = set()
        self.repeats = 0
        self.heard: Counter[str] = Counter()
        self.ends: dict[str, str] = {}  # marketplace order id -> its terminal event
        self.url = ""

    async def receive(self, request: web.Request) -> web.Response:
        try:
            event = self._hook.verify(await request.text(), dict(request.headers))
        except ValueError:  # a forged or stale signature (WebhookVerificationError is one)
            return web.Response(status=401)
        if request.headers["webhook-id"] in self.seen:
            self.repeats += 1
            return web.Response(status=204)
        self.seen.add(request.headers["webhook-id"])
        self.heard[event["type"]] += 1
        if event["type"] in TERMINAL_TYPES and event["marketplace_order_id"]:
            self.ends[event["marketplace_order_id"]] = event["type"]
        return web.Response(status=204)

    async def start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/omsd/events", self.receive)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/omsd/events"
        return runner

    def summary(self) -> str:
        heard = ", ".join(f"{n} {kind}" for kind, n in sorted(self.heard.items()))
        return f"the connector heard (signed, each once): {heard or 'nothing'}; {self.repeats} repeats absorbed"


TERMINAL_TYPES = ("approval.confirmed", "approval.refused", "intent.canceled", "intent.expired", "order.dead")
EXPECTED_END = {Phase.APPROVED: "approval.confirmed", Phase.REJECTED: "intent.canceled"}
ACCOUNTS = ("north", "south", "east", "west", "centre")


def demo_environment(tmp: Path, port: int, api_token: str, connector: Connector, *, replicated: bool) -> dict[str, str]:
    """The fleet's main environment: what the accounts share and their defaults (short intervals)."""
    (tmp / "accounts.d").mkdir()
    (tmp / "state").mkdir()
    env = {
        "OMSD_ACCOUNTS_DIR": str(tmp / "accounts.d"),
        "OMSD_STATE_ROOT": str(tmp / "state"),
        "OMSD_LISTEN": f"127.0.0.1:{port}",
        "OMSD_CONNECTOR_NAME": "omsd-demo",
        "OMSD_CONNECTOR_ENDPOINT": f"http://127.0.0.1:{port}",
        "OMSD_API_TOKEN": api_token,
        "OMSD_SOURCE": "both",
        "OMSD_POLL_INTERVAL_S": "0.2",
        "OMSD_RATE_LIMIT_PER_S": "100",
        "OMSD_HELD_RECHECK_S": "4",
        "OMSD_CONFIRM_TIMEOUT_S": "4",
        "OMSD_RETRY_BASE_S": "0.2",
        "OMSD_RETRY_CAP_S": "2",
        "OMSD_EOI008_RECHECK_S": "1",
        "OMSD_HTTP_TIMEOUT_S": "5",
        "OMSD_RATE_LIMITED_WAIT_S": "1",
        "OMSD_SHUTDOWN_GRACE_S": "5",
        "OMSD_MAX_ATTEMPTS": "12",
        # One connector hears every account: each event names its account (daemon/relay/webhooks.py).
        "OMSD_RELAY_URL": connector.url,
        "OMSD_RELAY_SECRET": connector.secret,
    }
    if replicated:  # Litestream beside each account, a file:// replica per account under one folder
        env |= {"OMSD_REPLICA": f"file://{tmp / 'replica'}", "OMSD_DURABILITY": "replicated"}
    return env


def account_file(sim: Simulator) -> str:
    """A NAME.env: the account's own credentials, VTEX (the simulator) and hook secret."""
    own = {
        "OMSD_APP_KEY": sim.app_key,
        "OMSD_APP_TOKEN": sim.app_token,
        "OMSD_VTEX_BASE_URL": sim.base_url,
        "OMSD_HOOK_SECRET": secrets.token_urlsafe(24),
    }
    return "".join(f"{k}={v}\n" for k, v in own.items())


async def _create(session: aiohttp.ClientSession, sim: Simulator, p: Planned, endpoint: str) -> None:
    if p.kind == "held-flip":
        sim.create(p.marketplace_order_id, held=False, flip_back=1, decide_after_s=1.0)
        return
    price = 10000
    paid = {"free": 10000, "held-authorized": 9600, "held-rejected": 7000}[p.kind]
    body = {
        "marketplaceOrderId": p.marketplace_order_id,
        "marketplaceOrderStatus": "new",
        "marketplacePaymentValue": paid,
        "allowFranchises": False,
        "items": [{"id": "1", "price": price, "quantity": 1}],
        "clientProfileData": {},
        "shippingData": {},
        "invoiceData": {},
        "connectorName": "omsd-demo",
        "connectorEndpoint": endpoint,
        "customData": {"simDecideAfterS": 1.0 + int(p.marketplace_order_id[-4:]) % 30 / 10},
    }
    headers = {
        "X-VTEX-API-AppKey": sim.app_key,
        "X-VTEX-API-AppToken": sim.app_token,
        "Accept": "application/json",
        "Content-Type": "application/json",
    }
    url = f"{sim.base_url}/api/order-integration/orders"
    for _ in range(20):  # the connector retries the simulator's injected faults
        try:
            async with session.post(
                url, params={"affiliateId": "MKP", "an": sim.account}, json=body, headers=headers
            ) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"could not create {p.marketplace_order_id}")


async def _intent(session: aiohttp.ClientSession, url: str, token: str, p: Planned) -> None:
    """The approval, on the account's own route (`url` is `/v1/accounts/NAME`)."""
    body: dict[str, Any] = {"marketplaceOrderId": p.marketplace_order_id}
    if p.give_order_id:
        body["orderId"] = f"MKP-{p.marketplace_order_id}-01"
    async with session.post(f"{url}/approvals", json=body, headers={"Authorization": f"Bearer {token}"}) as resp:
        if resp.status != 202:
            raise RuntimeError(f"{url}/approvals answered {resp.status}: {await resp.text()}")


def _stats(sims: SimFleet) -> dict[str, int]:
    """The simulator's counters, summed over the accounts."""
    total: Counter[str] = Counter()
    for sim in sims:
        total.update({k: v for k, v in sim.stats().items() if isinstance(v, int)})
    return dict(total)


def _table(
    planned: list[Planned],
    phases: dict[str, str],
    sims: SimFleet,
    final: bool,
    fleet: Fleet | None = None,
) -> Table:
    table = Table(title="omsd demo: summary" if final else "omsd demo: live", expand=False)
    table.add_column("orders")
    for col in ("count", "approved", "rejected", "waiting", "dead", "as expected"):
        table.add_column(col, justify="right")
    rows = [(f"{kind} (→ {expected.value})", [p for p in planned if p.kind == kind]) for kind, expected in KINDS]
    rows += [(f"account {name}", [p for p in planned if p.account == name]) for name in sims.accounts]
    for label, group in rows:
        c = Counter(phases.get(p.marketplace_order_id, "unseen") for p in group)
        ok = sum(1 for p in group if phases.get(p.marketplace_order_id) == p.expected.value)
        waiting = len(group) - c["approved"] - c["rejected"] - c["dead"]
        table.add_row(
            label, str(len(group)), str(c["approved"]), str(c["rejected"]), str(waiting), str(c["dead"]),
            f"{ok}/{len(group)}",
        )  # fmt: skip
    st = _stats(sims)
    table.caption = (
        f"{len(sims)} accounts in one omsd · approval PUTs {st['puts']} · approvals applied by VTEX "
        f"{st['approvals_applied']} · approvals sent while held {st['puts_while_held']} · EOI011 refusals "
        f"{st['eoi011']} · 429s {st['rate_limited']} · feed deliveries {st['deliveries']} for {st['deleted']} "
        f"committed · hook pushes {st['hook_pushes']}"
    )
    if fleet is not None:
        shared = fleet.metrics.aggregate
        absorbed = sum(shared.sample("omsd_duplicates_total", source=s) for s in ("feed", "hook"))
        table.caption += f" · duplicates absorbed {absorbed:.0f}"
    return table


async def run_demo(
    count: int = 60,
    seed: int = 7,
    timeout_s: float = 180.0,
    console: Console | None = None,
    *,
    replicated: bool = False,
    accounts: int = 3,
) -> int:
    console = console or Console()
    # The log lives beside, not inside, the temporary directory: the demo points the
    # user at it, so it must outlive the database that is deleted at the end.
    fd, name = tempfile.mkstemp(prefix="omsd-demo-", suffix=".log")
    log_path = Path(name)
    with tempfile.TemporaryDirectory(prefix="omsd-demo-") as tmp, open(fd, "w") as log_file:  # noqa: ASYNC230
        logs.configure("info", "json", stream=log_file)
        code = await _run(
            count, seed, timeout_s, console, Path(tmp), log_path, replicated=replicated, accounts=accounts
        )
    console.print(f"log kept at {log_path}")
    return code


async def _run(
    count: int,
    seed: int,
    timeout_s: float,
    console: Console,
    tmp: Path,
    log_path: Path,
    *,
    replicated: bool,
    accounts: int,
) -> int:
    faults = Faults(
        latency_s=(0.0, 0.01),
        rate_429=0.03,
        retry_after_s=1.0,
        rate_5xx=0.03,
        duplicate_rate=0.2,
        notification_duplicate_rate=0.1,
    )
    sims = SimFleet(ACCOUNTS[:accounts], seed=seed, faults=faults, visibility_override_s=3.0)
    await sims.start()
    for sim in sims:
        for bad in (
            {"orderId": "MKP-X-01", "state": "no-such-status", "currentChange": "2026-01-01T00:00:00Z"},
            {"orderId": "MKP-Y-01", "state": "handling", "currentChange": "yesterday"},
            {"state": "handling"},
        ):
            sim.malformed.append(bad)
    port = free_port()
    token = secrets.token_urlsafe(24)
    connector = Connector("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
    receiver = await connector.start()
    env = demo_environment(tmp, port, token, connector, replicated=replicated)
    for sim in sims:
        (tmp / "accounts.d" / f"{sim.account}.env").write_text(account_file(sim))
    fleet = Fleet(load_fleet_settings(env), tmp / "accounts.d", environ=env)
    stop = asyncio.Event()
    task = asyncio.create_task(fleet.run(stop))
    planned = plan(count, list(sims.accounts))
    phases: dict[str, str] = {}
    try:
        await _ready(fleet, task)
        console.print(
            f"simulated VTEX at {sims.url} ({accounts} accounts: {', '.join(sims.accounts)}); one omsd at {fleet.url}; "
            f"{count} orders; log {log_path}"
        )
        async with aiohttp.ClientSession() as session:
            slots = asyncio.Semaphore(10)  # ten connector workers

            async def hand_over(p: Planned) -> None:
                async with slots:
                    # The connector gives VTEX the account's capability URL, so results reach it.
                    endpoint = fleet.directory.configured[p.account].notify_endpoint.get_secret_value()
                    await _create(session, sims[p.account], p, endpoint)
                    await _intent(session, f"{fleet.url}/v1/accounts/{p.account}", token, p)

            await asyncio.gather(*(hand_over(p) for p in planned))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            # The live table only on a terminal: in a pipe it cannot redraw, and its last frame
            # ends without a newline, so the summary would run on from it.
            live = Live(_table(planned, phases, sims, False), console=console, refresh_per_second=4)
            with live if console.is_terminal else contextlib.nullcontext(live):
                while loop.time() < deadline:
                    for runner in fleet.runners.values():
                        daemon = runner.daemon
                        if daemon is None or daemon.store is None:
                            continue
                        for order in await daemon.store.read.list_orders(limit=10 * count):
                            if order.marketplace_order_id:
                                phases[order.marketplace_order_id] = order.phase.value
                    if console.is_terminal:
                        live.update(_table(planned, phases, sims, False))
                    done = all(phases.get(p.marketplace_order_id) == p.expected.value for p in planned)
                    if done and len(connector.ends) >= len(planned):
                        break
                    await asyncio.sleep(0.25)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)
        await sims.stop()
        await receiver.cleanup()
    console.print(_table(planned, phases, sims, True, fleet))
    console.print(connector.summary())
    return _verdict(planned, phases, sims, console, connector)


async def _ready(fleet: Fleet, task: asyncio.Task[None]) -> None:
    """Until every account is ready (the fleet's own start failing ends the demo)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while loop.time() < deadline:
        if task.done():
            task.result()
        if fleet.ready.is_set() and all(
            r.daemon is not None and r.daemon.ready.is_set() for r in fleet.runners.values()
        ):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the accounts did not become ready: {fleet.directory.down}")


def _verdict(
    planned: list[Planned], phases: dict[str, str], sims: SimFleet, console: Console, connector: Connector
) -> int:
    problems: list[str] = []
    for p in planned:
        heard = connector.ends.get(p.marketplace_order_id)
        if heard != EXPECTED_END[p.expected]:
            problems.append(
                f"{p.marketplace_order_id}: the connector heard {heard}, expected {EXPECTED_END[p.expected]}"
            )
        got = phases.get(p.marketplace_order_id, "unseen")
        if got != p.expected.value:
            problems.append(f"{p.marketplace_order_id} ({p.kind}) ended {got}, expected {p.expected.value}")
        order = sims[p.account].orders.get(f"MKP-{p.marketplace_order_id}-01")
        applied = order.approvals_applied if order else 0
        if p.expected == Phase.APPROVED and applied != 1:
            problems.append(f"{p.marketplace_order_id} approved {applied} times by VTEX")
        if p.expected == Phase.REJECTED and applied:
            problems.append(f"{p.marketplace_order_id} was canceled but approved")
    if held := _stats(sims)["puts_while_held"]:
        problems.append(f"{held} approvals sent while held")
    for sim in sims:
        if sim.protocol_errors:
            problems.append(f"{sim.account}: requests that break VTEX's contract: {sim.protocol_errors[:3]}")
    if problems:
        console.print("[bold red]FAILED[/]")
        for line in problems[:20]:
            console.print(f"  - {line}")
        return 1
    console.print("[bold green]OK[/]: every order reached the end it should; approvals sent while held = 0")
    return 0
