#!/usr/bin/python3
"""A real Prometheus (Debian's) scrapes a real emoserve-server, both on
loopback with random ports, with the alert rules of deploy/ loaded. After a
classification through the CLI, PromQL over the HTTP API must see it; every
query of the Grafana dashboard and every rule must evaluate, on metric
families the server really exports; the rules must load and evaluate without
error, and the server must exit 0 on SIGTERM."""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import wave

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import deploy_lib as lib  # noqa: E402
import yaml  # noqa: E402

prometheus_binary = shutil.which("prometheus")
if prometheus_binary is None:
    lib.skip("prometheus (Debian package) is not installed: scripts/install-deps.sh")
server, cli = lib.server_binary(), lib.cli_binary()
if server is None or cli is None:
    lib.skip(f"emoserve-server or emoserve not built in {lib.build_dir()}")

failures = lib.Failures()
check = failures.check


def query(prometheus_url, expression):
    """The HTTP API's answer to an instant query (the decoded JSON)."""
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read().decode())
    except urllib.error.HTTPError as error:  # 400 for a bad expression, with its error
        return json.loads(error.read().decode())
    except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
        return {"status": "error", "error": str(error)}


def query_value(prometheus_url, expression):
    """The single value of a query that returns one sample, else None."""
    answer = query(prometheus_url, expression)
    result = answer.get("data", {}).get("result", [])
    return float(result[0]["value"][1]) if answer.get("status") == "success" and len(result) == 1 else None


def write_tone(path, seconds=3.0, rate=16000):
    """A 220 Hz tone at -12 dBFS, loud enough to pass the voice-activity gate,
    for when the shared RAVDESS clips are absent (this test is about metrics,
    not accuracy)."""
    frames = bytearray()
    for i in range(int(seconds * rate)):
        value = int(0.25 * 32767 * math.sin(2 * math.pi * 220 * i / rate))
        frames += value.to_bytes(2, "little", signed=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(bytes(frames))
    return path


def exported_families(metrics_text):
    return {line.split()[2] for line in metrics_text.splitlines() if line.startswith("# TYPE ")}


with lib.scratch_dir("emoserve-prometheus-") as scratch:
    model = lib.model_dir(scratch)
    if model is None:
        lib.skip("no model: models/default/model.pt is absent and tests/write_test_model is not built")
    model_config = json.loads((model / "model.json").read_text())
    clip = lib.sample_clip() or write_tone(scratch / "tone.wav")
    lib.log(f"model {model}, clip {clip}")

    grpc_port, metrics_port, prometheus_port = lib.free_port(), lib.free_port(), lib.free_port()
    address = f"127.0.0.1:{grpc_port}"
    # The flags, not inherited EMOSERVE_* variables, decide.
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMOSERVE_")}
    server_log = open(scratch / "server.log", "w")
    server_process = subprocess.Popen(
        [str(server), "--host", "127.0.0.1", "--port", str(grpc_port), "--metrics-port", str(metrics_port),
         "--http-port", "0", "--model", str(model), "--torch-threads", "1", "--feature-threads", "1", "--grace-seconds", "5"],
        stdout=server_log, stderr=subprocess.STDOUT, env=env, cwd=scratch)
    prometheus_process = None
    try:
        lib.wait_until(lambda: lib.cli_health(cli, address, env), 180, "server SERVING", server_process)
        classified = lib.cli_classify(cli, address, clip)
        result = classified[0] if isinstance(classified, list) else classified["results"][0]
        check(result.get("ok") and result.get("top_label") in model_config["labels"],
              f"classification failed or unknown label: {result}")
        clip_seconds = result.get("duration_seconds", 0.0)

        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(lib.write_rules_file(scratch))],
            "scrape_configs": [{"job_name": "emoserve",
                                "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
        }
        (scratch / "prometheus.yml").write_text(yaml.safe_dump(config))
        prometheus_log = open(scratch / "prometheus.log", "w")
        prometheus_process = subprocess.Popen(
            [prometheus_binary, f"--config.file={scratch / 'prometheus.yml'}",
             f"--storage.tsdb.path={scratch / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prometheus_port}"],
            stdout=prometheus_log, stderr=subprocess.STDOUT, cwd=scratch)
        url = f"http://127.0.0.1:{prometheus_port}"
        lib.wait_until(lambda: lib.http_get(f"{url}/-/ready") is not None, 60, "Prometheus ready",
                       prometheus_process)

        # The scrape: the model's identity and our classification.
        info = lib.wait_until(lambda: query(url, "emoserve_model_info")["data"]["result"], 60,
                              "emoserve_model_info scraped", prometheus_process)
        labels = info[0]["metric"] if len(info) == 1 else {}
        check(labels.get("name") == model_config["name"] and labels.get("version") == model_config["version"]
              and labels.get("device") == "cpu" and labels.get("job") == "emoserve"
              and info[0]["value"][1] == "1", f"emoserve_model_info is {info}")
        ok_calls = query_value(url, 'sum(emoserve_requests_total{method="Classify",code="OK"})')
        check(ok_calls == 1, f"Prometheus counts {ok_calls} OK Classify calls, not 1")
        audio = query_value(url, "sum(emoserve_audio_seconds_total)")
        check(audio is not None and abs(audio - clip_seconds) < 0.05,
              f"emoserve_audio_seconds_total {audio}, the clip lasts {clip_seconds} s")
        for family in ("emoserve_request_duration_seconds", "emoserve_batch_size", "emoserve_inference_seconds"):
            count = query_value(url, f"sum({family}_count)")
            check(count is not None and count >= 1, f"{family}_count is {count} after a classification")
        up = query_value(url, 'up{job="emoserve"}')
        check(up == 1, f'up{{job="emoserve"}} is {up}')

        # Everything the dashboard and the rules ask for exists and evaluates.
        exported = exported_families(lib.http_get(f"http://127.0.0.1:{metrics_port}/metrics") or "")
        lib.log(f"the server exports {len(exported)} families: {sorted(exported)}")
        expressions = ([(t, lib.grafana_to_promql(e)) for t, e in lib.dashboard_expressions(lib.dashboard())]
                       + lib.rule_expressions())
        for title, expression in expressions:
            for family in lib.metric_families(expression) - lib.EXTERNAL_METRICS:
                check(family in exported, f"{title}: {family} is not exported by emoserve-server")
            answer = query(url, expression)
            check(answer.get("status") == "success", f"{title}: {expression} -> {answer.get('error')}")
            if title.startswith("variable "):
                check(answer.get("data", {}).get("result"), f"dashboard {title} finds no values: {expression}")
        check(query(url, 'histogram_quantile(0.99, sum by (le) (rate(emoserve_request_duration_seconds_bucket'
                    '{method="Classify"}[1m])))')["status"] == "success", "latency quantile query failed")

        # The rules load and evaluate cleanly; with the server up, no target
        # alert fires.
        def evaluated_rules():
            groups = json.loads(lib.http_get(f"{url}/api/v1/rules"))["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return rules if rules and all(r.get("lastEvaluation", "").startswith("2") and
                                          not r["lastEvaluation"].startswith("0001") for r in rules) else None
        rules = lib.wait_until(evaluated_rules, 30, "rules evaluated", prometheus_process)
        check(len(rules) == len(lib.rule_expressions()), f"Prometheus loaded {len(rules)} rules")
        for rule in rules:
            check(rule["health"] == "ok", f"rule {rule['name']} health {rule['health']}: {rule.get('lastError')}")
        # With the server up, no alert stays active (the first evaluation may
        # precede the first scrape, so EmoserveTargetsDown may be pending
        # briefly).
        def quiet():
            return not query(url, "ALERTS")["data"]["result"]
        try:
            lib.wait_until(quiet, 20, "no active alerts", prometheus_process)
        except AssertionError as error:
            check(False, f"{error}: {query(url, 'ALERTS')['data']['result']}")

        exit_code = lib.stop_process(server_process, timeout=30)
        check(exit_code == 0, f"emoserve-server exited {exit_code} on SIGTERM")
    except AssertionError as error:
        check(False, str(error))
    finally:
        lib.stop_process(server_process)
        if prometheus_process is not None:
            lib.stop_process(prometheus_process)
        if failures.messages:
            for log_name in ("server.log", "prometheus.log"):
                path = scratch / log_name
                if path.exists():
                    lib.log(f"--- {log_name} (tail)\n" + "\n".join(path.read_text().splitlines()[-30:]))

failures.finish("prometheus scrape")
