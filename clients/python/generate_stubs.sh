#!/usr/bin/env bash
# Regenerates emoserve/v1/emoserve_pb2{,_grpc}.py from the proto (Debian:
# protobuf-compiler and protobuf-compiler-grpc).
#   clients/python/generate_stubs.sh [OUT_DIR]   (default: clients/python)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here}"
protoc -I "$here/../../proto" --python_out="$out" --grpc_out="$out" \
  --plugin=protoc-gen-grpc="$(command -v grpc_python_plugin)" \
  "$here/../../proto/emoserve/v1/emoserve.proto"
