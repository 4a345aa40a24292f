"""The Channel Order API (doc §3): create an order, and the approval PUT. Both answer
only "enqueued" (SOI003); the result arrives later by POST to the connector's endpoint."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web

from .faults import FaultInjector, Faults
from .orders import Orders, SimOrder
from .runtime import Runtime
from .statuses import HELD, can_hold
from .validation import validate_status_update

NOTIFY_PATH = "/order-integration/notification/processing-result"  # §3.3
NOTIFY_ATTEMPTS = 6  # §3.3: VTEX's retry policy for notifications is UNCONFIRMED

# §3.4: the messages VTEX's examples and code table give.
MESSAGES = {
    "SOI001": "Order integrated successfully",
    "SOI002": "Order approved successfully",
    "SOI003": "Order successfully enqueued",
    "EOI000": "Unknown error",
    "EOI001": "Invalid request",
    "EOI005": "Validation error in the request contract",
    "EOI008": "Order not integrated in VTEX yet",
    "EOI009": "Order is out of a valid status to approve",
    "EOI011": "Order is waiting for manual authorization",
}
SELLER_AUTHORIZES_UP_TO = 0.10  # the simulated seller's price divergence rule (§3.6)


def envelope(mkt: str | None, code: str, message: str = "", flow: str = "ApproveOrder") -> dict[str, Any]:
    """The synchronous answer (§3.1, §3.2): success for SOI codes, an `errors` list otherwise."""
    success = code.startswith("SOI")
    message = message or MESSAGES[code]
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


class Channel:
    def __init__(self, runtime: Runtime, orders: Orders, injector: FaultInjector, account: str) -> None:
        self._rt = runtime
        self._orders = orders
        self._injector = injector
        self._account = account
        self.notifications_sent: list[dict[str, Any]] = []
        self.notification_failures = 0
        self.eoi011_sync_answers = 0

    @property
    def _faults(self) -> Faults:
        return self._injector.faults

    async def put_status(self, request: web.Request) -> web.Response:
        """Update order status (§3.1): checked, then enqueued; the result is notified later."""
        self._rt.count("put")
        try:
            body = await request.json()
        except ValueError:
            self._rt.refuse("PUT status: body is not JSON")
            return web.json_response(envelope(None, "EOI001", "invalid body"), status=400)
        problem = validate_status_update(body, request.query.get("an"), self._account)
        if problem:
            self._rt.refuse(f"PUT status: {problem}")
            return web.json_response(envelope(None, "EOI001", problem), status=400)
        mkt = body["marketplaceOrderId"]
        if self._injector.eoi000():
            return web.json_response(envelope(mkt, "EOI000"), status=500)
        endpoint = body["connectorEndpoint"].rstrip("/")
        order = self._orders.find(mkt)
        if order is None:
            self._rt.spawn(self._notify(endpoint, mkt, "EOI008"))
            return web.json_response(envelope(mkt, "SOI003"))
        order.puts += 1
        order.put_at.append(datetime.now(UTC))
        flipped = self._flip_back(order)
        if order.status == HELD:
            if not flipped:
                order.puts_while_held += 1
            if self._faults.eoi011_sync:
                self.eoi011_sync_answers += 1
                return web.json_response(envelope(mkt, "EOI011"), status=400)
        self._rt.spawn(self._approve(order, endpoint))
        return web.json_response(envelope(mkt, "SOI003"))

    def _flip_back(self, order: SimOrder) -> bool:
        """The seller's side puts the order back on hold just as the approval arrives."""
        if order.flip_back <= 0 or not can_hold(order.status):
            return False
        order.flip_back -= 1
        self._orders.move(order, HELD)
        self._orders.decide_later(order)
        return True

    async def _approve(self, order: SimOrder, endpoint: str) -> None:
        """Process an enqueued approval after a while, then notify its result (§3.3, §3.4)."""
        await asyncio.sleep(self._rt.rng.uniform(*self._faults.notify_delay_s))
        code = self._orders.approval_code(order)
        if code != "SOI002":
            await self._notify(endpoint, order.marketplace_order_id, code)
            return
        self._orders.approve(order)
        await self._notify(endpoint, order.marketplace_order_id, code)
        await self._orders.fulfil(order)

    async def create_order(self, request: web.Request) -> web.Response:
        """Create (§3.6): a payment below the items' price holds the order; the simulated
        seller authorizes divergences up to 10% and rejects larger ones."""
        self._rt.count("create")
        try:
            body = await request.json()
        except ValueError:
            return web.json_response(envelope(None, "EOI005", "invalid body", "PlaceOrder"), status=400)
        affiliate = request.query.get("affiliateId")
        if not affiliate:
            return web.json_response(envelope(None, "EOI005", "affiliateId is required", "PlaceOrder"), status=400)
        try:
            mkt = str(body["marketplaceOrderId"])
            paid = int(body["marketplacePaymentValue"])
            expected = sum(int(i["price"]) * int(i["quantity"]) for i in body["items"])
        except (KeyError, TypeError, ValueError):
            return web.json_response(envelope(None, "EOI005", "invalid contract", "PlaceOrder"), status=400)
        endpoint = str(body.get("connectorEndpoint") or "").rstrip("/")
        divergence = (expected - paid) / expected if expected else 0.0
        decision = "authorize" if divergence <= SELLER_AUTHORIZES_UP_TO else "reject"
        custom = body.get("customData")
        delay = float(custom.get("simDecideAfterS", 1.0)) if isinstance(custom, dict) else 1.0
        order = self._orders.create(
            mkt, held=paid != expected, decision=decision, decide_after_s=delay, affiliate_id=affiliate
        )
        if endpoint:
            self._rt.spawn(self._notify_placed(endpoint, order))
        return web.json_response(envelope(mkt, "SOI003", flow="PlaceOrder"))

    async def _notify_placed(self, endpoint: str, order: SimOrder) -> None:
        await asyncio.sleep(self._rt.rng.uniform(*self._faults.notify_delay_s))
        body = envelope(order.marketplace_order_id, "SOI001", flow="PlaceOrder")
        body["fields"] = {"mainOrderId": order.order_id.rsplit("-", 1)[0], "franchiseOrderId": None}
        await self._post_notification(endpoint, body)

    async def _notify(self, endpoint: str, marketplace_order_id: str, code: str) -> None:
        """An ApproveOrder notification (§3.3 example): accountName and operationId filled in."""
        body = envelope(marketplace_order_id, code)
        body["accountName"] = self._account
        body["operationId"] = str(uuid.uuid4())
        if body["success"]:
            body["fields"] = {"mainOrderId": f"MKP-{marketplace_order_id}", "franchiseOrderId": None}
        copies = 2 if self._rt.rng.random() < self._faults.notification_duplicate_rate else 1
        for _ in range(copies):
            await self._post_notification(endpoint, body)

    async def _post_notification(self, endpoint: str, body: dict[str, Any]) -> None:
        url = f"{endpoint}{NOTIFY_PATH}"
        for attempt in range(NOTIFY_ATTEMPTS):
            try:
                async with self._rt.session.post(url, params={"an": self._account}, json=body) as resp:
                    if 200 <= resp.status < 300:
                        self.notifications_sent.append(body)
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            self.notification_failures += 1
            await asyncio.sleep(min(5.0, 0.2 * 2**attempt))
