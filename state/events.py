"""Journal events: everything that can happen to an order, as frozen models.

The journal stores each as JSON; `EVENT_ADAPTER` turns it back into the right
class by its `kind`. The machine matches on the class and `assert_never` makes
mypy prove each kind is handled.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal, get_args

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .models import Order


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
    operation_id: str | None = None  # VTEX's id for the enqueued operation, when given (version 2)


class ApprovalFailed(_Event):
    """omsd's approval PUT got no usable answer (network, 5xx, timeout, 4xx without code)."""

    kind: Literal["approval_failed"] = "approval_failed"
    seq: int
    error: str
    retryable: bool = True
    code: str | None = None  # a result code VTEX put in a 5xx answer's body (EOI000); version 2


class ResultNotified(_Event):
    """VTEX's asynchronous processing result, routed to this order."""

    kind: Literal["result_notified"] = "result_notified"
    marketplace_order_id: str
    code: str
    flow: str
    operation_id: str | None = None
    message: str | None = None
    authenticated: bool = False  # came by omsd's secret notification path (version 2)


class TimerFired(_Event):
    """A timer the machine set came due."""

    kind: Literal["timer_fired"] = "timer_fired"
    token: int
    reason: str


class Resync(_Event):
    """An operator asked omsd to look at this order again (repair, replay)."""

    kind: Literal["resync"] = "resync"
    reason: str


class LinkLookup(_Event):
    """An intent is parked on the marketplace id this order's VTEX id derives from
    (`{affiliate}-{marketplace id}-{n}`, doc §3.6): ask Get order now, as urgently as the
    approval, since the answer tells the link (the derived id is only a guess). `state.apply`
    applies it in the step that parks the intent or first sees such an order; omsd does
    not journal it."""

    kind: Literal["link_lookup"] = "link_lookup"
    marketplace_order_id: str


class OrderSnapshot(_Event):
    """The whole state of an order whose older journal rows were pruned (`omsd prune`):
    it stands where the order's last pruned row stood, and applying it sets the order to
    this state. Its payload is the `Order` record: a change to `Order` that an older
    snapshot would no longer validate against needs a version bump and an upcaster here."""

    kind: Literal["order_snapshot"] = "order_snapshot"
    order: Order


SNAPSHOT_CAUSE = "history pruned: the order's state as of its last pruned event"
"""The cause of the one history row a snapshot leaves (written by the prune, and by a replay)."""


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
    | LinkLookup
    | OrderSnapshot
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
    # True only when it came by omsd's secret path; a bare-route notification (allowed for
    # compatibility) is kept for the record but never makes an intent nor closes an order.
    authenticated: bool = False
    # The body exactly as VTEX sent it (version 3), for the connector: the outcome stream
    # carries it, and the relay can re-post it unchanged to the connector's own route.
    body: str | None = None


class IntentReceived(BaseModel):
    """An approval intent that names only the marketplace order id."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["intent_received"] = "intent_received"
    marketplace_order_id: str
    source: Literal["api", "cli", "notification"]


class IntentExpired(BaseModel):
    """A parked intent (journal row `parked_offset`) waited `ttl_s` and no order was linked
    to its marketplace id: the processor drops it. The row is the operator's record."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["intent_expired"] = "intent_expired"
    marketplace_order_id: str
    parked_offset: int
    ttl_s: float


AnyEntry = _OrderEvent | NotificationReceived | IntentReceived | IntentExpired
Entry = Annotated[AnyEntry, Field(discriminator="kind")]
"""Anything the journal holds as accepted: machine events plus entries still to be routed."""

ENTRY_ADAPTER: TypeAdapter[Entry] = TypeAdapter(Entry)

ENTRY_KINDS: tuple[str, ...] = tuple(sorted(str(m.model_fields["kind"].default) for m in get_args(AnyEntry)))
"""Every kind of accepted entry (the journal also holds `rejected` rows)."""


# ---- versions ------------------------------------------------------------------------
# Every journal row carries the version of its kind's schema it was written with
# (rows written before versions existed count as 1). When a kind's fields change,
# bump its version here and register an upcaster that turns a raw dict of the old
# version into one of the next; `read_entry` chains them, oldest first, before
# validating. tests/golden/ keeps a row of every kind as each version wrote it
# (a new kind starts at version 1: its golden row goes into events-v1.jsonl).

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


def _trusted(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 1 notifications came from an omsd that acted on every one: read them as
    authenticated, so a replay of an old journal reaches the state that omsd reached."""
    return {**raw, "authenticated": True}


def _added(**defaults: Any) -> Upcaster:
    """An upcaster for a version that only added fields: the old row, with their defaults."""

    def upcast(raw: dict[str, Any]) -> dict[str, Any]:
        return {**defaults, **raw}

    return upcast


VERSIONS: dict[str, int] = {
    "notification_received": 3,
    "result_notified": 2,
    "approval_answered": 2,
    "approval_failed": 2,
}
"""The current version of a kind, where it is above 1."""

UPCASTERS: dict[tuple[str, int], Upcaster] = {
    ("notification_received", 1): _trusted,
    ("result_notified", 1): _trusted,
    ("notification_received", 2): _added(body=None),
    ("approval_answered", 1): _added(operation_id=None),
    ("approval_failed", 1): _added(code=None),
}
"""(kind, version) -> the function taking a raw entry of that version to the next."""


def current_version(kind: str) -> int:
    return VERSIONS.get(kind, 1)


class UnreadableEntry(ValueError):
    """A journal row this version of omsd cannot turn into an entry."""


def read_entry(kind: str, version: int, payload: str | bytes) -> Entry:
    """The entry a journal row holds, upgraded from its version to the current one."""
    current = current_version(kind)
    try:
        if version == current:
            return ENTRY_ADAPTER.validate_json(payload)
        if version > current:
            raise UnreadableEntry(f"{kind} version {version} is newer than this omsd reads ({current})")
        raw = json.loads(payload)
        for step in range(version, current):
            upcast = UPCASTERS.get((kind, step))
            if upcast is None:
                raise UnreadableEntry(f"no upcaster for {kind} version {step}")
            raw = upcast(raw)
        return ENTRY_ADAPTER.validate_python(raw)
    except UnreadableEntry:
        raise
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '-'}: {e['msg']}" for e in exc.errors()[:3])
        raise UnreadableEntry(f"{exc.error_count()} validation error(s): {problems}") from exc
    except (ValueError, TypeError, KeyError) as exc:  # bad JSON, or an upcaster that met a shape it does not know
        raise UnreadableEntry(f"{type(exc).__name__}: {exc}") from exc
