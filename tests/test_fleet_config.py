"""A fleet's configuration: which mode, the shared settings, and each NAME.env."""

from __future__ import annotations

from pathlib import Path

import pytest

from omsd.daemon.config.accounts import accounts_dir, load_fleet_settings, read_accounts
from omsd.daemon.config.settings import ConfigError, warn_unknown_variables
from tests.helpers import API_TOKEN

ACCOUNT = "OMSD_APP_KEY=vtexappkey-a-X\nOMSD_APP_TOKEN=token-of-the-account\n"


def main_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    (tmp_path / "accounts.d").mkdir(exist_ok=True)
    return {
        "OMSD_ACCOUNTS_DIR": str(tmp_path / "accounts.d"),
        "OMSD_STATE_ROOT": str(tmp_path / "state"),
        "OMSD_CONNECTOR_NAME": "conn",
        "OMSD_CONNECTOR_ENDPOINT": "https://omsd.example.com/vtex",
        "OMSD_API_TOKEN": API_TOKEN,
        **extra,
    }


def write(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / "accounts.d" / f"{name}.env").write_text(text)


def test_omsd_account_in_the_main_environment_is_one_account_as_before(tmp_path: Path) -> None:
    """OMSD_ACCOUNT set: no fleet, whatever the accounts directory; a set directory otherwise."""
    env = main_env(tmp_path)
    assert accounts_dir(env | {"OMSD_ACCOUNT": "shop"}) is None
    assert accounts_dir(env) == tmp_path / "accounts.d"
    with pytest.raises(ConfigError, match="OMSD_ACCOUNTS_DIR"):
        accounts_dir({"OMSD_ACCOUNTS_DIR": str(tmp_path / "missing")})


def test_an_account_takes_defaults_from_the_main_environment_but_not_its_secrets(tmp_path: Path) -> None:
    """Shared defaults apply; the file wins; credentials, secrets and the database are the account's own."""
    env = main_env(
        tmp_path,
        OMSD_POLL_INTERVAL_S="7",
        OMSD_SOURCE="feed",
        OMSD_APP_TOKEN="main-environment-token",
        OMSD_HOOK_SECRET="main-hook-secret-0123456789",
        OMSD_REPLICA="file:///backups/omsd",
    )
    write(tmp_path, "shop", ACCOUNT + "OMSD_SOURCE=both\nOMSD_HOOK_SECRET=shop-hook-secret-0123456789\n")
    [config] = read_accounts(tmp_path / "accounts.d", env).values()
    s = config.settings
    assert s is not None and config.error is None
    assert (s.account, s.poll_interval_s, s.source) == ("shop", 7.0, "both")
    assert s.app_token.get_secret_value() == "token-of-the-account"
    assert s.hook_secret is not None and s.hook_secret.get_secret_value() == "shop-hook-secret-0123456789"
    assert s.api_token is None  # the operator's token is the fleet's, not the account's
    assert s.db == tmp_path / "state" / "shop" / "omsd.db"
    assert s.hook_endpoint == "https://omsd.example.com/vtex/vtex/hook/shop"
    assert s.replica == "file:///backups/omsd/shop"  # one replica folder per account


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("shop", "OMSD_APP_KEY=k\n", "OMSD_APP_TOKEN: is required"),
        ("shop", ACCOUNT + "OMSD_LISTEN=0.0.0.0:80\n", "OMSD_LISTEN: is shared by every account"),
        ("shop", ACCOUNT + "OMSD_ACCOUNT=other\n", "OMSD_ACCOUNT: must be the file's NAME"),
        ("shop", ACCOUNT + "OMSD_MAXLOT=11\n", "OMSD_MAXLOT"),
        ("bad_name", ACCOUNT, "NAME must be a VTEX account name"),
    ],
)
def test_a_bad_file_is_its_accounts_error(tmp_path: Path, name: str, text: str, problem: str) -> None:
    """The error names the variable (never a value); the other files are read."""
    env = main_env(tmp_path)
    write(tmp_path, name, text + "OMSD_APP_TOKEN=secret-value-never-shown\n" * ("APP_TOKEN" not in problem))
    write(tmp_path, "fine", ACCOUNT)
    configs = read_accounts(tmp_path / "accounts.d", env)
    assert configs["fine"].settings is not None
    bad = configs[name]
    assert bad.settings is None and bad.error is not None and problem in bad.error
    assert "secret-value-never-shown" not in bad.error


def test_an_unknown_variable_is_a_warning(tmp_path: Path) -> None:
    """A typo in a file is reported (the setting is ignored), not fatal."""
    env = main_env(tmp_path)
    write(tmp_path, "shop", ACCOUNT + "OMSD_POLL_INTERVAL=3\n")
    [config] = read_accounts(tmp_path / "accounts.d", env).values()
    assert config.settings is not None and config.warnings == (
        "OMSD_POLL_INTERVAL is not a setting omsd reads (ignored)",
    )


def test_the_shared_settings_need_the_public_endpoint(tmp_path: Path) -> None:
    """The main environment names omsd's public URL (every account's routes are under it)."""
    env = main_env(tmp_path)
    del env["OMSD_CONNECTOR_ENDPOINT"]
    with pytest.raises(ConfigError, match="OMSD_CONNECTOR_ENDPOINT"):
        load_fleet_settings(env)


def test_the_fleets_variables_are_known(tmp_path: Path) -> None:
    """OMSD_ACCOUNTS_DIR and OMSD_STATE_ROOT draw no "not a setting omsd reads" warning."""
    assert warn_unknown_variables(main_env(tmp_path)) == []
