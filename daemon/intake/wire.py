"""What VTEX sends, as pydantic models with limits: feed items, hook pushes, processing-result
envelopes, and the ids they carry.

Limits (VTEX documents no maximum; these are shapes seen in its references, with room to spare):
- order ids (`953712004126-01`, `v52277740atmc-01`, `MKP-123456789-01`): letters,
  digits, `.`, `_`, `-`, starting with a letter or digit, at most 128 characters
  (an order id embeds the marketplace's id plus an affiliate prefix and suffix);
- marketplace order ids (numeric, a UUID): the same characters, at most 100;
- event and operation ids (hex, GUIDs): letters, digits, `.`, `_`, `:`, `-`, at most 128;
- feed handles (a signed JWT wrapping an SQS receipt handle): printable ASCII
  without spaces, at most 16384;
- statuses and domains: letters, digits, `.`, `_`, `-`, at most 64;
- change times: from 2000-01-01 to 2100-01-01 UTC (VTEX orders are of this century)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

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

from omsd.state.events import StatusChanged
from omsd.state.statuses import Status

from ..vtex.times import BadTime, parse_time
from .jsonsafe import safe_text

ORDER_ID_MAX = 128


MARKETPLACE_ORDER_ID_MAX = 100


EVENT_ID_MAX = 128


HANDLE_MAX = 16384


TOKEN_MAX = 64


_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


OrderId = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=ORDER_ID_MAX, pattern=_ID)]


MarketplaceOrderId = Annotated[
    str, StringConstraints(strict=True, min_length=1, max_length=MARKETPLACE_ORDER_ID_MAX, pattern=_ID)
]


EventId = Annotated[str, StringConstraints(strict=True, max_length=EVENT_ID_MAX, pattern=r"^[A-Za-z0-9._:-]+$")]


Handle = Annotated[str, StringConstraints(strict=True, max_length=HANDLE_MAX, pattern=r"^[!-~]+$")]


Token = Annotated[str, StringConstraints(strict=True, max_length=TOKEN_MAX, pattern=r"^[A-Za-z0-9._-]+$")]


def _vtex_time(value: object) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {type(value).__name__}")
    try:
        return parse_time(value)
    except BadTime as exc:
        raise ValueError(str(exc)) from None


VtexTime = Annotated[datetime, BeforeValidator(_vtex_time)]


ORDER_ID: TypeAdapter[str] = TypeAdapter(OrderId)


def present(data: object) -> object:
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
        return present(data)


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
        data = present(data)
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


FEED_NAMES = {name.lower(): name for name in _VTEX_NAMES}


HOOK_NAMES = {name.lower(): name[0].upper() + name[1:] for name in _VTEX_NAMES}


def reason_of(exc: ValidationError, names: dict[str, str]) -> str:
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


def is_ping(body: object) -> bool:
    """VTEX's `{"hookConfig": "ping"}` probe (any casing), which carries no order."""
    fields = present(body)
    return isinstance(fields, dict) and "hookconfig" in fields and "orderid" not in fields


class ApprovalRequest(BaseModel):
    """An approval intent, as the connector posts it (`POST /v1/approvals`) and as `omsd approve`
    takes it from the command line: one validation for both."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    marketplace_order_id: MarketplaceOrderId = Field(alias="marketplaceOrderId")
    order_id: OrderId | None = Field(default=None, alias="orderId")


def validation_reason(exc: ValidationError) -> str:
    """The first problem of a request body, naming its field (`marketplaceOrderId: ...`)."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "body"
    return f"{where}: {err.get('msg', 'invalid')}"


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
