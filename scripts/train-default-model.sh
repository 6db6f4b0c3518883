#!/usr/bin/env bash
# Reproduces the bundled model (version 4): the utterance-statistics recipe
# (STATS_ARGS on the features in FEATURE_ARGS) trained ten times by
# scripts/cross-validate.sh — each fold on 18 of actors 1-20, keeping its
# last epoch, validated on the other two; actors 21-24 stay out of every
# fold — and the ten folds averaged into one model.pt by `emoserve-train
# ensemble`, whose model.json records every fold's command and metrics and
# the recipe's cross-validated (out-of-fold) accuracy and UAR: unbiased, as
# no fold's validation chose anything. The folds together learn from all 20
# non-test speakers. About 18 min on 2 cores; deterministic for a seed and a
# thread count (one LibTorch thread per fold by default).
#   scripts/train-default-model.sh [OUT]      (default models/default)
# Environment: DATA (default ../shared/datasets/ravdess), BUILD (build/release),
# FEATURE_ARGS (default: 128 log-mel bands of a 64 ms window, in dB relative
# to each window's loudest cell), STATS_ARGS (the recipe), VERSION (4),
# JOBS (folds trained at once; default: the number of cores), THREADS
# (LibTorch threads per fold; default 1), MEMBERS_DIR (where the folds go;
# default: a new temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-models/default}"
read -r -a features <<<"${FEATURE_ARGS---n-mels 128 --n-fft 1024 --win-length 1024 --db-ref max}"
read -r -a stats_recipe <<<"${STATS_ARGS---features log_mel --statistics-only --statistics-hidden 128 --statistics-cepstral 64 --pitch --ema-decay 0.998 --noise-prob 0.3 --mixup 0 --time-masks 0 --feature-masks 0 --epochs 100 --keep last --seed 2}"
members_dir="${MEMBERS_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/emoserve-folds.XXXXXX")}"
echo "folds in $members_dir (logs: foldN.log)"
VERSION="${VERSION:-4}" scripts/cross-validate.sh "$members_dir" "${features[@]}" "${stats_recipe[@]}"
rm -rf "$out" && cp -r "$members_dir/ensemble" "$out"
echo "wrote $out"
