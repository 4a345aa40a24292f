"""Feed v3 (doc §1): an SQS-standard queue behind GET/POST /api/orders/feed and its
configuration. At-least-once, no ordering, a new handle per delivery, redelivery after
the visibility timeout, short and empty batches, retention."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .clock import vtex_time
from .faults import Faults
from .orders import Change
from .runtime import Runtime
from .validation import RETENTION_MIN_S, check_maxlot, validate_feed_config


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
        self.retention_s = float(RETENTION_MIN_S)
        self.deliveries = 0
        self.deleted = 0
        self.expired = 0
        self.commit_lag_s: list[float] = []  # per deleted message: from its change to its commit

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
        message = self.messages.pop(msg_id)
        self.deleted += 1
        self.commit_lag_s.append(self._clock() - message.sent_at)
        return True

    def oldest_age_s(self) -> float:
        now = self._clock()
        return max((now - m.sent_at for m in self.messages.values()), default=0.0)


def in_filter(config: dict[str, Any], status: str) -> bool:
    """§1.4: a FromWorkflow filter passes the statuses it lists; FromOrders (JSONata, not
    evaluated here) passes every change."""
    f = config.get("filter") or {}
    statuses = f.get("status")
    return not (f.get("type") == "FromWorkflow" and statuses and status not in statuses)


def _error(message: str, status: int) -> web.Response:
    return web.json_response({"error": message}, status=status)


class Feed:
    """The feed of one appKey: its configuration, its queue, and the routes over them."""

    def __init__(self, runtime: Runtime, faults: Faults, visibility_override_s: float | None) -> None:
        self._rt = runtime
        self._faults = faults
        self.queue = FeedQueue(runtime.rng, runtime.monotonic)
        self.config: dict[str, Any] | None = None
        self.visibility_override_s = visibility_override_s
        self.malformed: list[Any] = []

    def on_change(self, change: Change) -> None:
        """Queue an event for a status change, if a configuration exists and its filter passes."""
        order = change.order
        if self.config is None or not in_filter(self.config, order.status):
            return  # §1.4: a feed only receives changes made after it is configured
        self.queue.put(
            {
                "eventId": uuid.uuid4().hex.upper(),
                "domain": "Fulfillment",
                "state": order.status,
                "lastState": change.last_state,
                "orderId": order.order_id,
                "lastChange": vtex_time(change.last_change),
                "currentChange": vtex_time(order.last_change),
            }
        )

    async def get(self, request: web.Request) -> web.Response:
        self._rt.count("feed_get")
        if self.config is None:
            return _error("Feed configuration not found", 404)  # §1.2
        problem = check_maxlot(request.query.get("maxlot"))
        if problem:
            self._rt.refuse(f"GET /api/orders/feed {problem}")
            return _error("maximum accepted value for maxlot is 10", 400)
        maxlot = int(request.query["maxlot"])
        items = self.queue.receive(maxlot, short=self._faults.short_batches, duplicate_rate=self._faults.duplicate_rate)
        if self.malformed and self._rt.rng.random() < 0.5:
            raw = self.malformed.pop(0)
            items.append({**raw, "handle": f"bad.{uuid.uuid4().hex[:12]}"} if isinstance(raw, dict) else raw)
        return web.json_response(items)

    async def commit(self, request: web.Request) -> web.Response:
        self._rt.count("feed_commit")
        if self._faults.refuse_commits > 0:
            self._faults.refuse_commits -= 1
            return _error("Service Unavailable", 503)
        try:
            body = await request.json()
        except ValueError:
            self._rt.refuse("POST /api/orders/feed: body is not JSON")
            return _error("invalid body", 400)
        handles = body.get("handles") if isinstance(body, dict) else None
        if not isinstance(handles, list) or not all(isinstance(h, str) for h in handles):
            self._rt.refuse("POST /api/orders/feed: handles must be a list of strings")
            return _error("handles is required", 400)
        for handle in handles:
            self.queue.delete(handle)
        return web.Response(status=200)

    def _apply_queue_settings(self) -> None:
        assert self.config is not None
        queue = {k.lower(): v for k, v in self.config["queue"].items()}
        visibility = float(queue["visibilitytimeoutinseconds"])
        self.queue.visibility_timeout_s = self.visibility_override_s or visibility
        self.queue.retention_s = float(queue.get("messageretentionperiodinseconds", RETENTION_MIN_S))

    async def get_config(self, request: web.Request) -> web.Response:
        self._rt.count("feed_config_get")
        if self.config is None:
            return _error("Feed configuration not found", 404)
        return web.json_response(
            {
                **self.config,
                "quantity": len(self.queue.messages),
                "approximateAgeOfOldestMessageInSeconds": self.queue.oldest_age_s(),
            }
        )

    async def post_config(self, request: web.Request) -> web.Response:
        self._rt.count("feed_config_post")
        try:
            body = await request.json()
        except ValueError:
            return _error("invalid body", 400)
        problem, status = validate_feed_config(body)
        if problem:
            self._rt.refuse(f"POST /api/orders/feed/config: {problem}")
            return _error(problem, status)
        queue = body["queue"]
        # §1.4: POST spells MessageRetentionPeriodInSeconds, GET answers the lower-case spelling.
        self.config = {
            "filter": body["filter"],
            "queue": {
                "visibilityTimeoutInSeconds": queue["visibilityTimeoutInSeconds"],
                "messageRetentionPeriodInSeconds": queue["MessageRetentionPeriodInSeconds"],
            },
        }
        self._apply_queue_settings()
        return web.Response(status=200)

    async def delete_config(self, request: web.Request) -> web.Response:
        if self.config is None:
            return _error("not found", 404)
        self.config = None
        return web.Response(status=200)
