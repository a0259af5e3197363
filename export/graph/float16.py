"""float16 for GPUs as an onnx-ir pass: the graph computes in float16 except where float16 overflows or loses
what matters (docs/tensorrt.md, "Where float16 is not enough"): normalizations (the sum of squares), softmax,
and the LM head (the logits). The ONNX contract's inputs and outputs stay float32; casts sit at the borders of
the float16 region.

Our own pass because onnxruntime's float16 converter emits duplicate node names on our exports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from export.graph.naming import module_of

FLOAT, HALF = ir.DataType.FLOAT, ir.DataType.FLOAT16
# Module-name fragments whose ops stay float32 (RMSNorm/LayerNorm of every family) and op types that do.
FLOAT32_SCOPES = ("norm", "ln_", "lm_head", "embed_out")
FLOAT32_OPS = frozenset({"Softmax", "LayerNormalization", "SimplifiedLayerNormalization", "Cast", "Range",
                         "ConstantOfShape"})


def keeps_float32(node: ir.Node) -> bool:
    if node.op_type in FLOAT32_OPS or (node.name or "") == "lm_head":
        return True
    module = module_of(node) or ""
    return any(fragment in module.rsplit(".", 1)[-1] for fragment in FLOAT32_SCOPES)


@dataclass
class Float16Result(ir.passes.PassResult):
    half_nodes: int = 0  # ops that compute in float16


class ConvertToFloat16Pass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> Float16Result:
        graph = model.graph
        half = {node for node in graph if not keeps_float32(node) and _has_float_output(node)}
        casts: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}
        for node in list(graph):
            want = HALF if node in half else FLOAT
            for index, value in enumerate(node.inputs):
                if value is None or _dtype(value) not in (FLOAT, HALF) or _dtype(value) == want:
                    continue
                if value.const_value is not None and len(value.uses()) == 1 and value.is_initializer():
                    _retype_constant(value, want)
                    continue
                node.replace_input_with(index, _cast(graph, node, value, want, casts))
            if node in half:
                if node.op_type == "Constant" and "value" in node.attributes:  # its tensor joins the region
                    tensor = node.attributes["value"].as_tensor()
                    if tensor.dtype == FLOAT:
                        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(_to_half(tensor.numpy())))
                for out in node.outputs:
                    if _dtype(out) == FLOAT:
                        out.type = ir.TensorType(HALF)
        for index, out in enumerate(list(graph.outputs)):
            if _dtype(out) == HALF:  # the contract's outputs stay float32
                graph.outputs[index] = _output_cast(graph, out)
        ir.passes.common.TopologicalSortPass()(model)
        return Float16Result(model, bool(half), half_nodes=len(half))


def _dtype(value: ir.Value) -> ir.DataType | None:
    if value.const_value is not None:
        return value.const_value.dtype
    return value.type.dtype if value.type is not None else None


def _has_float_output(node: ir.Node) -> bool:
    return any(_dtype(out) == FLOAT for out in node.outputs)


def _to_half(array: np.ndarray) -> np.ndarray:
    """float16 with out-of-range constants (the exporter's float32-minimum mask) clipped to its finite range."""
    limit = np.finfo(np.float16).max
    return np.clip(array, -limit, limit).astype(np.float16)


def _retype_constant(value: ir.Value, dtype: ir.DataType) -> None:
    array = value.const_value.numpy()
    array = _to_half(array) if dtype == HALF else array.astype(np.float32)
    value.const_value = ir.tensor(array, name=value.name)
    value.type = ir.TensorType(dtype)


def _cast(graph: ir.Graph, before: ir.Node, value: ir.Value, dtype: ir.DataType, casts: dict) -> ir.Value:
    key = (value, dtype)
    if key not in casts:
        name = f"{value.name}.{'fp16' if dtype == HALF else 'fp32'}"
        cast = ir.node("Cast", [value], attributes={"to": dtype}, name=f"{name}.cast")
        cast.outputs[0].name, cast.outputs[0].type, cast.outputs[0].shape = name, ir.TensorType(dtype), value.shape
        before.prepend(cast)
        casts[key] = cast.outputs[0]
    return casts[key]


def _output_cast(graph: ir.Graph, out: ir.Value) -> ir.Value:
    name = out.name
    out.name = f"{name}.fp16"
    cast = ir.node("Cast", [out], attributes={"to": FLOAT}, name=f"{name}.cast")
    graph.append(cast)
    result = cast.outputs[0]
    result.name, result.type, result.shape = name, ir.TensorType(FLOAT), out.shape
    return result
