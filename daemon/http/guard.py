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

A response the client does not take (its socket buffers full: a client that
pipelines requests and never reads) must start moving again within the same
`read_timeout_s`, or the connection is cut: a write deadline, armed when the
transport pauses writing.

Beyond `max_connections` open connections a new one is closed at once rather
than left waiting in the kernel's backlog: asyncio offers no public way to stop
accepting for a while, and a client told at once retries (VTEX retries its hook
pushes), while the descriptor is freed immediately. One client address may hold
at most `max_per_client` of them; where the general slots are full, the oldest
connection waiting for a request (idle, or its headers not all in) of the client
holding the most is closed to make room for a newcomer holding fewer; and the last
`reserve` slots serve only VTEX's authenticated requests (the hook with its secret
header, a notification on the secret path), one request per connection. So one
client, however many connections it opens, cannot shut VTEX (or anyone) out.

Every line a client can cause (`http_read_timeout`, `http_write_timeout`, the caps)
is logged at most once a minute, with the number of occurrences it stands for.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
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
    """Log an event at most once per `every_s`, with how many occurrences it stands for (those
    since the last line): an event any client can cause cannot grow the log faster."""

    def __init__(
        self,
        event: str,
        every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        level: str = "error",
        logger: Any = None,
    ) -> None:
        self.event = event
        self.every_s = every_s
        self._clock = clock
        self._emit = getattr(logger or log, level)
        self._last: float | None = None
        self._count = 0
        self.total = 0

    def hit(self, **fields: Any) -> None:
        self._count += 1
        self.total += 1
        now = self._clock()
        if self._last is None or now - self._last >= self.every_s:
            self._emit(self.event, occurrences=self._count, every_s=self.every_s, **fields)
            self._last = now
            self._count = 0


class ConnectionGuard:
    """Shared by every connection of one HTTP server: the limits and the counts.

    Admission of a new connection (`admit`): a client address (an IPv6 /64) holding
    `max_per_client` already is closed at once; with the general slots full, a waiting
    connection of the client holding the most is closed to make room; beyond
    `max_connections` open ones it is closed at once; the last `reserve` slots serve only
    requests `reserved_for` accepts (VTEX's authenticated ones), one request per connection."""

    def __init__(
        self,
        *,
        read_timeout_s: float,
        max_connections: int,
        max_per_client: int | None = None,
        reserve: int | None = None,
        reserved_for: Callable[[web.Request], bool] = lambda request: False,
        log_every_s: float = 60.0,
    ) -> None:
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections
        self.max_per_client = max_per_client or max_connections
        self.reserve = max_connections // RESERVE_SHARE if reserve is None else reserve
        self.reserved_for = reserved_for
        self.open = 0
        self.by_client: dict[str, list[GuardedConnection]] = {}  # oldest first
        self.timed_out = 0
        self.refused = RateLimitedLog("http_connections_over_cap", log_every_s)
        self.client_refused = RateLimitedLog("http_client_over_cap", log_every_s, level="warning")
        self.reserve_refused = RateLimitedLog("http_reserved_for_vtex", log_every_s, level="warning")
        self.evicted = RateLimitedLog("http_connection_evicted", log_every_s, level="warning")
        self.slow = RateLimitedLog("http_read_timeout", log_every_s, level="info")
        self.stuck_writing = RateLimitedLog("http_write_timeout", log_every_s, level="info")
        self._by_handler: dict[RequestHandler, GuardedConnection] = {}

    def factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """The protocol factory for `loop.create_server`: aiohttp's handler, guarded."""
        return lambda: GuardedConnection(self, server())

    def admit(self, conn: GuardedConnection) -> bool | None:
        """Whether a new connection may open: True in the general slots, False in the reserve,
        None refused (and counted). Where the general slots are full, a connection waiting for
        a request (idle, or its headers not all in) of the client holding the most is closed
        first to make room: whoever holds many cannot keep out whoever holds few."""
        client = conn.client
        held = self.by_client.get(client, [])
        if len(held) >= self.max_per_client:
            self.client_refused.hit(remote=client, max_per_client=self.max_per_client)
            return None
        # With the general slots full, the newcomer takes the slot of a connection closed for it.
        made_room = self.open >= self.max_connections - self.reserve and self._evict_for(len(held))
        if self.open >= self.max_connections:
            self.refused.hit(max_connections=self.max_connections)
            return None
        self.open += 1
        self.by_client.setdefault(client, []).append(conn)
        return made_room or self.open <= self.max_connections - self.reserve

    def _evict_for(self, holds: int) -> bool:
        """Close the oldest waiting connection of the client holding the most, when it holds at
        least two more than the newcomer's client (so that equals never evict each other)."""
        if not self.by_client:
            return False
        biggest = max(self.by_client.values(), key=len)
        if len(biggest) < holds + 2:
            return False
        for victim in biggest:
            if victim.waiting:
                self.evicted.hit(remote=victim.client, held=len(biggest))
                victim.evict()
                return True
        return False

    def release(self, conn: GuardedConnection) -> None:
        held = self.by_client.get(conn.client)
        if held is None or conn not in held:
            return
        self.open -= 1
        held.remove(conn)
        if not held:
            del self.by_client[conn.client]

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Marks the headers as received, keeps the reserve for VTEX, and answers 408 when the
        body came too slowly."""
        conn = self._by_handler.get(request.protocol)
        if conn is not None:
            conn.headers_received(request)
        try:
            if conn is not None and conn.reserved:
                # A reserved slot serves one request, and only VTEX's authenticated ones.
                if not self.reserved_for(request):
                    self.reserve_refused.hit(remote=conn.client, method=request.method)  # no path: it may hold a secret
                    raise web.HTTPServiceUnavailable(
                        text="connection limit reached", headers={"Connection": "close", "Retry-After": "1"}
                    )
                request.protocol.close()  # once this request is answered
            response: web.StreamResponse = await handler(request)
            if conn is not None and conn.reserved:
                response.force_close()  # says `Connection: close`
        except SlowRequest as exc:
            raise web.HTTPRequestTimeout(text=str(exc), headers={"Connection": "close"}) from None
        finally:
            if conn is not None:
                conn.request_done()
        return response


RESERVE_SHARE = 16
"""One slot in this many (none below 16 connections) is kept for VTEX's authenticated requests."""


def client_of(transport: asyncio.BaseTransport) -> str:
    """The client a connection counts against: its IP address, an IPv6 one by its /64 (one
    host usually holds a whole /64); `-` without one (a Unix socket)."""
    peer = transport.get_extra_info("peername")
    host = peer[0] if isinstance(peer, tuple) and peer else None
    if not isinstance(host, str):
        return "-"
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    return str(address)


class GuardedConnection(asyncio.Protocol):
    """aiohttp's RequestHandler behind a read deadline, a write deadline and the admission
    rules (see the module's docstring)."""

    def __init__(self, guard: ConnectionGuard, inner: RequestHandler) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.BaseTransport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._write_deadline: asyncio.TimerHandle | None = None
        self._request: web.Request | None = None
        self._in_request = False
        self.client = "-"
        self.reserved = False

    @property
    def waiting(self) -> bool:
        """Not in a request: idle between requests, or its headers not all in yet."""
        return not self._in_request

    def evict(self) -> None:
        """Closed to make room for a client holding fewer (see `ConnectionGuard.admit`)."""
        self._guard.release(self)
        if self._transport is not None:
            self._transport.abort()  # type: ignore[attr-defined]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        self.client = client_of(transport)
        admitted = guard.admit(self)
        if admitted is None:
            transport.abort()  # type: ignore[attr-defined]
            self._inner = None  # type: ignore[assignment]
            return
        self.reserved = not admitted
        self._transport = transport
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
        """The client does not take what it is sent (a pipelining client that never reads):
        it has the read timeout to start taking it again, or the connection is cut."""
        if self._write_deadline is None:
            loop = asyncio.get_running_loop()
            self._write_deadline = loop.call_later(self._guard.read_timeout_s, self._write_expired)
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is None:
            return
        self._disarm()
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None
        self._guard.release(self)
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

    def _write_expired(self) -> None:
        self._write_deadline = None
        self._guard.timed_out += 1
        self._guard.stuck_writing.hit(timeout_s=self._guard.read_timeout_s, remote=self.client)
        if self._transport is not None:
            self._transport.abort()  # type: ignore[attr-defined]

    def _expired(self) -> None:
        self._deadline = None
        self._guard.timed_out += 1
        timeout = self._guard.read_timeout_s
        request = self._request
        if request is not None and not request.content.is_eof():
            self._guard.slow.hit(part="body", timeout_s=timeout, remote=self.client)
            request.content.set_exception(SlowRequest(f"request body not received within {timeout:g}s"))
        else:
            self._guard.slow.hit(part="headers", timeout_s=timeout, remote=self.client)
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
