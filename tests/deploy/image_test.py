#!/usr/bin/python3
"""Builds the real docker/Dockerfile with podman (--isolation=chroot; no
Docker engine or container runtime here) on a local debian:bookworm-slim made
by tests/deploy/base_image.sh, then runs the image's server the way a
container would, minus the runtime: its root filesystem mounted read-only
(`podman image mount`) with a fresh /tmp, its user, environment and working
directory, under `chroot`. From the host: health, a classification, the
metrics port, the image's own HEALTHCHECK command, and a clean exit on
SIGTERM.

Runs when EMOSERVE_IMAGE_TEST=1, as .ci/run sets it (a developer's
scripts/test.sh skips it: about 20 minutes cold on two cores). Warm runs
reuse podman's layer cache, the base image (/var/cache/emoserve) and ccache
(a build cache mount)."""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import deploy_lib as lib  # noqa: E402

IMAGE = "localhost/emoserve:test"

if os.environ.get("EMOSERVE_IMAGE_TEST") != "1":
    lib.skip("the image build runs with EMOSERVE_IMAGE_TEST=1, as in .ci/run (about 20 min cold, 1 min warm)")
if os.geteuid() != 0:
    lib.skip("needs root (debootstrap, podman image mount, chroot)")
for tool in ("podman", "debootstrap", "unshare", "chroot"):
    if shutil.which(tool) is None:
        lib.skip(f"{tool} is not installed: scripts/install-deps.sh")
if lib.bundled_model() is None:
    lib.skip("models/default/model.pt is absent: the image ships the bundled model")
cli = lib.cli_binary()
if cli is None:
    lib.skip(f"the host's emoserve CLI is not built in {lib.build_dir()}")

failures = lib.Failures()
check = failures.check


def run(command, timeout, **kwargs):
    lib.log("$ " + " ".join(shlex.quote(str(c)) for c in command))
    return subprocess.run([str(c) for c in command], timeout=timeout, text=True, **kwargs)


def image_id(name):
    result = run(["podman", "image", "inspect", "--format", "{{.Id}}", name], 60, capture_output=True)
    return result.stdout.strip() if result.returncode == 0 else None


# --- Build ------------------------------------------------------------------------
base = run([lib.REPO / "tests/deploy/base_image.sh"], 1200, capture_output=True)
if not check(base.returncode == 0, f"base image: {base.stderr[-2000:]}"):
    failures.finish("image")
previous_id = image_id(IMAGE)
started = time.monotonic()


def build_command(target, tag):
    return ["podman", "build", "--isolation=chroot", "--format", "docker", "--pull=never", "--layers",
            "--target", target, "-f", str(lib.DOCKER / "Dockerfile"), "-t", tag, str(lib.REPO)]


lib.log("$ " + " ".join(build_command("runtime", IMAGE)))
# The build's output as it comes, each line stamped with the seconds since
# the start: where a slow build spends its time.
# A watchdog kills a build that outlives its budget (a stuck step prints
# nothing, so reading its output would wait forever), leaving CI time to
# report the failure.
BUILD_BUDGET_S = float(os.environ.get("EMOSERVE_IMAGE_BUILD_TIMEOUT", "2400"))
build = subprocess.Popen(build_command("runtime", IMAGE), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
watchdog = threading.Timer(BUILD_BUDGET_S, build.kill)
watchdog.start()
for line in build.stdout:
    lib.log(f"[{time.monotonic() - started:5.0f} s] {line.rstrip()}")
build.wait()
watchdog.cancel()
build_seconds = time.monotonic() - started
if build_seconds >= BUILD_BUDGET_S:
    check(False, f"podman build killed after {BUILD_BUDGET_S:.0f} s (EMOSERVE_IMAGE_BUILD_TIMEOUT)")
    failures.finish("image")
if not check(build.returncode == 0, f"podman build exited {build.returncode}"):
    failures.finish("image")
current_id = image_id(IMAGE)
lib.log(f"image build: {build_seconds:.0f} s ({'cached' if current_id == previous_id else 'rebuilt'})")
if previous_id != current_id:
    # Tagging the build stage too (all cached: seconds) keeps this build's
    # layers, the next build's cache, out of the prune of earlier builds'
    # dangling layers, which bounds the store at about 2.5 GB.
    run(build_command("build", IMAGE + "-build"), 600, capture_output=True)
    run(["podman", "image", "prune", "--force"], 600, capture_output=True)

inspect = json.loads(run(["podman", "image", "inspect", IMAGE], 60, capture_output=True).stdout)[0]
config = inspect["Config"]
lib.log(f"image size: {inspect['Size'] / 1e6:.0f} MB")
check(config.get("User") == "10001:10001", f"image user {config.get('User')}")
check({"50051/tcp", "9464/tcp", "8080/tcp"} <= set(config.get("ExposedPorts", {})),
      f"exposed {config.get('ExposedPorts')}")
check(config.get("Entrypoint") == ["emoserve-server"], f"entrypoint {config.get('Entrypoint')}")
check(config.get("StopSignal") == "SIGTERM", f"stop signal {config.get('StopSignal')}")
# Docker-format images keep HEALTHCHECK; podman shows it beside Config.
healthcheck = (inspect.get("Healthcheck") or config.get("Healthcheck") or {}).get("Test", [])
check(healthcheck[:1] == ["CMD-SHELL"] and "emoserve health" in " ".join(healthcheck),
      f"healthcheck {healthcheck}")
image_env = dict(e.split("=", 1) for e in config.get("Env", []))
workdir = config.get("WorkingDir") or "/"

# --- Run it from its mounted root filesystem ------------------------------------------
mount = run(["podman", "image", "mount", IMAGE], 120, capture_output=True)
if not check(mount.returncode == 0, f"podman image mount: {mount.stderr}"):
    failures.finish("image")
root = pathlib.Path(mount.stdout.strip())
server_process = None
try:
    # The runtime libraries are complete: nothing unresolved in either binary.
    for binary in ("/usr/local/bin/emoserve-server", "/usr/local/bin/emoserve"):
        ldd = run(["chroot", root, "ldd", binary], 60, capture_output=True)
        missing = [line.strip() for line in ldd.stdout.splitlines() if "not found" in line]
        check(ldd.returncode == 0 and not missing, f"{binary} in the image: missing {missing}")
    check((root / "opt/emoserve/models/default/model.pt").is_file(), "the image has no bundled model")
    for model in ("cnn-transformer", "speaker-adaptive"):
        check((root / f"opt/emoserve/models/{model}/model.pt").is_file(),
              f"the image lacks models/{model} (its models/ is a repository of all three)")

    grpc_port, metrics_port, http_port = lib.free_port(), lib.free_port(), lib.free_port()
    # As the container would run: the image's environment (the ports moved to
    # free ones, loopback only), user and working directory; a private mount
    # namespace gives it /proc, /sys, /dev and a writable /tmp that vanish
    # with it, over a root filesystem that stays read-only.
    env = dict(image_env, EMOSERVE_HOST="127.0.0.1", EMOSERVE_PORT=str(grpc_port),
               EMOSERVE_METRICS_PORT=str(metrics_port), EMOSERVE_HTTP_PORT=str(http_port),
               EMOSERVE_TORCH_THREADS="1",
               EMOSERVE_FEATURE_THREADS="1")
    env_args = [f"{k}={v}" for k, v in env.items()]
    container_command = " ".join(shlex.quote(c) for c in config["Entrypoint"] + (config.get("Cmd") or []))
    setup = (f"mount -t proc proc {root}/proc && mount --rbind /sys {root}/sys && "
             f"mount --rbind /dev {root}/dev && mount -t tmpfs -o size=64m tmpfs {root}/tmp && "
             f"exec chroot --userspec={config['User']} {root} /usr/bin/env -i {' '.join(env_args)} "
             f"/bin/sh -c {shlex.quote(f'cd {workdir} && exec {container_command}')}")
    server_log = open(lib.build_dir() / "deploy_image_server.log", "w")
    server_process = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", setup],
                                      stdout=server_log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{grpc_port}"
    lib.wait_until(lambda: lib.cli_health(cli, address), 180, "image's server SERVING", server_process)
    writable = run(["chroot", root, "/bin/sh", "-c", "touch /opt/emoserve/x"], 30, capture_output=True)
    check(writable.returncode != 0, "the image's root filesystem is writable while mounted for the run")

    clip = lib.sample_clip()
    if clip is None:
        lib.log("note: no shared RAVDESS clip; classification not checked")
    else:
        result = lib.cli_classify(cli, address, clip)
        result = result[0] if isinstance(result, list) else result["results"][0]
        labels = json.loads((root / "opt/emoserve/models/default/model.json").read_text())["labels"]
        check(result.get("ok") and result.get("top_label") in labels, f"classification: {result}")
        lib.log(f"{clip.name}: {result.get('top_label')} ({result.get('confidence')})")
    metrics = lib.http_get(f"http://127.0.0.1:{metrics_port}/metrics") or ""
    check("emoserve_model_info{" in metrics, "the image's server exports no emoserve_model_info")
    ready = lib.http_get(f"http://127.0.0.1:{http_port}/readyz") or ""
    check('"SERVING"' in ready, f"the image's server HTTP /readyz: {ready!r}")

    # The image's HEALTHCHECK command, inside the image, as its user.
    if len(healthcheck) == 2:
        in_image = run(["chroot", f"--userspec={config['User']}", root, "/usr/bin/env", "-i", *env_args,
                        "/bin/sh", "-c", healthcheck[1]], 60, capture_output=True)
        check(in_image.returncode == 0, f"HEALTHCHECK `{healthcheck[1]}` failed: {in_image.stderr}")

    exit_code = lib.stop_process(server_process, timeout=float(env.get("EMOSERVE_GRACE_SECONDS", 10)) + 20)
    check(exit_code == 0, f"the image's server exited {exit_code} on SIGTERM")
except AssertionError as error:
    check(False, str(error))
finally:
    if server_process is not None:
        lib.stop_process(server_process)
    run(["podman", "image", "unmount", IMAGE], 120, capture_output=True)
    if failures.messages:
        log_path = lib.build_dir() / "deploy_image_server.log"
        if log_path.exists():
            lib.log("--- server log (tail)\n" + "\n".join(log_path.read_text().splitlines()[-30:]))

failures.finish("image")
