"""The disaster drill: `omsd run` with a replica and replicated durability, killed with
its Litestream at once (SIGKILL to the process group: the machine is gone), its database
and everything beside it deleted (the disk is gone), and started again. Every intent the
connector was told was accepted is still there, no approval is lost or made twice,
nothing is sent while held, and every feed event is committed in the end.

file:// always; s3:// against moto's server on loopback when moto can serve here."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from omsd.sim.faults import Faults
from omsd.sim.orders import SimOrder
from omsd.sim.server import Simulator
from omsd.state.statuses import Phase
from omsd.state.store import Store
from tests.helpers import API_TOKEN, free_port, omsd_env, omsd_run, until
from tests.replica_helpers import S3_KEYS, file_replica, intents_in, moto_s3, s3_replica

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


class Machine:
    """`omsd run` (and the Litestream it starts) as one process group that can be lost whole."""

    def __init__(self, env: dict[str, str], port: int, db: Path, log: Path) -> None:
        self.env, self.port, self.db, self.log = env, port, db, log
        self.proc: asyncio.subprocess.Process | None = None
        self.restored: list[bool] = []

    async def start(self) -> None:
        self.proc = await omsd_run(self.env, self.port, self.log, timeout=60, own_group=True)

    async def lose(self, *, disk: bool) -> None:
        """SIGKILL to omsd and Litestream together; with `disk`, the database's folder emptied."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()
        if disk:
            for path in self.db.parent.iterdir():
                if path.name.startswith((self.db.name, f".{self.db.name}")) and path.name != f"{self.db.name}.lock":
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            assert not self.db.exists()

    async def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout=60)


class Connector:
    """Hands omsd each intent until it is accepted (202), as a connector retries; records
    which intents were acknowledged."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.acknowledged: set[str] = set()

    async def hand_over(self, order: SimOrder) -> None:
        body = {"marketplaceOrderId": order.marketplace_order_id, "orderId": order.order_id}
        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        async with aiohttp.ClientSession() as s:
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.post(f"http://127.0.0.1:{self.port}/v1/approvals", json=body, headers=headers) as r:
                        if r.status == 202:
                            self.acknowledged.add(order.marketplace_order_id)
                            return
                await asyncio.sleep(0.1)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    s = Simulator(seed=5, faults=Faults(notify_delay_s=(0.01, 0.1)), visibility_override_s=1.0, step_delay_s=0.05)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


async def drill(sim: Simulator, tmp_path: Path, replica: str, extra_env: dict[str, str] | None = None) -> None:
    port = free_port()
    db = tmp_path / "state" / "omsd.db"
    db.parent.mkdir()
    env = omsd_env(sim, db, port)
    env.update({"OMSD_REPLICA": replica, "OMSD_DURABILITY": "replicated", **(extra_env or {})})
    machine = Machine(env, port, db, tmp_path / "omsd.log")
    connector = Connector(port)
    await machine.start()
    orders: dict[str, Phase] = {}
    handed: list[asyncio.Task[None]] = []
    tracked: list[SimOrder] = []
    for i in range(16):
        kind = i % 4  # free, held then authorized, held then rejected, held and never asked for
        order = sim.create(
            f"D{i}",
            held=kind != 0,
            decision="reject" if kind == 2 else "authorize",
            decide_after_s=0.8 + i * 0.4,
        )
        if kind == 3:
            tracked.append(order)
            continue
        orders[order.order_id] = Phase.REJECTED if kind == 2 else Phase.APPROVED
        handed.append(asyncio.create_task(connector.hand_over(order)))

    # The machine is lost twice with its disk (mid-approval, mid-commit), once without.
    for point, disk in (("put", True), ("feed_commit", True), ("put", False)):
        event = sim.signal(point)
        event.clear()
        await asyncio.wait_for(event.wait(), timeout=60)
        await machine.lose(disk=disk)
        await machine.start()
    await asyncio.wait_for(asyncio.gather(*handed), timeout=60)

    async def settled() -> bool:
        async with await Store.open_readonly(db) as store:
            phases = {o.order_id: o.phase for o in await store.read.list_orders(limit=1000)}
            statuses = {o.order_id: o.status for o in await store.read.list_orders(limit=1000)}
        ends = all(phases.get(oid) == phase for oid, phase in orders.items())
        seen = all(statuses.get(o.order_id) == o.status for o in tracked)  # no committed event lost
        return ends and seen and not sim.queue.messages

    await until(settled, timeout=120, what="every order at its end, every feed event committed")
    assert await machine.stop() == 0
    assert "database_restored" in machine.log.read_text()
    assert connector.acknowledged <= await intents_in(db), "an acknowledged intent was lost"
    everyone = list(sim.orders.values())
    assert sum(o.puts_while_held for o in everyone) == 0
    for order in everyone:
        want = 1 if orders.get(order.order_id) == Phase.APPROVED else 0
        assert order.approvals_applied == want, order.order_id
    assert not sim.protocol_errors


async def test_drill_file_replica(sim: Simulator, tmp_path: Path) -> None:
    """Lose the machine and its disk twice (file:// replica): nothing acknowledged is lost."""
    await drill(sim, tmp_path, file_replica(tmp_path / "replica"))


@contextlib.contextmanager
def s3_endpoint() -> Iterator[str]:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        pytest.skip("moto's server is not installed (pip install 'moto[s3]' flask flask-cors)")
    with moto_s3() as endpoint:
        yield endpoint


async def test_drill_s3_replica(sim: Simulator, tmp_path: Path) -> None:
    """The same drill against an S3 replica (moto on loopback; this machine's AWS_CA_BUNDLE
    is dropped from Litestream's environment, or its AWS SDK refuses to start)."""
    with s3_endpoint() as endpoint:
        await drill(sim, tmp_path, s3_replica(endpoint, "drill/omsd.db"), dict(S3_KEYS))


async def test_litestream_ends_with_a_killed_omsd_and_the_next_start_waits_for_it(
    sim: Simulator, tmp_path: Path
) -> None:
    """omsd alone SIGKILLed (the OOM killer): the kernel tells its Litestream to stop; it
    holds the database lock until its last sync is done, and the next omsd starts after it
    (never two Litestreams on one database)."""
    from omsd.daemon.ops.litestream import Layout

    port = free_port()
    db = tmp_path / "omsd.db"
    env = omsd_env(sim, db, port)
    env["OMSD_REPLICA"] = file_replica(tmp_path / "replica")
    machine = Machine(env, port, db, tmp_path / "omsd.log")
    await machine.start()
    sock = Layout.of(db).socket
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s,
        s.get("http://litestream/info") as r,
    ):
        child = (await r.json())["pid"]
    assert machine.proc is not None
    machine.proc.send_signal(signal.SIGKILL)
    await machine.proc.wait()

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        return False

    await until(gone, timeout=30, what="Litestream ended with its omsd")
    await machine.start()
    assert await machine.stop() == 0
