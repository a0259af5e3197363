"""Structured pruning as onnx-ir passes on the exported graph: MLP channels, attention KV groups, whole layers.

Each layer is found through the names the export's naming pass gives the projections
(`model.layers.N.mlp.down_proj`, `transformer.h.N.mlp.c_proj`, ...), so a pass rewrites weights and the few
shape constants that carry a head count, and the result is a plain, smaller ONNX model. What a pass removes
is decided elsewhere (the plan, export/prune.py); a pass only applies a `PrunePlan`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from export.graph.linear import add_initializer, bias_value, linear_nodes, set_constant, weight_axis
from export.graph.naming import MLP_PATTERNS, NAME_SCOPES, decoder_layers
from runtime.contract import PAST, PRESENT, cache_layer

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
# The projection that writes attention back into the residual stream, by family (Llama-style, GPT-2, NeoX).
ATTENTION_OUTPUT = ("self_attn.o_proj", "attn.c_proj", "attention.dense")


class PruningError(ValueError):
    """A plan that cannot be applied to this graph; the message names what was expected."""


@dataclass
class PrunePlan:
    """What to keep, by original layer index. Missing entries keep everything."""

    mlp_channels: dict[int, list[int]] = field(default_factory=dict)  # layer -> kept MLP channels
    kv_groups: dict[int, list[int]] = field(default_factory=dict)     # layer -> kept KV groups (with their queries)
    dropped_layers: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"mlp_channels": {str(k): v for k, v in sorted(self.mlp_channels.items())},
                "kv_groups": {str(k): v for k, v in sorted(self.kv_groups.items())},
                "dropped_layers": sorted(self.dropped_layers)}

    @classmethod
    def from_json(cls, data: dict) -> PrunePlan:
        return cls({int(k): list(v) for k, v in data.get("mlp_channels", {}).items()},
                   {int(k): list(v) for k, v in data.get("kv_groups", {}).items()},
                   sorted(int(i) for i in data.get("dropped_layers", [])))

    def is_empty(self) -> bool:
        return not (self.mlp_channels or self.kv_groups or self.dropped_layers)


@dataclass
class Block:
    """One decoder layer as the graph shows it."""

    index: int
    prefix: str
    mlp_kind: str | None = None
    mlp_in: list[ir.Node] = field(default_factory=list)
    mlp_out: ir.Node | None = None
    attention: dict[str, ir.Node] = field(default_factory=dict)  # q/k/v/o by suffix, when separate projections
    attention_out: ir.Node | None = None
    nodes: list[ir.Node] = field(default_factory=list)  # every linear layer of the block

    @property
    def mlp_width(self) -> int:
        return _out_channels(self.mlp_in[0])


def find_blocks(graph: ir.Graph) -> dict[int, Block]:
    """The graph's decoder layers by index, from their linear layers' names."""
    blocks = {}
    for index, layer in decoder_layers(linear_nodes(graph)).items():
        block = blocks[index] = Block(index, layer.prefix, nodes=list(layer.nodes.values()))
        for rest, node in layer.nodes.items():
            if rest in ATTENTION:
                block.attention[rest.split(".")[-1]] = node
            if rest in ATTENTION_OUTPUT:
                block.attention_out = node
        for kind, readers, writer in MLP_PATTERNS:
            if writer in layer.nodes and all(r in layer.nodes for r in readers):
                block.mlp_kind = kind
                block.mlp_in = [layer.nodes[r] for r in readers]
                block.mlp_out = layer.nodes[writer]
    return blocks


def group_channels(groups, width: int) -> np.ndarray:
    """The channels of KV groups `groups` in a projection laid out group after group, `width` channels each
    (queries: heads per group x head_dim; keys and values: head_dim), in group order."""
    return np.concatenate([np.arange(g * width, (g + 1) * width) for g in sorted(groups)])


def _out_channels(node: ir.Node) -> int:
    return node.inputs[1].const_value.shape[weight_axis(node)]


def _take(node: ir.Node, keep: np.ndarray, output_side: bool) -> None:
    """Keep only `keep` of the layer's output channels (or input channels), with the bias where it has one."""
    weight = node.inputs[1].const_value.numpy()
    out_axis = weight_axis(node)
    set_constant(node.inputs[1], np.take(weight, keep, axis=out_axis if output_side else 1 - out_axis))
    if not output_side:
        return
    bias = bias_value(node)
    if bias is not None:
        set_constant(bias, np.take(bias.const_value.numpy(), keep, axis=-1))


def _clear_inner_shapes(graph: ir.Graph, keep: set[ir.Value]) -> None:
    """Static shapes recorded by the exporter go stale when widths change; ONNX Runtime infers them again."""
    for node in graph:
        for value in node.outputs:
            if value not in keep:
                value.shape = None


class PruneMlpChannelsPass(ir.passes.InPlacePass):
    """Removes MLP channels: output columns of gate/up (or fc) with their biases, input rows of down (or proj)."""

    def __init__(self, plan: PrunePlan):
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        blocks = find_blocks(model.graph)
        for index, keep in self.plan.mlp_channels.items():
            block = blocks.get(index)
            if block is None or block.mlp_kind is None:
                raise PruningError(f"layer {index} has no MLP this pass knows; expected one of "
                                   + ", ".join(f"{'+'.join(r)} -> {w}" for _, r, w in MLP_PATTERNS))
            width = block.mlp_width
            kept = np.asarray(sorted(keep), np.int64)
            if not 0 < len(kept) <= width or kept[-1] >= width:
                raise PruningError(f"layer {index}: the plan keeps {len(kept)} MLP channels of {width}; keep at "
                                   "least one and name only existing channels")
            for node in block.mlp_in:
                _take(node, kept, output_side=True)
            _take(block.mlp_out, kept, output_side=False)
            if len(kept) != width:  # GPT-2's Conv1D reshapes its output to [batch, seq, width]
                rewrite_shape_constants(model.graph, f"{block.prefix}mlp", {"Reshape": (width, len(kept), None)})
        if self.plan.mlp_channels:
            _clear_inner_shapes(model.graph, set(model.graph.outputs))
        return ir.passes.PassResult(model, bool(self.plan.mlp_channels))


class PruneAttentionHeadsPass(ir.passes.InPlacePass):
    """Removes whole KV groups (a K/V head with the query heads that read it), so grouped-query attention
    stays grouped: q/k/v output columns, o_proj input rows, the head counts in the layer's Reshape/Expand
    shapes, and the layer's cache I/O (KV heads per layer then differ; the manifest records them)."""

    def __init__(self, plan: PrunePlan, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.plan, self.heads, self.kv_heads, self.head_dim = plan, heads, kv_heads, head_dim

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        blocks = find_blocks(graph)
        rep, hd = self.heads // self.kv_heads, self.head_dim
        positions = {index: position for position, index in enumerate(blocks)}
        for index, groups in self.plan.kv_groups.items():
            block = blocks.get(index)
            if block is None or len(block.attention) != 4:
                raise PruningError(f"layer {index} has no separate q_proj/k_proj/v_proj/o_proj; head pruning "
                                   "expects them (fused QKV projections, as in GPT-2 and Phi-3, are not supported)")
            kept = sorted(groups)
            if not kept or len(kept) >= self.kv_heads + 1 or kept[-1] >= self.kv_heads:
                raise PruningError(f"layer {index}: the plan keeps KV groups {kept} of {self.kv_heads}; keep at "
                                   "least one (pruning every head of a layer is dropping the layer)")
            query, kv = group_channels(kept, rep * hd), group_channels(kept, hd)
            _take(block.attention["q_proj"], query, output_side=True)
            _take(block.attention["k_proj"], kv, output_side=True)
            _take(block.attention["v_proj"], kv, output_side=True)
            _take(block.attention["o_proj"], query, output_side=False)
            self._rewrite_head_counts(graph, block, len(kept))
            self._resize_cache_io(graph, positions[index], len(kept))
        if self.plan.kv_groups:
            _clear_inner_shapes(graph, set(graph.outputs))
        return ir.passes.PassResult(model, bool(self.plan.kv_groups))

    def _rewrite_head_counts(self, graph: ir.Graph, block: Block, kv_kept: int) -> None:
        """[batch, heads, seq, head_dim] (Reshape) and [batch, kv, rep, seq, head_dim] (Expand) shapes."""
        new_heads = kv_kept * (self.heads // self.kv_heads)
        rewrite_shape_constants(graph, f"{block.prefix}self_attn",
                                {"Reshape": (self.heads, new_heads, None), "Expand": (self.kv_heads, kv_kept, 1)})

    @staticmethod
    def _resize_cache_io(graph: ir.Graph, position: int, kv_kept: int) -> None:
        for value in [*graph.inputs, *graph.outputs]:
            if cache_layer(value.name) == position and value.shape is not None:
                dims = list(value.shape.dims)
                dims[1] = kv_kept
                value.shape = ir.Shape(dims)


def rewrite_shape_constants(graph: ir.Graph, scope: str, rules: dict[str, tuple[int, int, int | None]]) -> None:
    """The exporter builds the shapes of Reshape/Expand by Concat of constants, shared between layers. Each
    Reshape/Expand in `scope` whose shape holds the old count (at `position`, or anywhere when None) gets a
    Concat of its own with the new count: rules = {op_type: (old, new, position)}."""
    for node in list(graph):
        if node.op_type not in rules or scope not in (node.metadata_props.get(NAME_SCOPES) or ""):
            continue
        old, new, only = rules[node.op_type]
        constant = node.inputs[1].const_value if node.inputs[1] is not None else None
        if constant is not None and constant.dtype == ir.DataType.INT64:  # a whole constant shape, like [-1, 256]
            dims = constant.numpy().copy()
            hits = [p for p, d in enumerate(dims) if d == old and only in (None, p)]
            if hits:
                dims[hits] = new
                node.replace_input_with(1, _shape_constant(graph, dims))
            continue
        shape = node.inputs[1].producer() if node.inputs[1] is not None else None
        if shape is None or shape.op_type != "Concat":
            continue
        inputs = list(shape.inputs)
        positions = [p for p, v in enumerate(inputs) if _small_int(v) == old and only in (None, p)]
        if not positions:
            continue
        for position in positions:
            inputs[position] = _int_constant(graph, new)
        own = ir.node("Concat", inputs, attributes={"axis": 0}, name=f"{node.name}.pruned_shape")
        node.prepend(own)
        node.replace_input_with(1, own.outputs[0])


def _small_int(value: ir.Value | None) -> int | None:
    if value is None or value.const_value is None:
        producer = value.producer() if value is not None else None
        if producer is None or producer.op_type != "Constant":
            return None
        tensor = producer.attributes["value"].as_tensor() if "value" in producer.attributes else None
    else:
        tensor = value.const_value
    if tensor is None or tensor.dtype != ir.DataType.INT64 or tensor.size != 1:
        return None
    return int(tensor.numpy().reshape(-1)[0])


def _int_constant(graph: ir.Graph, number: int) -> ir.Value:
    return _shape_constant(graph, np.array([number], np.int64))


def _shape_constant(graph: ir.Graph, dims: np.ndarray) -> ir.Value:
    name = "pruning.int64_" + "_".join(str(int(d)).replace("-", "m") for d in dims)
    if name not in graph.initializers:
        add_initializer(graph, name, np.asarray(dims, np.int64))
    return graph.initializers[name]


class DropLayersPass(ir.passes.InPlacePass):
    """Removes whole decoder layers: the residual stream bypasses them, their cache I/O goes, and the
    remaining cache I/O is renumbered so the graph keeps the ONNX contract."""

    def __init__(self, plan: PrunePlan):
        super().__init__()
        self.plan = plan

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        blocks = find_blocks(graph)
        dropped = sorted(set(self.plan.dropped_layers))
        if not dropped:
            return ir.passes.PassResult(model, False)
        if len(dropped) >= len(blocks) or any(i not in blocks for i in dropped):
            raise PruningError(f"cannot drop layers {dropped} of {len(blocks)}: name existing layers and keep "
                               "at least one")
        positions = list(blocks)
        for index in dropped:
            residual_in, residual_out = _residual_span(blocks[index])
            ir.convenience.replace_all_uses_with(residual_out, residual_in)
            position = positions.index(index)
            for value in [v for v in graph.outputs if cache_layer(v.name) == position]:
                graph.outputs.remove(value)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        gone = {positions.index(i) for i in dropped}
        survivor = next(p for p in range(len(positions)) if p not in gone)
        by_name = {v.name: v for v in graph.inputs}
        for value in [v for v in graph.inputs if cache_layer(v.name) in gone]:
            _move_shape_reads(value, by_name[value.name.replace(f".{cache_layer(value.name)}.", f".{survivor}.")])
            graph.inputs.remove(value)
        _renumber_cache_io(graph)
        return ir.passes.PassResult(model, True)


def _move_shape_reads(dropped: ir.Value, survivor: ir.Value) -> None:
    """The exporter reads the past length from one layer's cache input; a dropped layer's input may be that
    one. Shape reads of batch or length move to a kept layer's input; anything else is an error."""
    for use in list(dropped.uses()):
        node = use.node
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", 4)
        if node.op_type != "Shape" or (start <= 1 < end):
            raise PruningError(f"{dropped.name} is read by {node.op_type} {node.name} after its layer was dropped; "
                               "expected only Shape reads of the batch or past length")
        node.replace_input_with(use.idx, survivor)


def _residual_span(block: Block) -> tuple[ir.Value, ir.Value]:
    """(residual stream into the layer, out of it): the first Adds after the attention output projection and
    after the MLP's last projection whose other input comes from outside the layer (parallel-residual
    blocks add attention and MLP first, then the stream)."""
    writers = [block.attention_out, block.mlp_out]
    if any(w is None for w in writers):
        raise PruningError(f"layer {block.index}: dropping it needs its attention output projection (one of "
                           f"{', '.join(ATTENTION_OUTPUT)}) and its MLP output projection")
    cone = _forward_cone([w.outputs[0] for w in writers])
    adds = [_first_residual_add(w.outputs[0], cone) for w in writers]
    first, last = adds
    residual_in = next(v for v in first.inputs if v not in cone)
    return residual_in, last.outputs[0]


def _forward_cone(starts: list[ir.Value], limit: int = 400) -> set[ir.Value]:
    seen, frontier = set(starts), list(starts)
    while frontier and len(seen) < limit:
        value = frontier.pop()
        for use in value.uses():
            if use.node.op_type == "Add" and any(i is not None and i not in seen and not i.is_initializer()
                                                 and i.const_value is None for i in use.node.inputs):
                continue  # an Add joining outside values ends the layer's own computation
            for out in use.node.outputs:
                if out not in seen:
                    seen.add(out)
                    frontier.append(out)
    return seen


def _first_residual_add(start: ir.Value, cone: set[ir.Value]) -> ir.Node:
    frontier, seen = [start], {start}
    while frontier:
        value = frontier.pop(0)
        for use in value.uses():
            node = use.node
            outside = [i for i in node.inputs if i is not None and i not in cone and i.const_value is None]
            if node.op_type == "Add" and outside:
                return node
            for out in node.outputs:
                if out not in seen:
                    seen.add(out)
                    frontier.append(out)
    raise PruningError(f"no residual Add after {start.name}; expected the layer's output projection to be added "
                       "to the residual stream")


def _renumber_cache_io(graph: ir.Graph) -> None:
    for prefix, values in ((PAST, graph.inputs), (PRESENT, graph.outputs)):
        cache = {value: cache_layer(value.name) for value in values if value.name.startswith(prefix + ".")}
        mapping = {old: new for new, old in enumerate(sorted(set(cache.values())))}
        for value in cache:  # two steps, so a new name never collides with an old one still in use
            value.name = f"{value.name}.renumbering"
        for value, old in cache.items():
            kind = value.name.split(".")[2]
            value.name = f"{prefix}.{mapping[old]}.{kind}"
