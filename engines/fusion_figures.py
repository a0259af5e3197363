"""The fusion figures, rerunnable: the ONNX Runtime engine built from the same parent artifacts with each way of
fusing the graph, then op counts, build time, agreement of logits and decode latency, every engine measured in
one run of `runtime.bench`'s alternated loop (drift hits every variant alike).

    python -m engines.fusion_figures EXPORT [CALIBRATED ...] [--out DIR] [--runs 5] [--threads 2]
    python -m engines.fusion_figures --ops-only EXPORT ...    (op counts of each variant's graph, no engines)

Variants (the engine stage's other steps, attention fusion and ONNX Runtime's offline optimization, are shared):
- `ort-optimizer`: ONNX Runtime's transformer optimizer ('bert' mode), what the engine stage runs;
- `onnxscript-rules`: onnxscript's rewrite rules for what that optimizer fuses in our exports instead (RMS and
  skip normalization, skip layer normalization, GELU forms);
- `onnxscript-all`: onnxscript's whole ONNX Runtime pipeline (`optimize_for_ort`: rotary, SDPA, GQA/MHA and
  norm rules) on the graph as exported, in place of our attention fusion too.
`ci/figures-fusion.sh` runs it on the default model and on a tiny model of each family; engines/ort.py's
docstring says which one it keeps and why.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from unittest import mock

import numpy as np
import onnx_ir as ir

from engines import ort as ort_engine
from runtime import artifact as artifacts
from runtime.baselines import plain_session
from runtime.bench import THIS, measure
from runtime.contract import prefill_feeds
from runtime.session import SessionOptions

NormFusion = Callable[[ir.Model, Path], Path]


def onnxscript_rules(model: ir.Model, work: Path) -> Path:
    """onnxscript's rules for what ONNX Runtime's optimizer fuses in our exports (they need shapes to check the
    normalized axis); GELU first, as the bias-GELU rule matches the fused GELU."""
    import onnx_ir.passes.common as common
    from onnxscript.rewriter.ort_fusions.bias_gelu import fuse_bias_gelu
    from onnxscript.rewriter.ort_fusions.erfgelu import fuse_erfgelu
    from onnxscript.rewriter.ort_fusions.gelu import fuse_gelu
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.skip_normalization import (
        fuse_skip_layer_normalization,
        fuse_skip_rms_normalization,
    )

    common.ShapeInferencePass()(model)
    for fuse in (fuse_erfgelu, fuse_gelu, fuse_bias_gelu, fuse_rms_normalization, fuse_skip_rms_normalization,
                 fuse_skip_layer_normalization):
        fuse(model)
    destination = work / "normed.onnx"
    ir.save(model, destination)
    return destination


def onnxscript_all(model: ir.Model, work: Path) -> Path:
    """onnxscript's whole ONNX Runtime pipeline; run with our attention fusion off, so it sees the export."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    optimized, _ = optimize_for_ort(model)
    destination = work / "normed.onnx"
    ir.save(optimized, destination)
    return destination


# name -> (norm step, whether our attention fusion runs first)
VARIANTS: dict[str, tuple[NormFusion, bool]] = {
    "ort-optimizer": (ort_engine.fuse_norms, True),
    "onnxscript-rules": (onnxscript_rules, True),
    "onnxscript-all": (onnxscript_all, False),
}


@contextmanager
def norm_step(fusion: NormFusion) -> Iterator[None]:
    """The engine stage with `fusion` in place of its norm step: the stage itself builds every variant, so the
    figures are of the code that ships, with only that step exchanged."""
    with mock.patch.object(ort_engine, "fuse_norms", fusion):
        yield


def build_variant(parent: artifacts.Artifact, store: Path, name: str, threads: int) -> artifacts.Artifact:
    fusion, fuse_attention = VARIANTS[name]
    config = replace(ort_engine.EngineConfig(threads=threads), fuse_attention=fuse_attention)
    ident = f"{parent.id}-{name}"
    with norm_step(fusion), artifacts.ArtifactWriter(store, ort_engine.STAGE, ident, parent.id,
                                                     {"variant": name}) as writer:
        return ort_engine.run(parent, writer, config, progress=lambda message: None)


def graph_ops(parent: artifacts.Artifact, name: str) -> collections.Counter:
    """Op counts of the engine graph a variant makes (attention, norms, offline optimization), nothing else."""
    fusion, fuse_attention = VARIANTS[name]
    config = replace(ort_engine.EngineConfig(threads=1), fuse_attention=fuse_attention)
    with norm_step(fusion), tempfile.TemporaryDirectory() as work:
        destination = Path(work) / artifacts.MODEL_FILE
        ort_engine.build_graph(parent, destination, config, Path(work))
        return ort_engine.op_counts(ir.load(destination))


def ops_table(parents: list[artifacts.Artifact]) -> str:
    """Per parent: each variant's op count, and the ops one has that the kept path (the first) has not."""
    header = ("model", "precision", "variant", "ops", "ops it has that ort-optimizer lacks (or lacks that it has)")
    lines = [header]
    for parent in parents:
        kept = graph_ops(parent, next(iter(VARIANTS)))
        for name in VARIANTS:
            model = (parent.model_facts.get("model_type", "?"), parent.manifest.get("precision", "fp32"), name)
            try:
                ops = graph_ops(parent, name)
            except Exception as exc:  # a variant that cannot build this graph is a figure too
                lines.append((*model, "-", f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][-90:]}"))
                continue
            changes = [f"+{n} {op}" for op, n in sorted((ops - kept).items())]
            changes += [f"-{n} {op}" for op, n in sorted((kept - ops).items())]
            lines.append((*model, str(sum(ops.values())), " ".join(changes)))
    return format_lines(lines)


def logits_difference(a: artifacts.Artifact, b: artifacts.Artifact, threads: int) -> float:
    """Max |logits| difference of two engines on one 64-token prefill (plain onnxruntime, same feeds)."""
    facts = a.model_facts
    window = np.random.default_rng(0).integers(0, facts["vocab_size"], (1, 64))
    feeds = prefill_feeds(window, facts)
    logits = [plain_session(e.file(artifacts.MODEL_FILE), threads).run(["logits"], feeds)[0] for e in (a, b)]
    return float(np.abs(logits[0] - logits[1]).max())


def figures(parents: list[artifacts.Artifact], store: Path, runs: int, threads: int, gen_len: int) -> list[dict]:
    rows, engines = [], []
    for parent in parents:
        built = {}
        for name in VARIANTS:
            started = time.perf_counter()
            built[name] = build_variant(parent, store, name, threads)
            fusion = built[name].metrics["fusion"]
            rows.append({"precision": parent.manifest.get("precision"), "variant": name, "engine": built[name].id,
                         "ops": fusion["ops_after"], "op_types": fusion["op_types_after"],
                         "build_seconds": built[name].metrics["build_seconds"],
                         "stage_seconds": round(time.perf_counter() - started, 1),
                         "max_logits_diff_vs_first": logits_difference(built[next(iter(VARIANTS))], built[name],
                                                                       threads)})
        engines += built.values()
    latency = decode_latency(engines, runs, threads, gen_len)
    for row, engine in zip(rows, engines):
        row |= latency[engine.id]
    return rows


def decode_latency(engines: list[artifacts.Artifact], runs: int, threads: int, gen_len: int) -> dict[str, dict]:
    """engine id -> TPOT p50 and TTFT, all engines alternated in one bench run."""
    report = measure(engines[0], 64, gen_len, runs, SessionOptions(threads=threads), warmup=1, baselines=False,
                     rss_tokens=0, compare=tuple(engines[1:]))
    names = [THIS] + [f"{e.stage}-{e.id} ({e.manifest.get('precision')})" for e in engines[1:]]
    return {e.id: {"tpot_p50_ms": report["runners"][n]["tpot_ms"]["p50"], "ttft_ms": report["runners"][n]["ttft_ms"]}
            for e, n in zip(engines, names)}


def table(rows: list[dict]) -> str:
    header = ("precision", "variant", "ops", "build s", "TPOT p50 ms", "TTFT ms", "max|dlogits| vs ort-optimizer")
    return format_lines([header] + [(r["precision"], r["variant"], str(r["ops"]), f"{r['build_seconds']:.1f}",
                                     f"{r['tpot_p50_ms']:.2f}", f"{r['ttft_ms']:.1f}",
                                     f"{r['max_logits_diff_vs_first']:.1e}") for r in rows])


def format_lines(lines: list[tuple[str, ...]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "-" * max(len(line) for line in text))
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.fusion_figures", description=__doc__.splitlines()[0])
    parser.add_argument("parents", nargs="+", help="artifacts to build engines from (an export, a calibrate ...)")
    parser.add_argument("--out", default="artifacts/fusion-figures", help="where the variant engines are written")
    parser.add_argument("--runs", type=int, default=5, help="alternated bench runs")
    parser.add_argument("--gen-len", type=int, default=64, help="generated tokens per bench run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--ops-only", action="store_true", help="only each variant's op counts (no engine, bench)")
    args = parser.parse_args(argv)
    parents = [artifacts.load(p) for p in args.parents]
    if args.ops_only:
        print(ops_table(parents))
        return 0
    rows = figures(parents, Path(args.out), args.runs, args.threads, args.gen_len)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
