#!/usr/bin/env bash
# The engine figures on the default model, rerunnable: fp32, int8, int8-weight-only and int4 engines from one
# export (int4 misses the 3% gate, hence --allow-accuracy-loss), then one runtime.bench run of all of them
# against the plain export, the plain onnxruntime loop, PyTorch eager and onnxruntime-genai fp32/int8/int4
# (runs alternated), and genai's accuracy on the same held-out windows.
# Usage: ci/figures-engines.sh [STORE]   (about 15 minutes on 2 cores; needs onnxruntime-genai)
set -euo pipefail
store=${1:-artifacts/engine-figures}
python -m export.build --out "$store" --threads 2 --precision fp32,int8,int8-weight-only,int4 \
    --allow-accuracy-loss --bench-runs 0 | tail -n 8
engine() { python -c "import json,sys; r=json.load(open('$store/report.json')); \
print(next(e['path'] for e in r['engines'] if e['precision'] == sys.argv[1]))" "$1"; }
export_artifact=$(ls -d "$store"/export-* | head -n 1)
python -m runtime.bench "$(engine fp32)" --compare "$(engine int8)" "$(engine int8-weight-only)" "$(engine int4)" \
    "$export_artifact" --baselines --genai fp32,int8,int4 --runs 5 --threads 2 --json "$store/bench.json"
for precision in int8 int4; do
    python -m export.genai_baseline "$export_artifact" --precision "$precision" --evaluate > /dev/null
done
