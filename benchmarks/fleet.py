"""One process, many accounts: idle cost, start-up and SIGHUP reload, fairness.

    .venv/bin/python benchmarks/fleet.py idle [--accounts 1,10,100,1000] [--modes hook,feed]
                                              [--feed-max 100] [--settle 20] [--window 60]
    .venv/bin/python benchmarks/fleet.py reload [--accounts 1000]
    .venv/bin/python benchmarks/fleet.py fairness [--events 20000] [--orders 40]

`omsd run` runs as a subprocess (its own CPU and memory, read from /proc) against a
`SimFleet` in this process, from an accounts directory of N `NAME.env` files (default
settings but the simulator's base URL; hook mode: `OMSD_SOURCE=hook`).

- **idle**: for each N and mode, the time from the start to /readyz 200 (every account had
  its first start), then after `--settle` seconds the CPU it used over `--window` seconds (%
  of one core, from utime+stime) and its RSS (VmRSS, and VmHWM); twice: `new` creates the N
  databases (their migrations leave more memory behind), `again` is a restart on them. The baseline, in the same
  run: one account configured as before the fleet (`OMSD_ACCOUNT` in the environment). Feed
  mode stops at `--feed-max` accounts: each account's feed costs 1 + OMSD_FEED_EMPTY_RECHECKS
  GETs per OMSD_POLL_INTERVAL_S against VTEX (its own budget: VTEX's limits are per account),
  and the simulator in this process would be the bottleneck beyond; the per-account CPU it
  prints is what scales.
- **reload**: N accounts running; one file changed and one added, then SIGHUP: the time
  until the fleet logged `fleet_reloaded` (the log line's own timestamp), and until the added
  and the changed account answered /readyz?account=NAME 200.
- **fairness**: two accounts, `quiet` (hook) and `busy` (feed). The quiet account's release
  → approval PUT latency (both times taken at the simulator: the status change to the
  release, the PUT's arrival) over `--orders` orders, first with `busy` idle, then while
  `busy` drains a backlog of `--events` feed events; p50/p99 of each, and how much of the
  backlog was still undrained when the last quiet order was approved.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from omsd.daemon.tools.demo import free_port
from omsd.sim.fleet import SimFleet
from omsd.sim.server import Simulator

sys.path.insert(0, str(Path(__file__).parent))
from backlog import load_backlog  # a sampled backlog in the simulator's feed queue (see backlog.py)

API_TOKEN = "bench-api-token-0123456789"  # noqa: S105 - a benchmark's own token
HOOK_SECRET = "bench-hook-secret-0123456789"  # noqa: S105
CLK_TCK = os.sysconf("SC_CLK_TCK")


async def wait_until(condition: Callable[[], object], every_s: float) -> None:
    """Look every `every_s` until `condition()` is truthy (a benchmark's clock, not a test's)."""
    while True:
        if condition():
            return
        await asyncio.sleep(every_s)


def names(n: int) -> list[str]:
    return [f"s{i:04d}" for i in range(n)]


def account_lines(sim: Simulator, source: str, **extra: str) -> str:
    lines = {
        "OMSD_APP_KEY": sim.app_key,
        "OMSD_APP_TOKEN": sim.app_token,
        "OMSD_VTEX_BASE_URL": sim.base_url,
        "OMSD_SOURCE": source,
        **({"OMSD_HOOK_SECRET": f"{HOOK_SECRET}-{sim.account}"} if source != "feed" else {}),
        **extra,
    }
    return "".join(f"{k}={v}\n" for k, v in lines.items())


def base_env(port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMSD_")}
    return env | {
        "OMSD_LISTEN": f"127.0.0.1:{port}",
        "OMSD_CONNECTOR_NAME": "bench",
        "OMSD_CONNECTOR_ENDPOINT": f"http://127.0.0.1:{port}",
        "OMSD_API_TOKEN": API_TOKEN,
        "OMSD_LOG_LEVEL": "info",
        "OMSD_LOG_FORMAT": "json",
        # The simulator pings every account's hook from one address (VTEX from a few): let it.
        "OMSD_HTTP_MAX_CONNECTIONS": "4096",
        "OMSD_HTTP_MAX_CONNECTIONS_PER_CLIENT": "2048",
        **extra,
    }


def fleet_env(root: Path, port: int, **extra: str) -> dict[str, str]:
    (root / "accounts.d").mkdir(exist_ok=True)
    (root / "state").mkdir(exist_ok=True)
    return base_env(port, OMSD_ACCOUNTS_DIR=str(root / "accounts.d"), OMSD_STATE_ROOT=str(root / "state"), **extra)


def single_env(root: Path, port: int, sim: Simulator, source: str) -> dict[str, str]:
    from omsd.daemon.config.instance import parse_environment_file

    own = parse_environment_file(account_lines(sim, source))
    return base_env(port, OMSD_ACCOUNT=sim.account, OMSD_DB=str(root / "single.db"), **own)


def cpu_ticks(pid: int) -> int:
    return sum(int(x) for x in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])


def memory_kib(pid: int) -> dict[str, int]:
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            found[key] = int(value.split()[0])
    return found


class Omsd:
    """`omsd run` as a subprocess; its log lines (JSON) kept in a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.url = f"http://{env['OMSD_LISTEN']}"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> float:
        omsd = str(Path(sys.executable).with_name("omsd"))
        out = self.log.open("wb")
        t0 = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(omsd, "run", env=self.env, stdout=out, stderr=out)
        out.close()
        await self.until_ready("/readyz", limit_s=900)
        return time.monotonic() - t0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def until_ready(self, path: str, limit_s: float) -> None:
        t0 = time.monotonic()
        async with aiohttp.ClientSession() as http:
            while time.monotonic() - t0 < limit_s:
                if self.proc is not None and self.proc.returncode is not None:
                    raise RuntimeError(f"omsd exited with {self.proc.returncode}: see {self.log}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{self.url}{path}") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{path} did not answer 200 within {limit_s}s: see {self.log}")

    async def stop(self) -> float:
        assert self.proc is not None
        t0 = time.monotonic()
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            await self.proc.wait()
        return time.monotonic() - t0

    def alive(self) -> bool:
        if self.proc is not None and self.proc.returncode is not None:
            raise RuntimeError(f"omsd exited with {self.proc.returncode}: see {self.log}")
        return True

    def lines(self, event: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == event:
                    found.append(record)
        return found


async def measure_idle(omsd: Omsd, settle: float, window: float) -> dict[str, float]:
    ready_s = await omsd.start()
    try:
        await asyncio.sleep(settle)
        before, t0 = cpu_ticks(omsd.pid), time.monotonic()
        await asyncio.sleep(window)
        used = (cpu_ticks(omsd.pid) - before) / CLK_TCK
        cpu = 100.0 * used / (time.monotonic() - t0)
        mem = memory_kib(omsd.pid)
    finally:
        stop_s = await omsd.stop()
    return {
        "ready_s": ready_s,
        "stop_s": stop_s,
        "cpu_pct": cpu,
        "rss_mib": mem["VmRSS"] / 1024,
        "hwm_mib": mem["VmHWM"] / 1024,
        "threads": mem["Threads"],
    }


@contextlib.asynccontextmanager
async def simulated(accounts: list[str]) -> AsyncIterator[SimFleet]:
    sims = SimFleet(accounts, seed=1, step_delay_s=0.05)
    await sims.start()
    try:
        yield sims
    finally:
        await sims.stop()


def row(label: str, m: dict[str, float], n: int) -> str:
    per = f"{m['rss_mib'] * 1024 / n:7.0f} KiB/account" if n > 1 else ""
    return (
        f"  {label:<24} ready {m['ready_s']:7.1f} s  stop {m['stop_s']:5.1f} s  CPU {m['cpu_pct']:5.2f} %  "
        f"RSS {m['rss_mib']:7.1f} MiB (peak {m['hwm_mib']:.1f})  threads {m['threads']:5.0f}  {per}"
    )


async def idle(args: argparse.Namespace) -> None:
    counts = [int(x) for x in args.accounts.split(",")]
    modes = args.modes.split(",")
    print(f"idle: settle {args.settle:g} s, CPU over {args.window:g} s, default settings (feed polled every 5 s)")
    for mode in modes:
        async with simulated(names(1)) as sims:
            with tempfile.TemporaryDirectory() as tmp:
                root = Path(tmp)
                port = free_port()
                omsd = Omsd(single_env(root, port, sims["s0000"], mode), root / "omsd.log")
                print(row(f"{mode}: baseline (1, single)", await measure_idle(omsd, args.settle, args.window), 1))
        for n in counts:
            if mode == "feed" and n > args.feed_max:
                continue
            async with simulated(names(n)) as sims:
                with tempfile.TemporaryDirectory() as tmp:
                    root = Path(tmp)
                    port = free_port()
                    env = fleet_env(root, port)
                    for sim in sims:
                        (root / "accounts.d" / f"{sim.account}.env").write_text(account_lines(sim, mode))
                    omsd = Omsd(env, root / "omsd.log")
                    m = await measure_idle(omsd, args.settle, args.window)
                    print(row(f"{mode}: fleet of {n}, new", m, n), flush=True)
                    omsd = Omsd(env, root / "omsd-again.log")
                    m = await measure_idle(omsd, args.settle, args.window)
                    print(row(f"{mode}: fleet of {n}, again", m, n), flush=True)
                    if mode == "feed":
                        gets = sum(s.calls.get("feed_get", 0) for s in sims)
                        print(f"    feed GETs at the simulator over the whole run: {gets} ({gets / n:.0f} per account)")


async def reload(args: argparse.Namespace) -> None:
    n = args.accounts
    async with simulated([*names(n), "added"]) as sims:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            port = free_port()
            env = fleet_env(root, port)
            folder = root / "accounts.d"
            accounts = [s for s in sims if s.account != "added"]
            for sim in accounts:
                (folder / f"{sim.account}.env").write_text(account_lines(sim, "hook"))
            omsd = Omsd(env, root / "omsd.log")
            ready_s = await omsd.start()
            try:
                changed = accounts[0]
                (folder / f"{changed.account}.env").write_text(account_lines(changed, "hook", OMSD_MAXLOT="5"))
                (folder / "added.env").write_text(account_lines(sims["added"], "hook"))
                t0, sent = time.monotonic(), datetime.now(UTC)
                assert omsd.proc is not None
                omsd.proc.send_signal(signal.SIGHUP)
                await wait_until(lambda: omsd.alive() and omsd.lines("fleet_reloaded"), 0.05)
                done = omsd.lines("fleet_reloaded")
                applied_s = (datetime.fromisoformat(done[0]["timestamp"].replace("Z", "+00:00")) - sent).total_seconds()
                await omsd.until_ready("/readyz?account=added", limit_s=300)
                added_s = time.monotonic() - t0
                await omsd.until_ready(f"/readyz?account={changed.account}", limit_s=300)
                changed_s = time.monotonic() - t0
            finally:
                stop_s = await omsd.stop()
    print(
        f"reload: {n} accounts (hook mode): start-up to /readyz 200 {ready_s:.1f} s; SIGHUP (one file changed, one "
        f"added) applied in {applied_s * 1000:.0f} ms, the added account ready after {added_s:.2f} s, the changed one "
        f"after {changed_s:.2f} s; SIGTERM to exit {stop_s:.1f} s"
    )


def release_latency(sim: Simulator, order_id: str) -> float | None:
    """Seconds from the order's release (its status change out of the hold) to the first PUT."""
    order = sim.orders[order_id]
    if not order.put_at:
        return None
    held = False
    for status, at in order.history:
        if status == "waiting-for-manual-authorization":
            held = True
        elif held:
            released = datetime.fromisoformat(at.replace("Z", "+00:00")[:26] + "+00:00")
            return (order.put_at[0] - released).total_seconds()
    return None


async def quiet_cycle(omsd: Omsd, sim: Simulator, orders: int, tag: str) -> list[float]:
    """`orders` held orders, each with an intent, released one at a time; latencies in seconds."""
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    out: list[float] = []
    async with aiohttp.ClientSession(headers=auth) as http:
        for i in range(orders):
            order = sim.create(f"{tag}-{i}", held=True, decision=None)
            await wait_until(functools.partial(lambda o: o.status == "waiting-for-manual-authorization", order), 0.01)
            body = {"marketplaceOrderId": order.marketplace_order_id, "orderId": order.order_id}
            async with http.post(f"{omsd.url}/v1/accounts/quiet/approvals", json=body) as resp:
                assert resp.status == 202, await resp.text()
            while True:  # omsd knows the order is held (it asked Get order), so the release is what it waits for
                async with http.get(f"{omsd.url}/v1/accounts/quiet/orders/{order.order_id}") as resp:
                    if resp.status == 200 and (await resp.json())["phase"] == "waiting_release":
                        break
                await asyncio.sleep(0.02)
            sim.authorize(order.order_id)
            await wait_until(functools.partial(lambda o: o.put_at, order), 0.005)
            latency = release_latency(sim, order.order_id)
            if latency is not None:
                out.append(latency)
    return out


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


async def fairness(args: argparse.Namespace) -> None:
    async with simulated(["quiet", "busy"]) as sims:
        quiet, busy = sims["quiet"], sims["busy"]
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            port = free_port()
            env = fleet_env(root, port, OMSD_LOG_LEVEL="warning")
            (root / "accounts.d" / "quiet.env").write_text(account_lines(quiet, "hook"))
            (root / "accounts.d" / "busy.env").write_text(account_lines(busy, "feed"))
            omsd = Omsd(env, root / "omsd.log")
            await omsd.start()
            try:
                alone = await quiet_cycle(omsd, quiet, args.orders, "alone")
                load_backlog(busy, args.events)
                t0 = time.monotonic()
                beside = await quiet_cycle(omsd, quiet, args.orders, "beside")
                left = len(busy.queue.messages)
                await wait_until(lambda: not busy.queue.messages, 0.2)
                drained_s = time.monotonic() - t0
            finally:
                await omsd.stop()
    print(f"fairness: quiet account's release → PUT over {args.orders} orders (hook), busy account (feed)")
    print(f"  alone:                       p50 {pct(alone, 50) * 1000:7.1f} ms  p99 {pct(alone, 99) * 1000:7.1f} ms")
    print(
        f"  beside a {args.events:,}-event drain: p50 {pct(beside, 50) * 1000:7.1f} ms  "
        f"p99 {pct(beside, 99) * 1000:7.1f} ms  (ratio p99 {pct(beside, 99) / pct(alone, 99):.2f}×)"
    )
    print(f"  backlog left when the last quiet order was approved: {left:,}; drained in {drained_s:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    i = sub.add_parser("idle")
    i.add_argument("--accounts", default="1,10,100,1000")
    i.add_argument("--modes", default="hook,feed")
    i.add_argument("--feed-max", type=int, default=100)
    i.add_argument("--settle", type=float, default=20.0)
    i.add_argument("--window", type=float, default=60.0)
    r = sub.add_parser("reload")
    r.add_argument("--accounts", type=int, default=1000)
    f = sub.add_parser("fairness")
    f.add_argument("--events", type=int, default=20000)
    f.add_argument("--orders", type=int, default=40)
    args = parser.parse_args()
    asyncio.run({"idle": idle, "reload": reload, "fairness": fairness}[args.what](args))


if __name__ == "__main__":
    main()
