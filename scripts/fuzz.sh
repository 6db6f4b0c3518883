#!/usr/bin/env bash
# Builds the libFuzzer targets (preset `fuzz`: clang 14, ASan + UBSan) and
# runs each one from its seed corpus (tests/fuzz/corpus/<target>):
#   scripts/fuzz.sh                    60 s per target
#   scripts/fuzz.sh --seconds 600      longer
#   scripts/fuzz.sh --runs 1000000     a number of executions per target
#   scripts/fuzz.sh ... decode_fuzzer  only the targets named
# Corpora grow in build/fuzz/corpus/<target>; crashes land in
# build/fuzz/artifacts/<target>/ and fail the script. A summary (executions,
# crashes, coverage) is printed and written to build/fuzz/summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
limit=(-max_total_time=60)
targets=()
while (($#)); do
  case "$1" in
    --seconds) limit=(-max_total_time="$2"); shift 2 ;;
    --runs) limit=(-runs="$2"); shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) targets+=("$1"); shift ;;
  esac
done
((${#targets[@]})) || targets=(decode_fuzzer classify_fuzzer stream_fuzzer model_json_fuzzer http2_guard_fuzzer
                                  http_request_fuzzer speaker_statistics_fuzzer)

cmake --preset fuzz >/dev/null
cmake --build --preset fuzz
out=build/fuzz
summary="$out/summary.txt"
: >"$summary"
failed=0
for target in "${targets[@]}"; do
  corpus="$out/corpus/$target"
  artifacts="$out/artifacts/$target/"
  mkdir -p "$corpus" "$artifacts"
  log="$out/$target.log"
  echo "fuzz: $target ${limit[*]}"
  # A crash, leak, sanitizer report or timeout makes the run exit non-zero.
  if "$out/tests/fuzz/$target" "${limit[@]}" -rss_limit_mb=4096 -timeout=60 \
      -print_final_stats=1 -artifact_prefix="$artifacts" \
      "$corpus" "tests/fuzz/corpus/$target" >"$log" 2>&1; then
    verdict="ok"
  else
    verdict="FAILED (see $log and $artifacts)"
    failed=1
  fi
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo "?")
  crashes=$(find "$artifacts" -type f | wc -l)
  line="$target: $execs executions, coverage $cov, $crashes crash files, $verdict"
  echo "fuzz: $line"
  echo "$line" >>"$summary"
done
exit "$failed"
