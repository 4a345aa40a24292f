"""A fleet's routes: one HTTP server for every account, each request dispatched to its account.

- The connector's API per account: `/v1/accounts/{account}/approvals`, `/orders/{key}`,
  `/status`, `/events` and `/events/stream`, with the operator's token (the main
  environment's `OMSD_API_TOKEN`) or the account's own (`OMSD_API_TOKEN` in its NAME.env,
  which opens that account's routes only). The unscoped `/v1/...` routes serve the one
  account while there is one; with several they answer 404 naming the account routes.
- VTEX's hook per account at `/vtex/hook/{account}`, with that account's secret header. An
  unknown account answers exactly as a wrong secret does (VTEX's ping answered, else 401), so
  that the hook route tells an outsider nothing about which accounts exist.
- VTEX's notifications on the capability path `/notify/SECRET/...`: the secret names the
  account (looked up by its SHA-256, then compared in constant time), and `?an=` must match
  it. An unknown secret answers 404 like any unknown route.
- An account that is configured but not running (its start failed, it waits to try again)
  answers 503 with Retry-After to requests that prove its credential, so that VTEX and the
  connector retry; the others get what an unknown account gets.
- `/healthz`, `/readyz` and `/metrics` are the process's. `/readyz` is 200 once every account
  had its first start (whatever became of it: one account's fault must not take the whole
  fleet out of a load balancer or have it restarted); its body gives each account's readiness,
  and `/readyz?account=NAME` answers that account's own 200 or 503.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import structlog
from aiohttp import web
from pydantic import SecretStr

from ..config.settings import NOTIFY_PREFIX, Settings
from ..ops.logs import redact
from ..ops.metrics import CONTENT_TYPE_LATEST
from . import events
from .common import (
    MAX_BODY,
    ApiContext,
    AttackLogs,
    Handler,
    bearer_matches,
    context_of,
    error,
    errors,
    resolver_key,
)
from .connector import approvals, show_order, status
from .vtex import HOOK_ROUTE, NOTIFICATION_ROUTE, hook, hook_ping_or_401, notification, notification_unauthenticated

Audience = Literal["connector", "hook", "notify", "bare"]
DEFAULT_HOOK_HEADER = Settings.model_fields["hook_header"].default
RETRY_AFTER_S = 30  # an account that is not running: when to try again
ACCOUNT = "{account:[A-Za-z0-9][A-Za-z0-9-]{0,62}}"
CONNECTOR_ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/approvals", approvals),
    ("GET", "/orders/{key}", show_order),
    ("GET", "/status", status),
    ("GET", "/events", events.events),
    ("GET", "/events/stream", events.stream),
]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "replace")).digest()


@dataclass
class Directory:
    """The accounts the server serves: every configured account's settings (its secrets are
    checked even while it is not running) and, while it runs, its routes' context."""

    operator_token: SecretStr | None = None
    configured: dict[str, Settings] = field(default_factory=dict)
    running: dict[str, ApiContext] = field(default_factory=dict)
    down: dict[str, str] = field(default_factory=dict)  # why an account is not running (its start failed...)
    started: bool = False  # every account had its first start (/readyz)
    attack_logs: AttackLogs = field(default_factory=AttackLogs)
    render_metrics: Callable[[], Awaitable[bytes]] | None = None
    _notify: dict[bytes, str] = field(default_factory=dict)  # sha256 of a notification secret -> account
    _routes: dict[Any, Audience] = field(default_factory=dict)  # route -> whose it is
    _scoped: set[Any] = field(default_factory=set)  # routes that name their account

    def configure(self, name: str, settings: Settings | None, problem: str | None = None) -> None:
        """An account as its NAME.env now says (settings None: the file is wrong, `problem` says how)."""
        self.remove(name)
        if settings is not None:
            self.configured[name] = settings
            self._notify[_digest(settings.notify_key.get_secret_value())] = name
            redact(settings.notify_key.get_secret_value())
        if problem is not None:
            self.down[name] = problem

    def remove(self, name: str) -> None:
        settings = self.configured.pop(name, None)
        if settings is not None:
            self._notify.pop(_digest(settings.notify_key.get_secret_value()), None)
        self.running.pop(name, None)
        self.down.pop(name, None)

    def attach(self, name: str, ctx: ApiContext | None) -> None:
        """`Host.serve`: the account's routes go to `ctx` (None: nowhere, it stopped)."""
        if ctx is None:
            self.running.pop(name, None)
            return
        ctx.operator_token = self.operator_token
        self.running[name] = ctx
        self.down.pop(name, None)

    def names(self) -> list[str]:
        return sorted({*self.configured, *self.down})

    def only(self) -> str | None:
        """The account the unscoped routes serve: the one there is, else none."""
        names = self.names()
        return names[0] if len(names) == 1 else None

    def notify_account(self, key: str) -> str | None:
        name = self._notify.get(_digest(key))
        settings = self.configured.get(name) if name is not None else None
        if settings is None:
            return None
        expected = settings.notify_key.get_secret_value().encode()
        return name if hmac.compare_digest(key.encode("utf-8", "replace"), expected) else None

    def account_of(self, request: web.Request) -> str | None:
        """The account a request names: in its path, by its notification secret, by `?an=` on the
        bare notification route, or the only one for the unscoped routes."""
        route = request.match_info.route
        audience = self._routes.get(route)
        if audience is None:
            return None
        if route in self._scoped:
            return request.match_info.get("account")
        if audience == "notify":
            return self.notify_account(request.match_info.get("key", ""))
        if audience == "bare":
            given = request.query.getall("an", [])
            settings = self.configured.get(given[0]) if len(given) == 1 else None
            return given[0] if settings is not None and settings.notify_allow_unauthenticated else None
        return self.only()

    def resolve(self, request: web.Request) -> ApiContext | None:
        name = self.account_of(request)
        return self.running.get(name) if name is not None else None

    async def readiness(self, name: str, *, fresh: bool) -> list[str] | None:
        """Why the account is not ready ([] when it is; None: no such account). `fresh` asks
        the account's store probe for an answer at most a second old; otherwise its last."""
        ctx = self.running.get(name)
        if ctx is not None:
            problems = ctx.health.problems(await ctx.probe.fresh() if fresh else ctx.probe.ok)
            ctx.metrics.ready.set(0 if problems else 1)
            return problems
        if name in self.down:
            return [f"not running: {self.down[name]}"]
        if name in self.configured:
            return ["starting"]
        return None


directory_key = web.AppKey("directory", Directory)


def build_fleet_app(directory: Directory, connector_endpoint: str) -> web.Application:
    """The routes of a fleet (see the module)."""
    app = web.Application(middlewares=[errors], client_max_size=MAX_BODY)
    app[directory_key] = directory
    app[resolver_key] = directory.resolve
    r = app.router

    def add(method: str, path: str, handler: Handler, audience: Audience, *, scoped: bool = False) -> None:
        route = r.add_route(method, path, _dispatched(handler, audience))
        directory._routes[route] = audience
        if scoped:
            directory._scoped.add(route)

    for method, tail, handler in CONNECTOR_ROUTES:
        add(method, f"/v1/accounts/{ACCOUNT}{tail}", handler, "connector", scoped=True)
        add(method, f"/v1{tail}", handler, "connector")
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    prefix = urlsplit(connector_endpoint).path.rstrip("/")
    for base in {"", prefix}:
        add("POST", f"{base}{NOTIFY_PREFIX}/{{key}}{NOTIFICATION_ROUTE}", notification, "notify")
        add("POST", base + NOTIFICATION_ROUTE, notification_unauthenticated, "bare")
        add("POST", f"{base}{HOOK_ROUTE}/{ACCOUNT}", hook, "hook", scoped=True)
        add("POST", f"{base}{HOOK_ROUTE}", hook, "hook")
    return app


def _dispatched(handler: Handler, audience: Audience) -> Handler:
    async def dispatched(request: web.Request) -> web.StreamResponse:
        ctx = context_of(request)
        if ctx is None:
            return await _not_running(request, audience)
        with structlog.contextvars.bound_contextvars(account=ctx.settings.account):  # its log lines name it
            return await handler(request)

    dispatched.__name__ = handler.__name__
    return dispatched


async def _not_running(request: web.Request, audience: Audience) -> web.StreamResponse:
    """The answer for a request whose account is unknown, or configured but not running."""
    directory = request.app[directory_key]
    name = directory.account_of(request)
    settings = directory.configured.get(name) if name is not None else None
    if audience == "connector":
        return _connector_refusal(request, directory, name, settings)
    if audience == "hook":
        return await _hook_refusal(request, directory, name, settings)
    if audience == "notify" and settings is not None:
        return _unavailable(f"account {name} is not running")
    directory.attack_logs.wrong_path.hit(remote=request.remote)
    raise web.HTTPNotFound()


def _connector_refusal(
    request: web.Request, directory: Directory, name: str | None, settings: Settings | None
) -> web.Response:
    if name is None:
        return error(404, "this omsd serves several accounts: use /v1/accounts/{account}/... (see README, Fleet)")
    tokens = [t for t in (directory.operator_token, settings.api_token if settings else None) if t is not None]
    if tokens and not bearer_matches(request, tokens):
        directory.attack_logs.api_unauthorized.hit(path=request.path[:64], remote=request.remote)
        return error(401, "missing or wrong bearer token")
    if name in directory.configured or name in directory.down:
        return _unavailable(f"account {name} is not running: {directory.down.get(name, 'starting')}")
    return error(404, f"no account {name[:63]!r} here")


async def _hook_refusal(
    request: web.Request, directory: Directory, name: str | None, settings: Settings | None
) -> web.Response:
    """Unknown account, or not running: as a wrong secret would be answered (VTEX's ping gets
    its pong), except that a push proving a configured account's secret gets 503 (VTEX retries)."""
    if name is None and not directory.names():
        return error(404, "no account is configured")
    if name is None:
        return error(404, "this omsd serves several accounts: VTEX's hook is /vtex/hook/{account}")
    header = settings.hook_header if settings is not None else DEFAULT_HOOK_HEADER
    secret = settings.hook_secret if settings is not None else None
    given = request.headers.get(header, "").encode("utf-8", "replace")
    expected = secret.get_secret_value().encode() if secret is not None else _UNGUESSABLE
    if hmac.compare_digest(given, expected) and secret is not None:
        return _unavailable(f"account {name} is not running")
    return await hook_ping_or_401(request, directory.attack_logs.hook_unauthorized, header)


_UNGUESSABLE = hashlib.sha256(b"omsd: no such account").hexdigest().encode()


def _unavailable(reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=503, headers={"Retry-After": str(RETRY_AFTER_S)})


async def healthz(request: web.Request) -> web.Response:
    """The process answers; names the accounts whose intake is paused (database refusing writes)."""
    directory = request.app[directory_key]
    paused = sorted(n for n, ctx in directory.running.items() if ctx.health.store_problem is not None)
    body: dict[str, Any] = {"status": "ok", "accounts": len(directory.names())}
    if paused:
        body["paused"] = paused
    return web.json_response(body)


async def readyz(request: web.Request) -> web.Response:
    """The fleet's readiness with each account's, or `?account=NAME`: that account's alone."""
    directory = request.app[directory_key]
    name = request.query.get("account")
    if name is not None:
        problems = await directory.readiness(name, fresh=True)
        if problems is None:
            return error(404, f"no account {name[:63]!r} here")
        body: dict[str, Any] = {"account": name, "ready": not problems}
        if problems:
            body["problems"] = problems
        return web.json_response(body, status=503 if problems else 200)
    accounts: dict[str, Any] = {}
    for account in directory.names():
        problems = await directory.readiness(account, fresh=False) or []
        accounts[account] = {"ready": not problems, **({"problems": problems} if problems else {})}
    unready = [n for n, a in accounts.items() if not a["ready"]]
    body = {"ready": directory.started, "accounts": accounts, "unready": unready}
    return web.json_response(body, status=200 if directory.started else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text for the process and every account (daemon/fleet/metrics.py)."""
    directory = request.app[directory_key]
    body = await directory.render_metrics() if directory.render_metrics is not None else b""
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
