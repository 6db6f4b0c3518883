#!/usr/bin/env bash
# The README's first quick-start command: install dependencies, build the
# release preset, and serve the bundled model (gRPC on 50051, metrics on
# 9464). Extra arguments go to emoserve-server (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake --preset release >/dev/null
cmake --build --preset release --target emoserve-server emoserve
exec build/release/server/emoserve-server --model models/default "$@"
