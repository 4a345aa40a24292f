"""The disaster drill, measured: the machine and its disk are lost while orders flow;
`local` beside `replicated` durability on the same scenario.

    .venv/bin/python benchmarks/drill.py [--orders 150] [--arrival 40] [--kills 4] [--lose-disk-at 2]
                                         [--quiet 60] [--faults mix|none] [--durability local,replicated]
                                         [--replica file|s3] [--seed 1]

The scenario of benchmarks/restarts.py (a third of the orders never held, the rest
held and decided 1–11 s later, one in ten rejected; every intent handed over by a
connector that retries until it hears 202), with a real `omsd run` (and, with
OMSD_REPLICA, its Litestream: one process group) on a file:// replica (or S3 on moto
with `--replica s3`). `--kills` times, evenly over the arrivals, the whole group is
SIGKILLed (the machine dies); at kill number `--lose-disk-at` the database's folder is
emptied too (the disk is lost) before omsd starts again. After the last arrival omsd
runs undisturbed for `--quiet` s. The feed's visibility timeout is `--visibility` s
(VTEX's is omsd's OMSD_FEED_VISIBILITY_TIMEOUT_S, 240 s): items delivered to a process
that died come back after it, so `--quiet` should be longer.

Reported per run (goal 0 for each in `replicated`): intents acknowledged (202) but
missing from the final journal; approvals not made; approvals applied twice; PUTs for
orders VTEX had already approved (answered EOI009); PUTs while held; feed events never
committed. Also the restore on start: how long from the start after the loss until
omsd answered /healthz, with the database restored.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from latency import fault_mix, no_faults  # beside this script
from restarts import API_TOKEN, CANCELED, omsd_env  # beside this script

from omsd.daemon.tools.demo import free_port
from omsd.sim.orders import SimOrder
from omsd.sim.server import Simulator
from omsd.state.store import Store

S3_KEYS = {"LITESTREAM_ACCESS_KEY_ID": "bench", "LITESTREAM_SECRET_ACCESS_KEY": "bench-secret"}


class Machine:
    """`omsd run` and its Litestream as one process group: lost together."""

    def __init__(self, env: dict[str, str], port: int, db: Path, log: Path) -> None:
        self.env, self.port, self.db, self.log = env, port, db, log
        self.proc: asyncio.subprocess.Process | None = None
        self.rto: list[float] = []  # start after a lost disk → /healthz

    async def start(self) -> float:
        began = time.monotonic()
        with self.log.open("a") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "omsd.daemon", "run", env=self.env, stdout=out, stderr=out, start_new_session=True
            )
        async with aiohttp.ClientSession() as http:
            while time.monotonic() - began < 120:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"omsd exited {self.proc.returncode}; see {self.log}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{self.port}/healthz") as resp:
                        if resp.status == 200:
                            return time.monotonic() - began
                await asyncio.sleep(0.02)
        raise RuntimeError("omsd did not answer /healthz within 120 s")

    async def lose(self, *, disk: bool) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()
        if disk:
            for path in self.db.parent.iterdir():
                if path.name.startswith((self.db.name, f".{self.db.name}")) and not path.name.endswith(".lock"):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.proc.wait(), timeout=60)


@dataclass
class Connector:
    port: int
    acknowledged: set[str] = field(default_factory=set)
    orders: list[SimOrder] = field(default_factory=list)

    async def hand_over(self, http: aiohttp.ClientSession, order: SimOrder) -> None:
        body = {"marketplaceOrderId": order.marketplace_order_id, "orderId": order.order_id}
        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.post(f"http://127.0.0.1:{self.port}/v1/approvals", json=body, headers=headers) as r:
                    if r.status == 202:
                        self.acknowledged.add(order.marketplace_order_id)
                        return
            await asyncio.sleep(0.2)


async def arrive(sim: Simulator, args: argparse.Namespace, connector: Connector) -> None:
    rng = random.Random(args.seed)
    times = sorted(rng.uniform(0, args.arrival) for _ in range(args.orders))
    t0 = time.monotonic()
    handed: list[asyncio.Task[None]] = []
    free: list[SimOrder] = []
    async with aiohttp.ClientSession() as http:
        for n, at in enumerate(times):
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            if n % 3 == 0:
                free.append(sim.create(f"F{n:05d}"))
                connector.orders.append(free[-1])
                continue
            decision = "reject" if rng.random() < 0.1 else "authorize"
            order = sim.create(f"H{n:05d}", held=True, decision=decision, decide_after_s=1 + rng.uniform(0, 10))
            connector.orders.append(order)
            handed.append(asyncio.create_task(connector.hand_over(http, order)))
        while free:  # a free order's intent goes once it waits for the marketplace's approval
            for order in [o for o in free if o.status == o.release_status]:
                free.remove(order)
                handed.append(asyncio.create_task(connector.hand_over(http, order)))
            await asyncio.sleep(0.05)
        await asyncio.gather(*handed)


async def losses(machine: Machine, args: argparse.Namespace) -> None:
    every = args.arrival / (args.kills + 1)
    for n in range(1, args.kills + 1):
        await asyncio.sleep(every)
        disk = n == args.lose_disk_at
        await machine.lose(disk=disk)
        took = await machine.start()
        if disk:
            machine.rto.append(took)


async def intents_in(db: Path) -> set[str]:
    async with await Store.open_readonly(db) as store:
        rows = await store.journal.after(0, limit=10_000_000)
    kinds = ("intent_recorded", "intent_received")
    return {json.loads(r.payload)["marketplace_order_id"] for r in rows if r.kind in kinds}


async def one_run(args: argparse.Namespace, durability: str, endpoint: str | None) -> dict[str, object]:
    faults = fault_mix() if args.faults == "mix" else no_faults()
    sim = Simulator(seed=args.seed, faults=faults, visibility_override_s=args.visibility)
    await sim.start()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="omsd-drill-") as tmp:
        db = Path(tmp) / "state" / "omsd.db"
        db.parent.mkdir()
        env = omsd_env(sim, db, port, "feed")
        if durability == "replicated":
            if endpoint is None:
                env["OMSD_REPLICA"] = f"file://{tmp}/replica"
            else:
                bucket_path = f"drill-{args.seed}-{time.monotonic_ns()}/omsd.db"
                env["OMSD_REPLICA"] = f"s3://omsd-bench/{bucket_path}?endpoint={endpoint}&region=us-east-1"
                env.update(S3_KEYS)
            env["OMSD_DURABILITY"] = "replicated"
        machine = Machine(env, port, db, Path(tmp) / "omsd.log")
        connector = Connector(port)
        try:
            await machine.start()
            while sim.feed_config is None:  # noqa: ASYNC110 - simulator state
                await asyncio.sleep(0.05)
            t0 = time.monotonic()
            await asyncio.gather(arrive(sim, args, connector), losses(machine, args))
            await asyncio.sleep(args.quiet)
            await machine.stop()
            wall = time.monotonic() - t0
            kept = await intents_in(db)
        finally:
            await machine.stop()
            await sim.stop()
    now = sim.runtime.monotonic()
    visible = sum(1 for m in sim.queue.messages.values() if m.visible_at <= now)
    in_flight = len(sim.queue.messages) - visible
    everyone = connector.orders
    approvable = [o for o in everyone if o.status != CANCELED]
    return {
        "run": durability,
        "acknowledged intents lost": len(connector.acknowledged - kept),
        "approvals not made": sum(1 for o in approvable if o.approvals_applied == 0),
        "approvals applied twice": sum(1 for o in everyone if o.approvals_applied > 1),
        "PUTs answered EOI009 (sent again before VTEX showed the approval)": sum(
            1 for n in sim.channel.notifications_sent if n.get("code") == "EOI009"
        ),
        "PUTs while held": sum(o.puts_while_held for o in everyone),
        "feed events never committed (visible / in flight)": f"{len(sim.queue.messages)} ({visible} / {in_flight})",
        "restart after the lost disk → /healthz (s)": [round(x, 2) for x in machine.rto],
        "orders": f"{len(everyone)} ({len(approvable)} approvable)",
        "wall (s)": round(wall, 1),
    }


@contextlib.contextmanager
def s3(kind: str) -> Iterator[str | None]:
    if kind != "s3":
        yield None
        return
    import urllib.request

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    bucket = urllib.request.Request(f"{endpoint}/omsd-bench", method="PUT")  # noqa: S310 - loopback http
    urllib.request.urlopen(bucket, timeout=10).close()  # noqa: S310 - loopback http
    try:
        yield endpoint
    finally:
        server.stop()


async def main(args: argparse.Namespace) -> None:
    results = []
    with s3(args.replica) as endpoint:
        for durability in args.durability.split(","):
            results.append(await one_run(args, durability, endpoint))
            print(json.dumps(results[-1]), flush=True)
    keys = list(results[0])
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in results:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    print(f"\nload average {os.getloadavg()}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--orders", type=int, default=150)
    p.add_argument("--arrival", type=float, default=40.0, help="orders arrive over this many seconds")
    p.add_argument("--kills", type=int, default=4, help="times the machine is lost (SIGKILL to omsd and Litestream)")
    p.add_argument("--lose-disk-at", type=int, default=2, help="at this kill the database's folder is emptied too")
    p.add_argument("--quiet", type=float, default=60.0, help="seconds omsd runs undisturbed after the last arrival")
    p.add_argument("--faults", default="mix", choices=["mix", "none"])
    p.add_argument("--durability", default="local,replicated")
    p.add_argument("--replica", default="file", choices=["file", "s3"])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--visibility",
        type=float,
        default=10.0,
        help="the feed's visibility timeout (s): items delivered to a process that died come back after it",
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
