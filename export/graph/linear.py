"""The linear layers of an exported graph (onnx-ir): finding them, their weights and biases, and the one way
the passes add a constant to a graph."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def linear_nodes(graph: ir.Graph) -> list[ir.Node]:
    """MatMul/Gemm nodes whose second input is a constant weight: the model's linear layers."""
    return [node for node in graph if node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx")
            and len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].is_initializer()]


def _is_transposed_constant(value: ir.Value | None) -> bool:
    producer = value.producer() if value is not None else None
    return (producer is not None and producer.op_type == "Transpose" and producer.inputs[0] is not None
            and producer.inputs[0].is_initializer())


def projection_nodes(graph: ir.Graph) -> list[ir.Node]:
    """Every linear layer, including one whose weight is a transposed constant: a tied LM head reads the
    embedding table through a Transpose. Only `linear_nodes` can be quantized in place."""
    return [node for node in graph if node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx")
            and len(node.inputs) > 1 and node.inputs[1] is not None
            and (node.inputs[1].is_initializer() or _is_transposed_constant(node.inputs[1]))]


def weight_axis(node: ir.Node) -> int:
    """The weight's output-channel axis: 1 for MatMul's [in, out], 0 for Gemm with transB=1."""
    return 0 if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else 1


def weight_array(node: ir.Node) -> np.ndarray:
    return node.inputs[1].const_value.numpy()


def projection_weight(node: ir.Node) -> np.ndarray:
    """The weight as the layer multiplies by it, also where it is a transposed constant (a tied LM head)."""
    value = node.inputs[1]
    if value.is_initializer():
        return value.const_value.numpy()
    transpose = value.producer()
    perm = transpose.attributes.get_ints("perm", None)
    return np.transpose(transpose.inputs[0].const_value.numpy(), perm)


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A constant of the graph, with its declared shape and type (what shape inference and a graph input of
    that name need)."""
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape, value.type = ir.Shape(array.shape), ir.TensorType(ir.DataType.from_numpy(array.dtype))
    graph.register_initializer(value)
    return value


def bias_add(node: ir.Node) -> ir.Node | None:
    """The Add right after a MatMul that adds a constant (Qwen2's q/k/v, GPT-2's addmm): the layer's bias."""
    uses = node.outputs[0].uses()
    if len(uses) == 1 and uses[0].node.op_type == "Add":
        other = uses[0].node.inputs[1 - uses[0].idx]
        if other is not None and other.is_initializer():
            return uses[0].node
    return None


def bias_value(node: ir.Node) -> ir.Value | None:
    """The layer's bias: a Gemm's C input, or the constant of the Add right after a MatMul."""
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        return node.inputs[2]
    add = bias_add(node)
    return None if add is None else next(v for v in add.inputs if v is not None and v.is_initializer())


def set_constant(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
    value.shape = ir.Shape(array.shape)  # a stale declared shape would contradict shape inference


def linear_groups(graph: ir.Graph) -> dict[ir.Value, list[ir.Node]]:
    """Activation tensor -> the linear layers that read it (q/k/v share one, gate/up another)."""
    groups: dict[ir.Value, list[ir.Node]] = {}
    for node in linear_nodes(graph):
        groups.setdefault(node.inputs[0], []).append(node)
    return groups


def untie_projections(graph: ir.Graph) -> None:
    """Give a layer that reads a transposed constant (a tied LM head reads the embedding table through a
    Transpose) a weight of its own, so it can be rewritten without touching the table."""
    for node in projection_nodes(graph):
        weight = node.inputs[1]
        if weight.is_initializer():
            continue
        own = add_initializer(graph, f"{node.name}.weight", np.ascontiguousarray(projection_weight(node)))
        node.replace_input_with(1, own)
