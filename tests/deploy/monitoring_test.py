#!/usr/bin/python3
"""The monitoring files: deploy/prometheus-rules.yaml passes `promtool check
rules` and the alert unit tests (alerts_test.yaml), docker/prometheus.yml
passes `promtool check config`, and the Grafana dashboard is well formed and
shows what an operator needs (throughput, latency percentiles, batch sizes,
queue depth, errors). prometheus_scrape_test.py runs the same expressions
against a real server."""

import json
import pathlib
import re
import shutil
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import deploy_lib as lib  # noqa: E402
import yaml  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
# The families the server labels with model and version.
MODEL_LABELLED = {"emoserve_requests_total", "emoserve_request_duration_seconds",
                  "emoserve_queue_wait_seconds", "emoserve_feature_extraction_seconds",
                  "emoserve_inference_seconds", "emoserve_batch_size", "emoserve_queue_depth"}

promtool = shutil.which("promtool")
if promtool is None:
    lib.skip("promtool (Debian package prometheus) is not installed: scripts/install-deps.sh")

failures = lib.Failures()
check = failures.check


def run_promtool(*args, cwd=None):
    result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    output = (result.stdout + result.stderr).strip()
    lib.log(f"promtool {' '.join(args)}: exit {result.returncode}\n{output}")
    return result.returncode == 0


with lib.scratch_dir("emoserve-rules-") as scratch:
    rules = lib.write_rules_file(scratch)
    check(run_promtool("check", "rules", str(rules)), "promtool check rules failed")
    unit_tests = yaml.safe_load((HERE / "alerts_test.yaml").read_text())
    unit_tests["rule_files"] = [rules.name]
    (scratch / "alerts_test.yaml").write_text(yaml.safe_dump(unit_tests, sort_keys=False))
    check(run_promtool("test", "rules", "alerts_test.yaml", cwd=scratch), "promtool test rules failed")
check(run_promtool("check", "config", str(lib.DOCKER / "prometheus.yml")),
      "promtool check config docker/prometheus.yml failed")

# Every alert is unit-tested both firing and quiet.
alerts = {r["alert"] for g in lib.alert_rule_groups() for r in g["rules"] if "alert" in r}
check({"EmoserveHighErrorRatio", "EmoserveHighLatencyP99", "EmoserveQueueSaturated",
       "EmoserveNoPodsReady"} <= alerts, f"alerts missing: {sorted(alerts)}")
fired, quiet = set(), set()
for case in yaml.safe_load((HERE / "alerts_test.yaml").read_text())["tests"]:
    for expectation in case.get("alert_rule_test", []):
        (fired if expectation["exp_alerts"] else quiet).add(expectation["alertname"])
check(alerts <= fired, f"alerts never shown firing in alerts_test.yaml: {sorted(alerts - fired)}")
check(alerts <= quiet, f"alerts never shown quiet in alerts_test.yaml: {sorted(alerts - quiet)}")
for group in lib.alert_rule_groups():
    for rule in group["rules"]:
        if "alert" in rule:
            check(rule.get("labels", {}).get("severity") in ("warning", "critical"),
                  f"{rule['alert']} has no severity")
            check({"summary", "description"} <= rule.get("annotations", {}).keys(),
                  f"{rule['alert']} lacks a summary or description")

# --- The dashboard ----------------------------------------------------------------
board = lib.dashboard()
check(board.get("uid") == "emoserve" and board.get("title"), "dashboard without a stable uid and title")
variables = {v["name"]: v for v in board.get("templating", {}).get("list", [])}
check(variables.get("datasource", {}).get("type") == "datasource"
      and variables["datasource"].get("query") == "prometheus",
      "dashboard has no Prometheus datasource variable (it must not hard-code a datasource)")
panels = [p for p in board["panels"] if p["type"] != "row"]
ids = [p["id"] for p in board["panels"]]
check(len(ids) == len(set(ids)), "panel ids repeat")
cells = set()
for panel in panels:
    check(panel.get("datasource", {}).get("uid") == "${datasource}",
          f"panel {panel['title']} does not use the datasource variable")
    check(panel.get("targets"), f"panel {panel['title']} has no query")
    position = panel["gridPos"]
    check(position["x"] + position["w"] <= 24, f"panel {panel['title']} is wider than the grid")
    area = {(x, y) for x in range(position["x"], position["x"] + position["w"])
            for y in range(position["y"], position["y"] + position["h"])}
    check(not (area & cells), f"panel {panel['title']} overlaps another")
    cells |= area
    for target in panel.get("targets", []):
        expression = target["expr"]
        check(expression.count("(") == expression.count(")") and expression.count("{") == expression.count("}"),
              f"unbalanced query in {panel['title']}: {expression}")
        if "emoserve_" in expression:
            check('instance=~"$instance"' in expression, f"{panel['title']} ignores the instance filter")
        # Families labelled by model version follow the model selector.
        for family in lib.metric_families(expression) & MODEL_LABELLED:
            check(re.search(family + r'(_bucket|_sum|_count)?\{[^}]*model=~"\$model"', expression),
                  f"{panel['title']}: {family} ignores the model selector")

# What the issue asks the dashboard to show, by metric family.
families = set()
for _, expression in lib.dashboard_expressions(board):
    families |= lib.metric_families(expression)
for needed, what in [("emoserve_requests_total", "throughput and errors"),
                     ("emoserve_request_duration_seconds", "latency percentiles"),
                     ("emoserve_batch_size", "batch sizes"),
                     ("emoserve_queue_depth", "queue depth")]:
    check(needed in families, f"the dashboard does not show {what} ({needed})")
all_expressions = " ".join(e for _, e in lib.dashboard_expressions(board))
for quantile in ("0.5", "0.9", "0.99"):
    check(f"histogram_quantile({quantile}," in all_expressions, f"no p{quantile} latency on the dashboard")
check('code!="OK"' in all_expressions, "the dashboard does not break errors down by code")
json.dumps(board)  # Serialisable as Grafana's API would need it.

failures.finish("monitoring")
