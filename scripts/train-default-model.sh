#!/usr/bin/env bash
# Reproduces the bundled model: one CNN+Transformer member per seed (the
# recipe in TRAIN_ARGS, 100 epochs, about 30-50 min each on 2 cores) and the
# utterance-statistics member (STATS_ARGS, about 3 min), trained in parallel
# and averaged by `emoserve-train ensemble`, whose model.json records each
# member's command and metrics. Results are deterministic for a seed and a
# thread count (one LibTorch thread by default; THREADS=2 is faster but
# trains slightly different models).
#   scripts/train-default-model.sh [OUT] [SEEDS] [EPOCHS]
#   defaults:                       models/default "2" 100
#   more CNN members:               scripts/train-default-model.sh models/ens "1 2 3"
# Both members see the same level-independent features: 128 log-mel bands of
# a 64 ms window (FEATURE_ARGS), in dB relative to each window's loudest cell.
# Environment: DATA (default ../shared/datasets/ravdess), BUILD (build/release),
# FEATURE_ARGS (features of both members), TRAIN_ARGS (CNN recipe; default
# "--speaker-adversarial 0.3 --ema-decay 0.998"), STATS_ARGS (statistics
# recipe; empty string = no statistics member), VERSION (model version, 2),
# JOBS (members trained at once; default: the number of cores),
# THREADS (LibTorch threads per member; default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-models/default}"
read -r -a seeds <<<"${2:-2}"
epochs="${3:-100}"
data="${DATA:-../shared/datasets/ravdess}"
build="${BUILD:-build/release}"
jobs="${JOBS:-$(nproc)}"
version="${VERSION:-2}"
read -r -a features <<<"${FEATURE_ARGS---n-mels 128 --n-fft 1024 --win-length 1024 --db-ref max}"
read -r -a recipe <<<"${TRAIN_ARGS---speaker-adversarial 0.3 --ema-decay 0.998}"
read -r -a stats_recipe <<<"${STATS_ARGS---features log_mel --statistics-only --statistics-hidden 128 --ema-decay 0.998 --noise-prob 0.3 --mixup 0 --time-masks 0 --feature-masks 0 --pitch}"
threads="${THREADS:-1}"
trainer="$build/train/emoserve-train"
[[ -x "$trainer" ]] || { echo "build first: $trainer is missing" >&2; exit 1; }
members_dir="${MEMBERS_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/emoserve-members.XXXXXX")}"
echo "members in $members_dir (logs: NAME.log)"

# glibc malloc and OpenMP's busy-waiting make parallel LibTorch processes
# crawl on a small machine.
export OMP_WAIT_POLICY=PASSIVE
members=()
running=0
# train NAME SEED ARGS...: one member in the background, at most $jobs at once.
train() {
  local name=$1 seed=$2
  shift 2
  members+=("$members_dir/$name")
  "$trainer" train --data "$data" --out "$members_dir/$name" --epochs "$epochs" --seed "$seed" \
    --threads "$threads" "${features[@]}" "$@" >"$members_dir/$name.log" 2>&1 &
  running=$((running + 1))
  if ((running >= jobs)); then
    wait -n || true
    running=$((running - 1))
  fi
}
for seed in "${seeds[@]}"; do train "member-$seed" "$seed" "${recipe[@]}"; done
if ((${#stats_recipe[@]} > 0)); then train statistics 2 "${stats_recipe[@]}"; fi
wait || true
for dir in "${members[@]}"; do
  [[ -s "$dir/model.json" ]] || { echo "training failed: see $dir.log" >&2; exit 1; }
done
if ((${#members[@]} == 1)); then
  rm -rf "$out" && cp -r "${members[0]}" "$out"
else
  "$trainer" ensemble --members "${members[@]}" --data "$data" --out "$out" --version "$version"
fi
echo "wrote $out"
