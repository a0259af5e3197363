"""`python -m export.pareto STORE`: one row per pruned variant in an artifact store against its unpruned
baseline: parameters, FLOPs per token, file size, perplexity change and TPOT, all engines measured in the
same run (alternated), marking the plans on the perplexity/TPOT Pareto front; a PNG when matplotlib exists.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from export.report import format_rows, measure_latency
from runtime import accuracy
from runtime import artifact as artifacts
from runtime.errors import BadInputError, LmforgeError

PROMPT_LEN = 128


def load_store(store: Path) -> dict[str, artifacts.Artifact]:
    return {a.id: a for a in (artifacts.load(p, verify=False) for p in store.glob("*-*")
                              if (p / "manifest.json").exists())}


def variants(by_id: dict[str, artifacts.Artifact]) -> list[tuple[artifacts.Artifact, artifacts.Artifact | None]]:
    """(fp32 engine, the prune or distill artifact under it, or None for the unpruned baseline)."""
    found = []
    for engine in (a for a in by_id.values() if a.stage == "engine" and a.manifest.get("precision") == "fp32"):
        parent = by_id.get(engine.manifest["parent"])
        found.append((engine, parent if parent is not None and parent.stage in ("prune", "distill") else None))
    return found


def describe(engine: artifacts.Artifact, pruned: artifacts.Artifact | None, by_id: dict) -> dict:
    check = accuracy.held_out(accuracy.records_of(engine.metrics))
    row = {"engine": engine.id, "size_mb": engine.size_bytes() / 1e6, "perplexity": check and check.perplexity}
    if pruned is None:
        row |= {"variant": "unpruned"}
        return row
    prune_artifact = pruned if pruned.stage == "prune" else by_id[pruned.manifest["parent"]]
    metrics = prune_artifact.metrics
    label = json.dumps(prune_artifact.manifest["config"].get("ratios") or
                       {"budget": prune_artifact.manifest["config"].get("budget")})
    if pruned.stage == "distill":
        label += f" +distill {pruned.metrics['distillation']['steps']}"
        gate = pruned.manifest["config"].get("max_increase")
        label += f" (healed budget {gate:g})" if gate is not None else ""
    if not prune_artifact.manifest["config"].get("repair", True):
        label += " no-repair"
    return row | {"variant": label, "parameters": metrics["parameters_after"],
                  "parameters_removed_percent": metrics["parameters_removed_percent"],
                  "flops_per_token": metrics["flops_per_token_after"]}


def measure_all(rows: list[dict], engines: dict[str, artifacts.Artifact], runs: int, threads: int, gen_len: int
                ) -> None:
    """Median TPOT of every engine, runs alternated in one process (the build report's own measurement)."""
    latency = measure_latency(list(engines.values()), PROMPT_LEN, gen_len, runs, threads)
    for row in rows:
        row["tpot_ms"] = latency[row["engine"]]["tpot_ms"]["p50"]


def pareto_flags(rows: list[dict]) -> None:
    for row in rows:
        row["pareto"] = not any(o is not row and o["tpot_ms"] <= row["tpot_ms"] and o["perplexity"] <= row["perplexity"]
                                and (o["tpot_ms"], o["perplexity"]) != (row["tpot_ms"], row["perplexity"])
                                for o in rows)


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["variant"] == "unpruned"), rows[0])
    header = ("variant", "params", "removed", "GFLOP/tok", "size MB", "ppl", "ppl vs base", "TPOT ms", "TPOT÷base",
              "pareto")
    lines = [header]
    for r in sorted(rows, key=lambda r: r["tpot_ms"]):
        lines.append((r["variant"], f"{r.get('parameters', 0) / 1e6:.1f}M" if "parameters" in r else "-",
                      f"{r.get('parameters_removed_percent', 0):.1f}%", f"{r.get('flops_per_token', 0) / 1e9:.3f}"
                      if "flops_per_token" in r else "-", f"{r['size_mb']:.0f}", f"{r['perplexity']:.2f}",
                      f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.2f}%", f"{r['tpot_ms']:.2f}",
                      f"{r['tpot_ms'] / base['tpot_ms']:.2f}", "*" if r["pareto"] else ""))
    return format_rows(lines)


def plot(rows: list[dict], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (the table above has the numbers)"
    figure, axes = plt.subplots(figsize=(6, 4))
    for r in rows:
        axes.scatter(r["tpot_ms"], r["perplexity"], color="tab:red" if r["pareto"] else "tab:gray")
        axes.annotate(r["variant"][:28], (r["tpot_ms"], r["perplexity"]), fontsize=6)
    axes.set_xlabel("TPOT (ms)")
    axes.set_ylabel("perplexity")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return f"plot: {path}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.pareto", description=__doc__.splitlines()[0])
    parser.add_argument("store", help="an artifact store holding unpruned and pruned fp32 engines of one export")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="pareto.json")
    parser.add_argument("--plot", default="pareto.png")
    args = parser.parse_args(argv)
    try:
        store = Path(args.store)
        if not store.is_dir():
            raise BadInputError(f"{store} is not an artifact store; pass the --out folder of your builds")
        by_id = load_store(store)
        found = variants(by_id)
        if not found:
            raise BadInputError(f"{store} holds no fp32 engines; build with --prune ... --precision fp32 first")
        rows = [describe(engine, pruned, by_id) for engine, pruned in found]
        measure_all(rows, {engine.id: engine for engine, _ in found}, args.runs, args.threads, args.gen_len)
    except LmforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    pareto_flags(rows)
    print(table(rows))
    print(plot(rows, Path(args.plot)))
    Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
