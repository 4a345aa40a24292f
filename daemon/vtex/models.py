"""VTEX's answers that omsd reads, as models (unknown fields ignored), and the configuration
bodies omsd sends (spelled as VTEX's OpenAPI files spell them)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config.settings import Settings
from .times import parse_time


class OrderSnapshot(BaseModel):
    """The fields of Get order that omsd reads; everything else is ignored."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    order_id: str = Field(alias="orderId")
    status: str | None = None
    marketplace_order_id: str | None = Field(default=None, alias="marketplaceOrderId")
    last_change: datetime | None = Field(default=None, alias="lastChange")

    @field_validator("last_change", mode="before")
    @classmethod
    def _time(cls, value: object) -> datetime | None:
        if value is None or value == "":
            return None
        if isinstance(value, str):
            return parse_time(value)
        raise ValueError("lastChange must be a string")


class ApprovalResponse(BaseModel):
    """VTEX's answer to the approval PUT (the result envelope plus the HTTP status)."""

    model_config = ConfigDict(frozen=True)

    http_status: int
    code: str
    success: bool | None = None
    message: str | None = None
    operation_id: str | None = None


class _FilteredConfig(BaseModel):
    """A feed or hook configuration as VTEX returned it; both carry the same `filter`."""

    model_config = ConfigDict(frozen=True)

    raw: dict[str, Any]

    @property
    def filter_type(self) -> str | None:
        f = self.raw.get("filter") or {}
        return f.get("type") if isinstance(f, dict) else None

    @property
    def statuses(self) -> tuple[str, ...]:
        f = self.raw.get("filter") or {}
        values = f.get("status") if isinstance(f, dict) else None
        return tuple(str(v) for v in values) if isinstance(values, list) else ()


class FeedConfig(_FilteredConfig):
    """`GET /api/orders/feed/config`, read leniently (VTEX spells some keys two ways)."""

    def _queue(self, *names: str) -> Any:
        q = self.raw.get("queue") or {}
        lowered = {str(k).lower(): v for k, v in q.items()} if isinstance(q, dict) else {}
        for name in names:
            if name.lower() in lowered:
                return lowered[name.lower()]
        return None

    @property
    def visibility_timeout_s(self) -> int | None:
        v = self._queue("visibilityTimeoutInSeconds")
        return int(v) if isinstance(v, int | float) else None

    @property
    def retention_s(self) -> int | None:
        v = self._queue("MessageRetentionPeriodInSeconds")
        return int(v) if isinstance(v, int | float) else None

    @property
    def quantity(self) -> int | None:
        v = self.raw.get("quantity")
        return int(v) if isinstance(v, int | float) else None

    @property
    def oldest_age_s(self) -> float | None:
        for key in ("approximateAgeOfOldestMessageInSeconds", "aproximateAgeOfOldestMessageInSeconds"):
            v = self.raw.get(key)
            if isinstance(v, int | float):
                return float(v)
        return None


class HookConfig(_FilteredConfig):
    """`GET /api/orders/hook/config` (no response schema is documented: read leniently)."""

    @property
    def url(self) -> str | None:
        hook = self.raw.get("hook") or {}
        value = hook.get("url") if isinstance(hook, dict) else None
        return value if isinstance(value, str) else None

    @property
    def headers(self) -> dict[str, str]:
        hook = self.raw.get("hook") or {}
        value = hook.get("headers") if isinstance(hook, dict) else None
        return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def hook_config_body(settings: Settings) -> dict[str, Any]:
    """The body omsd POSTs to `/api/orders/hook/config`: the feed's filter, omsd's hook
    route, and the secret header VTEX will send with every push."""
    assert settings.hook_secret is not None
    return {
        "filter": {"type": "FromWorkflow", "status": list(settings.feed_statuses)},
        "hook": {
            "url": settings.hook_endpoint,
            "headers": {settings.hook_header: settings.hook_secret.get_secret_value()},
        },
    }


def feed_config_body(settings: Settings) -> dict[str, Any]:
    """The body omsd POSTs to `/api/orders/feed/config` (schema spelling, capital M)."""
    return {
        "filter": {"type": "FromWorkflow", "status": list(settings.feed_statuses)},
        "queue": {
            "visibilityTimeoutInSeconds": settings.feed_visibility_timeout_s,
            "MessageRetentionPeriodInSeconds": settings.feed_retention_s,
        },
    }
