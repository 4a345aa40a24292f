"""The simulator is an independent oracle: it loads nothing of the code it judges."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import importlib, json, pkgutil, sys
import omsd.sim
names = [m.name for m in pkgutil.walk_packages(omsd.sim.__path__, "omsd.sim.")]
for name in names:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.startswith(("omsd.state", "omsd.daemon")))
print(json.dumps({"modules": names, "loaded": loaded}))
"""


def test_no_module_of_omsd_sim_loads_omsd_state_or_omsd_daemon() -> None:
    """Importing every omsd.sim module in a fresh interpreter loads no omsd.state/omsd.daemon module."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert "omsd.sim.server" in report["modules"] and "omsd.sim.statuses" in report["modules"]
    assert report["loaded"] == []
