"""Running `omsd` commands end to end for the benchmarks: wall time and peak memory of the
process a user starts, with this tree or with a baseline taken from git.

A baseline is `git archive REF daemon state sim` unpacked as `omsd/` in a temporary
directory and put first on PYTHONPATH, so `python -m omsd.daemon` runs that code (with
this tree's virtual environment and its libraries).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Code:
    """Which omsd runs: this tree (`tree` None) or a baseline unpacked at `tree`."""

    name: str
    tree: Path | None = None


@dataclass(frozen=True, slots=True)
class Run:
    seconds: float
    peak_rss_mib: float  # the command's own maximum resident set size
    returncode: int
    stdout_tail: str


@contextlib.contextmanager
def baseline(ref: str | None) -> Iterator[Code | None]:
    """The code at git `ref` (None: no baseline), unpacked for the length of the block."""
    if ref is None:
        yield None
        return
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", ref], check=True, capture_output=True, text=True)  # noqa: S603
    files = [*git, "archive", commit.stdout.strip(), "daemon", "state", "sim"]
    archive = subprocess.run(files, check=True, capture_output=True)  # noqa: S603 - git, fixed arguments
    with tempfile.TemporaryDirectory(prefix="omsd-baseline-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(Path(tmp) / "omsd", filter="data")
        yield Code(f"baseline {commit.stdout.strip()}", Path(tmp))


# The command's peak RSS: Linux counts in a child's maximum the memory of the process it
# was forked from (up to its exec), so a benchmark that holds a large generated journal
# would show its own size. The command is forked by this small interpreter instead, which
# times it and reports its rusage.
_SPAWN = """
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
with open(sys.argv[1], "w") as out:
    out.write(f"{seconds} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def run(code: Code, db: Path, args: list[str]) -> Run:
    """`omsd ARGS` with OMSD_DB=db, run by `code`; its stdout's last line is kept."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMSD_")} | {"OMSD_DB": str(db)}
    if code.tree is not None:
        env["PYTHONPATH"] = str(code.tree)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as report:
        command = [sys.executable, "-S", "-c", _SPAWN, report.name, sys.executable, "-m", "omsd.daemon", *args]
        subprocess.run(command, env=env, stdout=out, stderr=err, check=True)  # noqa: S603 - this interpreter
        seconds, maxrss_kib, returncode = report.read().split()
        if int(returncode) not in (0, 1):
            raise RuntimeError(f"omsd {' '.join(args)} ({code.name}) exited {returncode}: {_tail(err)}")
        tail = _tail(out)
    return Run(float(seconds), int(maxrss_kib) / 1024, int(returncode), tail.splitlines()[-1] if tail else "")


def _tail(file: IO[bytes]) -> str:
    file.seek(max(0, file.seek(0, os.SEEK_END) - 4096))
    return file.read().decode(errors="replace").strip()
