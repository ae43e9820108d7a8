"""The monitoring kit in etc/: Prometheus config and alerts, the Grafana dashboard, the unit.

promtool validates and unit-tests the rules; the static checks tie every metric the kit
queries to agentd's registry, every alert to a test and a runbook section, and the systemd
unit to the drain it has to wait for.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentd.cli import beyond_loopback
from agentd.config import ServerConfig
from agentd.metrics import REGISTRY

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS = REPO / "etc" / "prometheus"
DASHBOARD = REPO / "etc" / "grafana" / "agentd.json"
UNIT = REPO / "etc" / "systemd" / "agentd.service"
OPERATIONS = REPO / "docs" / "operations.md"
EXAMPLE_CONFIG = REPO / "etc" / "agentd.toml"

PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed (Debian package: prometheus)")
    return subprocess.run(
        [binary, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60
    )


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(PROMETHEUS / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    flat = []
    for panel in board["panels"]:
        flat.append(panel)
        flat.extend(panel.get("panels", []))
    return flat


def metric_names(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects (not functions, labels or keywords)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    words = re.findall(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()", expr)
    return {word for word in words if word.lower() not in PROMQL_WORDS}


def dashboard_expressions(board: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        query = variable["query"]["query"]
        match = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
        assert match, f"variable {variable['name']}: unexpected query {query!r}"
        exprs.append(match.group(1))
    return exprs


def agentd_names(names: set[str]) -> set[str]:
    """Drop what agentd does not export: redis_exporter's metrics and Prometheus' ``up``."""
    return {name for name in names if name != "up" and not name.startswith("redis_")}


def registry_names() -> tuple[set[str], set[str]]:
    """(names a scrape of agentd can show, the histograms among them)."""
    names: set[str] = set()
    histograms: set[str] = set()
    for family in REGISTRY.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        else:
            names.add(family.name)
        if family.type == "histogram":
            histograms.add(family.name)
    return names, histograms


def undefined(referenced: set[str]) -> set[str]:
    names, histograms = registry_names()
    missing = set()
    for name in referenced:
        base = re.sub(r"_(?:bucket|sum|count)$", "", name)
        if name not in names and base not in histograms:
            missing.add(name)
    return missing


def github_anchors(markdown: str) -> set[str]:
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_prometheus_config_is_valid() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_alert_rules_are_valid() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_alert_unit_tests_pass() -> None:
    result = promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_plans_checklist_is_covered_by_alerts() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    assert {
        "AgentdDown",
        "AgentdHighErrorRate",
        "AgentdQueryLatencyHigh",
        "RedisMemoryNearLimit",
        "AgentdSSHConnectFailures",
        "AgentdRateLimiterDegraded",
        "AgentdUsageSpoolGrowing",
    } <= names


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    cases = [
        case
        for test in load_yaml(PROMETHEUS / "alerts.test.yml")["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown staying quiet"
    assert (firing | quiet) - names == set(), "tests for alerts that do not exist"


def test_every_alert_has_severity_summary_and_a_runbook_section() -> None:
    anchors = github_anchors(OPERATIONS.read_text())
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name
        assert rule["annotations"]["description"], name
        assert rule["annotations"]["runbook_url"] == f"docs/operations.md#{name.lower()}", name
        assert name.lower() in anchors, f"docs/operations.md has no section {name}"


def test_alerts_query_only_metrics_agentd_defines() -> None:
    referenced = set().union(*(metric_names(rule["expr"]) for rule in alert_rules()))
    assert {"agent_query_duration_seconds_bucket", "agentd_ratelimit_degraded"} <= referenced
    assert undefined(agentd_names(referenced)) == set()


def test_dashboard_queries_only_metrics_agentd_defines() -> None:
    referenced = set().union(*(metric_names(e) for e in dashboard_expressions(dashboard())))
    assert undefined(agentd_names(referenced)) == set()


def test_dashboard_shows_every_agentd_metric() -> None:
    referenced = set().union(*(metric_names(e) for e in dashboard_expressions(dashboard())))
    bases = {re.sub(r"_(?:bucket|sum|count)$", "", name) for name in referenced}
    names, _ = registry_names()
    ours = {name for name in names if name.startswith(("agent_", "agentd_"))}
    assert ours - bases == set()


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            "histogram_quantile(0.95, sum by (agent, le) (rate("
            'agent_query_duration_seconds_bucket{job="agentd", le=~"1|5"}[$__rate_interval])))',
            {"agent_query_duration_seconds_bucket"},
        ),
        (
            "a_total / on (job) group_left (instance) b_total offset 15m"
            ' > 1e3 and bool c unless d{x="and"}',
            {"a_total", "b_total", "c", "d"},
        ),
        ("sum(rate(agentd_typo_total[5m])) * 3600", {"agentd_typo_total"}),
    ],
)
def test_metric_name_extraction(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_a_misspelt_metric_is_reported_undefined() -> None:
    assert undefined({"agentd_queries_totl", "agentd_queries_total"}) == {"agentd_queries_totl"}
    assert undefined({"agentd_ssh_connect_seconds_count", "agentd_sessions_count"}) == {
        "agentd_sessions_count"
    }


def test_dashboard_is_a_grafana_import_with_a_prometheus_input() -> None:
    board = dashboard()
    assert board["uid"] == "agentd" and board["title"]
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    assert board["__inputs"][0]["pluginId"] == "prometheus"
    datasource = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        position = panel["gridPos"]
        assert 0 <= position["x"] and position["x"] + position["w"] <= 24, panel["title"]
        assert panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat"), panel["title"]
        assert panel["datasource"] == datasource, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == datasource, panel["title"]
            assert target["expr"].strip(), panel["title"]
    for variable in board["templating"]["list"]:
        assert variable["datasource"] == datasource


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    grafana_variables = {"$__rate_interval": "5m", "$instance": ".*", "$agent": ".*"}
    rules = []
    for i, expr in enumerate(dashboard_expressions(dashboard())):
        for variable, value in grafana_variables.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_dashboard_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in panels(dashboard()):
        p = panel["gridPos"]
        cells = {
            (x, y) for x in range(p["x"], p["x"] + p["w"]) for y in range(p["y"], p["y"] + p["h"])
        }
        assert not cells & taken, panel["title"]
        taken |= cells


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_systemd_unit_runs_twistd_in_the_foreground_hardened() -> None:
    settings = unit_settings()
    [exec_start] = settings["ExecStart"]
    assert exec_start.endswith(
        "/twistd --nodaemon --pidfile= agentd --config /etc/agentd/agentd.toml"
    )
    assert settings["User"] != ["root"] and settings["User"]
    assert settings["KillSignal"] == ["SIGTERM"]
    # The drain, then up to 10 s to end agents and 5 s to flush the usage spool.
    assert seconds(settings["TimeoutStopSec"][0]) > ServerConfig().drain_seconds + 15
    for key, value in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("PrivateTmp", "yes"),
        ("Restart", "on-failure"),
    ]:
        assert settings[key] == [value], key
    assert settings["ReadWritePaths"] == ["/var/lib/agentd"]
    assert settings["EnvironmentFile"] == ["/etc/agentd/agentd.env"]


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart exists; point it at this environment's twistd.
    twistd = Path(sys.executable).parent / "twistd"
    unit = tmp_path / "agentd.service"
    unit.write_text(UNIT.read_text().replace("/opt/agentd/bin/twistd", str(twistd)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "agentd.service" in line] == []


def test_the_example_config_serves_metrics_on_loopback_at_the_scraped_port() -> None:
    endpoints = tomllib.loads(EXAMPLE_CONFIG.read_text())["server"]["metrics_listen"]
    assert endpoints
    assert not any(beyond_loopback(endpoint) for endpoint in endpoints)
    [job] = [
        j
        for j in load_yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"]
        if j["job_name"] == "agentd"
    ]
    scraped = {t.rsplit(":", 1)[1] for c in job["static_configs"] for t in c["targets"]}
    assert {endpoint.split(":")[1] for endpoint in endpoints} == scraped
