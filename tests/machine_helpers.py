"""Builders for machine tests: orders in a given phase and events with readable defaults."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from omsd.state.events import (
    ApprovalAnswered,
    ApprovalFailed,
    IntentRecorded,
    LinkLookup,
    OrderFetched,
    OrderFetchFailed,
    ResultNotified,
    Resync,
    StatusChanged,
    TimerFired,
)
from omsd.state.models import Inflight, Order, Timer

T0 = datetime(2026, 10, 31, 23, 0, 0, tzinfo=UTC)
OID = "MKP-123-01"
MKT = "123"
HELD = "waiting-for-manual-authorization"
FREE = "waiting-ffmt-authorization"
FAR_FUTURE = datetime(9999, 12, 31, tzinfo=UTC)  # a change time no clock skew explains


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def order(phase: str = "tracking", **kw: Any) -> Order:
    base: dict[str, Any] = {
        "order_id": OID,
        "marketplace_order_id": MKT,
        "status": HELD,
        "status_at": at(0),
        "held": True,
        "link_checked": True,
        "phase": phase,
        "seq": 5,
    }
    if phase != "tracking":
        base["intent_source"] = "api"
        base["intent_at"] = at(0)
    if phase == "checking":
        base["inflight"] = Inflight(seq=5, kind="fetch", purpose=kw.pop("purpose", "pre_approval"))
        base["status"] = FREE
    if phase == "sending":
        base["inflight"] = Inflight(seq=5, kind="send", purpose="approve")
        base["status"] = FREE
        base["sent"] = 1
    if phase == "awaiting_result":
        base["timer"] = Timer(token=5, reason="confirm_timeout", due_at=at(120))
        base["status"] = FREE
    if phase == "retry_wait":
        base["timer"] = Timer(token=5, reason="retry", due_at=at(2))
        base["status"] = FREE
        base["attempts"] = 1
    if phase == "waiting_release":
        base["timer"] = Timer(token=5, reason="held_recheck", due_at=at(600))
    base.update(kw)
    return Order(**base)


def status(state: str, t: float = 10, **kw: Any) -> StatusChanged:
    return StatusChanged(order_id=OID, source="feed", state=state, current_change=at(t), **kw)


def future_status(state: str, **kw: Any) -> StatusChanged:
    """A status event whose change time lies far in the future (a broken clock)."""
    return StatusChanged(order_id=OID, source="hook", state=state, current_change=FAR_FUTURE, **kw)


def intent(mkt: str | None = MKT) -> IntentRecorded:
    return IntentRecorded(order_id=OID, marketplace_order_id=mkt, source="api")


def fetched(state: str | None, seq: int = 5, t: float = 10, mkt: str | None = MKT) -> OrderFetched:
    return OrderFetched(
        order_id=OID, seq=seq, status=state, marketplace_order_id=mkt, last_change=at(t), fetched_at=at(t)
    )


def fetch_failed(seq: int = 5, not_found: bool = False) -> OrderFetchFailed:
    return OrderFetchFailed(order_id=OID, seq=seq, error="HTTP 503", not_found=not_found)


def answered(code: str, seq: int = 5, http_status: int = 200) -> ApprovalAnswered:
    return ApprovalAnswered(order_id=OID, seq=seq, code=code, http_status=http_status)


def send_failed(retryable: bool = True, seq: int = 5) -> ApprovalFailed:
    return ApprovalFailed(order_id=OID, seq=seq, error="timeout", retryable=retryable)


def notified(code: str, flow: str = "ApproveOrder", authenticated: bool = True) -> ResultNotified:
    return ResultNotified(order_id=OID, marketplace_order_id=MKT, code=code, flow=flow, authenticated=authenticated)


def timer(token: int = 5, reason: str = "retry") -> TimerFired:
    return TimerFired(order_id=OID, token=token, reason=reason)


def resync() -> Resync:
    return Resync(order_id=OID, reason="test")


def link_lookup(mkt: str = MKT) -> LinkLookup:
    return LinkLookup(order_id=OID, marketplace_order_id=mkt)
