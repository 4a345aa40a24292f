"""A VTEX simulator on loopback: feed v3, feed config, Get order, the Channel Order
API (create, approve) with asynchronous notifications, and switchable faults.

It behaves as VTEX documents, including the parts that make integrations hard
(docs/simulator.md lists them): the feed is an SQS-standard queue (a new handle
per delivery, redelivery after the visibility timeout, duplicates, short and
empty batches, no ordering, retention); results of an approval arrive later, by
POST to the connector's endpoint; orders with a price divergence are held in
waiting-for-manual-authorization until the seller authorizes or rejects them;
429 carries Retry-After. It also checks every request against the rules of
VTEX's OpenAPI files and records each violation in `protocol_errors`.

Everything under `/_sim/` is the simulator's own control surface.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from omsd.daemon.logs import get_logger
from omsd.state.statuses import APPROVED_STATUSES, CANCEL_STATUSES, HELD, Status

log = get_logger("omsd.simulator")

NOTIFY_PATH = "/order-integration/notification/processing-result"


def vtex_time(dt: datetime) -> str:
    """VTEX's feed format: UTC with 7 fractional digits and a Z."""
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond:06d}0Z"


@dataclass
class Faults:
    """Switchable misbehaviour of the VTEX API routes (not of /_sim)."""

    latency_s: tuple[float, float] = (0.0, 0.0)
    rate_429: float = 0.0
    retry_after: str = "seconds"  # seconds | date | none
    retry_after_s: float = 1.0
    rate_5xx: float = 0.0
    rate_drop: float = 0.0
    rate_eoi000: float = 0.0  # approval PUT answered EOI000 (nothing done)
    duplicate_rate: float = 0.0  # feed: also deliver an in-flight message again
    notification_duplicate_rate: float = 0.0
    short_batches: bool = True
    eoi011_sync: bool = False  # answer EOI011 in the PUT itself instead of by notification
    notify_delay_s: tuple[float, float] = (0.02, 0.2)
    refuse_commits: int = 0  # the next N feed commits get 503 (and delete nothing)
    hook_duplicate_rate: float = 0.0  # a push is delivered twice
    hook_give_up_rate: float = 0.0  # a push is never delivered (VTEX gave up on it)
    hook_without_current_change: bool = False  # pushes shaped like the guide's example
    hook_attempts: int = 8  # deliveries tried per push, with a growing delay


@dataclass
class SimOrder:
    order_id: str
    marketplace_order_id: str
    affiliate_id: str
    status: str
    last_change: datetime
    held: bool = False
    decision: str | None = None  # authorize | reject | None (a person has not decided)
    decide_after_s: float = 1.0
    flip_back: int = 0  # times an approval finds the order put back on hold
    release_status: str = Status.WAITING_FFMT_AUTHORIZATION.value
    history: list[tuple[str, str]] = field(default_factory=list)
    puts: int = 0
    puts_while_held: int = 0
    approvals_applied: int = 0
    was_held: bool = False
    authorized: bool = False  # the seller accepted the price divergence


@dataclass
class _Message:
    msg_id: str
    body: dict[str, Any]
    sent_at: float
    visible_at: float
    receipts: int = 0


class FeedQueue:
    """SQS-standard semantics: at-least-once, no ordering, handles per delivery."""

    def __init__(self, rng: random.Random, clock: Callable[[], float]) -> None:
        self._rng = rng
        self._clock = clock
        self.messages: dict[str, _Message] = {}
        self._handles: dict[str, str] = {}
        self.visibility_timeout_s = 240.0
        self.retention_s = 345600.0
        self.deliveries = 0
        self.deleted = 0
        self.expired = 0

    def put(self, body: dict[str, Any]) -> None:
        msg_id = uuid.uuid4().hex
        now = self._clock()
        self.messages[msg_id] = _Message(msg_id=msg_id, body=body, sent_at=now, visible_at=now)

    def _expire(self, now: float) -> None:
        for msg_id in [m.msg_id for m in self.messages.values() if now - m.sent_at > self.retention_s]:
            del self.messages[msg_id]
            self.expired += 1

    def receive(self, maxlot: int, *, short: bool, duplicate_rate: float) -> list[dict[str, Any]]:
        now = self._clock()
        self._expire(now)
        visible = [m for m in self.messages.values() if m.visible_at <= now]
        self._rng.shuffle(visible)
        # SQS does not promise to return what is there: sometimes fewer, sometimes none.
        sizes = [0, 1, self._rng.randint(1, maxlot), maxlot, maxlot]
        size = self._rng.choice(sizes) if short and visible else maxlot
        chosen = visible[:size]
        if duplicate_rate and self._rng.random() < duplicate_rate:
            in_flight = [m for m in self.messages.values() if m.visible_at > now and m not in chosen]
            if in_flight and len(chosen) < maxlot:
                chosen.append(self._rng.choice(in_flight))
        out = []
        for m in chosen:
            handle = f"h.{m.msg_id}.{m.receipts}.{uuid.uuid4().hex[:12]}"
            m.receipts += 1
            m.visible_at = now + self.visibility_timeout_s
            self._handles[handle] = m.msg_id
            self.deliveries += 1
            out.append({**m.body, "handle": handle})
        return out

    def delete(self, handle: str) -> bool:
        msg_id = self._handles.pop(handle, None)
        if msg_id is None or msg_id not in self.messages:
            return False
        del self.messages[msg_id]
        self.deleted += 1
        return True

    def oldest_age_s(self) -> float:
        now = self._clock()
        return max((now - m.sent_at for m in self.messages.values()), default=0.0)


class Simulator:
    def __init__(
        self,
        *,
        account: str = "simstore",
        app_key: str = "vtexappkey-simstore-SIM",
        app_token: str = "sim-app-token-please-rotate",  # noqa: S107 - the simulator's own fake credential
        seed: int | None = 7,
        faults: Faults | None = None,
        visibility_override_s: float | None = None,
        feed_configured: bool = False,
        decide_delay_scale: float = 1.0,
        step_delay_s: float = 0.05,
    ) -> None:
        self.account = account
        self.app_key = app_key
        self.app_token = app_token
        self.rng = random.Random(seed)
        self.faults = faults or Faults()
        self.visibility_override_s = visibility_override_s
        self.decide_delay_scale = decide_delay_scale
        self.step_delay_s = step_delay_s
        self.queue = FeedQueue(self.rng, self._mono)
        self.feed_config: dict[str, Any] | None = None
        self.hook_config: dict[str, Any] | None = None
        self.hook_pushes: list[dict[str, Any]] = []
        self.hook_push_failures = 0
        self.hook_pushes_lost = 0
        self.hook_pings: list[int] = []
        self.orders: dict[str, SimOrder] = {}
        self.by_marketplace_id: dict[str, str] = {}
        self.protocol_errors: list[str] = []
        self.calls: dict[str, int] = {}
        self.notifications_sent: list[dict[str, Any]] = []
        self.notification_failures = 0
        self.rate_limited = 0
        self.eoi011_sync_answers = 0
        self.feed_deletes_after_inactivity = 0
        self._last_clock = datetime.now(UTC)
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.base_url = ""
        self.events: dict[str, asyncio.Event] = {}
        self.malformed: list[Any] = []
        if feed_configured:
            self.feed_config = {
                "filter": {"type": "FromWorkflow", "status": [s.value for s in Status]},
                "queue": {"visibilityTimeoutInSeconds": 240, "messageRetentionPeriodInSeconds": 345600},
            }
            self._apply_queue_settings()

    # ---- lifecycle -----------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._faults_middleware])
        r = app.router
        r.add_get("/api/orders/feed", self._get_feed)
        r.add_post("/api/orders/feed", self._commit_feed)
        r.add_get("/api/orders/feed/config", self._get_feed_config)
        r.add_post("/api/orders/feed/config", self._post_feed_config)
        r.add_delete("/api/orders/feed/config", self._delete_feed_config)
        r.add_get("/api/orders/hook/config", self._get_hook_config)
        r.add_post("/api/orders/hook/config", self._post_hook_config)
        r.add_delete("/api/orders/hook/config", self._delete_hook_config)
        r.add_get("/api/oms/pvt/orders/{order_id}", self._get_order)
        r.add_put("/api/order-integration/orders/status", self._put_status)
        r.add_post("/api/order-integration/orders", self._create_order)
        r.add_post("/_sim/orders", self._sim_create)
        r.add_get("/_sim/orders", self._sim_orders)
        r.add_post("/_sim/orders/{order_id}/{action}", self._sim_action)
        r.add_get("/_sim/stats", self._sim_stats)
        r.add_post("/_sim/faults", self._sim_faults)
        r.add_post("/_sim/feed/inject", self._sim_inject)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
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
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _mono() -> float:
        return asyncio.get_running_loop().time()

    def _now(self) -> datetime:
        now = datetime.now(UTC)
        if now <= self._last_clock:
            now = self._last_clock + timedelta(microseconds=1)
        self._last_clock = now
        return now

    def signal(self, name: str) -> asyncio.Event:
        """An event set each time `name` happens (feed_get, feed_commit, put, get_order)."""
        return self.events.setdefault(name, asyncio.Event())

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.signal(name).set()

    # ---- orders and their flow --------------------------------------------------------
    def create(
        self,
        marketplace_order_id: str,
        *,
        held: bool = False,
        decision: str | None = "authorize",
        decide_after_s: float = 1.0,
        flip_back: int = 0,
        affiliate_id: str = "MKP",
        release_status: str = Status.WAITING_FFMT_AUTHORIZATION.value,
    ) -> SimOrder:
        if marketplace_order_id in self.by_marketplace_id:
            return self.orders[self.by_marketplace_id[marketplace_order_id]]
        order_id = f"{affiliate_id}-{marketplace_order_id}-01"
        order = SimOrder(
            order_id=order_id,
            marketplace_order_id=marketplace_order_id,
            affiliate_id=affiliate_id,
            status="",
            last_change=self._now(),
            held=held,
            decision=decision,
            decide_after_s=decide_after_s,
            flip_back=flip_back,
            release_status=release_status,
        )
        self.orders[order_id] = order
        self.by_marketplace_id[marketplace_order_id] = order_id
        self._move(order, Status.ORDER_CREATED.value)
        self._spawn(self._initial_flow(order))
        return order

    async def _initial_flow(self, order: SimOrder) -> None:
        """order-created → order-accepted → held or released; a step is skipped when
        something else (a cancel, a hold) has moved the order meanwhile."""
        await asyncio.sleep(self.step_delay_s)
        if order.status != Status.ORDER_CREATED.value:
            return
        self._move(order, Status.ORDER_ACCEPTED.value)
        await asyncio.sleep(self.step_delay_s)
        if order.status != Status.ORDER_ACCEPTED.value:
            return
        if order.held:
            self._move(order, HELD.value)
            if order.decision is not None:
                self._spawn(self._decide_later(order))
        else:
            self._move(order, order.release_status)

    async def _decide_later(self, order: SimOrder) -> None:
        await asyncio.sleep(order.decide_after_s * self.decide_delay_scale)
        if order.decision == "reject":
            self.reject(order.order_id)
        else:
            self.authorize(order.order_id)

    def authorize(self, order_id: str) -> None:
        """The seller approves the price divergence."""
        order = self.orders[order_id]
        if order.status == HELD.value:
            order.authorized = True
            self._move(order, order.release_status)

    def reject(self, order_id: str) -> None:
        """The seller refuses the price divergence: the order is canceled."""
        order = self.orders[order_id]
        if order.status in CANCEL_STATUSES:
            return
        self._move(order, Status.CANCEL.value)
        self._spawn(self._finish_cancel(order))

    async def _finish_cancel(self, order: SimOrder) -> None:
        await asyncio.sleep(self.step_delay_s)
        self._move(order, Status.CANCELED.value)

    def hold(self, order_id: str) -> None:
        order = self.orders[order_id]
        if order.status not in CANCEL_STATUSES and order.status not in APPROVED_STATUSES:
            self._move(order, HELD.value)

    def _move(self, order: SimOrder, status: str) -> None:
        last_state, last_change = order.status, order.last_change
        order.status = status
        order.last_change = self._now()
        if status == HELD.value:
            order.was_held = True
        order.history.append((status, vtex_time(order.last_change)))
        self._emit_feed(order, last_state, last_change)
        self._emit_hook(order, last_state, last_change)

    def _emit_hook(self, order: SimOrder, last_state: str, last_change: datetime) -> None:
        config = self.hook_config
        if config is None or not _in_filter(config, order.status):
            return
        if self.rng.random() < self.faults.hook_give_up_rate:
            self.hook_pushes_lost += 1
            return
        body: dict[str, Any] = {
            "Domain": "Fulfillment",
            "OrderId": order.order_id,
            "State": order.status,
            "LastState": last_state,
            "LastChange": vtex_time(last_change),
            "CurrentChange": vtex_time(order.last_change),
            "Origin": {"Account": self.account, "Key": self.app_key},
        }
        if self.faults.hook_without_current_change:
            body = {k: v for k, v in body.items() if k not in ("LastState", "CurrentChange")}
            body["LastChange"] = vtex_time(order.last_change)
        copies = 2 if self.rng.random() < self.faults.hook_duplicate_rate else 1
        for _ in range(copies):
            self._spawn(self._push(config, body))

    async def _push(self, config: dict[str, Any], body: dict[str, Any]) -> None:
        """Deliver one push; retried with a geometric delay, then given up."""
        assert self._session is not None
        hook = config["hook"]
        for attempt in range(self.faults.hook_attempts):
            try:
                async with self._session.post(hook["url"], json=body, headers=hook["headers"]) as resp:
                    if resp.status == 200:
                        self.hook_pushes.append(body)
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            self.hook_push_failures += 1
            await asyncio.sleep(min(5.0, 0.1 * 2**attempt))
        self.hook_pushes_lost += 1

    def _emit_feed(self, order: SimOrder, last_state: str, last_change: datetime) -> None:
        config = self.feed_config
        if config is None or not _in_filter(config, order.status):
            return  # a feed only receives changes made after it is configured
        self.queue.put(
            {
                "eventId": uuid.uuid4().hex.upper(),
                "domain": "Fulfillment",
                "state": order.status,
                "lastState": last_state,
                "orderId": order.order_id,
                "lastChange": vtex_time(last_change),
                "currentChange": vtex_time(order.last_change),
            }
        )

    async def _approve_flow(self, order: SimOrder, endpoint: str) -> None:
        await asyncio.sleep(self.rng.uniform(*self.faults.notify_delay_s))
        if order.status == HELD.value or (order.held and not order.authorized):
            # A price divergence blocks the approval until the seller decides.
            await self._notify(
                endpoint, order.marketplace_order_id, "EOI011", False, "Order is waiting for manual authorization"
            )
            return
        if order.status in CANCEL_STATUSES or order.status in APPROVED_STATUSES:
            await self._notify(
                endpoint, order.marketplace_order_id, "EOI009", False, "Order is out of a valid status to approve"
            )
            return
        if order.status == Status.ORDER_CREATED.value:
            await self._notify(endpoint, order.marketplace_order_id, "EOI008", False, "Order not integrated yet")
            return
        order.approvals_applied += 1
        self._move(order, Status.AUTHORIZE_FULFILLMENT.value)
        await self._notify(endpoint, order.marketplace_order_id, "SOI002", True, "Order approved successfully")
        for status in (Status.WINDOW_TO_CANCEL, Status.READY_FOR_HANDLING):
            await asyncio.sleep(self.step_delay_s)
            if order.status in CANCEL_STATUSES:
                return
            self._move(order, status.value)

    async def _notify(self, endpoint: str, marketplace_order_id: str, code: str, success: bool, message: str) -> None:
        body = {
            "marketplaceOrderId": marketplace_order_id,
            "accountName": self.account,
            "code": code,
            "flow": "ApproveOrder",
            "success": success,
            "operationId": str(uuid.uuid4()),
            "errors": None if success else [{"source": "Order Integration", "code": code, "description": message}],
            "fields": {"mainOrderId": f"MKP-{marketplace_order_id}", "franchiseOrderId": None} if success else None,
            "message": message,
        }
        copies = 2 if self.rng.random() < self.faults.notification_duplicate_rate else 1
        for _ in range(copies):
            await self._post_notification(endpoint, body)

    async def _post_notification(self, endpoint: str, body: dict[str, Any]) -> None:
        assert self._session is not None
        url = f"{endpoint}{NOTIFY_PATH}"
        for attempt in range(6):
            try:
                async with self._session.post(url, params={"an": self.account}, json=body) as resp:
                    if 200 <= resp.status < 300:
                        self.notifications_sent.append(body)
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            self.notification_failures += 1
            await asyncio.sleep(min(5.0, 0.2 * 2**attempt))

    # ---- request checks ---------------------------------------------------------------
    def _check_headers(self, request: web.Request) -> web.Response | None:
        if (
            request.headers.get("X-VTEX-API-AppKey") != self.app_key
            or request.headers.get("X-VTEX-API-AppToken") != self.app_token
        ):
            return web.json_response({"error": "unauthorized"}, status=401)
        for name in ("Accept", "Content-Type"):
            if "application/json" not in request.headers.get(name, ""):
                self.protocol_errors.append(f"{request.method} {request.path}: header {name} missing")
                return web.json_response({"error": f"{name} must be application/json"}, status=400)
        return None

    @web.middleware
    async def _faults_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith("/api/"):
            return await handler(request)  # type: ignore[no-any-return]
        f = self.faults
        lo, hi = f.latency_s
        if hi > 0:
            await asyncio.sleep(self.rng.uniform(lo, hi))
        if f.rate_429 and self.rng.random() < f.rate_429:
            self.rate_limited += 1
            headers = {}
            if f.retry_after == "seconds":
                headers["Retry-After"] = str(int(f.retry_after_s) if f.retry_after_s >= 1 else f.retry_after_s)
            elif f.retry_after == "date":
                headers["Retry-After"] = format_datetime(
                    datetime.now(UTC) + timedelta(seconds=f.retry_after_s), usegmt=True
                )
            return web.json_response({"error": "Too Many Requests"}, status=429, headers=headers)
        if f.rate_drop and self.rng.random() < f.rate_drop:
            if request.method == "PUT" and self.rng.random() < 0.5:
                await handler(request)  # processed, but the answer is lost
            if request.transport is not None:
                request.transport.close()
            raise web.HTTPServiceUnavailable()
        if f.rate_5xx and self.rng.random() < f.rate_5xx:
            if request.method == "PUT" and self.rng.random() < 0.5:
                await handler(request)  # enqueued, and still a 503: the outcome is unknown
            return web.json_response({"error": "Service Unavailable"}, status=503)
        denied = self._check_headers(request)
        if denied is not None:
            return denied
        return await handler(request)  # type: ignore[no-any-return]

    # ---- feed ---------------------------------------------------------------------------
    async def _get_feed(self, request: web.Request) -> web.Response:
        self._count("feed_get")
        if self.feed_config is None:
            return web.json_response({"error": "Feed configuration not found"}, status=404)
        maxlot_text = request.query.get("maxlot")
        if maxlot_text is None:
            self.protocol_errors.append("GET /api/orders/feed without maxlot")
            return web.json_response({"error": "maxlot is required"}, status=400)
        try:
            maxlot = int(maxlot_text)
        except ValueError:
            maxlot = 0
        if not 1 <= maxlot <= 10:
            self.protocol_errors.append(f"GET /api/orders/feed maxlot={maxlot_text}")
            return web.json_response({"error": "maximum accepted value for maxlot is 10"}, status=400)
        items = self.queue.receive(maxlot, short=self.faults.short_batches, duplicate_rate=self.faults.duplicate_rate)
        if self.malformed and self.rng.random() < 0.5:
            raw = self.malformed.pop(0)
            items.append({**raw, "handle": f"bad.{uuid.uuid4().hex[:12]}"} if isinstance(raw, dict) else raw)
        return web.json_response(items)

    async def _commit_feed(self, request: web.Request) -> web.Response:
        self._count("feed_commit")
        if self.faults.refuse_commits > 0:
            self.faults.refuse_commits -= 1
            return web.json_response({"error": "Service Unavailable"}, status=503)
        try:
            body = await request.json()
        except ValueError:
            self.protocol_errors.append("POST /api/orders/feed: body is not JSON")
            return web.json_response({"error": "invalid body"}, status=400)
        handles = body.get("handles") if isinstance(body, dict) else None
        if not isinstance(handles, list) or not all(isinstance(h, str) for h in handles):
            self.protocol_errors.append("POST /api/orders/feed: handles must be a list of strings")
            return web.json_response({"error": "handles is required"}, status=400)
        for handle in handles:
            self.queue.delete(handle)
        return web.Response(status=200)

    def _apply_queue_settings(self) -> None:
        assert self.feed_config is not None
        queue = {k.lower(): v for k, v in self.feed_config["queue"].items()}
        visibility = float(queue["visibilitytimeoutinseconds"])
        self.queue.visibility_timeout_s = self.visibility_override_s or visibility
        self.queue.retention_s = float(queue.get("messageretentionperiodinseconds", 345600))

    async def _get_feed_config(self, request: web.Request) -> web.Response:
        self._count("feed_config_get")
        if self.feed_config is None:
            return web.json_response({"error": "Feed configuration not found"}, status=404)
        return web.json_response(
            {
                **self.feed_config,
                "quantity": len(self.queue.messages),
                "approximateAgeOfOldestMessageInSeconds": self.queue.oldest_age_s(),
            }
        )

    async def _post_feed_config(self, request: web.Request) -> web.Response:
        self._count("feed_config_post")
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "invalid body"}, status=400)
        problem, status = validate_feed_config(body)
        if problem:
            self.protocol_errors.append(f"POST /api/orders/feed/config: {problem}")
            return web.json_response({"error": problem}, status=status)
        retention = {k.lower(): v for k, v in body["queue"].items()}["messageretentionperiodinseconds"]
        self.feed_config = {
            "filter": body["filter"],
            "queue": {
                "visibilityTimeoutInSeconds": body["queue"]["visibilityTimeoutInSeconds"],
                "messageRetentionPeriodInSeconds": retention,
            },
        }
        self._apply_queue_settings()
        return web.Response(status=200)

    async def _delete_feed_config(self, request: web.Request) -> web.Response:
        if self.feed_config is None:
            return web.json_response({"error": "not found"}, status=404)
        self.feed_config = None
        return web.Response(status=200)

    # ---- hook configuration ---------------------------------------------------------------
    async def _get_hook_config(self, request: web.Request) -> web.Response:
        self._count("hook_config_get")
        if self.hook_config is None:
            return web.json_response({"error": "Hook configuration not found"}, status=404)
        return web.json_response(self.hook_config)

    async def _post_hook_config(self, request: web.Request) -> web.Response:
        """Validate, then ping the URL: only a 200 to the ping saves the configuration."""
        self._count("hook_config_post")
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "invalid body"}, status=400)
        problem, status = validate_hook_config(body)
        if problem:
            self.protocol_errors.append(f"POST /api/orders/hook/config: {problem}")
            return web.json_response({"error": problem}, status=status)
        assert self._session is not None
        hook = body["hook"]
        try:
            async with self._session.post(hook["url"], json={"hookConfig": "ping"}, headers=hook["headers"]) as r:
                self.hook_pings.append(r.status)
                ok = r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            self.hook_pings.append(0)
            ok = False
        if not ok:
            return web.json_response({"error": "Unable to check address"}, status=400)
        self.hook_config = {"filter": body["filter"], "hook": {"url": hook["url"], "headers": dict(hook["headers"])}}
        return web.json_response({})

    async def _delete_hook_config(self, request: web.Request) -> web.Response:
        if self.hook_config is None:
            return web.json_response({"error": "not found"}, status=404)
        self.hook_config = None
        return web.Response(status=200)

    # ---- orders -------------------------------------------------------------------------
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
            "isCompleted": order.status in APPROVED_STATUSES,
            "allowCancellation": order.status not in CANCEL_STATUSES,
            "hostname": self.account,
        }

    async def _get_order(self, request: web.Request) -> web.Response:
        self._count("get_order")
        order = self.orders.get(request.match_info["order_id"])
        if order is None:
            return web.json_response({"error": {"code": "OMS003", "message": "Order not found"}}, status=404)
        return web.json_response(self.order_json(order))

    async def _put_status(self, request: web.Request) -> web.Response:
        self._count("put")
        try:
            body = await request.json()
        except ValueError:
            self.protocol_errors.append("PUT status: body is not JSON")
            return web.json_response(_envelope(None, "EOI001", False, "invalid body"), status=400)
        problem = validate_status_update(body, request.query.get("an"), self.account)
        if problem:
            self.protocol_errors.append(f"PUT status: {problem}")
            return web.json_response(_envelope(None, "EOI001", False, problem), status=400)
        mkt = body["marketplaceOrderId"]
        if self.faults.rate_eoi000 and self.rng.random() < self.faults.rate_eoi000:
            return web.json_response(_envelope(mkt, "EOI000", False, "Unknown error"), status=500)
        order_id = self.by_marketplace_id.get(mkt)
        endpoint = body["connectorEndpoint"].rstrip("/")
        if order_id is None:
            self._spawn(self._notify(endpoint, mkt, "EOI008", False, "Order not integrated in VTEX yet"))
            return web.json_response(_envelope(mkt, "SOI003", True, "Order successfully enqueued"))
        order = self.orders[order_id]
        order.puts += 1
        flipped = False
        if order.flip_back > 0 and order.status not in CANCEL_STATUSES and order.status not in APPROVED_STATUSES:
            # The seller's side put the order back on hold just as the approval arrived.
            order.flip_back -= 1
            self._move(order, HELD.value)
            self._spawn(self._decide_later(order))
            flipped = True
        if order.status == HELD.value:
            if not flipped:
                order.puts_while_held += 1
            if self.faults.eoi011_sync:
                self.eoi011_sync_answers += 1
                return web.json_response(
                    _envelope(mkt, "EOI011", False, "Order is waiting for manual authorization"), status=400
                )
        self._spawn(self._approve_flow(order, endpoint))
        self.signal("put_" + order_id).set()
        return web.json_response(_envelope(mkt, "SOI003", True, "Order successfully enqueued"))

    async def _create_order(self, request: web.Request) -> web.Response:
        """Channel Order API create: a payment below the seller's price holds the order;
        the seller authorizes divergences up to 10% and rejects larger ones."""
        self._count("create")
        try:
            body = await request.json()
        except ValueError:
            return web.json_response(_envelope(None, "EOI005", False, "invalid body"), status=400)
        affiliate = request.query.get("affiliateId")
        if not affiliate:
            return web.json_response(_envelope(None, "EOI005", False, "affiliateId is required"), status=400)
        try:
            mkt = str(body["marketplaceOrderId"])
            paid = int(body["marketplacePaymentValue"])
            expected = sum(int(i["price"]) * int(i["quantity"]) for i in body["items"])
        except (KeyError, TypeError, ValueError):
            return web.json_response(_envelope(None, "EOI005", False, "invalid contract"), status=400)
        endpoint = str(body.get("connectorEndpoint") or "").rstrip("/")
        divergence = (expected - paid) / expected if expected else 0.0
        held = paid != expected
        decision = "authorize" if divergence <= 0.10 else "reject"
        delay = (
            float(body.get("customData", {}).get("simDecideAfterS", 1.0))
            if isinstance(body.get("customData"), dict)
            else 1.0
        )
        order = self.create(mkt, held=held, decision=decision, decide_after_s=delay, affiliate_id=affiliate)
        if endpoint:
            self._spawn(self._notify_placed(endpoint, order))
        return web.json_response(_envelope(mkt, "SOI003", True, "Order successfully enqueued", flow="PlaceOrder"))

    async def _notify_placed(self, endpoint: str, order: SimOrder) -> None:
        await asyncio.sleep(self.rng.uniform(*self.faults.notify_delay_s))
        body = _envelope(order.marketplace_order_id, "SOI001", True, "Order integrated successfully", flow="PlaceOrder")
        body["fields"] = {"mainOrderId": order.order_id.rsplit("-", 1)[0], "franchiseOrderId": None}
        await self._post_notification(endpoint, body)

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
        return web.json_response({o.order_id: _order_state(o) for o in self.orders.values()})

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
        return {
            "calls": dict(self.calls),
            "orders": len(self.orders),
            "queue": len(self.queue.messages),
            "deliveries": self.queue.deliveries,
            "deleted": self.queue.deleted,
            "expired": self.queue.expired,
            "puts": sum(o.puts for o in self.orders.values()),
            "puts_while_held": sum(o.puts_while_held for o in self.orders.values()),
            "approvals_applied": sum(o.approvals_applied for o in self.orders.values()),
            "notifications_sent": len(self.notifications_sent),
            "eoi011": sum(1 for n in self.notifications_sent if n.get("code") == "EOI011") + self.eoi011_sync_answers,
            "notification_failures": self.notification_failures,
            "rate_limited": self.rate_limited,
            "hook_pushes": len(self.hook_pushes),
            "hook_pushes_lost": self.hook_pushes_lost,
            "protocol_errors": list(self.protocol_errors),
        }


def _order_state(o: SimOrder) -> dict[str, Any]:
    return {
        "marketplaceOrderId": o.marketplace_order_id,
        "status": o.status,
        "wasHeld": o.was_held,
        "puts": o.puts,
        "putsWhileHeld": o.puts_while_held,
        "approvalsApplied": o.approvals_applied,
        "history": [s for s, _ in o.history],
    }


def _envelope(mkt: str | None, code: str, success: bool, message: str, flow: str = "ApproveOrder") -> dict[str, Any]:
    return {
        "marketplaceOrderId": mkt,
        "accountName": None,
        "code": code,
        "flow": flow,
        "success": success,
        "operationId": None,
        "errors": None if success else [{"source": "Order Integration", "code": code, "description": message}],
        "fields": None,
        "message": message,
    }


def validate_feed_config(body: Any) -> tuple[str | None, int]:
    """The rules of VTEX's feed configuration (schema and prose). Returns (problem, status)."""
    if not isinstance(body, dict) or "filter" not in body or "queue" not in body:
        return "filter and queue are required", 400
    f, q = body["filter"], body["queue"]
    if not isinstance(f, dict) or f.get("type") not in ("FromWorkflow", "FromOrders"):
        return "filter.type must be FromWorkflow or FromOrders", 400
    if f["type"] == "FromWorkflow":
        if "expression" in f or "disableSingleFire" in f:
            return "FromWorkflow cannot carry expression/disableSingleFire", 409
        if not isinstance(f.get("status"), list) or not f["status"]:
            return "FromWorkflow needs a non-empty status list", 400
    else:
        if "status" in f:
            return "FromOrders cannot carry status", 409
        if not isinstance(f.get("expression"), str) or not isinstance(f.get("disableSingleFire"), bool):
            return "FromOrders needs expression and disableSingleFire", 400
    if not isinstance(q, dict) or not isinstance(q.get("visibilityTimeoutInSeconds"), int):
        return "queue.visibilityTimeoutInSeconds is required", 400
    if "MessageRetentionPeriodInSeconds" not in q:
        return "queue.MessageRetentionPeriodInSeconds is required (schema spelling)", 400
    retention = q["MessageRetentionPeriodInSeconds"]
    if not isinstance(retention, int) or not 345600 <= retention <= 1209600:
        return "MessageRetentionPeriodInSeconds must be within 345600..1209600", 400
    return None, 200


def _in_filter(config: dict[str, Any], status: str) -> bool:
    f = config.get("filter") or {}
    statuses = f.get("status")
    return not (f.get("type") == "FromWorkflow" and statuses and status not in statuses)


def validate_hook_config(body: Any) -> tuple[str | None, int]:
    """The rules of VTEX's hook configuration: the feed's filter rules, an https URL
    (plain http only on loopback, for a local daemon), headers as an object."""
    if not isinstance(body, dict) or "filter" not in body or "hook" not in body:
        return "filter and hook are required", 400
    problem, status = validate_feed_config(
        {
            "filter": body["filter"],
            "queue": {"visibilityTimeoutInSeconds": 1, "MessageRetentionPeriodInSeconds": 345600},
        }
    )
    if problem:
        return problem, status
    hook = body["hook"]
    if not isinstance(hook, dict) or not isinstance(hook.get("url"), str) or not isinstance(hook.get("headers"), dict):
        return "hook.url and hook.headers are required", 400
    parts = urlsplit(hook["url"])
    loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        return "Only https scheme is accepted", 400
    return None, 200


def validate_status_update(body: Any, an: str | None, account: str) -> str | None:
    """UpdateOrderStatusRequest: all four fields required; status lower-case; the
    connector endpoint carries no query string."""
    if not isinstance(body, dict):
        return "body must be an object"
    for name in ("marketplaceOrderId", "marketplaceOrderStatus", "connectorName", "connectorEndpoint"):
        if not isinstance(body.get(name), str) or not body[name]:
            return f"{name} is required"
    if body["marketplaceOrderStatus"] not in ("new", "approved"):
        return "marketplaceOrderStatus must be new or approved"
    parts = urlsplit(body["connectorEndpoint"])
    if parts.query or parts.scheme not in ("http", "https"):
        return "connectorEndpoint must be a URL without a query string"
    if an is not None and an != account:
        return f"an={an} is not this account"
    unknown = set(body) - {"marketplaceOrderId", "marketplaceOrderStatus", "connectorName", "connectorEndpoint"}
    if unknown:
        return f"unexpected fields {sorted(unknown)}"
    return None


async def serve(host: str, port: int, **kwargs: Any) -> None:
    """Run the simulator until cancelled (`omsd sim`)."""
    sim = Simulator(**kwargs)
    url = await sim.start(host, port)
    log.info("simulator_listening", url=url, account=sim.account)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()


__all__ = ["Faults", "FeedQueue", "SimOrder", "Simulator", "serve", "validate_feed_config", "vtex_time"]
