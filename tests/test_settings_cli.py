"""Settings, the command line and the package layout."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from omsd.daemon.cli import main
from omsd.daemon.config.instance import instance_environment, parse_environment_file
from omsd.daemon.config.settings import (
    ConfigError,
    PolicySettings,
    Settings,
    load_settings,
    warn_unknown_variables,
)
from omsd.daemon.tools.check import run_checks
from omsd.daemon.vtex.client import VtexClient
from omsd.sim.server import Simulator
from omsd.state.events import Event
from omsd.state.machine import decide
from omsd.state.models import FetchOrder, Order
from tests.helpers import RunDaemon, free_port, run_cli
from tests.machine_helpers import answered, fetch_failed, fetched, intent, resync, send_failed, status, timer
from tests.test_machine import STEP

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
    assert main(["status", "--json"]) == 0
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


# ---- settings errors: one line, exit 2 -------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def omsd(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`omsd ARGS` in a subprocess with exactly `env` (plus PATH)."""
    return subprocess.run(
        [sys.executable, "-m", "omsd.daemon", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=cwd,
        timeout=60,
        check=False,
    )


def test_feed_statuses_take_a_comma_list_or_a_json_list(env: pytest.MonkeyPatch) -> None:
    """Both spellings the docs allow give the same statuses."""
    env.setenv("OMSD_FEED_STATUSES", " canceled, waiting-for-manual-authorization ")
    assert load_settings().feed_statuses == ("canceled", "waiting-for-manual-authorization")
    env.setenv("OMSD_FEED_STATUSES", '["canceled", "waiting-for-manual-authorization"]')
    assert load_settings().feed_statuses == ("canceled", "waiting-for-manual-authorization")


@pytest.mark.parametrize("value", ["canceled,cancelled", '["canceled", "cancelled"]'])
def test_feed_statuses_outside_vtexs_list_are_refused(env: pytest.MonkeyPatch, value: str) -> None:
    """A status VTEX cannot filter on is named, in either spelling (it would replace VTEX's filter)."""
    env.setenv("OMSD_FEED_STATUSES", value)
    with pytest.raises(ConfigError, match=r"^OMSD_FEED_STATUSES: .*cancelled$"):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OMSD_FEED_STATUSES", "canceled,cancelled"),
        ("OMSD_FEED_STATUSES", '["canceled", 3'),
        ("OMSD_DB", "{tmp}/no/such/folder/omsd.db"),
        ("OMSD_LISTEN", "127.0.0.1:{busy}"),
        ("OMSD_LISTEN", "192.0.2.1:8787"),
    ],
)
def test_run_settings_errors_are_one_line_and_exit_2(tmp_path: Path, variable: str, value: str) -> None:
    """`omsd run` with a bad status list, a database in a missing folder, or an address it
    cannot listen on: one stderr line naming the variable, exit 2 (no traceback)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {
            **{k: v for k, v in REQUIRED.items() if k != "OMSD_CONNECTOR_ENDPOINT"},
            "OMSD_CONNECTOR_ENDPOINT": "http://127.0.0.1:9",
            "OMSD_VTEX_BASE_URL": "http://127.0.0.1:9",
            "OMSD_DB": str(tmp_path / "omsd.db"),
            "OMSD_LISTEN": f"127.0.0.1:{free_port()}",
            variable: value.format(tmp=tmp_path, busy=busy.getsockname()[1]),
        }
        proc = omsd("run", env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"omsd: configuration error: {variable}: ")


def test_a_misspelled_variable_is_named_with_the_closest_setting(tmp_path: Path) -> None:
    """An OMSD_* variable no setting reads gives one warning naming the closest known one."""
    env = {"OMSD_DB": str(tmp_path / "o.db"), "OMSD_POLL_INTERVAL": "1", "OMSD_ETC": str(tmp_path)}
    assert omsd("init", env=env, cwd=tmp_path).returncode == 0
    proc = omsd("orders", env=env, cwd=tmp_path)
    assert proc.returncode == 0
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("omsd: warning:")]
    assert warnings == [
        "omsd: warning: OMSD_POLL_INTERVAL is not a setting omsd reads (did you mean OMSD_POLL_INTERVAL_S?)"
    ]


def test_known_variables_warn_nothing() -> None:
    """Every setting, the variables `--instance` reads and the project's own scripts' switch
    (scripts/container's OMSD_SKIP_CONTAINER, which the README suggests exporting) are known."""
    quiet = io.StringIO()
    known = {f"OMSD_{name.upper()}": "x" for name in Settings.model_fields} | {"OMSD_ETC": "/", "HOME": "/"}
    known["OMSD_SKIP_CONTAINER"] = "1"
    assert warn_unknown_variables(known, quiet) == [] and quiet.getvalue() == ""


async def test_hook_config_in_feed_mode_proposes_nothing(
    sim_env: Simulator, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Feed mode: `hook config show` shows VTEX's hook (masked) and proposes nothing, since omsd does
    not use it; `apply` refuses (exit 2) and writes nothing. The feed's own config in hook mode alike."""
    hook = {
        "filter": {"type": "FromWorkflow", "status": ["canceled"]},
        "hook": {"url": "https://elsewhere.example.com/h", "headers": {"X-Omsd-Hook-Secret": "s" * 20}},
    }
    sim_env.hook_config = hook
    assert await run_cli("hook", "config", "show") == 0
    out = capsys.readouterr().out
    assert "elsewhere.example.com" in out and "s" * 20 not in out
    assert "OMSD_SOURCE=feed: omsd does not use the hook; nothing to change" in out and "->" not in out
    assert await run_cli("hook", "config", "apply", "--yes") == 2
    assert "does not use the hook" in capsys.readouterr().err
    assert sim_env.hook_config == hook
    monkeypatch.setenv("OMSD_SOURCE", "hook")
    monkeypatch.setenv("OMSD_HOOK_SECRET", "hook-secret-0123456789")
    assert await run_cli("feed", "config", "show") == 0
    assert "OMSD_SOURCE=hook: omsd does not use the feed" in capsys.readouterr().out


async def test_check_passes_the_listen_address_of_a_running_omsd(sim: Simulator, run_daemon: RunDaemon) -> None:
    """`omsd check` beside the running daemon: its own address passes; one held by another program fails."""
    async with run_daemon(sim) as daemon:
        results = {r.name: r for r in await run_checks(daemon.settings)}
        assert results["listen address"].ok, results["listen address"].detail
        assert "running omsd" in results["listen address"].detail
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        settings = daemon.settings.model_copy(update={"listen": f"127.0.0.1:{other.getsockname()[1]}"})
        results = {r.name: r for r in await run_checks(settings)}
    assert not results["listen address"].ok


# ---- the example environment and `omsd --instance` -------------------------------------


def test_the_example_environment_validates_with_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/omsd.env.example plus credential files (as the unit hands them over) is a valid
    configuration, and it sets no secret variable that would shadow a credential."""
    example = parse_environment_file((ROOT / "deploy" / "omsd.env.example").read_text())
    assert not {"OMSD_APP_TOKEN", "OMSD_API_TOKEN", "OMSD_HOOK_SECRET"} & set(example)
    for key in [k for k in os.environ if k.startswith("OMSD_")]:
        monkeypatch.delenv(key)
    for key, value in example.items():
        monkeypatch.setenv(key, value)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "omsd_app_token").write_text("dummy-app-token-0123456789\n")
    (creds / "omsd_api_token").write_text("")
    (creds / "omsd_hook_secret").write_text("")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    settings = load_settings()
    assert settings.app_token.get_secret_value() == "dummy-app-token-0123456789"
    assert settings.source == "feed" and settings.hook_secret is None


def instance_files(tmp_path: Path, sim: Simulator) -> dict[str, str]:
    """An /etc/omsd and /var/lib/omsd for the instance `mystore`, as the docs lay them out."""
    etc, state = tmp_path / "etc", tmp_path / "state"
    (etc / "credentials" / "mystore").mkdir(parents=True)
    (state / "mystore").mkdir(parents=True)  # systemd's StateDirectory=omsd/%i
    (etc / "mystore.env").write_text(
        f"OMSD_ACCOUNT={sim.account}\nOMSD_APP_KEY={sim.app_key}\nOMSD_CONNECTOR_NAME=c\n"
        f"OMSD_CONNECTOR_ENDPOINT=https://omsd.example.com\nOMSD_LISTEN=127.0.0.1:{free_port()}\n"
        f"OMSD_VTEX_BASE_URL={sim.base_url}\n# a comment\n"
    )
    (etc / "credentials" / "mystore" / "app_token").write_text(sim.app_token + "\n")
    return {"OMSD_ETC": str(etc), "OMSD_STATE_ROOT": str(state), "OMSD_DB": str(tmp_path / "elsewhere.db")}


async def test_instance_commands_see_what_the_service_sees(sim: Simulator, tmp_path: Path) -> None:
    """The documented `omsd --instance mystore …` commands read /etc/omsd/mystore.env, the
    instance's credentials and its database, and ignore the caller's OMSD_* variables."""
    env = instance_files(tmp_path, sim)

    async def run(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(omsd, "--instance", "mystore", *args, env=env, cwd=tmp_path)

    assert (await run("init")).returncode == 0
    assert (tmp_path / "state" / "mystore" / "omsd.db").exists()
    assert not (tmp_path / "elsewhere.db").exists()
    assert (await run("approve", "MKT-9", "--order-id", "MKP-9-01")).returncode == 0
    status = await run("status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout[status.stdout.index("{") :])["journal"] == 1
    journal = await run("journal", "--limit", "20")
    assert journal.returncode == 0 and "MKP-9-01" in journal.stdout
    assert (await run("orders", "--phase", "dead")).returncode == 0
    check = await run("check")
    assert "accepted by" in check.stdout, check.stdout + check.stderr  # the token came from the credential file
    assert check.stderr == "omsd check\n"  # in a pipe the table is tab-separated lines, its title on stderr


def test_an_unknown_instance_is_one_line_exit_2(tmp_path: Path) -> None:
    """`--instance` naming no environment file: one line naming the file, exit 2."""
    proc = omsd("--instance", "nosuch", "orders", env={"OMSD_ETC": str(tmp_path)}, cwd=tmp_path)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert f"{tmp_path}/nosuch.env" in line


def test_service_reads_the_single_units_files(tmp_path: Path) -> None:
    """`omsd --service` reads /etc/omsd/omsd.env, /etc/omsd/credentials/ and /var/lib/omsd/omsd.db."""
    etc, state = tmp_path / "etc", tmp_path / "state"
    (etc / "credentials").mkdir(parents=True)
    state.mkdir()
    (etc / "omsd.env").write_text("OMSD_ACCOUNT=shop\n")
    (etc / "credentials" / "app_token").write_text("token-from-the-credential-file\n")
    env = instance_environment(None, {"OMSD_ETC": str(etc), "OMSD_STATE_ROOT": str(state), "OMSD_ACCOUNT": "x"})
    assert env["OMSD_ACCOUNT"] == "shop"
    assert env["OMSD_APP_TOKEN"] == "token-from-the-credential-file"
    assert env["OMSD_DB"] == str(state / "omsd.db")
    proc = omsd("--service", "init", env={"OMSD_ETC": str(etc), "OMSD_STATE_ROOT": str(state)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (state / "omsd.db").exists()


def _numeric(annotation: object) -> bool:
    return annotation in (int, float, int | None, float | None)


def test_every_duration_and_count_has_an_upper_bound() -> None:
    """No duration or count is unbounded: each numeric setting declares a maximum (`le`/`lt`)."""
    unbounded = [
        name
        for name, field in Settings.model_fields.items()
        if _numeric(field.annotation) and not any(hasattr(m, "le") or hasattr(m, "lt") for m in field.metadata)
    ]
    assert unbounded == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OMSD_HELD_RECHECK_S", "1e12"),
        ("OMSD_HELD_RECHECK_S", "inf"),
        ("OMSD_PARKED_INTENT_TTL_S", "inf"),
        ("OMSD_PARKED_INTENT_TTL_S", "nan"),
        ("OMSD_MAX_ATTEMPTS", "100000"),
        ("OMSD_READY_STALE_S", "1e300"),
        ("OMSD_QUEUE_AGE_ALARM_S", "inf"),
    ],
)
def test_out_of_range_durations_are_settings_errors(env: pytest.MonkeyPatch, name: str, value: str) -> None:
    """A duration or count past its bound (or inf, nan) is refused at start, naming the variable."""
    env.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_settings()


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(STEP, max_size=30))
def test_the_machine_computes_every_date_at_the_bounds(steps: list[tuple[Any, ...]]) -> None:
    """At the upper bound of every duration and count, at the end of the range of change times
    omsd accepts (2100), no sequence of events makes `decide` raise (the failure the bounds
    prevent: a date past year 9999, a float overflow in the backoff)."""
    top = {n: next(m.le for m in f.metadata if hasattr(m, "le")) for n, f in PolicySettings.model_fields.items()}
    policy = PolicySettings(**top).policy()
    o: Order | None = None
    outbox: list[Any] = []
    for i, step in enumerate(steps):
        now = datetime(2100, 1, 1, tzinfo=UTC) + timedelta(seconds=i)
        event: Event | None = None
        if step[0] == "status":
            event = status(step[1], step[2])
        elif step[0] == "intent":
            event = intent()
        elif step[0] in ("result", "fail") and outbox:
            effect = outbox[step[1] % len(outbox)]
            if isinstance(effect, FetchOrder):
                event = fetched(step[2], seq=effect.seq) if step[0] == "result" else fetch_failed(effect.seq, step[3])
            else:
                event = answered("EOI000", seq=effect.seq) if step[0] == "result" else send_failed(True, effect.seq)
        elif step[0] == "timer" and o is not None and o.timer is not None:
            event = timer(o.timer.token, o.timer.reason)
        elif step[0] == "resync":
            event = resync()
        if event is not None:
            decision = decide(o, event, now, policy)
            o = decision.order
            outbox += decision.effects


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_database_path_is_a_settings_error(tmp_path: Path, value: str) -> None:
    """OMSD_DB= (empty) is one line naming the variable and exit 2, for the daemon and the commands."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMSD_")} | {"OMSD_DB": value}
    for args in (["status"], ["run"]):
        done = subprocess.run(
            [sys.executable, "-m", "omsd.daemon", *args], env=env | REQUIRED, capture_output=True, text=True
        )
        assert done.returncode == 2, done.stderr
        assert "OMSD_DB" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("variable", ["OMSD_APP_TOKEN", "OMSD_APP_KEY", "OMSD_API_TOKEN", "OMSD_HOOK_SECRET"])
def test_a_credential_with_a_line_break_is_refused(env: pytest.MonkeyPatch, variable: str) -> None:
    """CR or LF inside a credential (a header injection; aiohttp would raise when sending it) is a
    settings error naming the variable; a credential file's trailing newline is not."""
    env.setenv("OMSD_SOURCE", "both")
    env.setenv("OMSD_HOOK_SECRET", "hook-secret-0123456789")
    env.setenv(variable, "abcdefgh-ijkl\r\nX-Evil: 1-mnopqrstuvw")
    with pytest.raises(ConfigError, match=variable):
        load_settings()
    env.setenv(variable, "abcdefgh-ijklmnopqrstuvw\n")
    value = getattr(load_settings(), variable.removeprefix("OMSD_").lower())
    assert (value.get_secret_value() if isinstance(value, SecretStr) else value) == "abcdefgh-ijklmnopqrstuvw"


def test_service_runs_without_its_optional_environment_file(tmp_path: Path) -> None:
    """omsd.service marks /etc/omsd/omsd.env optional (`-`): `--service` does too. A missing
    database then points at the service's first start, not at `omsd init` as root."""
    etc, state = tmp_path / "etc", tmp_path / "state"
    (etc / "credentials").mkdir(parents=True)
    state.mkdir()
    env = instance_environment(None, {"OMSD_ETC": str(etc), "OMSD_STATE_ROOT": str(state)})
    assert env["OMSD_DB"] == str(state / "omsd.db")
    proc = omsd("--service", "status", env={"OMSD_ETC": str(etc), "OMSD_STATE_ROOT": str(state)}, cwd=tmp_path)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert "systemctl start omsd;" in line and "do not `omsd init` it as root" in line


def test_an_instance_without_its_database_points_at_the_unit(sim: Simulator, tmp_path: Path) -> None:
    """`omsd --instance mystore status` before the unit's first start names the unit to start."""
    env = instance_files(tmp_path, sim)
    proc = omsd("--instance", "mystore", "status", env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert "systemctl start omsd@mystore" in proc.stderr and "create one with `omsd init`" not in proc.stderr


@pytest.mark.parametrize(
    ("value", "problem"),
    [("", "must not be empty"), ("   ", "must not be empty"), ("tok\r\nen", "printable ASCII")],
    ids=["empty", "blank", "CR/LF"],
)
def test_an_unusable_app_token_is_a_settings_error(tmp_path: Path, value: str, problem: str) -> None:
    """OMSD_APP_TOKEN= (or a token with CR/LF) is refused by the settings, exit 2 naming it,
    instead of passing and failing later as HTTP 401 or a traceback."""
    env = {**REQUIRED, "OMSD_APP_TOKEN": value, "OMSD_DB": str(tmp_path / "o.db")}
    proc = omsd("check", env=env, cwd=tmp_path)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith("omsd: configuration error: OMSD_APP_TOKEN: ") and problem in line
    assert "tok" not in line
