"""The request rate: how fast (AIMD) and how evenly (`spread`) calls leave.

`OMSD_RATE_LIMIT_PER_S` is a ceiling, not a promise: VTEX does not disclose its
limits and an account's may be lower. `AdaptiveRate` cuts the rate (×`decrease`)
when the 429s it sees show a limit, not on every 429: VTEX (and the simulator's
fault mix) also answers 429 now and then at any rate, and cutting for those keeps
the rate low for nothing. A limit shows as a share of 429s among the recent
answers well above such noise (more than `limit_share` of the last `window`), or
as `consecutive` 429s in a row (a burst over a limit). Near the rate where the last
limit showed (from 90 % of it) a cut is gentler (×`near_decrease`): the limit is
known, and the rate only needs to step back under it. Far above a limit, the last
second shows where it is: when the calls of that second used most of the rate, the
cut goes straight down to the calls VTEX let through in it (an account that admits
15/s, met at 50/s, is found in one cut, not four, each costing a second of 429s).

The rate goes back up only on evidence: each `quiet_s` without a cut, while the
recent answers show no limit *and the calls of that period used most of the rate*
(`used_share`), gives back `increase` of the rate where the last limit showed (of
the ceiling before any); from 90 % of that rate, each step takes `near_factor` times
as long. A rate nobody uses proves nothing, so an idle client does not climb back to
the ceiling only to meet the limit in a burst; and near a limit it found, it probes in
small, slow steps: an account whose limit is below the ceiling sees a few 429s a
minute, not a dozen. `learned` and `restore` carry the rate and the limit's rate
across a restart (daemon/vtex/memory.py).

`spread` turns the rate's slots into a sliding window (`SendWindow`) so that
calls leave evenly, at most a tenth of a second's budget at once, instead of a
second's worth at once; no one-second window (5 % longer at the sender) holds
more than the slots.

Pure: the caller passes the time in, so a fake clock drives both in tests.
"""

from __future__ import annotations

import bisect
import math
from collections import deque

SPREAD = 10  # at most this share (a tenth) of a second's budget leaves at once
MARGIN = 0.05  # the sender's one-second windows are this much longer (1.05 s): see spread


NEAR = 0.9  # from this share of the rate where the last limit showed, the rate is near that limit
LEVEL_SHARE = 0.75  # a second whose calls used this share of the rate shows the limit's level


class AdaptiveRate:
    """The rate (requests per second) the client should hold itself to right now."""

    def __init__(
        self,
        ceiling: float,
        *,
        floor: float = 1.0,
        decrease: float = 0.7,
        near_decrease: float = 0.9,
        increase: float = 0.05,
        quiet_s: float = 5.0,
        cooldown_s: float = 1.0,
        window: int = 100,
        limit_share: float = 0.07,
        consecutive: int = 3,
        near_factor: float = 6.0,
        used_share: float = 0.75,
        now: float = 0.0,
    ) -> None:
        if ceiling <= 0 or floor <= 0 or not 0 < decrease <= 1 or increase < 0 or quiet_s <= 0 or cooldown_s < 0:
            raise ValueError("ceiling, floor and quiet_s must be positive, decrease within (0, 1], increase >= 0")
        if window < 1 or not 0 < limit_share < 1 or consecutive < 1 or near_factor < 1:
            raise ValueError("window and consecutive must be positive, limit_share within (0, 1), near_factor >= 1")
        if not decrease <= near_decrease <= 1 or not 0 <= used_share <= 1:
            raise ValueError("near_decrease must be positive within [decrease, 1], used_share within [0, 1]")
        self.ceiling = ceiling
        self.floor = min(floor, ceiling)
        self.decrease = decrease
        self.near_decrease = near_decrease
        self.increase = increase
        self.quiet_s = quiet_s
        self.cooldown_s = cooldown_s
        self.consecutive = consecutive
        self.near_factor = near_factor
        self.used_share = used_share
        self.rate = ceiling
        self._cut_from = math.inf  # the rate when the last limit showed
        # a cut needs more than this many 429s among the last `window` answers
        self._cut_above = math.floor(limit_share * window)
        self._recent: deque[bool] = deque(maxlen=window)  # True: a 429
        self._run = 0  # 429s in a row
        self._answers: deque[float] = deque()  # when the answers of the longest quiet period came
        self._last_second: deque[tuple[float, bool]] = deque()  # (when, a 429) of the last second's answers
        self._last_change = now
        self._last_cut: float | None = None

    @property
    def limited_recently(self) -> int:
        """429s among the recent answers counted as evidence."""
        return sum(self._recent)

    @property
    def step(self) -> float:
        """One step up: `increase` of the rate where the last limit showed (the ceiling before any)."""
        return self.increase * min(self.ceiling, self._cut_from)

    def _near(self) -> bool:
        return self.rate >= NEAR * self._cut_from

    def _answered(self, now: float, limited: bool) -> None:
        answers = self._answers
        answers.append(now)
        horizon = now - self.quiet_s * self.near_factor
        while answers[0] < horizon:
            answers.popleft()
        second = self._last_second
        second.append((now, limited))
        while second[0][0] <= now - 1.0:
            second.popleft()

    def _admitted_last_second(self) -> float | None:
        """The calls VTEX let through in the last second, when that second's calls used most
        of the rate (else they show demand, not a limit)."""
        if len(self._last_second) < LEVEL_SHARE * self.rate:
            return None
        return float(sum(1 for _, limited in self._last_second if not limited))

    def on_429(self, now: float) -> float:
        """VTEX refused a call: cut the rate if the recent answers show a limit. 429s
        within `cooldown_s` of a cut answer calls sent before it: not new evidence."""
        self._answered(now, True)
        if self._last_cut is not None and now - self._last_cut < self.cooldown_s:
            return self.rate
        self._recent.append(True)
        self._run += 1
        if self._run >= self.consecutive or self.limited_recently > self._cut_above:
            target = self.rate * (self.near_decrease if self._near() else self.decrease)
            if (admitted := self._admitted_last_second()) is not None:
                target = min(target, admitted)
            self._cut_from = self.rate
            self.rate = max(self.floor, target)
            self._last_cut = self._last_change = now
            self._recent.clear()  # the next cut needs evidence gathered at the new rate
            self._run = 0
        return self.rate

    def on_success(self, now: float) -> float:
        """A call went through: after `quiet_s` without a cut (or a raise), raise one step,
        if the calls of that period used the rate and the recent answers do not lean
        towards a limit (half the cut's share)."""
        self._answered(now, False)
        self._recent.append(False)
        self._run = 0
        if self.rate >= self.ceiling:
            return self.rate
        quiet_s = self.quiet_s * (self.near_factor if self._near() else 1.0)
        if now - self._last_change < quiet_s or 2 * self.limited_recently > self._cut_above:
            return self.rate
        since = now - quiet_s
        used = len(self._answers) - bisect.bisect_left(self._answers, since)
        if used >= self.used_share * self.rate * quiet_s:
            self.rate = min(self.ceiling, self.rate + self.step)
            self._last_change = now
        return self.rate

    def learned(self) -> tuple[float, float | None, str]:
        """What a restart should start from: the rate, the rate where the last limit showed, and
        the recent answers counted as evidence (`1` a 429, `0` not, oldest first)."""
        recent = "".join("1" if limited else "0" for limited in self._recent)
        return self.rate, None if math.isinf(self._cut_from) else self._cut_from, recent

    def evidence(self, now: float) -> tuple[float, tuple[float, ...]]:
        """What a restart should go on from to climb: how long ago the rate last changed, and how
        long ago each answer that still counts as evidence of use came (see `restore`)."""
        return now - self._last_change, tuple(now - t for t in self._answers)

    def restore(
        self,
        rate: float,
        cut_from: float | None,
        now: float,
        recent: str = "",
        *,
        evidence: tuple[float, tuple[float, ...]] | None = None,
    ) -> None:
        """Start from what an earlier run learned, the recent answers included (restarts a few
        seconds apart would otherwise each forget the 429s that were adding up to a cut). With
        `evidence` (seconds since the rate last changed, and since each answer counted as use,
        both including the time the process was down), the quiet period and the calls that show
        the rate used go on across the restart: the time it was down counts as time without
        calls, so a climb still needs the budget used. Without, the quiet period starts now
        (restarts a few seconds apart then kept the rate where it was: none lived a quiet period)."""
        self.rate = min(self.ceiling, max(self.floor, rate))
        self._cut_from = math.inf if cut_from is None else min(cut_from, self.ceiling)
        self._recent.clear()
        self._recent.extend(c == "1" for c in recent if c in "01")
        self._answers.clear()
        self._last_second.clear()
        self._run = 0
        self._last_change = now
        if evidence is not None:
            quiet_for, ages = evidence
            self._last_change = now - max(0.0, quiet_for)
            horizon = self.quiet_s * self.near_factor
            self._answers.extend(sorted(now - age for age in ages if 0.0 <= age <= horizon))

    @property
    def slots(self) -> int:
        """Calls allowed per one-second window. The ceiling rounds (as the configured rate
        always has); a lowered rate rounds down, so no window holds more calls than it."""
        if self.rate >= self.ceiling:
            return max(1, round(self.ceiling))
        return max(1, math.floor(self.rate + 1e-9))


def spread(per_s: int) -> tuple[int, float]:
    """The sliding window that spends `per_s` calls a second evenly: (calls, seconds).

    `SendWindow(calls, period=seconds)` lets no window of `seconds` hold more than
    `calls`. The budget is cut into `m = per_s // calls` such windows
    per 1.05 s, `calls` at most a tenth of it: any window of 1.05 s is covered by m
    of them, so it holds at most calls × m ≤ per_s; at most a tenth of the budget
    leaves at once, and what leaves is spread over the second. `calls` is the largest
    that wastes less than 5 % of the budget to rounding (2 for 32, not 3: 3 × 10 is 30).

    The windows are 5 % longer at the sender (`MARGIN`) so that calls that reach VTEX
    a little sooner or later than they left (event-loop and network jitter, up to
    50 ms) still fit its one-second windows. One window, not two chained throttlers
    (1 s and 100 ms), so no call is counted at two different instants.
    """
    if per_s < 1:
        raise ValueError("per_s must be at least 1")
    # the most calls per window (the fewest wake-ups while the throttle is full) that waste
    # less than 5 % of the budget to rounding; one call per window wastes nothing
    calls = next(k for k in range(max(1, per_s // SPREAD), 0, -1) if k * (per_s // k) >= 0.95 * per_s)
    return calls, (1.0 + MARGIN) / (per_s // calls)


HORIZON = 1.0 + MARGIN  # the longest window `spread` gives (one call per 1.05 s)
_TOLERANCE = 1e-9  # a call this close to a window's edge is out of it (floating point)


class SendWindow:
    """A sliding window: a call leaves only when the last `period` seconds hold fewer than
    `calls` calls. The setting changes with the adaptive rate and applies to the next call.

    Every call is remembered for `HORIZON`, the longest window any setting gives, not only
    for the current `period`: asyncio-throttle's Throttler, used before, forgot the calls
    older than its current period, so when a rate cut then lengthened the window, the
    calls it had forgotten were not counted and a call could leave into a window that
    already held `calls` (tests/test_ratelimit.py). Pure: the caller passes the time in,
    and sleeps `delay` itself."""

    __slots__ = ("_sent", "calls", "period")

    def __init__(self, calls: int = 1, period: float = HORIZON) -> None:
        self.calls = calls
        self.period = period
        self._sent: deque[float] = deque()  # departure times, oldest first

    def set(self, calls: int, period: float) -> None:
        if calls < 1 or not 0 < period <= HORIZON:
            raise ValueError("calls must be at least 1 and period within (0, HORIZON]")
        self.calls, self.period = calls, period

    def delay(self, now: float) -> float:
        """Seconds until a call may leave (0: now)."""
        sent = self._sent
        while sent and sent[0] <= now - HORIZON + _TOLERANCE:
            sent.popleft()
        first = bisect.bisect_right(sent, now - self.period + _TOLERANCE)  # the calls still in the window
        inside = len(sent) - first
        if inside < self.calls:
            return 0.0
        # the window holds `calls` or more: wait until all but `calls - 1` of them have left it
        return max(_TOLERANCE, sent[first + inside - self.calls] + self.period - now)

    def take(self, now: float) -> None:
        """A call leaves now (the caller checked `delay`)."""
        self._sent.append(now)
