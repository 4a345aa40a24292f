"""The systemd unit and the sd_notify protocol, for real."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from omsd.daemon.config.instance import CREDENTIALS
from omsd.daemon.config.settings import Settings
from omsd.sim.server import Simulator
from tests.helpers import API_TOKEN, free_port, omsd_env

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "omsd.service"
TEMPLATE = ROOT / "systemd" / "omsd@.service"
UNITS = pytest.mark.parametrize("unit", [UNIT, TEMPLATE], ids=["single", "template"])
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (.ci/run installs it)")


@needs_analyze
@UNITS
def test_unit_verifies(tmp_path: Path, unit: Path) -> None:
    """`systemd-analyze verify` accepts the unit and the template (ExecStart pointed at this install)."""
    assert ANALYZE is not None
    omsd = Path(sys.executable).parent / "omsd"
    name = unit.name.replace("@.", "@mystore.")
    copy = tmp_path / name
    copy.write_text(unit.read_text().replace("/opt/omsd/.venv/bin/omsd", str(omsd)))
    proc = subprocess.run([ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""


@needs_analyze
@UNITS
def test_unit_exposure_is_at_most_2(unit: Path) -> None:
    """`systemd-analyze security --offline=true` rates the unit and the template 2.0 or lower."""
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, "security", "--offline=true", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    match = re.search(r"Overall exposure level for omsd\S*\.service: (\d+\.\d+)", proc.stdout + proc.stderr)
    assert match is not None, proc.stdout[-500:]
    assert float(match.group(1)) <= 2.0


def test_units_are_rendered_from_one_source() -> None:
    """The committed omsd.service and omsd@.service are exactly what scripts/gen-units renders."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-units"), "--check"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_template_names_the_instance_everywhere_it_must() -> None:
    """The template's environment file, credentials, state directory and database are per instance."""
    text = TEMPLATE.read_text()
    for line in (
        "EnvironmentFile=/etc/omsd/%i.env",
        "Environment=OMSD_DB=/var/lib/omsd/%i/omsd.db",
        "StateDirectory=omsd/%i",
        "LoadCredential=omsd_app_token:/etc/omsd/credentials/%i/app_token",
    ):
        assert re.search(f"^{re.escape(line)}$", text, re.MULTILINE), line
    assert "OMSD_LISTEN" not in "".join(ln for ln in text.splitlines() if not ln.startswith("#"))


@UNITS
def test_unit_does_not_restart_on_a_configuration_error(unit: Path) -> None:
    """Exit 2 (configuration) and 3 (database owned by another process) are not restarted every 5 s."""
    match = re.search(r"^RestartPreventExitStatus=(.*)$", unit.read_text(), re.MULTILINE)
    assert match is not None
    assert set(match.group(1).split()) == {"2", "3"}


def test_unit_descriptor_limit_leaves_room_above_the_connection_cap() -> None:
    """LimitNOFILE is raised well above the default cap on HTTP connections (plus the
    database and VTEX's connections), so the cap is reached before accept() fails."""
    match = re.search(r"^LimitNOFILE=(\d+)$", UNIT.read_text(), re.MULTILINE)
    assert match is not None
    cap = Settings.model_fields["http_max_connections"].default
    assert int(match.group(1)) >= 4 * cap


def test_unit_is_notify_type_with_watchdog_and_credentials() -> None:
    """The unit asks systemd for what omsd provides: notify, watchdog, credentials, state dir."""
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "LoadCredential=omsd_app_token:",
        "StateDirectory=omsd",
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    ):
        assert line in text


async def test_sd_notify_ready_watchdog_stopping(tmp_path: Path) -> None:
    """`omsd run` with NOTIFY_SOCKET sends READY=1 (after it serves), WATCHDOG=1 pings,
    then STOPPING=1 on SIGTERM, in that order; the AppToken comes from a credential file."""
    sim = Simulator(seed=1)
    await sim.start()
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.setblocking(False)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "omsd_app_token").write_text(sim.app_token + "\n")
    port = free_port()
    env = omsd_env(sim, tmp_path / "omsd.db", port)
    del env["OMSD_APP_TOKEN"]
    env.update({"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000", "CREDENTIALS_DIRECTORY": str(creds)})
    log = (tmp_path / "omsd.log").open("w")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "omsd.daemon", "run", env=env, stdout=log, stderr=log
    )
    loop = asyncio.get_running_loop()
    messages: list[str] = []

    async def until_message(prefix: str) -> None:
        while not any(m.startswith(prefix) or f"\n{prefix}" in m for m in messages):
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout=30)
            messages.append(data.decode())

    try:
        await until_message("READY=1")
        assert sim.feed_config is not None  # VTEX's configuration was checked before READY
        await until_message("WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        await until_message("STOPPING=1")
        assert await asyncio.wait_for(proc.wait(), timeout=30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        sock.close()
        log.close()
        await sim.stop()
    kinds = [m.split("\n")[0].split("=")[0] for m in messages]
    ready, watchdog, stopping = kinds.index("READY"), kinds.index("WATCHDOG"), kinds.index("STOPPING")
    assert ready < watchdog < stopping
    assert any(m.startswith("STATUS=") for m in messages)
    lines = (tmp_path / "omsd.log").read_text().splitlines()
    assert lines and all(json.loads(line)["event"] for line in lines)  # JSON lines when not a TTY
    assert sim.app_token not in "\n".join(lines) and API_TOKEN not in "\n".join(lines)


@UNITS
def test_every_secret_can_come_as_a_credential_and_the_optional_ones_may_be_missing(unit: Path) -> None:
    """Each secret omsd reads has its LoadCredential= (the notify secret too, as the docs
    offer); the optional ones have a SetCredential= default, so a missing file does not stop
    the unit; `omsd --service/--instance` read the same files."""
    text = unit.read_text()
    loaded = dict(re.findall(r"^LoadCredential=(omsd_\w+):\S+/(\w+)$", text, re.MULTILINE))
    defaults = set(re.findall(r"^SetCredential=(omsd_\w+):\\n$", text, re.MULTILINE))
    secrets = {f"omsd_{name}" for name, field in Settings.model_fields.items() if "SecretStr" in str(field.annotation)}
    assert set(loaded) == secrets == {f"omsd_{c}" for c in CREDENTIALS}
    assert all(loaded[f"omsd_{c}"] == c for c in CREDENTIALS)
    assert defaults == secrets - {"omsd_app_token"}
