"""Many seller accounts on one simulated VTEX: each account a whole `Simulator` (its own
credentials, orders, feed, hook, Channel Order API, faults and random source), served
under one listening socket.

VTEX addresses an account by host (`https://{account}.vtexcommercestable.com.br`, doc §0)
and checks the AppKey/AppToken pair of that account. On loopback there is no host per
account, so the path stands in for it: account `shop` is served under `/shop`, and a
client sets its base URL to `http://HOST:PORT/shop` (what `base_url_of` gives). A request
carrying another account's credentials is refused with 401, as VTEX would: credentials
belong to one account.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

from aiohttp import web

from .faults import Faults
from .server import Simulator

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")  # a VTEX account name (a host label)


def app_key_of(account: str) -> str:
    return f"vtexappkey-{account}-SIM"


def app_token_of(account: str) -> str:
    return f"sim-app-token-{account}-please-rotate"


class SimFleet:
    """Accounts by name; `start()` serves them all on one port."""

    def __init__(
        self,
        accounts: Iterable[str],
        *,
        seed: int | None = 7,
        faults: Faults | None = None,
        step_delay_s: float = 0.05,
        visibility_override_s: float | None = None,
    ) -> None:
        self.accounts: dict[str, Simulator] = {}
        for i, name in enumerate(accounts):
            if not _NAME.fullmatch(name) or name in self.accounts:
                raise ValueError(f"not a distinct account name: {name!r}")
            self.accounts[name] = Simulator(
                account=name,
                app_key=app_key_of(name),
                app_token=app_token_of(name),
                seed=None if seed is None else seed + i,
                faults=Faults(**vars(faults)) if faults is not None else None,
                step_delay_s=step_delay_s,
                visibility_override_s=visibility_override_s,
            )
        self._runner: web.AppRunner | None = None
        self.url = ""

    def __getitem__(self, name: str) -> Simulator:
        return self.accounts[name]

    def __iter__(self) -> Iterator[Simulator]:
        return iter(self.accounts.values())

    def __len__(self) -> int:
        return len(self.accounts)

    def app(self) -> web.Application:
        app = web.Application()
        for name, sim in self.accounts.items():
            sim.prefix = f"/{name}"
            app.add_subapp(sim.prefix, sim.app())
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server: Any = site._server
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname()[1] if sockets else port
        self.url = f"http://{host}:{bound}"
        for sim in self.accounts.values():
            sim.base_url = f"{self.url}{sim.prefix}"
        return self.url

    async def stop(self) -> None:
        for sim in self.accounts.values():
            await sim.runtime.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> SimFleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
