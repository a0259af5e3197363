#!/usr/bin/env bash
# The fusion figures, rerunnable: the ONNX Runtime engine's norm and GELU fusions by ONNX Runtime's transformer
# optimizer (what the engine stage runs) against onnxscript's rewrite rules, and onnxscript's whole pipeline in
# place of our attention fusion too (engines/fusion_figures.py). On the default model's fp32 export and int8
# calibration: ops, build seconds, decode ms per token (runs alternated) and logits against the kept path; then
# op counts on a tiny random model of each family the tests build (the fusions differ by family).
# Usage: ci/figures-fusion.sh [STORE]   (about 35 minutes on 2 cores)
set -euo pipefail
store=${1:-artifacts/fusion-figures}
# The export and calibrate artifacts the last build in a store reported.
parents() { python -c "import json, sys; r = json.load(open(sys.argv[1])); \
print(' '.join(s['path'] for s in r['stages'] if s['stage'] in ('export', 'calibrate')))" "$1/report.json"; }
python -m export.build --out "$store" --threads 2 --precision fp32,int8 --bench-runs 0 | tail -n 4
# shellcheck disable=SC2046 # one path per word
python -m engines.fusion_figures $(parents "$store") --out "$store/variants" --threads 2 --runs 5 \
    --json "$store/fusion.json"
families="$store/families" exports=()
for arch in llama mistral qwen2 qwen3 gemma3_text gpt2 gpt_neox phi3; do
    python -c "import sys; from pathlib import Path; sys.path.insert(0, 'tests'); from tiny_models import \
make_tiny_model; make_tiny_model(sys.argv[1], Path(sys.argv[2]))" "$arch" "$families/$arch"
    python -m export.build --model "$families/$arch" --out "$families/store" --threads 2 --bench-runs 0 > /dev/null
    exports+=("$(parents "$families/store")")
done
python -m engines.fusion_figures --ops-only "${exports[@]}"
