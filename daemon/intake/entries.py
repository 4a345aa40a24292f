"""Turning what VTEX sends (feed items, hook pushes) into journal entries.

Nothing here raises on bad input: a malformed item becomes a `rejected` journal
entry that keeps the raw item and the reason, so an operator can see it, and
the feed handle is still committed. Every entry made here can be stored: its
texts are valid UTF-8 (a lone surrogate never reaches JSON or SQLite).

Limits on what VTEX sends (VTEX documents no maximum; these are shapes seen in
its references, with room to spare):
- order ids (`953712004126-01`, `v52277740atmc-01`, `MKP-123456789-01`): letters,
  digits, `.`, `_`, `-`, starting with a letter or digit, at most 128 characters
  (an order id embeds the marketplace's id plus an affiliate prefix and suffix);
- marketplace order ids (numeric, a UUID): the same characters, at most 100;
- event and operation ids (hex, GUIDs): letters, digits, `.`, `_`, `:`, `-`, at most 128;
- feed handles (a signed JWT wrapping an SQS receipt handle): printable ASCII
  without spaces, at most 16384;
- statuses and domains: letters, digits, `.`, `_`, `-`, at most 64;
- change times: from 2000-01-01 to 2100-01-01 UTC (VTEX orders are of this century).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from omsd.state.events import IntentReceived, IntentRecorded, NotificationReceived, StatusChanged
from omsd.state.statuses import Status
from omsd.state.store import NewEntry, iso

ORDER_ID_MAX = 128
MARKETPLACE_ORDER_ID_MAX = 100
EVENT_ID_MAX = 128
HANDLE_MAX = 16384
TOKEN_MAX = 64
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)
REJECTED_BODY_MAX = 64 * 1024
"""The most of a rejected item or body kept in the journal (the rest: size and digest)."""

_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
OrderId = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=ORDER_ID_MAX, pattern=_ID)]
MarketplaceOrderId = Annotated[
    str, StringConstraints(strict=True, min_length=1, max_length=MARKETPLACE_ORDER_ID_MAX, pattern=_ID)
]
EventId = Annotated[str, StringConstraints(strict=True, max_length=EVENT_ID_MAX, pattern=r"^[A-Za-z0-9._:-]+$")]
Handle = Annotated[str, StringConstraints(strict=True, max_length=HANDLE_MAX, pattern=r"^[!-~]+$")]
Token = Annotated[str, StringConstraints(strict=True, max_length=TOKEN_MAX, pattern=r"^[A-Za-z0-9._-]+$")]


MAX_DEPTH = 64
"""The deepest nesting of arrays and objects a request body may have (VTEX's are 2 deep)."""

_JSON_TOKENS = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)|[\[\]{}]', re.DOTALL)
"""A JSON string or a bracket. An unterminated string runs to the end of the text and the
quantifiers are possessive: a match never fails after a scan, so the search stays linear."""


class BadJson(ValueError):
    """A request body that is not UTF-8 JSON omsd can store; the message is the reason."""


def parse_json(data: bytes) -> Any:
    """A request body as JSON: UTF-8 whatever the declared charset (RFC 8259), nested at
    most MAX_DEPTH deep (checked before parsing, so the parser cannot recurse too deep),
    without NaN/Infinity, and without lone surrogates (I-JSON, RFC 7493: they are not text)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadJson(f"body is not UTF-8 (byte {exc.start})") from None
    if _deeper_than(text, MAX_DEPTH):
        raise BadJson(f"body nests deeper than {MAX_DEPTH}")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise BadJson("body is not JSON") from None
    if not _all_text(value):
        raise BadJson("body holds a lone surrogate (\\ud800-\\udfff), which is not text")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _deeper_than(text: str, limit: int) -> bool:
    depth = 0
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > limit:
                return True
        elif token in ("]", "}"):
            depth -= 1
    return False


def _all_text(value: Any) -> bool:
    """True when every string (keys included) of a parsed JSON value is valid UTF-8."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not storable(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


class BadTime(ValueError):
    pass


def parse_time(text: str) -> datetime:
    """ISO-8601 as VTEX writes it: up to 7 fractional digits, `Z` or an offset.
    A timestamp without a zone is taken as UTC (VTEX documents UTC). Times outside
    EARLIEST..LATEST are refused (also those that overflow when moved to UTC)."""
    try:
        value = datetime.fromisoformat(_six_digit_fraction(text.strip()))
        value = value.replace(tzinfo=value.tzinfo or UTC).astimezone(UTC)
    except OverflowError:
        raise BadTime(f"timestamp out of range: {safe_text(text[:40])!r}") from None
    except ValueError as exc:
        raise BadTime(f"not an ISO-8601 timestamp: {safe_text(text[:40])!r} ({exc})") from None
    if not EARLIEST <= value < LATEST:
        raise BadTime(f"timestamp out of range {EARLIEST.year}..{LATEST.year}: {safe_text(text[:40])!r}")
    return value


def safe_text(text: str) -> str:
    """`text` with anything UTF-8 cannot hold (lone surrogates) written as `\\u` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def storable(text: str) -> bool:
    """True when `text` can be written as UTF-8 (JSON, SQLite, logs)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
_ORDER_ID: TypeAdapter[str] = TypeAdapter(OrderId)


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

    order_id: OrderId = Field(alias="orderid")
    state: StrictStr
    last_state: Token | None = Field(default=None, alias="laststate")
    current_change: VtexTime = Field(alias="currentchange")
    last_change: VtexTime | None = Field(default=None, alias="lastchange")
    event_id: EventId | None = Field(default=None, alias="eventid")
    domain: Token | None = None

    @field_validator("state")
    @classmethod
    def _known_status(cls, value: str) -> str:
        try:
            Status(value)
        except ValueError:
            raise ValueError(f"unknown status {safe_text(value[:60])!r}") from None
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

    handle: Handle


class _Origin(_Lenient):
    account: Annotated[str, StringConstraints(strict=True, max_length=TOKEN_MAX)]


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
    """Canonical JSON, ASCII only (a lone surrogate becomes a `\\u` escape); an item
    JSON cannot write (too deep, an int too long to print) is named by its type."""
    try:
        return json.dumps(item, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        return json.dumps({"unrepresentable": type(item).__name__})


def feed_item(item: object, received_at: datetime) -> Intake:
    """One feed item → an accepted StatusChanged entry, or a rejected one with its reason.
    Never raises on content: whatever fails to parse, validate or serialise is rejected."""
    fields = _present(item)
    handle = fields.get("handle") if isinstance(fields, dict) else None
    handle = handle if _valid_handle(handle) else None
    if not isinstance(item, dict):
        reason = f"feed item must be a JSON object, got {type(item).__name__}"
        return Intake(entry=rejected("feed", item, reason, received_at), handle=None, accepted=False)
    try:
        entry = _status_entry(FeedItem.model_validate(item).event("feed"), received_at)
    except ValidationError as exc:
        reason = _reason(exc, _FEED_NAMES)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        reason = f"unreadable feed item ({type(exc).__name__})"
    else:
        return Intake(entry=entry, handle=handle, accepted=True)
    return Intake(entry=rejected("feed", item, reason, received_at), handle=handle, accepted=False)


def _valid_handle(value: object) -> bool:
    """A handle omsd can store and send back: what FeedItem accepts as `handle`."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= HANDLE_MAX
        and value.isascii()
        and value.isprintable()
        and " " not in value
    )


def _status_entry(event: StatusChanged, received_at: datetime) -> NewEntry:
    """Feed and hook alike: the dedup key makes the same change one event. Raises
    ValueError when the entry could not be stored as UTF-8 (never with valid ids)."""
    entry = NewEntry.of(
        event,
        source=event.source,
        received_at=received_at,
        dedup_key=status_dedup_key(event.order_id, event.state, event.current_change),
        event_id=f"{event.source}:{event.event_id}" if event.event_id else None,
    )
    if not all(storable(text) for text in (entry.payload, entry.dedup_key or "", entry.event_id or "")):
        raise ValueError("entry is not valid UTF-8")
    return entry


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


def rejected(
    source: str, item: object, reason: str, received_at: datetime, *, limit: int = REJECTED_BODY_MAX
) -> NewEntry:
    """A journal row that keeps a bad item and why it was refused. The handle is left
    out of the stored item and of the dedup key: a redelivery is the same bad item.
    An item whose JSON is longer than `limit` or nests deeper than MAX_DEPTH (a reader
    could not parse it back) is kept as its head, size and digest."""
    kept = item
    if isinstance(item, dict):
        kept = {k: v for k, v in item.items() if str(k).lower() != "handle"}
    raw = _raw(kept)
    if len(raw) > limit or _deeper_than(raw, MAX_DEPTH):
        raw = body_summary(raw.encode("ascii"), limit)
    return _rejected_row(source, raw, reason, received_at, _guess_order_id(kept))


def rejected_body(source: str, body: bytes, reason: str, received_at: datetime, *, limit: int) -> NewEntry:
    """A journal row that keeps a request body that is not JSON (or not text): as a JSON
    string when it is short UTF-8 text, else as its head (text or base64), size and digest."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    raw = json.dumps(text) if text is not None and len(body) <= limit else body_summary(body, limit)
    return _rejected_row(source, raw, reason, received_at, None)


def body_summary(body: bytes, limit: int) -> str:
    """JSON naming `body` by size and sha256, with at most `limit` bytes of its head:
    as `text` when that head is UTF-8, else as `base64`."""
    head = body[: max(0, limit - 200)]
    summary: dict[str, Any] = {
        "size": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "truncated": len(head) < len(body),
    }
    for cut in range(4):  # the limit may fall inside a multi-byte character
        try:
            summary["text"] = head[: len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        summary["base64"] = base64.b64encode(head[: (len(head) // 4) * 3]).decode("ascii")
    return json.dumps(summary, sort_keys=True)


def _rejected_row(source: str, raw: str, reason: str, received_at: datetime, order_id: str | None) -> NewEntry:
    digest = hashlib.sha256(f"{source}:{raw}".encode()).hexdigest()[:32]
    return NewEntry(
        kind="rejected",
        source=source,
        payload=raw,
        received_at=received_at,
        reason=safe_text(reason[:1000]),
        dedup_key=f"rejected:{digest}",
        order_id=order_id,
    )


def _guess_order_id(item: object) -> str | None:
    """The item's order id, when it is a well-formed one (so `omsd journal --order` finds it)."""
    fields = _present(item)
    value = fields.get("orderid") if isinstance(fields, dict) else None
    try:
        return _ORDER_ID.validate_python(value)
    except ValidationError:
        return None


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
        entry = _status_entry(push.event("hook"), received_at)
    except ValidationError as exc:
        reason = _reason(exc, _HOOK_NAMES)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        reason = f"unreadable push ({type(exc).__name__})"
    else:
        return HookIntake(ping=False, entry=entry, account=push.origin.account)
    return HookIntake(ping=False, entry=rejected("hook", body, reason, received_at), reason=reason)


class ResultEnvelope(BaseModel):
    """VTEX's processing-result envelope (Channel Order API); unknown fields ignored."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    marketplace_order_id: MarketplaceOrderId = Field(alias="marketplaceOrderId")
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
