"""Orders keep arriving while `omsd run` is restarted again and again: is anything lost?

    .venv/bin/python benchmarks/restarts.py [--orders 500] [--arrival 70] [--restarts 20] [--quiet 90]
                                            [--source feed] [--faults mix|none|issue16] [--seed 1]
                                            [--account-limit 0] [--kill-only] [--baseline]

The simulator runs in this process; omsd is a real `omsd run` process with the
Settings' defaults (feed polled every 5 s, 50 requests/s, visibility timeout
240 s) on one database. `--orders` orders arrive at random times over
`--arrival` s: a third never held (their intent goes once they wait for the
marketplace's approval), the rest created held and decided by the simulated
seller 1–11 s later, one in ten of those rejected (canceled); every held order
gets its intent at once. Meanwhile omsd is restarted `--restarts` times at even
intervals, alternately stopped with SIGTERM and killed with SIGKILL (only
SIGKILL with `--kill-only`). After the last arrival omsd runs undisturbed for
`--quiet` s.

`--account-limit N` holds the whole simulated account to N requests in any second
(sim/faults.py; beyond, 429 with Retry-After), below omsd's configured 50/s. The
profile of issue #16 (an account that admits 15/s, 2 % random 429 with
`Retry-After: 2`, 2 % 5xx, 0.5 % dropped connections, 500 orders in 64 s, 20
SIGKILLs) is

    .venv/bin/python benchmarks/restarts.py --faults issue16 --account-limit 15 --orders 500 \
        --arrival 64 --restarts 20 --kill-only --baseline

`--baseline` first runs the same orders (same seed) without restarts, and prints
both side by side: what the restarts cost. `--keep DIR` keeps each run's database
and omsd's log, and a `trace.json` (the simulator's books); `benchmarks/budget_trace.py
DIR/20-restarts` then says where the budget and the time went. A shorter variant at
the same intensity (orders a second, seconds between restarts) for iteration:

    .venv/bin/python benchmarks/restarts.py --faults issue16 --account-limit 15 --orders 200 \
        --arrival 26 --restarts 8 --kill-only --quiet 60 --baseline

Reported, from the simulator's books: feed events still in the queue (visible,
i.e. never read or given back, and in flight, i.e. delivered to a process that
was killed before journaling them: VTEX gives those back after the visibility
timeout); approvals not made for orders that were approvable; approvals sent
while held, for canceled orders, or applied twice (all must be 0); the requests
that reached the simulator per second from the first arrival to the last
approval PUT, against the account's limit (the share of the admitted rate used
while work waits); 429s, from the account's limit and at random, as shares of
the requests; release → PUT for held orders and intent → PUT for the others
(p50 / p99 / max); reads of the feed configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from latency import fault_mix, no_faults, pct, release_time  # beside this script

from omsd.daemon.tools.demo import free_port
from omsd.sim.faults import Faults
from omsd.sim.orders import SimOrder
from omsd.sim.server import Simulator

API_TOKEN = "bench-api-token-0123456789"  # noqa: S105 - the benchmark's own loopback token
CANCELED = "canceled"
PUT_ROUTE = "/api/order-integration/orders/status"
FEED_CONFIG_ROUTE = "/api/orders/feed/config"


def issue16() -> Faults:
    """Issue #16's account: 2 % random 429 (Retry-After: 2), 2 % 5xx, 0.5 % dropped connections,
    50 ms per call (the account's own limit is `--account-limit`). The issue lists no short
    batches (its fake VTEX gave 9.8 items per feed GET in a backlog): a backlog comes back in
    full batches (`--short-batches` for the simulator's usual 40 % full, 20 % empty)."""
    return Faults(
        latency_s=(0.05, 0.05), rate_429=0.02, retry_after_s=2.0, rate_5xx=0.02, rate_drop=0.005, short_batches=False
    )


FAULTS = {"mix": fault_mix, "none": no_faults, "issue16": issue16}


def omsd_env(sim: Simulator, db: Path, port: int, source: str, extra: list[str] | None = None) -> dict[str, str]:
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
    for setting in extra or []:
        name, _, value = setting.partition("=")
        env[name] = value
    return env


class Omsd:
    """One `omsd run` process at a time on the same database and port."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env, self.port, self.log = env, port, log
        self.proc: asyncio.subprocess.Process | None = None
        self.unclean: list[int] = []  # exit codes of SIGTERM stops that were not 0
        self.lives: list[list[float]] = []  # [started, answered /healthz, stopped] per process (monotonic)

    async def start(self) -> None:
        self.lives.append([time.monotonic()])
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
                            self.lives[-1].append(time.monotonic())
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError("omsd did not answer /healthz within 60 s")

    async def stop(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), timeout=60)
        self.lives[-1].append(time.monotonic())
        if sig == signal.SIGTERM and code != 0:
            self.unclean.append(code)


@dataclass
class Orders:
    held: list[SimOrder]
    free: list[SimOrder]
    intent_at: dict[str, float]  # order id -> when its intent was first sent (monotonic)


async def post_intent(
    http: aiohttp.ClientSession, port: int, order: SimOrder, into: Orders | None = None, *, by_mkt: bool = False
) -> None:
    """Send the intent (both ids, or only the marketplace's), retrying while omsd is down (a
    connector would)."""
    body = {"marketplaceOrderId": order.marketplace_order_id}
    if not by_mkt:
        body["orderId"] = order.order_id
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    if into is not None:
        into.intent_at.setdefault(order.order_id, time.monotonic())
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
    pending: list[SimOrder] = []
    arrived = asyncio.Event()

    async def free_intents() -> None:
        """A free order's intent goes once it waits for the marketplace's approval (while orders
        still arrive: before, these intents all waited for the last arrival)."""
        while pending or not arrived.is_set():
            for order in [o for o in pending if o.status == o.release_status]:
                pending.remove(order)
                intents.append(asyncio.create_task(post_intent(http, port, order, into)))
            await asyncio.sleep(0.05)

    async with aiohttp.ClientSession() as http:
        watcher = asyncio.create_task(free_intents())
        for n, at in enumerate(times):
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            if n % 3 == 0:
                into.free.append(sim.create(f"F{n:05d}"))
                pending.append(into.free[-1])
                continue
            decision = "reject" if rng.random() < 0.1 else "authorize"
            order = sim.create(f"H{n:05d}", held=True, decision=decision, decide_after_s=1 + rng.uniform(0, 10))
            into.held.append(order)
            intents.append(asyncio.create_task(post_intent(http, port, order, into)))
        arrived.set()
        await watcher
        await asyncio.gather(*intents)


async def restart_loop(omsd: Omsd, args: argparse.Namespace) -> int:
    every = args.arrival / (args.restarts + 1)
    done = 0
    for n in range(args.restarts):
        await asyncio.sleep(every)
        await omsd.stop(signal.SIGKILL if n % 2 or args.kill_only else signal.SIGTERM)
        await omsd.start()
        done += 1
    return done


@dataclass
class Run:
    name: str
    lines: list[str]


RATE_GAUGE = "omsd_vtex_rate_limit_effective_per_second"


async def sample_rate(port: int, into: list[tuple[float, float]], stop: asyncio.Event) -> None:
    """omsd's effective rate, scraped from /metrics once a second (while omsd answers)."""
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            try:
                async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    for line in (await resp.text()).splitlines():
                        if line.startswith(RATE_GAUGE + " "):
                            into.append((time.monotonic(), float(line.split()[1])))
            except (aiohttp.ClientError, ValueError):
                pass
            await asyncio.sleep(1.0)


def report(
    name: str,
    sim: Simulator,
    orders: Orders,
    restarts: int,
    omsd: Omsd,
    seconds: float,
    t0: float,
    limit: float,
    rates: list[tuple[float, float]],
) -> Run:
    now = sim.runtime.monotonic()
    messages = list(sim.queue.messages.values())
    visible = sum(1 for m in messages if m.visible_at <= now)
    everyone = orders.held + orders.free
    canceled = [o for o in everyone if o.status == CANCELED]
    approvable = [o for o in everyone if o.status != CANCELED]
    puts = [t for t, route in sim.arrivals if route == PUT_ROUTE and t >= t0]
    end = max(puts) if puts else now
    requests = [t for t, _ in sim.arrivals if t0 <= t <= end]
    span = max(end - t0, 1e-9)
    per_s = len(requests) / span
    total = max(1, len(sim.arrivals))
    random_429 = sim.rate_limited - sim.account_limited
    released = [
        (o.put_at[0] - r).total_seconds()
        for o in orders.held
        if o.put_at and (r := release_time(o)) is not None and o.put_at[0] >= r
    ]
    wall_offset = time.time() - time.monotonic()  # put_at is wall time, intents monotonic
    intent_put = [
        o.put_at[0].timestamp() - (orders.intent_at[o.order_id] + wall_offset)
        for o in orders.free
        if o.put_at and o.order_id in orders.intent_at
    ]
    used = f" = {per_s / limit:.0%} of the {limit:g}/s admitted" if limit else ""
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
        f"requests from the first order to the last PUT: {len(requests)} in {span:.1f} s, {per_s:.1f}/s{used}",
        f"429s: {sim.rate_limited} of {total} requests ({sim.rate_limited / total:.1%}); from the account's limit: "
        f"{sim.account_limited} ({sim.account_limited / total:.1%}); random: {random_429} ({random_429 / total:.1%})",
        f"release -> PUT (held): p50 {pct(released, 0.5)} / p99 {pct(released, 0.99)} / max {pct(released, 1.0)} "
        f"ms over {len(released)}; intent -> PUT (never held): p50 {pct(intent_put, 0.5)} / p99 "
        f"{pct(intent_put, 0.99)} ms over {len(intent_put)}",
        f"feed configuration reads: {sum(1 for _, route in sim.arrivals if route == FEED_CONFIG_ROUTE)}",
        "omsd's effective rate (/s), per 10 s from the first order: "
        + " ".join(
            f"{max(r for t, r in rates if t0 + k <= t < t0 + k + 10):.1f}"
            for k in range(0, int(span), 10)
            if any(t0 + k <= t < t0 + k + 10 for t, _ in rates)
        ),
        f"calls: {dict(sim.calls)}",
    ]
    return Run(name, lines)


def record_429s(sim: Simulator) -> list[tuple[float, str, bool]]:
    """(monotonic time, route, from the account's limit) of every 429 the simulator answers."""
    injector = sim.injector
    answer = injector.too_many_requests
    limited: list[tuple[float, str, bool]] = []

    def recorded(route: str = "", retry_after_s: float | None = None) -> web.Response:
        limited.append((time.monotonic(), route, retry_after_s is not None))
        return answer(route, retry_after_s)

    injector.too_many_requests = recorded  # type: ignore[method-assign]
    return limited


def write_trace(
    path: Path,
    sim: Simulator,
    orders: Orders,
    omsd: Omsd,
    t0: float,
    rates: list[tuple[float, float]],
    limited: list[tuple[float, str, bool]],
) -> None:
    """What `benchmarks/budget_trace.py` reads beside omsd's database (`--keep`): the requests
    as they reached the simulator, its 429s, omsd's lives, its rate, and every order's books.
    Times are monotonic, the orders' own wall-clock (`wall_offset` converts)."""
    trace = {
        "t0": t0,
        "wall_offset": time.time() - time.monotonic(),
        "arrivals": sim.arrivals,
        "limited": limited,
        "lives": omsd.lives,
        "rates": rates,
        "orders": {
            o.order_id: {
                "held": o.was_held,
                "history": o.history,
                "put_at": [p.timestamp() for p in o.put_at],
                "intent_at": orders.intent_at.get(o.order_id),
                "approvals_applied": o.approvals_applied,
            }
            for o in orders.held + orders.free
        },
    }
    path.write_text(json.dumps(trace))


async def one_run(args: argparse.Namespace, restarts_wanted: int, name: str) -> Run:
    faults = FAULTS[args.faults]()
    faults.account_limit_per_s = args.account_limit
    faults.short_batches = faults.short_batches or args.short_batches
    sim = Simulator(seed=args.seed, faults=faults)
    limited = record_429s(sim)
    await sim.start()
    port = free_port()
    run_args = argparse.Namespace(**{**vars(args), "restarts": restarts_wanted})
    with tempfile.TemporaryDirectory() as tmp:
        env = omsd_env(sim, Path(tmp) / "omsd.db", port, args.source, args.setting)
        omsd = Omsd(env, port, Path(tmp) / "omsd.log")
        await omsd.start()
        while (sim.feed_config if args.source != "hook" else sim.hook_config) is None:  # noqa: ASYNC110 - sim state
            await asyncio.sleep(0.05)  # omsd creates its configuration at start-up
        t0 = time.monotonic()
        orders = Orders([], [], {})
        rates: list[tuple[float, float]] = []
        sampled = asyncio.Event()
        sampler = asyncio.create_task(sample_rate(port, rates, sampled))
        try:
            _, restarts = await asyncio.gather(arrive(sim, run_args, port, orders), restart_loop(omsd, run_args))
            await asyncio.sleep(args.quiet)
            sampled.set()
            await sampler
            if args.keep:
                write_trace(Path(tmp) / "trace.json", sim, orders, omsd, t0, rates, limited)
            return report(name, sim, orders, restarts, omsd, time.monotonic() - t0, t0, args.account_limit, rates)
        finally:
            sampled.set()
            if omsd.proc is not None and omsd.proc.returncode is None:
                await omsd.stop(signal.SIGTERM)
            await sim.stop()
            if args.keep:
                shutil.copytree(tmp, Path(args.keep) / name.replace(" ", "-"), dirs_exist_ok=True)


async def main(args: argparse.Namespace) -> None:
    runs = []
    if args.baseline:
        runs.append(await one_run(args, 0, "no restarts (baseline)"))
        print("\n".join([f"== {runs[-1].name}", *runs[-1].lines]), flush=True)
    runs.append(await one_run(args, args.restarts, f"{args.restarts} restarts"))
    print("\n".join([f"== {runs[-1].name}", *runs[-1].lines]), flush=True)
    print(f"load average {os.getloadavg()}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--orders", type=int, default=500)
    p.add_argument("--arrival", type=float, default=70.0, help="orders arrive over this many seconds")
    p.add_argument("--restarts", type=int, default=20)
    p.add_argument("--quiet", type=float, default=90.0, help="seconds omsd runs undisturbed after the last arrival")
    p.add_argument("--source", default="feed", choices=["feed", "hook", "both"])
    p.add_argument("--faults", default="mix", choices=sorted(FAULTS))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--account-limit", type=float, default=0.0, help="requests/s the whole account admits (0: none)")
    p.add_argument("--kill-only", action="store_true", help="every restart a SIGKILL")
    p.add_argument("--short-batches", action="store_true", help="the feed answers short and empty batches too")
    p.add_argument("--baseline", action="store_true", help="first the same run without restarts")
    p.add_argument("--setting", action="append", default=[], help="OMSD_NAME=VALUE for omsd (repeatable)")
    p.add_argument("--keep", help="copy each run's database and omsd's log into this folder")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
