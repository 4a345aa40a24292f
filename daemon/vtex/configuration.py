"""Keeping VTEX's side configured: the feed and hook configurations omsd wants, what
differs from what VTEX has (for `omsd feed|hook config` and `omsd check`), and `VtexSetup`,
the one component that creates them: at start-up, when the feed finds its configuration
gone, when the feed delivers events the hook never pushed, and in the scheduled
self-check (which also watches the feed queue's age).

Reading a configuration spends the request budget: one VTEX confirmed less than
`CONFIG_READ_EVERY_S` ago (by the run before a restart) is not read again at start-up,
and the self-check, which also feeds the queue-age gauge, runs at most once a minute
(`OMSD_SELF_CHECK_S` >= 60). The feed's 404 and the hook's missed events are evidence,
not routine: they are acted on at once (once for all the readers that met the 404; a
hook check for missed events at most every `HOOK_CHECK_EVERY_S`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
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

CONFIG_READ_EVERY_S = 60.0  # a configuration confirmed this recently is not read again at start-up
# A change the feed delivered and the hook had not pushed, while the hook has pushed nothing
# at all since that change, this long after it: VTEX may have dropped the hook configuration.
HOOK_GRACE_S = 3.0
HOOK_CHECK_EVERY_S = 60.0  # missed hook events check the hook configuration at most this often


def _utcnow() -> datetime:
    return datetime.now(UTC)


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
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._vtex = vtex
        self._settings = settings
        self._health = health
        self._metrics = metrics
        self.on_recreated = on_recreated
        self._clock = clock
        self._creating = asyncio.Lock()  # one creation at a time (the feed's readers all meet the 404)
        self._checked_at: dict[str, datetime] = {}  # kind -> when VTEX last confirmed it (or omsd created it)
        self._hook_suspected = asyncio.Event()  # the feed delivered events the hook had not pushed
        self._missed_since: datetime | None = None  # the oldest such change not judged yet
        self._hook_checked_for_missed: datetime | None = None
        self.on_checked: Callable[[], None] = lambda: None  # told when a confirmation time changes

    # ---- what a restart keeps --------------------------------------------------------
    def checked(self) -> dict[str, datetime]:
        """When VTEX last confirmed each configuration."""
        return dict(self._checked_at)

    def restore_checked(self, checked: Mapping[str, datetime]) -> None:
        """Start from the confirmation times an earlier run kept (none in the future)."""
        now = self._clock()
        self._checked_at.update({k: min(at, now) for k, at in checked.items() if k in ("feed", "hook")})

    def _confirmed_within(self, kind: str, seconds: float) -> bool:
        at = self._checked_at.get(kind)
        return at is not None and self._clock() - at < timedelta(seconds=seconds)

    def _fresh(self, kind: str) -> bool:
        return self._confirmed_within(kind, CONFIG_READ_EVERY_S)

    async def confirm_until(self, stop: asyncio.Event, notify: Callable[[str], None] = lambda text: None) -> bool:
        """At start-up: confirm (or create) the configurations. Retried with a growing
        delay until it works or omsd is stopped; refused credentials are fatal (AuthFailed
        leaves). False when stopped first."""
        delay = 1.0
        while not stop.is_set():
            notify("checking VTEX's configuration")
            try:
                for kind, used in (("feed", self._settings.uses_feed), ("hook", self._settings.uses_hook)):
                    if not used:
                        continue
                    if self._fresh(kind):  # confirmed moments ago (a restart): not read again
                        self._confirmed(kind, self._checked_at[kind])
                    else:
                        await self._ensure(kind, recreating=False)
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
        """The feed answered 404: VTEX has no configuration any more. Recreate it now, unless it
        was confirmed (or recreated) within the last `OMSD_HTTP_TIMEOUT_S`: that GET may have
        left before, like the other readers' that met the same 404 (the next 404 acts)."""
        self._health.feed_config_ok = False
        try:
            await self._ensure("feed", recreating=True, unless_within_s=self._settings.http_timeout_s)
        except AuthFailed:
            raise
        except VtexError as exc:
            log.error("feed_config_recreate_failed", error=str(exc))

    def hook_missed(self, changed_at: datetime) -> None:
        """The feed delivered a change (of `changed_at`) the hook had not pushed: `run` judges it."""
        if self._missed_since is None or changed_at < self._missed_since:
            self._missed_since = changed_at
        self._hook_suspected.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Judge the changes the feed delivered and the hook had not pushed. The hook has pushed
        something since such a change: it works (that push was lost, or is late). It has pushed
        nothing since, `HOOK_GRACE_S` after the change: VTEX may have dropped its configuration:
        check it now, and recreate it if it is gone (at most every `HOOK_CHECK_EVERY_S` while
        VTEX still has it)."""
        wait_s = 3600.0
        while not stop.is_set():
            await wait_any(self._hook_suspected, stop, within_s=wait_s)
            self._hook_suspected.clear()
            wait_s = 3600.0
            since = self._missed_since
            if since is None or stop.is_set():
                continue
            age_s = (self._clock() - since).total_seconds()
            pushed = self._health.last_push_ok
            if pushed is not None and self._health.clock() - pushed < age_s:
                self._missed_since = None  # a push came after that change: the hook works
                continue
            if age_s < HOOK_GRACE_S:
                wait_s = HOOK_GRACE_S - age_s  # give the hook its grace, then judge again
                continue
            self._missed_since = None
            now = self._clock()
            last = self._hook_checked_for_missed
            if last is not None and now - last < timedelta(seconds=HOOK_CHECK_EVERY_S):
                continue
            self._hook_checked_for_missed = now
            log.debug("hook_silent", since=since.isoformat())
            try:
                await self._ensure("hook", recreating=True)
            except AuthFailed:
                raise
            except VtexError as exc:
                log.warning("hook_config_check_failed", error=str(exc))
                self._hook_checked_for_missed = None  # try again at the next evidence

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

    async def _ensure(self, kind: str, *, recreating: bool, unless_within_s: float | None = None) -> FeedConfig | None:
        """Create the `kind` configuration when VTEX has none; say what differs otherwise.
        Returns the feed configuration VTEX had (None when it had none, and for the hook).
        Nothing is read when it was confirmed less than `unless_within_s` ago."""
        async with self._creating:
            if unless_within_s is not None and self._confirmed_within(kind, unless_within_s):
                self._health.feed_config_ok = self._health.feed_config_ok or kind == "feed"
                return None
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

    def _confirmed(self, kind: str, at: datetime | None = None) -> None:
        if kind == "feed":
            self._health.feed_config_ok = True
        else:
            self._health.hook_config_ok = True
        self._checked_at[kind] = at or self._clock()
        self.on_checked()

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
