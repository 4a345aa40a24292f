"""The Prometheus rules and the Grafana dashboard in deploy/: tested, and over metrics omsd exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from omsd.daemon.ops.metrics import Metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "omsd-rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "omsd-rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "omsd-dashboard.json"
PROMTOOL = shutil.which("promtool")
# In CI promtool must run (.ci/run installs it); elsewhere its absence skips.
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and not os.environ.get("CI"), reason="promtool not installed (.ci/run installs it)"
)
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",), "info": ("_info",)}


def exported_names() -> set[str]:
    """Every sample name a live omsd registry can expose (histograms and labelled families
    included before their first observation)."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def metric_names(expr: str) -> set[str]:
    """The omsd metric names an expression reads (label values in quotes are skipped)."""
    return set(re.findall(r"\bomsd_[a-z0-9_]+", re.sub(r'"[^"]*"', '""', expr)))


def dashboard_exprs() -> list[str]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]
    exprs += [var["definition"] for var in board["templating"]["list"] if "definition" in var]
    return exprs


def rules() -> dict[str, str]:
    """Alert name -> expression, read from the rules file (plain or folded `expr: >`)."""
    out: dict[str, str] = {}
    lines = RULES.read_text().splitlines()
    alert = ""
    for i, line in enumerate(lines):
        if m := re.match(r"\s+- alert: (\S+)$", line):
            alert = m.group(1)
        elif m := re.match(r"(\s+)expr: (.*)$", line):
            indent, expr = len(m.group(1)), m.group(2)
            if expr == ">":
                block = []
                for follow in lines[i + 1 :]:
                    if len(follow) - len(follow.lstrip()) <= indent:
                        break
                    block.append(follow.strip())
                expr = " ".join(block)
            out[alert] = expr
    return out


def rule_cases() -> dict[str, tuple[int, set[str]]]:
    """Alert name -> (cases where nothing fires, instances it fires for), from the test file."""
    quiet: dict[str, int] = {}
    fired: dict[str, set[str]] = {}
    alert = ""
    for line in RULE_TESTS.read_text().splitlines():
        if m := re.match(r"\s+alertname: (\S+)$", line):
            alert = m.group(1)
        elif re.match(r"\s+exp_alerts: \[\]$", line):
            quiet[alert] = quiet.get(alert, 0) + 1
        elif m := re.search(r"exp_labels: \{.*\binstance: (\w+)", line):
            fired.setdefault(alert, set()).add(m.group(1))
    return {name: (quiet.get(name, 0), fired.get(name, set())) for name in set(quiet) | set(fired)}


@needs_promtool
def test_promtool_rule_tests_pass() -> None:
    """`promtool test rules` feeds series to every alert and checks which fire and which do not."""
    assert PROMTOOL is not None, "promtool is missing in CI"
    proc = subprocess.run(
        [PROMTOOL, "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """Each alert has a promtool case where it fires, for the troubled instance `a` only
    (instance `b`, healthy or in a blip, never alerts); the rules file has 9 alerts."""
    cases = rule_cases()
    assert len(rules()) == 10
    for alert in rules():
        assert alert in cases, alert
        assert cases[alert][1] == {"a"}, alert


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_expressions_name_only_metrics_omsd_exports(source: str) -> None:
    """Every metric an alert or a dashboard panel reads is one omsd exposes (a renamed
    metric would otherwise leave an alert that never fires and an empty panel)."""
    exprs = list(rules().values()) if source == "rules" else dashboard_exprs()
    exported = exported_names()
    assert exprs
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= exported, f"{expr}: {names - exported}"


@needs_promtool
def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """Every dashboard expression is valid PromQL (checked by promtool as recording rules,
    with Grafana's variables replaced by values)."""
    assert PROMTOOL is not None, "promtool is missing in CI"
    exprs = [e.replace("$__rate_interval", "5m").replace("$instance", ".*") for e in dashboard_exprs()]
    exprs = [e for e in exprs if not e.startswith("label_values(")]
    recording = [{"record": f"omsd:dashboard:{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": recording}]}))  # JSON is YAML
    proc = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
