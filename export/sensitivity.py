"""Measure what removing any set of pruning units costs, on the unpruned graph and without rebuilding it.

A 0/1 mask multiplies the input of every layer's output projections (the MLP's down projection, attention's
o_proj): zeroing MLP channels, or the query heads of a KV group, equals removing them, and zeroing both
masks of a layer equals dropping it (exactly so where those projections have no bias; with a bias the
layer still writes its bias). One ONNX Runtime session then scores a candidate plan by its feeds alone, in
the time of one evaluation, which lets the budget search measure dozens of plans instead of trusting a
first-order estimate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from export.graph.linear import weight_axis
from export.graph.pruning import find_blocks, group_channels
from runtime import accuracy
from runtime.baselines import plain_session
from runtime.contract import prefill_feeds

MASK = "prune_mask"
MASKED_KINDS = {"mlp": "mlp_out", "heads": "attention_out"}  # unit kind -> the Block field it masks


def mask_name(kind: str, layer: int) -> str:
    return f"{MASK}.{kind}.{layer}"


def add_masks(model: ir.Model) -> dict[str, int]:
    """Put a mask input in front of every output projection; returns each mask's name and width."""
    widths = {}
    for index, block in find_blocks(model.graph).items():
        for kind, field_name in MASKED_KINDS.items():
            node = getattr(block, field_name)
            if node is None:
                continue
            width = node.inputs[1].const_value.shape[1 - weight_axis(node)]
            mask = ir.Value(name=mask_name(kind, index), shape=ir.Shape([width]),
                            type=ir.TensorType(ir.DataType.FLOAT))
            model.graph.inputs.append(mask)
            masked = ir.node("Mul", [node.inputs[0], mask], name=f"{mask.name}.mul")
            model.graph.insert_before(node, masked)
            node.replace_input_with(0, masked.outputs[0])
            widths[mask.name] = width
    return widths


class MaskedModel:
    """The unpruned graph with masks, in one session; `evaluate(units, windows)` scores a removal."""

    def __init__(self, source: Path, facts: dict, path: Path, threads: int):
        model = ir.load(str(source))
        self.widths = add_masks(model)
        ir.save(model, path)
        self.session = plain_session(path, threads)
        self.facts = facts
        self.group_width = facts["attention_heads"] // facts["kv_heads"] * facts["head_dim"]

    def masks(self, units) -> dict[str, np.ndarray]:
        masks = {name: np.ones(width, np.float32) for name, width in self.widths.items()}
        for unit in units:
            if unit.kind == "mlp":
                masks[mask_name("mlp", unit.layer)][list(unit.members)] = 0
            elif unit.kind == "heads":
                masks[mask_name("heads", unit.layer)][group_channels(unit.members, self.group_width)] = 0
            else:
                for kind in MASKED_KINDS:
                    if mask_name(kind, unit.layer) in masks:
                        masks[mask_name(kind, unit.layer)][:] = 0
        return masks

    def evaluate(self, units, windows: np.ndarray) -> accuracy.Evaluation:
        masks = self.masks(units)

        def logits_of(window: np.ndarray) -> np.ndarray:
            return self.session.run(["logits"], prefill_feeds(window[None], self.facts) | masks)[0][0]

        return accuracy.evaluate(logits_of, windows)
