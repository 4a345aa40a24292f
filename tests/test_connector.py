"""The connector's side, end to end over real sockets: the example webhook receiver and pull
client of docs/operations.md (deploy/examples/) hear every outcome, and VTEX's processing
results reach the connector's own route as VTEX sent them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from omsd.sim.server import Simulator
from omsd.state.statuses import Phase
from tests.helpers import API_TOKEN, RunDaemon, approve, free_port, reached, until

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "examples"
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[str]]]:
    """deploy/examples/webhook_receiver.py, run as a connector would run it; its lines."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / "webhook_receiver.py"),
        "--listen",
        f"127.0.0.1:{port}",
        env={**os.environ, "RELAY_SECRET": SECRET},
        stdout=subprocess.PIPE,
    )
    lines: list[str] = []

    async def read() -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            lines.append(line.decode().strip())

    reader = asyncio.create_task(read())
    try:
        yield f"http://127.0.0.1:{port}/omsd/events", lines
    finally:
        proc.terminate()
        await proc.wait()
        await reader


@pytest.fixture
async def vtex_route() -> AsyncIterator[tuple[str, list[tuple[str, str]]]]:
    """The connector's own VTEX route (it implemented VTEX's processing-result protocol)."""
    got: list[tuple[str, str]] = []

    async def handle(request: web.Request) -> web.Response:
        got.append((request.path_qs, await request.text()))
        return web.json_response({"received": True})

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    server = TestServer(app)
    await server.start_server()
    try:
        yield str(server.make_url("/connector")), got
    finally:
        await server.close()


async def test_the_connector_hears_every_outcome(
    sim: Simulator,
    run_daemon: RunDaemon,
    receiver: tuple[str, list[str]],
    vtex_route: tuple[str, list[tuple[str, str]]],
    tmp_path: Path,
) -> None:
    """Approved, canceled, and one approved by VTEX's own status: the receiver gets each
    intent's accepted and terminal event, the pull client the same stream, and the
    connector's VTEX route every processing result VTEX sent omsd, byte for byte."""
    hook_url, received = receiver
    route_url, reposted = vtex_route
    relay = {"relay_url": hook_url, "relay_secret": SECRET, "relay_vtex_url": route_url}
    async with run_daemon(sim, **relay) as daemon:
        free = sim.create("C1")
        held = sim.create("C2", held=True, decision=None)
        rejected = sim.create("C3", held=True, decision="reject", decide_after_s=0.3)
        for order in (free, held, rejected):
            await approve(daemon, order.marketplace_order_id, order.order_id)
        await until(lambda: held.status == "waiting-for-manual-authorization", what="the simulator holds C2")
        sim.authorize(held.order_id)
        for order, phase in ((free, Phase.APPROVED), (held, Phase.APPROVED), (rejected, Phase.REJECTED)):
            await until(reached(daemon, order.order_id, phase), what=f"{order.order_id} {phase}")
        store = daemon.store
        assert store is not None
        stream = [e.view() for e in await store.outcomes.after(0, 1000)]
        await until(lambda: len(received) == len(stream), what="the receiver heard every event")
        sent = sim.channel.notifications_sent
        await until(lambda: len(reposted) == len(sent), what="every processing result re-posted")
        env = {**os.environ, "OMSD_URL": daemon.url, "OMSD_API_TOKEN": API_TOKEN}
        pull = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLES / "pull_client.py"),
            "--cursor",
            str(tmp_path / "cursor"),
            "--until-idle",
            env=env,
            stdout=subprocess.PIPE,
        )
        out, _ = await pull.communicate()
    lines = [f"{e['seq']} {e['type']} {e['order_id'] or e['marketplace_order_id']}" for e in stream]
    assert sorted(received) == sorted(lines)  # each once (the receiver dedups by webhook-id) ...
    for subject in {line.split()[2] for line in lines}:  # ... and in order for each order
        assert [x for x in received if x.split()[2] == subject] == [x for x in lines if x.split()[2] == subject]
    assert out.decode().splitlines() == lines  # the pull client: the stream, in seq order
    assert (tmp_path / "cursor").read_text() == str(stream[-1]["seq"])
    by_order: dict[str, list[str]] = {}
    for e in stream:
        if e["order_id"]:
            by_order.setdefault(e["order_id"], []).append(e["type"])
    assert by_order[rejected.order_id] == ["intent.accepted", "intent.canceled"]
    for order in (free, held):
        kinds = [k for k in by_order[order.order_id] if k != "vtex.processing_result"]
        assert kinds[0] == "intent.accepted" and kinds[-1] == "approval.confirmed" and "approval.sent" in kinds
    assert {path for path, _ in reposted} == {
        f"/connector/order-integration/notification/processing-result?an={sim.account}"
    }
    assert sorted(text for _, text in reposted) == sorted(json.dumps(body) for body in sent)
