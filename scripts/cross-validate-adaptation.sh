#!/usr/bin/env bash
# The out-of-fold accuracy and UAR of a speaker-normalised recipe's folds
# (scripts/cross-validate.sh OUT ... --speaker-normalization) for each prior:
# fold k is evaluated on its own validation actors (2k-1, 2k), each clip with
# its speaker's statistics from N seconds of the speaker's other clips
# (`emoserve-train eval --adapt`), and the ten folds' confusion matrices are
# added up: 1200 clips of 20 speakers, none of whom trained the fold that
# answers for them. Writes OUT/adaptation_cv.json and prints a table.
#   scripts/cross-validate-adaptation.sh OUT [PRIORS...]   (default 0 10 20 30 60 120)
# Environment: DATA (default ../shared/datasets/ravdess), BUILD (build/release),
# FOLDS (default "1 2 3 4 5 6 7 8 9 10").
set -euo pipefail
cd "$(dirname "$0")/.."
(($# >= 1)) || { echo "usage: $0 OUT [PRIORS...]" >&2; exit 2; }
out=$1
shift
priors=("$@")
((${#priors[@]})) || priors=(0 10 20 30 60 120)
data="${DATA:-../shared/datasets/ravdess}"
build="${BUILD:-build/release}"
read -r -a folds <<<"${FOLDS:-1 2 3 4 5 6 7 8 9 10}"
reports=()
for k in "${folds[@]}"; do
  echo "fold $k: actors $((2 * k - 1)),$((2 * k))" >&2
  "$build/train/emoserve-train" eval --model "$out/fold$k" --data "$data" \
    --actors "$((2 * k - 1)),$((2 * k))" --adapt "${priors[@]}" --json \
    >"$out/fold$k/adaptation.json" 2>/dev/null
  reports+=("$out/fold$k/adaptation.json")
done
/usr/bin/python3 - "$out/adaptation_cv.json" "${reports[@]}" <<'PY'
import json, sys
out, reports = sys.argv[1], [json.load(open(p)) for p in sys.argv[2:]]
labels = reports[0]["labels"]
table = []
for i, entry in enumerate(reports[0]["adapted"]):
    n = len(labels)
    total = [[0] * n for _ in range(n)]
    for report in reports:
        for r, row in enumerate(report["adapted"][i]["confusion"]):
            for c, v in enumerate(row):
                total[r][c] += v
    clips = sum(map(sum, total))
    recalls = [total[r][r] / sum(total[r]) for r in range(n) if sum(total[r])]
    table.append({"prior_seconds": entry["prior_seconds"], "clips": clips,
                  "accuracy": sum(total[r][r] for r in range(n)) / clips,
                  "uar": sum(recalls) / len(recalls), "confusion": total})
json.dump({"labels": labels, "folds": len(reports), "out_of_fold": table}, open(out, "w"), indent=1)
print("prior_s  clips  accuracy  UAR")
for t in table:
    print(f"{t['prior_seconds']:7.0f}  {t['clips']:5d}  {t['accuracy']:8.3f}  {t['uar']:.3f}")
PY
