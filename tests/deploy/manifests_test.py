#!/usr/bin/python3
"""Checks deploy/ (Kustomize base), docker/Dockerfile and docker/compose.yaml
for what makes a deployment work: selectors that match, probes and ports on
the server's real ports, resources, security, settings that the server
accepts (from `emoserve-server --help` of the built binary) and values that
must agree across files."""

import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import deploy_lib as lib  # noqa: E402
import yaml  # noqa: E402

failures = lib.Failures()
check = failures.check


def cpu_cores(quantity):
    quantity = str(quantity)
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def memory_bytes(quantity):
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]i?)?", str(quantity))
    if not match:
        raise AssertionError(f"bad memory quantity {quantity}")
    return float(match.group(1)) * units.get(match.group(2) or "", 1)


def is_subset(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def dockerfile_env(stage):
    """ENV of a Dockerfile stage as a dict (KEY=VALUE form)."""
    env = {}
    for keyword, arguments in lib.dockerfile_instructions(stage):
        if keyword == "ENV":
            env.update(pair.split("=", 1) for pair in arguments.split())
    return env


kustomization, objects = lib.kustomize_resources()
deployment = lib.find_object(objects, "Deployment", "emoserve")
service = lib.find_object(objects, "Service", "emoserve")
hpa = lib.find_object(objects, "HorizontalPodAutoscaler", "emoserve")
pdb = lib.find_object(objects, "PodDisruptionBudget", "emoserve")
monitor = lib.find_object(objects, "ServiceMonitor", "emoserve")
configmap = lib.find_object(objects, "ConfigMap", "emoserve-config")
lib.find_object(objects, "PrometheusRule", "emoserve")
settings = configmap["data"]

for obj in objects:
    check(obj.get("apiVersion") and obj.get("kind") and obj.get("metadata", {}).get("name"),
          f"object without apiVersion/kind/name: {obj}")

# --- Labels and selectors -------------------------------------------------------
pod_spec = deployment["spec"]["template"]["spec"]
pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
check(is_subset(deployment["spec"]["selector"]["matchLabels"], pod_labels),
      "Deployment selector does not match its pod template's labels")
check(is_subset(service["spec"]["selector"], pod_labels),
      "Service selector does not match the pods")
check(is_subset(pdb["spec"]["selector"]["matchLabels"], pod_labels),
      "PodDisruptionBudget selector does not match the pods")
check(is_subset(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"]),
      "ServiceMonitor selector does not match the Service's labels")
check(hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                         "name": deployment["metadata"]["name"]},
      "HPA does not target the Deployment")
check("replicas" not in deployment["spec"],
      "Deployment sets replicas: every apply would fight the HPA")
check(hpa["spec"]["minReplicas"] >= 2, "HPA minReplicas < 2: a single pod has no redundancy")
check(hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"], "HPA cannot scale")
hpa_metrics = [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
check("cpu" in hpa_metrics, "HPA does not scale on CPU")
check("maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"], "PDB sets no budget")
if "minAvailable" in pdb["spec"]:
    check(pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"],
          "PDB minAvailable >= minReplicas: a drain can never proceed")

# --- Container, ports and probes -----------------------------------------------------
containers = pod_spec["containers"]
check(len(containers) == 1, "expected one container")
container = containers[0]
ports = {p["name"]: p["containerPort"] for p in container["ports"]}
grpc_port = int(settings["EMOSERVE_PORT"])
metrics_port = int(settings["EMOSERVE_METRICS_PORT"])
check(ports.get("grpc") == grpc_port, f"container port grpc {ports.get('grpc')} != EMOSERVE_PORT {grpc_port}")
check(ports.get("metrics") == metrics_port,
      f"container port metrics {ports.get('metrics')} != EMOSERVE_METRICS_PORT {metrics_port}")
http_port = int(settings["EMOSERVE_HTTP_PORT"])
check(ports.get("http") == http_port,
      f"container port http {ports.get('http')} != EMOSERVE_HTTP_PORT {http_port}")
check(settings.get("EMOSERVE_HOST") == "0.0.0.0",
      "the server must listen on all interfaces in a pod (EMOSERVE_HOST)")
for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
    probe = container.get(probe_name)
    if not check(probe is not None, f"{probe_name} missing"):
        continue
    grpc = probe.get("grpc")
    if check(grpc is not None, f"{probe_name} is not a native gRPC probe"):
        check(grpc.get("port") == grpc_port, f"{probe_name} on port {grpc.get('port')}, not {grpc_port}")
        check(grpc.get("service", "") == "", f"{probe_name} asks for a named service, not \"\"")
check("EMOSERVE_TLS_CERT" not in settings,
      "TLS on the gRPC port breaks Kubernetes' gRPC probes (they speak plaintext)")
liveness = container["livenessProbe"]
check(liveness["periodSeconds"] * liveness["failureThreshold"] >= 20,
      "liveness gives up within 20 s: a busy pod would be restarted")

service_ports = {p["name"]: p for p in service["spec"]["ports"]}
check(service["spec"].get("clusterIP") == "None",
      "Service is not headless: gRPC clients could not balance across pods")
for name in ("grpc", "metrics", "http"):
    port = service_ports.get(name)
    if check(port is not None, f"Service has no {name} port"):
        check(port["targetPort"] in (name, ports.get(name)), f"Service port {name} targets {port['targetPort']}")
        check(port["port"] == ports.get(name), f"Service port {name} is {port['port']}, not {ports.get(name)}")
for endpoint in monitor["spec"]["endpoints"]:
    check(endpoint["port"] in service_ports, f"ServiceMonitor scrapes unknown port {endpoint['port']}")
    check(endpoint["port"] == "metrics", "ServiceMonitor does not scrape the metrics port")
    check(endpoint.get("path", "/metrics") == "/metrics", "ServiceMonitor path is not /metrics")

# --- Resources, threads and lifecycle ------------------------------------------------
resources = container.get("resources", {})
requests, limits = resources.get("requests", {}), resources.get("limits", {})
for kind in ("cpu", "memory"):
    check(kind in requests, f"no {kind} request")
    check(kind in limits, f"no {kind} limit")
if {"cpu", "memory"} <= requests.keys() and {"cpu", "memory"} <= limits.keys():
    check(cpu_cores(requests["cpu"]) <= cpu_cores(limits["cpu"]), "cpu request above limit")
    check(memory_bytes(requests["memory"]) <= memory_bytes(limits["memory"]), "memory request above limit")
    cpu_limit = cpu_cores(limits["cpu"])
    for variable in ("EMOSERVE_TORCH_THREADS", "EMOSERVE_FEATURE_THREADS"):
        threads = int(settings.get(variable, "0"))
        check(0 < threads <= max(1, cpu_limit),
              f"{variable}={threads}: set it explicitly, at most the CPU limit {cpu_limit}")
grace_seconds = float(settings["EMOSERVE_GRACE_SECONDS"])
pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
pre_stop_seconds = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
check(pod_spec["terminationGracePeriodSeconds"] > grace_seconds + pre_stop_seconds,
      f"terminationGracePeriodSeconds {pod_spec['terminationGracePeriodSeconds']} <= preStop "
      f"{pre_stop_seconds} + EMOSERVE_GRACE_SECONDS {grace_seconds}: SIGKILL before the drain ends")

# --- Security ----------------------------------------------------------------------
pod_security = pod_spec.get("securityContext", {})
container_security = container.get("securityContext", {})
check(pod_security.get("runAsNonRoot") or container_security.get("runAsNonRoot"), "not runAsNonRoot")
check(container_security.get("readOnlyRootFilesystem") is True, "root filesystem is writable")
check(container_security.get("allowPrivilegeEscalation") is False, "privilege escalation allowed")
check("ALL" in container_security.get("capabilities", {}).get("drop", []), "capabilities not dropped")
mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
check("/tmp" in mounts and "emptyDir" in volumes.get(mounts.get("/tmp"), {}),
      "no writable emptyDir at /tmp under the read-only root")

# --- Image, Dockerfile and settings -------------------------------------------------
runtime = lib.dockerfile_instructions("runtime")
runtime_keywords = {k: a for k, a in runtime}
user = runtime_keywords.get("USER", "")
check(re.fullmatch(r"[1-9]\d*(:\d+)?", user) is not None,
      f"Dockerfile USER {user!r} is not a numeric non-root user (runAsNonRoot needs a number)")
check(str(pod_security.get("runAsUser")) == user.split(":")[0],
      f"runAsUser {pod_security.get('runAsUser')} != the image's USER {user}")
exposed = {int(p.split("/")[0]) for p in runtime_keywords.get("EXPOSE", "").split()}
check(exposed == set(ports.values()), f"Dockerfile EXPOSE {exposed} != container ports {set(ports.values())}")
check("emoserve health" in runtime_keywords.get("HEALTHCHECK", ""), "HEALTHCHECK does not use `emoserve health`")
check(runtime_keywords.get("ENTRYPOINT") == '["emoserve-server"]',
      "ENTRYPOINT is not the server in exec form (it must be PID 1 to get SIGTERM)")
check(runtime_keywords.get("STOPSIGNAL") == "SIGTERM", "STOPSIGNAL is not SIGTERM")
froms = [a for k, a in lib.dockerfile_instructions() if k == "FROM"]
check(len(froms) == 2, "the Dockerfile is not a two-stage build")
check(re.search(r"ARG BASE_IMAGE=debian:bookworm-slim", (lib.DOCKER / "Dockerfile").read_text()) is not None,
      "the base image is not debian:bookworm-slim")
build_runs = " ".join(a for k, a in lib.dockerfile_instructions("build") if k == "RUN")
check("install-deps.sh --build" in build_runs and "--preset release" in build_runs,
      "the build stage does not use install-deps.sh and the release preset")
check("install-deps.sh --runtime" in " ".join(a for k, a in runtime if k == "RUN"),
      "the runtime stage does not install with install-deps.sh --runtime")
image_env = dockerfile_env("runtime")
check(int(image_env["EMOSERVE_PORT"]) == grpc_port and int(image_env["EMOSERVE_METRICS_PORT"]) == metrics_port
      and int(image_env["EMOSERVE_HTTP_PORT"]) == http_port,
      "the image's EMOSERVE_PORT/EMOSERVE_METRICS_PORT/EMOSERVE_HTTP_PORT differ from the ConfigMap's")
images = {i["name"] for i in kustomization.get("images", [])}
check(container["image"].split(":")[0] in images,
      f"container image {container['image']} is not rewritten by the kustomization's images:")
env_from = [e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e]
check(env_from == [configmap["metadata"]["name"]], f"envFrom {env_from} is not the settings ConfigMap")
check(all(k.startswith("EMOSERVE_") for k in settings), "ConfigMap holds keys the server does not read")

# Queue alert threshold = 75% of the configured queue limit.
queue_rule = next(r for g in lib.alert_rule_groups() for r in g["rules"]
                  if r.get("alert") == "EmoserveQueueSaturated")
threshold = float(re.search(r">\s*([\d.]+)\s*$", queue_rule["expr"].strip()).group(1))
check(threshold == 0.75 * int(settings["EMOSERVE_MAX_QUEUE_SIZE"]),
      f"EmoserveQueueSaturated threshold {threshold} is not 75% of EMOSERVE_MAX_QUEUE_SIZE")

# --- Compose --------------------------------------------------------------------------
compose = lib.load_yaml_documents(lib.DOCKER / "compose.yaml")[0]
services = compose["services"]
server_service = services.get("emoserve", {})
check(server_service.get("build", {}).get("dockerfile") == "docker/Dockerfile"
      and (lib.DOCKER / server_service["build"]["context"]).resolve() == lib.REPO,
      "compose does not build docker/Dockerfile from the repository root")
published = {int(p.split(":")[1]) for p in server_service.get("ports", [])}
check(published == exposed, f"compose publishes {published}, the image exposes {exposed}")
stop_grace = int(str(server_service.get("stop_grace_period", "10s")).rstrip("s"))
check(stop_grace > grace_seconds, "compose stop_grace_period is not longer than the server's grace period")
for name, definition in services.items():
    for volume in definition.get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith("."):
            check((lib.DOCKER / source).exists(), f"compose {name} mounts missing {source}")
prometheus_config = lib.load_yaml_documents(lib.DOCKER / "prometheus.yml")[0]
jobs = {job["job_name"]: job for job in prometheus_config["scrape_configs"]}
if check("emoserve" in jobs, "compose Prometheus has no job named emoserve (the rules select it)"):
    targets = [t for c in jobs["emoserve"]["static_configs"] for t in c["targets"]]
    check(targets == [f"emoserve:{int(image_env['EMOSERVE_METRICS_PORT'])}"],
          f"compose Prometheus scrapes {targets}, not the emoserve service's metrics port")
datasource = lib.load_yaml_documents(
    lib.DOCKER / "grafana/provisioning/datasources/prometheus.yaml")[0]["datasources"][0]
check(datasource["url"] == "http://prometheus:9090" and "prometheus" in services,
      "Grafana's datasource does not point at the compose Prometheus")
provider = lib.load_yaml_documents(
    lib.DOCKER / "grafana/provisioning/dashboards/emoserve.yaml")[0]["providers"][0]
dashboard_mounts = [v.split(":")[1] for v in services["grafana"]["volumes"] if "grafana-dashboard.json" in v]
check(len(dashboard_mounts) == 1 and dashboard_mounts[0].startswith(provider["options"]["path"] + "/"),
      "the dashboard is not mounted where Grafana's provider looks")

# --- The model-repository component (read file by file) -------------------------------
component_dir = lib.DEPLOY / "components" / "model-repository"
component = lib.load_yaml_documents(component_dir / "kustomization.yaml")[0]
claims = [d for name in component.get("resources", [])
          for d in lib.load_yaml_documents(component_dir / name)
          if d.get("kind") == "PersistentVolumeClaim"]
component_ops = {}
for patch in component.get("patches", []):
    for op in yaml.safe_load(patch["patch"]):
        component_ops[(patch["target"]["kind"], op["path"])] = op["value"]
volume = component_ops.get(("Deployment", "/spec/template/spec/volumes/-"), {})
mount = component_ops.get(("Deployment", "/spec/template/spec/containers/0/volumeMounts/-"), {})
repository_dir = component_ops.get(("ConfigMap", "/data/EMOSERVE_MODEL_REPOSITORY"))
check(len(claims) == 1 and volume.get("persistentVolumeClaim", {}).get("claimName")
      == claims[0]["metadata"]["name"],
      "the model-repository component's volume does not use its PersistentVolumeClaim")
check(mount.get("name") == volume.get("name") and mount.get("readOnly") is True,
      "the model-repository component does not mount its volume read-only")
check(repository_dir is not None and mount.get("mountPath") == repository_dir,
      f"EMOSERVE_MODEL_REPOSITORY ({repository_dir}) is not where the volume is mounted "
      f"({mount.get('mountPath')})")
check(component_ops.get(("ConfigMap", "/data/EMOSERVE_DEFAULT_MODEL")),
      "the model-repository component names no default model")
check(claims and set(claims[0]["spec"]["accessModes"]) & {"ReadOnlyMany", "ReadWriteMany"},
      "the model repository's claim cannot be mounted by several pods")
settings_from_components = {path.rsplit("/", 1)[1] for kind, path in component_ops
                            if kind == "ConfigMap"}

# --- Every setting and flag exists in the server --------------------------------------
server = lib.server_binary()
if server is None:
    lib.log(f"note: {lib.build_dir()}/server/emoserve-server not built; settings not checked against --help")
else:
    flags, variables = lib.server_options(server)
    check(len(variables) >= 10, f"`emoserve-server --help` lists only {len(variables)} EMOSERVE_* variables")
    used = (set(settings) | set(image_env) | set(server_service.get("environment", {}))
            | settings_from_components)
    for variable in sorted(used):
        check(variable in variables, f"{variable} is not an emoserve-server setting (--help)")
    for argument in container.get("args", []) + container.get("command", [])[1:]:
        if argument.startswith("--"):
            check(argument.split("=")[0] in flags, f"container argument {argument} is not a server flag")
    lib.log(f"checked {len(used)} settings against `emoserve-server --help`")

# --- kubectl kustomize, when there is a kubectl -----------------------------------------
kubectl = shutil.which("kubectl")
if kubectl is None:
    lib.log("note: no kubectl; the kustomization was read file by file")
else:
    built = subprocess.run([kubectl, "kustomize", str(lib.DEPLOY)], capture_output=True, text=True,
                           timeout=120)
    if check(built.returncode == 0, f"kubectl kustomize deploy failed: {built.stderr}"):
        rendered = [d for d in yaml.safe_load_all(built.stdout) if d]
        kinds = sorted(d["kind"] for d in rendered)
        check(kinds == sorted([o["kind"] for o in objects] + ["ConfigMap"]),
              f"kustomize rendered {kinds}")
        check(all(d["metadata"]["labels"].get("app.kubernetes.io/part-of") == "emoserve" for d in rendered),
              "kustomize did not label every object part-of=emoserve")
        board = next(d for d in rendered if d["kind"] == "ConfigMap"
                     and d["metadata"]["labels"].get("grafana_dashboard") == "1")
        check(board["data"]["emoserve.json"] == (lib.DEPLOY / "grafana-dashboard.json").read_text(),
              "the dashboard ConfigMap does not carry deploy/grafana-dashboard.json")
    # The queue-depth autoscaling component on top of the base, as an overlay uses it.
    with tempfile.TemporaryDirectory(prefix="emoserve-overlay-") as overlay:
        overlay_dir = pathlib.Path(overlay)
        shutil.copytree(lib.DEPLOY, overlay_dir / "deploy")
        (overlay_dir / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            "resources: [deploy]\ncomponents: [deploy/components/queue-depth-autoscaling]\n")
        built = subprocess.run([kubectl, "kustomize", overlay], capture_output=True, text=True, timeout=120)
        if check(built.returncode == 0, f"kustomize with the queue-depth component failed: {built.stderr}"):
            scaled = next(d for d in yaml.safe_load_all(built.stdout)
                          if d and d["kind"] == "HorizontalPodAutoscaler")
            pod_metrics = [m["pods"]["metric"]["name"] for m in scaled["spec"]["metrics"] if m["type"] == "Pods"]
            check(pod_metrics == ["emoserve_queue_depth"] and len(scaled["spec"]["metrics"]) == 2,
                  f"the component's HPA metrics are {scaled['spec']['metrics']}")
        (overlay_dir / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            "resources: [deploy]\ncomponents: [deploy/components/model-repository]\n")
        built = subprocess.run([kubectl, "kustomize", overlay], capture_output=True, text=True, timeout=120)
        if check(built.returncode == 0, f"kustomize with the model-repository component failed: {built.stderr}"):
            rendered = [d for d in yaml.safe_load_all(built.stdout) if d]
            pod = next(d for d in rendered if d["kind"] == "Deployment")["spec"]["template"]["spec"]
            config = next(d for d in rendered if d["kind"] == "ConfigMap"
                          and d["metadata"]["name"] == "emoserve-config")["data"]
            mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
            check(config.get("EMOSERVE_MODEL_REPOSITORY") in mounts,
                  "the rendered pod does not mount the model repository where the server looks")

failures.finish("manifests")
