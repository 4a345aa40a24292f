"""The effect runner: performs outbox rows and journals their results.

A row is marked `started` before its call and closed in the same transaction
that appends its result, so each result is journaled once. A row left
`started` by a process that stopped mid-call is recovered at start-up
(`EffectRunner.recover`: the policy lives here, the store only reads and
writes rows). A fatal error in a call ends `EffectRunner.run` with that error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from omsd.state.codes import APPROVAL_SUCCESS
from omsd.state.events import ApprovalAnswered, ApprovalFailed, Event, OrderFetched, OrderFetchFailed
from omsd.state.models import FetchOrder, SendApproval
from omsd.state.store import ClaimClass, NewEntry, OutboxRow, Store

from ..ops.logs import get_logger
from ..ops.metrics import Metrics
from ..ops.waiting import wait_any
from ..vtex.budget import Priority
from ..vtex.client import Call, VtexApi
from ..vtex.errors import AuthFailed, NotFound, RateLimited, VtexError

log = get_logger("omsd.effects")

INTERRUPTED = "interrupted: outcome unknown"
# A Get order right before an approval (or after a refusal, to decide on the next one), or
# the one that links an intent waiting parked to the order its id names, is on the release
# path, right after the approval PUTs; a speculative check (the order may be held, being
# created or unknown yet) comes after the feed's reads, and the background link lookups and
# confirmation checks last.
FETCH_PRIORITY: dict[str, Priority] = {
    "pre_approval": Priority.CHECK,
    "after_refusal": Priority.CHECK,
    "link_intent": Priority.CHECK,
    "speculative": Priority.SPECULATIVE,
    "link": Priority.BACKGROUND,
    "confirm": Priority.BACKGROUND,
}
RELEASE_PATH = tuple(p for p, priority in FETCH_PRIORITY.items() if priority == Priority.CHECK)
LATER = tuple(sorted(FETCH_PRIORITY, key=lambda p: FETCH_PRIORITY[p]))[len(RELEASE_PATH) :]
CALLS: dict[str, Call] = {"fetch_order": "get_order", "send_approval": "approve"}

Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class EffectRunner:
    def __init__(
        self,
        store: Store,
        vtex: VtexApi,
        *,
        concurrency: int = 4,
        on_result: Callable[[], None] | None = None,
        clock: Clock = _utcnow,
        metrics: Metrics | None = None,
        before_send: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._vtex = vtex
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        # Neither kind may take every slot: calls that meet a Retry-After pause of their route
        # after they were claimed (Get order, say) wait it out in their slots, and would keep
        # the other kind's calls (approvals) from being claimed while their route is free. A
        # quarter of the slots stays for the other. (A kind whose route is paused when the
        # runner claims is not claimed at all.)
        self._per_kind = max(1, concurrency - concurrency // 4)
        self._running: dict[str, int] = {"fetch_order": 0, "send_approval": 0}
        # Work that can wait (speculative checks, lookups, confirmations) holds these slots, no
        # more and no fewer while it waits: its minimum share of the budget (daemon/vtex/budget.py)
        # always has calls to serve, and the release path has the rest.
        self._reserve = max(1, concurrency // 8)
        self._later = 0  # claimed calls that can wait (speculative checks, lookups, confirmations)
        self.on_result = on_result
        self._clock = clock
        self._metrics = metrics or Metrics()
        self.wake = asyncio.Event()
        self.progress: Callable[[], None] = lambda: None  # called on every turn of `run`
        # Replicated durability (`Replica.durable`): the row marked `started` is on the replica
        # before its PUT leaves, so a restored database recovers it as "outcome unknown" (a Get
        # order first) instead of sending it again from `pending`.
        self._before_send = before_send

    async def recover(self) -> int:
        """Finish what a stopped process left `started`. A Get order is simply run
        again. An approval PUT may or may not have reached VTEX, so it is recorded as
        failed with an unknown outcome: the machine re-checks the order with Get
        order before any resend."""
        rows = await self._store.outbox.started()
        for row in rows:
            match row.effect:
                case FetchOrder():
                    await self._store.outbox.requeue(row.id)
                case SendApproval():
                    failed = ApprovalFailed(order_id=row.order_id, seq=row.seq, error=INTERRUPTED, retryable=True)
                    await self._finish(row, failed, source="recovery")
        if rows:
            log.warning("effects_recovered", count=len(rows))
        return len(rows)

    async def run(self, stop: asyncio.Event, poll_s: float = 1.0) -> None:
        """Claim and perform effects until `stop`; in-flight calls are awaited.

        Every call is a task of this runner's TaskGroup, so none fails unseen: a call
        that raises (VTEX refused the credentials, or anything unexpected) cancels the
        others and ends `run` with its error. A row whose call did not finish stays
        `started` and is recovered at the next start.
        """
        running: set[asyncio.Task[None]] = set()
        per_kind = self._running

        def finished(kind: str, later: bool) -> Callable[[asyncio.Task[None]], None]:
            def done(task: asyncio.Task[None]) -> None:
                running.discard(task)
                per_kind[kind] -= 1
                self._later -= later
                self.wake.set()  # a free slot

            return done

        async with asyncio.TaskGroup() as calls:
            while not stop.is_set():
                self.progress()
                self.wake.clear()
                free = self._concurrency - len(running)
                classes, room, paused_s = self._classes(free)
                rows = (
                    await self._store.outbox.claim(free, now=self._clock(), kinds=room, classes=classes)
                    if free > 0
                    else []
                )
                for row in rows:
                    later = _later(row)
                    task = calls.create_task(self._perform(row), name=f"effect-{row.id}")
                    running.add(task)
                    per_kind[row.effect.kind] += 1
                    self._later += later
                    task.add_done_callback(finished(row.effect.kind, later))
                if rows and len(running) < self._concurrency:
                    continue
                # Woken by the processor (new effects), by a finished call (a free slot), or when
                # a paused route may go again.
                await wait_any(self.wake, stop, within_s=min(poll_s, paused_s or poll_s))

    def _classes(self, free: int) -> tuple[list[ClaimClass], dict[str, int], float]:
        """What to claim, most urgent first (docs/design.md, "Effects"): approval PUTs, then the
        Get orders of the release path, then the rest (speculative checks, link lookups,
        confirmations), oldest first within each. The rest hold the reserve, no more (claimed,
        they wait at the back of the budget and would keep slots from the release path), and the
        release path leaves it to them. No kind takes more than its share of the slots, and a
        kind whose route is paused waits in the outbox (claimed, its calls would only hold
        slots). Returns the classes, the room per kind, and how soon a paused route may go again
        (0: none is paused)."""
        room: dict[str, int] = {}
        pauses: list[float] = []
        for kind, call in CALLS.items():
            paused = self._vtex.paused_s(call)
            room[kind] = 0 if paused > 0 else self._per_kind - self._running[kind]
            if paused > 0:
                pauses.append(paused)
        reserve = max(0, self._reserve - self._later)
        classes = [
            ClaimClass("send_approval", free, upto=free - reserve),
            ClaimClass("fetch_order", free, RELEASE_PATH, upto=free - reserve),
            ClaimClass("fetch_order", reserve, LATER),
            # the reserve nothing could use goes to the release path
            ClaimClass("send_approval", free),
            ClaimClass("fetch_order", free, RELEASE_PATH),
        ]
        return classes, room, min(pauses, default=0.0)

    async def _perform(self, row: OutboxRow) -> None:
        async with self._slots:
            effect = row.effect
            result: Event
            match effect:
                case FetchOrder():
                    result = await self._fetch(effect)
                case SendApproval():
                    if self._before_send is not None:
                        await self._before_send()
                    result = await self._send(effect)
            await self._finish(row, result, source="effect")
        if self.on_result is not None:
            self.on_result()

    async def _finish(self, row: OutboxRow, result: Event, *, source: str) -> None:
        """Journal the result (once: its dedup key is the row's) and close the row.
        The result is decided, so the write completes even when this task is
        cancelled meanwhile; the cancellation then goes on."""
        now = self._clock()
        entry = NewEntry.of(result, source=source, received_at=now, dedup_key=f"effect:{row.id}")
        write = asyncio.ensure_future(self._store.outbox.finish(row.id, entry, now=now))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            await asyncio.wait([write])
            raise

    async def _fetch(self, effect: FetchOrder) -> Event:
        try:
            snap = await self._vtex.get_order(effect.order_id, priority=FETCH_PRIORITY[effect.purpose])
        except NotFound as exc:
            return OrderFetchFailed(order_id=effect.order_id, seq=effect.seq, error=str(exc), not_found=True)
        except AuthFailed:
            raise
        except VtexError as exc:
            log.debug("get_order_failed", order_id=effect.order_id, error=str(exc))
            return OrderFetchFailed(order_id=effect.order_id, seq=effect.seq, error=str(exc), retryable=exc.retryable)
        return OrderFetched(
            order_id=effect.order_id,
            seq=effect.seq,
            status=snap.status,
            marketplace_order_id=snap.marketplace_order_id,
            last_change=snap.last_change,
            fetched_at=self._clock(),
        )

    async def _send(self, effect: SendApproval) -> Event:
        log.debug("approval_sending", order_id=effect.order_id, marketplace_order_id=effect.marketplace_order_id)
        self._metrics.on_approval_sent(effect.order_id)
        try:
            answer = await self._vtex.approve(effect.marketplace_order_id)
        except RateLimited as exc:
            # Refused before processing: safe to retry (a Get order decides first; the client keeps the pause).
            return ApprovalFailed(order_id=effect.order_id, seq=effect.seq, error=str(exc), retryable=True)
        except AuthFailed:
            raise  # fatal: the row stays `started` and is recovered as "outcome unknown"
        except VtexError as exc:
            log.debug("approval_failed", order_id=effect.order_id, error=str(exc))
            code = getattr(exc, "code", None)  # VtexUnavailable (a 5xx body's EOI000), VtexRejected
            return ApprovalFailed(
                order_id=effect.order_id, seq=effect.seq, error=str(exc), retryable=exc.retryable, code=code
            )
        log.info("approval_answered", order_id=effect.order_id, code=answer.code, http_status=answer.http_status)
        if answer.code not in APPROVAL_SUCCESS:
            self._metrics.on_approval_refused(answer.code)
        return ApprovalAnswered(
            order_id=effect.order_id,
            seq=effect.seq,
            code=answer.code,
            http_status=answer.http_status,
            message=answer.message,
            operation_id=answer.operation_id,
        )


def _later(row: OutboxRow) -> bool:
    """A claimed effect that can wait: not an approval PUT nor a Get order of the release path."""
    effect = row.effect
    return isinstance(effect, FetchOrder) and effect.purpose not in RELEASE_PATH
