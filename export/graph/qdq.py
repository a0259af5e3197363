"""Explicit INT8 as TensorRT 11 accepts it: Q/DQ node pairs, int8 symmetric with zero point 0, weights per
output channel (stored as int8 behind a DequantizeLinear), activations per tensor, only on linear layers'
inputs (never their outputs), biases left in float. The same file runs in ONNX Runtime."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from export.graph.linear import add_initializer, projection_nodes, projection_weight, weight_axis

QMAX = 127


def quantize_weight(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weight, float32 scale per output channel); symmetric, in [-127, 127]."""
    reduce_axis = 1 - axis
    scale = np.abs(weight).max(axis=reduce_axis) / QMAX
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    shape = [1, 1]
    shape[axis] = -1
    quantized = np.clip(np.rint(weight / scale.reshape(shape)), -QMAX, QMAX).astype(np.int8)
    return quantized, scale


def fake_quantize_weight(weight: np.ndarray, axis: int) -> np.ndarray:
    quantized, scale = quantize_weight(weight, axis)
    shape = [1, 1]
    shape[axis] = -1
    return quantized.astype(np.float32) * scale.reshape(shape)


def fake_quantize_activation(x: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(np.rint(x / scale), -QMAX - 1, QMAX) * scale


@dataclass
class QuantizeResult(ir.passes.PassResult):
    quantized: list[str] = field(default_factory=list)  # the linear layers now behind Q/DQ


class QuantizeLinearLayersPass(ir.passes.InPlacePass):
    """Puts every linear layer not in `keep` behind int8 Q/DQ. Without activation scales it quantizes the
    weights only (W8A16); with them, the inputs too (W8A8), except for the `weight_only` layers."""

    def __init__(self, keep: frozenset[str], activation_scales: dict[str, float] | None = None,
                 weight_only: frozenset[str] = frozenset(), block: int | None = None):
        super().__init__()
        self.keep = keep
        self.activation_scales = activation_scales
        self.weight_only = weight_only
        self.block = block  # weights in blocks of this many input channels (blocked DequantizeLinear, opset 21)

    def _quantizes_input(self, node: ir.Node) -> bool:
        return self.activation_scales is not None and node.name not in self.weight_only

    def requires(self, model: ir.Model) -> None:
        inputs = {node.inputs[0].name for node in projection_nodes(model.graph)
                  if node.name not in self.keep and self._quantizes_input(node)}
        missing = sorted(inputs - set(self.activation_scales or {}))
        if missing:
            raise ir.passes.PreconditionError(f"no activation scale for {', '.join(missing[:3])}: W8A8 needs one for "
                                              "the input of every linear layer it quantizes; collect statistics on "
                                              "this graph")

    def call(self, model: ir.Model) -> QuantizeResult:
        graph = model.graph
        quantized = []
        for node in projection_nodes(graph):  # a tied LM head too: its int8 weight becomes a constant of its own
            if node.name in self.keep:
                continue
            new_nodes = [self._dequantized_weight(graph, node)]
            if self._quantizes_input(node):
                # A Q/DQ pair per consumer, even where q/k/v read one tensor: ONNX Runtime fuses Q/DQ + MatMul
                # into an integer MatMul only for a pair with a single consumer; TensorRT reads both forms alike.
                x = node.inputs[0]
                quantize = self._quantize(graph, x, self.activation_scales[x.name], node.name)
                dequantize = self._dequantize(quantize, node.name)
                new_nodes[:0] = [quantize, dequantize]
                node.replace_input_with(0, dequantize.outputs[0])
            graph.insert_before(node, new_nodes)
            node.replace_input_with(1, new_nodes[-1].outputs[0])
            quantized.append(node.name)
        if self.block and quantized:
            model.opset_imports[""] = max(model.opset_imports.get("", 1), 21)  # blocked DequantizeLinear
        ir.passes.common.RemoveUnusedNodesPass()(model)
        return QuantizeResult(model, bool(quantized), quantized=quantized)

    def _dequantized_weight(self, graph: ir.Graph, node: ir.Node) -> ir.Node:
        axis, weight = weight_axis(node), projection_weight(node)
        attributes = {"axis": axis}
        if self.block and axis == 1:
            (quantized, scale), attributes = quantize_weight_blocked(weight, 8, self.block), {
                "axis": 0, "block_size": self.block}
        else:
            quantized, scale = quantize_weight(weight, axis)
        base = node.name
        inputs = [add_initializer(graph, f"{base}.weight_int8", quantized),
                  add_initializer(graph, f"{base}.weight_scale", scale),
                  add_initializer(graph, f"{base}.weight_zero_point", np.zeros(scale.shape, dtype=np.int8))]
        return ir.node("DequantizeLinear", inputs, attributes=attributes, name=f"{base}/weight_dq",
                       outputs=[ir.Value(name=f"{base}.weight_dequantized")])

    def _quantize(self, graph: ir.Graph, x: ir.Value, scale: float, consumer: str) -> ir.Node:
        scale_value = add_initializer(graph, f"{consumer}.input_scale", np.array(scale, dtype=np.float32))
        zero_point = add_initializer(graph, f"{consumer}.input_zero_point", np.array(0, dtype=np.int8))
        return ir.node("QuantizeLinear", [x, scale_value, zero_point], name=f"{consumer}/input_q",
                       outputs=[ir.Value(name=f"{consumer}.input_quantized")])

    def _dequantize(self, quantize: ir.Node, consumer: str) -> ir.Node:
        _, scale_value, zero_point = quantize.inputs
        return ir.node("DequantizeLinear", [quantize.outputs[0], scale_value, zero_point], name=f"{consumer}/input_dq",
                       outputs=[ir.Value(name=f"{consumer}.input_dequantized")])


# Input channels per scale of the weight-only precisions, as MatMulNBits stores them: int8 in blocks of 64
# reads fewer scales per weight byte than 32 and keeps accuracy that 128 loses (README, "INT8"); int4 needs
# short blocks for accuracy (onnxruntime-genai's 32).
BLOCKS = {"int8-weight-only": 64, "int4": 32}
BITS = {"int8-weight-only": 8, "int4": 4}


def quantize_weight_blocked(weight: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values [in, out], float32 scales [ceil(in / block), out]): symmetric `bits`-bit weights in blocks
    of `block` input channels, the last block shorter where `in` is no multiple (as blocked DequantizeLinear
    reads them)."""
    qmax = 2 ** (bits - 1) - 1
    rows = -(-weight.shape[0] // block) * block
    padded = np.zeros((rows, weight.shape[1]), dtype=np.float32)
    padded[: weight.shape[0]] = weight
    blocks = padded.reshape(-1, block, weight.shape[1])
    scale = np.abs(blocks).max(axis=1) / qmax
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    quantized = np.clip(np.rint(blocks / scale[:, None, :]), -qmax, qmax).astype(np.int8)
    return quantized.reshape(rows, -1)[: weight.shape[0]], scale


def fake_quantize_weight_blocked(weight: np.ndarray, axis: int, precision: str) -> np.ndarray:
    """The weight after a round trip through `quantize_weight_blocked` at `precision`'s bits and block."""
    w = weight if axis == 1 else weight.T  # [in, out]
    quantized, scale = quantize_weight_blocked(w, BITS[precision], BLOCKS[precision])
    restored = quantized * np.repeat(scale, BLOCKS[precision], axis=0)[: w.shape[0]]
    return restored if axis == 1 else restored.T


# The suffixes onnxruntime's MatMulNBitsQuantizer adds to the names of the nodes it quantizes (Q/DQ; HQQ).
INT4_RENAMED = ("_matmul_Q4", "_Q4")
# MatMulNBits' compute type for HQQ's layers: 4 rounds the input to int8 per block at run time, as the Q/DQ
# layers fused by ONNX Runtime do (its default for them); HQQ's quantizer leaves it unset (float32 compute).
HQQ_ACCURACY_LEVEL = 4


def quantize_int4(model_path, destination, exclude: frozenset[str] = frozenset(), algorithm: str = "rtn",
                  block: int = BLOCKS["int4"]) -> None:
    """Int4 weights in blocks of `block` input channels through onnxruntime's quantizer. rtn: symmetric,
    round-to-nearest, as blocked DequantizeLinear + MatMul (ONNX Runtime fuses each pair into MatMulNBits,
    TensorRT reads blocked int4; the quantizer writes 8 bits only as MatMulNBits, never as Q/DQ). hqq:
    half-quadratic optimization of a scale and a float zero point per block, written as MatMulNBits (ONNX Runtime
    only: DequantizeLinear has no float zero point)."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    # Its module sets the root logger to INFO on import (a line per node, and every library's INFO after it):
    # back to Python's default.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    hqq = HQQWeightOnlyQuantConfig(block_size=block, bits=4) if algorithm == "hqq" else None
    quantizer = MatMulNBitsQuantizer(onnx.load(str(model_path)), bits=4, block_size=block, is_symmetric=True,
                                     nodes_to_exclude=sorted(exclude), quant_format=QuantFormat.QDQ, algo_config=hqq)
    quantizer.process()
    for node in quantizer.model.model.graph.node:
        _restore_name(node)
        if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", HQQ_ACCURACY_LEVEL))
    quantizer.model.save_model_to_file(str(destination), use_external_data_format=False)


def _restore_name(node) -> None:
    """It renames what it quantizes; our passes find layers by name."""
    suffix = next((s for s in INT4_RENAMED if node.name.endswith(s)), None)
    if suffix:
        node.name = node.name[: -len(suffix)]
