#!/usr/bin/env bash
# Installs every Debian package emoserve needs to build, test and run.
# Idempotent: packages already present are left alone. Used by the README's
# quick start, .ci/run and docker/Dockerfile alike.
#   scripts/install-deps.sh            build + test dependencies
#   scripts/install-deps.sh --build    only what compiling needs (the image's
#                                      build stage)
#   scripts/install-deps.sh --runtime  only what the server binaries need
set -euo pipefail

runtime_packages=(
  libtorch1.13 libopenblas0-openmp libgrpc++1.51 libprotobuf32 libsndfile1
  libfftw3-single3 libsoxr0 libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0
  libabsl20220623 libssl3 ca-certificates
)
build_packages=(
  build-essential cmake ninja-build ccache pkg-config git
  libtorch-dev libopenblas0-openmp
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libsndfile1-dev libfftw3-dev libabsl-dev prometheus-cpp-dev libsoxr-dev
  libgtest-dev libgmock-dev libbenchmark-dev libcli11-dev nlohmann-json3-dev libssl-dev
)
test_packages=(
  # Independent checks in tests: Python's torch and grpc, promtool.
  python3 python3-torch python3-grpcio python3-protobuf python3-numpy prometheus
  # Deployment tests: manifests (yaml), the image built with podman on a
  # debootstrapped base.
  python3-yaml podman debootstrap
  # CLI tests: a throwaway certificate for the TLS flags.
  openssl
  # HTTP tests: the WebSocket stream (python3-websocket), clips as PCM
  # (python3-soundfile), and the page in headless Chromium through WebDriver.
  python3-websocket python3-soundfile chromium chromium-driver python3-selenium
  # Fuzzing (scripts/fuzz.sh): clang 14 with libFuzzer and its sanitizers.
  clang-14 libfuzzer-14-dev libclang-rt-14-dev
)

case "${1:-}" in
  --runtime) packages=("${runtime_packages[@]}") ;;
  --build) packages=("${build_packages[@]}") ;;
  "") packages=("${build_packages[@]}" "${test_packages[@]}") ;;
  *) echo "usage: $0 [--build|--runtime]" >&2; exit 2 ;;
esac

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]} == 0)); then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

sudo=""
if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
echo "install-deps: installing ${#missing[@]} packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# --no-install-recommends keeps the image small; OpenBLAS (LibTorch's
# recommended BLAS, 4x faster than the reference one) is named explicitly.
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
