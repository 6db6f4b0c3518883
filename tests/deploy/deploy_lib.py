"""Shared pieces of the deployment tests (tests/deploy/*_test.py).

The tests run under ctest with /usr/bin/python3 (Debian's python3-yaml);
EMOSERVE_BUILD_DIR names the CMake build tree whose binaries they use and
EMOSERVE_SHARED_DIR the shared data folder. Exit status 77 means skipped.
"""

import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKER = REPO / "docker"
SKIP_EXIT_CODE = 77

# Metric families in expressions that the server does not export: scrape
# health and kube-state-metrics.
EXTERNAL_METRICS = {"up", "kube_deployment_status_replicas_available"}


class Failures:
    """Collects check failures so that one run reports all of them."""

    def __init__(self):
        self.messages = []
        self.checks = 0

    def check(self, condition, message):
        self.checks += 1
        if not condition:
            self.messages.append(message)
            print(f"FAIL: {message}", flush=True)
        return condition

    def finish(self, what):
        failed = len(self.messages)
        print(f"{what}: {self.checks - failed} passed, {failed} failed")
        sys.exit(1 if failed else 0)


def skip(reason):
    print(f"SKIP: {reason}", flush=True)
    sys.exit(SKIP_EXIT_CODE)


def log(message):
    print(message, flush=True)


# --- Files -----------------------------------------------------------------


def load_yaml_documents(path):
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def kustomize_resources():
    """Every object the base kustomization lists, from its resource files."""
    kustomization = load_yaml_documents(DEPLOY / "kustomization.yaml")[0]
    objects = []
    for name in kustomization["resources"]:
        objects.extend(load_yaml_documents(DEPLOY / name))
    return kustomization, objects


def find_object(objects, kind, name=None):
    matches = [o for o in objects
               if o.get("kind") == kind and (name is None or o["metadata"]["name"] == name)]
    if len(matches) != 1:
        raise AssertionError(f"expected one {kind} {name or ''}, found {len(matches)}")
    return matches[0]


def configmap_settings():
    """The EMOSERVE_* settings of deploy/configmap.yaml."""
    _, objects = kustomize_resources()
    return find_object(objects, "ConfigMap", "emoserve-config")["data"]


def alert_rule_groups():
    """The rule groups of deploy/prometheus-rules.yaml (a PrometheusRule)."""
    rule = load_yaml_documents(DEPLOY / "prometheus-rules.yaml")[0]
    return rule["spec"]["groups"]


def write_rules_file(directory):
    """The PrometheusRule's groups as a plain Prometheus rules file."""
    path = pathlib.Path(directory) / "emoserve-rules.yaml"
    with open(path, "w") as f:
        yaml.safe_dump({"groups": alert_rule_groups()}, f, sort_keys=False)
    return path


def dashboard():
    with open(DEPLOY / "grafana-dashboard.json") as f:
        return json.load(f)


def dashboard_expressions(board):
    """(panel title, PromQL) for every query of the dashboard and its
    variables."""
    found = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    for variable in board.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            found.append((f"variable {variable['name']}", query["query"]))
    return found


def rule_expressions():
    """(rule name, PromQL) for every recording and alerting rule."""
    return [(r.get("alert") or r.get("record"), r["expr"])
            for group in alert_rule_groups() for r in group["rules"]]


def metric_families(expression):
    """Metric family names an expression selects (histogram series suffixes
    stripped); ignores functions, keywords, labels and recording rules."""
    expression = re.sub(r"\{[^}]*\}", "{}", expression)  # drop label matchers
    expression = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)",
                        "", expression)
    names = set()
    for name in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expression):
        if not (name.startswith("emoserve_") or name in EXTERNAL_METRICS or name.startswith("kube_")):
            continue
        names.add(re.sub(r"_(bucket|sum|count)$", "", name))
    return names


def grafana_to_promql(expression, rate_interval="1m"):
    """A dashboard query with Grafana's variables filled in, for Prometheus.
    Grafana's label_values(metric, label) becomes count by (label) (metric):
    empty unless the metric has that label."""
    expression = re.sub(r"^label_values\((.+),\s*(\w+)\)$", r"count by (\2) (\1)", expression.strip())
    return (expression.replace("$__rate_interval", rate_interval)
            .replace("$__interval", rate_interval)
            .replace("$instance", ".*")
            .replace("$model", ".*"))


def dockerfile_instructions(stage=None):
    """(instruction, arguments) of docker/Dockerfile, continuation lines
    joined; only those of `stage` (its FROM ... AS name) when given."""
    text = (DOCKER / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    instructions = []
    current_stage = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, arguments = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.search(r"\bAS\s+(\S+)", arguments, re.IGNORECASE)
            current_stage = match.group(1) if match else None
        if stage is None or current_stage == stage:
            instructions.append((keyword, " ".join(arguments.split())))
    return instructions


# --- The built binaries -------------------------------------------------------


def build_dir():
    configured = os.environ.get("EMOSERVE_BUILD_DIR")
    return pathlib.Path(configured) if configured else REPO / "build" / "release"


def built_binary(relative_path):
    """A binary of the build tree, or None when it has not been built."""
    path = build_dir() / relative_path
    return path if path.is_file() and os.access(path, os.X_OK) else None


def server_binary():
    return built_binary("server/emoserve-server")


def cli_binary():
    return built_binary("client/emoserve")


def server_options(server):
    """(flags, environment variables) that `emoserve-server --help` lists."""
    result = subprocess.run([str(server), "--help"], capture_output=True, text=True,
                            timeout=60)
    if result.returncode != 0:
        raise AssertionError(f"{server} --help exited {result.returncode}: {result.stderr}")
    text = result.stdout + result.stderr
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))
    variables = set(re.findall(r"\bEMOSERVE_[A-Z0-9_]+\b", text))
    return flags, variables


def shared_dir():
    configured = os.environ.get("EMOSERVE_SHARED_DIR", str(REPO.parent / "shared"))
    return pathlib.Path(configured) if os.path.isdir(configured) else None


def sample_clip():
    """A RAVDESS speech clip from the shared folder, or None without it."""
    shared = shared_dir()
    if shared is None:
        return None
    clips = sorted((shared / "datasets" / "ravdess").glob("Actor_*/*"))
    clips = [c for c in clips if c.suffix in (".wav", ".flac")]
    return clips[0] if clips else None


def bundled_model():
    """models/default when it holds a model, else None."""
    directory = REPO / "models" / "default"
    return directory if (directory / "model.pt").is_file() and (directory / "model.json").is_file() else None


def model_dir(scratch):
    """The bundled model, else a fresh one written by write_test_model into
    `scratch`; None when neither is available."""
    bundled = bundled_model()
    if bundled is not None:
        return bundled
    writer = built_binary("tests/write_test_model")
    if writer is None:
        return None
    target = pathlib.Path(scratch) / "model"
    subprocess.run([str(writer), "--small", str(target)], check=True, timeout=300)
    return target


# --- Processes -----------------------------------------------------------------


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout, what, process=None):
    """Polls `predicate` until it returns a true value; raises on timeout or
    when `process` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {process.returncode} first")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.25)


def http_get(url, timeout=5):
    """The body of a GET, or None when it fails."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def cli_health(cli, address, env=None):
    """True when `emoserve health` says the server at `address` is SERVING."""
    result = subprocess.run([str(cli), "health", "--server", address, "--quiet"],
                            capture_output=True, text=True, timeout=30, env=env)
    return result.returncode == 0


def cli_classify(cli, address, clip):
    """The JSON answer of `emoserve classify` for one clip."""
    result = subprocess.run([str(cli), "classify", "--server", address, "--output", "json",
                             str(clip)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise AssertionError(f"emoserve classify exited {result.returncode}: {result.stderr}")
    return json.loads(result.stdout)


def stop_process(process, timeout=30):
    """SIGTERM, then SIGKILL after `timeout`; returns the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@contextlib.contextmanager
def scratch_dir(prefix):
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        yield pathlib.Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)
