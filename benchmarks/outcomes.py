"""The outcome stream and its relay: how soon the connector hears, how fast a backlog goes,
and whether anything is lost when omsd and the receiver are killed.

    .venv/bin/python benchmarks/outcomes.py latency [--orders 200] [--seed 1]
    .venv/bin/python benchmarks/outcomes.py backlog [--events 20000]
    .venv/bin/python benchmarks/outcomes.py restarts [--orders 300] [--arrival 60] [--kills 20] [--receiver-kills 5]

`latency`: omsd (hook source, no faults) as its own process, then again (same seed) in
this process with the simulator and the readers; every order is held, then authorized,
with its intent sent; a long-polling reader (`wait=30`) and the
relay's receiver note when each event arrives. For each event that carries VTEX's result
(`vtex.processing_result`, `approval.confirmed`), latency = arrival − `occurred_at` (when
omsd journaled VTEX's notification). Baseline in the same run: a reader that polls every
second without `wait`, as a connector without the long poll would.

`backlog`: 20,000 outcome events (4 per order) already in the database when omsd starts;
a client reads them from `after=0` (`limit=1000`; baseline `limit=100`), and the relay
delivers them to a local receiver (`OMSD_RELAY_CONCURRENCY` 16; baseline 1).

`restarts`: `omsd run` as a real process and deploy/examples/webhook_receiver.py as
another; orders arrive over `--arrival` s with their intents while omsd is SIGKILLed
`--kills` times and the receiver `--receiver-kills` times; then everything runs
undisturbed until the relay has caught up. Reported: events in the stream, events never
received (lost), events received out of order within their order, repeats (the same
webhook-id received again: at least once means some).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from latency import no_faults  # beside this script
from restarts import Omsd, omsd_env  # beside this script

from omsd.daemon.app import Daemon
from omsd.daemon.config.settings import Settings
from omsd.daemon.ops import logs
from omsd.daemon.tools.demo import free_port
from omsd.sim.server import Simulator
from omsd.state.outcomes import outcome
from omsd.state.store import Store
from omsd.state.store.outcomes import write

API_TOKEN = "bench-api-token-0123456789"  # noqa: S105 - the benchmark's own loopback token
SECRET = "whsec_" + base64.b64encode(b"bench-relay-secret-0123456789ab").decode()
EXAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "examples"
FROM_VTEX = ("vtex.processing_result", "approval.confirmed")


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else (values[0] if values else 0.0)


def ms(values: list[float]) -> str:
    return f"p50 {pct(values, 50) * 1000:.1f} ms, p99 {pct(values, 99) * 1000:.1f} ms (n={len(values)})"


class Receiver:
    """A relay receiver in this process: notes when each event arrives."""

    def __init__(self) -> None:
        self.arrived: dict[int, float] = {}  # seq -> wall time of its first arrival
        self.posts = 0

    async def handle(self, request: web.Request) -> web.Response:
        event = json.loads(await request.text())
        self.posts += 1
        self.arrived.setdefault(event["seq"], time.time())
        return web.Response(status=204)

    async def start(self) -> tuple[web.AppRunner, str]:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner, f"http://127.0.0.1:{port}/hook"


def settings(sim: Simulator, db: Path, port: int, relay_url: str, **kw: Any) -> Settings:
    values: dict[str, Any] = {
        "account": sim.account,
        "app_key": sim.app_key,
        "app_token": sim.app_token,
        "vtex_base_url": sim.base_url,
        "db": db,
        "connector_name": "omsd-bench",
        "connector_endpoint": f"http://127.0.0.1:{port}",
        "listen": f"127.0.0.1:{port}",
        "api_token": API_TOKEN,
        "source": "hook",
        "hook_secret": "bench-hook-secret-0123456789",
        "rate_limit_per_s": 200,
        "relay_url": relay_url,
        "relay_secret": SECRET,
        "log_level": "warning",
    }
    values.update(kw)
    return Settings(**values)


async def started(daemon: Daemon, stop: asyncio.Event) -> asyncio.Task[None]:
    task = asyncio.create_task(daemon.run(stop))
    await asyncio.wait_for(daemon.ready.wait(), timeout=30)
    return task


async def read_all(url: str, after: int, *, limit: int, wait: float, until: int, arrived: dict[int, float]) -> int:
    """Read /v1/events from `after` until seq `until`, noting each event's arrival. Returns requests made."""
    requests = 0
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_TOKEN}"}) as http:
        while after < until:
            params = {"after": str(after), "limit": str(limit), "wait": str(wait)}
            async with http.get(f"{url}/v1/events", params=params) as resp:
                body = await resp.json()
            requests += 1
            now = time.time()
            for e in body["events"]:
                arrived.setdefault(e["seq"], now)
            after = body["next"]
    return requests


async def blind_poller(url: str, stop: asyncio.Event, arrived: dict[int, float]) -> None:
    """The baseline: ask every second, without waiting."""
    after = 0
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_TOKEN}"}) as http:
        while not stop.is_set():
            async with http.get(f"{url}/v1/events", params={"after": str(after), "limit": "1000"}) as resp:
                body = await resp.json()
            now = time.time()
            for e in body["events"]:
                arrived.setdefault(e["seq"], now)
            after = body["next"]
            await asyncio.sleep(1.0)


async def long_poller(
    url: str, stop: asyncio.Event, arrived: dict[int, float], seen: dict[int, dict[str, Any]]
) -> None:
    after = 0
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_TOKEN}"}) as http:
        while not stop.is_set():
            params = {"after": str(after), "limit": "1000", "wait": "30"}
            async with http.get(f"{url}/v1/events", params=params) as resp:
                body = await resp.json()
            now = time.time()
            for e in body["events"]:
                arrived.setdefault(e["seq"], now)
                seen.setdefault(e["seq"], e)
            after = body["next"]


async def latency(args: argparse.Namespace) -> None:
    """The same orders (same seed) twice: omsd as its own process (as it runs beside a
    connector), and omsd in this process, sharing one event loop with the simulator, the
    readers and the receiver (what the other benchmarks do)."""
    logs.configure("warning", "json")
    print(
        f"{args.orders} orders, hook source, no faults; VTEX's result = the events carrying it ({', '.join(FROM_VTEX)})"
    )
    for separate in (True, False):
        await one_latency(args, separate)


async def one_latency(args: argparse.Namespace, separate: bool) -> None:
    sim = Simulator(seed=args.seed, faults=no_faults())
    await sim.start()
    receiver = Receiver()
    runner, relay_url = await receiver.start()
    port = free_port()
    long_polled: dict[int, float] = {}
    polled: dict[int, float] = {}
    events: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "omsd.db"
        daemon: Daemon | None = None
        process: Omsd | None = None
        stop, readers_stop = asyncio.Event(), asyncio.Event()
        if separate:
            env = omsd_env(sim, db, port, "hook")
            env.update({"OMSD_RELAY_URL": relay_url, "OMSD_RELAY_SECRET": SECRET, "OMSD_RATE_LIMIT_PER_S": "200"})
            process = Omsd(env, port, Path(tmp) / "omsd.log")
            await process.start()
            url = f"http://127.0.0.1:{port}"
        else:
            daemon = Daemon(settings(sim, db, port, relay_url))
            task = await started(daemon, stop)
            url = daemon.url
        readers = [
            asyncio.create_task(long_poller(url, readers_stop, long_polled, events)),
            asyncio.create_task(blind_poller(url, readers_stop, polled)),
        ]
        rng = random.Random(args.seed)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_TOKEN}"}) as http:
            for n in range(args.orders):
                order = sim.create(f"L{n:05d}", held=True, decision="authorize", decide_after_s=rng.uniform(0.2, 2))
                body = {"marketplaceOrderId": order.marketplace_order_id, "orderId": order.order_id}
                async with http.post(f"{url}/v1/approvals", json=body) as resp:
                    assert resp.status == 202, await resp.text()
                await asyncio.sleep(rng.uniform(0, 0.05))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if sum(e["type"] == "approval.confirmed" for e in events.values()) == args.orders:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(2.5)  # the blind poller's next round, the relay's last deliveries
        readers_stop.set()
        for r in readers:
            r.cancel()
        if process is not None:
            await process.stop(signal.SIGTERM)
        else:
            stop.set()
            await asyncio.wait_for(task, timeout=30)
    await runner.cleanup()
    await sim.stop()
    carrying = [e for e in events.values() if e["type"] in FROM_VTEX]

    def lag(seen: dict[int, float]) -> list[float]:
        return [
            seen[e["seq"]] - datetime.fromisoformat(e["occurred_at"]).timestamp() for e in carrying if e["seq"] in seen
        ]

    where = "omsd as its own process" if separate else "omsd in the benchmark's process (one event loop for all)"
    print(f"{where}: {len(carrying)} events carrying VTEX's result")
    print(f"  VTEX's result -> long-polling reader (wait=30): {ms(lag(long_polled))}")
    print(f"  VTEX's result -> relay receiver:                {ms(lag(receiver.arrived))}")
    print(f"  baseline, a reader polling every second:        {ms(lag(polled))}")


async def backlog(args: argparse.Namespace) -> None:
    logs.configure("warning", "json")
    sim = Simulator(seed=1, faults=no_faults())
    await sim.start()
    receiver = Receiver()
    runner, relay_url = await receiver.start()
    results: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for concurrency, limit in ((16, 1000), (1, 100)):
            db = Path(tmp) / f"backlog-{concurrency}.db"
            async with await Store.open(db) as store:
                await store.outcomes.endpoint("webhook")  # the relay starts at seq 0: it owes the whole backlog
                t0 = datetime.now(UTC)
                facts = [
                    outcome(kind, n, t0 + timedelta(microseconds=n), f"MKP-{n // 4}-01", str(n // 4), n=n)
                    for n, kind in zip(
                        range(1, args.events + 1),
                        ("intent.accepted", "approval.sent", "vtex.processing_result", "approval.confirmed")
                        * (args.events // 4 + 1),
                        strict=False,
                    )
                ]
                async with store.db.tx() as conn:
                    await write(conn, facts)
            receiver.arrived.clear()
            port = free_port()
            daemon = Daemon(settings(sim, db, port, relay_url, relay_concurrency=concurrency))
            stop = asyncio.Event()
            t_push = time.monotonic()
            task = await started(daemon, stop)
            t_pull = time.monotonic()
            pulled: dict[int, float] = {}
            requests = await read_all(daemon.url, 0, limit=limit, wait=0, until=args.events, arrived=pulled)
            pull_s = time.monotonic() - t_pull
            while len(receiver.arrived) < args.events:  # noqa: ASYNC110 - polling the receiver's count
                await asyncio.sleep(0.05)
            push_s = time.monotonic() - t_push
            stop.set()
            await asyncio.wait_for(task, timeout=60)
            results.append(
                f"  limit={limit:>4}, relay concurrency {concurrency:>2}: pull {args.events / pull_s:,.0f} events/s "
                f"({requests} requests); push {args.events / push_s:,.0f} events/s (from start-up)"
            )
    await runner.cleanup()
    await sim.stop()
    print(f"backlog of {args.events:,} outcome events over {args.events // 4:,} orders:")
    print("\n".join(results))


async def restarts(args: argparse.Namespace) -> None:
    sim = Simulator(seed=args.seed, faults=no_faults())
    await sim.start()
    rport, port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "omsd.db"
        env = omsd_env(sim, db, port, "hook")
        env.update({"OMSD_RELAY_URL": f"http://127.0.0.1:{rport}/omsd/events", "OMSD_RELAY_SECRET": SECRET})
        omsd = Omsd(env, port, Path(tmp) / "omsd.log")
        lines: list[str] = []
        receiver: asyncio.subprocess.Process | None = None
        readers: list[asyncio.Task[None]] = []

        async def start_receiver() -> None:
            nonlocal receiver
            receiver = await asyncio.create_subprocess_exec(
                sys.executable, str(EXAMPLES / "webhook_receiver.py"), "--listen", f"127.0.0.1:{rport}",
                env={**os.environ, "RELAY_SECRET": SECRET}, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip

            async def read(proc: asyncio.subprocess.Process) -> None:
                assert proc.stdout is not None
                while line := await proc.stdout.readline():
                    lines.append(line.decode().strip())

            readers.append(asyncio.create_task(read(receiver)))

        await start_receiver()
        await omsd.start()
        rng = random.Random(args.seed)
        t0 = time.monotonic()

        async def arrive() -> int:
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_TOKEN}"}) as http:
                for n in range(args.orders):
                    await asyncio.sleep(args.arrival / args.orders)
                    held = rng.random() < 0.7
                    decision = "reject" if rng.random() < 0.1 else "authorize"
                    order = sim.create(f"K{n:05d}", held=held, decision=decision, decide_after_s=rng.uniform(0.5, 5))
                    body = {"marketplaceOrderId": order.marketplace_order_id, "orderId": order.order_id}
                    while True:
                        try:
                            async with http.post(f"http://127.0.0.1:{port}/v1/approvals", json=body) as resp:
                                if resp.status < 300:
                                    break
                        except aiohttp.ClientError:
                            pass
                        await asyncio.sleep(0.2)
            return int(args.orders)

        async def kill_omsd() -> int:
            for _ in range(args.kills):
                await asyncio.sleep(args.arrival / (args.kills + 1))
                await omsd.stop(signal.SIGKILL)
                await omsd.start()
            return int(args.kills)

        async def kill_receiver() -> int:
            for _ in range(args.receiver_kills):
                await asyncio.sleep(args.arrival / (args.receiver_kills + 1))
                assert receiver is not None
                receiver.send_signal(signal.SIGKILL)
                await receiver.wait()
                await asyncio.sleep(rng.uniform(0.5, 3))  # down a while: the relay retries
                await start_receiver()
            return int(args.receiver_kills)

        await asyncio.gather(arrive(), kill_omsd(), kill_receiver())
        async with await Store.open_readonly(db) as store:
            closing = time.monotonic() + args.quiet
            while time.monotonic() < closing:
                stream = await store.outcomes.after(0, 1_000_000)
                if {e.seq for e in stream} <= {int(line.split()[0]) for line in lines}:
                    break
                await asyncio.sleep(1)
        await omsd.stop(signal.SIGTERM)
        assert receiver is not None
        receiver.send_signal(signal.SIGTERM)
        await receiver.wait()
        for r in readers:
            await r
    await sim.stop()
    received = [int(line.split()[0]) for line in lines]
    by_subject: dict[str, list[int]] = defaultdict(list)
    subject = {e.seq: e.order_id or e.marketplace_order_id or "-" for e in stream}
    first: set[int] = set()
    for seq in received:
        if seq not in first:
            first.add(seq)
            by_subject[subject.get(seq, "-")].append(seq)
    out_of_order = sum(1 for seqs in by_subject.values() for a, b in itertools.pairwise(seqs) if b < a)
    lost = {e.seq for e in stream} - first
    print(
        f"{args.orders} orders over {args.arrival:.0f} s; omsd SIGKILLed {args.kills} times, the receiver "
        f"{args.receiver_kills} times; wall {time.monotonic() - t0:.0f} s"
    )
    print(f"  events in the stream: {len(stream)}; received: {len(first)}; lost: {len(lost)}")
    print(
        f"  out of order within an order: {out_of_order}; repeats (same webhook-id again): {len(received) - len(first)}"
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    lat = sub.add_parser("latency")
    lat.add_argument("--orders", type=int, default=200)
    lat.add_argument("--seed", type=int, default=1)
    back = sub.add_parser("backlog")
    back.add_argument("--events", type=int, default=20_000)
    res = sub.add_parser("restarts")
    res.add_argument("--orders", type=int, default=300)
    res.add_argument("--arrival", type=float, default=60.0)
    res.add_argument("--kills", type=int, default=20)
    res.add_argument("--receiver-kills", type=int, default=5)
    res.add_argument("--quiet", type=float, default=180.0, help="at most this long for the relay to catch up")
    res.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    print(
        f"Python {sys.version.split()[0]} on {os.uname().machine}, {os.cpu_count()} cores; {datetime.now(UTC):%Y-%m-%d}"
    )
    asyncio.run({"latency": latency, "backlog": backlog, "restarts": restarts}[arguments.what](arguments))
    print(f"load average {os.getloadavg()}")
