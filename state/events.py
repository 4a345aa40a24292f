"""Journal events: everything that can happen to an order, as frozen models.

The journal stores each as JSON; `EVENT_ADAPTER` turns it back into the right
class by its `kind`. The machine matches on the class and `assert_never` makes
mypy prove each kind is handled.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    order_id: str


class StatusChanged(_Event):
    """VTEX reported a status change (a feed item or a hook push)."""

    kind: Literal["status_changed"] = "status_changed"
    source: Literal["feed", "hook"]
    state: str
    last_state: str | None = None
    current_change: AwareDatetime | None = None
    last_change: AwareDatetime | None = None
    event_id: str | None = None
    domain: str | None = None


class IntentRecorded(_Event):
    """Someone asked omsd to approve this order."""

    kind: Literal["intent_recorded"] = "intent_recorded"
    marketplace_order_id: str | None = None
    source: Literal["api", "cli", "notification", "link"]


class OrderFetched(_Event):
    """The answer of omsd's own Get order call."""

    kind: Literal["order_fetched"] = "order_fetched"
    seq: int
    status: str | None
    marketplace_order_id: str | None = None
    last_change: AwareDatetime | None = None
    fetched_at: AwareDatetime


class OrderFetchFailed(_Event):
    """omsd's Get order call failed."""

    kind: Literal["order_fetch_failed"] = "order_fetch_failed"
    seq: int
    error: str
    not_found: bool = False
    retryable: bool = True


class ApprovalAnswered(_Event):
    """VTEX answered omsd's approval PUT with a result code."""

    kind: Literal["approval_answered"] = "approval_answered"
    seq: int
    code: str
    http_status: int
    message: str | None = None


class ApprovalFailed(_Event):
    """omsd's approval PUT got no usable answer (network, 5xx, timeout, 4xx without code)."""

    kind: Literal["approval_failed"] = "approval_failed"
    seq: int
    error: str
    retryable: bool = True


class ResultNotified(_Event):
    """VTEX's asynchronous processing result, routed to this order."""

    kind: Literal["result_notified"] = "result_notified"
    marketplace_order_id: str
    code: str
    flow: str
    operation_id: str | None = None
    message: str | None = None


class TimerFired(_Event):
    """A timer the machine set came due."""

    kind: Literal["timer_fired"] = "timer_fired"
    token: int
    reason: str


class Resync(_Event):
    """An operator asked omsd to look at this order again (repair, replay)."""

    kind: Literal["resync"] = "resync"
    reason: str


_OrderEvent = (
    StatusChanged
    | IntentRecorded
    | OrderFetched
    | OrderFetchFailed
    | ApprovalAnswered
    | ApprovalFailed
    | ResultNotified
    | TimerFired
    | Resync
)
Event = Annotated[_OrderEvent, Field(discriminator="kind")]

EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


class NotificationReceived(BaseModel):
    """VTEX's processing-result envelope as it arrived; the processor routes it to an order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["notification_received"] = "notification_received"
    marketplace_order_id: str
    code: str
    flow: str
    success: bool | None = None
    operation_id: str | None = None
    message: str | None = None
    account: str | None = None


class IntentReceived(BaseModel):
    """An approval intent that names only the marketplace order id."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["intent_received"] = "intent_received"
    marketplace_order_id: str
    source: Literal["api", "cli", "notification"]


AnyEntry = _OrderEvent | NotificationReceived | IntentReceived
Entry = Annotated[AnyEntry, Field(discriminator="kind")]
"""Anything the journal holds as accepted: machine events plus entries still to be routed."""

ENTRY_ADAPTER: TypeAdapter[Entry] = TypeAdapter(Entry)


def parse_entry(payload: str | bytes) -> Entry:
    return ENTRY_ADAPTER.validate_json(payload)
