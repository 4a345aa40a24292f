"""The simulator's aiohttp app: VTEX's routes (feed v3 and its configuration, the order
hook configuration, Get order, the Channel Order API) on loopback, plus its own control
surface under `/_sim/`. `Simulator` is the one object tests, benchmarks and the demo use.

Every `/api/` request passes fault injection first (faults.py), then the credential and
header checks of doc §0/§7 (validation.py); each contract refusal is recorded in
`protocol_errors`, which the end-to-end tests assert stays empty.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from aiohttp import web

from .channel import Channel
from .clock import vtex_time
from .faults import FaultInjector, Faults, Handler
from .feed import Feed, FeedQueue
from .hook import Hook
from .orders import Orders, SimOrder
from .runtime import Runtime
from .statuses import can_cancel, is_completed
from .validation import check_credentials, check_json_headers

DEFAULT_APP_KEY = "vtexappkey-simstore-SIM"
DEFAULT_APP_TOKEN = "sim-app-token-please-rotate"  # noqa: S105 - the simulator's own fake credential


class Simulator:
    def __init__(
        self,
        *,
        account: str = "simstore",
        app_key: str = DEFAULT_APP_KEY,
        app_token: str = DEFAULT_APP_TOKEN,
        seed: int | None = 7,
        faults: Faults | None = None,
        visibility_override_s: float | None = None,
        step_delay_s: float = 0.05,
    ) -> None:
        self.account = account
        self.app_key = app_key
        self.app_token = app_token
        self.runtime = Runtime(seed)
        self.injector = FaultInjector(faults or Faults(), self.runtime.rng)
        self.order_book = Orders(self.runtime, step_delay_s)
        self.feed = Feed(self.runtime, self.faults, visibility_override_s)
        self.hook = Hook(self.runtime, self.faults, account, app_key)
        self.channel = Channel(self.runtime, self.order_book, self.injector, account)
        self.order_book.listeners += [self.feed.on_change, self.hook.on_change]
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self.prefix = ""  # the path this account is served under in a `SimFleet` (sim/fleet.py)

    # ---- what callers read and switch -------------------------------------------------
    @property
    def faults(self) -> Faults:
        return self.injector.faults

    @property
    def queue(self) -> FeedQueue:
        return self.feed.queue

    @property
    def feed_config(self) -> dict[str, Any] | None:
        return self.feed.config

    @feed_config.setter
    def feed_config(self, value: dict[str, Any] | None) -> None:
        self.feed.config = value

    @property
    def hook_config(self) -> dict[str, Any] | None:
        return self.hook.config

    @hook_config.setter
    def hook_config(self, value: dict[str, Any] | None) -> None:
        self.hook.config = value

    @property
    def visibility_override_s(self) -> float | None:
        return self.feed.visibility_override_s

    @visibility_override_s.setter
    def visibility_override_s(self, value: float | None) -> None:
        self.feed.visibility_override_s = value

    @property
    def malformed(self) -> list[Any]:
        """Raw items (e.g. malformed) delivered on a later feed GET."""
        return self.feed.malformed

    @property
    def orders(self) -> dict[str, SimOrder]:
        return self.order_book.by_id

    @property
    def calls(self) -> dict[str, int]:
        return self.runtime.calls

    @property
    def protocol_errors(self) -> list[str]:
        return self.runtime.protocol_errors

    @property
    def rate_limited(self) -> int:
        return self.injector.rate_limited

    @property
    def account_limited(self) -> int:
        """429s the account's limit answered (of `rate_limited`)."""
        return self.injector.account_limited

    @property
    def arrivals(self) -> list[tuple[float, str]]:
        """(monotonic time, route) of every API request that reached the simulator."""
        return self.injector.arrivals

    @property
    def inside_retry_after(self) -> dict[str, int]:
        """Requests that arrived inside a Retry-After window announced for their own route,
        and inside one announced for any route (sim/faults.py, RetryAfterWindows)."""
        w = self.injector.windows
        return {"route": w.inside_route, "account": w.inside_account}

    @property
    def hook_pushes(self) -> list[dict[str, Any]]:
        return self.hook.pushes

    @property
    def hook_pushes_lost(self) -> int:
        return self.hook.pushes_lost

    @property
    def hook_pings(self) -> list[int]:
        return self.hook.pings

    @property
    def notifications_sent(self) -> list[dict[str, Any]]:
        return self.channel.notifications_sent

    def signal(self, name: str) -> asyncio.Event:
        """An event set each time `name` happens (feed_get, feed_commit, put, get_order)."""
        return self.runtime.signal(name)

    def create(self, marketplace_order_id: str, **kw: Any) -> SimOrder:
        """A new order in the seller account (orders.Orders.create)."""
        return self.order_book.create(marketplace_order_id, **kw)

    def authorize(self, order_id: str) -> None:
        self.order_book.authorize(order_id)

    def reject(self, order_id: str) -> None:
        self.order_book.reject(order_id)

    def hold(self, order_id: str) -> None:
        self.order_book.hold(order_id)

    # ---- lifecycle -----------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        r.add_get("/api/orders/feed", self.feed.get)
        r.add_post("/api/orders/feed", self.feed.commit)
        r.add_get("/api/orders/feed/config", self.feed.get_config)
        r.add_post("/api/orders/feed/config", self.feed.post_config)
        r.add_delete("/api/orders/feed/config", self.feed.delete_config)
        r.add_get("/api/orders/hook/config", self.hook.get_config)
        r.add_post("/api/orders/hook/config", self.hook.post_config)
        r.add_delete("/api/orders/hook/config", self.hook.delete_config)
        r.add_get("/api/oms/pvt/orders/{order_id}", self._get_order)
        r.add_put("/api/order-integration/orders/status", self.channel.put_status)
        r.add_post("/api/order-integration/orders", self.channel.create_order)
        r.add_post("/_sim/orders", self._sim_create)
        r.add_get("/_sim/orders", self._sim_orders)
        r.add_post("/_sim/orders/{order_id}/{action}", self._sim_action)
        r.add_get("/_sim/stats", self._sim_stats)
        r.add_post("/_sim/faults", self._sim_faults)
        r.add_post("/_sim/feed/inject", self._sim_inject)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        bound_port = sockets[0].getsockname()[1] if sockets else port
        self.base_url = f"http://{host}:{bound_port}"
        return self.base_url

    async def stop(self) -> None:
        await self.runtime.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(f"{self.prefix}/api/"):
            return await handler(request)
        faulty = await self.injector.apply(request, handler)
        if faulty is not None:
            return faulty
        if not check_credentials(request, self.app_key, self.app_token):
            return web.json_response({"error": "unauthorized"}, status=401)
        problem = check_json_headers(request)
        if problem:
            self.runtime.refuse(f"{request.method} {request.path}: {problem}")
            return web.json_response({"error": problem}, status=400)
        return await handler(request)

    # ---- Get order (§5) --------------------------------------------------------------------
    def order_json(self, order: SimOrder) -> dict[str, Any]:
        return {
            "orderId": order.order_id,
            "sequence": order.order_id.split("-")[-2][-6:],
            "marketplaceOrderId": order.marketplace_order_id,
            "marketplaceServicesEndpoint": None,
            "sellerOrderId": f"00-{order.order_id}",
            "origin": "Fulfillment",
            "affiliateId": order.affiliate_id,
            "salesChannel": "1",
            "status": order.status,
            "statusDescription": "",
            "lastChange": vtex_time(order.last_change).replace("Z", "+00:00"),
            "creationDate": order.history[0][1] if order.history else None,
            "workflowIsInError": False,
            "isCompleted": is_completed(order.status),
            "allowCancellation": can_cancel(order.status),
            "hostname": self.account,
        }

    async def _get_order(self, request: web.Request) -> web.Response:
        self.runtime.count("get_order")
        order = self.orders.get(request.match_info["order_id"])
        if order is None:
            return web.json_response({"error": {"code": "OMS003", "message": "Order not found"}}, status=404)
        return web.json_response(self.order_json(order))

    # ---- control surface -------------------------------------------------------------
    async def _sim_create(self, request: web.Request) -> web.Response:
        body = await request.json()
        order = self.create(
            str(body["marketplaceOrderId"]),
            held=bool(body.get("held", False)),
            decision=body.get("decision", "authorize"),
            decide_after_s=float(body.get("decideAfterS", 1.0)),
            flip_back=int(body.get("flipBack", 0)),
        )
        return web.json_response(self.order_json(order))

    async def _sim_orders(self, request: web.Request) -> web.Response:
        return web.json_response({o.order_id: o.state() for o in self.orders.values()})

    async def _sim_action(self, request: web.Request) -> web.Response:
        order_id = request.match_info["order_id"]
        if order_id not in self.orders:
            return web.json_response({"error": "unknown order"}, status=404)
        actions = {"authorize": self.authorize, "reject": self.reject, "hold": self.hold}
        action = actions.get(request.match_info["action"])
        if action is None:
            return web.json_response({"error": "unknown action"}, status=404)
        action(order_id)
        return web.json_response(self.order_json(self.orders[order_id]))

    async def _sim_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _sim_faults(self, request: web.Request) -> web.Response:
        body = await request.json()
        for key, value in body.items():
            if hasattr(self.faults, key):
                current = getattr(self.faults, key)
                setattr(self.faults, key, tuple(value) if isinstance(current, tuple) else value)
        return web.json_response(asdict(self.faults))

    async def _sim_inject(self, request: web.Request) -> web.Response:
        self.malformed.append(await request.json())
        return web.json_response({"queued": len(self.malformed)})

    def stats(self) -> dict[str, Any]:
        orders = self.orders.values()
        notified = self.channel.notifications_sent
        return {
            "calls": dict(self.calls),
            "orders": len(self.orders),
            "queue": len(self.queue.messages),
            "deliveries": self.queue.deliveries,
            "deleted": self.queue.deleted,
            "expired": self.queue.expired,
            "puts": sum(o.puts for o in orders),
            "puts_while_held": sum(o.puts_while_held for o in orders),
            "approvals_applied": sum(o.approvals_applied for o in orders),
            "notifications_sent": len(notified),
            "eoi011": sum(1 for n in notified if n.get("code") == "EOI011") + self.channel.eoi011_sync_answers,
            "notification_failures": self.channel.notification_failures,
            "rate_limited": self.rate_limited,
            "account_limited": self.account_limited,
            "inside_retry_after": self.inside_retry_after,
            "hook_pushes": len(self.hook.pushes),
            "hook_pushes_lost": self.hook.pushes_lost,
            "protocol_errors": list(self.protocol_errors),
        }

    def credentials(self) -> list[tuple[str, str]]:
        """What a client must present to this simulator, for `omsd sim` to print."""
        return [
            ("base URL", self.base_url),
            ("account (host or `an`)", self.account),
            ("X-VTEX-API-AppKey", self.app_key),
            ("X-VTEX-API-AppToken", self.app_token),
            ("hook", "none checked: pushes carry the headers POST /api/orders/hook/config gave"),
            ("notifications", "none sent: VTEX documents no credential on them"),
        ]


async def serve(host: str, port: int, **kwargs: Any) -> None:
    """Run the simulator until cancelled (`omsd sim`), after printing what it accepts."""
    sim = Simulator(**kwargs)
    await sim.start(host, port)
    print("simulated VTEX is listening; it accepts:", flush=True)
    for name, value in sim.credentials():
        print(f"  {name:<24} {value}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()


async def serve_fleet(host: str, port: int, accounts: list[str], **kwargs: Any) -> None:
    """`omsd sim --accounts a,b`: many accounts (sim/fleet.py), each's credentials printed."""
    from .fleet import SimFleet

    fleet = SimFleet(accounts, **kwargs)
    await fleet.start(host, port)
    print("simulated VTEX is listening; each account accepts:", flush=True)
    for sim in fleet:
        for name, value in sim.credentials():
            print(f"  {sim.account:<12} {name:<24} {value}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await fleet.stop()
