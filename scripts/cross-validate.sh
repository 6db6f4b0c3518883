#!/usr/bin/env bash
# Cross-validates a training recipe by speaker: ten folds over actors 1-20,
# each validating on two actors and training on the other 18; the test
# actors 21-24 stay out of every fold. The folds are then averaged by
# `emoserve-train ensemble`, which validates them out of fold: its
# model.json's "validation" is the recipe's cross-validated accuracy and UAR
# over 1200 clips of 20 speakers, far less noisy than one fold's 120 (one
# pair of actors' UAR varies by about 0.10 from pair to pair). Pass --keep
# last for an unbiased figure: by default each fold keeps the epoch its
# validation actors score best, and the same actors then overstate it
# (by about 0.04 for the bundled recipe).
#   scripts/cross-validate.sh OUT [TRAINER ARGS...]
#   e.g. scripts/cross-validate.sh /tmp/cv-pitch --features log_mel --n-mels 128 \
#          --n-fft 1024 --win-length 1024 --statistics-only --pitch ...
# Environment: DATA (default ../shared/datasets/ravdess), BUILD (build/release),
# JOBS (folds trained at once; default: the number of cores), THREADS
# (LibTorch threads per fold; default 1), FOLDS (default "1 2 3 4 5 6 7 8 9 10"),
# VERSION (the ensemble's model version; default: the first fold's).
set -euo pipefail
cd "$(dirname "$0")/.."
(($# >= 1)) || { echo "usage: $0 OUT [TRAINER ARGS...]" >&2; exit 2; }
out=$1
shift
data="${DATA:-../shared/datasets/ravdess}"
build="${BUILD:-build/release}"
jobs="${JOBS:-$(nproc)}"
threads="${THREADS:-1}"
read -r -a folds <<<"${FOLDS:-1 2 3 4 5 6 7 8 9 10}"
version_args=()
[[ -n "${VERSION:-}" ]] && version_args=(--version "$VERSION")
trainer="$build/train/emoserve-train"
[[ -x "$trainer" ]] || { echo "build first: $trainer is missing" >&2; exit 1; }
mkdir -p "$out"
export OMP_WAIT_POLICY=PASSIVE
members=()
running=0
for k in "${folds[@]}"; do
  val="$((2 * k - 1)),$((2 * k))"
  members+=("$out/fold$k")
  echo "fold $k: validation actors $val (log: $out/fold$k.log)"
  "$trainer" train --data "$data" --out "$out/fold$k" --threads "$threads" --val-actors "$val" \
    "$@" >"$out/fold$k.log" 2>&1 &
  running=$((running + 1))
  if ((running >= jobs)); then
    wait -n || true
    running=$((running - 1))
  fi
done
wait || true
for dir in "${members[@]}"; do
  [[ -s "$dir/model.json" ]] || { echo "training failed: see $dir.log" >&2; exit 1; }
done
"$trainer" ensemble --members "${members[@]}" --data "$data" --out "$out/ensemble" \
  "${version_args[@]}"
echo "cross-validated: $out/ensemble/model.json (provenance.validation)"
