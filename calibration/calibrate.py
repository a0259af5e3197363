"""The calibrate stage: fp32 artifact + sample text → an int8, int8-weight-only, int4 or mixed 4/8-bit Q/DQ
artifact that keeps accuracy, or a clear failure naming the layers that cost it.

Steps: evaluate the parent; SmoothQuant (int8, and int8-weight-only, whose MatMulNBits quantizes its
inputs at run time); activation statistics of the smoothed graph (int8), or the calibrated 4-bit weights
(int4, mixed: calibration/int4.py); emit Q/DQ; evaluate; while the perplexity increase is over budget, return
the most sensitive layers to float (never more than `max_float_fraction` of them) and evaluate again. mixed
gives layers 8 bits instead of float, the fewest that meet the gate or as many as --max-size allows.
"""

from __future__ import annotations

import fnmatch
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from calibration.int4 import LIBRARY_METHODS, calibrate_int4, on_source_grid, source_grids
from calibration.int4 import METHODS as INT4_METHODS
from export.graph import stats
from export.graph.data import DataConfig, stage_text
from export.graph.gptq import Int4Spec, Int4WeightsPass, SourceGridPass, UntiePass
from export.graph.linear import linear_nodes, projection_nodes, projection_weight, weight_array, weight_axis
from export.graph.qdq import (
    BLOCKS,
    QuantizeLinearLayersPass,
    fake_quantize_activation,
    fake_quantize_weight,
    fake_quantize_weight_blocked,
    quantize_int4,
)
from export.graph.rotation import RotateDownProjInputPass, RotateResidualPass
from export.graph.sequence import PassSequence
from export.graph.smoothquant import SmoothQuantPass
from runtime import accuracy
from runtime.artifact import MODEL_FILE, Artifact, ArtifactWriter
from runtime.errors import AccuracyError, BadInputError
from runtime.ranges import check_ranges, ranged

STAGE = "calibrate"
PRECISIONS = ("int8", "int8-weight-only", "int4", "mixed")
# The precisions whose linear layers take 4-bit weights: int4 every one but the weight-only int8 ones (the LM
# head); mixed, each 4 or 8 bits, the fewest bytes that meet the gate (or the most accuracy within --max-size).
FOUR_BIT = ("int4", "mixed")
# int8-weight-only is smoothed too: MatMulNBits quantizes its input per block at run time (int8 compute),
# where the outliers do the damage; the strengths are the best measured (README, "INT8"). int4 weights have no
# range left to take outliers.
SMOOTHQUANT_ALPHA = {"int8": 0.75, "int8-weight-only": 0.5}


@dataclass(frozen=True)
class CalibrationConfig:
    # 'int8' (W8A8: weights per channel, activations per tensor), 'int8-weight-only' or 'int4' (weights only,
    # symmetric, in blocks of input channels: qdq.BLOCKS).
    precision: str = "int8"
    # How an activation's clipping range is chosen from its histogram: minmax, percentile, entropy or mse.
    method: str = "mse"
    # SmoothQuant's migration strength: 0 leaves outliers in the activations, 1 moves them all to weights.
    # None: the precision's own (SMOOTHQUANT_ALPHA); negative: no SmoothQuant.
    smoothquant_alpha: float | None = None
    # Rotate the residual stream by a random orthogonal matrix first (QuaRot-style; RMSNorm models only).
    # Off by default: it measured worse than SmoothQuant alone (README, "INT8").
    rotate: bool = False
    # Rotate each down_proj input by a block Hadamard at run time (QuaRot's online rotation), so that the
    # down_proj are W8A8 too. Off by default: the dense Hadamard MatMul costs more decode speed than the int8
    # down_proj win back (README, "INT8").
    online_rotation: bool = False
    # How int4 weights are chosen: rtn (round-to-nearest) and hqq (half-quadratic optimization of a scale and a
    # float zero point per block; MatMulNBits, ONNX Runtime only) are onnxruntime's quantizer's, without data; awq
    # (activation-aware scales folded into the graph, then rounding), gptq (rounding that compensates each error
    # on the layer's calibration inputs) and awq+gptq are ours; grid keeps the 4-bit grid of a Q4_1 source where
    # a layer's weights lie on it exactly (ONNX Runtime only) and rounds the rest. hqq and grid write float zero
    # points, for which onnxruntime 1.32's CPU MatMulNBits has no fast kernel: such a layer measured 37x slower
    # than a symmetric one (FLOAT_ZERO_POINT_NOTE). README, "INT4", has what each measured.
    int4_method: str = "awq+gptq"
    int4_block: int = 32  # input channels per scale: 32, 64 or 128 (fewer bytes per weight, less accuracy)
    int4_symmetric: bool = True  # False: a zero point per block (uint4), for the calibrated methods
    int4_act_order: bool = True  # GPTQ visits the input channels of most energy first
    # The LM head takes 4 bits too at int4 (at mixed: unless the search gives it 8), untied from the embedding
    # table: a decode step reads about half the bytes there, for some accuracy (README, "INT4").
    int4_lm_head: bool = False
    # Linear layers left wholly in float, by name.
    keep_fp: tuple[str, ...] = ()
    # Linear layers (names or fnmatch patterns) whose weights alone become int8 (input left in float) at
    # every precision: per channel, in blocks at int8-weight-only. The LM head: int8 or int4 activations
    # there cost accuracy, and in float its weights are a fifth of what each decode step reads.
    weight_only_int8: tuple[str, ...] = ("lm_head",)
    # The same, at int8 only (unless online_rotation makes their inputs quantizable). A down_proj reads
    # silu(gate) * up, whose outliers no per-tensor scale takes: the layers the search returned to float
    # were down_proj. Weight-only, they keep more accuracy than W8A8 and decode faster than float (ONNX
    # Runtime runs them as MatMulNBits; README, "INT8"). TensorRT gets the LM head's form: per-channel int8
    # weights behind a DequantizeLinear, float input; whether it keeps them int8 or folds them to float is
    # unverified (no TensorRT here).
    weight_only_at_int8: tuple[str, ...] = ("*.mlp.down_proj",)
    # The accuracy gate: perplexity increase over the fp32 parent, in percent.
    max_ppl_increase: float = ranged(3.0, "--max-ppl-increase", low=0)
    # Never return more than this share of the linear layers to float: past it, it is not an int8 engine.
    max_float_fraction: float = ranged(0.10, "--max-float-fraction", low=0, high=1)
    # mixed: the largest calibrated model, in MB, instead of the fewest bytes that meet the gate: the layers that
    # lose most per byte saved stay 8-bit while they fit (the gate still applies).
    max_size_mb: float | None = ranged(None, "--max-size", low=0, low_open=True)
    # Write the artifact even when the gate is missed (the metrics still say so).
    allow_accuracy_loss: bool = False
    threads: int = ranged(os.cpu_count() or 1, "--threads", low=1)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self):
        check_ranges(self)
        if self.precision not in PRECISIONS:
            raise BadInputError(f"calibration precision {self.precision!r} unknown; choose one of {PRECISIONS}")
        if self.method not in stats.METHODS:
            raise BadInputError(f"--calib-method {self.method!r} is unknown; choose one of {', '.join(stats.METHODS)}")
        if self.int4_method not in INT4_METHODS:
            raise BadInputError(f"unknown int4 method {self.int4_method!r}; choose one of {', '.join(INT4_METHODS)}")
        if self.int4_method in ("rtn", "grid") and (self.int4_block, self.int4_symmetric) != (BLOCKS["int4"], True):
            raise BadInputError(f"--int4-method {self.int4_method} writes blocks of 32 (the source's, or onnxruntime's "
                                "symmetric ones); --int4-block and --int4-asymmetric need another method (hqq, awq, "
                                "gptq, awq+gptq)")
        Int4Spec(self.int4_block, self.int4_symmetric)  # a block size it cannot write fails here, before any work


def check_precisions(config: CalibrationConfig, precisions: tuple[str, ...]) -> None:
    """What the calibration flags mean only for some precisions, checked against those the build makes."""
    if config.int4_lm_head and not set(FOUR_BIT) & set(precisions):
        raise BadInputError("--int4-lm-head gives the LM head 4 bits at --precision int4 or mixed; build one of "
                            "them, or drop it")
    if config.max_size_mb is not None and "mixed" not in precisions:
        raise BadInputError("--max-size is the budget of --precision mixed (which chooses 4 or 8 bits per layer); "
                            "drop it, or build mixed")
    if "mixed" in precisions and config.int4_method in ("hqq", "grid"):
        raise BadInputError(f"--precision mixed takes int4 blocks with integer zero points, not --int4-method "
                            f"{config.int4_method}'s float zero points; choose rtn, awq, gptq or awq+gptq")


def smoothquant_strength(config: CalibrationConfig) -> float | None:
    """The SmoothQuant alpha this build applies, or None for none."""
    if config.precision not in SMOOTHQUANT_ALPHA:
        return None
    alpha = SMOOTHQUANT_ALPHA[config.precision] if config.smoothquant_alpha is None else config.smoothquant_alpha
    return alpha if alpha >= 0 else None


def stage_config(config: CalibrationConfig) -> dict[str, Any]:
    return asdict(config)


def check_layers(config: CalibrationConfig, layers: list[str]) -> None:
    """What the config can only be checked against once the model is known: the layers --keep-fp names."""
    unknown = [name for name in config.keep_fp if name not in layers]
    if unknown:
        raise BadInputError(f"--keep-fp names no linear layer: {', '.join(unknown)}; layers look like "
                            f"{layers[0]!r} (see the export artifact's manifest, io.model.linear_layers)")


def weight_only_layers(config: CalibrationConfig, layers: list[str]) -> list[str]:
    """The layers of this model that become weight-only int8 (families name their LM head differently)."""
    patterns = () if config.precision in FOUR_BIT and config.int4_lm_head else config.weight_only_int8
    if config.precision == "int8" and not config.online_rotation:
        patterns += config.weight_only_at_int8
    return _named(patterns, layers, config)


def _named(patterns: tuple[str, ...], layers: list[str], config: CalibrationConfig) -> list[str]:
    """The layers (not kept in float) that any of the names or fnmatch patterns match."""
    return [name for name in layers if name not in config.keep_fp
            and any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]


@dataclass
class Candidate:
    kept: list[str]  # returned to float
    evaluations: dict[str, accuracy.Evaluation]  # by text domain
    increase: float  # the largest perplexity increase over the domains
    path: Path
    eight_bit: list[str] = field(default_factory=list)  # mixed: the layers given 8 bits


def run(parent: Artifact, writer: ArtifactWriter, config: CalibrationConfig, generations: list[dict] | None = None,
        progress=print) -> Artifact:
    """The Q/DQ (or weight-only) graph of `parent`, ranges from the calibration text; its gate holds on every
    held-out domain (`generations`: the teacher's answers, a second domain)."""
    started = time.perf_counter()
    facts = parent.model_facts
    layers = facts["linear_layers"]
    check_layers(config, layers)
    if config.max_size_mb is not None:
        _check_size_floor(parent.file(MODEL_FILE), layers, config)
    samples, domains = stage_text(config.data, parent, generations, fit_on_teacher=False)
    with writer.working_folder() as work:
        progress("[calibrate] fp32 reference on held-out windows: "
                 + ", ".join(f"{len(w)} of {name}" for name, w in domains.items()))
        reference = accuracy.evaluate_model_on(parent.file(MODEL_FILE), facts, domains, config.threads)
        model_path, activation_scales, sensitivity, smoothed = _prepare(parent, config, samples, work, progress)
        chosen, tried = _search(model_path, activation_scales, sensitivity, reference, domains, config, facts,
                                work, progress)
        shutil.copyfile(chosen.path, writer.dir / MODEL_FILE)
        writer.copy_text_files(parent)
    metrics = {
        "accuracy": accuracy.as_metrics(accuracy.domain_records(STAGE, "fp32", chosen.evaluations, reference,
                                                                limit=config.max_ppl_increase)),
        "data": samples.source,
        "kept_in_float": chosen.kept,
        "always_float": [name for name in config.keep_fp if name not in chosen.kept],
        "weight_only_int8": weight_only_layers(config, layers),
        "float_fraction": len(chosen.kept) / len(sensitivity),
        "smoothquant_layers": 0 if config.precision in FOUR_BIT else len(smoothed),
        "tried": tried,
        "calibration_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if config.precision == "mixed":  # the plan, as a pruning plan is kept: which layers got 8 bits
        metrics["eight_bit"] = chosen.eight_bit  # the LM head's included
        metrics["four_bit"] = len(layers) - len(chosen.eight_bit) - len(chosen.kept)
    if config.precision in FOUR_BIT:  # what chose the weights; `smoothed` holds the layers AWQ scaled
        metrics["int4"] = {"method": config.int4_method, "block": config.int4_block,
                           "symmetric": config.int4_symmetric, "act_order": config.int4_act_order,
                           "awq_layers": len(smoothed),
                           "source_grid_layers": sum(map(on_source_grid, (activation_scales or {}).values()))}
    return writer.commit(io=parent.io, metrics=metrics, precision=config.precision)


def _prepare(parent: Artifact, config: CalibrationConfig, samples, work: Path, progress):
    """(graph to quantize, activation scales (at int4: the calibrated weights) or None, layer sensitivity order,
    smoothed (at int4: AWQ-scaled) layers)."""
    facts = parent.model_facts
    source = parent.file(MODEL_FILE)
    if config.precision in FOUR_BIT:  # weights only: no activation statistics
        if config.int4_lm_head:
            source = _untied_head(source, _named(config.weight_only_int8, facts["linear_layers"], config), work)
        if config.int4_method in ("hqq", "grid"):
            progress(f"[calibrate] int4 {config.int4_method}: {FLOAT_ZERO_POINT_NOTE}")
        if config.int4_method in LIBRARY_METHODS:
            return source, None, _weight_sensitivity(source, config.precision), []
        if config.int4_method == "grid":
            return _prepare_grid(source, config, facts, progress)
        return _prepare_int4(source, config, samples, facts, work, progress)
    model = ir.load(str(source))
    rotations = _rotations(config)
    if rotations:
        steps = PassSequence(*rotations)(model).steps
        source = work / "rotated.onnx"
        ir.save(model, source)
        for rotation, result in zip(rotations, steps):
            progress("[calibrate] " + ROTATION_PROGRESS[type(rotation)].format(len(result.rotated)))
    inputs = stats.linear_inputs(model, facts["linear_layers"])
    tensors = sorted(set(inputs.values()))
    smoothed: list[str] = []
    alpha = smoothquant_strength(config)
    if alpha is not None:
        channel_stats = stats.collect(source, tensors, samples.calibration[:16], facts, config.threads,
                                      scratch=work)
        # Not the weight-only layers: smoothing moves their input's outliers into int8 weights, and nothing
        # quantizes their input statically, so it would only cost them accuracy.
        skip = frozenset(config.keep_fp) | frozenset(weight_only_layers(config, facts["linear_layers"]))
        smoothing = SmoothQuantPass({name: s.channel_absmax for name, s in channel_stats.items()}, alpha=alpha,
                                    skip=skip)
        smoothed = smoothing(model).smoothed
        source = work / "smoothed.onnx"
        ir.save(model, source)
        progress(f"[calibrate] SmoothQuant (alpha {alpha}) folded into {len(smoothed)} layers")
    if config.precision == "int8-weight-only":
        return source, None, _weight_sensitivity(source, config.precision), smoothed
    progress(f"[calibrate] activation statistics of {len(tensors)} tensors on {len(samples.calibration)} windows")
    tensor_stats = stats.collect(source, tensors, samples.calibration, facts, config.threads, scratch=work)
    scales = {name: s.scale(config.method) for name, s in tensor_stats.items()}
    sensitivity = _activation_sensitivity(model, inputs, tensor_stats, scales)  # `model` is what `source` holds
    return source, scales, sensitivity, smoothed


def _untied_head(source: Path, heads: list[str], work: Path) -> Path:
    """The graph with the LM head (weight_only_int8's layers) reading a weight of its own, for int4 to reach."""
    model = ir.load(str(source))
    UntiePass(frozenset(heads))(model)
    untied = work / "untied.onnx"
    ir.save(model, untied)
    return untied


# Said at calibration, so nobody ships a grid or hqq engine unaware of its speed.
FLOAT_ZERO_POINT_NOTE = ("float zero points: accurate, but onnxruntime's CPU MatMulNBits has no fast kernel for "
                         "them (one layer measured 37x slower than symmetric int4); for speed use awq+gptq")


def _prepare_grid(source: Path, config: CalibrationConfig, facts: dict, progress):
    """The layers whose weights already lie on a 4-bit grid of 32 with a float minimum (a Q4_1 GGUF's) keep it;
    the others take onnxruntime's round-to-nearest. Sensitivity: the library's, as for rtn."""
    skip = frozenset(config.keep_fp) | frozenset(weight_only_layers(config, facts["linear_layers"]))
    grids = source_grids(ir.load(str(source)), skip)
    progress(f"[calibrate] int4 grid: {len(grids)} layers keep their source's 4-bit grid, the others are rounded")
    return source, grids, _weight_sensitivity(source, config.precision), []


def _prepare_int4(source: Path, config: CalibrationConfig, samples, facts: dict, work: Path, progress):
    """Calibrated int4: (graph with AWQ's folds, the int4 weights, layers by output error, AWQ-scaled layers)."""
    model = ir.load(str(source))
    progress(f"[calibrate] int4 {config.int4_method} (blocks of {config.int4_block}, "
             f"{'symmetric' if config.int4_symmetric else 'zero points'}) on {len(samples.calibration)} windows")
    skip = frozenset(config.keep_fp) | frozenset(weight_only_layers(config, facts["linear_layers"]))
    plan = calibrate_int4(model, source, samples.calibration, facts, config.threads,
                          Int4Spec(config.int4_block, config.int4_symmetric), config.int4_method,
                          config.int4_act_order, skip, scratch=work)
    scaled = work / "int4-scaled.onnx"
    ir.save(model, scaled)
    # mixed gives 8 bits first to the layers that lose most per byte the extra 4 bits cost
    cost = {name: plan.weights[name].values.size if config.precision == "mixed" else 1 for name in plan.errors}
    order = sorted(plan.errors, key=lambda name: plan.errors[name] / cost[name], reverse=True)
    return scaled, plan.weights, order, plan.awq_scaled


# The progress line each rotation reports, given how many layers it rotated.
ROTATION_PROGRESS = {RotateResidualPass: "residual stream rotated ({} layers)",
                     RotateDownProjInputPass: "online Hadamard before {} down_proj layers"}


def _rotations(config: CalibrationConfig) -> list[ir.passes.PassBase]:
    """The rotations the config asks for, in the order they compose: the residual stream first (it changes the
    weights the online rotation then multiplies)."""
    return ([RotateResidualPass(seed=config.data.seed)] if config.rotate else []) + (
        [RotateDownProjInputPass()] if config.online_rotation else [])


def _activation_sensitivity(model: ir.Model, inputs: dict[str, str], tensor_stats, scales) -> list[str]:
    """Layers ordered from most to least damaged by W8A8: relative output error on sampled input rows."""
    errors = {}
    for node in linear_nodes(model.graph):
        x = tensor_stats[inputs[node.name]].rows
        weight, axis = weight_array(node), weight_axis(node)
        w = weight if axis == 1 else weight.T
        exact = x @ w
        approx = fake_quantize_activation(x, scales[inputs[node.name]]) @ fake_quantize_weight(w, 1)
        errors[node.name] = float(np.linalg.norm(approx - exact) / max(np.linalg.norm(exact), 1e-12))
    return sorted(errors, key=errors.get, reverse=True)


def _weight_sensitivity(source: Path, precision: str) -> list[str]:
    errors = {}
    for node in linear_nodes(ir.load(str(source)).graph):
        weight, axis = weight_array(node), weight_axis(node)
        restored = fake_quantize_weight_blocked(weight, axis, precision)
        error = np.linalg.norm(restored - weight) / max(np.linalg.norm(weight), 1e-12)
        errors[node.name] = float(error)
    return sorted(errors, key=errors.get, reverse=True)


def _emit(model_path: Path, keep: list[str], weight_only: list[str], scales, destination: Path,
          precision: str, int4: tuple[str, int] = ("rtn", BLOCKS["int4"])) -> Path:
    """The candidate graph. `scales`: the activation scales at int8; at int4, the calibrated int4 weights by
    layer: their own source grid or calibrated blocks; onnxruntime's quantizer takes every other layer (by `int4`:
    the method and block)."""
    model = ir.load(str(model_path))
    if precision == "int8-weight-only":
        QuantizeLinearLayersPass(frozenset(keep), block=BLOCKS[precision])(model)
    elif precision in FOUR_BIT:  # the weight-only int8 layers first (per channel, which TensorRT also takes;
        # it takes blocks in int4 only): the int4 quantizer then skips them
        others = frozenset(node.name for node in projection_nodes(model.graph)) - frozenset(weight_only)
        QuantizeLinearLayersPass(others)(model)
        eight_bit_or_float = frozenset(keep) | frozenset(weight_only)
        given = {name: weight for name, weight in (scales or {}).items() if name not in eight_bit_or_float}
        SourceGridPass({name: w for name, w in given.items() if on_source_grid(w)})(model)
        Int4WeightsPass({name: w for name, w in given.items() if not on_source_grid(w)})(model)
    else:  # int8; the layers the search returns go wholly to float (the weight-only ones are chosen up front)
        QuantizeLinearLayersPass(frozenset(keep), scales, weight_only=frozenset(weight_only))(model)
    ir.save(model, destination)
    if precision in FOUR_BIT:  # what no given weight covers: onnxruntime's quantizer (rtn, or hqq when chosen)
        covered = frozenset(keep) | frozenset(weight_only) | frozenset(scales or {})
        quantize_int4(destination, destination, exclude=covered, algorithm="hqq" if int4[0] == "hqq" else "rtn",
                      block=int4[1])
    return destination


def _search(model_path, scales, sensitivity, reference, domains, config, facts, work, progress):
    """Fewest layers in float that meet the gate: the always-kept ones, then the most sensitive, doubling."""
    if config.precision == "mixed":
        return _search_bits(model_path, scales, sensitivity, reference, domains, config, facts, work, progress)
    weight_only = weight_only_layers(config, facts["linear_layers"])
    layers = [name for name in sensitivity if name not in weight_only]  # most sensitive first
    budget = int(config.max_float_fraction * len(layers))
    base = [name for name in config.keep_fp if name in layers]
    extra_counts = [0] + [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= budget - len(base)]
    if budget - len(base) > 0 and extra_counts[-1] != budget - len(base):
        extra_counts.append(budget - len(base))
    tried = []
    best = None
    for extra in extra_counts:
        kept = base + [name for name in layers if name not in base][:extra]
        path = _emit(model_path, kept, weight_only, scales, work / f"candidate-{extra}.onnx", config.precision,
                     (config.int4_method, config.int4_block))
        evaluations, increase, agreement = _measure(path, reference, domains, config, facts)
        tried.append({"kept_in_float": len(kept), "perplexity_increase_percent": increase,
                      "top1_agreement": agreement})
        progress(f"[calibrate] {len(kept)} layers in float: perplexity {increase:+.2f}% (worst domain), top-1 "
                 f"agreement {agreement:.3f}")
        candidate = Candidate(kept, evaluations, increase, path)
        if best is None or increase < best.increase:
            best = candidate
        if increase <= config.max_ppl_increase:
            return candidate, tried
    if not config.allow_accuracy_loss:
        raise AccuracyError(f"{config.precision} misses the accuracy gate: perplexity {best.increase:+.1f}% (limit "
                            f"{config.max_ppl_increase:+.1f}%) even with {len(best.kept)} of {len(layers)} layers in "
                            f"float; most sensitive layers: {', '.join(sensitivity[:5])}; raise --max-ppl-increase, "
                            "or pass --allow-accuracy-loss")
    return best, tried


def _measure(path: Path, reference, domains, config: CalibrationConfig, facts: dict):
    """A candidate on every held-out domain: (evaluations by domain, the worst perplexity increase over the
    reference, top-1 agreement on the calibration text's held-out windows)."""
    evaluations = accuracy.evaluate_model_on(path, facts, domains, config.threads)
    agreement = evaluations[accuracy.HELD_OUT].agreement(reference[accuracy.HELD_OUT])
    return evaluations, accuracy.worst_increase(evaluations, reference), agreement


def _search_bits(model_path, weights, order, reference, domains, config, facts, work, progress):
    """mixed: the fewest 8-bit layers (most loss per byte saved first) whose model meets the gate: doubling until
    one does, then halving the gap to the last that did not; or, under --max-size, the most that fit."""
    fixed = weight_only_layers(config, facts["linear_layers"])
    layers = [name for name in order if name not in fixed and name not in config.keep_fp]
    tried, seen = [], {}

    def evaluate(count: int) -> Candidate:
        if count not in seen:
            eight_bit = fixed + layers[:count]
            path = _emit(model_path, list(config.keep_fp), eight_bit, weights, work / f"candidate-{count}.onnx",
                         config.precision, (config.int4_method, config.int4_block))
            evaluations, increase, agreement = _measure(path, reference, domains, config, facts)
            size = path.stat().st_size
            tried.append({"eight_bit": count, "model_bytes": size, "perplexity_increase_percent": increase,
                          "top1_agreement": agreement})
            progress(f"[calibrate] {count} of {len(layers)} layers 8-bit, {size / 1e6:.1f} MB: perplexity "
                     f"{increase:+.2f}% (worst domain), top-1 agreement {agreement:.3f}")
            seen[count] = Candidate(list(config.keep_fp), evaluations, increase, path, eight_bit)
        return seen[count]

    if config.max_size_mb is not None:
        chosen = evaluate(_fitting_count(evaluate(0).path, model_path, layers, config))
    else:
        chosen = _fewest_passing(evaluate, len(layers), config.max_ppl_increase)
    if chosen.increase > config.max_ppl_increase and not config.allow_accuracy_loss:
        within = (f"within --max-size {config.max_size_mb:g} MB" if config.max_size_mb is not None
                  else "even with every layer 8-bit")
        raise AccuracyError(f"mixed misses the accuracy gate: perplexity {chosen.increase:+.1f}% (limit "
                            f"{config.max_ppl_increase:+.1f}%) {within}; raise --max-ppl-increase"
                            f"{' or --max-size' if config.max_size_mb is not None else ''}, build int8-weight-only, "
                            "or pass --allow-accuracy-loss")
    return chosen, tried


def _fewest_passing(evaluate, most: int, limit: float) -> Candidate:
    """The candidate of the smallest count that meets `limit`, searched by doubling then bisecting (accuracy
    rises with the count, not strictly: the search settles within an eighth of the count); every layer 8-bit
    when none meets it."""
    failed, count = -1, 0
    while evaluate(count).increase > limit:
        if count == most:
            return evaluate(most)
        failed, count = count, min(most, max(1, 2 * count))
    passed = count
    while passed - failed > max(1, passed // 8):
        middle = (passed + failed) // 2
        if evaluate(middle).increase <= limit:
            passed = middle
        else:
            failed = middle
    return evaluate(passed)


def _check_size_floor(source: Path, layers: list[str], config: CalibrationConfig) -> None:
    """Refuse a --max-size below the all-4-bit model before any calibration: its size is known, up to the graph's
    own few hundred bytes a layer, from the parent's weights."""
    floor = _all_four_bit_bytes(source, weight_only_layers(config, layers), config)
    if floor > config.max_size_mb * 1e6:
        raise BadInputError(f"--max-size {config.max_size_mb:g} MB is below this model with every layer 4-bit "
                            f"(at least {floor / 1e6:.1f} MB); raise it, or build int4")


def _all_four_bit_bytes(source: Path, eight_bit: list[str], config: CalibrationConfig) -> int:
    """The file `source` becomes with every layer but `eight_bit` and --keep-fp 4-bit, less the nodes and names
    quantizing adds. A tied head's table stays float for the embedding lookup, so its quantized copy adds bytes
    instead of replacing any."""
    size = source.stat().st_size
    for node in projection_nodes(ir.load(str(source)).graph):
        if node.name in config.keep_fp:
            continue
        shape = _layer_shape(node)
        size += _eight_bit_bytes(shape) if node.name in eight_bit else _four_bit_bytes(shape, config)
        if node.inputs[1].is_initializer():
            size -= node.inputs[1].const_value.nbytes
    return size


def _layer_shape(node: ir.Node) -> tuple[int, int]:
    """[in, out] of a layer's weight, however the graph holds it."""
    shape = projection_weight(node).shape
    return shape if weight_axis(node) == 1 else shape[::-1]


def _fitting_count(all_four_bit: Path, model_path: Path, layers: list[str], config: CalibrationConfig) -> int:
    """How many of `layers`, in order, can take 8 bits with the model within --max-size."""
    size = all_four_bit.stat().st_size
    if size > config.max_size_mb * 1e6:  # the floor checked at the start leaves out the graph's own bytes
        raise BadInputError(f"--max-size {config.max_size_mb:g} MB is below this model with every layer 4-bit "
                            f"({size / 1e6:.1f} MB); raise it, or build int4")
    shapes = {node.name: _layer_shape(node) for node in linear_nodes(ir.load(str(model_path)).graph)}
    count = 0
    for name in layers:
        size += _eight_bit_bytes(shapes[name]) - _four_bit_bytes(shapes[name], config)
        if size > config.max_size_mb * 1e6:
            break
        count += 1
    return count


def _eight_bit_bytes(shape: tuple[int, int]) -> int:
    """A [in, out] layer at 8 bits: int8 values and a float scale per output channel (the LM head's form)."""
    rows, columns = shape
    return rows * columns + 4 * columns


def _four_bit_bytes(shape: tuple[int, int], config: CalibrationConfig) -> int:
    """A [in, out] layer at 4 bits: int4 values and a float scale (and a uint4 zero point, asymmetric) per block."""
    rows, columns = shape
    blocks = -(-rows // config.int4_block) * columns
    return rows * columns // 2 + 4 * blocks + (0 if config.int4_symmetric else blocks // 2)
