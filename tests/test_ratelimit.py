"""The adaptive rate (AIMD), driven by a fake clock."""

from __future__ import annotations

import bisect
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from omsd.daemon.ratelimit import SPREAD, AdaptiveRate, SendWindows


def test_starts_at_the_configured_rate() -> None:
    """Before any 429 the client runs at OMSD_RATE_LIMIT_PER_S."""
    r = AdaptiveRate(10.0)
    assert r.rate == 10.0 and r.slots == 10


def test_a_429_cuts_the_rate_multiplicatively() -> None:
    """Each 429 (outside the cooldown) multiplies the rate by `decrease`."""
    r = AdaptiveRate(10.0, decrease=0.7)
    assert r.on_429(1.0) == pytest.approx(7.0)
    assert r.on_429(2.0) == pytest.approx(4.9)
    assert r.slots == 4


def test_429s_within_the_cooldown_cut_once() -> None:
    """A burst of 429s answered together is one event: one cut, not one per request."""
    r = AdaptiveRate(10.0, decrease=0.7, cooldown_s=1.0)
    for t in (5.0, 5.1, 5.5, 5.99):
        r.on_429(t)
    assert r.rate == pytest.approx(7.0)


def test_the_rate_never_falls_below_the_floor() -> None:
    """However many 429s come, the rate stays at the floor."""
    r = AdaptiveRate(10.0, floor=1.0)
    for t in range(100):
        r.on_429(float(t))
    assert r.rate == 1.0 and r.slots == 1


def test_a_floor_above_the_ceiling_is_the_ceiling() -> None:
    """A configured rate below the default floor is never raised by it."""
    r = AdaptiveRate(0.5, floor=1.0)
    assert r.on_429(1.0) == 0.5


@pytest.mark.parametrize(
    ("successes_at", "expected"),
    [
        ([], 7.0),  # no traffic: no recovery
        ([1.5, 3.0, 5.9], 7.0),  # less than quiet_s since the 429
        ([6.0], 7.5),  # one quiet period: one step (5 % of 10)
        ([6.0, 6.5, 10.9], 7.5),  # the next step needs another quiet period
        ([6.0, 11.0], 8.0),
        ([6.0, 11.0, 16.0, 21.0, 26.0, 31.0, 36.0, 41.0], 10.0),  # never above the ceiling
    ],
)
def test_recovery_is_additive_after_quiet(successes_at: list[float], expected: float) -> None:
    """After a 429 the rate climbs by `increase` x ceiling per `quiet_s` of successes without a 429."""
    r = AdaptiveRate(10.0, decrease=0.7, increase=0.05, quiet_s=5.0)
    r.on_429(1.0)
    for t in successes_at:
        r.on_success(t)
    assert r.rate == pytest.approx(expected)


def test_a_429_restarts_the_quiet_period() -> None:
    """Recovery waits quiet_s after the latest 429, even one inside the cooldown."""
    r = AdaptiveRate(10.0, quiet_s=5.0, cooldown_s=1.0)
    r.on_429(1.0)
    r.on_429(1.5)  # same event: no second cut
    r.on_success(6.2)  # 5.2 s after the first 429, 4.7 s after the latest
    assert r.rate == pytest.approx(7.0)


@pytest.mark.parametrize(("rate", "slots"), [(10.0, 10), (9.99, 9), (7.0, 7), (6.93, 6), (1.0, 1)])
def test_a_lowered_rate_rounds_down_to_whole_slots(rate: float, slots: int) -> None:
    """Below the ceiling the throttle allows floor(rate) calls per second, never more than the rate."""
    r = AdaptiveRate(10.0)
    r.rate = rate
    assert r.slots == slots


def test_the_ceiling_rounds_as_the_configured_rate_always_has() -> None:
    """An unadapted client throttles exactly as before: round(OMSD_RATE_LIMIT_PER_S)."""
    assert AdaptiveRate(2.6).slots == 3
    assert AdaptiveRate(0.4).slots == 1


@pytest.mark.parametrize("kwargs", [{"ceiling": 0}, {"floor": 0}, {"decrease": 0}, {"decrease": 1.5}, {"quiet_s": 0}])
def test_nonsense_parameters_are_refused(kwargs: dict[str, float]) -> None:
    """A rate that could reach zero or grow on a 429 is refused at construction."""
    values = {"ceiling": 10.0} | kwargs
    ceiling = values.pop("ceiling")
    with pytest.raises(ValueError, match="positive"):
        AdaptiveRate(ceiling, **values)


events = st.lists(st.tuples(st.booleans(), st.floats(min_value=0, max_value=30)), max_size=200)


@given(
    ceiling=st.floats(min_value=0.1, max_value=1000),
    floor=st.floats(min_value=0.1, max_value=10),
    steps=events,
)
def test_rate_stays_within_floor_and_ceiling(ceiling: float, floor: float, steps: list[tuple[bool, float]]) -> None:
    """No sequence of 429s and successes takes the rate above the ceiling or below the floor;
    a 429 never raises it, a success never lowers it, and the slots never exceed the ceiling's."""
    r = AdaptiveRate(ceiling, floor=floor)
    ceiling_slots = r.slots
    now = 0.0
    for limited, dt in steps:
        now += dt
        before = r.rate
        after = r.on_429(now) if limited else r.on_success(now)
        assert after == r.rate
        assert min(floor, ceiling) <= r.rate <= ceiling
        assert (after <= before) if limited else (after >= before)
        assert 1 <= r.slots <= ceiling_slots


# ---- send windows ---------------------------------------------------------------------------


def send_times(windows: SendWindows, arrivals: list[float], per_s: list[int] | None = None) -> list[float]:
    """When calls that ask at `arrivals` leave, one at a time, on a fake clock; `per_s[i]`
    (when given) is the allowance set just before call i asks (an AIMD change)."""
    now, out = 0.0, []
    for i, at in enumerate(arrivals):
        if per_s is not None:
            windows.per_s = per_s[i]
        now = max(now, at)
        while (wait := windows.wait_s(now)) > 0:
            now += wait
        windows.take(now)
        out.append(now)
    return out


def busiest(times: list[float], period: float) -> int:
    """The most calls in any half-open window [t, t + period) (to within a nanosecond)."""
    return max((bisect.bisect_left(times, t + period - 1e-9) - i for i, t in enumerate(times)), default=0)


@pytest.mark.parametrize(("per_s", "per_burst"), [(1, 1), (8, 1), (10, 1), (15, 2), (20, 2), (100, 10), (101, 11)])
def test_a_backlog_leaves_evenly_at_the_full_rate(per_s: int, per_burst: int) -> None:
    """Calls all waiting at once leave `per_s` a second, at most a tenth (rounded up) per 100 ms."""
    windows = SendWindows(per_s)
    assert windows.per_burst == per_burst
    times = send_times(windows, [0.0] * (per_s * 5))
    assert busiest(times, 1.0) == per_s
    assert busiest(times, 0.1) == per_burst
    assert times[-1] < 5.0  # the whole budget is used: five seconds' worth within five seconds


@given(
    per_s=st.lists(st.integers(min_value=1, max_value=120), min_size=1, max_size=5),
    gaps=st.lists(st.floats(min_value=0, max_value=0.3), min_size=1, max_size=400),
)
def test_no_window_holds_more_than_its_allowance(per_s: list[int], gaps: list[float]) -> None:
    """Whatever the arrivals and however the allowance changes (AIMD), each call leaves when the
    second before it holds fewer calls than the allowance, and the 100 ms before it fewer than a tenth."""
    arrivals = list(itertools.accumulate(gaps))
    allowance = [per_s[i * len(per_s) // len(arrivals)] for i in range(len(arrivals))]
    times = send_times(SendWindows(allowance[0]), arrivals, allowance)
    assert all(t >= at for t, at in zip(times, arrivals, strict=True))
    for i, t in enumerate(times):
        for period, allowed in ((1.0, allowance[i]), (0.1, -(-allowance[i] // SPREAD))):
            before = i - bisect.bisect_right(times, t - period + 1e-9, hi=i)
            assert before < allowed
