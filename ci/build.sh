#!/usr/bin/env bash
# The CI job any CI can call: one export, a matrix of precisions built from it, each engine verified and
# measured, report.json / report.md written beside the artifacts. Exit codes are the build's (README).
# Usage: ci/build.sh [MODEL] [PRECISIONS] [STORE] [more export.build flags...]
set -euo pipefail
model=${1:-default}
precisions=${2:-fp32,int8}
store=${3:-artifacts}
shift $(( $# < 3 ? $# : 3 ))
cd "$(dirname "$0")/.."
python -m export.build --model "$model" --precision "$precisions" --out "$store" "$@"
