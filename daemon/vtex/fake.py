"""An in-memory VTEX behind the `VtexApi` Protocol: it answers from a script and records
every call. For unit tests of the parts that call VTEX (the effect runner, the feed poller,
the configuration); the simulator (`sim/`) stays the end-to-end oracle, over real sockets,
that models VTEX from its documentation.

Script it by setting its attributes: `orders` (order id -> a snapshot, or an exception to
raise), `approvals` (marketplace order id -> an answer or an exception), `batches` (what
successive feed GETs return), `fail_commits` (how many commits fail), `feed_config`,
`hook_config` and `paused` (call -> seconds a 429 keeps its route paused, as `paused_s`
tells). `gate`, when set, holds Get orders and approvals until it is set, so a test can
keep calls in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from .budget import Priority
from .client import Call
from .errors import NotFound, VtexUnavailable
from .models import ApprovalResponse, FeedConfig, HookConfig, OrderSnapshot

Answer = OrderSnapshot | ApprovalResponse | BaseException


class FakeVtex:
    def __init__(self, batches: list[list[Any]] | None = None) -> None:
        self.calls: list[tuple[str, str]] = []  # (call, key) in the order they came
        self.orders: dict[str, Answer] = {}
        self.approvals: dict[str, Answer] = {}
        self.batches: list[list[Any]] = list(batches or [])
        self.committed: list[str] = []
        self.fail_commits = 0
        self.feed_config: FeedConfig | None = None
        self.hook_config: HookConfig | None = None
        self.saved_feed: list[dict[str, Any]] = []
        self.saved_hook: list[dict[str, Any]] = []
        self.gate: asyncio.Event | None = None
        self.in_flight = 0
        self.most_in_flight = 0
        self.paused: dict[str, float] = {}  # call -> seconds its route stays paused (as after a 429)

    def count(self, call: str) -> int:
        return sum(1 for c, _ in self.calls if c == call)

    async def _answer(self, call: str, key: str, script: Mapping[str, Answer]) -> Any:
        self.calls.append((call, key))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            answer = script.get(key, NotFound(f"{call} {key}: not scripted", 404))
        finally:
            self.in_flight -= 1
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def get_order(self, order_id: str, *, priority: Priority = Priority.BACKGROUND) -> OrderSnapshot:
        answer: OrderSnapshot = await self._answer("get_order", order_id, self.orders)
        return answer

    async def approve(self, marketplace_order_id: str) -> ApprovalResponse:
        answer: ApprovalResponse = await self._answer("approve", marketplace_order_id, self.approvals)
        return answer

    def paused_s(self, call: Call) -> float:
        return self.paused.get(call, 0.0)

    async def get_feed(self, maxlot: int) -> list[Any]:
        self.calls.append(("get_feed", str(maxlot)))
        return self.batches.pop(0) if self.batches else []

    async def commit_feed(self, handles: list[str]) -> None:
        self.calls.append(("commit_feed", str(len(handles))))
        if self.fail_commits:
            self.fail_commits -= 1
            raise VtexUnavailable("POST /api/orders/feed: HTTP 503")
        self.committed.extend(handles)

    async def get_feed_config(self) -> FeedConfig | None:
        self.calls.append(("get_feed_config", ""))
        return self.feed_config

    async def save_feed_config(self, body: Mapping[str, Any]) -> None:
        self.calls.append(("save_feed_config", ""))
        self.saved_feed.append(dict(body))
        self.feed_config = FeedConfig(raw=dict(body))

    async def get_hook_config(self) -> HookConfig | None:
        self.calls.append(("get_hook_config", ""))
        return self.hook_config

    async def save_hook_config(self, body: Mapping[str, Any]) -> None:
        self.calls.append(("save_hook_config", ""))
        self.saved_hook.append(dict(body))
        self.hook_config = HookConfig(raw=dict(body))
