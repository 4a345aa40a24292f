"""Waiting in loops: until woken, told to stop, or a timeout, whichever comes first."""

from __future__ import annotations

import asyncio


async def wait_any(*events: asyncio.Event, within_s: float) -> None:
    """Return when any event is set or `within_s` seconds have passed."""
    if any(e.is_set() for e in events):
        return
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
