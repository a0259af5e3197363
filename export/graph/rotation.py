"""Rotate the residual stream (QuaRot / SpinQuant style) so activation outliers spread over all channels.

With every RMSNorm weight folded into the linear layers that read it, RMSNorm commutes with an orthogonal
Q (||xQ|| = ||x||), so rotating everything that writes the residual stream (the embedding table, o_proj,
down_proj: W <- W Q) and un-rotating everything that reads it (q/k/v, gate/up, the LM head: W <- Q^T W)
leaves the model's function unchanged in float, while a channel that was an outlier is spread over all.
A tied LM head is untied first (it reads the embedding table through a Transpose).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from export.graph.linear import (
    add_initializer,
    linear_groups,
    linear_nodes,
    set_constant,
    untie_projections,
    weight_array,
)

READS_RESIDUAL_NORM = "Mul"


def random_orthogonal(size: int, seed: int) -> np.ndarray:
    """A uniformly random orthogonal matrix (QR of a Gaussian with the signs fixed)."""
    gaussian = np.random.default_rng(seed).standard_normal((size, size))
    q, r = np.linalg.qr(gaussian)
    return (q * np.sign(np.diag(r))).astype(np.float32)


def _embedding(graph: ir.Graph) -> ir.Node:
    gathers = [n for n in graph if n.op_type == "Gather" and n.inputs[0] is not None and n.inputs[0].is_initializer()
               and n.inputs[1] is not None and n.inputs[1].name == "input_ids"]
    if len(gathers) != 1:
        raise ir.passes.PreconditionError("rotation needs exactly one embedding Gather reading input_ids")
    return gathers[0]


def _norm_weight_input(x: ir.Value) -> tuple[ir.Node, int] | None:
    """(Mul node, index of its constant) when X is an RMSNorm's output `weight * normalized`."""
    producer = x.producer()
    if producer is None or producer.op_type != READS_RESIDUAL_NORM:
        return None
    constants = [i for i, v in enumerate(producer.inputs) if v is not None and v.is_initializer()]
    return (producer, constants[0]) if len(constants) == 1 else None


@dataclass
class RotationResult(ir.passes.PassResult):
    rotated: list[str] = field(default_factory=list)  # the linear layers whose weights the rotation changed


class RotateResidualPass(ir.passes.InPlacePass):
    """Folds RMSNorm weights into their readers and rotates the residual stream by a random orthogonal Q."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed

    def requires(self, model: ir.Model) -> None:
        if any(node.op_type == "LayerNormalization" for node in model.graph):
            raise ir.passes.PreconditionError("rotation needs RMSNorm (LayerNorm subtracts the mean, which a "
                                              "rotation does not preserve); use SmoothQuant for this model")

    def call(self, model: ir.Model) -> RotationResult:
        graph = model.graph
        embedding = _embedding(graph)
        rotated = []
        untie_projections(graph)
        table = embedding.inputs[0].const_value.numpy()
        q = random_orthogonal(table.shape[1], self.seed)
        readers, writers = self._classify(graph, table.shape[1])
        for x, nodes in readers.items():
            norm, index = _norm_weight_input(x)
            gamma = norm.inputs[index].const_value.numpy().astype(np.float32)
            for node in nodes:
                set_constant(node.inputs[1], q.T @ (gamma[:, None] * weight_array(node)))
            norm.replace_input_with(index, add_initializer(graph, f"{norm.name}.unit_weight", np.ones_like(gamma)))
            rotated += [node.name for node in nodes]
        for node in writers:
            set_constant(node.inputs[1], weight_array(node) @ q)
            rotated.append(node.name)
        embedding.replace_input_with(0, add_initializer(graph, "embedding.rotated", table @ q))
        ir.passes.common.RemoveUnusedNodesPass()(model)  # the old table, norm weights and the head's Transpose
        return RotationResult(model, True, rotated=rotated)

    def _classify(self, graph: ir.Graph, hidden: int):
        """Readers of the residual (grouped by their normed input) and writers into it, or a plain-words
        error when a linear layer is neither (a pattern this pass does not know)."""
        readers = {x: nodes for x, nodes in linear_groups(graph).items() if _norm_weight_input(x) is not None}
        read = {node.name for nodes in readers.values() for node in nodes}
        writers = [node for node in linear_nodes(graph) if node.name not in read
                   and all(use.node.op_type == "Add" for use in node.outputs[0].uses())
                   and weight_array(node).shape[1] == hidden]
        unknown = [node.name for node in linear_nodes(graph) if node.name not in read
                   and node not in writers and not self._inside_block(node, hidden)]
        if unknown:
            raise ir.passes.PreconditionError(f"rotation cannot place linear layers {unknown[:3]}: expected each to "
                                              "read an RMSNorm output or write into the residual stream")
        return readers, writers

    @staticmethod
    def _inside_block(node: ir.Node, hidden: int) -> bool:
        """Layers that neither read nor write the residual (none in Llama-style blocks) keep their weights."""
        return weight_array(node).shape[0] != hidden and weight_array(node).shape[1] != hidden


def block_hadamard(size: int) -> np.ndarray:
    """An orthonormal block-diagonal Hadamard matrix: Sylvester blocks of the largest power of two that divides
    `size` (1536 = 3 x 512), so every output channel mixes a whole block of input channels."""
    block = size & -size
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < block:
        h = np.block([[h, h], [h, -h]])
    return np.kron(np.eye(size // block, dtype=np.float32), h / np.sqrt(block)).astype(np.float32)


class RotateDownProjInputPass(ir.passes.InPlacePass):
    """QuaRot's online rotation before down_proj: x -> x H at run time, W <- H^T W, exact in float. The
    down_proj input (SiLU(gate) * up) has the model's worst outliers and no norm to fold a rotation into.
    H is a Constant node, not an initializer, so calibration never quantizes the rotation itself."""

    SUFFIX = "mlp.down_proj"

    def call(self, model: ir.Model) -> RotationResult:
        rotated = []
        for node in linear_nodes(model.graph):
            if not node.name.endswith(self.SUFFIX) or node.op_type != "MatMul":
                continue
            weight = weight_array(node)
            h = block_hadamard(weight.shape[0])
            constant = ir.node("Constant", [], attributes={"value": ir.tensor(h, name=f"{node.name}.hadamard")},
                               name=f"{node.name}.hadamard")
            rotate = ir.node("MatMul", [node.inputs[0], constant.outputs[0]], name=f"{node.name}.online_rotation")
            node.prepend([constant, rotate])
            node.replace_input_with(0, rotate.outputs[0])
            set_constant(node.inputs[1], h.T @ weight)
            rotated.append(node.name)
        return RotationResult(model, bool(rotated), rotated=rotated)
