"""deploy/prometheus through promtool: the scrape config, the alert rules, their unit tests, the dashboard's PromQL.

promtool comes with Debian's `prometheus` package, which .ci/run installs; without it these tests fail (they do not
skip), saying how to install it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.unit.deploy.deploy_files import (
    ALERTS,
    ALERTS_TEST,
    PROMETHEUS_CONFIG,
    PROMETHEUS_DIR,
    alert_rules,
    dashboard,
    dashboard_queries,
    grafana_to_promql,
    load_yaml,
)

pytestmark = pytest.mark.timeout(120)


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed; it comes with Debian's prometheus package: "
            "`apt-get install --no-install-recommends prometheus` (.ci/run does this)",
            pytrace=False,
        )
    return subprocess.run([path, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def _ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"promtool {result.args[1:]} failed:\n{result.stdout}\n{result.stderr}"


def test_scrape_config_is_valid_and_loads_the_rules() -> None:
    result = promtool("check", "config", PROMETHEUS_CONFIG.name, cwd=PROMETHEUS_DIR)
    _ok(result)
    assert ALERTS.name in load_yaml(PROMETHEUS_CONFIG)["rule_files"]


def test_alert_rules_are_valid() -> None:
    result = promtool("check", "rules", ALERTS.name, cwd=PROMETHEUS_DIR)
    _ok(result)
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_alert_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", ALERTS_TEST.name, cwd=PROMETHEUS_DIR)
    _ok(result)
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_case_that_fires_and_one_that_does_not() -> None:
    cases = [case for test in load_yaml(ALERTS_TEST)["tests"] for case in test["alert_rule_test"]]
    for rule in alert_rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case.get("exp_alerts") for case in mine), f"no unit test where {rule['alert']} fires"
        assert any(not case.get("exp_alerts") for case in mine), f"no unit test where {rule['alert']} stays quiet"


@pytest.mark.parametrize(
    ("old", "new", "alert"),
    [
        ("> 0.05\n", "> 0.5\n", "EmbedserveHighErrorRatio"),  # a threshold
        ('method="Neighbors"}[5m]))) > 1', 'method="Neighbors"}[5m]))) > 5', "EmbedserveHighLatencyP99"),
        ("and on (job, instance, collection)", "or on (job, instance, collection)", "EmbedserveSnapshotStale"),
        ("== 0\n        for: 5m", "== 0\n        for: 2m", "EmbedserveNotServing"),
    ],
)
def test_the_unit_tests_catch_a_changed_rule(tmp_path: Path, old: str, new: str, alert: str) -> None:
    """The rule tests can fail: each of these edits to a rule makes `promtool test rules` fail on that alert."""
    text = ALERTS.read_text()
    assert text.count(old) == 1, f"{old!r} is no longer in {ALERTS.name}: update this test"
    (tmp_path / ALERTS.name).write_text(text.replace(old, new))
    shutil.copy(ALERTS_TEST, tmp_path / ALERTS_TEST.name)
    assert promtool("check", "rules", ALERTS.name, cwd=tmp_path).returncode == 0
    result = promtool("test", "rules", ALERTS_TEST.name, cwd=tmp_path)
    report = result.stdout + result.stderr
    assert result.returncode != 0 and f"alertname: {alert}" in report, report


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each panel query (Grafana's variables replaced) as a recording rule, so that promtool parses it."""
    queries = dashboard_queries(dashboard())
    rules = [{"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)} for i, (_, expr) in enumerate(queries)]
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", "dashboard.yml", cwd=tmp_path)
    where = "\n".join(f"query_{i}: {w}: {e}" for i, (w, e) in enumerate(queries))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{where}"
