#!/usr/bin/env bash
# The pruning figures on the default model, rerunnable: plans for perplexity budgets of 2, 5 and 10%,
# 25% of MLP channels with and without repair, 200 distillation steps after that, a 5% budget healed by
# 200 steps, a pruned + int8 build,
# then one table of every variant against the unpruned engine, all TPOTs measured in the same run.
# Usage: ci/figures-pruning.sh [STORE]   (about 70 minutes on 2 cores)
set -euo pipefail
store=${1:-artifacts/pruning-figures}
build() { python -m export.build --out "$store" --threads 2 "$@" | tail -n 4; }
build                                           # the unpruned fp32 engine: the baseline
for budget in 2 5 10; do build --prune-budget "$budget"; done
build --prune mlp=0.25
build --prune mlp=0.25 --no-prune-repair
build --prune mlp=0.25 --distill-steps 200
build --prune-budget 5 --distill-steps 200      # planned at 15% before healing, gated at 5% after
build --prune-budget 5 --precision int8         # pruned + int8 must pass the calibration gate
python -m export.pareto "$store" --runs 3 --json "$store/pareto.json" --plot "$store/pareto.png"
