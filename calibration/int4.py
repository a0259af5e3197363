"""Calibrated int4 weights for the calibrate stage: per group of linear layers reading one activation (q/k/v,
gate/up, down, o), its Gram matrix from the calibration windows, then AWQ's scaling (folded into the graph) and
GPTQ's error-compensating rounding, or either alone. One Gram at a time is held beyond the collection budget
(`stats.gram_matrices`); what is kept is the quantized weights and each layer's output error.

Round-to-nearest and HQQ need no data and stay with onnxruntime's quantizer (`qdq.quantize_int4`); this module
is what it lacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from export.graph import stats
from export.graph.awq import AwqPass, gram_error, scaled_gram
from export.graph.gptq import GptqConfig, Int4Spec, Int4Weight, gptq, rtn, source_grid
from export.graph.linear import linear_groups, linear_nodes, weight_array, weight_axis

# onnxruntime's quantizer's (no data) and ours (calibrated on the Gram matrices)
LIBRARY_METHODS = ("rtn", "hqq")
CALIBRATED_METHODS = ("awq", "gptq", "awq+gptq")
METHODS = (*LIBRARY_METHODS, *CALIBRATED_METHODS, "grid")


@dataclass
class Int4Plan:
    weights: dict[str, Int4Weight] = field(default_factory=dict)  # layer -> its int4 weight
    errors: dict[str, float] = field(default_factory=dict)  # layer -> relative output error on calibration data
    awq_scaled: list[str] = field(default_factory=list)  # layers whose input AWQ scaled (folded into `model`)


def _groups(model: ir.Model, skip: frozenset[str]) -> dict[str, list[ir.Node]]:
    """Activation -> the MatMul layers reading it, where all of them can take int4 blocks and none is skipped.
    A down_proj's input comes before its layer's gate/up input: AWQ folds the down_proj scales into up_proj's
    weights, which must happen before up_proj is itself quantized."""
    groups = {x.name: nodes for x, nodes in linear_groups(model.graph).items()
              if all(n.op_type == "MatMul" and weight_axis(n) == 1 and n.name not in skip for n in nodes)}
    down_first = sorted(groups, key=lambda name: (_layer_of(groups[name][0]), not _is_down(groups[name])))
    return {name: groups[name] for name in down_first}


def _layer_of(node: ir.Node) -> int:
    parts = node.name.split(".")
    return next((int(part) for part in parts if part.isdigit()), 1 << 30)


def _is_down(nodes: list[ir.Node]) -> bool:
    return any(node.name.endswith("down_proj") for node in nodes)


def _split(quantized: Int4Weight, widths: list[int]) -> list[Int4Weight]:
    """A group's weight (concatenated along out) back into its layers'."""
    edges = np.cumsum([0, *widths])
    zero = quantized.zero_point
    return [Int4Weight(quantized.values[:, a:b], quantized.scale[:, a:b], None if zero is None else zero[:, a:b],
                       quantized.block) for a, b in zip(edges[:-1], edges[1:])]


def calibrate_int4(model: ir.Model, source: Path, samples: np.ndarray, facts: dict, threads: int, spec: Int4Spec,
                   method: str, act_order: bool = True, skip: frozenset[str] = frozenset(),
                   scratch: Path | None = None) -> Int4Plan:
    """Quantize every groupable MatMul layer of `model` (whose graph is `source` on disk, as the Grams are
    collected from it) by `method`; AWQ's folds are applied to `model` in place."""
    if method not in CALIBRATED_METHODS:
        raise ValueError(f"calibrated int4 method {method!r} unknown; choose one of {CALIBRATED_METHODS}")
    groups = _groups(model, skip)
    widths = {name: weight_array(nodes[0]).shape[0] for name, nodes in groups.items()}
    plan = Int4Plan()
    for tensor, gram in stats.gram_matrices(source, widths, samples, facts, threads, scratch=scratch):
        if method.startswith("awq"):
            result = AwqPass({tensor: gram}, spec)(model)
            plan.awq_scaled += result.scaled
            if tensor in result.scales:
                gram = scaled_gram(gram, result.scales[tensor])
        nodes = groups[tensor]
        weights = [weight_array(node) for node in nodes]  # after the fold
        whole = np.concatenate(weights, axis=1)
        quantized = gptq(whole, gram, spec, GptqConfig(act_order=act_order)) if method.endswith("gptq") else rtn(
            whole, spec)
        for node, weight, part in zip(nodes, weights, _split(quantized, [w.shape[1] for w in weights])):
            plan.weights[node.name] = part
            plan.errors[node.name] = gram_error(part.dequantized() - weight, gram) / max(
                gram_error(weight, gram), 1e-30)
    return plan


def source_grids(model: ir.Model, skip: frozenset[str] = frozenset()) -> dict[str, Int4Weight]:
    """The MatMul layers whose weights lie exactly on a 4-bit grid of 32 with a float minimum (a Q4_1 GGUF's),
    with that grid: carried as it is, they are rounded no second time."""
    grids = {}
    for node in linear_nodes(model.graph):
        if node.name not in skip and node.op_type == "MatMul" and weight_axis(node) == 1:
            grid = source_grid(weight_array(node))
            if grid is not None:
                grids[node.name] = grid
    return grids


def on_source_grid(weight: Int4Weight) -> bool:
    """A float zero point: a source grid (`source_grid`), which only MatMulNBits can carry."""
    return weight.zero_point is not None and weight.zero_point.dtype.kind == "f"
