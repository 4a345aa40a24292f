"""The per-order record, the effects the machine asks for, and its policy knobs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter

from .statuses import HELD, Phase


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Timer(_Frozen):
    """One pending timer per order; `token` tells a stale firing from the current one."""

    token: int
    reason: Literal["held_recheck", "confirm_timeout", "retry", "creating_recheck"]
    due_at: AwareDatetime


class Inflight(_Frozen):
    """The effect whose result the machine is waiting for."""

    seq: int
    kind: Literal["fetch", "send"]
    purpose: str


class Stuck(_Frozen):
    """An event of this order could not be applied (`decide` raised: a bug, a value out of
    range). The order keeps its state from before that event and is kept out of every
    phase: its later events are held (never applied out of order) and none of its effects
    is performed, until a retry applies the held events again (`omsd retry`, every start,
    `omsd replay`): from `offset` on, the order's journal rows, in order."""

    offset: int  # the journal row that could not be applied
    kind: str
    error: str
    at: AwareDatetime  # that row's receipt time
    new: bool = False  # the order did not exist before that row
    held: int = 0  # the order's later events held since


class Order(_Frozen):
    order_id: str
    marketplace_order_id: str | None = None
    status: str | None = None  # latest known VTEX status (by change time)
    status_at: AwareDatetime | None = None
    status_source: str | None = None
    flagged_status: str | None = None  # came dated too far ahead to trust: no approval until a Get order settles it
    flagged_seq: int = 0  # ... a Get order asked after this sequence number
    released_at: AwareDatetime | None = None  # change time of the status that left the hold (cleared by a newer hold)
    held: bool = False  # seen in waiting-for-manual-authorization at least once
    canceled: bool = False  # seen `canceled` at least once: final in VTEX
    intent_source: str | None = None
    intent_at: AwareDatetime | None = None
    phase: Phase = Phase.TRACKING
    inflight: Inflight | None = None
    timer: Timer | None = None
    seq: int = 0  # counter for effect and timer ids
    attempts: int = 0  # transient failures since the last enqueued approval
    eoi008: int = 0
    eoi011: int = 0
    sent: int = 0  # approval PUTs asked for
    sent_on: AwareDatetime | None = None  # change time of the status the latest approval PUT was decided on
    link_checked: bool = False
    creating_checks: int = 0  # Get orders that found the order still in a creation status
    creating_overdue: bool = False  # the short creation re-check was served: a creation status is tried
    stale_checks: int = 0  # Get order answers in a row older than the status omsd already knew
    await_newer_than: AwareDatetime | None = None  # after EOI011: ignore releases not newer than this
    last_code: str | None = None
    last_error: str | None = None
    updated_at: AwareDatetime | None = None
    # Not written while None, so a record without it reads the same in an omsd that predates it.
    stuck: Stuck | None = Field(default=None, exclude_if=lambda v: v is None)

    @property
    def has_intent(self) -> bool:
        return self.intent_source is not None

    @property
    def held_now(self) -> bool:
        """VTEX holds it now: its latest status is the hold and it is not closed (`held` says
        it was ever held, which stays true after a person authorized it)."""
        return self.status == HELD and self.phase not in (Phase.APPROVED, Phase.REJECTED)


# Why a Get order is asked. `pre_approval`: the order is known free, its answer decides the
# approval (the release path); `speculative`: the same check while the order may still be held,
# being created or unknown to omsd (an intent before any status, a creation or held re-check);
# `after_refusal`: after EOI009; `link_intent`: the lookup of an order an intent waits parked
# for; `link`: the background link job; `confirm`: no SOI002 in time.
FetchPurpose = Literal["link", "link_intent", "pre_approval", "speculative", "confirm", "after_refusal"]


class FetchOrder(_Frozen):
    """Call Get order; append OrderFetched or OrderFetchFailed."""

    kind: Literal["fetch_order"] = "fetch_order"
    order_id: str
    seq: int
    purpose: FetchPurpose


class SendApproval(_Frozen):
    """PUT the approval; append ApprovalAnswered or ApprovalFailed."""

    kind: Literal["send_approval"] = "send_approval"
    order_id: str
    seq: int
    marketplace_order_id: str


Effect = Annotated[FetchOrder | SendApproval, Field(discriminator="kind")]
EFFECT_ADAPTER: TypeAdapter[Effect] = TypeAdapter(Effect)


class Decision(_Frozen):
    order: Order
    effects: tuple[Effect, ...] = ()
    cause: str = ""


@dataclass(frozen=True, slots=True)
class Policy:
    """Time and budget knobs of the machine; the daemon fills them from Settings."""

    held_recheck_s: float = 600.0
    confirm_timeout_s: float = 120.0
    retry_base_s: float = 2.0
    retry_cap_s: float = 300.0
    max_attempts: int = 8
    eoi008_recheck_s: float = 10.0  # an approval sent early meets EOI008 as a matter of course: retry soon
    max_eoi008: int = 60  # ... for 10 minutes at the default pace
    creating_recheck_s: float = 5.0  # an order in a creation status is tried after one such wait
    max_clock_skew_s: float = 300.0  # a change time further past its receipt is not trusted for ordering


def later(now: datetime, seconds: float) -> datetime:
    return now + timedelta(seconds=seconds)


def is_superseded(order: Order | None, seq: int) -> bool:
    """An effect stays live only while its order still waits for it (its `inflight`
    sequence); any other effect of the order is superseded and never performed."""
    return order is None or order.inflight is None or order.inflight.seq != seq
