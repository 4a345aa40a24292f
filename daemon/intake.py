"""Turning what VTEX sends (feed items, hook pushes) into journal entries.

Nothing here raises on bad input: a malformed item becomes a `rejected` journal
entry that keeps the raw item and the reason, so an operator can see it, and
the feed handle is still committed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from omsd.state.events import IntentReceived, IntentRecorded, NotificationReceived, StatusChanged
from omsd.state.statuses import Status
from omsd.state.store import NewEntry, iso


class BadTime(ValueError):
    pass


def parse_time(text: str) -> datetime:
    """ISO-8601 as VTEX writes it: up to 7 fractional digits, `Z` or an offset.
    A timestamp without a zone is taken as UTC (VTEX documents UTC)."""
    try:
        value = datetime.fromisoformat(_six_digit_fraction(text.strip()))
    except ValueError as exc:
        raise BadTime(f"not an ISO-8601 timestamp: {text[:40]!r} ({exc})") from None
    return value.replace(tzinfo=value.tzinfo or UTC).astimezone(UTC)


def _six_digit_fraction(text: str) -> str:
    """VTEX writes 7 fractional digits (`...41.8830000Z`); datetime takes at most 6."""
    head, dot, rest = text.partition(".")
    if not dot:
        return text
    digits = len(rest) - len(rest.lstrip("0123456789"))
    return f"{head}.{rest[: min(digits, 6)]}{rest[digits:]}"


def _vtex_time(value: object) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {type(value).__name__}")
    try:
        return parse_time(value)
    except BadTime as exc:
        raise ValueError(str(exc)) from None


VtexTime = Annotated[datetime, BeforeValidator(_vtex_time)]


def _present(data: object) -> object:
    """A JSON object with lower-case keys and without empty values; anything else as is."""
    if isinstance(data, dict):
        return {str(k).lower(): v for k, v in data.items() if v is not None and v != ""}
    return data


class _Lenient(BaseModel):
    """Keys read case-insensitively (the feed writes camelCase, the hook PascalCase);
    an empty or null value counts as absent; unknown keys are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _lower_keys(cls, data: object) -> object:
        return _present(data)


class _StatusFields(_Lenient):
    """What a feed item and a hook push share."""

    order_id: StrictStr = Field(alias="orderid")
    state: StrictStr
    last_state: StrictStr | None = Field(default=None, alias="laststate")
    current_change: VtexTime = Field(alias="currentchange")
    last_change: VtexTime | None = Field(default=None, alias="lastchange")
    event_id: StrictStr | None = Field(default=None, alias="eventid")
    domain: StrictStr | None = None

    @field_validator("state")
    @classmethod
    def _known_status(cls, value: str) -> str:
        try:
            Status(value)
        except ValueError:
            raise ValueError(f"unknown status {value[:60]!r}") from None
        return value

    def event(self, source: Literal["feed", "hook"]) -> StatusChanged:
        return StatusChanged(
            order_id=self.order_id,
            source=source,
            state=self.state,
            last_state=self.last_state,
            current_change=self.current_change,
            last_change=self.last_change,
            event_id=self.event_id,
            domain=self.domain,
        )


class FeedItem(_StatusFields):
    """An item of `GET /api/orders/feed` (camelCase)."""

    handle: StrictStr


class _Origin(_Lenient):
    account: StrictStr


class HookPush(_StatusFields):
    """A push to omsd's hook route (PascalCase). When `CurrentChange` is absent (VTEX's
    guide shows pushes without it), `LastChange` is taken as the change time."""

    origin: _Origin

    @model_validator(mode="before")
    @classmethod
    def _change_time(cls, data: object) -> object:
        data = _present(data)
        if isinstance(data, dict) and "currentchange" not in data:
            if "lastchange" not in data:
                raise ValueError("missing field CurrentChange (and LastChange)")
            return {**data, "currentchange": data["lastchange"]}
        return data


# Field names as VTEX spells them, for the reasons: camelCase in the feed, PascalCase in pushes.
_VTEX_NAMES = (
    "orderId",
    "state",
    "lastState",
    "currentChange",
    "lastChange",
    "eventId",
    "domain",
    "handle",
    "origin",
    "account",
)
_FEED_NAMES = {name.lower(): name for name in _VTEX_NAMES}
_HOOK_NAMES = {name.lower(): name[0].upper() + name[1:] for name in _VTEX_NAMES}


def _reason(exc: ValidationError, names: dict[str, str]) -> str:
    """The first problem, naming the field as VTEX spells it."""
    err = exc.errors()[0]
    field = ".".join(names.get(str(part), str(part)) for part in err.get("loc", ()))
    message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    if not field:
        return message
    if err["type"] == "missing":
        return f"missing field {field}"
    if err["type"] == "string_type":
        return f"field {field} must be a string, got {type(err.get('input')).__name__}"
    if err["type"] == "model_type":
        return f"field {field} must be an object, got {type(err.get('input')).__name__}"
    return f"field {field}: {message}"


@dataclass(frozen=True, slots=True)
class Intake:
    entry: NewEntry
    handle: str | None
    accepted: bool


def status_dedup_key(order_id: str, state: str, change: datetime | None) -> str:
    """One key per (order, status, change time): the same change seen twice, by feed or
    hook, whatever the casing of the payload, is one event."""
    return f"status:{order_id}:{state}:{iso(change) if change else '-'}"


def _raw(item: object) -> str:
    try:
        return json.dumps(item, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return repr(item)


def feed_item(item: object, received_at: datetime) -> Intake:
    """One feed item → an accepted StatusChanged entry, or a rejected one with its reason."""
    fields = _present(item)
    handle = fields.get("handle") if isinstance(fields, dict) else None
    handle = handle if isinstance(handle, str) else None
    if not isinstance(item, dict):
        reason = f"feed item must be a JSON object, got {type(item).__name__}"
        return Intake(entry=rejected("feed", item, reason, received_at), handle=None, accepted=False)
    try:
        parsed = FeedItem.model_validate(item)
    except ValidationError as exc:
        reason = _reason(exc, _FEED_NAMES)
        return Intake(entry=rejected("feed", item, reason, received_at), handle=handle, accepted=False)
    return Intake(entry=_status_entry(parsed.event("feed"), received_at), handle=handle, accepted=True)


def _status_entry(event: StatusChanged, received_at: datetime) -> NewEntry:
    """Feed and hook alike: the dedup key makes the same change one event."""
    return NewEntry.of(
        event,
        source=event.source,
        received_at=received_at,
        dedup_key=status_dedup_key(event.order_id, event.state, event.current_change),
        event_id=f"{event.source}:{event.event_id}" if event.event_id else None,
    )


def intent_entry(
    marketplace_order_id: str, order_id: str | None, source: Literal["api", "cli"], received_at: datetime
) -> NewEntry:
    """An approval intent from the API or the command line. With the VTEX order id it goes
    straight to that order; without it the processor routes it by marketplace id (and
    parks it until an order with that id is known)."""
    event: IntentRecorded | IntentReceived
    if order_id:
        event = IntentRecorded(order_id=order_id, marketplace_order_id=marketplace_order_id, source=source)
    else:
        event = IntentReceived(marketplace_order_id=marketplace_order_id, source=source)
    return NewEntry.of(event, source=source, received_at=received_at)


def rejected(source: str, item: object, reason: str, received_at: datetime) -> NewEntry:
    """A journal row that keeps a bad item and why it was refused. The handle is left
    out of the stored item and of the dedup key: a redelivery is the same bad item."""
    kept = item
    if isinstance(item, dict):
        kept = {k: v for k, v in item.items() if str(k).lower() != "handle"}
    raw = _raw(kept)
    digest = hashlib.sha256(f"{source}:{raw}".encode()).hexdigest()[:32]
    return NewEntry(
        kind="rejected",
        source=source,
        payload=raw,
        received_at=received_at,
        reason=reason,
        dedup_key=f"rejected:{digest}",
        order_id=_guess_order_id(kept),
    )


def _guess_order_id(item: object) -> str | None:
    fields = _present(item)
    value = fields.get("orderid") if isinstance(fields, dict) else None
    return value[:100] if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class HookIntake:
    """A hook push: a ping (touches nothing), an accepted event, or a rejection."""

    ping: bool
    entry: NewEntry | None
    reason: str | None = None
    account: str | None = None


def is_ping(body: object) -> bool:
    """VTEX's `{"hookConfig": "ping"}` probe (any casing), which carries no order."""
    fields = _present(body)
    return isinstance(fields, dict) and "hookconfig" in fields and "orderid" not in fields


def hook_item(body: object, received_at: datetime) -> HookIntake:
    """One push → an accepted StatusChanged entry, or a rejected entry with its reason.
    The dedup key is the feed's, so the same change seen by feed and hook is one event."""
    if is_ping(body):
        return HookIntake(ping=True, entry=None)
    if not isinstance(body, dict):
        reason = f"hook body must be a JSON object, got {type(body).__name__}"
        return HookIntake(ping=False, entry=rejected("hook", body, reason, received_at), reason=reason)
    try:
        push = HookPush.model_validate(body)
    except ValidationError as exc:
        reason = _reason(exc, _HOOK_NAMES)
        return HookIntake(ping=False, entry=rejected("hook", body, reason, received_at), reason=reason)
    entry = _status_entry(push.event("hook"), received_at)
    return HookIntake(ping=False, entry=entry, account=push.origin.account)


class ResultEnvelope(BaseModel):
    """VTEX's processing-result envelope (Channel Order API); unknown fields ignored."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    marketplace_order_id: str = Field(alias="marketplaceOrderId", min_length=1, max_length=200)
    code: str = Field(min_length=1, max_length=20)
    flow: str = Field(default="Unknown", max_length=40)
    success: bool | None = None
    operation_id: str | None = Field(default=None, alias="operationId", max_length=100)
    message: str | None = Field(default=None, max_length=2000)
    account_name: str | None = Field(default=None, alias="accountName", max_length=100)


def notification_entry(env: ResultEnvelope, received_at: datetime, *, authenticated: bool) -> NewEntry:
    """A processing-result notification → its journal entry; the same operation and code
    seen twice is one event. `authenticated` says it came by omsd's capability URL (or
    from an operator's `omsd ingest`); an unauthenticated copy is journaled but never
    acted on, and never deduplicates away the authenticated one."""
    event = NotificationReceived(
        marketplace_order_id=env.marketplace_order_id,
        code=env.code,
        flow=env.flow,
        success=env.success,
        operation_id=env.operation_id,
        message=env.message,
        account=env.account_name,
        authenticated=authenticated,
    )
    dedup = f"notification:{env.operation_id}:{env.code}" if env.operation_id else None
    if dedup and not authenticated:
        dedup += ":unauthenticated"
    return NewEntry.of(event, source="notification", received_at=received_at, dedup_key=dedup)
