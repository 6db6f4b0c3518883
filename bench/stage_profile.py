#!/usr/bin/python3
"""Where a served Classify call's time goes, stage by stage.

Starts emoserve-server once per model, loads it with `emoserve bench`
(closed loop, the RAVDESS clips of actors 21-24) at each concurrency, and
reads the server's own histograms (/metrics) before and after each run:

  transport + gRPC    the client's mean latency less the server's (receiving
                      the request, sending the response, both gRPC stacks)
  decode wait         a Classify call waiting for a decoding worker
  decode + resample   its audio decoded to the model's rate
  window queue        a window waiting for a feature worker and for the model
  features            one window's features
  model (one batch)   one batch on the model
  other in server     the rest of the server's time: admission and checks,
                      waiting for the call's slower window, aggregating the
                      windows, building the response

Window queue, features and model are one window's path; a call's windows
run side by side (not always in one batch), and the call waits for the
slower one, which "other in server" holds. Writes a markdown table and its
JSON.

  bench/stage_profile.py --out bench/results/stage_profile \
      seed=/tmp/seed-model bundled=models/default [-j 1 32] [-d 15]
"""
import argparse
import glob
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HISTOGRAMS = {
    "request": 'emoserve_request_duration_seconds{method="Classify"}',
    "decode_wait": "emoserve_decode_wait_seconds",
    "decode": "emoserve_decode_seconds",
    "queue": "emoserve_queue_wait_seconds",
    "features": "emoserve_feature_extraction_seconds",
    "model": "emoserve_inference_seconds",
}


def scrape(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for name, series in HISTOGRAMS.items():
        base, _, labels = series.partition("{")
        labels = "{" + labels if labels else ""
        for part in ("sum", "count"):
            pattern = re.escape(f"{base}_{part}{labels}") + r" (\S+)"
            match = re.search(r"^" + pattern + r"$", text, re.M)
            values[f"{name}_{part}"] = float(match.group(1)) if match else 0.0
    values["windows"] = values["queue_count"]
    return values


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(binary, model, flags):
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    metrics_port = free_port()
    process = subprocess.Popen(
        [binary, "--host", "127.0.0.1", "--port", "0", "--metrics-port", str(metrics_port),
         "--http-port", "0", "--model", model] + flags, stderr=log, stdout=log)
    deadline = time.time() + 120
    while time.time() < deadline:
        text = open(log.name).read()
        serving = re.search(r"event=serving", text)
        port = re.search(r"event=startup .* port=(\d+)", text)
        if serving and port:
            return process, int(port.group(1)), metrics_port, log.name
        if process.poll() is not None:
            sys.exit(f"the server exited: {text}")
        time.sleep(0.1)
    process.kill()
    sys.exit("the server did not start")


def profile(args, name, model):
    process, port, metrics_port, log = start_server(args.server, model, args.flags)
    try:
        files = sorted(glob.glob(os.path.join(args.clips, "Actor_2[1-4]", "*")))
        rows = {}
        for concurrency in args.concurrency:
            # The warm-up is measured by the server too: scrape after it.
            subprocess.run([args.cli, "bench", "--server", f"127.0.0.1:{port}", "-j",
                            str(concurrency), "-d", "3", "--warmup", "0", "-o", "json"] + files,
                           check=True, capture_output=True)
            before = scrape(metrics_port)
            run = json.loads(subprocess.run(
                [args.cli, "bench", "--server", f"127.0.0.1:{port}", "-j", str(concurrency),
                 "-d", str(args.duration), "--warmup", "0", "-o", "json"] + files,
                check=True, capture_output=True, text=True).stdout)
            after = scrape(metrics_port)
            delta = {k: after[k] - before[k] for k in after}
            calls = delta["request_count"]
            mean = lambda key: 1000 * delta[f"{key}_sum"] / max(1, delta[f"{key}_count"])
            server_ms = mean("request")
            stages = {
                "transport + gRPC": run["latency_ms"]["mean"] - server_ms,
                "decode wait": mean("decode_wait"),
                "decode + resample": mean("decode"),
                "window queue": mean("queue"),
                "features": mean("features"),
                "model (one batch)": mean("model"),
            }
            stages["other in server"] = server_ms - sum(
                v for k, v in stages.items() if k != "transport + gRPC")
            rows[concurrency] = {
                "calls_per_second": run["throughput_rps"],
                "client_mean_ms": run["latency_ms"]["mean"],
                "server_mean_ms": server_ms,
                "windows_per_call": delta["windows"] / max(1, calls),
                "mean_batch": delta["windows"] / max(1, delta["model_count"]),
                "stages_ms": stages,
            }
            print(f"{name} -j {concurrency}: {run['throughput_rps']:.1f} calls/s, "
                  f"client {run['latency_ms']['mean']:.2f} ms, server {server_ms:.2f} ms",
                  flush=True)
        return rows
    finally:
        process.terminate()
        process.wait(timeout=30)
        os.unlink(log)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="NAME=MODEL_DIR")
    parser.add_argument("-j", "--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("-d", "--duration", type=float, default=15)
    parser.add_argument("--flags", default="", help="more server flags, one string")
    parser.add_argument("--clips", default=os.path.join(ROOT, "..", "shared", "datasets",
                                                        "ravdess"))
    parser.add_argument("--server", default=os.path.join(ROOT, "build", "release", "server",
                                                         "emoserve-server"))
    parser.add_argument("--cli", default=os.path.join(ROOT, "build", "release", "client",
                                                      "emoserve"))
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "stage_profile"))
    args = parser.parse_args()
    args.flags = args.flags.split()
    results = {}
    for spec in args.models:
        name, _, model = spec.partition("=")
        results[name] = profile(args, name, model)

    columns = [(name, j) for name in results for j in args.concurrency]
    lines = [
        "| stage (mean ms per call) | " + " | ".join(f"{n}, -j {j}" for n, j in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    stage_names = list(next(iter(next(iter(results.values())).values()))["stages_ms"])
    for stage in stage_names:
        lines.append(f"| {stage} | " + " | ".join(
            f"{results[n][j]['stages_ms'][stage]:.2f}" for n, j in columns) + " |")
    for key, label, fmt in [("client_mean_ms", "**client latency**", "{:.2f}"),
                            ("server_mean_ms", "server latency", "{:.2f}"),
                            ("calls_per_second", "calls/s", "{:.1f}"),
                            ("windows_per_call", "windows per call", "{:.2f}"),
                            ("mean_batch", "mean batch", "{:.1f}")]:
        lines.append(f"| {label} | " + " | ".join(fmt.format(results[n][j][key])
                                                 for n, j in columns) + " |")
    command = "bench/stage_profile.py " + " ".join(sys.argv[1:])
    markdown = (f"# Where a Classify call's time goes\n\n`{command}`\n\n" + "\n".join(lines) +
                "\n\nThe stages are defined in bench/stage_profile.py's docstring: window queue, "
                "features and model are one window's path; a call waits for its slower window "
                "(in \"other in server\").\n")
    with open(args.out + ".md", "w") as out:
        out.write(markdown)
    with open(args.out + ".json", "w") as out:
        json.dump({"command": command, "results": results}, out, indent=1)
    print(markdown)


if __name__ == "__main__":
    main()
