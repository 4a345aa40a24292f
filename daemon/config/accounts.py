"""A fleet's configuration: the process's shared settings (the main environment) and one
`NAME.env` per seller account in `OMSD_ACCOUNTS_DIR`.

- **Which mode.** `OMSD_ACCOUNT` in the main environment: one account, configured as
  always (`Settings`, today's routes and database path). Otherwise, when
  `OMSD_ACCOUNTS_DIR` is set or its default `/etc/omsd/accounts.d` exists: a fleet.
  Neither: one account again (and its settings name what is missing).
- **The main environment** holds what the process shares (`FleetSettings`: listen
  address, operator token, state root, logging, HTTP limits, the public endpoint) and
  defaults for every account (any other `OMSD_*` setting, e.g. `OMSD_SOURCE`); secrets and
  the account's own identity are never inherited (`NOT_INHERITED`).
- **`NAME.env`** (systemd's EnvironmentFile= format) holds an account's own settings: its
  credentials, source, secrets, rate... `NAME` is the VTEX account name (`OMSD_ACCOUNT` may
  be left out, and must match when given). A setting the process shares (`SHARED`) is
  refused there: it would silently do nothing.
- **Its database**: `$OMSD_STATE_ROOT/NAME/omsd.db` unless the file sets `OMSD_DB`.

A bad file is that account's error (`AccountConfig.error`, one line naming the variable,
never a value), shown by `omsd accounts` and `/readyz`; the other accounts run.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .instance import parse_environment_file
from .settings import ConfigError, Settings, _build, check_listen, check_url, describe, systemd_environment

DEFAULT_ACCOUNTS_DIR = Path("/etc/omsd/accounts.d")
DEFAULT_STATE_ROOT = Path("/var/lib/omsd")
SUFFIX = ".env"
ACCOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}")  # a VTEX account name: a host label
MAX_FILE_BYTES = 64 * 1024

# What the process shares: a NAME.env that sets one of these is refused (it would do nothing).
SHARED = frozenset(
    {
        "listen",
        "log_level",
        "log_format",
        "http_read_timeout_s",
        "http_keepalive_s",
        "http_max_connections",
        "http_max_connections_per_client",
        "shutdown_grace_s",
        "connector_endpoint",
    }
)
# What an account never takes from the main environment: who it is, its credentials and its
# secrets (a shared notification secret would make the capability path name two accounts).
NOT_INHERITED = frozenset(
    {"account", "app_key", "app_token", "db", "api_token", "hook_secret", "hook_url", "notify_secret", "vtex_base_url"}
)


class FleetSettings(BaseSettings):
    """What a fleet's process shares: one HTTP server, one operator token, one state root."""

    model_config = SettingsConfigDict(env_prefix="OMSD_", extra="ignore", frozen=True, allow_inf_nan=False)

    accounts_dir: Path = DEFAULT_ACCOUNTS_DIR
    state_root: Path = DEFAULT_STATE_ROOT
    listen: str = "127.0.0.1:8787"
    api_token: SecretStr | None = None  # the operator's: every account's /v1 routes
    connector_endpoint: str  # omsd's public base URL; each account's routes are under it
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    shutdown_grace_s: float = Field(default=10.0, ge=0, le=600)
    http_read_timeout_s: float = Field(default=10.0, gt=0, le=300)
    http_keepalive_s: float = Field(default=75.0, gt=0, le=3600)
    http_max_connections: int = Field(default=512, ge=1, le=60000)
    http_max_connections_per_client: int = Field(default=64, ge=1, le=60000)
    store_probe_s: float = Field(default=5.0, gt=0, le=300)

    @field_validator("api_token", mode="before")
    @classmethod
    def _token(cls, value: object) -> object:
        return Settings._token(value)

    @field_validator("connector_endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return check_url(value, https="plain http only for a loopback simulator", bare=True).rstrip("/")

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return check_listen(value)

    @property
    def listen_host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def listen_port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class AccountSettings(Settings):
    """An account's Settings, from the values `account_settings` gathers only (the process's
    environment is read once, for every account, by `read_accounts`)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


@dataclass(frozen=True)
class AccountConfig:
    """One `NAME.env`: its settings, or why it has none."""

    name: str
    path: Path
    digest: str  # of the file's bytes: what a reload compares
    settings: Settings | None = None
    error: str | None = None
    warnings: tuple[str, ...] = field(default=())

    def __repr__(self) -> str:  # never the settings' secrets
        return f"AccountConfig(name={self.name!r}, error={self.error!r})"


def accounts_dir(environ: Mapping[str, str]) -> Path | None:
    """The accounts directory when omsd runs a fleet, None for one account (see the module)."""
    if environ.get("OMSD_ACCOUNT"):
        return None
    given = environ.get("OMSD_ACCOUNTS_DIR")
    if given is not None:
        if not given.strip():
            raise ConfigError("OMSD_ACCOUNTS_DIR: is empty (unset it for one account)")
        path = Path(given)
        if not path.is_dir():
            raise ConfigError(f"OMSD_ACCOUNTS_DIR: {path} is not a folder")
        return path
    return DEFAULT_ACCOUNTS_DIR if DEFAULT_ACCOUNTS_DIR.is_dir() else None


def load_fleet_settings(environ: Mapping[str, str] | None = None) -> FleetSettings:
    """The shared settings from the main environment (and systemd's credentials directory)."""
    overrides: dict[str, object] = {}
    credentials = systemd_environment().credentials_directory
    if credentials is not None:
        overrides["_secrets_dir"] = credentials
    if environ is not None:
        overrides.update(_fields(environ, FleetSettings.model_fields))
    return _build(FleetSettings, **overrides)


def read_accounts(
    directory: Path, environ: Mapping[str, str] | None = None, *, known: Mapping[str, AccountConfig] | None = None
) -> dict[str, AccountConfig]:
    """Every `*.env` of `directory`, by name (sorted), each with its settings or its error. A
    file whose bytes are those of its `known` config keeps it (a reload of a thousand accounts
    validates only what changed)."""
    env = os.environ if environ is None else environ
    shared = load_fleet_settings(env)
    defaults = {k: v for k, v in _fields(env, Settings.model_fields).items() if k not in NOT_INHERITED}
    found: dict[str, AccountConfig] = {}
    try:
        paths = sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX) and not p.name.startswith("."))
    except OSError as exc:
        raise ConfigError(f"OMSD_ACCOUNTS_DIR: cannot read {directory}: {exc.strerror}") from None
    for path in paths:
        config = read_account(path, shared, defaults, known=(known or {}).get(path.name.removesuffix(SUFFIX)))
        found[config.name] = config
    return found


def read_account(
    path: Path, shared: FleetSettings, defaults: Mapping[str, str], *, known: AccountConfig | None = None
) -> AccountConfig:
    name = path.name.removesuffix(SUFFIX)
    try:
        raw = path.read_bytes()[: MAX_FILE_BYTES + 1]
    except OSError as exc:
        return AccountConfig(name, path, "", error=f"cannot read {path.name}: {exc.strerror}")
    digest = hashlib.sha256(raw).hexdigest()
    if known is not None and known.digest == digest:
        return known
    if not ACCOUNT_NAME.fullmatch(name):
        return AccountConfig(name, path, digest, error=f"{path.name}: NAME must be a VTEX account name (A-Z a-z 0-9 -)")
    if len(raw) > MAX_FILE_BYTES:
        return AccountConfig(name, path, digest, error=f"{path.name}: larger than {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return AccountConfig(name, path, digest, error=f"{path.name}: not UTF-8")
    try:
        settings, warnings = account_settings(name, parse_environment_file(text), shared, defaults)
    except ConfigError as exc:
        return AccountConfig(name, path, digest, error=str(exc))
    return AccountConfig(name, path, digest, settings=settings, warnings=warnings)


def account_settings(
    name: str, file_env: Mapping[str, str], shared: FleetSettings, defaults: Mapping[str, str]
) -> tuple[Settings, tuple[str, ...]]:
    """An account's Settings: the main environment's defaults, then its file, then what the
    fleet decides (its database under the state root, its hook route)."""
    values: dict[str, object] = dict(defaults)
    warnings: list[str] = []
    fields = Settings.model_fields
    for key, value in file_env.items():
        setting = key.removeprefix("OMSD_").lower()
        if not key.startswith("OMSD_") or setting not in fields:
            warnings.append(f"{key} is not a setting omsd reads (ignored)")
            continue
        if setting in SHARED:
            raise ConfigError(f"{key}: is shared by every account: set it in the main environment, not in {name}.env")
        values[setting] = value
    given = values.setdefault("account", name)
    if given != name:
        raise ConfigError(f"OMSD_ACCOUNT: must be the file's NAME ({name}) or left out")
    values["connector_endpoint"] = shared.connector_endpoint
    values["listen"] = shared.listen
    values.setdefault("db", str(shared.state_root / name / "omsd.db"))
    if "replica" not in file_env and values.get("replica"):  # the main environment's: one folder per account
        values["replica"] = replica_of(str(values["replica"]), name)
    values.setdefault("hook_url", f"{shared.connector_endpoint}{hook_path(name)}")
    try:
        settings = AccountSettings(**values)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None
    return settings, tuple(warnings)


def replica_of(base: str, name: str) -> str:
    """The main environment's OMSD_REPLICA is the fleet's: each account replicates under `base/NAME`."""
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{name}"))


def hook_path(name: str) -> str:
    return f"/vtex/hook/{name}"


def _fields(environ: Mapping[str, str], fields: Mapping[str, object]) -> dict[str, str]:
    out = {}
    for key, value in environ.items():
        if key.startswith("OMSD_") and (name := key[5:].lower()) in fields:
            out[name] = value
    return out


def settings_environment(settings: Settings) -> dict[str, str]:
    """`settings` as the OMSD_* variables that give them (a command run for one account of a
    fleet: `omsd --account NAME ...` reads the account's settings from its environment)."""
    out: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, tuple):
            value = ",".join(map(str, value))
        out[f"OMSD_{name.upper()}"] = str(value)
    return out


def account_environment(name: str | None, environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` (a fleet's main environment) made into one account's: its settings as OMSD_*
    variables, the fleet's own variables gone. `name` None: the one account there is."""
    directory = accounts_dir(environ)
    assert directory is not None
    configs = read_accounts(directory, environ)
    if name is None:
        if len(configs) != 1:
            found = "no account" if not configs else f"{len(configs)} accounts"
            raise ConfigError(f"--account NAME is required: {directory} holds {found} (omsd accounts lists them)")
        name = next(iter(configs))
    config = configs.get(name)
    if config is None:
        raise ConfigError(f"--account {name}: no {name}{SUFFIX} in {directory}")
    if config.settings is None:
        raise ConfigError(f"--account {name}: {config.error}")
    env = {k: v for k, v in environ.items() if not k.startswith("OMSD_")}
    return env | settings_environment(config.settings)
