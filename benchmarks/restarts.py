"""Orders keep arriving while `omsd run` is restarted again and again: is anything lost?

    .venv/bin/python benchmarks/restarts.py [--orders 500] [--arrival 70] [--restarts 20] [--quiet 90]
                                            [--source feed] [--faults mix|none] [--seed 1]

The simulator runs in this process; omsd is a real `omsd run` process with the
Settings' defaults (feed polled every 5 s, 50 requests/s, visibility timeout
240 s) on one database. `--orders` orders arrive at random times over
`--arrival` s: a third never held (their intent goes once they wait for the
marketplace's approval), the rest created held and decided by the simulated
seller 1–11 s later, one in ten of those rejected (canceled); every held order
gets its intent at once. Meanwhile omsd is restarted `--restarts` times at even
intervals, alternately stopped with SIGTERM and killed with SIGKILL. After the
last arrival omsd runs undisturbed for `--quiet` s.

Reported, from the simulator's books: feed events still in the queue (visible,
i.e. never read or given back, and in flight, i.e. delivered to a process that
was killed before journaling them: VTEX gives those back after the visibility
timeout); approvals not made for orders that were approvable; approvals sent
while held, for canceled orders, or applied twice (all must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from latency import fault_mix, no_faults  # beside this script

from omsd.daemon.tools.demo import free_port
from omsd.sim.orders import SimOrder
from omsd.sim.server import Simulator

API_TOKEN = "bench-api-token-0123456789"  # noqa: S105 - the benchmark's own loopback token
CANCELED = "canceled"


def omsd_env(sim: Simulator, db: Path, port: int, source: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMSD_")}
    env.update(
        {
            "OMSD_ACCOUNT": sim.account,
            "OMSD_APP_KEY": sim.app_key,
            "OMSD_APP_TOKEN": sim.app_token,
            "OMSD_VTEX_BASE_URL": sim.base_url,
            "OMSD_DB": str(db),
            "OMSD_CONNECTOR_NAME": "omsd-bench",
            "OMSD_CONNECTOR_ENDPOINT": f"http://127.0.0.1:{port}",
            "OMSD_LISTEN": f"127.0.0.1:{port}",
            "OMSD_API_TOKEN": API_TOKEN,
            "OMSD_SOURCE": source,
            "OMSD_LOG_LEVEL": "warning",
            "OMSD_LOG_FORMAT": "json",
        }
    )
    if source != "feed":
        env["OMSD_HOOK_SECRET"] = "bench-hook-secret-0123456789"  # noqa: S105
    return env


class Omsd:
    """One `omsd run` process at a time on the same database and port."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env, self.port, self.log = env, port, log
        self.proc: asyncio.subprocess.Process | None = None
        self.unclean: list[int] = []  # exit codes of SIGTERM stops that were not 0

    async def start(self) -> None:
        with self.log.open("a") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "omsd.daemon", "run", env=self.env, stdout=out, stderr=out
            )
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"omsd exited {self.proc.returncode}; see {self.log}")
                try:
                    async with http.get(f"http://127.0.0.1:{self.port}/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError("omsd did not answer /healthz within 60 s")

    async def stop(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), timeout=60)
        if sig == signal.SIGTERM and code != 0:
            self.unclean.append(code)


@dataclass
class Orders:
    held: list[SimOrder]
    free: list[SimOrder]


async def post_intent(http: aiohttp.ClientSession, port: int, order: SimOrder) -> None:
    """Send the intent, retrying while omsd is down (a connector would)."""
    body = {"marketplaceOrderId": order.marketplace_order_id, "orderId": order.order_id}
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    while True:
        try:
            async with http.post(f"http://127.0.0.1:{port}/v1/approvals", json=body, headers=headers) as resp:
                if resp.status < 300:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)


async def arrive(sim: Simulator, args: argparse.Namespace, port: int, into: Orders) -> None:
    rng = random.Random(args.seed)
    times = sorted(rng.uniform(0, args.arrival) for _ in range(args.orders))
    t0 = time.monotonic()
    intents: list[asyncio.Task[None]] = []
    async with aiohttp.ClientSession() as http:
        for n, at in enumerate(times):
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            if n % 3 == 0:
                into.free.append(sim.create(f"F{n:05d}"))
                continue
            decision = "reject" if rng.random() < 0.1 else "authorize"
            order = sim.create(f"H{n:05d}", held=True, decision=decision, decide_after_s=1 + rng.uniform(0, 10))
            into.held.append(order)
            intents.append(asyncio.create_task(post_intent(http, port, order)))
        pending = list(into.free)
        while pending:  # a free order's intent goes once it waits for the marketplace's approval
            for order in [o for o in pending if o.status == o.release_status]:
                pending.remove(order)
                intents.append(asyncio.create_task(post_intent(http, port, order)))
            await asyncio.sleep(0.05)
        await asyncio.gather(*intents)


async def restart_loop(omsd: Omsd, args: argparse.Namespace) -> int:
    every = args.arrival / (args.restarts + 1)
    done = 0
    for n in range(args.restarts):
        await asyncio.sleep(every)
        await omsd.stop(signal.SIGKILL if n % 2 else signal.SIGTERM)
        await omsd.start()
        done += 1
    return done


def report(sim: Simulator, orders: Orders, restarts: int, omsd: Omsd, seconds: float) -> str:
    now = sim.runtime.monotonic()
    messages = list(sim.queue.messages.values())
    visible = sum(1 for m in messages if m.visible_at <= now)
    everyone = orders.held + orders.free
    canceled = [o for o in everyone if o.status == CANCELED]
    approvable = [o for o in everyone if o.status != CANCELED]
    lines = [
        f"orders: {len(everyone)} ({len(orders.free)} never held, {len(orders.held)} held, {len(canceled)} canceled)",
        f"restarts: {restarts} (SIGTERM stops with a non-zero exit: {omsd.unclean or 'none'}); wall {seconds:.0f} s",
        f"feed events produced: {sim.queue.deleted + len(messages) + sim.queue.expired}; "
        f"committed: {sim.queue.deleted}; "
        f"still in the queue: {len(messages)} ({visible} visible, {len(messages) - visible} in flight); "
        f"expired: {sim.queue.expired}",
        f"approvals not made: {sum(1 for o in approvable if o.approvals_applied == 0)} of {len(approvable)}",
        f"approvals sent while held: {sum(o.puts_while_held for o in everyone)}; PUTs for canceled orders: "
        f"{sum(o.puts for o in canceled)}; applied twice: {sum(1 for o in everyone if o.approvals_applied > 1)}",
        f"calls: {dict(sim.calls)}; 429s: {sim.rate_limited}",
    ]
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    sim = Simulator(seed=args.seed, faults=fault_mix() if args.faults == "mix" else no_faults())
    await sim.start()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        omsd = Omsd(omsd_env(sim, Path(tmp) / "omsd.db", port, args.source), port, Path(tmp) / "omsd.log")
        await omsd.start()
        while (sim.feed_config if args.source != "hook" else sim.hook_config) is None:  # noqa: ASYNC110 - sim state
            await asyncio.sleep(0.05)  # omsd creates its configuration at start-up
        t0 = time.monotonic()
        orders = Orders([], [])
        try:
            _, restarts = await asyncio.gather(arrive(sim, args, port, orders), restart_loop(omsd, args))
            await asyncio.sleep(args.quiet)
            print(report(sim, orders, restarts, omsd, time.monotonic() - t0))
        finally:
            if omsd.proc is not None and omsd.proc.returncode is None:
                await omsd.stop(signal.SIGTERM)
            await sim.stop()
    print(f"load average {os.getloadavg()}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--orders", type=int, default=500)
    p.add_argument("--arrival", type=float, default=70.0, help="orders arrive over this many seconds")
    p.add_argument("--restarts", type=int, default=20)
    p.add_argument("--quiet", type=float, default=90.0, help="seconds omsd runs undisturbed after the last arrival")
    p.add_argument("--source", default="feed", choices=["feed", "hook", "both"])
    p.add_argument("--faults", default="mix", choices=["mix", "none"])
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
