"""`omsd --instance NAME` / `omsd --service`: the environment the unit
`omsd@NAME.service` (or the single-account `omsd.service`) gives omsd.

The same files systemd reads (systemd/omsd.unit.in): the environment file
`/etc/omsd/NAME.env` (`omsd.env`), the credentials in `/etc/omsd/credentials/NAME/`
(`/etc/omsd/credentials/`), and the database under the state directory
`/var/lib/omsd/NAME/` (`/var/lib/omsd/`). OMSD_ETC and OMSD_STATE_ROOT move those
two roots (tests, a packaged layout).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from .settings import OTHER_VARIABLES, ConfigError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# LoadCredential=omsd_<name>:/etc/omsd/credentials/%i/<name>, as in the unit.
CREDENTIALS = ("app_token", "api_token", "hook_secret", "relay_secret", "notify_secret")
# Litestream's S3 keys as credentials (LoadCredential=litestream_...: docs/operations.md, "Replication")
REPLICA_CREDENTIALS = ("litestream_access_key_id", "litestream_secret_access_key")


def instance_environment(name: str | None, environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` without its OMSD_* variables (the service does not see the caller's),
    plus what the unit sets: OMSD_DB under the state directory, then the environment
    file (EnvironmentFile= overrides Environment=), then each credential the file
    does not set (a variable wins over a credential, as in `omsd run`)."""
    if name is not None and not _NAME.fullmatch(name):
        raise ConfigError(f"--instance: {name!r} is not an instance name (letters, digits, - _ .)")
    what = "--service" if name is None else f"--instance {name}"
    etc = Path(environ.get("OMSD_ETC", "/etc/omsd"))
    state = Path(environ.get("OMSD_STATE_ROOT", "/var/lib/omsd"))
    env_file = etc / f"{name or 'omsd'}.env"
    credentials = etc / "credentials" / (name or "")
    env = {k: v for k, v in environ.items() if not k.startswith("OMSD_") or k in OTHER_VARIABLES}
    env.pop("CREDENTIALS_DIRECTORY", None)
    env["OMSD_DB"] = str(state / (name or "") / "omsd.db")
    try:
        env.update(parse_environment_file(env_file.read_text()))
    except FileNotFoundError:
        if name is not None:  # omsd@NAME requires it (EnvironmentFile=/etc/omsd/%i.env)
            raise ConfigError(f"{what}: cannot read {env_file}: it does not exist") from None
        # omsd.service marks it optional (EnvironmentFile=-/etc/omsd/omsd.env): so does --service
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {env_file}: {exc.strerror}") from None
    named = [(c, f"OMSD_{c.upper()}") for c in CREDENTIALS] + [(c, c.upper()) for c in REPLICA_CREDENTIALS]
    for credential, variable in named:
        path = credentials / credential
        if variable not in env and path.is_file():
            try:
                env[variable] = path.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    return env


def parse_environment_file(text: str) -> dict[str, str]:
    """systemd's EnvironmentFile= format: KEY=VALUE lines, `#` and `;` comment lines,
    an optionally quoted value (a `#` after a value is part of it, as in systemd)."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key.strip()] = value
    return out
