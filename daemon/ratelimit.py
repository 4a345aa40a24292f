"""The request rate: how fast (AIMD) and how evenly (send windows) calls leave.

`OMSD_RATE_LIMIT_PER_S` is a ceiling, not a promise: VTEX does not disclose its
limits and an account's may be lower. Every 429 VTEX answers cuts the rate
(×`decrease`); each `quiet_s` without one gives back `increase` of the ceiling.
The rate never rises above the ceiling and never falls below the floor.

`SendWindows` spreads the budget: no one-second window holds more than the rate's
slots, and no 100 ms window more than a tenth of them (rounded up), so calls
leave evenly instead of a second's worth at once.

Pure: the caller passes the time in, so a fake clock drives it in tests.
"""

from __future__ import annotations

import math
from collections import deque

SPREAD = 10  # a one-second budget is spent over this many equal slices
_EPSILON_S = 1e-9  # a wait this short is none (float sums of a fake clock must not loop)


class AdaptiveRate:
    """The rate (requests per second) the client should hold itself to right now."""

    def __init__(
        self,
        ceiling: float,
        *,
        floor: float = 1.0,
        decrease: float = 0.7,
        increase: float = 0.05,
        quiet_s: float = 5.0,
        cooldown_s: float = 1.0,
        now: float = 0.0,
    ) -> None:
        if ceiling <= 0 or floor <= 0 or not 0 < decrease <= 1 or increase < 0 or quiet_s <= 0 or cooldown_s < 0:
            raise ValueError("ceiling, floor and quiet_s must be positive, decrease within (0, 1], increase >= 0")
        self.ceiling = ceiling
        self.floor = min(floor, ceiling)
        self.decrease = decrease
        self.step = increase * ceiling
        self.quiet_s = quiet_s
        self.cooldown_s = cooldown_s
        self.rate = ceiling
        self._last_change = now
        self._last_cut: float | None = None

    def on_429(self, now: float) -> float:
        """VTEX refused a call: cut the rate. 429s within `cooldown_s` of the last cut
        are one event (a burst in flight when the limit was hit), cut once."""
        if self._last_cut is None or now - self._last_cut >= self.cooldown_s:
            self.rate = max(self.floor, self.rate * self.decrease)
            self._last_cut = now
        self._last_change = now
        return self.rate

    def on_success(self, now: float) -> float:
        """A call went through: after `quiet_s` without a 429 (or a raise), raise one step."""
        if self.rate < self.ceiling and now - self._last_change >= self.quiet_s:
            self.rate = min(self.ceiling, self.rate + self.step)
            self._last_change = now
        return self.rate

    @property
    def slots(self) -> int:
        """Calls allowed per one-second window. The ceiling rounds (as the configured rate
        always has); a lowered rate rounds down, so no window holds more calls than it."""
        if self.rate >= self.ceiling:
            return max(1, round(self.ceiling))
        return max(1, math.floor(self.rate + 1e-9))


class SendWindows:
    """When the next call may leave: no one-second window (half-open, at the sender)
    holds more than `per_s` calls, no 100 ms window more than `per_burst`.

    The caller asks `wait_s(now)`, waits that long, asks again (the answer is 0 once
    it may go) and records the send with `take(now)`; one caller at a time.

    This replaces asyncio-throttle's `Throttler`: two of them chained (1 s and 100 ms)
    record a call in each window at a different instant (the second after the first
    one's wait), so one of the two windows can hold a call over its allowance; the
    library reads `time.monotonic` itself, so no fake clock can drive it; and its
    waiters poll every 10 ms instead of sleeping until the slot frees. One log of
    send times checked against both windows has none of these faults.
    """

    def __init__(self, per_s: int) -> None:
        if per_s < 1:
            raise ValueError("per_s must be at least 1")
        self.per_s = per_s
        self._sent: deque[float] = deque()

    @property
    def per_burst(self) -> int:
        return max(1, math.ceil(self.per_s / SPREAD))

    def wait_s(self, now: float) -> float:
        """Seconds until a call may leave (0: now)."""
        while self._sent and self._sent[0] <= now - 1.0:
            self._sent.popleft()  # outside every window that ends after now
        wait = 0.0
        for allowed, period in ((self.per_s, 1.0), (self.per_burst, 1.0 / SPREAD)):
            if len(self._sent) >= allowed:
                # the window ending now holds `allowed` calls: wait until the oldest of them leaves it
                wait = max(wait, self._sent[-allowed] + period - now)
        return wait if wait > _EPSILON_S else 0.0

    def take(self, now: float) -> None:
        """A call leaves now."""
        self._sent.append(now)
