"""Verification of an engine against the fp32 export, after every build.

Two checks, either of which fails the build (exit 3):
- logits on the same feeds, compared with Polygraphy's comparator (per-output tolerance and error statistic
  by precision: an fp32 engine must match elementwise, a quantized one on average);
- perplexity and top-1 agreement through the runtime, the way services run it: the engine may not lose
  more than `PPL_SLACK_POINTS` beyond what its parent artifact already gave up (its calibration gate).
On failure the first linear layer whose output diverges from the parent graph is named (Polygraphy marks the
layers' outputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

import runtime
from runtime import accuracy, behaviour
from runtime.artifact import MODEL_FILE, Artifact
from runtime.contract import prefill_feeds
from runtime.errors import AccuracyError
from runtime.session import SessionOptions
from runtime.text import load_codec

STAGE = "engine"  # the stage whose gate this is (engines/ort.py and engines/trt.py both write "engine")

# (error statistic, absolute tolerance) on logits against the fp32 export, by precision.
LOGITS_TOLERANCE = {"fp32": ("max", 1e-3), "fp16": ("mean", 5e-2), "int8": ("mean", 1.0),
                    "int8-weight-only": ("mean", 0.5), "int4": ("mean", 2.0),
                    "mixed": ("mean", 2.0)}
# Percentage points of perplexity an engine may add to its parent's (fusions reorder float sums; with int8
# activations that can flip a rounding, but it must never cost real accuracy).
PPL_SLACK_POINTS = 0.5
LAYER_DIVERGENCE = 1e-2  # relative error at which a linear layer's output counts as diverged


@dataclass(frozen=True)
class Reference:
    """What every engine of one export is checked against: the fp32 graph and its held-out evaluation."""

    export: Artifact
    windows: np.ndarray
    evaluation: accuracy.Evaluation
    threads: int
    domain: str = accuracy.HELD_OUT  # the text the windows come from
    # The same reference on windows cut to an engine's length limit, by limit (each evaluated once per build).
    shortened: dict[int, Reference] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, export: Artifact, windows: np.ndarray, threads: int, domain: str = accuracy.HELD_OUT) -> Reference:
        evaluation = accuracy.evaluate_model(export.file(MODEL_FILE), export.model_facts, windows, threads)
        return cls(export, windows, evaluation, threads, domain)

    def within(self, max_sequence: int | None) -> Reference:
        """The reference on windows no longer than an engine accepts (a TensorRT plan's --max-seq; the
        calibration windows are longer by default): each window's first tokens, the fp32 graph evaluated on them.
        Feeding the whole windows would ask the plan for a prompt beyond its profile."""
        if not max_sequence or self.windows.shape[1] <= max_sequence:
            return self
        if max_sequence not in self.shortened:
            self.shortened[max_sequence] = Reference.of(self.export, self.windows[:, :max_sequence], self.threads,
                                                        self.domain)
        return self.shortened[max_sequence]


@dataclass(frozen=True)
class Baseline:
    """What every engine (and the fp16 stage) of one build is checked against: the float graph on each held-out
    text domain, and the unpruned model's answers to the behaviour probes (None where it has no chat template)."""

    references: tuple[Reference, ...]
    answers: behaviour.Answers | None = None
    min_answer_agreement: float | None = None  # the gate on the behaviour check (None: report only)


def verify(engine: Artifact, parent: Artifact, baseline: Baseline) -> list[accuracy.AccuracyRecord]:
    """The engine's accuracy records against the float graph, one per held-out text domain, and its behaviour
    check against the unpruned model; raises AccuracyError when any fails."""
    precision = engine.manifest.get("precision", "fp32")
    limit = engine.metrics.get("max_sequence")
    first = baseline.references[0].within(limit)
    logits = compare_logits(first.export, engine, first.windows[:2], precision, first.threads)
    problems = []
    if not logits["passed"]:
        problems.append(f"{logits['statistic']} |dlogits| {logits[logits['statistic']]:.3g} over the "
                        f"{precision} tolerance {logits['tolerance']:g}")
    logit_figures = {"logits_diff": logits[logits["statistic"]], "logits_statistic": logits["statistic"],
                     "logits_limit": logits["tolerance"]}
    records = []
    session = runtime.open(engine, SessionOptions(threads=first.threads))
    try:
        for reference in baseline.references:
            # What the parent gave up was measured on the full windows; the engine, on the windows it accepts.
            allowed = parent_increase(parent, reference) + PPL_SLACK_POINTS
            shortened = reference.within(limit)
            evaluation = accuracy.evaluate_session(session, shortened.windows)
            increase = evaluation.increase_over(shortened.evaluation)
            extra = logit_figures if reference is baseline.references[0] else {}
            records.append(accuracy.AccuracyRecord.of(
                STAGE, "fp32", evaluation, shortened.evaluation, limit=allowed, domain=reference.domain,
                passed=increase <= allowed and (logits["passed"] or not extra), **extra))
            if increase > allowed:
                problems.append(f"perplexity +{increase:.2f}% over fp32 on {reference.domain}, more than the "
                                f"{allowed:.2f}% allowed")
        if baseline.answers is not None:
            records.append(behaviour_record(behaviour.answer(session, load_codec(engine)), baseline))
            if not records[-1].passed:
                problems.append(f"answers agree with the unpruned model's on {records[-1].answer_agreement:.2f} "
                                f"of the probes, under --min-answer-agreement {baseline.min_answer_agreement:g}")
    finally:
        session.close()
    if problems:
        # Marking intermediate outputs needs the engine's ONNX; a TensorRT plan has none.
        layer = first_divergent_layer(parent, engine, first.windows[0]) if MODEL_FILE in engine.manifest[
            "files"] else None
        where = f"; first diverging layer: {layer}" if layer else ""
        raise AccuracyError(f"engine verification failed: {'; '.join(problems)}{where}. Rebuild without the "
                            "fusion (--no-fuse-attention) or report the model")
    return records


BEHAVIOUR = "behaviour probes"  # the behaviour check's record's domain


def behaviour_record(answers: behaviour.Answers, baseline: Baseline) -> accuracy.AccuracyRecord:
    agreement, limit = answers.agreement(baseline.answers), baseline.min_answer_agreement
    return accuracy.AccuracyRecord(STAGE, "unpruned", passed=limit is None or agreement >= limit,
                                   answer_agreement=agreement, answer_limit=limit, windows=len(behaviour.PROBES),
                                   domain=BEHAVIOUR)


def parent_increase(parent: Artifact, reference: Reference) -> float:
    """The perplexity increase the parent artifact was accepted with on the reference's domain: 0 when the parent
    is the reference graph itself (or never measured that domain), else the increase its own gate measured, on
    its own windows against its own float baseline (a ratio of perplexities from different windows would be
    meaningless)."""
    if parent.id == reference.export.id:
        return 0.0
    record = next((r for r in accuracy.records_of(parent.metrics) if r.domain == reference.domain), None)
    increase = record.perplexity_increase_percent if record else None
    # A parent that measured better than float (int8 can, on a few windows) grants nothing below zero: the engine
    # is held to float32 plus the slack, not to the parent's luck.
    return max(increase or 0.0, 0.0)


def compare_logits(reference: Artifact, engine: Artifact, windows: np.ndarray, precision: str,
                   threads: int) -> dict[str, Any]:
    """Polygraphy's comparator on the logits of both graphs for the same prefill feeds."""
    from polygraphy.comparator import Comparator, SimpleCompareFunc

    quiet_polygraphy()
    statistic, tolerance = LOGITS_TOLERANCE.get(precision, LOGITS_TOLERANCE["int8"])
    feeds = [prefill_feeds(window[None], reference.model_facts) for window in windows]
    runners = [_runner(reference.file(MODEL_FILE), "fp32", threads), _engine_runner(engine, threads)]
    results = Comparator.run(runners, data_loader=feeds)
    only_logits = SimpleCompareFunc(atol={"logits": tolerance}, rtol={"logits": 0.0},
                                     check_error_stat={"logits": statistic},
                                     find_output_func=lambda name, index, result: [name] if name == "logits" else [])
    passed = bool(Comparator.compare_accuracy(results, compare_func=only_logits))
    diffs = [np.abs(a["logits"] - b["logits"]) for a, b in zip(results[0][1], results[1][1])]
    return {"passed": passed, "statistic": statistic, "tolerance": tolerance,
            "max": float(max(d.max() for d in diffs)), "mean": float(np.mean([d.mean() for d in diffs]))}


def _engine_runner(engine: Artifact, threads: int):
    """Polygraphy's runner for the engine's own backend: TensorRT's plan (prefill profile) or the ONNX."""
    if engine.manifest.get("backend") == "trt":
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        from runtime.trt_session import PLAN_FILE, PREFILL_PROFILE

        return TrtRunner(EngineFromBytes(engine.file(PLAN_FILE).read_bytes()), name="engine",
                         optimization_profile=PREFILL_PROFILE)
    return _runner(engine.file(MODEL_FILE), "engine", threads)


def _runner(path, name: str, threads: int):
    import onnxruntime
    from polygraphy.backend.onnxrt import OnnxrtRunner

    def session():
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    return OnnxrtRunner(session, name=name)


def first_divergent_layer(parent: Artifact, engine: Artifact, window: np.ndarray) -> str | None:
    """The first linear layer (in graph order) whose output differs between the parent graph and the engine,
    found by marking every named layer's output in both and running them on one window."""
    names = parent.model_facts.get("linear_layers", [])
    feeds = prefill_feeds(window[None], parent.model_facts)
    outputs = {role: layer_outputs(artifact, names, feeds) for role, artifact in (("parent", parent),
                                                                                  ("engine", engine))}
    for layer in names:
        a, b = outputs["parent"].get(layer), outputs["engine"].get(layer)
        if a is None or b is None or a.shape != b.shape:
            continue
        if np.abs(a - b).max() > LAYER_DIVERGENCE * max(np.abs(a).max(), 1e-6):
            return layer
    return None


def layer_outputs(artifact: Artifact, layers: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each named layer's output on `feeds`: Polygraphy marks the layers' output tensors as the graph's outputs
    (ModifyOutputs) and runs it. Polygraphy marks tensors, not nodes: the layer names (node names) are ours to
    resolve, and layers the graph does not name (fused away) are left out."""
    from polygraphy.backend.onnx import BytesFromOnnx, ModifyOutputs, OnnxFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    quiet_polygraphy()
    model = OnnxFromPath(str(artifact.file(MODEL_FILE)))()
    produced = {node.name: node.output[0] for node in model.graph.node}
    marked = {layer: produced[layer] for layer in layers if layer in produced}
    if not marked:
        return {}
    session = SessionFromOnnx(BytesFromOnnx(ModifyOutputs(model, outputs=list(marked.values()))), providers=["cpu"])
    with OnnxrtRunner(session) as runner:
        values = runner.infer(feeds)
    return {layer: values[output] for layer, output in marked.items()}


def quiet_polygraphy() -> None:
    """Polygraphy's per-run reports would bury our progress lines: errors only."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
