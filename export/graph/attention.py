"""Attention fusion for ONNX Runtime: each layer's exported attention (about 60 primitive ops: reshapes,
rotary halves, the repeated KV heads, the causal mask, softmax) becomes one `GroupQueryAttention` node (an
ONNX Runtime contrib op, com.microsoft) that also applies the rotary embedding, fed by one packed q/k/v
projection where the three can share a MatMul (same input, same weight format).

Decode of a small model is bound by per-op overhead, so the op count is where the speed is. The rewrite is
anchored on the projections' names (`model.layers.N.self_attn.{q,k,v,o}_proj`, given by the export's naming
pass) rather than on the op pattern between them, so it holds for every exporter version; what lies between
is removed as dead code. The ONNX contract (inputs, outputs, KV-cache layout) is unchanged.

Padding: every row of a batch keeps the full cache length (`seqlens_k` = total - 1 for all rows) and
left-padded positions are masked through `attention_bias`. The rotary positions are GroupQueryAttention's own
(the cache index, padding included): for a left-padded row that is `position_ids` plus the row's padding, a
constant shift that rotary attention does not see, so batches with left padding stay exact (tested).

Per-row lengths: the engine-only input `cache_lengths` (int64 [batch], positions already in each row's cache;
default [-1]: every row has total - sequence) sets `seqlens_k` per row, so one step runs rows of different
lengths without padding them to the longest: continuous batching's slots. Fed, the attention mask is
right-padded (ones for each row's real positions); GroupQueryAttention reads each row only up to its length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from export.graph.linear import add_initializer, bias_add, bias_value
from export.graph.naming import decoder_layers
from runtime.errors import BadInputError
from runtime.session import CACHE_LENGTHS

CONTRIB = "com.microsoft"
# Families whose attention is q/k/v projections, rotate-half RoPE on q and k, and causal softmax attention with
# grouped KV heads. Phi-3 and GPT-2 fuse q/k/v into one projection, GPT-NeoX rotates part of each head: those
# keep the exported attention.
FUSABLE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
# Those that normalize each query and key head before the rotation: GroupQueryAttention takes the normalized
# heads, so their projections cannot be packed.
QK_NORM_FAMILIES = ("qwen3", "gemma3_text")
ATTENTION = "self_attn."  # the projections are `<layer prefix>self_attn.{q,k,v,o}_proj`
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class AttentionFacts:
    heads: int
    kv_heads: int
    head_dim: int
    max_context: int
    rope_tables: tuple[tuple[tuple[float, ...], float], ...]  # (inverse frequencies, scaling) per rotary table
    layer_tables: tuple[int, ...] = ()  # per layer, its rotary table; () when there is one
    layer_kv_heads: tuple[int, ...] = ()  # per layer, after structured pruning removed KV groups
    scale: float | None = None  # the attention scores' factor; None: 1/sqrt(head_dim)
    qk_norm: bool = False

    def heads_of(self, layer: int) -> tuple[int, int]:
        """(query heads, KV heads) of one layer; pruning removes whole KV groups with their query heads."""
        kv = self.layer_kv_heads[layer] if self.layer_kv_heads else self.kv_heads
        return kv * (self.heads // self.kv_heads), kv

    @classmethod
    def from_model_facts(cls, facts: dict) -> tuple[AttentionFacts | None, str]:
        """The facts, or None and the reason attention cannot be fused for this model."""
        if facts.get("model_type") not in FUSABLE_FAMILIES:
            return None, f"{facts.get('model_type')} attention is not the plain q/k/v + RoPE kind"
        rope = facts.get("rope")
        if not rope:
            return None, "the export recorded no static rotary embedding (re-export, or dynamic RoPE scaling)"
        window = facts.get("sliding_window")
        if window and window < facts["max_context"]:  # Gemma 3's export caps the context at its window
            return None, "sliding-window attention is kept as exported"
        return cls(facts["attention_heads"], facts["kv_heads"], facts["head_dim"], facts["max_context"],
                   tuple((tuple(t["inv_freq"]), float(t["attention_scaling"])) for t in rope["tables"]),
                   tuple(rope.get("layer_tables") or ()), tuple(facts.get("layer_kv_heads") or ()),
                   facts.get("attention_scale"), facts["model_type"] in QK_NORM_FAMILIES), "fused"

    def table_of(self, layer: int) -> int:
        """The rotary table of a decoder layer (by its index in the unpruned model)."""
        return self.layer_tables[layer] if self.layer_tables else 0

    def rotary_tables(self, table: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """cos/sin caches [max_context, head_dim / 2], the way transformers computes them, in float64 first."""
        inv_freq, scaling = self.rope_tables[table]
        angles = np.outer(np.arange(self.max_context, dtype=np.float64), np.asarray(inv_freq, np.float64))
        return ((np.cos(angles) * scaling).astype(np.float32), (np.sin(angles) * scaling).astype(np.float32))


@dataclass
class _Layer:
    index: int
    prefix: str
    projections: tuple[ir.Node, ir.Node, ir.Node]  # q, k, v
    attention_output: ir.Value

    @property
    def outputs(self) -> list[ir.Value]:
        return [_projection_output(node) for node in self.projections]


@dataclass
class FusionResult(ir.passes.PassResult):
    fused_layers: list[int] = field(default_factory=list)  # decoder layers whose attention is one node now


class FuseAttentionPass(ir.passes.InPlacePass):
    def __init__(self, facts: AttentionFacts):
        super().__init__()
        self.facts = facts

    def call(self, model: ir.Model) -> FusionResult:
        graph = model.graph
        layers = find_attention_layers(graph)
        if not layers:
            return FusionResult(model, False)
        query = layers[0].outputs[0]
        dtype = query.type.dtype if query.type is not None else ir.DataType.FLOAT
        shared = _SharedInputs(graph, self.facts, dtype.numpy())
        for position, layer in enumerate(layers):  # cache I/O is numbered by position (pruning drops layers)
            self._fuse(graph, layer, position, shared)
        model.opset_imports.setdefault(CONTRIB, 1)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        ir.passes.common.TopologicalSortPass()(model)
        return FusionResult(model, True, fused_layers=[layer.index for layer in layers])

    def _fuse(self, graph: ir.Graph, layer: _Layer, i: int, shared: _SharedInputs) -> None:
        heads, kv_heads = self.facts.heads_of(i)
        past_key, past_value = shared.input(f"past_key_values.{i}.key"), shared.input(f"past_key_values.{i}.value")
        if self.facts.qk_norm:
            query, key, value = (*(shared.heads_joined(_before_rotation(v)) for v in layer.outputs[:2]),
                                 layer.outputs[2])
        else:
            packed = _pack_projections(graph, layer)
            query, key, value = (packed, None, None) if packed is not None else layer.outputs
        cos, sin = shared.rotary(self.facts.table_of(layer.index))
        attributes = {"num_heads": heads, "kv_num_heads": kv_heads, "do_rotary": 1, "rotary_interleaved": 0}
        if self.facts.scale is not None:
            attributes["scale"] = self.facts.scale
        attention = shared.add(ir.node(
            "GroupQueryAttention",
            [query, key, value, past_key, past_value, shared.seqlens, shared.total_length, cos, sin, None,
             shared.bias],
            domain=CONTRIB, num_outputs=3, name=f"layers.{layer.index}.attention", attributes=attributes))
        output, present_key, present_value = attention.outputs
        output.shape, output.type = layer.attention_output.shape, layer.attention_output.type
        ir.convenience.replace_all_uses_with(layer.attention_output, output)
        _replace_graph_output(graph, f"present.{i}.key", present_key)
        _replace_graph_output(graph, f"present.{i}.value", present_value)


def find_attention_layers(graph: ir.Graph) -> list[_Layer]:
    """Every decoder layer with a q_proj, in order; one with q_proj but not k/v/o is an error."""
    layers = []
    for layer in decoder_layers(graph).values():
        if ATTENTION + "q_proj" not in layer.nodes:
            continue
        missing = [p for p in ("k_proj", "v_proj", "o_proj") if ATTENTION + p not in layer.nodes]
        if missing:
            raise BadInputError(f"layer {layer.prefix}{ATTENTION[:-1]} has q_proj but no {', '.join(missing)}; the "
                                "graph is not a plain exported attention (re-export with `python -m export.build`)")
        q, k, v, o = (layer.nodes[ATTENTION + p] for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        layers.append(_Layer(layer.index, layer.prefix + ATTENTION, (q, k, v), _before_qdq(o.inputs[0])))
    return layers


def _before_rotation(projected: ir.Value, depth: int = 24) -> ir.Value:
    """The heads the rotary embedding reads ([batch, heads, sequence, head_dim], rotate-half slices them), found
    downstream of a projection's output: past the reshape and transpose, and past a per-head norm where the
    family has one."""
    frontier = [projected]
    for _ in range(depth):
        for value in frontier:
            if any(use.node.op_type == "Slice" for use in value.uses()):
                return value
        frontier = [out for value in frontier for use in value.uses() for out in use.node.outputs]
    raise BadInputError(f"no rotary embedding follows {projected.name}; the graph is not a plain exported attention "
                        "(re-export with `python -m export.build`, or build with --no-fuse-attention)")


def _projection_output(node: ir.Node) -> ir.Value:
    """The projection's result including its bias (Qwen2 adds q/k/v biases in a separate Add)."""
    add = bias_add(node)
    return node.outputs[0] if add is None else add.outputs[0]


def _bias(node: ir.Node) -> np.ndarray | None:
    """The constant bias of a MatMul projection (Qwen2), or None."""
    value = bias_value(node)
    return None if value is None else value.const_value.numpy()


@dataclass(frozen=True)
class _Weight:
    arrays: tuple[np.ndarray, ...]  # the constant, or DequantizeLinear's data, scale and zero point
    dequantize: tuple | None  # DequantizeLinear's attributes as sorted (name, value) pairs; None: plain

    def packs_with(self, other: _Weight) -> bool:
        return (self.dequantize == other.dequantize and len(self.arrays) == len(other.arrays)
                and all(a.dtype == b.dtype and a.ndim == b.ndim >= 1 and a.shape[:-1] == b.shape[:-1]
                        for a, b in zip(self.arrays, other.arrays)))


def _weight(node: ir.Node) -> _Weight | None:
    """The projection's weight as constants: [in, out] (or its DequantizeLinear's), None if it is computed."""
    value = node.inputs[1]
    if value.const_value is not None:
        return _Weight((value.const_value.numpy(),), None)
    producer = value.producer()
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    inputs = [v for v in producer.inputs if v is not None]
    if any(v.const_value is None for v in inputs):
        return None
    attributes = tuple(sorted((name, attr.value) for name, attr in producer.attributes.items()))
    return _Weight(tuple(v.const_value.numpy() for v in inputs), attributes)


def _activation_key(value: ir.Value) -> tuple:
    """What a projection reads, seen through its own Q/DQ pair (int8 gives q, k and v a pair each)."""
    dequantize = value.producer()
    if dequantize is None or dequantize.op_type != "DequantizeLinear":
        return (id(value),)
    quantize = dequantize.inputs[0].producer()
    constants = [v.const_value for v in dequantize.inputs[1:] if v is not None]
    if quantize is None or quantize.op_type != "QuantizeLinear" or any(c is None for c in constants):
        return (id(value),)
    return (id(quantize.inputs[0]), *(c.numpy().tobytes() for c in constants))


def _pack_projections(graph: ir.Graph, layer: _Layer) -> ir.Value | None:
    """One MatMul for q, k and v, weights (and biases) concatenated along the output axis: two fewer ops
    per layer, and GroupQueryAttention reads the packed result. None where the three cannot share one."""
    nodes = layer.projections
    if any(node.op_type != "MatMul" for node in nodes):
        return None
    weights = [_weight(node) for node in nodes]
    biases = [_bias(node) for node in nodes]
    if (None in weights
            or len({_activation_key(node.inputs[0]) for node in nodes}) != 1
            or not all(weights[0].packs_with(w) for w in weights[1:])
            or len({b is None for b in biases}) != 1):
        return None
    name = layer.prefix + "qkv_proj"
    arrays = [np.concatenate(parts, axis=-1) for parts in zip(*(w.arrays for w in weights))]
    constants = [add_initializer(graph, f"{name}.weight.{i}", array) for i, array in enumerate(arrays)]
    weight = constants[0]
    if weights[0].dequantize is not None:
        dequantize = ir.node("DequantizeLinear", constants, attributes=dict(weights[0].dequantize),
                             name=f"{name}/weight_dq")
        graph.insert_before(nodes[0], dequantize)
        weight = dequantize.outputs[0]
    matmul = ir.node("MatMul", [nodes[0].inputs[0], weight], name=name)
    graph.insert_before(nodes[0], matmul)
    if biases[0] is None:
        return matmul.outputs[0]
    add = ir.node("Add", [matmul.outputs[0], add_initializer(graph, f"{name}.bias", np.concatenate(biases))],
                  name=f"{name}/bias")
    graph.insert_before(nodes[0], add)
    return add.outputs[0]


def _before_qdq(value: ir.Value) -> ir.Value:
    """An int8 o_proj reads the attention output through QuantizeLinear -> DequantizeLinear."""
    producer = value.producer()
    while producer is not None and producer.op_type in QDQ_OPS:
        value = producer.inputs[0]
        producer = value.producer()
    return value


def _replace_graph_output(graph: ir.Graph, name: str, value: ir.Value) -> None:
    index = next(i for i, out in enumerate(graph.outputs) if out.name == name)
    old = graph.outputs[index]
    value.shape, value.type = old.shape, old.type
    old.name = f"{name}.unfused"
    graph.outputs[index] = value
    value.name = name


class _SharedInputs:
    """Values every fused layer reads, built once: rotary tables, cache lengths and the padding bias."""

    def __init__(self, graph: ir.Graph, facts: AttentionFacts, dtype: np.dtype):
        self.graph, self.dtype = graph, np.dtype(dtype)  # the attention's own type: float32, or float16
        self.facts, self.tables = facts, {}
        mask, ids = self.input("attention_mask"), self.input("input_ids")
        total = self.add(ir.node("Shape", [mask], attributes={"start": 1, "end": 2}))  # int64 [1]
        batch = self.add(ir.node("Shape", [ids], attributes={"start": 0, "end": 1}))
        sequence = self.add(ir.node("Shape", [ids], attributes={"start": 1, "end": 2}))
        total32 = self.add(ir.node("Cast", [total], attributes={"to": ir.DataType.INT32}))
        self.total_length = self.add(ir.node("Squeeze", [total32]))
        self.seqlens = self._seqlens(total, batch, sequence)
        self.bias = self._padding_bias(mask, batch, sequence, total)

    def _seqlens(self, total: ir.Value, batch: ir.Value, sequence: ir.Value) -> ir.Value:
        """int32 [batch]: the last position of each row, `cache_lengths + sequence - 1` where that input is
        fed, `total - 1` for every row where it keeps its default of -1."""
        lengths = add_initializer(self.graph, CACHE_LENGTHS, np.full(1, -1, np.int64))
        lengths.shape = ir.Shape(["batch"])  # the default has one element; a feed has one per row
        self.graph.inputs.append(lengths)
        zero = add_initializer(self.graph, "attention.zero_int64", np.zeros(1, np.int64))
        one = add_initializer(self.graph, "attention.one_int64_last", np.ones(1, np.int64))
        fed = self.add(ir.node("GreaterOrEqual", [lengths, zero]))
        per_row = self.add(ir.node("Sub", [self.add(ir.node("Add", [lengths, sequence])), one]))
        shared = self.add(ir.node("Sub", [total, one]))
        last = self.add(ir.node("Where", [fed, per_row, shared]))
        last = self.add(ir.node("Expand", [last, batch]))
        return self.add(ir.node("Cast", [last], attributes={"to": ir.DataType.INT32}))

    def rotary(self, table: int) -> tuple[ir.Value, ir.Value]:
        """The cos/sin caches of one rotary table, added to the graph the first time a layer reads them."""
        if table not in self.tables:
            suffix = f".{table}" if table else ""
            cos, sin = self.facts.rotary_tables(table)
            self.tables[table] = (add_initializer(self.graph, f"rotary.cos_cache{suffix}", cos.astype(self.dtype)),
                                  add_initializer(self.graph, f"rotary.sin_cache{suffix}", sin.astype(self.dtype)))
        return self.tables[table]

    def heads_joined(self, heads: ir.Value) -> ir.Value:
        """[batch, heads, sequence, head_dim] -> [batch, sequence, heads * head_dim], GroupQueryAttention's q/k."""
        if "attention.join_heads" not in self.graph.initializers:
            add_initializer(self.graph, "attention.join_heads", np.array([0, 0, -1], np.int64))
        moved = self.add(ir.node("Transpose", [heads], attributes={"perm": [0, 2, 1, 3]}))
        return self.add(ir.node("Reshape", [moved, self.graph.initializers["attention.join_heads"]]))

    def input(self, name: str) -> ir.Value:
        for value in self.graph.inputs:
            if value.name == name:
                return value
        raise BadInputError(f"the graph has no input {name!r}; it does not follow the ONNX contract "
                            "(re-export with `python -m export.build`)")

    def add(self, node: ir.Node):
        """Append the node (the pass sorts the graph at the end); its output, or the node if it has several."""
        self.graph.append(node)
        return node.outputs[0] if len(node.outputs) == 1 else node

    def _padding_bias(self, mask: ir.Value, batch: ir.Value, sequence: ir.Value, total: ir.Value) -> ir.Value:
        """[batch, 1, sequence, total]: 0 where the key is a real token, the float minimum where it is padding
        (finite, so a fully padded query row gives uniform weights instead of NaN)."""
        keep = self.add(ir.node("Cast", [mask], attributes={"to": ir.DataType.from_numpy(self.dtype)}))
        lowest = add_initializer(self.graph, "attention.lowest", np.array(np.finfo(self.dtype).min, self.dtype))
        one = add_initializer(self.graph, "attention.one_float", np.array(1.0, self.dtype))
        padding = self.add(ir.node("Sub", [one, keep]))
        bias = self.add(ir.node("Mul", [padding, lowest]))
        axes = add_initializer(self.graph, "attention.axes_1_2", np.array([1, 2], np.int64))
        bias = self.add(ir.node("Unsqueeze", [bias, axes]))
        one64 = add_initializer(self.graph, "attention.one_int64", np.ones(1, np.int64))
        shape = self.add(ir.node("Concat", [batch, one64, sequence, total], attributes={"axis": 0}))
        return self.add(ir.node("Expand", [bias, shape]))
