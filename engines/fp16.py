"""float16 for GPUs: the graph computes in float16 except where float16 overflows or loses what matters
(docs/tensorrt.md, "Where float16 is not enough"): normalizations (the sum of squares), softmax, and the LM
head (the logits).
The ONNX contract's inputs and outputs stay float32; casts sit at the borders of the float16 region.

Written as an onnx-ir pass (onnxruntime's float16 converter emits duplicate node names on our exports).
"""

from __future__ import annotations

import ast
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from engines.verify import Reference
from runtime import accuracy
from runtime.artifact import Artifact, ArtifactWriter
from runtime.errors import AccuracyError

NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # where the exporter records each op's module path
STAGE = "fp16"
MODEL_FILE = "model.onnx"
FLOAT, HALF = ir.DataType.FLOAT, ir.DataType.FLOAT16
# Module-name fragments whose ops stay float32 (RMSNorm/LayerNorm of every family) and op types that do.
FLOAT32_SCOPES = ("norm", "ln_", "lm_head", "embed_out")
FLOAT32_OPS = frozenset({"Softmax", "LayerNormalization", "SimplifiedLayerNormalization", "Cast", "Range",
                         "ConstantOfShape"})
MAX_PPL_INCREASE = 0.5  # percent: float16 must not cost accuracy


def keeps_float32(node: ir.Node) -> bool:
    if node.op_type in FLOAT32_OPS or (node.name or "") == "lm_head":
        return True
    scopes = node.metadata_props.get(NAME_SCOPES)
    module = ast.literal_eval(scopes)[-2] if scopes else ""  # the innermost module (the last entry is the op)
    return any(fragment in module.rsplit(".", 1)[-1] for fragment in FLOAT32_SCOPES)


class ConvertToFloat16Pass(ir.passes.InPlacePass):
    def __init__(self):
        super().__init__()
        self.half_nodes = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        half = {node for node in graph if not keeps_float32(node) and _has_float_output(node)}
        self.half_nodes = len(half)
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
        return ir.passes.PassResult(model, bool(half))


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


def run(parent: Artifact, writer: ArtifactWriter, reference: Reference, allow_loss: bool = False,
        progress=print) -> Artifact:
    """The float16 artifact, checked against its float32 parent (`reference`, evaluated once per build and
    shared with engine verification) on held-out windows; exit 3 past the gate."""
    started = time.perf_counter()
    model = ir.load(str(parent.file(MODEL_FILE)))
    convert = ConvertToFloat16Pass()
    convert(model)
    destination = writer.dir / MODEL_FILE
    ir.save(model, destination)
    windows = reference.windows
    progress(f"[fp16] {convert.half_nodes} ops in float16; accuracy against float32 on {len(windows)} windows")
    converted = accuracy.evaluate_model(Path(destination), parent.model_facts, windows, reference.threads)
    increase = converted.increase_over(reference.evaluation)
    metrics: dict[str, Any] = {
        "accuracy": {"perplexity_fp32": reference.evaluation.perplexity, "perplexity": converted.perplexity,
                     "perplexity_increase_percent": increase,
                     "top1_agreement": converted.agreement(reference.evaluation),
                     "gate_percent": MAX_PPL_INCREASE, "passed": abs(increase) <= MAX_PPL_INCREASE},
        "float16_ops": convert.half_nodes, "convert_seconds": round(time.perf_counter() - started, 1)}
    if not metrics["accuracy"]["passed"] and not allow_loss:
        raise AccuracyError(f"float16 changes perplexity by {increase:+.2f}% (gate ±{MAX_PPL_INCREASE}%); keep "
                            "fp32, or pass --allow-accuracy-loss")
    writer.copy_text_files(parent)
    return writer.commit(io=parent.io, metrics=metrics, precision="fp16")
