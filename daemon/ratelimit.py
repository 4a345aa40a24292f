"""The effective request rate: additive increase, multiplicative decrease (AIMD).

`OMSD_RATE_LIMIT_PER_S` is a ceiling, not a promise: VTEX does not disclose its
limits and an account's may be lower. Every 429 VTEX answers cuts the rate
(×`decrease`); each `quiet_s` without one gives back `increase` of the ceiling.
The rate never rises above the ceiling and never falls below the floor.

Pure: the caller passes the time in, so a fake clock drives it in tests.
"""

from __future__ import annotations

import math


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
