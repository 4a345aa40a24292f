"""VTEX OMS status ids and omsd's local approval phases.

The sets next to the enums are the only place that says which VTEX statuses
mean "held", "canceling" or "past approval"; the machine reads nothing else.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """Every OMS status id the VTEX reference lists (docs/vtex.md, section 4)."""

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


HELD = Status.WAITING_FOR_MANUAL_AUTHORIZATION

# An order in one of these will never be approved: the intent closes as rejected.
# `replaced` is included because a replaced order cannot be modified any more.
CANCEL_STATUSES: frozenset[Status] = frozenset(
    {
        Status.REQUEST_CANCEL,
        Status.CANCELLATION_REQUESTED,
        Status.CANCEL,
        Status.CANCELED,
        Status.REPLACED,
        Status.ORDER_CREATE_ERROR,
        Status.ORDER_CREATION_ERROR,
    }
)

# The order is still being created or integrated in the seller's flow, or (one UNCONFIRMED
# reading of the doc) it rests in `order-accepted` while it waits for the marketplace's
# approval. Not a reason to wait long: an approval sent too early only earns EOI008 (not
# integrated yet) or EOI011 (held). omsd tries such an order at once when the status left
# the hold (a release), otherwise after one short creation re-check.
CREATING_STATUSES: frozenset[Status] = frozenset(
    {
        Status.ORDER_CREATED,
        Status.ORDER_COMPLETED,
        Status.ON_ORDER_COMPLETED,
        Status.ON_ORDER_COMPLETED_FFM,
        Status.ORDER_ACCEPTED,
    }
)

# Statuses an order only reaches once the marketplace's approval went through.
# Seeing one of them confirms an approval (or shows none is needed).
APPROVED_STATUSES: frozenset[Status] = frozenset(
    {
        Status.AUTHORIZE_FULFILLMENT,
        Status.WINDOW_TO_CANCEL,
        Status.READY_FOR_HANDLING,
        Status.START_HANDLING,
        Status.HANDLING,
        Status.READY_FOR_INVOICING,
        Status.INVOICE,
        Status.INVOICED,
        Status.RELEASE_TO_FULFILLMENT,
        Status.INVOICE_AFTER_CANCELLATION_DENY,
    }
)

# The statuses VTEX lists as filterable for a FromWorkflow feed or hook filter.
FILTERABLE_STATUSES: tuple[str, ...] = (
    "order-created",
    "on-order-completed",
    "on-order-completed-ffm",
    "payment-pending",
    "waiting-for-order-authorization",
    "approve-payment",
    "payment-approved",
    "request-cancel",
    "waiting-for-seller-decision",
    "waiting-ffmt-authorization",
    "waiting-for-authorization",
    "waiting-for-manual-authorization",
    "authorize-fulfillment",
    "order-create-error",
    "order-creation-error",
    "window-to-cancel",
    "window-to-change-seller",
    "waiting-for-mkt-authorization",
    "waiting-seller-handling",
    "ready-for-handling",
    "start-handling",
    "handling",
    "invoice-after-cancellation-deny",
    "order-accepted",
    "invoice",
    "invoiced",
    "replaced",
    "cancellation-requested",
    "cancel",
    "canceled",
)


def is_cancel(status: Status | None) -> bool:
    return status is not None and status in CANCEL_STATUSES


def is_creating(status: Status | None) -> bool:
    return status is not None and status in CREATING_STATUSES


def is_approved(status: Status | None) -> bool:
    return status is not None and status in APPROVED_STATUSES


class Phase(StrEnum):
    """Where omsd is with one order's approval."""

    TRACKING = "tracking"  # no approval intent: only the VTEX status is followed
    WAITING_RELEASE = "waiting_release"  # intent known; order held or not yet seen free
    CHECKING = "checking"  # a Get order is in flight to confirm the order may be approved
    SENDING = "sending"  # the approval PUT is in flight
    AWAITING_RESULT = "awaiting_result"  # VTEX enqueued the approval (SOI003); waiting for SOI002
    RETRY_WAIT = "retry_wait"  # a transient failure; a timer brings it back to CHECKING
    APPROVED = "approved"  # confirmed by SOI002 or by the order's status
    REJECTED = "rejected"  # canceled (or otherwise not approvable, ever)
    DEAD = "dead"  # retry budget spent; an operator must look (`omsd retry`)


TERMINAL_PHASES: frozenset[Phase] = frozenset({Phase.APPROVED, Phase.REJECTED, Phase.DEAD})


STUCK = "stuck"
"""Not a phase of the machine: what the store's phase column says of an order stuck on an
event it could not apply (`Order.stuck`), so that `omsd orders --phase stuck`, `omsd stuck`
and `omsd_orders{phase="stuck"}` find it at once. The order's record keeps its machine phase."""
