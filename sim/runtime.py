"""What every part of the simulator shares: its random source, its background tasks,
its outbound HTTP session, and the counters and signals tests wait on."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine
from typing import Any

import aiohttp


class Runtime:
    def __init__(self, seed: int | None) -> None:
        self.rng = random.Random(seed)
        self.calls: dict[str, int] = {}
        self.events: dict[str, asyncio.Event] = {}
        self.protocol_errors: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The session for calls VTEX makes (hook pushes, pings, notifications); open after start."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        return self._session

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def signal(self, name: str) -> asyncio.Event:
        """An event set each time `name` happens (feed_get, feed_commit, put, get_order)."""
        return self.events.setdefault(name, asyncio.Event())

    def count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.signal(name).set()

    def refuse(self, problem: str) -> None:
        """Record a request that breaks VTEX's contract."""
        self.protocol_errors.append(problem)

    @staticmethod
    def monotonic() -> float:
        return asyncio.get_running_loop().time()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
