"""Give every linear layer of the exported graph its PyTorch module name."""

from __future__ import annotations

import ast

import onnx_ir as ir

from calibration.graph import projection_nodes

NAME_SCOPES = "pkg.torch.onnx.name_scopes"
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
