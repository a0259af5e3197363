"""The build report, beside the engine artifacts: `report.json` (everything, stable keys, a schema version)
for machines, `report.md` for people, and PNG plots when matplotlib is installed (the report says so
otherwise and still carries every number)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from runtime import artifact as artifacts
from runtime.accuracy import HELD_OUT, AccuracyRecord, records_text
from runtime.bench import THIS, measure
from runtime.errors import BadInputError
from runtime.session import SessionOptions

# 2: every stage's accuracy as a list of accuracy records (runtime/accuracy.py), one per text domain, in
# `stages[].accuracy` and `engines[].accuracy` alike (1 had one dict per engine, in the engine gate's own shape).
SCHEMA_VERSION = 2
REPORT_JSON, REPORT_MD = "report.json", "report.md"


def format_rows(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns, a rule under the header row."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def check_report_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise BadInputError(f"--report {folder} is a file; pass a folder for report.json and report.md")


def measure_latency(engines: list[artifacts.Artifact], prompt_len: int, gen_len: int, runs: int, threads: int
                    ) -> dict[str, dict]:
    """TTFT/TPOT of every engine through the runtime, runs alternated in one process; engine id -> figures."""
    if not engines or runs < 1:
        return {}
    first, others = engines[0], tuple(engines[1:])
    report = measure(first, prompt_len, gen_len, runs, SessionOptions(threads=threads), warmup=1, baselines=False,
                     rss_tokens=0, compare=others)
    names = [THIS] + [f"{a.stage}-{a.id} ({a.manifest.get('precision')})" for a in others]
    return {engine.id: report["runners"][name] | {"step_ms": report["steps"][name]}
            for engine, name in zip(engines, names)}


def engine_entry(engine: artifacts.Artifact, by_id: dict[str, artifacts.Artifact], latency: dict) -> dict:
    chain = _parents(engine, by_id)
    calibrated = next((a for a in chain if a.stage == "calibrate"), None)
    pruned = next((a for a in chain if a.stage == "prune"), None)
    figures = latency.get(engine.id, {})
    return {
        "precision": engine.manifest.get("precision"),
        "backend": engine.manifest.get("backend"),
        "engine_id": engine.id,
        "path": str(engine.path),
        "size_bytes": engine.size_bytes(),
        "accuracy": engine.metrics.get("accuracy", []),
        "latency": {k: figures.get(k) for k in ("ttft_ms", "tpot_ms", "tokens_per_second")},
        "kept_in_float": calibrated.metrics.get("kept_in_float", []) if calibrated else [],
        "eight_bit": calibrated.metrics.get("eight_bit") if calibrated else None,
        "pruning_plan": pruned.metrics.get("plan") if pruned else None,
        "fusion": engine.metrics.get("fusion", {}).get("attention"),
        "draft": engine.manifest.get("config", {}).get("draft"),  # the draft engine paired with it
    }


def _parents(art: artifacts.Artifact, by_id: dict[str, artifacts.Artifact]) -> list[artifacts.Artifact]:
    chain, parent = [], art.manifest.get("parent")
    while parent in by_id:
        chain.append(by_id[parent])
        parent = by_id[parent].manifest.get("parent")
    return chain


def build_report(results, model: str, latency: dict, wall_seconds: float) -> dict[str, Any]:
    by_id = {r.artifact.id: r.artifact for r in results}
    engines = [r.artifact for r in results if r.stage == "engine"]
    return {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": model,
        "wall_seconds": round(wall_seconds, 1),
        "stages": [{"stage": r.stage, "artifact_id": r.artifact.id, "path": str(r.artifact.path),
                    "precision": r.artifact.manifest.get("precision"), "seconds": round(r.seconds, 1),
                    "reused": r.reused, "size_bytes": r.artifact.size_bytes(),
                    "peak_rss_mb": r.artifact.metrics.get("peak_rss_mb"),
                    "accuracy": r.artifact.metrics.get("accuracy", [])} for r in results],
        "engines": [engine_entry(e, by_id, latency) for e in engines],
        "draft_choice": next((r.artifact.metrics for r in results if r.stage == "draftchoice"), None),
        "versions": engines[0].manifest.get("versions", {}) if engines else {},
    }


def markdown(report: dict, plots: list[str], plot_note: str | None) -> str:
    lines = [f"# lmforge build report: {report['model']}", "",
             f"Built {report['created']} in {report['wall_seconds']:.0f} s (schema {report['schema_version']}).", "",
             "## Stages", "", "| stage | artifact | precision | time | size | peak RSS | accuracy |",
             "|---|---|---|---|---|---|---|"]
    for s in report["stages"]:
        rss = f"{s['peak_rss_mb'] / 1024:.2f} GB" if s["peak_rss_mb"] else "-"
        lines.append(f"| {s['stage']} | `{s['artifact_id']}` | {s['precision']} | {s['seconds']:.1f} s"
                     f"{' (reused)' if s['reused'] else ''} | {s['size_bytes'] / 1e6:.1f} MB | {rss} | "
                     f"{_cell(records_text(map(AccuracyRecord.from_dict, s['accuracy'])))} |")
    lines += ["", "## Engines", "",
              "| precision | engine | size | ppl vs fp32 | top-1 | TTFT ms | TPOT p50 | p90 | p99 | tok/s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for e in report["engines"]:
        acc, lat = held_out(e), e["latency"]
        tpot = lat.get("tpot_ms") or {}
        lines.append(f"| {e['precision']} | `{e['engine_id']}` | {e['size_bytes'] / 1e6:.1f} MB | "
                     f"{_num(acc.get('perplexity_increase_percent'), '+.2f')}% | "
                     f"{_num(acc.get('top1_agreement'), '.3f')} | {_num(lat.get('ttft_ms'), '.1f')} | "
                     f"{_num(tpot.get('p50'), '.2f')} | "
                     f"{_num(tpot.get('p90'), '.2f')} | {_num(tpot.get('p99'), '.2f')} | "
                     f"{_num(lat.get('tokens_per_second'), '.1f')} |")
    for e in report["engines"]:
        if e["kept_in_float"]:
            lines += ["", f"Kept in float ({e['precision']}): " + ", ".join(f"`{n}`" for n in e["kept_in_float"])]
        if e.get("eight_bit") is not None:
            lines += ["", f"8-bit layers ({e['precision']}; the other linear layers are 4-bit or kept in float): "
                      + (", ".join(f"`{n}`" for n in e["eight_bit"]) or "none")]
        if e["pruning_plan"]:
            plan = e["pruning_plan"]
            lines += ["", f"Pruning plan ({e['precision']}): dropped layers {plan['dropped_layers']}, MLP pruned in "
                      f"{len(plan['mlp_channels'])} layers, KV groups pruned in {len(plan['kv_groups'])} layers"]
    choice = report.get("draft_choice")
    if choice:
        trials = ", ".join(f"{t['ratios']} {t['speedup']:.2f}x" + (" (chosen)" * (t["draft"] == choice["chosen"]))
                           for t in choice["trials"])
        lines += ["", f"Draft candidates, decode speed-up with each against none "
                  f"({choice['plain_ms_per_token']:.2f} ms per token): {trials}"]
    lines += ["", "## Plots", ""]
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots] or [plot_note or "none"]
    return "\n".join(lines) + "\n"


def held_out(entry: dict) -> dict:
    """A report entry's accuracy record on the build's held-out text, as report.json holds it ({} if none)."""
    return next((record for record in entry["accuracy"] if record["domain"] == HELD_OUT), {})


def _cell(text: str) -> str:
    """Text for a Markdown table cell: a bare `|` (as in `max|dlogits|`) would end the cell."""
    return text.replace("|", "\\|")


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def plot(report: dict, latency: dict, folder: Path) -> tuple[list[str], str | None]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (pip install matplotlib): no plots; the tables carry the numbers"
    engines = report["engines"]
    paths = []
    figure, axes = plt.subplots(figsize=(7, 3.5))
    for e in engines:
        axes.plot(latency.get(e["engine_id"], {}).get("step_ms", []), label=e["precision"], linewidth=0.8)
    axes.set_xlabel("generated token")
    axes.set_ylabel("ms")
    axes.legend()
    paths.append(_save(figure, folder / "latency_per_token.png"))
    figure, (left, right) = plt.subplots(1, 2, figsize=(8, 3.5))
    names = [e["precision"] for e in engines]
    left.bar(names, [(e["latency"].get("tpot_ms") or {}).get("p50") or 0 for e in engines])
    left.set_ylabel("TPOT p50 (ms)")
    right.bar(names, [e["size_bytes"] / 1e6 for e in engines])
    right.set_ylabel("size (MB)")
    paths.append(_save(figure, folder / "tpot_and_size.png"))
    figure, axes = plt.subplots(figsize=(5, 3.5))
    for e in engines:
        tpot = (e["latency"].get("tpot_ms") or {}).get("p50")
        perplexity = held_out(e).get("perplexity")
        if tpot is not None and perplexity is not None:
            axes.scatter(tpot, perplexity)
            axes.annotate(e["precision"], (tpot, perplexity))
    axes.set_xlabel("TPOT p50 (ms)")
    axes.set_ylabel("perplexity")
    paths.append(_save(figure, folder / "perplexity_vs_tpot.png"))
    plt.close("all")
    return paths, None


def _save(figure, path: Path) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return str(path)


def write(folder: Path, results, model: str, latency: dict, wall_seconds: float) -> dict:
    """Write report.json, report.md and the plots into `folder`; returns the report."""
    folder.mkdir(parents=True, exist_ok=True)
    report = build_report(results, model, latency, wall_seconds)
    plots, note = plot(report, latency, folder)
    report["plots"] = plots if plots else note
    (folder / REPORT_JSON).write_text(json.dumps(report, indent=2, sort_keys=True))
    (folder / REPORT_MD).write_text(markdown(report, plots, note))
    return report
