"""The order hook (doc §2): its configuration (validated, then pinged; only a 200 to the
ping saves it) and the pushes of status changes, retried with a growing delay and
eventually given up."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web

from .clock import vtex_time
from .faults import Faults
from .feed import in_filter
from .orders import Change
from .runtime import Runtime
from .validation import validate_hook_config

PUSH_ATTEMPTS = 8  # §2.4 documents 100 attempts over 4 days; a test run needs far fewer
PING = {"hookConfig": "ping"}  # §2.2


class Hook:
    def __init__(self, runtime: Runtime, faults: Faults, account: str, app_key: str) -> None:
        self._rt = runtime
        self._faults = faults
        self._account = account
        self._app_key = app_key
        self.config: dict[str, Any] | None = None
        self.pushes: list[dict[str, Any]] = []
        self.pushes_lost = 0
        self.pings: list[int] = []

    def on_change(self, change: Change) -> None:
        """Push a status change (§2.3), if a hook is configured and its filter passes."""
        config, order = self.config, change.order
        if config is None or not in_filter(config, order.status):
            return
        if self._rt.rng.random() < self._faults.hook_give_up_rate:
            self.pushes_lost += 1
            return
        body: dict[str, Any] = {
            "Domain": "Fulfillment",
            "OrderId": order.order_id,
            "State": order.status,
            "LastState": change.last_state,
            "LastChange": vtex_time(change.last_change),
            "CurrentChange": vtex_time(order.last_change),
            "Origin": {"Account": self._account, "Key": self._app_key},
        }
        if self._faults.hook_without_current_change:
            # §2.3: the guide's example has neither LastState nor CurrentChange.
            body = {k: v for k, v in body.items() if k not in ("LastState", "CurrentChange")}
            body["LastChange"] = vtex_time(order.last_change)
        copies = 2 if self._rt.rng.random() < self._faults.hook_duplicate_rate else 1
        for _ in range(copies):
            self._rt.spawn(self._push(config, body))

    async def _push(self, config: dict[str, Any], body: dict[str, Any]) -> None:
        """Deliver one push; retried with a geometric delay, then given up (§2.4)."""
        hook = config["hook"]
        for attempt in range(PUSH_ATTEMPTS):
            try:
                async with self._rt.session.post(hook["url"], json=body, headers=hook["headers"]) as resp:
                    if resp.status == 200:
                        self.pushes.append(body)
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(min(5.0, 0.1 * 2**attempt))
        self.pushes_lost += 1

    async def _ping(self, hook: dict[str, Any]) -> bool:
        try:
            async with self._rt.session.post(hook["url"], json=PING, headers=hook["headers"]) as r:
                self.pings.append(r.status)
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            self.pings.append(0)
            return False

    async def get_config(self, request: web.Request) -> web.Response:
        self._rt.count("hook_config_get")
        if self.config is None:
            return web.json_response({"error": "Hook configuration not found"}, status=404)
        return web.json_response(self.config)

    async def post_config(self, request: web.Request) -> web.Response:
        """Validate, then ping the URL: only a 200 to the ping saves the configuration (§2.2)."""
        self._rt.count("hook_config_post")
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "invalid body"}, status=400)
        problem, status = validate_hook_config(body)
        if problem:
            self._rt.refuse(f"POST /api/orders/hook/config: {problem}")
            return web.json_response({"error": problem}, status=status)
        hook = body["hook"]
        if not await self._ping(hook):
            return web.json_response({"error": "Unable to check address"}, status=400)
        self.config = {"filter": body["filter"], "hook": {"url": hook["url"], "headers": dict(hook["headers"])}}
        return web.json_response({})

    async def delete_config(self, request: web.Request) -> web.Response:
        if self.config is None:
            return web.json_response({"error": "not found"}, status=404)
        self.config = None
        return web.Response(status=200)
