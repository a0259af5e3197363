#!/usr/bin/env bash
# The serving figures on the default model's int8 engine, rerunnable: continuous batching against static
# batching (--no-continuous-batching), each server started in turn with the same client and prompts, at 1, 4,
# 16 and 32 streaming clients (128-token prompts, 64 output tokens) and with a 384-token shared system prompt,
# then 32 clients for ten minutes against the continuous server (errors, RSS growth).
# Usage: ci/figures-serving.sh [STORE] [SOAK_SECONDS]   (about 20 minutes on 2 cores)
set -euo pipefail
store=${1:-artifacts/serving-figures}
soak=${2:-600}
python -m export.build --out "$store" --threads 2 --precision int8 --bench-runs 0 | tail -n 4
engine=$(python -c "import json; r=json.load(open('$store/report.json')); print(r['engines'][0]['path'])")
python -m runtime.loadtest "$engine" --threads 2 --clients 1,4,16,32 --requests 6 --max-tokens 64 \
    --prompt-tokens 128 --system-tokens 384 --system-clients 1,4 --soak-seconds "$soak" --soak-clients 32 \
    --json "$store/loadtest.json"
