"""Slow clients and descriptor exhaustion: read deadlines, a connection cap, one accept-error line."""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

import aiohttp
from structlog.testing import capture_logs

from omsd.daemon.app import Daemon
from omsd.daemon.http.guard import install_accept_error_handler
from omsd.daemon.ops import logs as logs_module
from omsd.sim.server import Simulator
from tests.helpers import API_TOKEN, HOOK_SECRET, RunDaemon, hooked, until

HALF_HEADER = b"POST /vtex/hook HTTP/1.1\r\nHost: omsd\r\nContent-Le"
# An authenticated request, so the route reads its body (an unauthenticated one is refused first).
SLOW_BODY = (
    b"POST /v1/approvals HTTP/1.1\r\nHost: omsd\r\nAuthorization: Bearer " + API_TOKEN.encode() + b"\r\n"
    b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{"
)
PING = {"hookConfig": "ping"}


async def _open(daemon: Daemon, first: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    if first:
        writer.write(first)
        await writer.drain()
    return reader, writer


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    try:
        return await asyncio.wait_for(reader.read(), timeout=20)
    except ConnectionResetError:
        return b""


async def _answers(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{daemon.url}/healthz") as resp:
            assert resp.status == 200
        async with http.post(f"{daemon.url}/vtex/hook", json=PING) as resp:
            assert resp.status == 200
            assert await resp.json() == {"hookConfig": "pong"}


async def test_slow_headers_and_bodies_are_cut_off_while_others_are_served(
    sim: Simulator, run_daemon: RunDaemon
) -> None:
    """50 half-sent headers and 5 stalled bodies: /healthz and the hook still answer,
    and the server closes every slow connection after the read timeout (408 for a body)."""
    async with run_daemon(sim, http_read_timeout_s=0.5) as daemon:
        headers = [await _open(daemon, HALF_HEADER) for _ in range(50)]
        bodies = [await _open(daemon, SLOW_BODY) for _ in range(5)]
        await _answers(daemon)
        for reader, _ in headers:
            assert await _until_closed(reader) == b""
        for reader, _ in bodies:
            assert (await _until_closed(reader)).startswith(b"HTTP/1.1 408")
        assert daemon.http.guard is not None and daemon.http.guard.timed_out >= 55
        for _, writer in headers + bodies:
            writer.close()
        await _answers(daemon)


async def test_connections_beyond_the_cap_are_closed_at_once(sim: Simulator, run_daemon: RunDaemon) -> None:
    """With the cap reached, a new connection is closed at once; a freed slot serves again."""
    async with run_daemon(sim, http_max_connections=3, http_read_timeout_s=60) as daemon:
        guard = daemon.http.guard
        assert guard is not None
        idle = [await _open(daemon, b"") for _ in range(3)]
        await until(lambda: guard.open == 3, what="three connections open")
        reader, writer = await _open(daemon, b"GET /healthz HTTP/1.1\r\nHost: omsd\r\n\r\n")
        assert await _until_closed(reader) == b""
        writer.close()
        assert guard.refused.total == 1
        idle[0][1].close()
        await until(lambda: guard.open == 2, what="a slot freed")
        await _answers(daemon)
        for _, w in idle[1:]:
            w.close()


def test_repeated_accept_errors_make_one_line_per_interval_with_a_count() -> None:
    """asyncio's "accept() out of system resource" repeated 1,000 times is one log line;
    the next one after the interval counts what it stands for; other contexts pass through."""
    loop = asyncio.new_event_loop()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    now = [0.0]
    try:
        handler = install_accept_error_handler(loop, every_s=60, clock=lambda: now[0])
        context = {"message": "socket.accept() out of system resource", "exception": OSError(errno.EMFILE, "Too many")}
        with capture_logs() as logs:
            for _ in range(1000):
                handler(loop, context)
            handler(loop, {"message": "something else"})
            now[0] = 61.0
            handler(loop, context)
        lines = [entry for entry in logs if entry["event"] == "http_accept_failed"]
        assert [line["occurrences"] for line in lines] == [1, 1000]
        assert lines[0]["error"] == "EMFILE"
        assert seen == [{"message": "something else"}]
    finally:
        loop.close()


async def _open_from(
    daemon: Daemon, source: str, first: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection from another loopback address (Linux routes all of 127/8 to lo)."""
    host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), local_addr=(source, 0))
    if first:
        writer.write(first)
        await writer.drain()
    return reader, writer


async def test_one_client_cannot_take_every_connection(sim: Simulator, run_daemon: RunDaemon) -> None:
    """A client holding its share of connections has its next ones closed at once; everyone
    else (probes, VTEX's hook) is still served, and the client is named once in the log."""
    async with run_daemon(sim, http_max_connections=40, http_max_connections_per_client=8) as daemon:
        guard = daemon.http.guard
        assert guard is not None
        with capture_logs() as logs:
            flood = [await _open_from(daemon, "127.0.0.2") for _ in range(30)]
            await until(lambda: guard.refused.total + guard.client_refused.total >= 22, what="the rest refused")
        assert len(guard.by_client["127.0.0.2"]) == 8 and guard.client_refused.total == 22
        for _ in range(5):
            await _answers(daemon)
        [line] = [e for e in logs if e["event"] == "http_client_over_cap"]
        assert line["remote"] == "127.0.0.2" and line["max_per_client"] == 8
        for _, writer in flood:
            writer.close()


async def test_the_last_slots_serve_only_vtex(sim: Simulator, run_daemon: RunDaemon) -> None:
    """With every general slot held by requests under way (bodies that do not come), the reserve
    (one in sixteen) still serves VTEX's hook with its secret header, one request per
    connection; anything else there gets 503 Retry-After."""
    async with run_daemon(sim, **hooked(http_max_connections=32, http_max_connections_per_client=100)) as daemon:
        guard = daemon.http.guard
        assert guard is not None and guard.reserve == 2
        flood = []
        while guard.open < 30:  # the general slots (the simulator may hold one too)
            flood.append(await _open_from(daemon, "127.0.0.2", SLOW_BODY))
            await until(lambda: guard.open >= len(flood), what="the connection counted")
        await until(lambda: not any(c.waiting for c in guard.by_client["127.0.0.2"]), what="all in a request")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{daemon.url}/healthz") as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "1"
            for _ in range(3):
                headers = {"X-Omsd-Hook-Secret": HOOK_SECRET}
                async with http.post(f"{daemon.url}/vtex/hook", json=PING, headers=headers) as resp:
                    assert resp.status == 200 and resp.headers.get("Connection") == "close"
        for _, writer in flood:
            writer.close()


async def test_a_client_holding_the_most_makes_room_for_others(sim: Simulator, run_daemon: RunDaemon) -> None:
    """Every slot held by one client's idle connections (no per-client cap to stop it): a
    newcomer from another address gets in, one of the idle ones is closed for it, and is
    answered, each time."""
    async with run_daemon(sim, http_max_connections=32, http_max_connections_per_client=100) as daemon:
        guard = daemon.http.guard
        assert guard is not None
        flood = [await _open_from(daemon, "127.0.0.2") for _ in range(40)]
        await until(lambda: guard.open == 32, what="every slot taken")
        for _ in range(5):
            await _answers(daemon)
        assert guard.evicted.total >= 1 and len(guard.by_client["127.0.0.2"]) >= 29
        for _, writer in flood:
            writer.close()


async def test_a_client_that_never_reads_its_answers_is_cut(sim: Simulator, run_daemon: RunDaemon) -> None:
    """A client that pipelines requests and never reads the answers holds its connection only
    for the read timeout once the answers back up (a write deadline), then is cut."""
    async with run_daemon(sim, http_read_timeout_s=0.5) as daemon:
        guard = daemon.http.guard
        assert guard is not None
        host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.setblocking(False)
        _reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: omsd\r\n\r\n" * 2000)
        await until(lambda: guard.stuck_writing.total >= 1, what="the write deadline")
        await until(lambda: guard.open == 0, what="the connection cut")
        writer.close()


async def test_lines_any_client_can_cause_are_rate_limited(sim: Simulator, run_daemon: RunDaemon) -> None:
    """100 requests with a wrong bearer token, 100 hook pushes without the secret, 100
    notifications on a wrong secret path and 20 slow headers: one line each (with its count
    of occurrences), not one per request."""
    logs_module.configure("info", "json")  # http_read_timeout is an info line
    async with run_daemon(sim, http_read_timeout_s=0.3) as daemon:
        wrong_path = "/notify/not-the-secret-0123456789/order-integration/notification/processing-result?an=x"
        with capture_logs() as logs:
            async with aiohttp.ClientSession() as http:
                for _ in range(100):
                    async with http.get(f"{daemon.url}/v1/status", headers={"Authorization": "Bearer no"}) as r:
                        assert r.status == 401
                    async with http.post(f"{daemon.url}/vtex/hook", json={"OrderId": "x"}) as r:
                        assert r.status == 401
                    async with http.post(f"{daemon.url}{wrong_path}", json={}) as r:
                        assert r.status == 404
            slow = [await _open(daemon, HALF_HEADER) for _ in range(20)]
            for reader, writer in slow:
                assert await _until_closed(reader) == b""
                writer.close()
        seen = [e["event"] for e in logs]
        for event in ("api_unauthorized", "hook_unauthorized", "notification_wrong_path", "http_read_timeout"):
            assert seen.count(event) == 1, event
        assert all(e["occurrences"] == 1 for e in logs if e["event"] == "api_unauthorized")
