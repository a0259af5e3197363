"""4-bit weights on the graph: round-to-nearest and GPTQ, written as blocked DequantizeLinear + MatMul (which
ONNX Runtime fuses into MatMulNBits and TensorRT reads as blocked int4).

Weights are [in, out] (MatMul's layout); a block is `block` consecutive input channels of one output channel,
with a scale (and, asymmetric, a zero point) of its own: MatMulNBits' layout.

GPTQ (Frantar et al. 2022) quantizes the input channels of a layer one at a time, in order, and spreads each
one's rounding error over the channels not yet quantized, weighted by the inverse Hessian of the layer's
inputs, H = XᵀX (the Gram matrix of its calibration activations). The output error ‖XW - XQ‖ is what it
minimises; round-to-nearest minimises ‖W - Q‖ alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from export.graph.linear import (
    add_initializer,
    linear_nodes,
    projection_nodes,
    projection_weight,
    weight_array,
    weight_axis,
)

BLOCK_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class Int4Spec:
    block: int = 32  # input channels per scale
    symmetric: bool = True  # int4 around zero; False: uint4 with a zero point per block

    def __post_init__(self):
        if self.block not in BLOCK_SIZES:
            raise ValueError(f"int4 block size {self.block} unsupported; choose one of {BLOCK_SIZES}")


@dataclass
class Int4Weight:
    """A weight as DequantizeLinear reads it: values [in, out], scales and zero points [blocks, out]."""

    values: np.ndarray  # int8 holding int4 (symmetric, -8..7) or uint4 (0..15) values
    scale: np.ndarray
    zero_point: np.ndarray | None  # None: symmetric (zero point 0)
    block: int

    def dequantized(self) -> np.ndarray:
        rows = self.values.shape[0]
        scale = np.repeat(self.scale, self.block, axis=0)[:rows]
        zero = 0 if self.zero_point is None else np.repeat(self.zero_point, self.block, axis=0)[:rows]
        return ((self.values.astype(np.float32) - zero) * scale).astype(np.float32)


def block_grid(rows: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) per output channel for one block of rows [block, out].
    Symmetric uses all 16 levels as MLAS does: the largest magnitude maps to -8 (the scale takes its sign), so
    nothing is clipped and no level is wasted. Asymmetric: [min, max] (zero included) onto 0..15."""
    if symmetric:
        extreme = np.take_along_axis(rows, np.abs(rows).argmax(axis=0)[None], axis=0)[0]
        scale = extreme / -8.0
        return np.where(scale != 0, scale, 1.0), np.zeros(rows.shape[1])
    low, high = np.minimum(rows.min(axis=0), 0.0), np.maximum(rows.max(axis=0), 0.0)
    scale = (high - low) / 15.0
    scale = np.where(scale > 0, scale, 1.0)
    return scale, np.clip(np.rint(-low / scale), 0, 15)


def quantize_rows(rows: np.ndarray, scale: np.ndarray, zero: np.ndarray, symmetric: bool) -> np.ndarray:
    """Integer values of rows [n, out] on the grid (scale, zero) of their block."""
    low, high = (-8, 7) if symmetric else (0, 15)
    return np.clip(np.rint(rows / scale) + zero, low, high)


def _pack(values: np.ndarray, scales: list, zeros: list, spec: Int4Spec) -> Int4Weight:
    scale = np.stack(scales).astype(np.float32)
    zero = None if spec.symmetric else np.stack(zeros).astype(np.int8)
    return Int4Weight(values.astype(np.int8), scale, zero, spec.block)


def rtn(weight: np.ndarray, spec: Int4Spec) -> Int4Weight:
    """Round-to-nearest on the same grid as GPTQ: the baseline it must beat."""
    scales, zeros, values = [], [], np.empty(weight.shape)
    for start in range(0, weight.shape[0], spec.block):
        rows = weight[start:start + spec.block].astype(np.float64)
        scale, zero = block_grid(rows, spec.symmetric)
        values[start:start + spec.block] = quantize_rows(rows, scale, zero, spec.symmetric)
        scales.append(scale)
        zeros.append(zero)
    return _pack(values, scales, zeros, spec)


@dataclass(frozen=True)
class GptqConfig:
    damp: float = 0.01  # added to H's diagonal, as a share of its mean: keeps the inverse well conditioned
    act_order: bool = False  # quantize the channels with the largest H[i, i] (input energy) first
    batch: int = 128  # rows updated eagerly before the rest get one matrix product (the lazy batch update)


def _inverse_hessian_factor(gram: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU): row i of U holds how row i's error moves the later rows,
    already conditioned on the rows before it (what makes one pass over the rows enough)."""
    h = gram + damp * np.mean(np.diag(gram)) * np.eye(len(gram))
    return np.linalg.cholesky(np.linalg.inv(h)).T


def gptq(weight: np.ndarray, gram: np.ndarray, spec: Int4Spec, config: GptqConfig = GptqConfig()) -> Int4Weight:
    """GPTQ of one weight [in, out] given the Gram matrix [in, in] of its inputs. Several layers reading the
    same input (q/k/v) can be quantized as one, concatenated along `out`: each output channel is independent."""
    w = weight.astype(np.float64).copy()
    h = gram.astype(np.float64).copy()
    dead = np.diag(h) == 0  # channels the calibration never saw: no error to spread, weight irrelevant
    h[dead, dead] = 1.0
    w[dead] = 0.0
    order = np.argsort(-np.diag(h), kind="stable") if config.act_order else np.arange(len(h))
    # With act order the channels of one block are not visited together, so its grid is fixed up front from the
    # original weights ("static groups"); in order, each block's grid is taken from the weights as updated so far.
    grids = ({b: block_grid(w[s:s + spec.block], spec.symmetric) for b, s in enumerate(range(0, len(w), spec.block))}
             if config.act_order else {})
    u = _inverse_hessian_factor(h[np.ix_(order, order)], config.damp)
    w = w[order]
    values = np.empty(w.shape)
    batch = max(config.batch // spec.block, 1) * spec.block  # a block's rows lie in one batch: all updated
    for start in range(0, len(w), batch):
        end = min(start + batch, len(w))
        errors = np.empty((end - start, w.shape[1]))
        for i in range(start, end):
            block = order[i] // spec.block
            if block not in grids:  # in order: the first row of a block
                grids[block] = block_grid(w[i:i + spec.block], spec.symmetric)
            scale, zero = grids[block]
            values[i] = quantize_rows(w[i], scale, zero, spec.symmetric)
            errors[i - start] = (w[i] - (values[i] - zero) * scale) / u[i, i]
            w[i + 1:end] -= np.outer(u[i, i + 1:end], errors[i - start])
        w[end:] -= u[start:end, end:].T @ errors
    restored = np.empty_like(values)
    restored[order] = values
    blocks = sorted(grids)
    return _pack(restored, [grids[b][0] for b in blocks], [grids[b][1] for b in blocks], spec)


def output_error(x: np.ndarray, weight: np.ndarray, quantized: Int4Weight) -> float:
    """Relative error of the layer's output on inputs x: ‖xW - xQ‖ / ‖xW‖."""
    exact = x @ weight
    return float(np.linalg.norm(x @ quantized.dequantized() - exact) / max(np.linalg.norm(exact), 1e-30))


# -- the graph pass ------------------------------------------------------------------------------------------


def _dequantize_node(graph: ir.Graph, name: str, weight: Int4Weight) -> ir.Node:
    """Blocked DequantizeLinear of an int4 (or uint4 with zero points) weight, axis 0 (input channels)."""
    kind = ml_dtypes.int4 if weight.zero_point is None else ml_dtypes.uint4
    inputs = [add_initializer(graph, f"{name}.weight_int4", weight.values.astype(kind)),
              add_initializer(graph, f"{name}.weight_scale", weight.scale)]
    if weight.zero_point is not None:
        inputs.append(add_initializer(graph, f"{name}.weight_zero_point", weight.zero_point.astype(kind)))
    return ir.node("DequantizeLinear", inputs, attributes={"axis": 0, "block_size": weight.block},
                   name=f"{name}/weight_dq", outputs=[ir.Value(name=f"{name}.weight_dequantized")])


@dataclass
class Int4Result(ir.passes.PassResult):
    quantized: list[str] = field(default_factory=list)


class Int4WeightsPass(ir.passes.InPlacePass):
    """Replaces each named MatMul layer's float weight with its given int4 weight behind a blocked
    DequantizeLinear (opset 21, IR 10: int4 tensors)."""

    def __init__(self, weights: dict[str, Int4Weight]):
        super().__init__()
        self.weights = weights

    def requires(self, model: ir.Model) -> None:
        found = {node.name for node in linear_nodes(model.graph) if node.op_type == "MatMul" and weight_axis(node)}
        missing = sorted(set(self.weights) - found)
        if missing:
            raise ir.passes.PreconditionError(f"no MatMul layer with a constant weight named {', '.join(missing[:3])}")

    def call(self, model: ir.Model) -> Int4Result:
        quantized = []
        for node in linear_nodes(model.graph):
            if node.name not in self.weights:
                continue
            dequantize = _dequantize_node(model.graph, node.name, self.weights[node.name])
            model.graph.insert_before(node, dequantize)
            node.replace_input_with(1, dequantize.outputs[0])
            quantized.append(node.name)
        if quantized:
            model.opset_imports[""] = max(model.opset_imports.get("", 1), 21)
            model.ir_version = max(model.ir_version or 0, 10)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        return Int4Result(model, bool(quantized), quantized=quantized)


@dataclass
class UntieResult(ir.passes.PassResult):
    untied: list[str] = field(default_factory=list)


class UntiePass(ir.passes.InPlacePass):
    """Gives each named layer that reads a transposed constant (a tied LM head reads the embedding table) a
    weight of its own, so the int4 passes, which quantize a MatMul's constant weight, reach it. The embedding
    keeps its float table: a lookup reads one row per token, the LM head all of them."""

    def __init__(self, names: frozenset[str]):
        super().__init__()
        self.names = names

    def call(self, model: ir.Model) -> UntieResult:
        untied = []
        for node in projection_nodes(model.graph):
            if node.name in self.names and node.op_type == "MatMul" and not node.inputs[1].is_initializer():
                weight = np.ascontiguousarray(projection_weight(node))
                node.replace_input_with(1, add_initializer(model.graph, f"{node.name}.weight", weight))
                untied.append(node.name)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        return UntieResult(model, bool(untied), untied=untied)


def layer_weight(node: ir.Node) -> np.ndarray:
    """A MatMul layer's weight [in, out] (the only layout the pass writes)."""
    if node.op_type != "MatMul":
        raise ValueError(f"{node.name}: int4 blocks are written for MatMul layers only, not {node.op_type}")
    return weight_array(node)


# -- a source's own grid (GGUF Q4_1) -------------------------------------------------------------------------

SOURCE_GRID_TOLERANCE = 1e-6  # relative error under which a weight counts as lying on the grid already


def source_grid(weight: np.ndarray, block: int = 32) -> Int4Weight | None:
    """The weight's own asymmetric 4-bit grid, if it has one: per block of `block` input channels a scale and a
    float minimum, as GGUF's Q4_1 stores its blocks of 32 (a model dequantized from Q4_1 keeps them exactly:
    min and max of each block are levels 0 and 15). Its zero point is -min/scale, a float: MatMulNBits takes
    that, DequantizeLinear (integer zero points) cannot. None where the weight is not on such a grid (Q4_K's
    super-blocks of 256 with 6-bit sub-scales, say: the check, not the format name, decides)."""
    if weight.shape[0] % block:
        return None
    blocks = weight.astype(np.float64).reshape(-1, block, weight.shape[1])
    low, high = blocks.min(axis=1), blocks.max(axis=1)
    scale = np.where(high > low, (high - low) / 15.0, 1.0)
    values = np.clip(np.rint((blocks - low[:, None]) / scale[:, None]), 0, 15)
    restored = values * scale[:, None] + low[:, None]
    if np.linalg.norm(restored - blocks) > SOURCE_GRID_TOLERANCE * max(np.linalg.norm(blocks), 1e-30):
        return None
    return Int4Weight(values.reshape(weight.shape).astype(np.int8), scale.astype(np.float32),
                      (-low / scale).astype(np.float32), block)


def _matmul_nbits(node: ir.Node, weight: Int4Weight, graph: ir.Graph, accuracy_level: int) -> ir.Node:
    """MatMulNBits (com.microsoft) for `node`: B packed [N, blocks, block / 2], two 4-bit values a byte (the
    even input channel in the low nibble), scales and zero points [N * blocks], output-channel major."""
    k, n = weight.values.shape
    columns = weight.values.T.astype(np.uint8).reshape(n, -1, weight.block)
    packed = columns[..., 0::2] | (columns[..., 1::2] << 4)
    inputs = [node.inputs[0], add_initializer(graph, f"{node.name}.weight_q4", np.ascontiguousarray(packed)),
              add_initializer(graph, f"{node.name}.weight_scales", np.ascontiguousarray(weight.scale.T).reshape(-1)),
              add_initializer(graph, f"{node.name}.weight_zero_points",
                              np.ascontiguousarray(weight.zero_point.T).reshape(-1).astype(np.float32))]
    return ir.node("MatMulNBits", inputs, domain="com.microsoft", name=node.name, outputs=[ir.Value(name=None)],
                   attributes={"K": k, "N": n, "bits": 4, "block_size": weight.block,
                               "accuracy_level": accuracy_level})


class SourceGridPass(ir.passes.InPlacePass):
    """Replaces each named MatMul layer with MatMulNBits carrying its given float-zero-point grid
    (`source_grid`): no second rounding. ONNX Runtime only."""

    def __init__(self, weights: dict[str, Int4Weight], accuracy_level: int = 4):
        super().__init__()
        self.weights = weights
        self.accuracy_level = accuracy_level  # 4: the input rounded to int8 per block at run time, as elsewhere

    def call(self, model: ir.Model) -> Int4Result:
        quantized = []
        for node in linear_nodes(model.graph):
            if node.name not in self.weights:
                continue
            replacement = _matmul_nbits(node, self.weights[node.name], model.graph, self.accuracy_level)
            model.graph.insert_before(node, replacement)
            node.outputs[0].replace_all_uses_with(replacement.outputs[0], replace_graph_outputs=True)
            replacement.outputs[0].name = node.outputs[0].name
            model.graph.remove(node, safe=True)
            quantized.append(node.name)
        if quantized:
            model.opset_imports["com.microsoft"] = 1
        return Int4Result(model, bool(quantized), quantized=quantized)
