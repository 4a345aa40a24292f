"""Outcome events: what the connector learns, derived from the journal as it is applied.

Each intent and each approval produces outcomes in the same batch (so the same
transaction) as the state change that causes them. Every intent ends in exactly one
terminal outcome (`TERMINAL`) once its order is final; an operator's retry of a dead
order reopens it, so it ends again (the one exception: `approval.confirmed` may follow
`order.dead`).

- `intent.accepted`: an intent was journaled: parked under its marketplace id, or applied
  to an order that had none (API, CLI, an authenticated EOI011);
- `approval.sent`: VTEX answered omsd's approval PUT with success (SOI003 enqueued, or
  SOI002), with VTEX's operation id when given;
- `approval.confirmed`: the order reached `approved` (SOI002, or a status past approval);
- `approval.refused`: the order is dead because VTEX refused and the same request cannot
  succeed (EOI009, EOI008 once its re-checks are spent, a 4xx without code);
- `intent.canceled`: the order was canceled before any approval (`rejected`);
- `intent.expired`: a parked intent expired unlinked (OMSD_PARKED_INTENT_TTL_S);
- `order.dead`: omsd gave up otherwise (retry budget spent on transient failures,
  contradicting ids, an approval never confirmed);
- `vtex.processing_result`: an authenticated processing-result notification, with VTEX's
  body as received.

An outcome's `id` is stable: the journal offset that caused it, its type and its subject,
so deriving again (a replay) gives the same ids and the store keeps the first.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from .codes import APPROVAL_SUCCESS, ResultCode
from .events import ApprovalAnswered, ApprovalFailed, Event, NotificationReceived
from .models import Order
from .statuses import Phase

INTENT_ACCEPTED: Final = "intent.accepted"
APPROVAL_SENT: Final = "approval.sent"
APPROVAL_CONFIRMED: Final = "approval.confirmed"
APPROVAL_REFUSED: Final = "approval.refused"
INTENT_CANCELED: Final = "intent.canceled"
INTENT_EXPIRED: Final = "intent.expired"
ORDER_DEAD: Final = "order.dead"
PROCESSING_RESULT: Final = "vtex.processing_result"

TYPES: tuple[str, ...] = (
    INTENT_ACCEPTED,
    APPROVAL_SENT,
    APPROVAL_CONFIRMED,
    APPROVAL_REFUSED,
    INTENT_CANCELED,
    INTENT_EXPIRED,
    ORDER_DEAD,
    PROCESSING_RESULT,
)
TERMINAL: frozenset[str] = frozenset(
    {APPROVAL_CONFIRMED, APPROVAL_REFUSED, INTENT_CANCELED, INTENT_EXPIRED, ORDER_DEAD}
)

# VTEX's answers that make an approval dead as refused (not as omsd giving up): the same
# request cannot succeed. EOI008 counts once its re-checks are spent (the order never integrated).
REFUSAL_CODES: frozenset[str] = frozenset({ResultCode.INVALID_STATUS, ResultCode.NOT_INTEGRATED})


@dataclass(frozen=True, slots=True)
class Outcome:
    """One outcome event, before the store gives it its `seq`."""

    id: str
    type: str
    occurred_at: datetime
    order_id: str | None
    marketplace_order_id: str | None
    journal_offset: int
    data: dict[str, Any]


def outcome(
    type_: str,
    offset: int,
    at: datetime,
    order_id: str | None,
    marketplace_order_id: str | None,
    **data: Any,
) -> Outcome:
    subject = order_id or marketplace_order_id or "-"
    return Outcome(f"{offset}.{type_}.{subject}", type_, at, order_id, marketplace_order_id, offset, data)


def of_decision(
    before: Order | None, after: Order, event: Event, offset: int, at: datetime, *, released: bool
) -> list[Outcome]:
    """What one applied event tells the connector. `released`: the event is a parked
    intent applied to the order now linked to it (its `intent.accepted` came at parking)."""
    out: list[Outcome] = []
    oid, mkt = after.order_id, after.marketplace_order_id
    had_intent = before is not None and before.has_intent
    if after.has_intent and not had_intent and not released:
        out.append(outcome(INTENT_ACCEPTED, offset, at, oid, mkt, source=after.intent_source, parked=False))
    if (
        isinstance(event, ApprovalAnswered)
        and event.code in APPROVAL_SUCCESS
        and before is not None
        and before.inflight is not None
        and before.inflight.seq == event.seq
    ):
        out.append(
            outcome(
                APPROVAL_SENT,
                offset,
                at,
                oid,
                mkt,
                code=event.code,
                operation_id=event.operation_id,
                http_status=event.http_status,
                message=event.message,
            )
        )
    from_phase = before.phase if before is not None else None
    if after.has_intent and after.phase != from_phase:
        if after.phase == Phase.APPROVED:
            out.append(outcome(APPROVAL_CONFIRMED, offset, at, oid, mkt, status=after.status, code=after.last_code))
        elif after.phase == Phase.REJECTED:
            out.append(outcome(INTENT_CANCELED, offset, at, oid, mkt, status=after.status))
        elif after.phase == Phase.DEAD:
            out.append(_dead(after, event, offset, at))
    return out


def _dead(order: Order, event: Event, offset: int, at: datetime) -> Outcome:
    """`approval.refused` when VTEX refused for good, else `order.dead`."""
    oid, mkt = order.order_id, order.marketplace_order_id
    if isinstance(event, ApprovalFailed) and not event.retryable:
        return outcome(APPROVAL_REFUSED, offset, at, oid, mkt, code=None, message=event.error)
    if order.last_code in REFUSAL_CODES:
        message = getattr(event, "message", None) or order.last_error
        return outcome(APPROVAL_REFUSED, offset, at, oid, mkt, code=order.last_code, message=message)
    return outcome(
        ORDER_DEAD,
        offset,
        at,
        oid,
        mkt,
        code=order.last_code,
        error=order.last_error,
        attempts=order.attempts,
    )


def processing_result(entry: NotificationReceived, order_id: str | None, offset: int, at: datetime) -> Outcome:
    """An authenticated processing-result notification, as VTEX sent it."""
    return outcome(
        PROCESSING_RESULT,
        offset,
        at,
        order_id,
        entry.marketplace_order_id,
        code=entry.code,
        flow=entry.flow,
        success=entry.success,
        operation_id=entry.operation_id,
        message=entry.message,
        account=entry.account,
        body=entry.body,
    )
