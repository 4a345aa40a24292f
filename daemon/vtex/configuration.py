"""Keeping VTEX's side configured: the feed and hook configurations omsd wants, what
differs from what VTEX has, and the scheduled self-check that recreates them when
VTEX deletes them after inactivity and watches the feed queue's age."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..config.settings import Settings
from ..ops.health import Health
from ..ops.logs import get_logger
from ..ops.metrics import Metrics
from .client import FeedConfig, HookConfig, VtexApi, feed_config_body, hook_config_body
from .errors import AuthFailed, VtexError

log = get_logger("omsd.vtexconfig")

# Without these in a FromWorkflow filter omsd learns of holds, releases, approvals and
# cancels only through its slow Get order re-check.
NEEDED_STATUSES: tuple[str, ...] = (
    "waiting-for-manual-authorization",
    "waiting-ffmt-authorization",
    "authorize-fulfillment",
    "canceled",
)


def missing_statuses(filter_type: str | None, statuses: tuple[str, ...]) -> list[str]:
    if filter_type != "FromWorkflow":
        return []  # FromOrders: a JSONata expression omsd cannot judge
    return [s for s in NEEDED_STATUSES if s not in statuses]


def mask(value: str) -> str:
    return "***" if value else ""


def feed_plan(current: FeedConfig | None, settings: Settings) -> list[str]:
    """Human-readable differences between VTEX's feed configuration and omsd's."""
    want = feed_config_body(settings)
    if current is None:
        return ["create the feed configuration (none exists)", *_describe_feed(want)]
    changes = []
    if current.filter_type != "FromWorkflow":
        changes.append(f"filter.type: {current.filter_type} -> FromWorkflow")
    have, wanted = set(current.statuses), set(want["filter"]["status"])
    if have != wanted:
        if wanted - have:
            changes.append(f"filter.status: add {sorted(wanted - have)}")
        if have - wanted:
            changes.append(f"filter.status: remove {sorted(have - wanted)}")
    if current.visibility_timeout_s != settings.feed_visibility_timeout_s:
        changes.append(
            f"queue.visibilityTimeoutInSeconds: {current.visibility_timeout_s} -> {settings.feed_visibility_timeout_s}"
        )
    if current.retention_s != settings.feed_retention_s:
        changes.append(f"queue.MessageRetentionPeriodInSeconds: {current.retention_s} -> {settings.feed_retention_s}")
    return changes


def _describe_feed(body: dict[str, Any]) -> list[str]:
    return [
        f"  filter: FromWorkflow, {len(body['filter']['status'])} statuses",
        f"  queue: visibility {body['queue']['visibilityTimeoutInSeconds']}s, "
        f"retention {body['queue']['MessageRetentionPeriodInSeconds']}s",
    ]


def hook_plan(current: HookConfig | None, settings: Settings) -> list[str]:
    """Differences between VTEX's hook configuration and omsd's; header values masked.
    Without OMSD_HOOK_SECRET (a feed-only set-up) the header is not compared."""
    url, statuses = settings.hook_endpoint, list(settings.feed_statuses)
    keyed = settings.hook_secret is not None
    if current is None:
        return [
            "create the hook configuration (none exists)",
            f"  url: {url}",
            f"  headers: {settings.hook_header}: {'***' if keyed else '(OMSD_HOOK_SECRET is not set)'}",
            f"  filter: FromWorkflow, {len(statuses)} statuses",
        ]
    changes = []
    if current.url != url:
        changes.append(f"hook.url: {current.url} -> {url}")
    if keyed and current.headers != hook_config_body(settings)["hook"]["headers"]:
        have = {k: mask(v) for k, v in current.headers.items()}
        changes.append(f"hook.headers: {have} -> {{'{settings.hook_header}': '***'}}")
    if current.filter_type != "FromWorkflow" or set(current.statuses) != set(statuses):
        changes.append("filter: replace with FromWorkflow and omsd's status list")
    return changes


async def ensure_feed_config(vtex: VtexApi, settings: Settings, health: Health | None = None) -> bool:
    """Create the feed configuration when VTEX has none. Returns True when created."""
    config = await vtex.get_feed_config()
    created = False
    if config is None:
        await vtex.save_feed_config(feed_config_body(settings))
        log.info("feed_config_created", statuses=len(settings.feed_statuses))
        created = True
    else:
        missing = missing_statuses(config.filter_type, config.statuses)
        if missing:
            log.warning("feed_filter_misses_statuses", missing=missing)
    if health is not None:
        health.feed_config_ok = True
    return created


async def ensure_hook_config(vtex: VtexApi, settings: Settings, health: Health | None = None) -> bool:
    """Create the hook configuration when VTEX has none (VTEX pings omsd's hook route
    first, so the HTTP server must be up). Returns True when created."""
    config = await vtex.get_hook_config()
    created = False
    if config is None:
        await vtex.save_hook_config(hook_config_body(settings))
        log.info("hook_config_created", url=settings.hook_endpoint)
        created = True
    elif changes := hook_plan(config, settings):
        log.warning("hook_config_differs", changes=changes)
    if health is not None:
        health.hook_config_ok = True
    return created


class SelfCheck:
    """The scheduled job: configurations still there? the feed queue not too old?"""

    def __init__(self, vtex: VtexApi, settings: Settings, health: Health, metrics: Metrics) -> None:
        self._vtex = vtex
        self._settings = settings
        self._health = health
        self._metrics = metrics
        # Called when a configuration VTEX had deleted was recreated (events were lost meanwhile).
        self.on_recreated: Callable[[str], Awaitable[None]] | None = None

    async def recreated(self, what: str) -> None:
        if self.on_recreated is not None:
            await self.on_recreated(f"{what} configuration recreated")

    async def run_if_waiting(self, waiting: Callable[[], Awaitable[int]]) -> None:
        """The hook-only check run more often: only while intents wait for events."""
        if await waiting():
            await self.run_once()

    async def run_once(self) -> None:
        s = self._settings
        try:
            if s.uses_feed:
                await self._check_feed()
            if s.uses_hook and await ensure_hook_config(self._vtex, s, self._health):
                log.warning("hook_config_recreated", reason="VTEX had no hook configuration")
                await self.recreated("hook")
            self._health.clear_alarm("vtex_auth")
        except AuthFailed as exc:
            self._health.raise_alarm("vtex_auth", str(exc))
            return
        except VtexError as exc:
            log.warning("self_check_failed", error=str(exc))
            return
        self._health.last_self_check_ok = self._health.clock()

    async def _check_feed(self) -> None:
        config = await self._vtex.get_feed_config()
        if config is None:
            self._health.feed_config_ok = False
            await self._vtex.save_feed_config(feed_config_body(self._settings))
            self._health.feed_config_ok = True
            log.warning("feed_config_recreated", reason="VTEX had no feed configuration")
            await self.recreated("feed")
            return
        self._health.feed_config_ok = True
        quantity, age = config.quantity, config.oldest_age_s
        if quantity is not None:
            self._metrics.queue_messages.set(quantity)
        if age is not None:
            self._metrics.queue_age.set(age)
        log.info("feed_queue", quantity=quantity, oldest_age_s=age)
        threshold = self._settings.queue_age_alarm
        if age is not None and age >= threshold:
            self._health.raise_alarm(
                "feed_queue_age",
                f"oldest feed message is {age / 3600:.1f} h old; VTEX drops it at "
                f"{self._settings.feed_retention_s / 3600:.0f} h",
            )
        else:
            self._health.clear_alarm("feed_queue_age")
        missing = missing_statuses(config.filter_type, config.statuses)
        if missing:
            log.warning("feed_filter_misses_statuses", missing=missing)
