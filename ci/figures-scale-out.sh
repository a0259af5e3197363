#!/usr/bin/env bash
# The scale-out figures on the default model's int8 engine, rerunnable: the plain single-process server, Ray Serve
# with 1 replica x 2 threads and with 2 replicas x 1 thread, each started in turn with the same client and
# prompts, at 1, 8 and 16 streaming clients (128-token prompts, 64 output tokens); output tok/s, TTFT p50/p99 and
# the Ray hop's added TTFT at 1 stream (docs/scale-out.md).
# Usage: ci/figures-scale-out.sh [STORE] [REQUESTS_PER_CLIENT]   (about 15 minutes on 2 cores)
set -euo pipefail
store=${1:-artifacts/serving-figures}
requests=${2:-2}
python -m export.build --out "$store" --threads 2 --precision int8 --bench-runs 0 | tail -n 4
engine=$(python -c "import json; r=json.load(open('$store/report.json')); print(r['engines'][0]['path'])")
python -m runtime.scaleout_loadtest "$engine" --clients 1,8,16 --requests "$requests" --max-tokens 64 \
    --prompt-tokens 128 --json "$store/scale-out.json"
