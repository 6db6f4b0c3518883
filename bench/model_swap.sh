#!/usr/bin/env bash
# Versions swapped under load: a server on a model repository takes
# `emoserve bench` closed-loop calls (-j, default 16) and real-time streams
# (--streams, default 4) while a new version of its model is added and the
# old one removed, `swaps` times (default 10), each picked up by SIGHUP.
# Prints and writes (bench/results/model_swap.{md,json}) the calls, the
# failures and how long each new version took to be ready.
#   bench/model_swap.sh [-j 16] [--streams 4] [--swaps 10] [--model models/default]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
concurrency=16; streams=4; swaps=10; model=models/default; clips=../shared/datasets/ravdess
while (($#)); do
  case "$1" in
    -j) concurrency="$2"; shift 2 ;;
    --streams) streams="$2"; shift 2 ;;
    --swaps) swaps="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --clips) clips="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
server=build/release/server/emoserve-server
cli=build/release/client/emoserve
files=("$clips"/Actor_2[1-4]/*)
work=$(mktemp -d)
trap 'kill "${pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
repo="$work/repository"
mkdir -p "$repo/emotion"
cp -r "$model" "$repo/emotion/1"

"$server" --host 127.0.0.1 --port 0 --metrics-port 0 --http-port 0 --model-repository "$repo" \
  --model-poll-seconds 0 2>"$work/server.log" &
pid=$!
port=$(wait_for_server "$work/server.log")
address="127.0.0.1:$port"
# Long enough for every swap (a load and warm-up takes about a second).
duration=$((swaps * 4 + 10))
"$cli" --server "$address" bench -j "$concurrency" -d "$duration" --warmup 2 -o json \
  --progress-every 0 "${files[@]}" >"$work/unary.json" 2>"$work/unary.log" &
unary=$!
"$cli" --server "$address" bench --streams "$streams" -d "$duration" --warmup 2 -o json \
  --progress-every 0 "${files[@]}" >"$work/streams.json" 2>"$work/streams.log" &
streaming=$!
sleep 5

ready_ms=()
for version in $(seq 2 $((swaps + 1))); do
  cp -r "$model" "$repo/emotion/$version.tmp"
  mv "$repo/emotion/$version.tmp" "$repo/emotion/$version"  # appears whole
  start=$(date +%s%N)
  kill -HUP "$pid"
  until "$cli" --server "$address" models -o json |
      grep -A3 "\"version\": $version" | grep -q '"ready"'; do
    sleep 0.05
  done
  ready_ms+=($(( ($(date +%s%N) - start) / 1000000 )))
  sleep 1
  rm -rf "$repo/emotion/$((version - 1))"
  kill -HUP "$pid"
  sleep 1.5
  echo "swap $((version - 1)): version $version ready after ${ready_ms[-1]} ms, version $((version - 1)) removed"
done
wait "$unary" "$streaming"
kill -HUP "$pid"  # the last version removed is unloaded once its streams ended
sleep 2
kill -TERM "$pid"
wait "$pid" || true
unloaded=$(grep -c 'event=model_unloaded' "$work/server.log" || true)

/usr/bin/python3 - "$work" "$concurrency" "$streams" "$swaps" "$unloaded" "${ready_ms[@]}" <<'EOF'
import json, statistics, sys
work, concurrency, streams, swaps, unloaded = sys.argv[1:6]
ready = [int(x) for x in sys.argv[6:]]
unary = json.load(open(f"{work}/unary.json"))
stream = json.load(open(f"{work}/streams.json"))
result = {
    "concurrency": int(concurrency), "streams": int(streams), "swaps": int(swaps),
    "unary": unary, "streams_run": stream,
    "versions_unloaded": int(unloaded),
    "ready_ms": ready, "ready_ms_median": statistics.median(ready) if ready else None,
}
json.dump(result, open("bench/results/model_swap.json", "w"), indent=2)
def row(name, run):
    errors = ", ".join(f"{code} {count}" for code, count in run["errors"].items()) or "none"
    return (f"| {name} | {run['requests']} | {run['ok']} | {run['requests'] - run['ok']} ({errors}) | "
            f"{run['throughput_rps']} | {run['latency_ms'].get('p99')} |")
lines = [
    "# Model versions swapped under load",
    "",
    f"`bench/model_swap.sh -j {concurrency} --streams {streams} --swaps {swaps}`: the bundled model",
    "as version 1 of a repository; a new version added, then the old one removed, each followed",
    "by SIGHUP, while `emoserve bench` runs closed-loop calls and real-time streams.",
    "",
    "| load | calls (streams) | ok | failed | per second | p99 ms |",
    "|---|---:|---:|---:|---:|---:|",
    row(f"unary, -j {concurrency}", unary),
    row(f"streams, {streams} at a time", stream),
    "",
    f"New version ready after SIGHUP (load and warm-up), ms: median {result['ready_ms_median']}, "
    f"all {ready}. Versions unloaded after their last call: {unloaded} of {swaps}.",
]
open("bench/results/model_swap.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
