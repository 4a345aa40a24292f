"""Approval intents, from the connector (`POST /v1/approvals`) and from an operator
(`omsd approve`): one validation for both, then one journal entry.

The ids must have VTEX's shapes (`wire.ApprovalRequest`), and an intent that names a VTEX
order known under another marketplace id is refused (`routing.contradiction`) before it is
journaled, so it never reaches that order's record. The processor applies the same rule
to an intent whose contradiction became known only after it was journaled.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import ValidationError

from omsd.state import routing
from omsd.state.store import Appended, Store

from . import entries, wire


class IntentRefused(Exception):
    """An intent omsd does not take: `status` as the API answers it (400 bad ids, 409 ids
    that contradict what omsd knows), `reason` naming the field or the contradiction."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def parse(marketplace_order_id: str, order_id: str | None) -> wire.ApprovalRequest:
    """The intent, validated as the API validates its body; IntentRefused(400) otherwise."""
    raw: dict[str, str] = {"marketplaceOrderId": marketplace_order_id}
    if order_id is not None:
        raw["orderId"] = order_id
    try:
        return wire.ApprovalRequest.model_validate(raw)
    except ValidationError as exc:
        raise IntentRefused(400, wire.validation_reason(exc)) from None


async def check(store: Store, req: wire.ApprovalRequest) -> None:
    """IntentRefused(409) when the named order is known under another marketplace id."""
    if req.order_id is None:
        return
    order = await store.read.load_order(req.order_id)
    reason = routing.contradiction(order, req.marketplace_order_id)
    if reason is not None:
        raise IntentRefused(409, reason)


async def record(store: Store, req: wire.ApprovalRequest, source: Literal["api", "cli"], now: datetime) -> Appended:
    """Journal the intent (after `check`); the processor applies it."""
    [appended] = await store.journal.append(
        [entries.intent_entry(req.marketplace_order_id, req.order_id, source, now)], now=now
    )
    return appended
