"""The Channel Order API's result codes (../shared/vtex/README.md §3.4).

One enum for the machine, the effect runner and the HTTP routes. Events keep the
code as VTEX sent it (a `str`: an undocumented code must still be journaled);
a `StrEnum` member compares equal to its string, so `code == ResultCode.HELD`
works on either.
"""

from __future__ import annotations

from enum import StrEnum


class ResultCode(StrEnum):
    ORDER_INTEGRATED = "SOI001"  # PlaceOrder succeeded
    APPROVED = "SOI002"  # ApproveOrder succeeded
    ENQUEUED = "SOI003"  # the request was accepted and enqueued (synchronous answer)
    UNKNOWN_ERROR = "EOI000"
    UNMAPPED_ERROR = "EOI001"
    INTERNAL_ERROR = "EOI006"  # a VTEX service failed: retry later
    NOT_INTEGRATED = "EOI008"  # cannot approve: the order is not integrated yet
    INVALID_STATUS = "EOI009"  # the order is out of a valid status to approve
    TIMEOUT = "EOI010"
    HELD = "EOI011"  # price divergence: blocked until the seller's manual authorization


# Answers to an approval that are not a refusal (counted apart in metrics).
APPROVAL_SUCCESS: frozenset[str] = frozenset({ResultCode.APPROVED, ResultCode.ENQUEUED})
