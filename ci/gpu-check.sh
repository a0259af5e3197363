#!/usr/bin/env bash
# The TensorRT check on an NVIDIA GPU, in one command: what no CPU test can show.
#  1. the `gpu` tests on the tiny model: fp32 and int8 plans built, verified and decoded; batch 2 with
#     --opt-seq = --max-seq, decoded to the limit; a version-compatible plan; a second build reusing the timing cache;
#  2. fp32 and int8 plans of MODEL (default: the default model), each verified against fp32 by the build itself
#     (a plan that misses its tolerance fails the build with exit 3);
#  3. runtime.bench on each plan, then one table: verification and latency side by side.
# Needs TensorRT, cuda-python and an NVIDIA GPU: pip install -e '.[gpu,dev]' --extra-index-url https://pypi.nvidia.com
# Usage: ci/gpu-check.sh [STORE] [MODEL]   (exit codes: the build's; 4 without TensorRT or a GPU)
# STORE and MODEL may also come from GPU_CHECK_STORE and GPU_CHECK_MODEL (a CI step passes inputs through the
# environment, never into the command line); STORE defaults to artifacts/gpu-check, MODEL to default.
set -euo pipefail
cd "$(dirname "$0")/.."
store=${1:-${GPU_CHECK_STORE:-artifacts/gpu-check}}
model=${2:-${GPU_CHECK_MODEL:-default}}

# Fail in a second, naming what is missing, rather than after an export.
python - <<'EOF'
import sys

try:
    import tensorrt
    from cuda.bindings import runtime as cudart
except ImportError as exc:
    print(f"gpu-check: needs TensorRT and cuda-python ({exc.name} is missing): pip install -e '.[gpu,dev]' "
          "--extra-index-url https://pypi.nvidia.com", file=sys.stderr)
    sys.exit(4)
err, count = cudart.cudaGetDeviceCount()
if err != cudart.cudaError_t.cudaSuccess or not count:
    print(f"gpu-check: CUDA reports no NVIDIA GPU ({err})", file=sys.stderr)
    sys.exit(4)
print(f"gpu-check: TensorRT {tensorrt.__version__}, {count} GPU(s)", file=sys.stderr)
EOF

python -m pytest tests/test_tensorrt.py -q -m gpu -p no:cacheprovider

mkdir -p "$store"
python -m export.build --model "$model" --backend trt --precision fp32,int8 --out "$store" --bench-runs 0 \
    > "$store/build.log"
for precision in fp32 int8; do
    engine=$(python -c "import json,sys; r=json.load(open(sys.argv[1])); \
print(next(e['path'] for e in r['engines'] if e['precision'] == sys.argv[2]))" "$store/report.json" "$precision")
    python -m runtime.bench "$engine" --runs 5 --json "$store/bench-$precision.json" > "$store/bench-$precision.log"
done

python ci/gpu_check_table.py "$store"
