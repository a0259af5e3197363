"""The fp16 stage: the float16 graph of a float32 artifact (`export.graph.float16`), checked against its parent
on held-out windows."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import onnx_ir as ir

from engines.verify import Reference
from export.graph.float16 import ConvertToFloat16Pass
from runtime import accuracy
from runtime.artifact import MODEL_FILE, Artifact, ArtifactWriter
from runtime.errors import AccuracyError

STAGE = "fp16"
MAX_PPL_INCREASE = 0.5  # percent: float16 must not cost accuracy


def run(parent: Artifact, writer: ArtifactWriter, reference: Reference, allow_loss: bool = False,
        progress=print) -> Artifact:
    """The float16 artifact, checked against its float32 parent (`reference`, evaluated once per build and
    shared with engine verification) on held-out windows; exit 3 past the gate."""
    started = time.perf_counter()
    model = ir.load(str(parent.file(MODEL_FILE)))
    conversion = ConvertToFloat16Pass()(model)
    destination = writer.dir / MODEL_FILE
    ir.save(model, destination)
    windows = reference.windows
    progress(f"[fp16] {conversion.half_nodes} ops in float16; accuracy against float32 on {len(windows)} windows")
    converted = accuracy.evaluate_model(Path(destination), parent.model_facts, windows, reference.threads)
    increase = converted.increase_over(reference.evaluation)
    # Two-sided: float16 should move perplexity neither way.
    record = accuracy.AccuracyRecord.of(STAGE, "fp32", converted, reference.evaluation, limit=MAX_PPL_INCREASE,
                                        passed=abs(increase) <= MAX_PPL_INCREASE)
    metrics: dict[str, Any] = {"accuracy": accuracy.as_metrics([record]), "float16_ops": conversion.half_nodes,
                               "convert_seconds": round(time.perf_counter() - started, 1)}
    if not record.passed and not allow_loss:
        raise AccuracyError(f"float16 changes perplexity by {increase:+.2f}% (gate ±{MAX_PPL_INCREASE}%); keep "
                            "fp32, or pass --allow-accuracy-loss")
    writer.copy_text_files(parent)
    return writer.commit(io=parent.io, metrics=metrics, precision="fp16")
