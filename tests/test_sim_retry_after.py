"""The simulator's Retry-After bookkeeping: which requests arrived inside an announced window."""

from __future__ import annotations

import aiohttp

from omsd.sim.faults import Faults, RetryAfterWindows
from omsd.sim.server import Simulator

FEED = "/api/orders/feed"
ORDER = "/api/oms/pvt/orders/{order_id}"


def test_arrivals_are_counted_per_route_and_for_the_account() -> None:
    """After a 429 on Get order, another Get order counts for both; a feed GET only for the account."""
    w = RetryAfterWindows(in_flight_s=0.05)
    w.announce(ORDER, 2.0, now=10.0)
    w.arrived(ORDER, 10.5)
    w.arrived(FEED, 10.6)
    assert (w.inside_route, w.inside_account) == (1, 2)


def test_requests_in_flight_and_after_the_window_are_not_counted() -> None:
    """Arrivals within `in_flight_s` of the 429, and at or after the window's end, are not inside it."""
    w = RetryAfterWindows(in_flight_s=0.05)
    w.announce(ORDER, 2.0, now=10.0)
    w.arrived(ORDER, 10.04)
    w.arrived(ORDER, 12.0)
    w.arrived(ORDER, 13.0)
    assert (w.inside_route, w.inside_account) == (0, 0)


def test_one_arrival_inside_several_windows_counts_once() -> None:
    """Two open windows for the same route count a request inside both as one."""
    w = RetryAfterWindows(in_flight_s=0.0)
    w.announce(FEED, 2.0, now=10.0)
    w.announce(FEED, 2.0, now=10.5)
    w.arrived(FEED, 11.0)
    assert (w.inside_route, w.inside_account) == (1, 1)


async def test_the_simulator_keys_windows_by_route_template() -> None:
    """Over HTTP: a 429 on the feed GET makes a feed commit count for the route, a Get order only for the account."""
    sim = Simulator(seed=1, faults=Faults(rate_429=1.0, retry_after_s=30))
    await sim.start()
    sim.injector.windows.in_flight_s = 0.0
    headers = {
        "X-VTEX-API-AppKey": sim.app_key,
        "X-VTEX-API-AppToken": sim.app_token,
        "Accept": "application/json",
        "Content-Type": "application/json",
    }
    try:
        async with aiohttp.ClientSession(headers=headers) as s:
            async with s.get(f"{sim.base_url}{FEED}", params={"maxlot": "10"}) as r:
                assert r.status == 429 and r.headers["Retry-After"] == "30"
            sim.faults.rate_429 = 0.0
            async with s.get(f"{sim.base_url}/api/oms/pvt/orders/X-1") as r:
                assert r.status == 404
            assert sim.inside_retry_after == {"route": 0, "account": 1}
            async with s.post(f"{sim.base_url}{FEED}", json={"handles": []}) as r:
                assert r.status < 500
        assert sim.stats()["inside_retry_after"] == {"route": 1, "account": 2}
    finally:
        await sim.stop()
