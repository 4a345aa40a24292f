"""The container image's recipe, its compose example and the script that builds and runs it.

The image itself is built and run by scripts/container (called by .ci/run): these
tests pin the properties that script and the operators rely on."""

from __future__ import annotations

import os
import re
import subprocess
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent


def test_container_file_runs_omsd_as_pid_1_without_root() -> None:
    """Exec-form entrypoint (omsd gets SIGTERM), a non-root user, the database on a
    volume, a health check."""
    final = (ROOT / "Containerfile").read_text().split("\nFROM ")[-1]
    assert 'ENTRYPOINT ["omsd", "run"]' in final
    assert "\nUSER omsd" in final
    assert 'VOLUME ["/var/lib/omsd"]' in final
    assert "HEALTHCHECK" in final and '["omsd", "healthcheck"]' in final


def test_container_base_is_a_build_argument_defaulting_to_slim_python() -> None:
    """Both stages start from ARG BASE (default python:3.11-slim), and the build installs
    wheels from the wheelhouse only: no package index is reached during the build."""
    text = (ROOT / "Containerfile").read_text()
    assert re.search(r"^ARG BASE=python:3\.11-slim$", text, re.M)
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms == ["${BASE}", "${BASE}"]
    assert "--no-index --find-links /wheelhouse" in text


def test_compose_defines_every_secret_it_uses() -> None:
    """Every secret a service lists is defined at the top level from a file, and omsd
    reads them where compose mounts them (CREDENTIALS_DIRECTORY=/run/secrets)."""
    text = (ROOT / "deploy" / "compose.yaml").read_text()
    used = {name.strip() for line in re.findall(r"^ {4}secrets: \[(.*)\]$", text, re.M) for name in line.split(",")}
    top = text.split("\nsecrets:\n", 1)[1].split("\n\n", 1)[0]
    defined = dict(re.findall(r"^ {2}(\w+):\n {4}file: (\S+)$", top, re.M))
    assert used and used <= defined.keys(), f"undefined secrets: {used - defined.keys()}"
    assert all(path == f"./secrets/{name}" for name, path in defined.items())
    assert "CREDENTIALS_DIRECTORY: /run/secrets" in text
    assert set(re.findall(r"/run/secrets/(\w+)", text)) <= defined.keys()


@pytest.mark.parametrize(("ci", "code"), [("true", 1), ("", 0)])
def test_container_step_is_skippable_locally_but_never_in_ci(ci: str, code: int) -> None:
    """OMSD_SKIP_CONTAINER=1 skips the image build on a workstation; with CI=true it fails."""
    env = {**os.environ, "OMSD_SKIP_CONTAINER": "1", "CI": ci}
    done = subprocess.run([ROOT / "scripts" / "container"], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == code, done.stderr


def test_ci_builds_and_runs_the_image() -> None:
    """.ci/run calls scripts/container, which runs --version, check, and the demo in the image
    as the omsd user and asserts it holds no compiler or test tools."""
    assert "\nscripts/container\n" in (ROOT / ".ci" / "run").read_text()
    script = (ROOT / "scripts" / "container").read_text()
    for step in ("omsd --version", "omsd check", "omsd demo", "--user omsd", "gcc", "pytest"):
        assert step in script


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`omsd --version` prints `omsd <version>` from the installed package and exits 0."""
    from importlib.metadata import version

    from omsd.daemon.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"omsd {version('omsd')}"


async def test_demo_keeps_the_log_it_points_at() -> None:
    """The log path the demo prints still exists, with the daemon's JSON lines, after it ends.
    Its output in a pipe is the summary table on lines of its own, no live frames."""
    from omsd.daemon.tools.demo import run_demo

    out = StringIO()
    assert await run_demo(4, console=Console(file=out, width=200)) == 0
    assert re.search(r"^ *omsd demo: summary *$", out.getvalue(), re.MULTILINE), out.getvalue()
    assert "omsd demo: live" not in out.getvalue()
    log = Path(re.findall(r"log kept at (\S+)", out.getvalue())[-1])
    try:
        assert log.exists() and f"log {log}" in out.getvalue()
        assert log.read_text().lstrip().startswith("{")
    finally:
        log.unlink()


async def test_the_demo_shows_what_the_connector_heard() -> None:
    """The demo's connector receives the relay's signed POSTs: its summary counts every
    order's terminal event, and the verdict fails unless each was heard."""
    from omsd.daemon.tools.demo import run_demo

    out = StringIO()
    assert await run_demo(4, console=Console(file=out, width=300)) == 0
    [summary] = [line for line in out.getvalue().splitlines() if line.startswith("the connector heard")]
    assert "4 intent.accepted" in summary and "4 approval.confirmed" in summary  # 4 orders, all to be approved
    Path(re.findall(r"log kept at (\S+)", out.getvalue())[-1]).unlink()
