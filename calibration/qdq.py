"""Explicit INT8 as TensorRT 11 accepts it: Q/DQ node pairs, int8 symmetric with zero point 0, weights per
output channel (stored as int8 behind a DequantizeLinear), activations per tensor, only on linear layers'
inputs (never their outputs), biases left in float. The same file runs in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from calibration.graph import linear_nodes, weight_array, weight_axis

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


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


class QuantizeLinearLayersPass(ir.passes.InPlacePass):
    """Puts every linear layer not in `keep` behind int8 Q/DQ. Without activation scales it quantizes the
    weights only (W8A16); with them, the inputs too (W8A8)."""

    def __init__(self, keep: frozenset[str], activation_scales: dict[str, float] | None = None):
        super().__init__()
        self.keep = keep
        self.activation_scales = activation_scales
        self.quantized: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        dequantized_inputs: dict[str, ir.Value] = {}
        for node in linear_nodes(graph):
            if node.name in self.keep:
                continue
            new_nodes = [self._dequantized_weight(graph, node)]
            if self.activation_scales is not None:
                x = node.inputs[0]
                if x.name not in dequantized_inputs:
                    q, dq = self._activation_qdq(graph, x, self.activation_scales[x.name])
                    new_nodes[:0] = [q, dq]
                    dequantized_inputs[x.name] = dq.outputs[0]
                node.replace_input_with(0, dequantized_inputs[x.name])
            graph.insert_before(node, new_nodes)
            node.replace_input_with(1, new_nodes[-1].outputs[0])
            self.quantized.append(node.name)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, bool(self.quantized))

    def _dequantized_weight(self, graph: ir.Graph, node: ir.Node) -> ir.Node:
        axis = weight_axis(node)
        quantized, scale = quantize_weight(weight_array(node), axis)
        base = node.name
        inputs = [_constant(graph, f"{base}.weight_int8", quantized), _constant(graph, f"{base}.weight_scale", scale),
                  _constant(graph, f"{base}.weight_zero_point", np.zeros(scale.shape, dtype=np.int8))]
        return ir.node("DequantizeLinear", inputs, attributes={"axis": axis}, name=f"{base}/weight_dq",
                       outputs=[ir.Value(name=f"{base}.weight_dequantized")])

    def _activation_qdq(self, graph: ir.Graph, x: ir.Value, scale: float) -> tuple[ir.Node, ir.Node]:
        scale_value = _constant(graph, f"{x.name}.scale", np.array(scale, dtype=np.float32))
        zero_point = _constant(graph, f"{x.name}.zero_point", np.array(0, dtype=np.int8))
        q = ir.node("QuantizeLinear", [x, scale_value, zero_point], name=f"{x.name}/q",
                    outputs=[ir.Value(name=f"{x.name}.quantized")])
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale_value, zero_point], name=f"{x.name}/dq",
                     outputs=[ir.Value(name=f"{x.name}.dequantized")])
        return q, dq
