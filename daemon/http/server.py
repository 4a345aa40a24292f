"""omsd's HTTP server: its routes behind the connection guard and the database's state.

The listening socket is asyncio's own (not aiohttp's TCPSite) so that every connection
goes through the guard (`guard.py`: read deadlines, a cap); it closes before the runner
cleans up. While the database refuses writes every POST (all of them write) answers 503
with Retry-After, and /healthz says why.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Protocol

from aiohttp import web

from omsd.state.store import StoreUnwritable

from ..config.settings import ConfigError
from ..ops.replica import ReplicaUnavailable
from .common import ApiContext, context_of
from .guard import ConnectionGuard, install_accept_error_handler
from .routes import build_app
from .vtex import from_vtex


class ServerSettings(Protocol):
    """What the server reads of the settings (an account's `Settings`, a fleet's `FleetSettings`)."""

    @property
    def listen(self) -> str: ...
    @property
    def listen_host(self) -> str: ...
    @property
    def listen_port(self) -> int: ...
    @property
    def http_read_timeout_s(self) -> float: ...
    @property
    def http_keepalive_s(self) -> float: ...
    @property
    def http_max_connections(self) -> int: ...
    @property
    def http_max_connections_per_client(self) -> int: ...
    @property
    def store_probe_s(self) -> float: ...


class HttpServer:
    def __init__(self, settings: ServerSettings) -> None:
        self._settings = settings
        self.guard: ConnectionGuard | None = None
        self.url = ""

    async def start(
        self, stack: AsyncExitStack, ctx: ApiContext | None = None, *, app: web.Application | None = None
    ) -> str:
        """Listen on OMSD_LISTEN until `stack` closes, serving one account's routes (`ctx`) or a
        fleet's (`app`, http/fleet.py); returns the server's URL."""
        s = self._settings
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()
        install_accept_error_handler(loop)
        stack.callback(loop.set_exception_handler, previous)
        guard = self.guard = ConnectionGuard(
            read_timeout_s=s.http_read_timeout_s,
            max_connections=s.http_max_connections,
            max_per_client=s.http_max_connections_per_client,
            reserved_for=from_vtex,
        )
        if app is None:
            assert ctx is not None
            app = build_app(ctx)
        app.middlewares.append(guard.middleware)
        app.middlewares.append(self._store_state)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0, keepalive_timeout=s.http_keepalive_s)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        assert runner.server is not None
        try:
            server = await loop.create_server(guard.factory(runner.server), s.listen_host, s.listen_port)
        except OSError as exc:  # in use, not an address of this machine, a privileged port
            raise ConfigError(
                f"OMSD_LISTEN: cannot listen on {s.listen}: {os.strerror(exc.errno) if exc.errno else exc}"
            ) from None
        stack.push_async_callback(_close, server)
        sockets = server.sockets
        port = sockets[0].getsockname()[1] if sockets else s.listen_port
        self.url = f"http://{s.listen_host}:{port}"
        return self.url

    @web.middleware
    async def _store_state(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """While the database refuses writes, or (replicated durability) the replica is
        behind: 503 with Retry-After for every POST (they all journal), and /healthz says
        why. A write refused, or a sync to the replica failed, meanwhile: 503 too. In a fleet:
        the account the request is for."""
        ctx = context_of(request)
        health = ctx.health if ctx is not None else None
        problem = health.intake_problem if health is not None else None
        if problem is not None and request.method == "POST":
            return self._unavailable(problem)
        try:
            response = await handler(request)
        except StoreUnwritable as exc:
            return self._unavailable(f"database not writable: {exc.reason}")
        except ReplicaUnavailable as exc:
            return self._unavailable(f"replica not current: {exc.reason}")
        if problem is not None and request.path == "/healthz" and response.status == 200:
            body: dict[str, str] = {"status": "ok", "intake": "paused", "reason": problem}
            if health is not None and health.store_problem is not None:
                body["database"] = health.store_problem
            return web.json_response(body)
        return response

    def _unavailable(self, reason: str) -> web.Response:
        retry = str(math.ceil(self._settings.store_probe_s))
        return web.json_response({"error": reason}, status=503, headers={"Retry-After": retry})


async def _close(server: asyncio.Server) -> None:
    server.close()
    await server.wait_closed()
