"""The one table of ci/gpu-check.sh: each plan's verification against fp32 (from the build's report.json) beside
its latency (from runtime.bench's JSON) and what it was built with (from its manifest).
Usage: python ci/gpu_check_table.py STORE"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADER = ("precision", "plan", "size", "ppl vs fp32", "top-1", "|dlogits| (tolerance)", "TTFT ms", "TPOT p50 ms",
          "tok/s", "TensorRT", "GPU")


# The domain of the build's held-out text (runtime.accuracy.HELD_OUT; this script imports nothing of lmforge).
HELD_OUT = "held-out"


def row(store: Path, engine: dict) -> tuple[str, ...]:
    accuracy = next(record for record in engine["accuracy"] if record["domain"] == HELD_OUT)
    ours = json.loads((store / f"bench-{engine['precision']}.json").read_text())["runners"]["lmforge"]
    keys = json.loads((Path(engine["path"]) / "manifest.json").read_text())["metrics"]["compatibility"]
    return (engine["precision"], engine["engine_id"], f"{engine['size_bytes'] / 1e6:.1f} MB",
            f"{accuracy['perplexity_increase_percent']:+.2f}%", f"{accuracy['top1_agreement']:.3f}",
            f"{accuracy['logits_statistic']} {accuracy['logits_diff']:.1e} ({accuracy['logits_limit']:g})",
            f"{ours['ttft_ms']:.1f}", f"{ours['tpot_ms']['p50']:.2f}", f"{ours['tokens_per_second']:.1f}",
            keys["tensorrt"], f"{keys['gpu']} (sm {keys['compute_capability']})")


def table(store: Path) -> str:
    rows = [HEADER] + [row(store, e) for e in json.loads((store / "report.json").read_text())["engines"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
