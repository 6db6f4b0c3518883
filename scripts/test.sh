#!/usr/bin/env bash
# The README's test command: install dependencies, configure, build, run ctest.
#   scripts/test.sh [preset]   (default: release)
set -euo pipefail
cd "$(dirname "$0")/.."
preset="${1:-release}"
scripts/install-deps.sh
start=$(date +%s)
cmake --preset "$preset"
cmake --build --preset "$preset"
echo "build: $(( $(date +%s) - start )) s"
ctest --preset "$preset" -j2
