#!/usr/bin/env bash
# Regenerates examples/hello.wav: a short synthetic English sentence spoken
# by espeak-ng, as 16 kHz mono 16-bit PCM WAV. Synthetic speech carries no
# recording's license. Needs Debian's espeak-ng and sox
# (apt-get install espeak-ng sox).
#   examples/make_sample.sh [OUT]   (default: examples/hello.wav)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-examples/hello.wav}"
text="Hello. Kids are talking by the door."
raw=$(mktemp --suffix=.wav)
trap 'rm -f "$raw"' EXIT
espeak-ng -v en-us -s 160 -w "$raw" "$text"
sox -R "$raw" -D -r 16000 -c 1 -b 16 -e signed-integer "$out"
soxi "$out"
