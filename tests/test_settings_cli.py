"""Settings, the command line and the package layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from omsd.daemon.cli import main
from omsd.daemon.settings import ConfigError, load_settings
from omsd.daemon.vtex import VtexClient

REQUIRED = {
    "OMSD_ACCOUNT": "shop",
    "OMSD_APP_KEY": "vtexappkey-shop-X",
    "OMSD_APP_TOKEN": "very-secret-app-token",
    "OMSD_CONNECTOR_NAME": "conn",
    "OMSD_CONNECTOR_ENDPOINT": "https://omsd.example.com",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key, value in REQUIRED.items():
        monkeypatch.setenv(key, value)
    return monkeypatch


def test_defaults(env: pytest.MonkeyPatch) -> None:
    """With only the required variables, the documented defaults apply."""
    s = load_settings()
    assert s.listen == "127.0.0.1:8787"
    assert s.maxlot == 10
    assert s.base_url == "https://shop.vtexcommercestable.com.br"
    assert s.api_token is None
    assert "waiting-for-manual-authorization" in s.feed_statuses


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("OMSD_MAXLOT", "11", "OMSD_MAXLOT"),
        ("OMSD_LISTEN", "nowhere", "OMSD_LISTEN"),
        ("OMSD_CONNECTOR_ENDPOINT", "http://example.com", "OMSD_CONNECTOR_ENDPOINT: Value error, must be https"),
        ("OMSD_CONNECTOR_ENDPOINT", "https://e.com/x?a=1", "query string"),
        ("OMSD_CONNECTOR_ENDPOINT", "ftp://e.com", "OMSD_CONNECTOR_ENDPOINT: Value error, must be an absolute"),
        ("OMSD_HOOK_URL", "http://example.com/hook", "OMSD_HOOK_URL: Value error, must be https (VTEX refuses"),
        ("OMSD_HOOK_URL", "/vtex/hook", "OMSD_HOOK_URL: Value error, must be an absolute http(s) URL"),
        (
            "OMSD_VTEX_BASE_URL",
            "shop.vtexcommercestable.com.br",
            "OMSD_VTEX_BASE_URL: Value error, must be an absolute",
        ),
        ("OMSD_POLL_INTERVAL_S", "soon", "OMSD_POLL_INTERVAL_S"),
        ("OMSD_FEED_RETENTION_S", "100", "OMSD_FEED_RETENTION_S"),
    ],
)
def test_bad_values_name_the_variable(env: pytest.MonkeyPatch, name: str, value: str, message: str) -> None:
    """A bad value gives one line naming the variable."""
    env.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_required_variable(env: pytest.MonkeyPatch) -> None:
    """A missing variable is named."""
    env.delenv("OMSD_APP_TOKEN")
    with pytest.raises(ConfigError, match="OMSD_APP_TOKEN: is required"):
        load_settings()


def test_loopback_http_endpoint_is_allowed_for_a_simulator(env: pytest.MonkeyPatch) -> None:
    """Plain http is accepted for loopback only; the endpoint and base URL lose a trailing
    slash, the hook URL is kept as written."""
    env.setenv("OMSD_CONNECTOR_ENDPOINT", "http://127.0.0.1:8787/")
    env.setenv("OMSD_HOOK_URL", "http://localhost:8787/vtex/hook/")
    env.setenv("OMSD_VTEX_BASE_URL", "http://127.0.0.1:8788/")
    s = load_settings()
    assert s.connector_endpoint == "http://127.0.0.1:8787"
    assert s.hook_url == "http://localhost:8787/vtex/hook/"
    assert s.base_url == "http://127.0.0.1:8788"


def test_secrets_do_not_appear_in_repr_or_errors(env: pytest.MonkeyPatch) -> None:
    """Neither the settings' repr nor a validation error shows a secret."""
    env.setenv("OMSD_API_TOKEN", "api-token-abcdef")
    s = load_settings()
    assert "very-secret-app-token" not in repr(s) and "api-token-abcdef" not in repr(s)
    env.setenv("OMSD_MAXLOT", "very-secret-app-token")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "very-secret-app-token" not in str(err.value)


async def test_secrets_do_not_appear_in_the_vtex_clients_repr(env: pytest.MonkeyPatch) -> None:
    """repr() and str() of Settings and of the VTEX client show no app token, API token or hook secret."""
    secrets = ("very-secret-app-token", "api-token-abcdef", "hook-secret-abcdef")
    env.setenv("OMSD_API_TOKEN", secrets[1])
    env.setenv("OMSD_HOOK_SECRET", secrets[2])
    settings = load_settings()
    async with aiohttp.ClientSession() as session:
        client = VtexClient(settings, session)
        shown = [repr(settings), str(settings), repr(client), str(client)]
    assert "shop" in repr(client)
    assert not [text for text in shown for secret in secrets if secret in text]


def test_run_with_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    """`omsd run` without its variables exits 2 and names the first missing one."""
    proc = subprocess.run(
        [sys.executable, "-m", "omsd.daemon", "run"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin"},
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "OMSD_ACCOUNT" in proc.stderr


@pytest.mark.parametrize(
    "command",
    [
        "run",
        "demo",
        "approve",
        "orders",
        "show",
        "journal",
        "replay",
        "ingest",
        "export",
        "init",
        "retry",
        "status",
        "sim",
        "feed",
        "hook",
        "check",
        "healthcheck",
    ],
)
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`omsd COMMAND --help` describes the command."""
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"omsd {command}" in out and len(out) > 150


def test_offline_commands_on_a_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """approve, status, orders, show, journal, retry and replay work on a database alone."""
    monkeypatch.setenv("OMSD_DB", str(tmp_path / "o.db"))
    assert main(["init"]) == 0
    assert main(["approve", "M-1", "--order-id", "MKP-M-1-01"]) == 0
    assert main(["replay"]) == 0
    assert main(["status"]) == 0
    status_out = capsys.readouterr().out
    status = json.loads(status_out[status_out.index("{") :])
    assert status["processor_offset"] >= 1
    assert main(["orders", "--json"]) == 0
    [line] = capsys.readouterr().out.strip().splitlines()
    assert json.loads(line)["phase"] == "checking"
    assert main(["show", "M-1"]) == 0
    assert "MKP-M-1-01" in capsys.readouterr().out
    assert main(["journal"]) == 0
    assert main(["retry", "MKP-M-1-01"]) == 0
    assert main(["show", "nope"]) == 1


def test_offline_command_without_database_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading commands refuse to create an empty database by accident."""
    monkeypatch.setenv("OMSD_DB", str(tmp_path / "missing.db"))
    assert main(["orders"]) == 2
    assert not (tmp_path / "missing.db").exists()


def test_state_never_imports_the_outside_world() -> None:
    """The machine imports neither daemon, aiohttp nor apscheduler."""
    code = (
        "import sys, omsd.state.machine, omsd.state.store; "
        "bad = [m for m in sys.modules "
        "if m.startswith('omsd.daemon') or m.split('.')[0] in ('aiohttp', 'apscheduler')]; "
        "print(','.join(bad))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert proc.stdout.strip() == ""


def test_empty_tokens_mean_unset_and_short_ones_are_refused(env: pytest.MonkeyPatch) -> None:
    """An empty API token (e.g. an empty credential file) disables /v1 writes instead of
    accepting an empty bearer; a short token is refused."""
    env.setenv("OMSD_API_TOKEN", "   ")
    assert load_settings().api_token is None
    env.setenv("OMSD_API_TOKEN", "short")
    with pytest.raises(ConfigError, match="OMSD_API_TOKEN: Value error, must be at least 16 characters"):
        load_settings()
