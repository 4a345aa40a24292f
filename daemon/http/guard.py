"""Limits on HTTP connections: a read deadline per request, a cap on open
connections, and one rate-limited line for a repeating accept() error.

aiohttp closes a connection that is idle between requests after its keep-alive
timeout, but it has no deadline for receiving a request: a client that sends
half a header, or a body one byte at a time, holds a descriptor for as long as
it likes. Each connection here is wrapped in a `GuardedConnection`, which gives
the client `read_timeout_s` from its first byte (or from the connection's
opening) to deliver the request's headers AND body. Late in the headers: the
connection is closed. Late in the body: the handler's read fails with
`SlowRequest`, the middleware answers 408 and the connection is closed.

Beyond `max_connections` open connections a new one is closed at once rather
than left waiting in the kernel's backlog: asyncio offers no public way to stop
accepting for a while, and a client told at once retries (VTEX retries its hook
pushes), while the descriptor is freed immediately.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from ..ops.logs import get_logger
from ..vtex.errors import OmsdError

log = get_logger("omsd.connections")

ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
Handler = Callable[[web.Request], Any]


class SlowRequest(OmsdError, TimeoutError):
    """The request's body did not arrive within the read timeout. A TimeoutError, so
    aiohttp's lingering read after the 408 gives up quietly and closes the connection."""


class RateLimitedLog:
    """Log an event at most once per `every_s`, with how many occurrences it stands for."""

    def __init__(self, event: str, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.event = event
        self.every_s = every_s
        self._clock = clock
        self._last: float | None = None
        self._count = 0
        self.total = 0

    def hit(self, **fields: Any) -> None:
        self._count += 1
        self.total += 1
        now = self._clock()
        if self._last is None or now - self._last >= self.every_s:
            log.error(self.event, occurrences=self._count, every_s=self.every_s, **fields)
            self._last = now
            self._count = 0


class ConnectionGuard:
    """Shared by every connection of one HTTP server: the limits and the count."""

    def __init__(self, *, read_timeout_s: float, max_connections: int, log_every_s: float = 60.0) -> None:
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections
        self.open = 0
        self.timed_out = 0
        self.refused = RateLimitedLog("http_connections_over_cap", log_every_s)
        self._by_handler: dict[RequestHandler, GuardedConnection] = {}

    def factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """The protocol factory for `loop.create_server`: aiohttp's handler, guarded."""
        return lambda: GuardedConnection(self, server())

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Marks the headers as received and answers 408 when the body came too slowly."""
        conn = self._by_handler.get(request.protocol)
        if conn is not None:
            conn.headers_received(request)
        try:
            response: web.StreamResponse = await handler(request)
        except SlowRequest as exc:
            raise web.HTTPRequestTimeout(text=str(exc), headers={"Connection": "close"}) from None
        finally:
            if conn is not None:
                conn.request_done()
        return response


class GuardedConnection(asyncio.Protocol):
    """aiohttp's RequestHandler behind a read deadline (see the module's docstring)."""

    def __init__(self, guard: ConnectionGuard, inner: RequestHandler) -> None:
        self._guard = guard
        self._inner = inner
        self._deadline: asyncio.TimerHandle | None = None
        self._request: web.Request | None = None
        self._in_request = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        if guard.open >= guard.max_connections:
            guard.refused.hit(max_connections=guard.max_connections)
            transport.abort()  # type: ignore[attr-defined]
            self._inner = None  # type: ignore[assignment]
            return
        guard.open += 1
        guard._by_handler[self._inner] = self
        self._inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if not self._in_request:
            self._arm()  # the first bytes of the next request on a kept-alive connection
        self._inner.data_received(data)

    def eof_received(self) -> None:
        if self._inner is not None:
            self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is None:
            return
        self._disarm()
        self._guard.open -= 1
        self._guard._by_handler.pop(self._inner, None)
        self._inner.connection_lost(exc)

    def headers_received(self, request: web.Request) -> None:
        self._in_request = True
        self._request = request
        request.content.on_eof(self._disarm)

    def request_done(self) -> None:
        self._in_request = False
        self._request = None
        self._disarm()  # idle until the next request: aiohttp's keep-alive timeout applies

    def _arm(self) -> None:
        if self._deadline is None:
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(self._guard.read_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        self._guard.timed_out += 1
        timeout = self._guard.read_timeout_s
        request = self._request
        if request is not None and not request.content.is_eof():
            log.info("http_read_timeout", part="body", timeout_s=timeout, remote=request.remote)
            request.content.set_exception(SlowRequest(f"request body not received within {timeout:g}s"))
        else:
            log.info("http_read_timeout", part="headers", timeout_s=timeout)
            self._inner.force_close()


def install_accept_error_handler(
    loop: asyncio.AbstractEventLoop, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic
) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """Make asyncio's "accept() out of system resource" (no descriptors left) one line
    per `every_s` with a count, instead of a traceback per failed accept. Other
    contexts go to the handler that was there before (or asyncio's default)."""
    previous = loop.get_exception_handler()
    limited = RateLimitedLog("http_accept_failed", every_s, clock)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in ACCEPT_ERRNOS and "accept" in str(context.get("message", "")):
            limited.hit(error=errno.errorcode.get(exc.errno or 0, str(exc.errno)), hint="raise LimitNOFILE")
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    return handler
