"""How omsd installs: under one distinctive top-level name, beside anything else."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False, timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """omsd built as a wheel from the tracked files alone (as a fresh clone has them), so
    neither a stale build/ folder nor an untracked file can hide a packaging mistake."""
    src = tmp_path_factory.mktemp("src")
    tracked = _run("git", "ls-files", "-z", cwd=ROOT)
    assert tracked.returncode == 0, tracked.stderr
    for name in filter(None, tracked.stdout.split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheels")
    built = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", out, src, cwd=out)
    assert built.returncode == 0, built.stderr
    (found,) = out.glob("omsd-*.whl")
    return found


@pytest.mark.slow
def test_installs_beside_python_daemon(tmp_path: Path, wheel: Path) -> None:
    """A regular install of omsd and python-daemon in one environment: neither overwrites
    the other, `omsd --help` works, `import daemon` is python-daemon's, and removing
    python-daemon leaves omsd whole."""
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    installed = _run(py, "-m", "pip", "install", "--quiet", wheel, "python-daemon", cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    assert "license" not in installed.stderr.lower()

    helped = _run(env_dir / "bin" / "omsd", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "omsd" in helped.stdout

    probe = "import daemon, omsd.daemon, omsd.state; print(daemon.__file__); print(hasattr(daemon, 'DaemonContext'))"
    which = _run(py, "-c", probe, cwd=tmp_path)
    assert which.returncode == 0, which.stderr
    daemon_file, is_python_daemon = which.stdout.split()
    assert "site-packages" in daemon_file
    assert is_python_daemon == "True"

    removed = _run(py, "-m", "pip", "uninstall", "--yes", "--quiet", "python-daemon", cwd=tmp_path)
    assert removed.returncode == 0, removed.stderr
    again = _run(py, "-m", "omsd.daemon", "--help", cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_wheel_holds_only_the_omsd_namespace(wheel: Path) -> None:
    """The built wheel installs nothing at top level but `omsd` (and its metadata), and
    no development tool is a runtime dependency."""

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith((".dist-info", ".data"))} == {"omsd"}
    # every module of the three folders, sub-packages included (pyproject lists them by name)
    tracked = _run("git", "ls-files", "daemon", "state", "sim", cwd=ROOT).stdout.split()
    modules = {f"omsd/{name}" for name in tracked if name.endswith(".py")}
    assert modules and modules <= set(names), sorted(modules - set(names))
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    runtime = [r for r in requires if "extra ==" not in r]
    for tool in ("pytest", "hypothesis", "ruff", "mypy", "aioresponses"):
        assert not any(tool in r for r in runtime), runtime


def test_the_units_documentation_is_installed(wheel: Path) -> None:
    """The units' Documentation= names files the wheel installs under the venv's prefix
    (the unit's ExecStart venv, /opt/omsd/.venv, + share/doc/omsd/)."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    prefix = "/opt/omsd/.venv/"
    for unit in ("omsd.service", "omsd@.service"):
        text = (ROOT / "systemd" / unit).read_text()
        [line] = [ln for ln in text.splitlines() if ln.startswith("Documentation=")]
        assert f"ExecStart={prefix}bin/omsd run" in text
        for uri in line.removeprefix("Documentation=").split():
            path = uri.removeprefix("file://")
            assert path.startswith(prefix), uri
            data = path.removeprefix(prefix)
            assert any(n.endswith(f".data/data/{data}") for n in names), (uri, data)
