#!/usr/bin/env bash
# Trains one model per seed with the bundled model's recipe; with several
# seeds it trains them in parallel and averages them with
# `emoserve-train ensemble`, whose model.json records each member's command
# and metrics. The defaults reproduce the bundled model (one seed, 2, with
# one LibTorch thread; results are deterministic for a seed and a thread
# count, so THREADS=2 is faster but trains a slightly different model).
#   scripts/train-default-model.sh [OUT] [SEEDS] [EPOCHS]
#   defaults:                       models/default "2" 100
#   an ensemble:                    scripts/train-default-model.sh models/ens "1 2 3"
# Environment: DATA (default ../shared/datasets/ravdess), BUILD (build/release),
# TRAIN_ARGS (the recipe; default "--speaker-adversarial 0.3 --ema-decay
# 0.998"), JOBS (members trained at once; default: the number of cores),
# THREADS (LibTorch threads per member; default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-models/default}"
read -r -a seeds <<<"${2:-2}"
epochs="${3:-100}"
data="${DATA:-../shared/datasets/ravdess}"
build="${BUILD:-build/release}"
jobs="${JOBS:-$(nproc)}"
read -r -a recipe <<<"${TRAIN_ARGS---speaker-adversarial 0.3 --ema-decay 0.998}"
threads="${THREADS:-1}"
trainer="$build/train/emoserve-train"
[[ -x "$trainer" ]] || { echo "build first: $trainer is missing" >&2; exit 1; }
members_dir="${MEMBERS_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/emoserve-members.XXXXXX")}"
echo "members in $members_dir (logs: member-SEED.log)"

# glibc malloc and OpenMP's busy-waiting make parallel LibTorch processes
# crawl on a small machine.
export OMP_WAIT_POLICY=PASSIVE
members=()
running=0
for seed in "${seeds[@]}"; do
  dir="$members_dir/member-$seed"
  members+=("$dir")
  "$trainer" train --data "$data" --out "$dir" --epochs "$epochs" --seed "$seed" \
    --threads "$threads" "${recipe[@]}" >"$members_dir/member-$seed.log" 2>&1 &
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
if ((${#members[@]} == 1)); then
  rm -rf "$out" && cp -r "${members[0]}" "$out"
else
  "$trainer" ensemble --members "${members[@]}" --data "$data" --out "$out"
fi
echo "wrote $out"
