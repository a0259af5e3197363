"""The fp16 stage: the float16 graph of a float32 artifact (`export.graph.float16`), checked against its parent
on held-out windows."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import onnx_ir as ir

from engines.verify import Baseline
from export.graph.float16 import ConvertToFloat16Pass
from runtime import accuracy
from runtime.artifact import MODEL_FILE, Artifact, ArtifactWriter
from runtime.errors import AccuracyError

STAGE = "fp16"
MAX_PPL_INCREASE = 0.5  # percent: float16 must not cost accuracy


def run(parent: Artifact, writer: ArtifactWriter, baseline: Baseline, allow_loss: bool = False,
        progress=print) -> Artifact:
    """The float16 artifact, checked against its float32 parent (`baseline`, evaluated once per build and
    shared with engine verification) on each held-out domain; exit 3 past the gate."""
    started = time.perf_counter()
    model = ir.load(str(parent.file(MODEL_FILE)))
    conversion = ConvertToFloat16Pass()(model)
    destination = writer.dir / MODEL_FILE
    ir.save(model, destination)
    progress(f"[fp16] {conversion.half_nodes} ops in float16; accuracy against float32 on "
             + ", ".join(f"{len(r.windows)} windows of {r.domain}" for r in baseline.references))
    records = []
    for reference in baseline.references:
        converted = accuracy.evaluate_model(Path(destination), parent.model_facts, reference.windows, reference.threads)
        increase = converted.increase_over(reference.evaluation)
        # Two-sided: float16 should move perplexity neither way.
        records.append(accuracy.AccuracyRecord.of(STAGE, "fp32", converted, reference.evaluation,
                                                  limit=MAX_PPL_INCREASE, passed=abs(increase) <= MAX_PPL_INCREASE,
                                                  domain=reference.domain))
    metrics: dict[str, Any] = {"accuracy": accuracy.as_metrics(records), "float16_ops": conversion.half_nodes,
                               "convert_seconds": round(time.perf_counter() - started, 1)}
    missed = [r for r in records if not r.passed]
    if missed and not allow_loss:
        where = ", ".join(f"{r.perplexity_increase_percent:+.2f}% on {r.domain}" for r in missed)
        raise AccuracyError(f"float16 changes perplexity by {where} (gate ±{MAX_PPL_INCREASE}%); keep fp32, or "
                            "pass --allow-accuracy-loss")
    writer.copy_text_files(parent)
    return writer.commit(io=parent.io, metrics=metrics, precision="fp16")
