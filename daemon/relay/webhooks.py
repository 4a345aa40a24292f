"""What the relay sends: one outcome as a signed POST (Standard Webhooks), and VTEX's
processing result re-posted as VTEX posted it.

Standard Webhooks (standardwebhooks.com): `webhook-id` is the outcome's id, the same on
every retry, so a receiver deduplicates by it; `webhook-timestamp` is when this attempt
left (seconds since the epoch); `webhook-signature` is `v1,` and the base64 HMAC-SHA256 of
`{id}.{timestamp}.{body}` under the `whsec_` secret. The body is the outcome as the pull
API gives it, plus `timestamp` (when it happened), the spec's recommended shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import SecretStr
from standardwebhooks import Webhook

from omsd.state.outcomes import PROCESSING_RESULT
from omsd.state.store.outcomes import OutcomeRow

from ..ops.metrics import omsd_version

NOTIFICATION_ROUTE = "/order-integration/notification/processing-result"


@dataclass(frozen=True, slots=True)
class Request:
    url: str
    body: str
    headers: dict[str, str]


@dataclass(frozen=True)
class Endpoint:
    """A relay endpoint: where its POSTs go, what it takes from the stream, how it signs."""

    name: str  # "webhook" | "vtex"
    url: str
    secret: SecretStr | None
    account: str
    types: tuple[str, ...] = ()  # empty: every outcome
    # In a fleet, one connector URL hears many accounts: each body names its account, and the
    # id (what a receiver deduplicates by) is the account's and the outcome's.
    scoped: bool = False

    def __repr__(self) -> str:  # never the secret
        return f"Endpoint(name={self.name!r}, url={self.url!r})"

    def request(self, outcome: OutcomeRow, now: datetime | None = None) -> Request:
        if self.name == "vtex":
            url = f"{self.url}{NOTIFICATION_ROUTE}?an={self.account}"
            body = vtex_body(outcome)
        else:
            url = self.url
            view = {**outcome.view(), "timestamp": outcome.occurred_at.isoformat()}
            if self.scoped:
                view |= {"id": f"{self.account}:{outcome.id}", "account": self.account}
            body = json.dumps(view, separators=(",", ":"))
        headers = {"Content-Type": "application/json", "User-Agent": f"omsd/{omsd_version()}"}
        if self.secret is not None:
            msg_id = f"{self.account}:{outcome.id}" if self.scoped else outcome.id
            headers.update(sign(self.secret, msg_id, body, now or datetime.now(UTC)))
        return Request(url, body, headers)


def sign(secret: SecretStr, msg_id: str, body: str, at: datetime) -> dict[str, str]:
    """The three Standard Webhooks headers for `body` sent at `at`."""
    at = at.astimezone(UTC)
    signature = Webhook(secret.get_secret_value()).sign(msg_id, at, body)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(at.timestamp())), "webhook-signature": signature}


def vtex_body(outcome: OutcomeRow) -> str:
    """VTEX's processing-result body as VTEX sent it; rebuilt in VTEX's spelling for a row
    that did not keep it (journaled before omsd kept bodies, or ingested)."""
    data: dict[str, Any] = outcome.data
    if isinstance(body := data.get("body"), str):
        return body
    rebuilt = {
        "accountName": data.get("account"),
        "success": data.get("success"),
        "flow": data.get("flow"),
        "operationId": data.get("operation_id"),
        "marketplaceOrderId": outcome.marketplace_order_id,
        "code": data.get("code"),
        "message": data.get("message"),
    }
    return json.dumps({k: v for k, v in rebuilt.items() if v is not None})


def endpoints(
    *, relay_url: str | None, relay_vtex_url: str | None, secret: SecretStr | None, account: str, scoped: bool = False
) -> list[Endpoint]:
    out = []
    if relay_url:
        out.append(Endpoint("webhook", relay_url, secret, account, scoped=scoped))
    if relay_vtex_url:
        out.append(Endpoint("vtex", relay_vtex_url, secret, account, types=(PROCESSING_RESULT,)))
    return out
