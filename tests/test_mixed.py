"""Mixed 4/8-bit weights: the search for the fewest 8-bit layers, the --max-size budget, and a build on a tiny
Llama whose plan is in the manifest and whose graph holds exactly that plan."""

import json
from pathlib import Path
from types import SimpleNamespace

import onnx
import onnx_ir as ir
import pytest
from test_calibration import build_tiny_llama

from calibration.calibrate import (
    CalibrationConfig,
    _all_four_bit_bytes,
    _eight_bit_bytes,
    _fewest_passing,
    _four_bit_bytes,
)
from export.build import parse_args
from export.graph.linear import linear_nodes, weight_array
from runtime.errors import BadInputError


def counted(increase_of):
    """An `evaluate` for _fewest_passing whose candidates' increase is `increase_of(count)`, and its calls."""
    calls = []

    def evaluate(count):
        calls.append(count)
        return SimpleNamespace(count=count, increase=increase_of(count))
    return evaluate, calls


@pytest.mark.parametrize("needed", [0, 1, 7, 50, 199, 200])
def test_the_search_finds_nearly_the_fewest_passing_layers_in_few_evaluations(needed):
    evaluate, calls = counted(lambda count: 0.5 if count >= needed else 5.0)
    chosen = _fewest_passing(evaluate, 200, limit=1.0)
    assert chosen.increase <= 1.0
    assert needed <= chosen.count <= needed + max(1, needed // 8)
    assert len(set(calls)) <= 2 * 8 + 2  # doubling and bisecting: logarithmic in the 200 layers


def test_the_search_gives_every_layer_8_bits_when_none_passes():
    evaluate, _ = counted(lambda count: 9.0 - count / 100)
    assert _fewest_passing(evaluate, 200, limit=1.0).count == 200


def test_max_size_and_float_zero_points_are_refused_where_mixed_is_not_built(tmp_path):
    with pytest.raises(BadInputError, match="--max-size is the budget of --precision mixed"):
        parse_args(["--precision", "int4", "--max-size", "100", "--out", str(tmp_path)])
    with pytest.raises(BadInputError, match="--precision mixed takes int4 blocks with integer zero points"):
        parse_args(["--precision", "mixed", "--int4-method", "hqq", "--out", str(tmp_path)])
    with pytest.raises(BadInputError, match="--max-size"):
        parse_args(["--precision", "mixed", "--max-size", "-1", "--out", str(tmp_path)])


def calibrated_manifest(tmp_path):
    return json.loads(next((tmp_path / "store").glob("calibrate-*/manifest.json")).read_text())


def weight_types(tmp_path) -> dict[str, int]:
    """Linear layer -> its weight's element type, from the calibrated graph's DequantizeLinear inputs."""
    proto = onnx.load(str(next((tmp_path / "store").glob("calibrate-*")) / "model.onnx"))
    types = {i.name: i.data_type for i in proto.graph.initializer}
    return {node.name.removesuffix("/weight_dq"): types[node.input[0]] for node in proto.graph.node
            if node.op_type == "DequantizeLinear" and node.input[0] in types}


def test_a_mixed_build_at_a_tight_gate_gives_8_bits_to_layers_until_it_passes(tiny_model_factory, tmp_path):
    result = build_tiny_llama(tiny_model_factory, tmp_path, "mixed", "--max-ppl-increase", "0.05",
                              "--allow-accuracy-loss")
    assert result.returncode == 0, result.stderr
    manifest = calibrated_manifest(tmp_path)
    metrics, layers = manifest["metrics"], manifest["io"]["model"]["linear_layers"]
    tried = {t["eight_bit"]: t for t in metrics["tried"]}
    assert 0 in tried and len(tried) > 1  # all 4-bit first, then more 8-bit layers
    assert "lm_head" in metrics["eight_bit"]  # int8 as at every precision
    assert metrics["four_bit"] + len(metrics["eight_bit"]) == len(layers)
    types = weight_types(tmp_path)
    eight = {name for name, kind in types.items() if kind == onnx.TensorProto.INT8}
    four = {name for name, kind in types.items() if kind == onnx.TensorProto.INT4}
    assert eight == set(metrics["eight_bit"]) and len(four) == metrics["four_bit"]
    # what --max-size predicts 8 bits cost is what the file grew by
    chosen = [name for name in metrics["eight_bit"] if name != "lm_head"]
    assert chosen
    predicted = sum(_eight_bit_bytes(shape) - _four_bit_bytes(shape, CalibrationConfig())
                    for shape in layer_shapes(tmp_path, chosen))
    grown = tried[len(chosen)]["model_bytes"] - tried[0]["model_bytes"]
    assert grown == pytest.approx(predicted, abs=300 * len(chosen))  # the graph's own bytes: names, nodes
    report = (tmp_path / "store" / "report.md").read_text()
    assert "8-bit layers (mixed" in report


def exported_model(tmp_path) -> Path:
    return next((tmp_path / "store").glob("export-*")) / "model.onnx"


def layer_shapes(tmp_path, names):
    """The [in, out] weight shapes of these layers of the build's export."""
    shapes = {n.name: weight_array(n).shape for n in linear_nodes(ir.load(str(exported_model(tmp_path))).graph)}
    return [shapes[name] for name in names]


def test_max_size_keeps_the_model_within_it_and_refuses_one_below_all_4_bit(tiny_model_factory, tmp_path):
    for folder in ("free", "sized", "small"):
        (tmp_path / folder).mkdir()
    result = build_tiny_llama(tiny_model_factory, tmp_path / "free", "mixed", "--max-ppl-increase", "0.05",
                              "--allow-accuracy-loss")
    assert result.returncode == 0, result.stderr
    tried = {t["eight_bit"]: t["model_bytes"] for t in calibrated_manifest(tmp_path / "free")["metrics"]["tried"]}
    # the size checked before any calibration is the all-4-bit model's but for the graph's own bytes
    floor = _all_four_bit_bytes(exported_model(tmp_path / "free"), ["lm_head"], CalibrationConfig())
    assert 0 < tried[0] - floor < 0.02 * tried[0], (tried[0], floor)
    budget = (tried[0] + tried[max(tried)]) / 2 / 1e6
    result = build_tiny_llama(tiny_model_factory, tmp_path / "sized", "mixed", "--max-size", f"{budget:.3f}",
                              "--allow-accuracy-loss")
    assert result.returncode == 0, result.stderr
    metrics = calibrated_manifest(tmp_path / "sized")["metrics"]
    assert len(metrics["tried"]) == 2 and 0 < len(metrics["eight_bit"]) - 1 < max(tried)
    # within it but for the graph's own few hundred bytes a layer (names, nodes), which the budget leaves out
    assert metrics["tried"][-1]["model_bytes"] <= budget * 1e6 + 300 * len(metrics["eight_bit"])
    result = build_tiny_llama(tiny_model_factory, tmp_path / "small", "mixed", "--max-size", f"{tried[0] / 2e6:.3f}")
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "below this model with every layer 4-bit" in last_line
    assert "[calibrate] int4" not in result.stdout + result.stderr  # refused before GPTQ
