"""Calibration on tiny models: sample data, statistics, SmoothQuant exactness, TensorRT-ready Q/DQ, gates."""

import json
from dataclasses import replace

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import run_cli

from export.graph import stats
from export.graph.data import DataConfig, default_documents, load_samples, split_documents
from export.graph.qdq import BLOCKS, QuantizeLinearLayersPass
from export.graph.smoothquant import SmoothQuantPass
from runtime import accuracy


class ByteCodec:
    """A tokenizer stand-in for tiny models: one token per byte, folded into the tiny vocabulary."""

    chat_template = None

    def encode(self, text):
        return [b % 100 + 3 for b in text.encode()]


def tiny_samples(count=6, length=48, seed=0, vocab=128):
    return np.random.default_rng(seed).integers(3, vocab, size=(count, length))


def fused_op_count(model_path, tmp_path, op_type):
    """How many `op_type` nodes ONNX Runtime's graph optimizations leave in the model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return sum(n.op_type == op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


def build_tiny_llama(tiny_model_factory, tmp_path, precision, *flags):
    """`python -m export.build` on the tiny Llama with a small calibration set; returns the process result."""
    (tmp_path / "text.txt").write_text("Calibration text for a tiny model. " * 400)
    return run_cli("export.build", "--model", str(tiny_model_factory("llama")), "--precision", precision,
                   "--out", str(tmp_path / "store"), "--calib-data", str(tmp_path / "text.txt"),
                   "--calib-samples", "4", "--calib-seq-len", "32", "--eval-samples", "2", *flags)


def assert_same_function_in_float(art, model, tmp_path):
    """A float graph pass must not change the model: perplexity to 1e-4 and every top-1 prediction."""
    ir.save(model, tmp_path / "transformed.onnx")
    windows = tiny_samples(count=3, seed=9)
    before = accuracy.evaluate_model(art.file("model.onnx"), art.model_facts, windows, threads=1)
    after = accuracy.evaluate_model(tmp_path / "transformed.onnx", art.model_facts, windows, threads=1)
    assert after.perplexity == pytest.approx(before.perplexity, rel=1e-4)
    assert after.agreement(before) == 1.0


# -- sample data -------------------------------------------------------------------------------------------


def test_default_text_is_offline_and_split_without_overlap():
    documents = default_documents()
    assert len(documents) > 50 and sum(len(t) for t in documents.values()) > 100_000
    split = split_documents(documents)
    assert split.calibration and split.evaluation
    assert not set(split.calibration) & set(split.evaluation)
    assert split_documents(documents).evaluation == split.evaluation  # deterministic


def test_samples_are_seeded_windows_and_eval_is_held_out():
    config = DataConfig(samples=8, seq_len=64, eval_samples=4, seed=3)
    first = load_samples(config, ByteCodec(), [2])
    assert first.calibration.shape == (8, 64) and first.evaluation.shape == (4, 64)
    assert np.array_equal(load_samples(config, ByteCodec(), [2]).calibration, first.calibration)
    other = load_samples(DataConfig(samples=8, seq_len=64, eval_samples=4, seed=4), ByteCodec(), [2])
    assert not np.array_equal(other.calibration, first.calibration)
    assert np.array_equal(other.evaluation, first.evaluation)


def test_user_text_files_folders_and_jsonl(tmp_path):
    text = "The quick brown fox jumps over the lazy dog. " * 200
    (tmp_path / "a.txt").write_text(text)
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.txt").write_text(f"Document {i}. " + text)
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps({"body": f"{i} {text}"}) for i in range(6)))
    for source, field in ((tmp_path / "a.txt", "text"), (folder, "text"), (tmp_path / "rows.jsonl", "body")):
        samples = load_samples(DataConfig(source=str(source), text_field=field, samples=4, seq_len=32,
                                          eval_samples=2), ByteCodec(), [2])
        assert samples.calibration.shape == (4, 32) and samples.evaluation.shape == (2, 32)


@pytest.mark.parametrize("content, field, message", [
    (b"", "text", "holds no text"),
    (b"short", "text", "fewer than"),
    (b"\x00\x01\x02binary", "text", "not a text file"),
    (b'{"other": "x"}\n', "text", "has no 'text' field"),
])
def test_bad_calibration_data_is_a_clear_error(tmp_path, content, field, message):
    from runtime.errors import BadInputError

    path = tmp_path / ("data.jsonl" if b"{" in content else "data.txt")
    path.write_bytes(content)
    with pytest.raises(BadInputError, match=message):
        load_samples(DataConfig(source=str(path), text_field=field, samples=4, seq_len=32), ByteCodec(), [2])


def test_dataset_id_without_datasets_or_network_is_a_clear_error():
    from runtime.errors import BadInputError

    with pytest.raises(BadInputError, match="dataset"):
        load_samples(DataConfig(source="someorg/some-dataset"), ByteCodec(), [2])


# -- statistics --------------------------------------------------------------------------------------------


def test_streaming_histogram_keeps_counts_and_bounded_memory():
    rng = np.random.default_rng(0)
    tensor = stats.TensorStats(channels=16)
    data = [rng.standard_normal((50, 16)).astype(np.float32) * (1 + i) for i in range(10)]
    for x in data:
        tensor.update(x, rng)
    everything = np.abs(np.concatenate(data))
    assert tensor.absmax == pytest.approx(float(everything.max()))
    assert tensor.histogram.sum() == everything.size and tensor.histogram.shape == (stats.BINS,)
    assert np.allclose(tensor.channel_absmax, everything.max(axis=0))
    assert tensor.rows.shape == (stats.RESERVOIR_ROWS, 16)
    thresholds = {method: tensor.threshold(method) for method in stats.METHODS}
    assert thresholds["minmax"] == pytest.approx(tensor.absmax)
    assert 0 < thresholds["percentile"] <= thresholds["minmax"]
    assert 0 < thresholds["mse"] <= thresholds["minmax"]


# -- graph passes ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_stats(export_factory):
    art = export_factory("llama")
    model = ir.load(str(art.file("model.onnx")))
    inputs = stats.linear_inputs(model, art.model_facts["linear_layers"])
    tensors = sorted(set(inputs.values()))
    collected = stats.collect(art.file("model.onnx"), tensors, tiny_samples(), art.model_facts, threads=1)
    return art, collected


def test_smoothquant_is_exact_in_float(llama_stats, tmp_path):
    art, collected = llama_stats
    model = ir.load(str(art.file("model.onnx")))
    smoothing = SmoothQuantPass({name: s.channel_absmax for name, s in collected.items()}, alpha=0.5,
                                skip=frozenset({"lm_head"}))
    result = smoothing(model)
    assert result.modified
    # q/k/v and gate/up fold into the norms; down_proj folds into up_proj: 6 of the 7 layers of each block.
    assert len(result.smoothed) == 2 * 6 and "model.layers.1.mlp.down_proj" in result.smoothed
    assert_same_function_in_float(art, model, tmp_path)


def test_qdq_is_what_tensorrt_accepts(llama_stats, tmp_path):
    art, collected = llama_stats
    model = ir.load(str(art.file("model.onnx")))
    scales = {name: s.scale("percentile") for name, s in collected.items()}
    result = QuantizeLinearLayersPass(frozenset({"lm_head"}), scales)(model)
    assert result.modified and len(result.quantized) == 14 and "lm_head" not in result.quantized
    ir.save(model, tmp_path / "int8.onnx")
    proto = onnx.load(str(tmp_path / "int8.onnx"))
    onnx.checker.check_model(proto)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero_point = inits[node.input[2]]
            assert zero_point.dtype == np.int8 and not zero_point.any()  # symmetric, zero point 0
        if node.op_type == "QuantizeLinear":  # activations: one scale per tensor, never a MatMul's output
            assert inits[node.input[1]].shape == ()
            assert producers.get(node.input[0]) is None or producers[node.input[0]].op_type != "MatMul"
    weight_dq = [n for n in proto.graph.node if n.name.endswith("/weight_dq")]
    assert len(weight_dq) == 14
    for node in weight_dq:
        weight, scale = inits[node.input[0]], inits[node.input[1]]
        axis = next(a.i for a in node.attribute if a.name == "axis")
        assert weight.dtype == np.int8 and weight.min() >= -127 and axis == 1 and scale.shape == (weight.shape[1],)
    lm_head = next(n for n in proto.graph.node if n.name == "lm_head")
    assert lm_head.input[1] in inits and inits[lm_head.input[1]].dtype == np.float32  # kept in float
    windows = tiny_samples(count=3, seed=9)
    reference = accuracy.evaluate_model(art.file("model.onnx"), art.model_facts, windows, threads=1)
    quantized = accuracy.evaluate_model(tmp_path / "int8.onnx", art.model_facts, windows, threads=1)
    assert quantized.agreement(reference) > 0.8
    # ONNX Runtime turns every Q/DQ linear layer into an integer MatMul (where int8 gets its speed).
    assert fused_op_count(tmp_path / "int8.onnx", tmp_path, "MatMulIntegerToFloat") == 14


# -- the stage through the build ---------------------------------------------------------------------------


def test_int8_build_meets_a_loose_gate_and_records_its_metrics(tiny_model_factory, tmp_path):
    result = build_tiny_llama(tiny_model_factory, tmp_path, "int8", "--max-ppl-increase", "50",
                              "--max-float-fraction", "0.5")
    assert result.returncode == 0, result.stderr
    calibrated = next((tmp_path / "store").glob("calibrate-*"))
    manifest = json.loads((calibrated / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["stage"] == "calibrate"
    (record,) = manifest["metrics"]["accuracy"]
    assert record["stage"] == "calibrate" and record["against"] == "fp32" and record["ppl_limit_percent"] == 50
    assert record["passed"] and record["perplexity_increase_percent"] <= 50 and record["windows"] == 2
    assert "lm_head" not in manifest["metrics"]["kept_in_float"]
    layers = json.loads(next((tmp_path / "store").glob("export-*/manifest.json")).read_text())["io"]["model"][
        "linear_layers"]
    down = [name for name in layers if name.endswith(".mlp.down_proj")]
    assert down and sorted(manifest["metrics"]["weight_only_int8"]) == sorted(down + ["lm_head"])
    # Neither is smoothed (nothing quantizes their inputs): per layer, q/k/v and gate/up are (o_proj reads
    # attention, which nothing folds into).
    assert manifest["metrics"]["smoothquant_layers"] == 5 * len(down)
    # The LM head and every down_proj: int8 weights behind a DequantizeLinear, inputs straight from the
    # float graph; every other layer reads a DequantizeLinear.
    proto = onnx.load(str(calibrated / "model.onnx"))
    producers = {out: node for node in proto.graph.node for out in node.output}
    initializers = {i.name: i for i in proto.graph.initializer}
    for layer in proto.graph.node:
        if layer.name not in layers:
            continue
        weight_dq, input_producer = producers[layer.input[1]], producers.get(layer.input[0])
        assert weight_dq.op_type == "DequantizeLinear"
        assert onnx.numpy_helper.to_array(initializers[weight_dq.input[0]]).dtype == np.int8
        reads_dq = input_producer is not None and input_producer.op_type == "DequantizeLinear"
        assert reads_dq == (layer.name not in down + ["lm_head"]), layer.name
    assert "calibrate" in result.stdout and "top-1" in result.stdout


def test_missed_gate_exits_3_and_names_layers(tiny_model_factory, tmp_path):
    result = build_tiny_llama(tiny_model_factory, tmp_path, "int8", "--max-ppl-increase", "0",
                              "--max-float-fraction", "0")
    assert result.returncode == 3, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "misses the accuracy gate" in last and "most sensitive layers: model.layers." in last
    assert not list((tmp_path / "store").glob("calibrate-*"))


def test_keep_fp_naming_no_layer_exits_2(tiny_model_factory, tmp_path):
    result = run_cli("export.build", "--model", str(tiny_model_factory("llama")), "--precision", "int8",
                     "--out", str(tmp_path / "store"), "--keep-fp", "model.layers.99.mlp.up_proj")
    assert result.returncode == 2
    assert "--keep-fp names no linear layer: model.layers.99.mlp.up_proj" in result.stderr.strip().splitlines()[-1]


def test_residual_rotation_is_exact_in_float(export_factory, tmp_path):
    from export.graph.rotation import RotateResidualPass

    art = export_factory("llama")
    model = ir.load(str(art.file("model.onnx")))
    result = RotateResidualPass(seed=1)(model)
    assert result.modified and len(result.rotated) == 15  # 7 per block and the LM head
    assert_same_function_in_float(art, model, tmp_path)


def test_online_down_proj_rotation_is_exact_in_float(export_factory, tmp_path):
    from export.graph.rotation import RotateDownProjInputPass, block_hadamard

    h = block_hadamard(96)  # 3 blocks of 32
    np.testing.assert_allclose(h @ h.T, np.eye(96), atol=1e-6)
    assert np.count_nonzero(h[:32, 32:]) == 0 and np.count_nonzero(h[:32, :32]) == 32 * 32
    art = export_factory("llama")
    model = ir.load(str(art.file("model.onnx")))
    result = RotateDownProjInputPass()(model)
    assert result.modified and result.rotated == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert sum(node.name.endswith(".online_rotation") for node in model.graph) == 2
    assert_same_function_in_float(art, model, tmp_path)


def test_rotation_refuses_layernorm_models_in_plain_words(export_factory):
    from export.graph.rotation import RotateResidualPass

    model = ir.load(str(export_factory("gpt2").file("model.onnx")))
    with pytest.raises(ir.passes.PreconditionError, match="needs RMSNorm"):
        RotateResidualPass()(model)


def test_int8_weight_only_is_blockwise_and_fuses_to_matmulnbits(tiny_model_factory, tmp_path):
    result = build_tiny_llama(tiny_model_factory, tmp_path, "int8-weight-only", "--allow-accuracy-loss")
    assert result.returncode == 0, result.stderr
    calibrated = next((tmp_path / "store").glob("calibrate-*"))
    proto = onnx.load(str(calibrated / "model.onnx"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    dequantize = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    manifest = json.loads((calibrated / "manifest.json").read_text())
    layers, block = manifest["io"]["model"]["linear_layers"], BLOCKS["int8-weight-only"]
    assert len(dequantize) == len(layers)  # every layer, the tied LM head included
    assert manifest["metrics"]["smoothquant_layers"] > 0  # its inputs are quantized at run time
    for node in dequantize:
        weight, scale = inits[node.input[0]], inits[node.input[1]]
        assert [(a.name, a.i) for a in node.attribute] == [("axis", 0), ("block_size", block)]
        assert weight.dtype == np.int8 and scale.shape == (-(-weight.shape[0] // block), weight.shape[1])
    assert not any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    assert fused_op_count(calibrated / "model.onnx", tmp_path, "MatMulNBits") == len(layers)


def test_blocked_weights_take_a_shorter_last_block():
    from export.graph.qdq import quantize_weight_blocked

    weight = np.random.default_rng(0).standard_normal((200, 3)).astype(np.float32)
    weight[150:] *= 1e-3  # the short last block (rows 128-199) must get a scale of its own
    quantized, scale = quantize_weight_blocked(weight, 8, 128)
    assert quantized.shape == (200, 3) and scale.shape == (2, 3)
    np.testing.assert_allclose(scale[1], np.abs(weight[128:]).max(axis=0) / 127, rtol=1e-6)
    restored = quantized * np.repeat(scale, 128, axis=0)[:200]
    assert np.abs(restored - weight).max() <= scale.max() / 2 + 1e-7


def test_int4_is_blockwise_weight_only_and_fuses_to_matmulnbits(tiny_model_factory, tmp_path):
    result = build_tiny_llama(tiny_model_factory, tmp_path, "int4", "--allow-accuracy-loss")
    assert result.returncode == 0, result.stderr
    calibrated = next((tmp_path / "store").glob("calibrate-*"))
    proto = onnx.load(str(calibrated / "model.onnx"))
    dequantize = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    blocked = [n for n in dequantize if n.name != "lm_head/weight_dq"]
    assert blocked and all(any(a.name == "block_size" and a.i == 32 for a in n.attribute) for n in blocked)
    # the LM head: int8 per output channel, not int4
    head = next(n for n in dequantize if n.name == "lm_head/weight_dq")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert [(a.name, a.i) for a in head.attribute] == [("axis", 1)]
    assert inits[head.input[0]].dtype == np.int8
    assert not any(n.op_type == "QuantizeLinear" for n in proto.graph.node)  # weights only
    assert fused_op_count(calibrated / "model.onnx", tmp_path, "MatMulNBits") == len(blocked) + 1
    assert "model.layers.1.self_attn.o_proj" in {n.name for n in proto.graph.node}  # names survive quantizing
    engine = json.loads(next((tmp_path / "store").glob("engine-*/manifest.json")).read_text())
    assert engine["metrics"]["fusion"]["attention"] == "fused"


def test_smoothquant_strength_follows_the_precision_unless_given_or_turned_off():
    from calibration.calibrate import smoothquant_strength
    from export.build import parse_args

    def strength(*flags):
        config = parse_args(list(flags)).calibration
        return [smoothquant_strength(replace(config, precision=p)) for p in ("int8", "int8-weight-only", "int4")]

    assert strength() == [0.75, 0.5, None]
    assert strength("--smoothquant-alpha", "0.6") == [0.6, 0.6, None]
    assert strength("--smoothquant-alpha", "-1") == [None, None, None]
