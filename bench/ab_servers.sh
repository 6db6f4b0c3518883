#!/usr/bin/env bash
# Two (or more) emoserve-server builds measured in turns with `emoserve
# bench` (closed loop) on the same clips, so that a noisy machine affects
# them alike; prints each round and the medians.
#   bench/ab_servers.sh [-j "4 32"] [-d 20] [-r 3] [--clips DIR] NAME=BIN[:FLAGS] ...
# e.g. bench/ab_servers.sh before=/work/old/build/release/server/emoserve-server \
#        after=build/release/server/emoserve-server
#        "unguarded=build/release/server/emoserve-server:--connection-guard false"
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
concurrency="4 32"; duration=20; rounds=3; clips=../shared/datasets/ravdess
servers=()
while (($#)); do
  case "$1" in
    -j) concurrency="$2"; shift 2 ;;
    -d) duration="$2"; shift 2 ;;
    -r) rounds="$2"; shift 2 ;;
    --clips) clips="$2"; shift 2 ;;
    *) servers+=("$1"); shift ;;
  esac
done
files=("$clips"/Actor_2[1-4]/*)
cli=build/release/client/emoserve
results=$(mktemp)
for round in $(seq "$rounds"); do
  for j in $concurrency; do
    for spec in "${servers[@]}"; do
      name=${spec%%=*}; rest=${spec#*=}; binary=${rest%%:*}; flags=""
      [[ "$rest" == *:* ]] && flags=${rest#*:}
      log=$(mktemp)
      # shellcheck disable=SC2086
      "$binary" --host 127.0.0.1 --port 0 --metrics-port 0 --http-port 0 $flags 2>"$log" &
      pid=$!
      port=$(wait_for_server "$log")
      rps=$("$cli" bench --server "127.0.0.1:$port" -j "$j" -d "$duration" --warmup 3 -o json \
              "${files[@]}" | /usr/bin/python3 -c 'import json,sys; print(round(json.load(sys.stdin)["throughput_rps"], 1))')
      kill -TERM "$pid"; wait "$pid" || true; rm -f "$log"
      echo "round $round  -j $j  $name  $rps calls/s"
      echo "$j $name $rps" >>"$results"
    done
  done
done
echo "medians (calls/s):"
/usr/bin/python3 - "$results" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    j, name, rps = line.split()
    runs[(int(j), name)].append(float(rps))
for (j, name), values in sorted(runs.items()):
    print(f"  -j {j:3d}  {name:12s} {statistics.median(values):8.1f}  ({', '.join(map(str, values))})")
PY
rm -f "$results"
