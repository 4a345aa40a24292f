"""Slow clients and descriptor exhaustion: read deadlines, a connection cap, one accept-error line."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import aiohttp
from structlog.testing import capture_logs

from omsd.daemon.app import Daemon
from omsd.daemon.http.guard import install_accept_error_handler
from omsd.sim.server import Simulator
from tests.helpers import API_TOKEN, RunDaemon, until

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
