"""The composition root: open resources in order, run the loops, shut down cleanly.

Resources open in an AsyncExitStack (store → HTTP session → VTEX client →
HTTP server → scheduler) and close in reverse. The poller, the processor and the
effect runner run as siblings in a TaskGroup; if one fails, all stop and the
error surfaces (systemd restarts the unit). Shutdown: stop intake first, give
in-flight work `shutdown_grace_s`, then cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from daemon.api import ApiContext, build_app
from daemon.effects import EffectRunner
from daemon.errors import AuthFailed, VtexError
from daemon.feed import FeedPoller, ensure_feed_config
from daemon.logs import get_logger, redact
from daemon.processor import Processor
from daemon.settings import Settings
from daemon.vtex import VtexClient
from state.store import Store

log = get_logger("omsd.app")


class Daemon:
    """One running omsd. `run(stop)` returns when `stop` is set and work is drained."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ready = asyncio.Event()
        self.store: Store | None = None
        self.processor: Processor | None = None
        self.poller: FeedPoller | None = None
        self.runner: EffectRunner | None = None
        self.url = ""
        redact(
            settings.app_token.get_secret_value(), settings.api_token.get_secret_value() if settings.api_token else None
        )

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        async with AsyncExitStack() as stack:
            store = await Store.open(s.db)
            stack.push_async_callback(store.close)
            self.store = store
            session = aiohttp.ClientSession()
            stack.push_async_callback(session.close)
            client = VtexClient(s, session)
            runner = EffectRunner(store, client, concurrency=s.effect_concurrency)
            processor = Processor(store, s.policy(), on_effects=runner.wake.set)
            runner.on_result = processor.wake.set
            self.processor = processor
            self.runner = runner
            poller = FeedPoller(store, client, s, on_journal=processor.wake.set)
            self.poller = poller

            await self._check_feed_config(client)
            await runner.recover()

            web_runner = web.AppRunner(
                build_app(ApiContext(settings=s, store=store, processor=processor, wake=processor.wake.set)),
                access_log=None,
                shutdown_timeout=2.0,
            )
            await web_runner.setup()
            stack.push_async_callback(web_runner.cleanup)
            site = web.TCPSite(web_runner, s.listen_host, s.listen_port)
            await site.start()
            self.url = _site_url(site, s)

            scheduler = AsyncIOScheduler(timezone=UTC)

            async def fire_timers() -> None:
                if await store.fire_due_timers(datetime.now(UTC)):
                    processor.wake.set()

            scheduler.add_job(
                fire_timers,
                "interval",
                seconds=s.timer_tick_s,
                id="timers",
                coalesce=True,
                max_instances=1,
                misfire_grace_time=max(1, int(s.timer_tick_s * 5)),
            )
            scheduler.add_listener(_job_listener, EVENT_JOB_ERROR | EVENT_JOB_MISSED)
            scheduler.start()
            stack.callback(lambda: scheduler.shutdown(wait=False) if scheduler.running else None)

            log.info("omsd_ready", listen=self.url, db=str(s.db), account=s.account, vtex=s.base_url)
            self.ready.set()
            await self._loops(stop, poller, processor, runner)
            log.info("omsd_stopped", offset=processor.offset)

    async def _check_feed_config(self, client: VtexClient) -> None:
        try:
            await ensure_feed_config(client, self.settings)
        except AuthFailed:
            raise
        except VtexError as exc:
            # Not fatal: the poller recreates a missing configuration on its 404.
            log.warning("feed_config_check_failed", error=str(exc))

    async def _loops(self, stop: asyncio.Event, poller: FeedPoller, processor: Processor, runner: EffectRunner) -> None:
        grace = self.settings.shutdown_grace_s
        intake_stop = asyncio.Event()
        work_stop = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            poll_task = tg.create_task(poller.run(intake_stop), name="feed-poller")
            work = [
                tg.create_task(processor.run(work_stop), name="processor"),
                tg.create_task(runner.run(work_stop), name="effect-runner"),
            ]
            stopper = tg.create_task(stop.wait(), name="stop-signal")
            await asyncio.wait([stopper, poll_task, *work], return_when=asyncio.FIRST_COMPLETED)
            if not stop.is_set():
                # A loop ended without being asked to: stop the rest. If it raised,
                # the TaskGroup re-raises its error when this block exits.
                log.error("omsd_loop_ended", tasks=[t.get_name() for t in (poll_task, *work) if t.done()])
                stopper.cancel()
                intake_stop.set()
                work_stop.set()
                return
            log.info("omsd_stopping", grace_s=grace)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            intake_stop.set()
            await _wait_until(poll_task, deadline)
            work_stop.set()
            for task in work:
                await _wait_until(task, deadline)


async def _wait_until(task: asyncio.Task[Any], deadline: float) -> None:
    remaining = max(0.0, deadline - asyncio.get_running_loop().time())
    done, _ = await asyncio.wait([task], timeout=remaining)
    if not done:
        log.warning("shutdown_grace_exceeded", task=task.get_name())
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _job_listener(event: JobExecutionEvent) -> None:
    if event.exception is not None:
        log.error("scheduled_job_failed", job=event.job_id, error=repr(event.exception))
    else:
        log.warning("scheduled_job_missed", job=event.job_id)


def _site_url(site: web.TCPSite, settings: Settings) -> str:
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    port = sockets[0].getsockname()[1] if sockets else settings.listen_port
    return f"http://{settings.listen_host}:{port}"


async def run_until_signalled(settings: Settings, on_ready: Callable[[Daemon], None] | None = None) -> None:
    """`omsd run`: until SIGTERM or SIGINT, then drain and return."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    daemon = Daemon(settings)
    if on_ready is not None:

        async def notify() -> None:
            await daemon.ready.wait()
            on_ready(daemon)

        notifier = asyncio.create_task(notify())
    try:
        await daemon.run(stop)
    finally:
        if on_ready is not None:
            notifier.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
