"""Give every linear layer of the exported graph its PyTorch module name, and find the decoder layers by
those names (`model.layers.N.mlp.down_proj`): pruning, attention fusion and float16 conversion read them."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx_ir as ir

from export.graph.linear import projection_nodes

NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # where the exporter records each op's module path
# `<prefix with the layer index>.<the rest>`: the first number in the name is the decoder layer's index.
LAYER_NAME = re.compile(r"^(?P<prefix>.*?\.(?P<index>\d+)\.)(?P<rest>.+)$")
# A decoder layer's MLP by family, as the rest of its layers' names after the layer prefix: (MLP kind, the
# layers that read the block input and write the MLP width, the layer that reads it back).
MLP_PATTERNS = (
    ("gated", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),   # Llama, Mistral, Qwen2/3, Gemma 3
    ("plain", ("mlp.c_fc",), "mlp.c_proj"),                         # GPT-2
    ("plain", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h"),          # GPT-NeoX
)
MLP_OUTPUTS = frozenset(writer for _, _, writer in MLP_PATTERNS)
# The exporter nests the model under our KV-cache wrapper's attribute; users know the model's own names.
WRAPPER_PREFIX = "inner."


def module_of(node: ir.Node) -> str | None:
    """The innermost PyTorch module the node came from, as the exporter recorded it."""
    scopes = node.metadata_props.get(NAME_SCOPES)
    if not scopes:
        return None
    names = ast.literal_eval(scopes)
    if len(names) < 2 or not names[-2]:
        return None
    module = names[-2]
    return module[len(WRAPPER_PREFIX):] if module.startswith(WRAPPER_PREFIX) else module


class NameLinearLayersPass(ir.passes.InPlacePass):
    """Renames each linear layer's node to its module path (`model.layers.0.mlp.down_proj`) and its weight
    to `<module>.weight`, so calibration, pruning and reports can name layers the way users know them.
    The exporter names them `node_linear_6` and `val_313`."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        taken = {node.name for node in model.graph}
        for node in projection_nodes(model.graph):
            module = module_of(node)
            if module is None or module in taken:
                continue
            taken.add(module)
            node.name = module
            weight, weight_name = node.inputs[1], f"{module}.weight"
            if weight.is_initializer() and len(weight.uses()) == 1 and weight_name not in model.graph.initializers:
                weight.name = weight_name
            modified = True
        return ir.passes.PassResult(model, modified)


@dataclass
class DecoderLayer:
    index: int
    prefix: str  # `model.layers.3.`
    nodes: dict[str, ir.Node] = field(default_factory=dict)  # by the rest of their name: `self_attn.q_proj`


def decoder_layers(nodes: Iterable[ir.Node]) -> dict[int, DecoderLayer]:
    """The decoder layers that the named nodes belong to, by index in order (a node without a layer index in
    its name belongs to none)."""
    layers: dict[int, DecoderLayer] = {}
    for node in nodes:
        parts = split_layer_name(node.name or "")
        if parts is not None:
            index, prefix, rest = parts
            layers.setdefault(index, DecoderLayer(index, prefix)).nodes[rest] = node
    return dict(sorted(layers.items()))


def split_layer_name(name: str) -> tuple[int, str, str] | None:
    """(layer index, prefix, rest) of a layer's name (`model.layers.3.mlp.down_proj` -> 3, `model.layers.3.`,
    `mlp.down_proj`), the same for a graph node and for the PyTorch module it came from; None without an index."""
    match = LAYER_NAME.match(name)
    return None if match is None else (int(match["index"]), match["prefix"], match["rest"])
