"""Keeping VTEX's side configured: the feed and hook configurations omsd wants, what
differs from what VTEX has (for `omsd feed|hook config` and `omsd check`), and `VtexSetup`,
the one component that creates them: at start-up, when the feed finds its configuration
gone, and in the scheduled self-check (which also watches the feed queue's age)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from ..config.settings import Settings
from ..ops.health import Health
from ..ops.logs import get_logger
from ..ops.metrics import Metrics
from ..ops.waiting import wait_any
from .client import VtexApi
from .errors import AuthFailed, VtexError
from .models import FeedConfig, HookConfig, feed_config_body, hook_config_body

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


class VtexSetup:
    """The one component that keeps VTEX's side configured. It confirms (or creates) the
    feed and hook configurations at start-up (`confirm_until`), recreates one the moment it
    is found missing (`feed_missing`, from the feed's 404), and checks both on a schedule
    (`check`: also the feed queue's age). Every creation goes through `_ensure`: a
    configuration VTEX deleted after inactivity is recreated, logged and reported once
    (`on_recreated`: VTEX produced no events while it was gone)."""

    def __init__(
        self,
        vtex: VtexApi,
        settings: Settings,
        health: Health,
        metrics: Metrics,
        *,
        on_recreated: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._vtex = vtex
        self._settings = settings
        self._health = health
        self._metrics = metrics
        self.on_recreated = on_recreated
        self._creating = asyncio.Lock()  # one creation at a time (the feed's readers all meet the 404)

    async def confirm_until(self, stop: asyncio.Event, notify: Callable[[str], None] = lambda text: None) -> bool:
        """At start-up: confirm (or create) the configurations. Retried with a growing
        delay until it works or omsd is stopped; refused credentials are fatal (AuthFailed
        leaves). False when stopped first."""
        delay = 1.0
        while not stop.is_set():
            notify("checking VTEX's configuration")
            try:
                if self._settings.uses_feed:
                    await self._ensure("feed", recreating=False)
                if self._settings.uses_hook:
                    await self._ensure("hook", recreating=False)
                self._health.last_self_check_ok = self._health.clock()
                return True
            except AuthFailed:
                raise
            except VtexError as exc:
                log.warning("vtex_config_check_failed", error=str(exc), retry_in_s=delay)
                notify(f"waiting for VTEX: {exc}")
            await wait_any(stop, within_s=delay)
            delay = min(30.0, delay * 2)
        return False

    async def feed_missing(self) -> None:
        """The feed answered 404: VTEX has no configuration any more. Recreate it now."""
        self._health.feed_config_ok = False
        try:
            await self._ensure("feed", recreating=True)
        except AuthFailed:
            raise
        except VtexError as exc:
            log.error("feed_config_recreate_failed", error=str(exc))

    async def check_if_waiting(self, waiting: Callable[[], Awaitable[int]]) -> None:
        """The hook-only check run more often: only while intents wait for events."""
        if await waiting():
            await self.check()

    async def check(self) -> None:
        """The scheduled self-check: both configurations still there? the feed queue not too old?"""
        s = self._settings
        try:
            if s.uses_feed and (config := await self._ensure("feed", recreating=True)) is not None:
                self._queue_age(config)
            if s.uses_hook:
                await self._ensure("hook", recreating=True)
            self._health.clear_alarm("vtex_auth")
        except AuthFailed as exc:
            self._health.raise_alarm("vtex_auth", str(exc))
            return
        except VtexError as exc:
            log.warning("self_check_failed", error=str(exc))
            return
        self._health.last_self_check_ok = self._health.clock()

    async def _ensure(self, kind: str, *, recreating: bool) -> FeedConfig | None:
        """Create the `kind` configuration when VTEX has none; say what differs otherwise.
        Returns the feed configuration VTEX had (None when it had none, and for the hook)."""
        async with self._creating:
            s = self._settings
            feed = await self._vtex.get_feed_config() if kind == "feed" else None
            hook = await self._vtex.get_hook_config() if kind == "hook" else None
            if feed is None and hook is None:
                if kind == "feed":
                    await self._vtex.save_feed_config(feed_config_body(s))
                else:
                    await self._vtex.save_hook_config(hook_config_body(s))
                self._confirmed(kind)
                if not recreating:
                    what = {"statuses": len(s.feed_statuses)} if kind == "feed" else {"url": s.hook_endpoint}
                    log.info(f"{kind}_config_created", **what)
                    return None
                log.warning(f"{kind}_config_recreated", reason=f"VTEX had no {kind} configuration")
                if self.on_recreated is not None:
                    await self.on_recreated(f"{kind} configuration recreated")
                return None
            self._confirmed(kind)
            if feed is not None and (missing := missing_statuses(feed.filter_type, feed.statuses)):
                log.warning("feed_filter_misses_statuses", missing=missing)
            if hook is not None and (changes := hook_plan(hook, s)):
                log.warning("hook_config_differs", changes=changes)
            return feed

    def _confirmed(self, kind: str) -> None:
        if kind == "feed":
            self._health.feed_config_ok = True
        else:
            self._health.hook_config_ok = True

    def _queue_age(self, config: FeedConfig) -> None:
        quantity, age = config.quantity, config.oldest_age_s
        if quantity is not None:
            self._metrics.queue_messages.set(quantity)
        if age is not None:
            self._metrics.queue_age.set(age)
        log.debug("feed_queue", quantity=quantity, oldest_age_s=age)
        threshold = self._settings.queue_age_alarm
        if age is not None and age >= threshold:
            self._health.raise_alarm(
                "feed_queue_age",
                f"oldest feed message is {age / 3600:.1f} h old; VTEX drops it at "
                f"{self._settings.feed_retention_s / 3600:.0f} h",
            )
        else:
            self._health.clear_alarm("feed_queue_age")
