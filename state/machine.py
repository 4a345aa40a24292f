"""The per-order state machine: `decide(order, event, now, policy) -> Decision`.

Pure: no I/O, no clock, no randomness (jitter is derived from the order id).
The one rule everything else serves: a SendApproval effect is only ever emitted
while handling the answer of omsd's own Get order, and only when the latest
known status (by change time) is neither waiting-for-manual-authorization nor
a cancel status, and the order was never seen `canceled`.

The other rule is liveness: an order VTEX has released is approved without
waiting for the slow held re-check. A release is read from the transition (a
status that left the hold), not from a fixed next status; an answer older than
what omsd already knows never decides against it (omsd checks again instead).
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Any, Literal, assert_never

from .codes import ResultCode
from .events import (
    SNAPSHOT_CAUSE,
    ApprovalAnswered,
    ApprovalFailed,
    Event,
    IntentRecorded,
    LinkLookup,
    OrderFetched,
    OrderFetchFailed,
    OrderSnapshot,
    ResultNotified,
    Resync,
    StatusChanged,
    TimerFired,
)
from .models import Decision, Effect, FetchOrder, FetchPurpose, Inflight, Order, Policy, SendApproval, Timer, later
from .statuses import HELD, TERMINAL_PHASES, Phase, Status, is_approved, is_cancel, is_creating

_STATUSES: dict[str, Status] = {s.value: s for s in Status}


def parse_status(value: str | None) -> Status | None:
    """The known status `value` names (None: none, or one omsd does not know)."""
    return _STATUSES.get(value) if value is not None else None


class UnsafeApproval(RuntimeError):
    """A bug: the machine asked itself to approve an order it must not approve. The
    processor records the event as not applied; nothing is sent."""

    def __init__(self, order_id: str, why: str) -> None:
        super().__init__(f"refusing to emit an approval for {order_id}: {why}")
        self.order_id = order_id


def backoff_s(order_id: str, attempt: int, policy: Policy) -> float:
    """Capped exponential backoff with deterministic jitter in [50%, 100%] of the step."""
    step = min(policy.retry_cap_s, policy.retry_base_s * 2.0 ** max(0, attempt - 1))
    digest = hashlib.blake2b(f"{order_id}:{attempt}".encode(), digest_size=2).digest()
    fraction = int.from_bytes(digest, "big") / 0xFFFF
    return step * (0.5 + fraction / 2)


class _Ctx:
    """Mutable scratch for one decision. Changes gather in a dict over the order the
    decision started from; `order` builds the changed Order when read (one copy, kept
    until the next change) instead of one copy per field set, and `decide` takes the
    last one as the result. Field reads that need no Order go through `get`."""

    __slots__ = ("_base", "_built", "_changes", "causes", "effects", "moved", "now", "policy")

    def __init__(self, order: Order, now: datetime, policy: Policy) -> None:
        self._base = order
        self._changes: dict[str, Any] = {}
        self._built: Order | None = order
        self.now = now
        self.policy = policy
        self.effects: list[Effect] = []
        self.causes: list[str] = []
        self.moved = False  # the event brought a status newer than any known: the order exists and moved

    @property
    def order(self) -> Order:
        built = self._built
        if built is None:
            built = self._built = self._updated(self._base, self._changes)
        return built

    @order.setter
    def order(self, order: Order) -> None:
        self._base, self._changes, self._built = order, {}, order

    @staticmethod
    def _updated(order: Order, changes: dict[str, Any]) -> Order:
        """`order.model_copy(update=changes)` (no validation, the changed fields marked as
        set) at half its cost: Order has no extra or private attributes to copy. A test
        compares every decision with one made by `model_copy` per change."""
        new = object.__new__(Order)
        object.__setattr__(new, "__dict__", {**order.__dict__, **changes})
        fields_set = order.__pydantic_fields_set__
        if not changes.keys() <= fields_set:  # else the same set serves (a frozen model's never changes)
            fields_set = fields_set | changes.keys()
        object.__setattr__(new, "__pydantic_fields_set__", fields_set)
        object.__setattr__(new, "__pydantic_extra__", None)
        object.__setattr__(new, "__pydantic_private__", None)
        return new

    def get(self, name: str) -> Any:
        """A field of the order as changed so far, without building it."""
        changes = self._changes
        return changes[name] if name in changes else getattr(self._base, name)

    def set(self, **changes: object) -> None:
        self._changes.update(changes)
        self._built = None

    def cause(self, text: str) -> None:
        self.causes.append(text)

    def next_seq(self) -> int:
        seq: int = self.get("seq") + 1
        self.set(seq=seq)
        return seq

    def goto(self, phase: Phase, cause: str) -> None:
        self.set(phase=phase)
        self.cause(cause)

    # ---- effects -------------------------------------------------------------
    def fetch(self, purpose: FetchPurpose) -> None:
        seq = self.next_seq()
        self.effects.append(FetchOrder(order_id=self._base.order_id, seq=seq, purpose=purpose))
        self.set(inflight=Inflight(seq=seq, kind="fetch", purpose=purpose))

    def check(self, *, speculative: bool = False) -> None:
        """A Get order that decides the approval: on the release path when the order is known
        free (`releasing`), else speculative (it may find the order still held or being
        created; the effect runner serves it after the release path)."""
        self.fetch("speculative" if speculative or not releasing(self.order) else "pre_approval")

    def send(self) -> None:
        # Explicit checks, not `assert`: `python -O` strips asserts, and this is the guarantee.
        mkt = self.order.marketplace_order_id
        if mkt is None:
            raise UnsafeApproval(self.order.order_id, "no marketplaceOrderId known")
        if not approvable(self.order):
            raise UnsafeApproval(self.order.order_id, f"latest status {self.order.status!r} does not allow it")
        seq = self.next_seq()
        self.effects.append(SendApproval(order_id=self.order.order_id, seq=seq, marketplace_order_id=mkt))
        self.set(
            inflight=Inflight(seq=seq, kind="send", purpose="approve"),
            sent=self.get("sent") + 1,
            sent_on=self.get("status_at"),
        )

    def timer(
        self, reason: Literal["held_recheck", "confirm_timeout", "retry", "creating_recheck"], after_s: float
    ) -> None:
        seq = self.next_seq()
        self.set(timer=Timer(token=seq, reason=reason, due_at=later(self.now, after_s)))

    def settle(self) -> None:
        """Leave whatever was in flight (its result will be recorded but ignored)."""
        self.set(inflight=None, timer=None)


def releasing(order: Order) -> bool:
    """The latest known status shows the order free: known, neither held nor canceling nor
    canceled, and not a creation status unless it was reached from the hold. A Get order asked
    now is the approval's own check (the release path); asked in any other state it is
    speculative: the order may be unknown to omsd yet, held, or still being created."""
    status = parse_status(order.status)
    if status is None or status == HELD or is_cancel(status) or order.canceled:
        return False
    return not is_creating(status) or order.released_at is not None


def approvable(order: Order) -> bool:
    """The order's latest known status allows an approval to be sent: never held, never
    canceling or canceled; a creation status only once it left the hold or omsd served
    the short creation re-check."""
    status = parse_status(order.status)
    if status is None or status == HELD or is_cancel(status) or order.canceled or order.flagged_status:
        return False
    return not is_creating(status) or order.released_at is not None or order.creating_overdue


def _trusted(ctx: _Ctx, state: str, at: datetime | None, source: str) -> datetime | None:
    """A change time too far past the event's receipt (`now`) is not trusted for ordering:
    it would freeze the status, since every real change after it looks older."""
    skew = ctx.policy.max_clock_skew_s
    if at is None or at <= ctx.now + timedelta(seconds=skew):
        return at
    ctx.cause(f"{state} ({source}) dated {at.isoformat()}, more than {skew:g}s after its receipt: time not trusted")
    return None


def _observe(ctx: _Ctx, state: str | None, at: datetime | None, source: str, last_state: str | None = None) -> None:
    """Record a status observation; an older one never moves the status backwards.

    A status that becomes the latest is a release when it left the hold: its lastState is
    the hold, or the status it replaces is, or an EOI011 made omsd wait for a newer one.
    A feed or hook status dated too far ahead is not used for ordering: it is kept apart
    as flagged, and no approval goes out until a Get order asked after it settles it. A
    Get order's own time, if not trusted, is ignored (its status is taken as the latest)."""
    if state is None:
        return
    trusted = _trusted(ctx, state, at, source)
    status = parse_status(state)
    o = ctx.order
    if status == HELD and not o.held:
        ctx.set(held=True)
    if status == Status.CANCELED and not o.canceled:
        ctx.set(canceled=True)
    if trusted is None and at is not None and source != "get_order":
        if state != o.status:
            ctx.set(flagged_status=state, flagged_seq=o.seq)
            ctx.cause(f"{state} flagged: a Get order decides")
        return
    at = trusted
    blocked = o.await_newer_than
    unblocked = blocked is not None and at is not None and at > blocked and status != HELD
    if unblocked:
        ctx.set(await_newer_than=None)
    current = o.status_at
    if not (o.status is None or at is None or current is None or at > current):
        if state != o.status:
            ctx.cause(f"older status {state} recorded, kept {o.status} ({source})")
        elif (
            at == current and last_state == HELD and o.released_at is None and status != HELD and not is_cancel(status)
        ):
            # The status omsd knows (a Get order told it, which names no previous status), and
            # the event says it left the hold: a release, read from the transition.
            ctx.set(released_at=at)
            ctx.moved = True
            ctx.cause(f"{state} left the hold ({source})")
        return
    if state != o.status:
        ctx.cause(f"status {o.status or '-'} -> {state} ({source})")
    if state != o.status or (at is not None and (current is None or at > current)):
        ctx.moved = True
        ctx.set(stale_checks=0)  # answers were stale against the status it replaces, not this one
    ctx.set(status=state, status_at=at or current, status_source=source)
    if status == HELD:
        ctx.set(released_at=None)
    elif not is_cancel(status) and (HELD in (last_state, o.status) or unblocked):
        ctx.set(released_at=at or ctx.now)


def _link(ctx: _Ctx, marketplace_order_id: str | None) -> bool:
    """Link the marketplace id; False when it contradicts the one already known."""
    if not marketplace_order_id:
        return True
    known = ctx.order.marketplace_order_id
    if known is None:
        ctx.set(marketplace_order_id=marketplace_order_id)
        return True
    return known == marketplace_order_id


def _transient(ctx: _Ctx, error: str) -> None:
    attempts = ctx.order.attempts + 1
    ctx.set(attempts=attempts, last_error=error)
    ctx.settle()
    if attempts >= ctx.policy.max_attempts:
        ctx.goto(Phase.DEAD, f"retry budget spent after {attempts} attempts: {error}")
        return
    ctx.goto(Phase.RETRY_WAIT, f"transient failure ({error}), attempt {attempts}")
    ctx.timer("retry", backoff_s(ctx.order.order_id, attempts, ctx.policy))


def _wait_release(ctx: _Ctx, cause: str) -> None:
    """Wait until a status newer than everything seen so far shows the order free
    (or the held re-check timer fires): a refusal is never answered by a resend."""
    ctx.settle()
    ctx.set(await_newer_than=ctx.order.status_at or ctx.now)
    ctx.goto(Phase.WAITING_RELEASE, cause)


def _held_refusal(ctx: _Ctx) -> None:
    """EOI011: VTEX holds the order. Not an error: wait for a newer release, unless omsd
    learnt a newer status than the one the refused PUT was decided on (VTEX may have
    refused before that change): then check again, once per newer status."""
    o = ctx.order
    ctx.set(eoi011=o.eoi011 + 1, last_code=ResultCode.HELD.value, held=True)
    status = parse_status(o.status)
    newer = o.sent_on is not None and o.status_at is not None and o.status_at > o.sent_on
    if newer and status != HELD:
        ctx.settle()
        ctx.set(await_newer_than=None)
        ctx.goto(Phase.CHECKING, f"EOI011 for a PUT older than the known {o.status}: checking again")
        ctx.check()
        return
    _wait_release(ctx, "EOI011: order held, waiting for release")


def _on_code(ctx: _Ctx, code: str, where: str) -> None:
    """Act on a Channel Order API result code for an approval that omsd is following."""
    ctx.set(last_code=code)
    match code:
        case ResultCode.APPROVED:
            ctx.settle()
            ctx.goto(Phase.APPROVED, f"{where}: SOI002 approved")
        case ResultCode.ENQUEUED:
            ctx.settle()
            ctx.set(attempts=0, eoi008=0)
            ctx.goto(Phase.AWAITING_RESULT, f"{where}: SOI003 enqueued")
            ctx.timer("confirm_timeout", ctx.policy.confirm_timeout_s)
        case ResultCode.HELD:
            _held_refusal(ctx)
        case ResultCode.INVALID_STATUS:
            attempts = ctx.order.attempts + 1
            ctx.set(attempts=attempts)
            if attempts >= ctx.policy.max_attempts:
                ctx.settle()
                ctx.goto(Phase.DEAD, f"{where}: EOI009 after {attempts} attempts")
                return
            ctx.goto(Phase.CHECKING, f"{where}: EOI009, re-checking the order")
            ctx.set(timer=None)
            ctx.fetch("after_refusal")
        case ResultCode.NOT_INTEGRATED:
            o = ctx.order
            if o.sent_on is not None and o.status_at is not None and o.status_at > o.sent_on:
                # VTEX may have refused before a change omsd knows of (the PUT was decided on an
                # older status): check again at once, once per newer status like EOI011
                ctx.set(eoi008=o.eoi008 + 1)
                ctx.settle()
                ctx.goto(Phase.CHECKING, f"{where}: EOI008 for a PUT older than the known {o.status}: checking again")
                ctx.check()
                return
            _not_integrated(ctx, where)
        case _:
            _transient(ctx, f"{where}: {code}")


def _not_integrated(ctx: _Ctx, where: str) -> None:
    """EOI008, or Get order 404: VTEX has not integrated the order yet. Re-check after
    `eoi008_recheck_s`, or sooner: a newer status ends the wait (`_advance`)."""
    count = ctx.order.eoi008 + 1
    ctx.set(eoi008=count)
    ctx.settle()
    if count > ctx.policy.max_eoi008:
        ctx.goto(Phase.DEAD, f"{where}: EOI008 {count} times, order never integrated")
        return
    ctx.goto(Phase.RETRY_WAIT, f"{where}: EOI008 order not integrated yet, re-check {count}")
    ctx.timer("retry", ctx.policy.eoi008_recheck_s)


def _on_status_changed(ctx: _Ctx, event: StatusChanged) -> bool:
    _observe(ctx, event.state, event.current_change, event.source, event.last_state)
    return True


def _on_intent(ctx: _Ctx, event: IntentRecorded) -> bool:
    o = ctx.order
    if not _link(ctx, event.marketplace_order_id):  # state.apply refuses these before they get here
        ctx.cause("intent refused: marketplaceOrderId mismatch")
        return False
    if o.has_intent:
        ctx.cause(f"intent repeated ({event.source})")
        return True
    ctx.set(intent_source=event.source, intent_at=ctx.now)
    ctx.cause(f"approval intent from {event.source}")
    if o.phase == Phase.TRACKING:
        ctx.set(phase=Phase.WAITING_RELEASE)
    return True


def _on_fetched(ctx: _Ctx, event: OrderFetched) -> bool:
    o = ctx.order
    if o.flagged_status is not None and event.seq > o.flagged_seq:
        ctx.set(flagged_status=None)
        ctx.cause(f"Get order settles the flagged {o.flagged_status}")
    at = event.last_change or event.fetched_at
    _observe(ctx, event.status, at, "get_order")
    if not _link(ctx, event.marketplace_order_id):
        ctx.set(
            last_error=f"Get order says marketplaceOrderId {event.marketplace_order_id}, "
            f"omsd knew {o.marketplace_order_id}"
        )
        if o.has_intent and o.phase not in TERMINAL_PHASES:
            ctx.settle()
            ctx.goto(Phase.DEAD, "marketplaceOrderId mismatch")
        return False
    ctx.set(link_checked=True)
    if o.inflight is not None and o.inflight.seq == event.seq:
        ctx.set(inflight=None)
        if o.has_intent and o.phase == Phase.CHECKING:
            # Not taken as the latest status: older than (or as old as) what omsd knows.
            stale = event.status is not None and ctx.order.status != event.status
            _after_check(ctx, event, o.inflight.purpose, stale)
    return True


def _on_fetch_failed(ctx: _Ctx, event: OrderFetchFailed) -> bool:
    o = ctx.order
    if event.not_found or not event.retryable:
        ctx.set(link_checked=True)  # a transient failure leaves the link to be looked up again
    if o.inflight is None or o.inflight.seq != event.seq:
        ctx.cause(f"stale Get order failure recorded: {event.error}")
        return False
    ctx.set(inflight=None)
    if not o.has_intent or o.phase in TERMINAL_PHASES:
        ctx.cause(f"Get order failed: {event.error}")
        return False
    if event.not_found and o.status is not None and o.stale_checks == 0:
        # VTEX has shown the order: this call left before the order existed, or Get order lags
        # the events. Ask again at once, once (the next 404 waits like any other).
        ctx.set(stale_checks=1, last_code=ResultCode.NOT_INTEGRATED.value)
        ctx.goto(Phase.CHECKING, f"Get order 404 for an order VTEX showed as {o.status}: checking again")
        ctx.check()
    elif event.not_found:
        ctx.set(last_code=ResultCode.NOT_INTEGRATED.value)
        _not_integrated(ctx, "Get order 404")
    else:
        _transient(ctx, f"Get order: {event.error}")
    return False


def _on_answered(ctx: _Ctx, event: ApprovalAnswered) -> bool:
    o = ctx.order
    if o.inflight is None or o.inflight.seq != event.seq or o.phase in TERMINAL_PHASES:
        ctx.cause(f"late approval answer {event.code} recorded")
        ctx.set(last_code=event.code)
        return True
    ctx.set(inflight=None)
    _on_code(ctx, event.code, f"PUT {event.http_status}")
    return True


def _on_approval_failed(ctx: _Ctx, event: ApprovalFailed) -> bool:
    o = ctx.order
    if o.inflight is None or o.inflight.seq != event.seq or o.phase in TERMINAL_PHASES:
        ctx.cause(f"late approval failure recorded: {event.error}")
        return False
    ctx.set(inflight=None, last_code=event.code)  # None: no answer with a code (a timeout, a bare 5xx)
    if event.retryable and o.attempts == 0:
        _unknown_outcome(ctx, event.error)
    elif event.retryable:
        _transient(ctx, event.error)
    else:
        ctx.settle()
        ctx.set(last_error=event.error)
        ctx.goto(Phase.DEAD, f"approval refused: {event.error}")
    return False


def _unknown_outcome(ctx: _Ctx, error: str) -> None:
    """The first PUT failure since the last enqueued approval (5xx, timeout, lost answer):
    VTEX may or may not have taken it. Check at once with Get order, which decides (an
    order that moved on closes, one still free is sent again, a held one waits): waiting
    first only delays the approval. A second failure in a row backs off (`_transient`)."""
    ctx.set(attempts=1, last_error=error)
    ctx.settle()
    ctx.goto(Phase.CHECKING, f"approval PUT failed ({error}), outcome unknown: checking with Get order at once")
    ctx.check()


def _on_notified(ctx: _Ctx, event: ResultNotified) -> bool:
    o = ctx.order
    if not event.authenticated:
        # Not by omsd's secret path: anyone could have sent it. Recorded, never acted on.
        ctx.cause(f"unauthenticated notification {event.code} recorded, not acted on")
        return False
    _link(ctx, event.marketplace_order_id)
    if event.flow != "ApproveOrder":
        ctx.cause(f"{event.flow} result {event.code} recorded")
        return True
    if o.phase in TERMINAL_PHASES:
        ctx.cause(f"notification {event.code} after {o.phase} recorded")
        return False
    if not o.has_intent:
        if event.code != ResultCode.HELD:
            ctx.cause(f"notification {event.code} without intent recorded")
            return True
        ctx.set(intent_source="notification", intent_at=ctx.now)
        ctx.cause("approval intent from an EOI011 notification")
        _held_refusal(ctx)
        return True
    if event.code == ResultCode.ENQUEUED:
        ctx.cause("notification SOI003 recorded")
        return True
    if event.code == ResultCode.HELD and o.phase == Phase.SENDING:
        # It may answer an earlier attempt; the PUT in flight gets its own answer.
        ctx.set(held=True)
        ctx.cause("notification EOI011 recorded while an approval PUT is in flight")
        return True
    own_attempt = o.phase in (Phase.SENDING, Phase.AWAITING_RESULT)
    if event.code == ResultCode.APPROVED and not own_attempt:
        # No approval of omsd's is in flight (sent=0, or one already answered): this
        # SOI002 answers someone else's. It closes nothing; VTEX's status decides.
        if o.phase == Phase.CHECKING and o.inflight is not None:
            ctx.cause("notification SOI002 while checking: the Get order in flight decides")
            return True
        ctx.settle()
        ctx.set(await_newer_than=None)
        ctx.goto(Phase.CHECKING, "notification SOI002 for no approval of omsd's: re-checking the order")
        ctx.check()
        return True
    if event.code not in (ResultCode.APPROVED, ResultCode.HELD) and not own_attempt:
        # An error for an approval omsd is not waiting on (e.g. the answer to an
        # earlier attempt): the current attempt decides.
        ctx.cause(f"notification {event.code} for an older attempt recorded")
        return True
    _on_code(ctx, event.code, "notification")
    return True


def _on_timer(ctx: _Ctx, event: TimerFired) -> bool:
    o = ctx.order
    if o.timer is None or o.timer.token != event.token:
        ctx.cause(f"stale timer {event.reason} ignored")
        return False
    ctx.set(timer=None)
    if o.timer.reason == "creating_recheck":
        ctx.set(creating_overdue=True)
    if o.phase in (Phase.WAITING_RELEASE, Phase.RETRY_WAIT):
        ctx.set(await_newer_than=None)
        ctx.goto(Phase.CHECKING, f"timer {event.reason}: re-checking the order")
        ctx.check(speculative=o.timer.reason == "held_recheck")  # VTEX held it: probably still does
    elif o.phase == Phase.AWAITING_RESULT:
        ctx.goto(Phase.CHECKING, "no confirmation in time: re-checking the order")
        ctx.fetch("confirm")
    return True


def _on_resync(ctx: _Ctx, event: Resync) -> bool:
    o = ctx.order
    if not o.has_intent:
        if o.status is not None and o.marketplace_order_id is None and o.inflight is None:
            # Lazy linking: an intent naming only a marketplace id is parked and this
            # order may be the one; Get order tells its marketplaceOrderId.
            ctx.cause(f"resync ({event.reason}): Get order to learn the marketplaceOrderId")
            ctx.fetch("link")
            return False
        ctx.cause(f"resync ({event.reason}) of an order without intent")
        return False
    if o.phase in (Phase.APPROVED, Phase.REJECTED):
        ctx.cause(f"resync ({event.reason}) of a closed order ignored")
        return False
    ctx.settle()
    ctx.set(attempts=0, eoi008=0, stale_checks=0, await_newer_than=None, last_error=None)
    ctx.goto(Phase.CHECKING, f"resync: {event.reason}")
    ctx.check()
    return True


def _on_link_lookup(ctx: _Ctx, event: LinkLookup) -> bool:
    """An intent waits parked on the marketplace id this order's id derives from: Get order
    now, at the approval's priority (it replaces a background lookup still queued). Its
    answer links the ids, or shows the guess was wrong."""
    o = ctx.order
    if o.has_intent or o.marketplace_order_id is not None:
        ctx.cause(f"link lookup for {event.marketplace_order_id} not needed: the order is linked")
        return False
    if o.inflight is not None and o.inflight.purpose == "link_intent":
        return False  # asked already
    ctx.cause(f"an intent waits parked on {event.marketplace_order_id}, which this id derives from: Get order now")
    ctx.fetch("link_intent")
    return False


def _on_snapshot(ctx: _Ctx, event: OrderSnapshot) -> bool:
    """A pruned history: the order is what the snapshot says, nothing more to decide."""
    ctx.order = event.order
    ctx.cause(SNAPSHOT_CAUSE)
    return False


def _apply(ctx: _Ctx, event: Event) -> bool:
    """Fold the event's facts into the order. Returns True when `advance` should run."""
    match event:
        case StatusChanged():
            return _on_status_changed(ctx, event)
        case IntentRecorded():
            return _on_intent(ctx, event)
        case OrderFetched():
            return _on_fetched(ctx, event)
        case OrderFetchFailed():
            return _on_fetch_failed(ctx, event)
        case ApprovalAnswered():
            return _on_answered(ctx, event)
        case ApprovalFailed():
            return _on_approval_failed(ctx, event)
        case ResultNotified():
            return _on_notified(ctx, event)
        case TimerFired():
            return _on_timer(ctx, event)
        case Resync():
            return _on_resync(ctx, event)
        case LinkLookup():
            return _on_link_lookup(ctx, event)
        case OrderSnapshot():
            return _on_snapshot(ctx, event)
        case _ as unreachable:
            assert_never(unreachable)


def _after_check(ctx: _Ctx, event: OrderFetched, purpose: str, stale: bool) -> None:
    """Our own Get order came back while CHECKING: the approval is decided here."""
    o = ctx.order
    fetched = parse_status(event.status)
    if fetched is None:
        _transient(ctx, f"Get order shows unknown status {event.status!r}")
        return
    known = parse_status(o.status)
    if is_approved(known) or is_cancel(known) or o.canceled:
        return  # advance() closes it
    if known == HELD:
        ctx.set(stale_checks=0)
        _wait_release(ctx, "Get order: still held" if fetched == HELD else f"Get order: {fetched}, a newer hold known")
        return
    if stale:
        _stale_answer(ctx, event, purpose)
        return
    ctx.set(stale_checks=0)
    if not approvable(o):  # a creation status, not left from the hold, not re-checked yet
        ctx.set(creating_checks=o.creating_checks + 1)
        ctx.settle()
        ctx.goto(Phase.WAITING_RELEASE, f"Get order: {fetched}, still being created: short re-check")
        return
    if o.marketplace_order_id is None:
        ctx.settle()
        ctx.set(last_error="no marketplaceOrderId known for this order")
        ctx.goto(Phase.DEAD, "cannot approve: marketplaceOrderId unknown")
        return
    if purpose == "confirm":
        ctx.set(attempts=o.attempts + 1)
        if ctx.order.attempts >= ctx.policy.max_attempts:
            ctx.settle()
            ctx.goto(Phase.DEAD, "approval never confirmed")
            return
    ctx.goto(Phase.SENDING, f"Get order confirms {fetched}: sending approval")
    ctx.set(timer=None)
    ctx.send()


def _stale_answer(ctx: _Ctx, event: OrderFetched, purpose: str) -> None:
    """A Get order answer older than the status omsd knows (it left before a newer event was
    applied) never decides against it: ask again at once, then after a growing backoff so
    a VTEX that keeps answering stale data cannot make omsd loop hot."""
    o = ctx.order
    count = o.stale_checks + 1
    ctx.set(stale_checks=count)
    what = f"Get order shows {event.status}, older than the known {o.status}"
    if count == 1:
        ctx.cause(f"{what}: checking again")
        if purpose == "confirm":
            ctx.fetch("confirm")
        else:
            ctx.check()
        return
    ctx.settle()
    ctx.goto(Phase.RETRY_WAIT, f"{what} ({count} in a row): checking again later")
    ctx.timer("retry", backoff_s(o.order_id, count - 1, ctx.policy))


def _advance(ctx: _Ctx) -> None:
    """Close or move the order after its facts changed."""
    if ctx.get("intent_source") is None:
        return  # no Get order just to link ids: linking is lazy (see `_on_resync`)
    if ctx.get("phase") in TERMINAL_PHASES:
        return
    o = ctx.order
    status = parse_status(o.status)
    if is_cancel(status) or o.canceled:
        ctx.settle()
        ctx.goto(Phase.REJECTED, f"order is {o.status}: no approval, ever")
        return
    if is_approved(status):
        ctx.settle()
        ctx.goto(Phase.APPROVED, f"order is {o.status}: approved")
        return
    if o.phase == Phase.TRACKING:
        ctx.set(phase=Phase.WAITING_RELEASE)
        o = ctx.order
    if o.phase == Phase.RETRY_WAIT and ctx.moved:
        # A newer status proves the order exists and moved: whatever the wait was for (a
        # 404, EOI008, a failure), the status decides now, not the re-check timer.
        ctx.settle()
        ctx.goto(Phase.WAITING_RELEASE, f"{o.status} ends the wait for a re-check")
        o = ctx.order
    if _check_again(o):
        ctx.set(timer=None, await_newer_than=None)
        awaiting = o.phase == Phase.AWAITING_RESULT
        ctx.goto(Phase.CHECKING, "released after the PUT was decided" if awaiting else "flagged status")
        if awaiting:
            ctx.fetch("confirm")
        else:
            ctx.check()
        return
    if o.phase == Phase.CHECKING and o.inflight is None:
        # A check whose Get order was superseded (e.g. a link fetch finished first).
        ctx.check()
        return
    if o.phase == Phase.CHECKING and ctx.moved and o.inflight is not None:
        if o.inflight.purpose == "speculative" and releasing(o):
            # The order shows free now: its check goes on the release path (a speculative Get
            # order still queued is superseded and never sent).
            ctx.cause("the check moves to the release path")
            ctx.check()
            return
        if o.inflight.purpose in ("pre_approval", "speculative") and o.status == HELD:
            # Held now: the Get order could only find the hold (or a release whose event is on
            # its way, which checks again): wait for the release instead of spending the call.
            ctx.settle()
            ctx.goto(Phase.WAITING_RELEASE, "held: the check waits for the release")
            o = ctx.order
    if o.phase == Phase.WAITING_RELEASE:
        _leave_waiting(ctx)


def _covers(purpose: str, o: Order) -> bool:
    """A Get order of this purpose in flight is the check the order needs now: one on the
    release path, or a speculative one while the order is not known free."""
    return purpose in ("pre_approval", "link_intent") or (purpose == "speculative" and not releasing(o))


def _check_again(o: Order) -> bool:
    """A Get order is needed now: a flagged status waits for one asked after it, or the
    order was released after the approval PUT omsd awaits was decided (VTEX may have met
    the hold with it; once per release, as the next PUT is decided on a newer status)."""
    if o.flagged_status is not None and o.phase in (Phase.WAITING_RELEASE, Phase.CHECKING):
        asked_after = o.inflight is not None and o.inflight.kind == "fetch" and o.inflight.seq > o.flagged_seq
        return not asked_after
    released = o.released_at is not None and o.sent_on is not None and o.released_at > o.sent_on
    return o.phase == Phase.AWAITING_RESULT and released


def _leave_waiting(ctx: _Ctx) -> None:
    """WAITING_RELEASE: check now when the order may be free, else keep the right timer:
    the short creation re-check or the slow held re-check. A creation status no Get order
    has confirmed yet is checked at once: the feed lags VTEX by up to a poll interval."""
    o = ctx.order
    status = parse_status(o.status)
    free = status != HELD and o.await_newer_than is None
    sending = o.inflight is not None and o.inflight.kind == "send"
    if not sending and free and (not is_creating(status) or approvable(o) or o.creating_checks == 0):
        ctx.set(timer=None)
        ctx.goto(Phase.CHECKING, "not held: confirming with Get order")
        # a Get order at the approval's priority in flight (before an approval, or the link
        # lookup of an intent that waited parked) is the check; anything else may wait long
        if o.inflight is None or not _covers(o.inflight.purpose, o):
            ctx.check()
        return
    if free:
        if o.timer is None or o.timer.reason != "creating_recheck":
            ctx.timer("creating_recheck", ctx.policy.creating_recheck_s)
    elif o.timer is None or o.timer.reason != "held_recheck":
        ctx.timer("held_recheck", ctx.policy.held_recheck_s)


def decide(order: Order | None, event: Event, now: datetime, policy: Policy | None = None) -> Decision:
    """Apply one journal event to one order."""
    policy = policy or Policy()
    ctx = _Ctx(order or Order(order_id=event.order_id), now, policy)
    advance = _apply(ctx, event)
    ctx.set(updated_at=now)  # before _advance (which never reads it): the Order it builds can be the result
    if advance:
        _advance(ctx)
    return _decision(ctx.order, tuple(ctx.effects), "; ".join(ctx.causes))


def _decision(order: Order, effects: tuple[Effect, ...], cause: str) -> Decision:
    """`Decision(order=order, effects=effects, cause=cause)` without validating again what
    the machine built from validated models: one per event, a fifth of a cheap event's cost.
    tests/test_machine_ctx.py compares it with the validated construction."""
    decision = object.__new__(Decision)
    object.__setattr__(decision, "__dict__", {"order": order, "effects": effects, "cause": cause})
    object.__setattr__(decision, "__pydantic_fields_set__", {"order", "effects", "cause"})
    object.__setattr__(decision, "__pydantic_extra__", None)
    object.__setattr__(decision, "__pydantic_private__", None)
    return decision
