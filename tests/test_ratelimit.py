"""The adaptive rate (AIMD), driven by a fake clock."""

from __future__ import annotations

import bisect
import itertools
import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from omsd.daemon.vtex.rate import MARGIN, SPREAD, AdaptiveRate, SendWindow, spread


def test_starts_at_the_configured_rate() -> None:
    """Before any 429 the client runs at OMSD_RATE_LIMIT_PER_S."""
    r = AdaptiveRate(10.0)
    assert r.rate == 10.0 and r.slots == 10


def test_a_lone_429_does_not_cut() -> None:
    """A 429 among successes shows no limit: the rate stays where it was."""
    r = AdaptiveRate(10.0)
    r.on_success(0.5)
    assert r.on_429(1.0) == 10.0


@pytest.mark.parametrize("n", [1, 2])
def test_fewer_than_three_429s_in_a_row_do_not_cut(n: int) -> None:
    """One or two 429s in a row, then a success, leave the rate alone."""
    r = AdaptiveRate(10.0)
    for t in range(n):
        r.on_429(float(t))
    r.on_success(5.0)
    assert r.rate == 10.0


def test_three_429s_in_a_row_cut_the_rate_multiplicatively() -> None:
    """Three 429s in a row show a limit: the rate is multiplied by `decrease`, and again for the next three."""
    r = AdaptiveRate(10.0, decrease=0.7)
    assert [r.on_429(t) for t in (1.0, 1.1, 1.2)] == [10.0, 10.0, pytest.approx(7.0)]
    assert [r.on_429(t) for t in (3.0, 3.1, 3.2)] == [pytest.approx(7.0), pytest.approx(7.0), pytest.approx(4.9)]
    assert r.slots == 4


@pytest.mark.parametrize(
    ("limited", "cut"),
    [
        (7, False),  # 7 % of the last 100: random 429s can do that now and then
        (8, True),  # more than 7 %: a limit
    ],
)
def test_a_share_of_429s_over_7_percent_of_the_last_100_cuts(limited: int, cut: bool) -> None:
    """429s spread among successes (never two in a row) cut once they are more than 7 % of the last 100 answers."""
    r = AdaptiveRate(10.0, quiet_s=1000.0)
    for n in range(100 - 2 * limited):
        r.on_success(n * 0.01)
    for n in range(limited):
        r.on_success(10.0 + n)
        r.on_429(10.5 + n)
    assert r.rate == (pytest.approx(7.0) if cut else 10.0)


def test_answers_older_than_the_window_are_forgotten() -> None:
    """Eight 429s spread over more than 100 answers never cut: the oldest leave the window first."""
    r = AdaptiveRate(10.0, quiet_s=1000.0)
    for n in range(8):
        for k in range(14):
            r.on_success(n + k * 0.01)
        r.on_429(n + 0.5)
    assert r.rate == 10.0


def test_429s_within_the_cooldown_of_a_cut_are_not_evidence() -> None:
    """429s answering calls sent before a cut (within `cooldown_s`) do not cut again."""
    r = AdaptiveRate(10.0, decrease=0.7, cooldown_s=1.0)
    for t in (5.0, 5.1, 5.2, 5.5, 5.6, 5.7, 5.99):
        r.on_429(t)
    assert r.rate == pytest.approx(7.0)
    assert r.limited_recently == 0


def test_the_rate_never_falls_below_the_floor() -> None:
    """However many 429s come, the rate stays at the floor."""
    r = AdaptiveRate(10.0, floor=1.0)
    for t in range(300):
        r.on_429(float(t))
    assert r.rate == 1.0 and r.slots == 1


def test_a_floor_above_the_ceiling_is_the_ceiling() -> None:
    """A configured rate below the default floor is never raised by it."""
    r = AdaptiveRate(0.5, floor=1.0)
    assert [r.on_429(t) for t in (1.0, 2.0, 3.0)][-1] == 0.5


def cut_at(t: float, used_share: float = 0.0) -> AdaptiveRate:
    """A rate of 10/s cut once to 7 by three 429s in a row ending at `t` (by default any
    traffic counts as using the rate: these tests are about time)."""
    r = AdaptiveRate(10.0, decrease=0.7, increase=0.05, quiet_s=5.0, near_factor=4.0, used_share=used_share)
    for dt in (0.2, 0.1, 0.0):
        r.on_429(t - dt)
    assert r.rate == pytest.approx(7.0)
    return r


@pytest.mark.parametrize(
    ("successes_at", "expected"),
    [
        ([], 7.0),  # no traffic: no recovery
        ([1.5, 3.0, 5.9], 7.0),  # less than quiet_s since the cut
        ([6.0], 7.5),  # one quiet period: one step (5 % of 10)
        ([6.0, 6.5, 10.9], 7.5),  # the next step needs another quiet period
        ([6.0, 11.0], 8.0),
        ([6.0, 11.0, 16.0, 21.0], 9.0),
        ([6.0, 11.0, 16.0, 21.0, 26.0], 9.0),  # from 90 % of the rate of the last cut, 4 x quiet_s a step
        ([6.0, 11.0, 16.0, 21.0, 41.0], 9.5),
        ([6.0, 11.0, 16.0, 21.0, 41.0, 61.0, 81.0, 101.0], 10.0),  # never above the ceiling
    ],
)
def test_recovery_is_additive_after_quiet(successes_at: list[float], expected: float) -> None:
    """After a cut the rate climbs by `increase` x ceiling per `quiet_s` without a cut, slower near where it was cut."""
    r = cut_at(1.0)
    for t in successes_at:
        r.on_success(t)
    assert r.rate == pytest.approx(expected)


def test_a_lone_429_does_not_stop_recovery() -> None:
    """Recovery goes on through a random 429: only a cut restarts the quiet period."""
    r = cut_at(1.0)
    r.on_success(2.0)
    r.on_429(4.0)
    assert r.on_success(6.0) == pytest.approx(7.5)


def test_a_rate_nobody_uses_does_not_climb() -> None:
    """A quiet period proves the rate only when its calls used most of it: a trickle of calls
    leaves a cut rate where it is; traffic at the rate raises it."""
    r = cut_at(1.0, used_share=0.75)
    for n in range(20):
        r.on_success(1.5 + n)  # one call a second, against 7 allowed
    assert r.rate == pytest.approx(7.0)
    for n in range(7 * 5):
        r.on_success(21.0 + n / 7)  # seven a second for five seconds
    assert r.rate == pytest.approx(7.5)


def test_steps_are_a_share_of_the_rate_where_the_limit_showed() -> None:
    """Below a limit found well under the ceiling, a step is `increase` of that limit's rate, not
    of the ceiling: 5 % of 35, not of 50."""
    r = AdaptiveRate(50.0, decrease=0.7, used_share=0.0)
    for t in (1.0, 1.1, 1.2, 3.0, 3.1, 3.2):
        r.on_429(t)
    assert r.rate == pytest.approx(24.5)
    assert r.on_success(8.5) == pytest.approx(24.5 + 0.05 * 35)


def test_far_above_a_limit_a_cut_goes_to_what_the_last_second_let_through() -> None:
    """Calls at the rate against an account that admits 15 a second: the second cut (the first
    comes before a second's evidence) lands at the 15 VTEX let through, not at 35 then 24.5 then
    17; from then on no call is refused."""
    r = AdaptiveRate(50.0)
    rates, limited = [], []
    for second in range(4):
        calls, refused = r.slots, 0
        for n in range(calls):
            now = second + n / calls
            if n < 15:
                r.on_success(now)
            else:
                refused += 1
                r.on_429(now)
        rates.append(r.rate)
        limited.append(refused)
    assert rates[1] == pytest.approx(15.0, abs=1.0) and rates[-1] == rates[1]
    assert limited[2:] == [0, 0]


def test_a_cut_at_low_traffic_is_the_usual_step() -> None:
    """429s in a row at a trickle (a second's calls far below the rate) show no level: 70 %."""
    r = AdaptiveRate(50.0)
    for t in (1.0, 1.1, 1.2):
        r.on_429(t)
    assert r.rate == pytest.approx(35.0)


def test_a_cut_near_the_last_limit_is_gentle() -> None:
    """At 90 % or more of the rate where the last limit showed, 429s step the rate back by
    `near_decrease` (the limit is known), not by `decrease`."""
    r = AdaptiveRate(10.0, decrease=0.7, near_decrease=0.9, used_share=0.0)
    for t in (1.0, 1.1, 1.2):
        r.on_429(t)
    r.rate = 9.5  # climbed back near the limit found at 10
    for t in (3.0, 3.1, 3.2):
        r.on_429(t)
    assert r.rate == pytest.approx(9.5 * 0.9)


def test_a_restart_starts_from_what_was_learned() -> None:
    """`restore` takes the learned rate and the limit's rate (within floor and ceiling); the next
    step needs a whole quiet period from the restart."""
    r = AdaptiveRate(50.0, used_share=0.0)
    r.restore(14.0, 17.0, now=100.0)
    assert r.learned() == (14.0, 17.0, "") and r.slots == 14
    assert r.on_success(104.0) == 14.0
    assert r.on_success(105.0) == pytest.approx(14.0 + 0.05 * 17.0)
    r.restore(500.0, None, now=0.0)
    assert r.learned() == (50.0, None, "")


def _calls(r: AdaptiveRate, start: float, end: float, per_s: float) -> float:
    """Successful calls at `per_s` from `start` until `end`; the rate after the last."""
    t = start
    while t < end:
        r.on_success(t)
        t += 1.0 / per_s
    return r.rate


def _restarted(r: AdaptiveRate, at: float, down_s: float) -> AdaptiveRate:
    """A new process `down_s` after `at`, going on from what `r` learned by then (as its clock)."""
    rate, cut_from, recent = r.learned()
    quiet_for, ages = r.evidence(at)
    again = AdaptiveRate(10.0, decrease=0.7, increase=0.05, quiet_s=5.0, near_factor=4.0, used_share=0.75)
    again.restore(
        rate, cut_from, now=at + down_s, recent=recent, evidence=(quiet_for + down_s, ages_after(ages, down_s))
    )
    return again


def ages_after(ages: tuple[float, ...], down_s: float) -> tuple[float, ...]:
    return tuple(a + down_s for a in ages)


def test_a_restart_goes_on_with_the_evidence_of_use() -> None:
    """Cut to 7/s, the rate is used for 3 s, the process restarts (0.5 s down) and the calls go on
    for 2 s: the quiet period and the calls before the restart count, so the rate climbs as it
    would have without the restart (restarts every 3 s kept it at the cut)."""
    r = cut_at(1.0, used_share=0.75)
    assert _calls(r, 1.05, 4.0, per_s=7.0) == pytest.approx(7.0)
    again = _restarted(r, at=4.0, down_s=0.5)
    assert _calls(again, 4.5, 6.6, per_s=7.0) == pytest.approx(7.5)
    fresh = cut_at(1.0, used_share=0.75)
    fresh.restore(*fresh.learned()[:2], now=4.5, recent=fresh.learned()[2])  # as before: no evidence
    assert _calls(fresh, 4.5, 6.6, per_s=7.0) == pytest.approx(7.0)


def test_the_time_a_restart_was_down_counts_as_time_without_calls() -> None:
    """A restart that kept the process down for most of the quiet period: the calls of that
    period did not use the rate, so it does not climb."""
    r = cut_at(1.0, used_share=0.75)
    _calls(r, 1.05, 2.0, per_s=7.0)
    again = _restarted(r, at=2.0, down_s=3.5)
    assert _calls(again, 5.5, 6.6, per_s=7.0) == pytest.approx(7.0)


def test_a_restart_keeps_the_429s_adding_up_to_a_cut() -> None:
    """Seven 429s among the recent answers survive a restart: the eighth cuts (more than 7 % of
    the last 100), as it would have without the restart."""
    r = AdaptiveRate(10.0, quiet_s=1000.0)
    for n in range(7):
        r.on_success(n)
        r.on_429(n + 0.5)
    rate, cut_from, recent = r.learned()
    assert recent.count("1") == 7
    again = AdaptiveRate(10.0, quiet_s=1000.0)
    again.restore(rate, cut_from, now=0.0, recent=recent)
    again.on_success(1.0)
    assert again.on_429(2.0) == pytest.approx(7.0)


def test_recovery_waits_while_429s_lean_towards_a_limit() -> None:
    """With 429s at half the cut's share of the recent answers, the rate does not climb further."""
    r = cut_at(1.0)
    for n in range(4):
        r.on_success(2.0 + n)
        r.on_429(2.5 + n)
    assert r.on_success(8.0) == pytest.approx(7.0)


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


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ceiling": 0},
        {"floor": 0},
        {"decrease": 0},
        {"decrease": 1.5},
        {"quiet_s": 0},
        {"window": 0},
        {"limit_share": 0},
        {"limit_share": 1},
        {"consecutive": 0},
        {"near_decrease": 0.5},
        {"used_share": 2},
    ],
)
def test_nonsense_parameters_are_refused(kwargs: dict[str, float]) -> None:
    """A rate that could reach zero, grow on a 429 or never see a limit is refused at construction."""
    values = {"ceiling": 10.0} | kwargs
    ceiling = values.pop("ceiling")
    with pytest.raises(ValueError, match="positive"):
        AdaptiveRate(ceiling, **values)  # type: ignore[arg-type]


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


@pytest.mark.parametrize("seed", range(5))
def test_random_429s_at_steady_traffic_barely_move_the_rate(seed: int) -> None:
    """2 % of answers 429 at random, 50 calls/s for ten minutes: the rate stays within a few % of the ceiling."""
    rng = random.Random(seed)
    r = AdaptiveRate(50.0)
    rates = []
    for n in range(50 * 600):
        now = n / 50
        rates.append(r.on_429(now) if rng.random() < 0.02 else r.on_success(now))
    assert sum(rates) / len(rates) >= 0.97 * 50.0
    assert min(rates) >= 0.7 * 50.0 - 1e-9  # at most one cut at a time, recovered before the next


def test_a_limit_below_the_rate_is_found_and_held_under() -> None:
    """An account that allows 8 calls per second, asked 10 (the rest 429): once settled, fewer
    than ten 429s a minute, and at least 7 of the 8 calls a second go through."""
    r = AdaptiveRate(10.0)
    limited, ok = 0, 0
    for second in range(400):
        calls = r.slots
        for n in range(calls):
            now = second + n / calls
            if n >= 8:
                limited += second >= 100
                r.on_429(now)
            else:
                ok += second >= 100
                r.on_success(now)
    assert limited < 10 * 300 / 60
    assert ok >= 7 * 300


# ---- spreading the budget over the sliding window ---------------------------------------------


async def send_times(arrivals: list[float], per_s: list[int]) -> list[float]:
    """When calls that ask at `arrivals` leave, one at a time, through a SendWindow set and
    waited on as the client does (`VtexClient._spread`, `_slot`); `per_s[i]` is the allowance
    just before call i asks."""
    window = SendWindow()
    now = 0.0
    out = []
    for at, allowed in zip(arrivals, per_s, strict=True):
        window.set(*spread(allowed))
        now = max(now, at)
        while (wait := window.delay(now)) > 0:
            now += wait
        window.take(now)
        out.append(now)
    return out


def busiest(times: list[float], period: float) -> int:
    """The most calls in any half-open window [t, t + period) (to within a nanosecond)."""
    return max((bisect.bisect_left(times, t + period - 1e-9) - i for i, t in enumerate(times)), default=0)


@pytest.mark.parametrize("per_s", range(1, 201))
def test_the_spread_never_allows_more_than_the_budget(per_s: int) -> None:
    """A 1.05 s window covered by the throttle's windows holds at most the budget, at most a tenth
    of it leaves at once, and rounding leaves at most 5 % of it unused."""
    calls, period = spread(per_s)
    windows = round((1.0 + MARGIN) / period)
    assert windows * period == pytest.approx(1.0 + MARGIN)
    assert calls * windows <= per_s and calls <= max(1, per_s // SPREAD)
    assert calls * windows >= 0.95 * per_s


@pytest.mark.parametrize("per_s", [1, 8, 10, 15, 20, 50, 100, 101])
async def test_a_backlog_leaves_evenly_at_the_full_rate(per_s: int) -> None:
    """Calls all waiting at once leave at most `per_s` a second, never more than twice a tenth of it
    (rounded up) within 100 ms, and use the budget but for the margin and the rounding."""
    times = await send_times([0.0] * (per_s * 5), [per_s] * (per_s * 5))
    calls, period = spread(per_s)
    assert busiest(times, 1.0) <= per_s
    assert busiest(times, 0.1) <= 2 * -(-per_s // SPREAD)
    assert times[-1] < 5.0 * (1 + MARGIN) * 1.03 * per_s / (calls * round((1 + MARGIN) / period))


@settings(max_examples=60, deadline=None)
@given(
    per_s=st.lists(st.integers(min_value=1, max_value=120), min_size=1, max_size=5),
    gaps=st.lists(st.floats(min_value=0, max_value=0.3), min_size=1, max_size=300),
)
# asyncio-throttle forgot the calls of a short window when a rate cut then lengthened it: the
# sixth call left into a 105 ms window that already held five
@example(per_s=[65, 20], gaps=[0.0] * 11)
async def test_no_window_holds_more_than_its_allowance(per_s: list[int], gaps: list[float]) -> None:
    """Whatever the arrivals and however the allowance changes (AIMD), no call leaves before it
    asked, no 1.05 s window holds more calls than the largest allowance in force during it, and
    each call leaves when the throttle's window before it (at most 105 ms) holds fewer than the
    calls it allows (at most a tenth of the allowance)."""
    arrivals = list(itertools.accumulate(gaps))
    allowance = [per_s[i * len(per_s) // len(arrivals)] for i in range(len(arrivals))]
    times = await send_times(arrivals, allowance)
    assert all(t >= at for t, at in zip(times, arrivals, strict=True))
    for i, t in enumerate(times):
        first = bisect.bisect_right(times, t - (1.0 + MARGIN) + 1e-9, hi=i)
        assert i + 1 - first <= max(allowance[first : i + 1])
        calls, period = spread(allowance[i])
        assert period <= (1.0 + MARGIN) / SPREAD + 1e-9 or calls == 1
        assert calls <= max(1, allowance[i] // SPREAD)
        assert i - bisect.bisect_right(times, t - period + 1e-9, hi=i) < calls
