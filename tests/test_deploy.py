"""The files of deploy/ and grafana/ as their tools check them: promtool, amtool, and the dashboards' generator."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import tool
from nstap.detect.kernel_drops import QUIET_REASONS

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "nstap-rules.yml"
CONTAINER_LABELS = {"container", "container_id", "runtime"}


def run(*argv: str, cwd: Path) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_rules_are_valid_and_every_rule_is_unit_tested_firing_and_not() -> None:
    assert "SUCCESS: 17 rules found" in run(tool("promtool"), "check", "rules", RULES.name, cwd=PROM)
    assert "SUCCESS" in run(tool("promtool"), "test", "rules", "nstap-rules.test.yml", cwd=PROM)
    tests = yaml.safe_load((PROM / "nstap-rules.test.yml").read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    for rule in rules():
        name = rule["alert"]
        assert any(c["alertname"] == name and c["exp_alerts"] for c in cases), f"{name}: no test where it fires"
        assert any(c["alertname"] == name and not c["exp_alerts"] for c in cases), f"{name}: no test where it stays quiet"


def on_hosts(test_file: dict, hosts: tuple[str, ...]) -> dict:
    """The rules' unit tests again with every input series on each of ``hosts`` (label host, as
    the Prometheus agent of each host adds it) and the same instance on all of them: every alert
    expected once per host, with the host in its labels and in its dashboard link."""
    out = {**test_file, "tests": []}
    for group in test_file["tests"]:
        series = []
        for s in group.get("input_series", []):
            name, brace, rest = s["series"].partition("{")
            for h in hosts:
                labelled = f'{name}{{host="{h}",{rest}' if brace else f'{name}{{host="{h}"}}'
                series.append({**s, "series": labelled})
        cases = []
        for case in group.get("alert_rule_test", []):
            expected = []
            for alert in case["exp_alerts"]:
                for h in hosts:
                    annotations = dict(alert.get("exp_annotations", {}))
                    if "dashboard" in annotations:
                        annotations["dashboard"] += f"&var-host={h}"
                    expected.append({**alert, "exp_labels": {**alert["exp_labels"], "host": h}, "exp_annotations": annotations})
            cases.append({**case, "exp_alerts": expected})
        out["tests"].append({**group, "input_series": series, "alert_rule_test": cases})
    return out


def test_rules_keep_hosts_apart_in_a_fleet(tmp_path: Path) -> None:
    tests = yaml.safe_load((PROM / "nstap-rules.test.yml").read_text())
    fleet = on_hosts(tests, ("node-a", "node-b"))
    (tmp_path / "nstap-rules.yml").write_text(RULES.read_text())
    (tmp_path / "fleet.test.yml").write_text(yaml.safe_dump(fleet, sort_keys=False))
    assert "SUCCESS" in run(tool("promtool"), "test", "rules", "fleet.test.yml", cwd=tmp_path)
    # and the same test fails on rules that aggregate the hosts away
    (tmp_path / "nstap-rules.yml").write_text(RULES.read_text().replace("by (host, instance", "by (instance"))
    proc = subprocess.run([tool("promtool"), "test", "rules", "fleet.test.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0 and "NstapContainerAnomaly" in proc.stdout + proc.stderr


def test_container_alerts_carry_what_the_webhook_needs() -> None:
    tests = yaml.safe_load((PROM / "nstap-rules.test.yml").read_text())["tests"]
    fired = {c["alertname"]: c["exp_alerts"][0] for t in tests for c in t.get("alert_rule_test", []) if c["exp_alerts"]}
    for rule in rules():
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        if rule["labels"]["scope"] == "container":
            expected = fired[rule["alert"]]
            assert CONTAINER_LABELS <= set(expected["exp_labels"]), rule["alert"]  # promtool checked they are there
            assert "/d/nstap-container/" in expected["exp_annotations"]["dashboard"], rule["alert"]


def test_kernel_drop_rule_leaves_out_the_detectors_quiet_reasons() -> None:
    expr = next(r["expr"] for r in rules() if r["alert"] == "NstapContainerKernelDrops")
    quiet = re.search(r'reason!~"([^"]+)"', expr).group(1).split("|")
    assert sorted(quiet) == sorted(QUIET_REASONS)


def test_scrape_config_and_alertmanager_example_are_valid() -> None:
    assert "SUCCESS" in run(tool("promtool"), "check", "config", "prometheus.yml", cwd=PROM)
    am = ROOT / "deploy" / "alertmanager"
    out = run(tool("amtool"), "check-config", "alertmanager.yml", cwd=am)
    assert "SUCCESS" in out and "1 inhibit rules" in out
    config = yaml.safe_load((am / "alertmanager.yml").read_text())
    capture = next(r for r in config["route"]["routes"] if r["receiver"] == "nstap-capture")
    assert capture["matchers"] == ['scope="container"'] and capture["group_by"] == ["instance", "container_id"]
    hook = next(r for r in config["receivers"] if r["name"] == "nstap-capture")["webhook_configs"][0]
    assert hook["url"].endswith("/api/v1/alertmanager") and hook["http_config"]["authorization"]["credentials_file"]
    inhibit = config["inhibit_rules"][0]
    assert inhibit["source_matchers"] == ['alertname="NstapDown"'] and inhibit["equal"] == ["instance"]


def test_committed_dashboards_are_what_the_code_generates(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "grafana" / "dashboards.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # and --check does fail on a difference
    out = tmp_path / "d"
    subprocess.run([sys.executable, str(ROOT / "grafana" / "dashboards.py"), "--out", str(out)], check=True)
    (out / "nstap-host.json").write_text((out / "nstap-host.json").read_text().replace("topk(10", "topk(11", 1))
    proc = subprocess.run([sys.executable, str(ROOT / "grafana" / "dashboards.py"), "--check", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 1 and "nstap-host.json" in proc.stderr
    for name in ("nstap-host.json", "nstap-container.json"):
        board = json.loads((ROOT / "grafana" / "dashboards" / name).read_text())
        assert board["uid"] in ("nstap-host", "nstap-container") and board["panels"]
    drill = json.loads((ROOT / "grafana" / "dashboards" / "nstap-container.json").read_text())
    names = [v["name"] for v in drill["templating"]["list"]]
    assert {"instance", "container"} <= set(names)
    captures = next(p for p in drill["panels"] if p.get("title") == "Captures")
    assert captures["fieldConfig"]["defaults"]["links"][0]["url"] == "${nstap_ui}/ui/captures/${__data.fields.capture_id}"


def dashboard_exprs(board: dict) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets, annotations, variable queries."""
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", []) if "expr" in t]
    exprs += [a["expr"] for a in board.get("annotations", {}).get("list", []) if "expr" in a]
    return exprs


def test_dashboards_select_and_keep_the_host() -> None:
    for name in ("nstap-host.json", "nstap-container.json"):
        board = json.loads((ROOT / "grafana" / "dashboards" / name).read_text())
        host = next(v for v in board["templating"]["list"] if v["name"] == "host")
        assert host["includeAll"] and host["allValue"] == ".*", name  # one host: All matches series without the label
        for expr in dashboard_exprs(board):
            assert 'host=~"$host"' in expr, (name, expr)
            for clause in re.findall(r"by \(([^)]*)\)", expr):
                assert "host" in clause.split(", "), (name, expr)  # no panel merges hosts


def test_fleet_configs_are_valid() -> None:
    assert "SUCCESS" in run(tool("promtool"), "check", "config", "--agent", "prometheus-agent.yml", cwd=PROM)
    agent = yaml.safe_load((PROM / "prometheus-agent.yml").read_text())
    assert agent["global"]["external_labels"]["host"] and agent["remote_write"][0]["url"].endswith("/api/v1/write")
    assert "SUCCESS: 17 rules found" in run(tool("promtool"), "check", "config", "prometheus-central.yml", cwd=PROM)
    # vmalert (VictoriaMetrics' rule evaluator) parses the same rules as MetricsQL and their templates
    proc = subprocess.run([tool("vmalert"), "-rule=nstap-rules.yml", "-dryRun"], cwd=PROM, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "invalid" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
