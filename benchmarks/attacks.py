"""One client against omsd's HTTP server: what it holds, what everyone else still gets, and how
fast it grows omsd's log.

    .venv/bin/python benchmarks/attacks.py [--seconds 15] [--idle 600] [--slowloris 200]
                                           [--pipeliners 4] [--per-client 64]

omsd is a real `omsd run` process (source `both`: the hook and the feed; every HTTP limit at
its default unless `--per-client` says otherwise) against the simulator in this process, all on
loopback. The attacker connects from 127.0.0.2 and the probes from 127.0.0.1 (Linux routes all
of 127/8 to lo), as a client and VTEX would come from different addresses. First a window with
no attack (the baseline), then one window of `--seconds` per attack:

- idle: `--idle` keep-alive connections opened and held without a request;
- slowloris: `--slowloris` connections each sending half a header, reopened as soon as cut;
- pipeline: `--pipeliners` connections each sending 2,000 pipelined `GET /metrics` and never
  reading an answer, reopened as soon as cut;
- unauthorized: 16 workers sending requests with a wrong bearer token, hook pushes without the
  secret and notifications on a wrong secret path, as fast as they are answered.

In every window a prober asks, every 0.2 s and each on a new connection with a 2 s timeout,
`GET /healthz`, VTEX's hook ping without the secret, and the hook ping with the secret (VTEX's
authenticated push). Reported per window: the attacker's connections still open at its end
(held), probes answered of asked and their p99, and the lines omsd logged per minute about
the attack, with the events they stand for (the sum of their `occurrences`): before the
rate limit each event was a line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import signal
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import restarts  # beside this script

from omsd.daemon.tools.demo import free_port
from omsd.sim.server import Simulator

HOOK_SECRET = "bench-hook-secret-0123456789"  # noqa: S105 - restarts.py's, on loopback
ATTACKER = "127.0.0.2"
ATTACK_EVENTS = (
    "http_read_timeout",
    "http_write_timeout",
    "http_connections_over_cap",
    "http_client_over_cap",
    "http_connection_evicted",
    "http_reserved_for_vtex",
    "api_unauthorized",
    "hook_unauthorized",
    "notification_wrong_path",
)
HALF_HEADER = b"POST /vtex/hook HTTP/1.1\r\nHost: omsd\r\nContent-Le"
PIPELINED = b"GET /metrics HTTP/1.1\r\nHost: omsd\r\n\r\n" * 2000


def omsd_env(sim: Simulator, db: Path, port: int, per_client: int | None) -> dict[str, str]:
    """restarts.py's environment (source `both`), logging at info: the attack's lines are info and warning."""
    env = restarts.omsd_env(sim, db, port, "both") | {"OMSD_LOG_LEVEL": "info"}
    if per_client is not None:
        env["OMSD_HTTP_MAX_CONNECTIONS_PER_CLIENT"] = str(per_client)
    return env


@dataclass
class Window:
    name: str
    asked: dict[str, int] = field(default_factory=dict)
    answered: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    held: int | None = None
    attempts: int = 0
    refused: int = 0  # connections the server closed at once (a cap)
    peak: int | None = None  # connections held a second after opening them all
    cut_after: list[float] = field(default_factory=list)  # seconds a connection lasted until the server cut it
    lines: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def row(self) -> str:
        probes = ", ".join(f"{k} {self.answered.get(k, 0)}/{n}" for k, n in self.asked.items())
        p99 = statistics.quantiles(self.latencies, n=100)[98] * 1000 if len(self.latencies) >= 2 else float("nan")
        per_min = 60 / self.seconds if self.seconds else 0
        lines = sum(self.lines.values())
        logs = ", ".join(f"{k} {n}" for k, n in sorted(self.lines.items()))
        out = [f"{self.name}: probes answered {probes}; p99 {p99:.0f} ms"]
        if self.held is not None:
            peak = f"{self.peak} held after 1 s, " if self.peak is not None else ""
            refused = f", {self.refused} closed at once" if self.refused else ""
            out.append(f"  connections: {peak}{self.held} held at the end, of {self.attempts} opened{refused}")
        if self.cut_after:
            cuts = sorted(self.cut_after)
            out.append(
                f"  cut by the server: {len(cuts)}, after {statistics.median(cuts):.1f} s median, {cuts[-1]:.1f} s max"
            )
        if self.attempts:
            out.append(
                f"  log: {lines * per_min:.1f} lines/min ({logs or 'none'}) for {self.attempts * per_min:,.0f} "
                "attacking connections or requests/min (one line each before the rate limit)"
            )
        return "\n".join(out)


async def until_ready(url: str) -> None:
    """omsd answers /readyz with 200 (the hook configured at VTEX, a feed poll done)."""
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with s.get(f"{url}/readyz") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise SystemExit("omsd did not become ready")


async def probe(url: str, window: Window, stop: asyncio.Event) -> None:
    """Every 0.2 s, each on a new connection from 127.0.0.1, 2 s to answer."""
    ping = {"hookConfig": "ping"}
    checks: dict[str, tuple[str, str, dict[str, str]]] = {
        "healthz": ("GET", "/healthz", {}),
        "ping": ("POST", "/vtex/hook", {}),
        "vtex": ("POST", "/vtex/hook", {"X-Omsd-Hook-Secret": HOOK_SECRET}),
    }
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True), timeout=timeout) as s:
        while not stop.is_set():
            for name, (method, path, headers) in checks.items():
                window.asked[name] = window.asked.get(name, 0) + 1
                start = time.perf_counter()
                try:
                    body = ping if method == "POST" else None
                    async with s.request(method, f"{url}{path}", json=body, headers=headers) as r:
                        await r.read()
                        if r.status == 200:
                            window.answered[name] = window.answered.get(name, 0) + 1
                            window.latencies.append(time.perf_counter() - start)
                except (TimeoutError, aiohttp.ClientError):
                    pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.2)


async def connect(port: int, *, rcvbuf: int | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((ATTACKER, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


def is_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    return not (reader.at_eof() or reader.exception() is not None or writer.transport.is_closing())


async def until_closed(reader: asyncio.StreamReader, stop: asyncio.Event) -> None:
    """Read (and drop) until the server closes the connection or the window ends."""
    reading = asyncio.ensure_future(reader.read(1 << 16))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while True:
            done, _ = await asyncio.wait([reading, stopping], return_when=asyncio.FIRST_COMPLETED)
            if stopping in done:
                return
            with contextlib.suppress(ConnectionError):
                if not reading.result():
                    return
            reading = asyncio.ensure_future(reader.read(1 << 16))
    except ConnectionError:
        return
    finally:
        reading.cancel()
        stopping.cancel()


async def idle(port: int, n: int, window: Window, stop: asyncio.Event) -> None:
    conns = []
    for _ in range(n):
        with contextlib.suppress(OSError):
            conns.append(await connect(port))
        window.attempts += 1
    await asyncio.sleep(1)
    window.peak = sum(is_open(r, w) for r, w in conns)  # before the read timeout cuts them
    await stop.wait()
    window.held = sum(is_open(r, w) for r, w in conns)
    for _, w in conns:
        w.close()


async def reopening(port: int, n: int, window: Window, stop: asyncio.Event, first: bytes, rcvbuf: int | None) -> None:
    """`n` connections that each send `first` and never read an answer, reopened when cut."""
    current: list[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = [None] * n

    async def one(i: int) -> None:
        while not stop.is_set():
            try:
                reader, writer = await connect(port, rcvbuf=rcvbuf)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            window.attempts += 1
            opened = time.monotonic()
            current[i] = (reader, writer)
            with contextlib.suppress(ConnectionError):
                writer.write(first)
            if rcvbuf is None:
                await until_closed(reader, stop)
            else:  # never read, keep asking (a write is how a cut connection shows): until cut
                while not stop.is_set() and is_open(reader, writer):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=0.05)
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        writer.write(first[:64])
            if stop.is_set():
                return
            lasted = time.monotonic() - opened
            if lasted < 0.1:
                window.refused += 1
            else:
                window.cut_after.append(lasted)
            writer.close()

    await asyncio.gather(*(one(i) for i in range(n)))
    window.held = sum(1 for c in current if c is not None and is_open(*c))
    for c in current:
        if c is not None:
            c[1].close()


async def unauthorized(url: str, window: Window, stop: asyncio.Event) -> None:
    wrong_path = "/notify/not-the-secret-0123456789/order-integration/notification/processing-result?an=x"
    requests: list[tuple[str, str, dict[str, str]]] = [
        ("GET", "/v1/status", {"Authorization": "Bearer wrong"}),
        ("POST", "/vtex/hook", {}),
        ("POST", wrong_path, {}),
    ]
    connector = aiohttp.TCPConnector(local_addr=(ATTACKER, 0), limit=16)
    async with aiohttp.ClientSession(connector=connector) as s:

        async def worker() -> None:
            i = 0
            while not stop.is_set():
                method, path, headers = requests[i % len(requests)]
                i += 1
                body = {"OrderId": "x"} if method == "POST" else None
                try:
                    async with s.request(method, f"{url}{path}", json=body, headers=headers) as r:
                        await r.read()
                    window.attempts += 1  # answered (401 or 404)
                except (aiohttp.ClientError, TimeoutError):
                    await asyncio.sleep(0.01)

        await asyncio.gather(*(worker() for _ in range(16)))


def count_lines(log: Path, start: int, end: int, window: Window) -> None:
    with log.open("rb") as f:
        f.seek(start)
        chunk = f.read(end - start)
    for raw in chunk.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        event = line.get("event")
        if event in ATTACK_EVENTS:
            window.lines[event] = window.lines.get(event, 0) + 1
            window.events[event] = window.events.get(event, 0) + int(line.get("occurrences", 1))


async def run_window(
    url: str,
    log: Path,
    name: str,
    seconds: float,
    attack: Callable[[Window, asyncio.Event], Coroutine[Any, Any, None]] | None,
) -> Window:
    window = Window(name)
    stop = asyncio.Event()
    start = log.stat().st_size
    began = time.monotonic()
    tasks = [asyncio.create_task(probe(url, window, stop))]
    if attack is not None:
        tasks.append(asyncio.create_task(attack(window, stop)))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    window.seconds = time.monotonic() - began
    await asyncio.sleep(0.5)  # the last lines
    count_lines(log, start, log.stat().st_size, window)
    return window


async def main(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sim = Simulator(seed=1)
    await sim.start()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "omsd.log"
        omsd = restarts.Omsd(omsd_env(sim, Path(tmp) / "omsd.db", port, args.per_client), port, log)
        url = f"http://127.0.0.1:{port}"
        await omsd.start()
        await until_ready(url)
        try:
            s = args.seconds
            attacks: list[tuple[str, Callable[[Window, asyncio.Event], Coroutine[Any, Any, None]] | None]] = [
                ("baseline", None),
                ("idle", lambda w, stop: idle(port, args.idle, w, stop)),
                ("slowloris", lambda w, stop: reopening(port, args.slowloris, w, stop, HALF_HEADER, None)),
                ("pipeline", lambda w, stop: reopening(port, args.pipeliners, w, stop, PIPELINED, 4096)),
                ("unauthorized", lambda w, stop: unauthorized(url, w, stop)),
            ]
            limits = f"OMSD_HTTP_MAX_CONNECTIONS 512, per client {args.per_client or 64}, read timeout 10 s"
            print(f"omsd: {limits}; {s:g} s per window; attacker {ATTACKER}, probes 127.0.0.1", flush=True)
            for name, attack in attacks:
                window = await run_window(url, log, name, s, attack)
                print(window.row(), flush=True)
                await asyncio.sleep(1)
        finally:
            await omsd.stop(signal.SIGTERM)
    await sim.stop()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each window (default 15)")
    parser.add_argument("--idle", type=int, default=600, help="idle connections (default 600)")
    parser.add_argument("--slowloris", type=int, default=200, help="slow-header connections (default 200)")
    parser.add_argument("--pipeliners", type=int, default=4, help="pipelining connections (default 4)")
    parser.add_argument("--per-client", type=int, default=None, help="OMSD_HTTP_MAX_CONNECTIONS_PER_CLIENT")
    asyncio.run(main(parser.parse_args()))
