"""Fast tests of the graph toolkit's passes on tiny hand-built graphs, as onnx-ir's own tests do: build a model,
run the pass, check the op types, the `modified` flag, what the pass reports, and the numbers against ONNX
Runtime. The slower tests on real exports are tests/test_passes.py, test_calibration.py and test_pruning.py."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from export.graph.float16 import ConvertToFloat16Pass
from export.graph.linear import add_initializer, bias_value
from export.graph.naming import decoder_layers
from export.graph.pruning import PruneMlpChannelsPass, PrunePlan, PruningError
from export.graph.qdq import QuantizeLinearLayersPass, fake_quantize_weight
from export.graph.rotation import RotateDownProjInputPass
from export.graph.sequence import PassSequence
from export.graph.smoothquant import SmoothQuantPass
from runtime.contract import cache_layer

HIDDEN, WIDTH = 8, 16
RNG = np.random.default_rng(0)


def float_input(name: str, width: int = HIDDEN) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape([2, width]), type=ir.TensorType(ir.DataType.FLOAT))


def linear(graph: ir.Graph, x: ir.Value, name: str, rows: int, columns: int) -> ir.Value:
    """A MatMul named like an exported, named linear layer, with a weight of its own."""
    weight = add_initializer(graph, f"{name}.weight", RNG.standard_normal((rows, columns)).astype(np.float32))
    node = ir.node("MatMul", [x, weight], name=name)
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)  # as the exporter declares it (float16 reads it)
    graph.append(node)
    return node.outputs[0]


def model_of(graph: ir.Graph, *outputs: ir.Value) -> ir.Model:
    for index, value in enumerate(outputs):
        value.name = value.name or f"output_{index}"
        graph.outputs.append(value)
    return ir.Model(graph, ir_version=10)


def empty_graph(*inputs: ir.Value, opset: int = 21) -> ir.Graph:
    return ir.Graph(list(inputs), [], nodes=[], name="tiny", opset_imports={"": opset})


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = ir.to_proto(model).SerializeToString()
    return ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, feeds)


def op_types(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def norm_then_projections() -> ir.Model:
    """x * gamma (an RMSNorm's weight) read by two projections, as q/k/v read one normed input."""
    x = float_input("x")
    graph = empty_graph(x)
    gamma = add_initializer(graph, "norm.weight", RNG.uniform(0.5, 2, HIDDEN).astype(np.float32))
    normed = ir.node("Mul", [x, gamma], name="model.layers.0.input_layernorm")
    graph.append(normed)
    q = linear(graph, normed.outputs[0], "model.layers.0.self_attn.q_proj", HIDDEN, HIDDEN)
    k = linear(graph, normed.outputs[0], "model.layers.0.self_attn.k_proj", HIDDEN, HIDDEN)
    return model_of(graph, q, k)


def test_smoothquant_moves_outliers_into_the_weights_without_changing_the_output():
    model = norm_then_projections()
    feeds = {"x": RNG.standard_normal((2, HIDDEN)).astype(np.float32)}
    before = run(model, feeds)
    absmax = np.abs(feeds["x"]).max(axis=0) * np.linspace(1, 50, HIDDEN)  # outlier channels to smooth
    normed_name = next(node for node in model.graph if node.op_type == "Mul").outputs[0].name
    result = SmoothQuantPass({normed_name: absmax}, alpha=0.5)(model)
    assert result.modified
    assert result.smoothed == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    assert op_types(model) == ["Mul", "MatMul", "MatMul"]  # folded into existing constants: no new ops
    for got, want in zip(run(model, feeds), before):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_smoothquant_without_statistics_changes_nothing():
    result = SmoothQuantPass({}, alpha=0.5)(norm_then_projections())
    assert not result.modified and result.smoothed == []


def test_w8a8_puts_each_linear_layer_behind_qdq_and_rounds_as_the_reference_does():
    model = norm_then_projections()
    feeds = {"x": RNG.standard_normal((2, HIDDEN)).astype(np.float32)}
    normed = next(node for node in model.graph if node.op_type == "Mul")
    gamma, q_weight = normed.inputs[1].const_value.numpy(), model.graph.initializers[
        "model.layers.0.self_attn.q_proj.weight"].const_value.numpy()
    scale = float(np.abs(feeds["x"] * gamma).max()) / 127
    result = QuantizeLinearLayersPass(frozenset({"model.layers.0.self_attn.k_proj"}),
                                      {normed.outputs[0].name: scale})(model)
    assert result.modified and result.quantized == ["model.layers.0.self_attn.q_proj"]
    assert op_types(model).count("QuantizeLinear") == 1 and op_types(model).count("DequantizeLinear") == 2
    x = np.clip(np.rint(feeds["x"] * gamma / scale), -128, 127) * scale
    np.testing.assert_allclose(run(model, feeds)[0], x @ fake_quantize_weight(q_weight, 1), rtol=1e-4, atol=1e-4)


def test_w8a8_without_a_scale_for_an_input_says_what_is_missing():
    with pytest.raises(ir.passes.PreconditionError, match="no activation scale"):
        QuantizeLinearLayersPass(frozenset(), {})(norm_then_projections())


def test_online_rotation_adds_a_hadamard_before_down_proj_and_is_exact_in_float():
    x = float_input("x", WIDTH)
    graph = empty_graph(x)
    model = model_of(graph, linear(graph, x, "model.layers.0.mlp.down_proj", WIDTH, HIDDEN))
    feeds = {"x": RNG.standard_normal((2, WIDTH)).astype(np.float32)}
    before = run(model, feeds)[0]
    result = RotateDownProjInputPass()(model)
    assert result.modified and result.rotated == ["model.layers.0.mlp.down_proj"]
    assert op_types(model) == ["Constant", "MatMul", "MatMul"]
    np.testing.assert_allclose(run(model, feeds)[0], before, rtol=1e-5, atol=1e-5)


def test_float16_keeps_softmax_and_the_contract_outputs_in_float32():
    x = float_input("x")
    graph = empty_graph(x)
    hidden = linear(graph, x, "model.layers.0.mlp.up_proj", HIDDEN, HIDDEN)
    softmax = ir.node("Softmax", [hidden], attributes={"axis": -1}, name="softmax")
    softmax.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph.append(softmax)
    model = model_of(graph, softmax.outputs[0])
    feeds = {"x": RNG.standard_normal((2, HIDDEN)).astype(np.float32)}
    before = run(model, feeds)[0]
    result = ConvertToFloat16Pass()(model)
    assert result.modified and result.half_nodes == 1  # the MatMul; Softmax stays float32
    casts = [node for node in model.graph if node.op_type == "Cast"]
    assert [node.attributes["to"].as_int() for node in casts] == [ir.DataType.FLOAT16, ir.DataType.FLOAT]
    assert model.graph.outputs[0].type.dtype == ir.DataType.FLOAT
    after = run(model, feeds)[0]
    assert after.dtype == np.float32
    np.testing.assert_allclose(after, before, atol=1e-2)


def gated_mlp() -> ir.Model:
    """One Llama-style MLP: down(silu(gate(x)) * up(x)), named as the export names it."""
    x = float_input("x")
    graph = empty_graph(x)
    gate = linear(graph, x, "model.layers.0.mlp.gate_proj", HIDDEN, WIDTH)
    up = linear(graph, x, "model.layers.0.mlp.up_proj", HIDDEN, WIDTH)
    sigmoid = ir.node("Sigmoid", [gate])
    silu = ir.node("Mul", [gate, sigmoid.outputs[0]])
    product = ir.node("Mul", [silu.outputs[0], up])
    graph.extend([sigmoid, silu, product])
    return model_of(graph, linear(graph, product.outputs[0], "model.layers.0.mlp.down_proj", WIDTH, HIDDEN))


def mlp_reference(model: ir.Model, x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    weight = {name: value.const_value.numpy() for name, value in model.graph.initializers.items()}
    gate = x @ weight["model.layers.0.mlp.gate_proj.weight"][:, keep]
    up = x @ weight["model.layers.0.mlp.up_proj.weight"][:, keep]
    return (gate / (1 + np.exp(-gate)) * up) @ weight["model.layers.0.mlp.down_proj.weight"][keep]


def test_mlp_pruning_removes_exactly_the_channels_the_plan_drops():
    model = gated_mlp()
    x = RNG.standard_normal((2, HIDDEN)).astype(np.float32)
    keep = np.arange(0, WIDTH, 2)
    expected = mlp_reference(model, x, keep)
    result = PruneMlpChannelsPass(PrunePlan(mlp_channels={0: keep.tolist()}))(model)
    assert result.modified
    assert model.graph.initializers["model.layers.0.mlp.down_proj.weight"].const_value.shape == (len(keep), HIDDEN)
    np.testing.assert_allclose(run(model, {"x": x})[0], expected, rtol=1e-4, atol=1e-5)


def test_an_empty_plan_leaves_the_graph_unmodified():
    assert not PruneMlpChannelsPass(PrunePlan())(gated_mlp()).modified


def test_a_sequence_reports_each_step_and_lets_a_plain_words_error_through():
    model = gated_mlp()
    result = PassSequence(PruneMlpChannelsPass(PrunePlan()), RotateDownProjInputPass())(model)
    assert result.modified and [step.modified for step in result.steps] == [False, True]
    assert result.steps[1].rotated == ["model.layers.0.mlp.down_proj"]
    with pytest.raises(PruningError, match="layer 5 has no MLP"):  # not wrapped in Sequential's PassError
        PassSequence(PruneMlpChannelsPass(PrunePlan(mlp_channels={5: [0]})))(gated_mlp())


def test_layers_and_biases_are_found_by_name_and_by_the_add_after_a_projection():
    x = float_input("x")
    graph = empty_graph(x)
    q = linear(graph, x, "model.layers.1.self_attn.q_proj", HIDDEN, HIDDEN)
    bias = add_initializer(graph, "q.bias", np.ones(HIDDEN, np.float32))
    graph.append(ir.node("Add", [q, bias]))
    linear(graph, x, "lm_head", HIDDEN, HIDDEN)
    layers = decoder_layers(graph)
    assert list(layers) == [1] and layers[1].prefix == "model.layers.1."
    assert list(layers[1].nodes) == ["self_attn.q_proj"]
    assert bias_value(layers[1].nodes["self_attn.q_proj"]) is bias
    assert bias_value(next(node for node in graph if node.name == "lm_head")) is None


@pytest.mark.parametrize("name, layer", [("past_key_values.3.key", 3), ("present.0.value", 0), ("logits", None),
                                         ("input_ids", None)])
def test_cache_names_give_their_layer(name, layer):
    assert cache_layer(name) == layer
