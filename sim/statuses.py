"""VTEX's OMS status ids and what each means for an order, as the simulator models it.

Written from the project's VTEX reference (../shared/vtex/README.md, "doc" below): §4
for the status table, §1.4 for the filterable list, §3.4/§3.5 for which statuses an
approval may start from. This is the simulator's own reading, kept apart from omsd's
on purpose: an oracle that borrowed omsd's sets would share omsd's mistakes.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """Every OMS status id VTEX's status table and filter list name (§4, §1.4)."""

    ORDER_CREATED = "order-created"
    ORDER_COMPLETED = "order-completed"
    ON_ORDER_COMPLETED = "on-order-completed"
    ON_ORDER_COMPLETED_FFM = "on-order-completed-ffm"
    ORDER_ACCEPTED = "order-accepted"
    WAITING_FOR_AUTHORIZATION = "waiting-for-authorization"
    PAYMENT_PENDING = "payment-pending"
    APPROVE_PAYMENT = "approve-payment"
    PAYMENT_APPROVED = "payment-approved"
    WAITING_FOR_ORDER_AUTHORIZATION = "waiting-for-order-authorization"
    WAITING_FOR_MANUAL_AUTHORIZATION = "waiting-for-manual-authorization"
    WAITING_FFMT_AUTHORIZATION = "waiting-ffmt-authorization"
    WAITING_FOR_FULFILLMENT = "waiting-for-fulfillment"
    AUTHORIZE_FULFILLMENT = "authorize-fulfillment"
    WAITING_FOR_MKT_AUTHORIZATION = "waiting-for-mkt-authorization"
    WAITING_SELLER_HANDLING = "waiting-seller-handling"
    WINDOW_TO_CHANGE_PAYMENT = "window-to-change-payment"
    WINDOW_TO_CHANGE_SELLER = "window-to-change-seller"
    WINDOW_TO_CANCEL = "window-to-cancel"
    READY_FOR_HANDLING = "ready-for-handling"
    START_HANDLING = "start-handling"
    HANDLING = "handling"
    READY_FOR_INVOICING = "ready-for-invoicing"
    INVOICE = "invoice"
    INVOICED = "invoiced"
    WAITING_FOR_SELLER_DECISION = "waiting-for-seller-decision"
    REQUEST_CANCEL = "request-cancel"
    CANCELLATION_REQUESTED = "cancellation-requested"
    CANCEL = "cancel"
    CANCELED = "canceled"
    INVOICE_AFTER_CANCELLATION_DENY = "invoice-after-cancellation-deny"
    REPLACED = "replaced"
    ORDER_CREATE_ERROR = "order-create-error"
    ORDER_CREATION_ERROR = "order-creation-error"
    RELEASE_TO_FULFILLMENT = "release-to-fulfillment"


# §3.5, §4: held for the seller's decision on a price divergence; an approval fails with EOI011.
HELD = Status.WAITING_FOR_MANUAL_AUTHORIZATION

# §4: the cancellation statuses (customer or seller asked, canceling, canceled).
CANCELING: frozenset[Status] = frozenset(
    {Status.REQUEST_CANCEL, Status.CANCELLATION_REQUESTED, Status.CANCEL, Status.CANCELED}
)

# §4 "Terminal statuses": canceled and invoiced are final; replaced is superseded (INFERENCE
# in the doc, taken here). Nothing moves an order out of these.
FINAL: frozenset[Status] = frozenset({Status.CANCELED, Status.INVOICED, Status.REPLACED})

# §4: the seller flow after the marketplace's authorization: authorize-fulfillment (handling
# approved) → window-to-cancel → ready-for-handling → start-handling → handling → invoicing.
PAST_APPROVAL: frozenset[Status] = frozenset(
    {
        Status.AUTHORIZE_FULFILLMENT,
        Status.WINDOW_TO_CANCEL,
        Status.READY_FOR_HANDLING,
        Status.START_HANDLING,
        Status.HANDLING,
        Status.READY_FOR_INVOICING,
        Status.INVOICE,
        Status.INVOICED,
    }
)

# §3.4 EOI008 "order not integrated in VTEX yet": the order's data is still being processed.
NOT_INTEGRATED: frozenset[Status] = frozenset({Status.ORDER_CREATED})

# §4: the seller has the order (order-accepted) or waits for the marketplace's authorization
# (waiting-ffmt-authorization): an approval applies. Every other status not named above is
# "out of a valid status to approve" (EOI009), the code's literal meaning in §3.4.
APPROVABLE: frozenset[Status] = frozenset({Status.ORDER_ACCEPTED, Status.WAITING_FFMT_AUTHORIZATION})

# §1.4: the statuses the spec lists as filterable in a FromWorkflow feed or hook filter.
FILTERABLE: frozenset[Status] = frozenset(
    {
        Status.ORDER_CREATED,
        Status.ON_ORDER_COMPLETED,
        Status.ON_ORDER_COMPLETED_FFM,
        Status.PAYMENT_PENDING,
        Status.WAITING_FOR_ORDER_AUTHORIZATION,
        Status.APPROVE_PAYMENT,
        Status.PAYMENT_APPROVED,
        Status.REQUEST_CANCEL,
        Status.WAITING_FOR_SELLER_DECISION,
        Status.WAITING_FFMT_AUTHORIZATION,
        Status.WAITING_FOR_AUTHORIZATION,
        Status.WAITING_FOR_MANUAL_AUTHORIZATION,
        Status.AUTHORIZE_FULFILLMENT,
        Status.ORDER_CREATE_ERROR,
        Status.ORDER_CREATION_ERROR,
        Status.WINDOW_TO_CANCEL,
        Status.WINDOW_TO_CHANGE_SELLER,
        Status.WAITING_FOR_MKT_AUTHORIZATION,
        Status.WAITING_SELLER_HANDLING,
        Status.READY_FOR_HANDLING,
        Status.START_HANDLING,
        Status.HANDLING,
        Status.INVOICE_AFTER_CANCELLATION_DENY,
        Status.ORDER_ACCEPTED,
        Status.INVOICE,
        Status.INVOICED,
        Status.REPLACED,
        Status.CANCELLATION_REQUESTED,
        Status.CANCEL,
        Status.CANCELED,
    }
)

# §4 "After the seller decides": the status an authorized order moves to is UNCONFIRMED;
# these are the readings the doc offers (SimOrder.release_status picks one).
RELEASE_READINGS: tuple[Status, ...] = (
    Status.WAITING_FFMT_AUTHORIZATION,
    Status.ORDER_ACCEPTED,
    Status.AUTHORIZE_FULFILLMENT,
)


def can_cancel(status: str) -> bool:
    """§4: a canceling or final order cannot be canceled (again)."""
    return status not in CANCELING and status not in FINAL


def can_hold(status: str) -> bool:
    """A price-divergence hold only comes before the marketplace's approval (§3.6, §4)."""
    return status in NOT_INTEGRATED or status in APPROVABLE


def is_completed(status: str) -> bool:
    """Get order's `isCompleted` ("payment settled", §5): the marketplace's approval went through."""
    return status in PAST_APPROVAL
