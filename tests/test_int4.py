"""4-bit weights: round-to-nearest and GPTQ on hand-built matrices, the int4 graph pass on a tiny graph, and the
Gram matrices GPTQ reads, collected on a tiny export."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from test_graph import empty_graph, float_input, linear, model_of, op_types

from export.graph import stats
from export.graph.awq import AwqPass, gram_error, scaled_gram, search_scales
from export.graph.gptq import (
    GptqConfig,
    Int4Spec,
    Int4WeightsPass,
    SourceGridPass,
    gptq,
    output_error,
    rtn,
    source_grid,
)
from export.graph.linear import add_initializer, linear_groups


def correlated_inputs(rows=1024, width=128, seed=0):
    """Activations like a transformer's: correlated channels of very different energy (a few outliers)."""
    rng = np.random.default_rng(seed)
    mixing = 0.3 * rng.standard_normal((width, width)) + np.eye(width)
    return (rng.standard_normal((rows, width)) @ mixing) * np.exp(rng.standard_normal(width))


@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_below_round_to_nearest(block, symmetric, act_order):
    x = correlated_inputs()
    weight = np.random.default_rng(1).standard_normal((128, 48)).astype(np.float32)
    spec = Int4Spec(block, symmetric)
    nearest = output_error(x, weight, rtn(weight, spec))
    compensated = output_error(x, weight, gptq(weight, x.T @ x, spec, GptqConfig(act_order=act_order)))
    assert compensated < 0.9 * nearest


def test_gptq_keeps_the_grid_and_layout_of_round_to_nearest():
    x, weight = correlated_inputs(width=96), np.random.default_rng(2).standard_normal((96, 40))
    for spec in (Int4Spec(32, True), Int4Spec(64, False)):
        quantized = gptq(weight, x.T @ x, spec)
        assert quantized.values.shape == weight.shape and quantized.scale.shape == (-(-96 // spec.block), 40)
        low, high = (-8, 7) if spec.symmetric else (0, 15)
        assert quantized.values.min() >= low and quantized.values.max() <= high
        assert (quantized.zero_point is None) == spec.symmetric


def test_round_to_nearest_uses_sixteen_levels_and_rounds_within_half_a_step():
    weight = np.random.default_rng(3).standard_normal((64, 8))
    quantized = rtn(weight, Int4Spec(32, True))
    assert {-8, 7} <= set(np.unique(quantized.values))  # the largest magnitude maps to -8, none clipped
    scale = np.repeat(quantized.scale, 32, axis=0)
    inside = weight / scale <= 7.5  # only the opposite extreme, past level 7, is clipped (by under one step)
    error = np.abs(quantized.dequantized() - weight)
    assert np.all(error[inside] <= np.abs(scale[inside]) / 2 + 1e-6)
    assert np.all(error[~inside] <= np.abs(scale[~inside]) + 1e-6)


def test_gptq_on_a_dead_input_channel_is_finite():
    x = correlated_inputs(width=64)
    x[:, 5] = 0.0  # a channel the calibration never excites: H[5, 5] = 0
    quantized = gptq(np.random.default_rng(4).standard_normal((64, 16)), x.T @ x, Int4Spec(32, True))
    assert np.isfinite(quantized.dequantized()).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_pass_writes_blocked_dequantize_that_runs_as_its_weights(symmetric):
    x = float_input("x", 64)
    graph = empty_graph(x)
    out = linear(graph, x, "model.layers.0.mlp.down_proj", 64, 16)
    model = model_of(graph, out)
    weight = model.graph.node(0).inputs[1].const_value.numpy()
    quantized = rtn(weight, Int4Spec(32, symmetric))
    result = Int4WeightsPass({"model.layers.0.mlp.down_proj": quantized})(model)
    assert result.quantized == ["model.layers.0.mlp.down_proj"]
    assert op_types(model) == ["DequantizeLinear", "MatMul"]
    feeds = {"x": np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)}
    # Unoptimized: ONNX Runtime would fuse the pair into MatMulNBits, which rounds its input to int8 (accuracy 4).
    np.testing.assert_allclose(run_unoptimized(model, feeds), feeds["x"] @ quantized.dequantized(), rtol=1e-4,
                               atol=1e-4)


def run_unoptimized(model: ir.Model, feeds: dict[str, np.ndarray], every: bool = False):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.to_proto(model).SerializeToString()
    outputs = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"]).run(None, feeds)
    return outputs if every else outputs[0]


def test_int4_pass_refuses_a_layer_it_cannot_find():
    x = float_input("x", 32)
    graph = empty_graph(x)
    model = model_of(graph, linear(graph, x, "model.layers.0.mlp.up_proj", 32, 8))
    with pytest.raises(ir.passes.PreconditionError, match="no_such_layer"):
        Int4WeightsPass({"no_such_layer": rtn(np.ones((32, 8)), Int4Spec())})(model)


def test_gram_matrices_match_the_activations_and_respect_the_budget(export_factory):
    art = export_factory("llama")
    model = ir.load(str(art.file("model.onnx")))
    tensors = sorted(set(stats.linear_inputs(model, art.model_facts["linear_layers"]).values()))[:3]
    values = {v.name: v for node in model.graph for v in node.outputs}
    widths = {name: values[name].shape[-1] for name in tensors}
    samples = np.random.default_rng(0).integers(3, 128, size=(3, 24))
    budget = 8 * max(w * w for w in widths.values())  # one Gram per pass: several passes over the samples
    grams = dict(stats.gram_matrices(art.file("model.onnx"), widths, samples, art.model_facts, 1, budget))
    direct = {name: 0 for name in tensors}
    for outputs in stats.stream(art.file("model.onnx"), tensors, samples, art.model_facts, 1):
        for name, value in outputs.items():
            rows = value.reshape(-1, widths[name]).astype(np.float64)
            direct[name] = direct[name] + rows.T @ rows
    assert set(grams) == set(tensors)
    for name in tensors:
        np.testing.assert_allclose(grams[name], direct[name], rtol=1e-5, atol=1e-6 * np.abs(direct[name]).max())
    chunks = stats._chunks(widths, budget)
    assert len(chunks) > 1 and sorted(sum(chunks, [])) == sorted(tensors)
    assert all(sum(8 * widths[name] ** 2 for name in chunk) <= budget for chunk in chunks)


# -- AWQ ---------------------------------------------------------------------------------------------------


def test_awq_search_lowers_output_error_on_outlier_channels_and_never_raises_it():
    x = correlated_inputs(width=64)
    x[:, :4] *= 30  # outlier channels, as transformer activations have
    weight = np.random.default_rng(6).standard_normal((64, 32))
    spec = Int4Spec(32, True)
    gram = x.T @ x
    scales, alpha = search_scales(weight, gram, spec)
    plain = gram_error(rtn(weight, spec).dequantized() - weight, gram)
    scaled = gram_error(rtn(weight * scales[:, None], spec).dequantized() / scales[:, None] - weight, gram)
    assert alpha > 0 and scaled < 0.9 * plain
    flat = np.eye(64)  # no channel matters more than another: nothing to gain, alpha 0 (plain rounding) or equal
    assert gram_error(rtn(weight * search_scales(weight, flat, spec)[0][:, None], spec).dequantized()
                      / search_scales(weight, flat, spec)[0][:, None] - weight, flat) <= gram_error(
        rtn(weight, spec).dequantized() - weight, flat) + 1e-12


def test_gram_error_is_the_output_error_over_all_positions():
    x, delta = correlated_inputs(rows=50, width=16), np.random.default_rng(7).standard_normal((16, 5))
    assert gram_error(delta, x.T @ x) == pytest.approx(np.linalg.norm(x @ delta) ** 2, rel=1e-9)


def test_awq_fold_is_exact_in_float_and_scaled_gram_is_the_new_inputs_gram():
    x = float_input("x", 64)
    graph = empty_graph(x)
    gamma = add_initializer(graph, "norm.weight", np.random.default_rng(8).uniform(0.5, 2, 64).astype(np.float32))
    normed = ir.node("Mul", [x, gamma], name="model.layers.0.input_layernorm")
    graph.append(normed)
    q = linear(graph, normed.outputs[0], "model.layers.0.self_attn.q_proj", 64, 32)
    k = linear(graph, normed.outputs[0], "model.layers.0.self_attn.k_proj", 64, 32)
    model = model_of(graph, q, k)
    feeds = {"x": correlated_inputs(rows=2, width=64).astype(np.float32)}
    feeds["x"][:, :3] *= 30
    before = run_unoptimized(model, feeds, every=True)
    activations = correlated_inputs(width=64) * 1.5
    activations[:, :3] *= 30
    tensor = normed.outputs[0].name
    result = AwqPass({tensor: activations.T @ activations}, Int4Spec(32, True))(model)
    assert result.scaled == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    assert not np.allclose(result.scales[tensor], 1.0)  # it did scale: the fold is tested, not skipped
    for a, b in zip(before, run_unoptimized(model, feeds, every=True)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    scaled_inputs = activations / result.scales[tensor]
    np.testing.assert_allclose(scaled_gram(activations.T @ activations, result.scales[tensor]),
                               scaled_inputs.T @ scaled_inputs, rtol=1e-5)


def test_awq_leaves_skipped_and_unfoldable_groups_alone():
    x = float_input("x", 32)
    graph = empty_graph(x)  # a graph input feeds the layer: no producer to fold into
    model = model_of(graph, linear(graph, x, "model.layers.0.mlp.up_proj", 32, 8))
    grams = {"x": np.diag(np.arange(1.0, 33.0) ** 4)}
    assert not AwqPass(grams, Int4Spec(32, True))(model).modified


def test_awq_on_a_tiny_llama_folds_into_norms_and_up_projections_exactly(export_factory, tmp_path):
    from test_calibration import assert_same_function_in_float, tiny_samples

    art = export_factory("llama")
    model = ir.load(str(art.file("model.onnx")))
    groups = linear_groups(model.graph)
    widths = {x.name: nodes[0].inputs[1].const_value.shape[0] for x, nodes in groups.items()}
    grams = dict(stats.gram_matrices(art.file("model.onnx"), widths, tiny_samples(), art.model_facts, 1))
    result = AwqPass(grams, Int4Spec(32, True), skip=frozenset({"lm_head"}))(model)
    # q/k/v and gate/up fold into the norms, down_proj into up_proj; o_proj's input (attention) takes no fold
    assert "model.layers.1.mlp.down_proj" in result.scaled and "model.layers.0.self_attn.q_proj" in result.scaled
    assert not any(name.endswith("o_proj") for name in result.scaled) and "lm_head" not in result.scaled
    assert_same_function_in_float(art, model, tmp_path)


# -- the calibrate stage -----------------------------------------------------------------------------------


def test_calibrate_int4_gptq_lowers_every_groups_output_error_against_round_to_nearest(export_factory, tmp_path):
    from test_calibration import tiny_samples

    from calibration.int4 import calibrate_int4

    art = export_factory("llama")
    totals = {}
    for method in ("gptq", "awq+gptq"):
        model = ir.load(str(art.file("model.onnx")))
        plan = calibrate_int4(model, art.file("model.onnx"), tiny_samples(), art.model_facts, 1, Int4Spec(32, True),
                              method, skip=frozenset({"lm_head"}), scratch=tmp_path)
        assert set(plan.weights) == set(art.model_facts["linear_layers"]) - {"lm_head"}
        assert (len(plan.awq_scaled) > 0) == method.startswith("awq")
        totals[method] = sum(plan.errors.values())
    model = ir.load(str(art.file("model.onnx")))
    nearest = calibrate_int4(model, art.file("model.onnx"), tiny_samples(), art.model_facts, 1, Int4Spec(32, True),
                             "awq", skip=frozenset({"lm_head"}), scratch=tmp_path)
    assert totals["gptq"] < sum(nearest.errors.values())
    assert totals["awq+gptq"] < sum(nearest.errors.values())


def test_int4_build_with_a_calibrated_method_writes_int4_blocks_and_records_it(tiny_model_factory, tmp_path):
    from test_calibration import build_tiny_llama, fused_op_count

    result = build_tiny_llama(tiny_model_factory, tmp_path, "int4", "--allow-accuracy-loss", "--int4-method",
                              "awq+gptq", "--int4-block", "64", "--int4-asymmetric")
    assert result.returncode == 0, result.stderr
    calibrated = next((tmp_path / "store").glob("calibrate-*"))
    manifest = json.loads((calibrated / "manifest.json").read_text())
    assert manifest["metrics"]["int4"] == {"method": "awq+gptq", "block": 64, "symmetric": False, "act_order": True,
                                           "awq_layers": manifest["metrics"]["int4"]["awq_layers"],
                                           "source_grid_layers": 0}
    assert manifest["metrics"]["int4"]["awq_layers"] > 0
    proto = onnx.load(str(calibrated / "model.onnx"))
    blocked = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.name != "lm_head/weight_dq"]
    inits = {i.name: i for i in proto.graph.initializer}
    assert len(blocked) == len(manifest["io"]["model"]["linear_layers"]) - 1 - len(manifest["metrics"]["kept_in_float"])
    assert all(inits[n.input[0]].data_type == onnx.TensorProto.UINT4 and len(n.input) == 3 for n in blocked)
    assert all(any(a.name == "block_size" and a.i == 64 for a in n.attribute) for n in blocked)
    assert fused_op_count(calibrated / "model.onnx", tmp_path, "MatMulNBits") == len(blocked) + 1
    engine = json.loads(next((tmp_path / "store").glob("engine-*/manifest.json")).read_text())
    assert engine["metrics"]["fusion"]["attention"] == "fused"  # q/k/v int4 blocks packed into one MatMul


def test_rtn_refuses_the_calibrated_methods_settings():
    from calibration.calibrate import CalibrationConfig
    from runtime.errors import BadInputError

    with pytest.raises(BadInputError, match="int4-block"):
        CalibrationConfig(precision="int4", int4_method="rtn", int4_block=64)


def test_int4_hqq_build_uses_the_librarys_matmulnbits_and_keeps_layer_names(tiny_model_factory, tmp_path):
    from test_calibration import build_tiny_llama

    result = build_tiny_llama(tiny_model_factory, tmp_path, "int4", "--allow-accuracy-loss", "--int4-method", "hqq")
    assert result.returncode == 0, result.stderr
    calibrated = next((tmp_path / "store").glob("calibrate-*"))
    manifest = json.loads((calibrated / "manifest.json").read_text())
    proto = onnx.load(str(calibrated / "model.onnx"))
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    inits = {i.name: i for i in proto.graph.initializer}
    layers = set(manifest["io"]["model"]["linear_layers"]) - {"lm_head"} - set(manifest["metrics"]["kept_in_float"])
    assert {n.name for n in nbits} == layers  # names as the export gave them: the engine's passes find them
    assert all(inits[n.input[3]].data_type == onnx.TensorProto.FLOAT for n in nbits)  # HQQ's float zero points
    assert all(any(a.name == "accuracy_level" and a.i == 4 for a in n.attribute) for n in nbits)
    engine = json.loads(next((tmp_path / "store").glob("engine-*/manifest.json")).read_text())
    assert engine["metrics"]["fusion"]["attention"] == "fused"


# -- a source's own grid -----------------------------------------------------------------------------------


def q4_1_weight(rows=64, columns=24, seed=9):
    """A weight as a Q4_1 GGUF dequantizes: per block of 32 input channels, min + level * scale, levels 0..15
    with 0 and 15 present."""
    rng = np.random.default_rng(seed)
    levels = rng.integers(0, 16, size=(rows // 32, 32, columns))
    levels[:, 0], levels[:, 1] = 0, 15
    scale, low = rng.uniform(0.01, 0.1, (rows // 32, 1, columns)), rng.uniform(-0.8, -0.1, (rows // 32, 1, columns))
    return (levels * scale + low).reshape(rows, columns).astype(np.float32)


def test_source_grid_recovers_a_q4_1_weight_exactly_and_refuses_one_off_the_grid():
    weight = q4_1_weight()
    grid = source_grid(weight)
    np.testing.assert_allclose(grid.dequantized(), weight, rtol=1e-5, atol=1e-6)
    assert source_grid(weight + np.random.default_rng(1).normal(0, 1e-3, weight.shape).astype(np.float32)) is None
    assert source_grid(weight[:48]) is None  # no whole block


def test_source_grid_pass_writes_matmulnbits_that_runs_as_the_source_weight():
    x = float_input("x", 64)
    graph = empty_graph(x)
    out = linear(graph, x, "model.layers.0.mlp.down_proj", 64, 24)
    model = model_of(graph, out)
    weight = q4_1_weight()
    model.graph.node(0).inputs[1].const_value = ir.tensor(weight)
    result = SourceGridPass({"model.layers.0.mlp.down_proj": source_grid(weight)}, accuracy_level=0)(model)
    assert result.quantized == ["model.layers.0.mlp.down_proj"] and op_types(model) == ["MatMulNBits"]
    assert model.graph.node(0).name == "model.layers.0.mlp.down_proj"
    feeds = {"x": np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)}
    np.testing.assert_allclose(run_unoptimized(model, feeds), feeds["x"] @ weight, rtol=1e-4, atol=1e-4)


def test_source_grids_finds_only_the_layers_on_a_grid(export_factory):
    from calibration.int4 import on_source_grid, source_grids

    model = ir.load(str(export_factory("llama").file("model.onnx")))
    assert source_grids(model) == {}  # random weights lie on no 4-bit grid
    node = next(n for n in model.graph if n.name == "model.layers.0.mlp.down_proj")
    rows, columns = node.inputs[1].const_value.shape
    node.inputs[1].const_value = ir.tensor(q4_1_weight(rows, columns))
    grids = source_grids(model, skip=frozenset({"lm_head"}))
    assert list(grids) == ["model.layers.0.mlp.down_proj"] and on_source_grid(grids["model.layers.0.mlp.down_proj"])


def tied_head_model(vocab=96, width=64):
    """An embedding lookup and an LM head reading the same table through a Transpose, as a tied export does."""
    ids = ir.Value(name="ids", shape=ir.Shape([2]), type=ir.TensorType(ir.DataType.INT64))
    graph = empty_graph(ids)
    table = add_initializer(graph, "embed_tokens.weight",
                            np.random.default_rng(7).standard_normal((vocab, width)).astype(np.float32))
    gather = ir.node("Gather", [table, ids], name="embed_tokens")
    transpose = ir.node("Transpose", [table], attributes={"perm": [1, 0]}, name="lm_head_transpose")
    head = ir.node("MatMul", [gather.outputs[0], transpose.outputs[0]], name="lm_head")
    for node in (gather, transpose, head):
        graph.append(node)
    return model_of(graph, head.outputs[0])


def test_untie_gives_a_tied_head_its_own_weight_and_int4_then_reaches_it():
    from test_graph import run

    from export.graph.gptq import UntiePass

    model = tied_head_model()
    feeds = {"ids": np.array([3, 40])}
    before = run(model, feeds)[0]
    assert UntiePass(frozenset({"lm_head"}))(model).untied == ["lm_head"]
    assert "Transpose" not in op_types(model) and "Gather" in op_types(model)  # the lookup keeps the table
    assert np.array_equal(run(model, feeds)[0], before)
    head = next(node for node in model.graph if node.name == "lm_head")
    Int4WeightsPass({"lm_head": rtn(head.inputs[1].const_value.numpy(), Int4Spec(32, True))})(model)
    assert op_types(model).count("DequantizeLinear") == 1
    assert np.abs(run(model, feeds)[0] - before).mean() < 0.1 * np.abs(before).mean()


def test_int4_lm_head_gives_the_head_4_bits_and_is_refused_without_a_4_bit_precision(tiny_model_factory, tmp_path):
    from test_calibration import build_tiny_llama

    from export.build import parse_args
    from runtime.errors import BadInputError

    with pytest.raises(BadInputError, match="--int4-lm-head"):
        parse_args(["--precision", "int8", "--int4-lm-head", "--out", str(tmp_path)])
    result = build_tiny_llama(tiny_model_factory, tmp_path, "int4", "--allow-accuracy-loss", "--int4-lm-head")
    assert result.returncode == 0, result.stderr
    proto = onnx.load(str(next((tmp_path / "store").glob("calibrate-*")) / "model.onnx"))
    inits = {i.name: i.data_type for i in proto.graph.initializer}
    head = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.name.startswith("lm_head"))
    assert inits[head.input[0]] == onnx.TensorProto.INT4
