"""Settings and bodies for tests of omsd's HTTP routes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from omsd.daemon.config.settings import Settings
from omsd.daemon.http.common import ApiContext, AppliedOffsets
from omsd.daemon.http.routes import build_app
from omsd.daemon.ops.health import Health
from omsd.daemon.ops.metrics import Metrics
from omsd.daemon.ops.probe import StoreProbe
from omsd.daemon.pipeline.processor import Processor
from omsd.state.models import Policy
from omsd.state.store import Store
from tests.helpers import settings as base_settings

API_TOKEN = "api-token-0123456789"


HOOK_SECRET = "hook-secret-0123456789"


AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


NOTIFY_SECRET = "notify-secret-0123456789"


NOTIFY = f"/notify/{NOTIFY_SECRET}/order-integration/notification/processing-result"


BARE_NOTIFY = "/order-integration/notification/processing-result?an=shop"  # OMSD_NOTIFY_ALLOW_UNAUTHENTICATED


def settings(**kw: Any) -> Settings:
    """The routes' settings: both sources, every credential set (tests.helpers.settings underneath)."""
    values: dict[str, Any] = {
        "connector_endpoint": "https://omsd.example.com/api/vtex",
        "api_token": API_TOKEN,
        "hook_secret": HOOK_SECRET,
        "notify_secret": NOTIFY_SECRET,
        "source": "both",
        "db": Path("unused.db"),
    }
    return base_settings(**(values | kw))


def push(**kw: Any) -> dict[str, Any]:
    return {
        "Domain": "Fulfillment",
        "OrderId": "V-5-01",
        "State": "ready-for-handling",
        "LastState": "window-to-cancel",
        "LastChange": "2019-08-14T17:11:39.2550122Z",
        "CurrentChange": "2019-08-14T17:12:48.0965893Z",
        "Origin": {"Account": "shop", "Key": "vtexappkey-shop-X"},
    } | kw


def hook_headers(secret: str | None = HOOK_SECRET) -> dict[str, str]:
    return {"X-Omsd-Hook-Secret": secret} if secret is not None else {}


def envelope(**kw: Any) -> dict[str, Any]:
    return {
        "marketplaceOrderId": "M-6",
        "code": "EOI009",
        "flow": "ApproveOrder",
        "success": False,
        "operationId": "op-1",
        "message": "refused",
        "accountName": "shop",
    } | kw


@dataclass
class StubProcessor:
    """Records the offsets waited for; applies the journal with a real Processor when `apply`."""

    store: Store
    apply: bool = False
    fail: bool = False
    waited: list[int] = field(default_factory=list)

    async def wait_for(self, offset: int, timeout_s: float) -> bool:
        self.waited.append(offset)
        if self.fail:
            raise RuntimeError("processor broke")
        if self.apply:
            await Processor(self.store, Policy()).drain()
        return self.apply


@dataclass
class Api:
    client: TestClient[Any, Any]
    ctx: ApiContext
    stub: StubProcessor
    wakes: list[None]

    async def rejected(self) -> list[Any]:
        return await self.ctx.store.journal.tail(100, kind="rejected")


def api_context(
    store: Store, s: Settings, processor: AppliedOffsets, wake: Any = None, metrics: Metrics | None = None
) -> ApiContext:
    """The routes' context around a real store, as the daemon builds it."""
    metrics = metrics or Metrics()
    return ApiContext(
        settings=s,
        store=store,
        processor=processor,
        wake=wake or (lambda: None),
        health=Health(s, metrics),
        metrics=metrics,
        probe=StoreProbe(store.db, metrics, every_s=s.store_probe_s),
    )


async def start(store: Store, s: Settings | None = None) -> Api:
    s = s or settings()
    stub = StubProcessor(store)
    wakes: list[None] = []
    ctx = api_context(store, s, stub, lambda: wakes.append(None))
    client: TestClient[Any, Any] = TestClient(TestServer(build_app(ctx)))
    await client.start_server()
    return Api(client, ctx, stub, wakes)
