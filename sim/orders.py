"""Orders and their status flow on the seller's side (doc §4, §3.6): created, accepted,
then either waiting for the marketplace's authorization or held in
waiting-for-manual-authorization until the seller authorizes the price divergence or
rejects it (cancel → canceled)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .clock import Clock, vtex_time
from .runtime import Runtime
from .statuses import (
    APPROVABLE,
    CANCELING,
    FINAL,
    HELD,
    NOT_INTEGRATED,
    RELEASE_READINGS,
    Status,
    can_cancel,
    can_hold,
)


@dataclass
class SimOrder:
    order_id: str
    marketplace_order_id: str
    affiliate_id: str
    status: str
    last_change: datetime
    held: bool = False
    decision: str | None = None  # authorize | reject | None (a person has not decided)
    decide_after_s: float = 1.0
    flip_back: int = 0  # times an approval finds the order put back on hold
    release_status: str = Status.WAITING_FFMT_AUTHORIZATION.value  # §4 UNCONFIRMED: see RELEASE_READINGS
    history: list[tuple[str, str]] = field(default_factory=list)
    puts: int = 0
    puts_while_held: int = 0
    put_at: list[datetime] = field(default_factory=list)  # when each approval PUT reached the handler
    approvals_applied: int = 0
    was_held: bool = False
    authorized: bool = False  # the seller accepted the price divergence

    def state(self) -> dict[str, Any]:
        """The order as the `/_sim/orders` control route shows it."""
        return {
            "marketplaceOrderId": self.marketplace_order_id,
            "status": self.status,
            "wasHeld": self.was_held,
            "puts": self.puts,
            "putsWhileHeld": self.puts_while_held,
            "approvalsApplied": self.approvals_applied,
            "history": [s for s, _ in self.history],
        }


@dataclass(frozen=True)
class Change:
    """One status change: what the feed and the hook report (§1.2, §2.3)."""

    order: SimOrder
    last_state: str
    last_change: datetime


class Orders:
    """Every order the simulated seller account holds, and the flows that move them."""

    def __init__(self, runtime: Runtime, step_delay_s: float) -> None:
        self._rt = runtime
        self._clock = Clock()
        self.step_delay_s = step_delay_s
        self.by_id: dict[str, SimOrder] = {}
        self.by_marketplace_id: dict[str, str] = {}
        self.listeners: list[Callable[[Change], None]] = []

    def find(self, marketplace_order_id: str) -> SimOrder | None:
        order_id = self.by_marketplace_id.get(marketplace_order_id)
        return None if order_id is None else self.by_id[order_id]

    def create(
        self,
        marketplace_order_id: str,
        *,
        held: bool = False,
        decision: str | None = "authorize",
        decide_after_s: float = 1.0,
        flip_back: int = 0,
        affiliate_id: str = "MKP",
        release_status: str = Status.WAITING_FFMT_AUTHORIZATION.value,
    ) -> SimOrder:
        """A new order (the same one again for a known marketplace id: EOI007 territory)."""
        existing = self.find(marketplace_order_id)
        if existing is not None:
            return existing
        if release_status not in RELEASE_READINGS:
            raise ValueError(f"release_status must be one of {[s.value for s in RELEASE_READINGS]}")
        # §3.6 INFERENCE: the VTEX order id is {affiliateId}-{marketplaceOrderId}-01.
        order = SimOrder(
            order_id=f"{affiliate_id}-{marketplace_order_id}-01",
            marketplace_order_id=marketplace_order_id,
            affiliate_id=affiliate_id,
            status="",
            last_change=self._clock.now(),
            held=held,
            decision=decision,
            decide_after_s=decide_after_s,
            flip_back=flip_back,
            release_status=release_status,
        )
        self.by_id[order.order_id] = order
        self.by_marketplace_id[marketplace_order_id] = order.order_id
        self.move(order, Status.ORDER_CREATED)
        self._rt.spawn(self._initial_flow(order))
        return order

    async def _initial_flow(self, order: SimOrder) -> None:
        """order-created → order-accepted → held or released; a step is skipped when
        something else (a cancel, a hold) has moved the order meanwhile."""
        await asyncio.sleep(self.step_delay_s)
        if order.status != Status.ORDER_CREATED:
            return
        self.move(order, Status.ORDER_ACCEPTED)
        await asyncio.sleep(self.step_delay_s)
        if order.status != Status.ORDER_ACCEPTED:
            return
        if order.held:
            self.move(order, HELD)
            if order.decision is not None:
                self.decide_later(order)
        else:
            self.move(order, order.release_status)

    def decide_later(self, order: SimOrder) -> None:
        """The seller decides on the divergence after `decide_after_s`."""
        self._rt.spawn(self._decide_later(order))

    async def _decide_later(self, order: SimOrder) -> None:
        await asyncio.sleep(order.decide_after_s)
        if order.decision == "reject":
            self.reject(order.order_id)
        else:
            self.authorize(order.order_id)

    def authorize(self, order_id: str) -> None:
        """The seller approves the price divergence (§4 "After the seller decides")."""
        order = self.by_id[order_id]
        if order.status == HELD:
            order.authorized = True
            self.move(order, order.release_status)

    def reject(self, order_id: str) -> None:
        """The seller refuses the price divergence: the order is canceled (cancel → canceled)."""
        order = self.by_id[order_id]
        if not can_cancel(order.status):
            return
        self.move(order, Status.CANCEL)
        self._rt.spawn(self._finish_cancel(order))

    async def _finish_cancel(self, order: SimOrder) -> None:
        await asyncio.sleep(self.step_delay_s)
        self.move(order, Status.CANCELED)

    def hold(self, order_id: str) -> None:
        """Put the order on hold for manual authorization (before the marketplace's approval only)."""
        order = self.by_id[order_id]
        if can_hold(order.status):
            self.move(order, HELD)

    def waits_for_seller(self, order: SimOrder) -> bool:
        """§3.5: held, or divergent and not yet authorized: an approval fails with EOI011."""
        return order.status == HELD or (order.held and not order.authorized)

    def approval_code(self, order: SimOrder) -> str:
        """The ApproveOrder result for an order in its current status (§3.4, §3.5)."""
        if order.status in CANCELING or order.status in FINAL:
            return "EOI009"
        if self.waits_for_seller(order):
            return "EOI011"
        if order.status in NOT_INTEGRATED:
            return "EOI008"
        if order.status in APPROVABLE:
            return "SOI002"
        return "EOI009"  # past approval, or a status no approval starts from

    def approve(self, order: SimOrder) -> None:
        """The marketplace's approval goes through: authorize-fulfillment."""
        order.approvals_applied += 1
        self.move(order, Status.AUTHORIZE_FULFILLMENT)

    async def fulfil(self, order: SimOrder) -> None:
        """After the approval: window-to-cancel → ready-for-handling, stopped by a cancel."""
        for status in (Status.WINDOW_TO_CANCEL, Status.READY_FOR_HANDLING):
            await asyncio.sleep(self.step_delay_s)
            if order.status in CANCELING:
                return
            self.move(order, status)

    def move(self, order: SimOrder, status: str) -> None:
        change = Change(order, order.status, order.last_change)
        order.status = status
        order.last_change = self._clock.now()
        if status == HELD:
            order.was_held = True
        order.history.append((status, vtex_time(order.last_change)))
        for listener in self.listeners:
            listener(change)
