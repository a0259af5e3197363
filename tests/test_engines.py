"""The ONNX Runtime engine on tiny models: attention fusion keeps the ONNX contract and the numbers, the
stage records what it did, and verification fails a wrong engine, naming the layer."""

import json
import shutil

import numpy as np
import onnx_ir as ir
import pytest
from conftest import run_cli
from test_calibration import build_tiny_llama

import runtime
from engines import ort as ort_engine
from engines.verify import Baseline, Reference, verify
from runtime import artifact as artifacts
from runtime import ort_session
from runtime.artifact import ArtifactWriter
from runtime.baselines import plain_greedy, plain_session
from runtime.contract import prefill_feeds
from runtime.errors import AccuracyError
from runtime.session import SessionOptions


def build_engine(export, tmp_path, **config):
    """The engine stage on an export, without verification."""
    with ArtifactWriter(tmp_path / "store", ort_engine.STAGE, "test", export.id, {}) as writer:
        return ort_engine.run(export, writer, ort_engine.EngineConfig(threads=1, **config), progress=lambda _: None)


def left_padded_run(artifact, prompts, steps=3):
    """Logits of a left-padded batch's prefill and greedy decode steps through the runtime, with the mask."""
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):], mask[row, width - len(prompt):] = prompt, 1
    session = runtime.open(artifact, SessionOptions(threads=1))
    logits = [np.array(session.prefill(ids, mask))]
    for _ in range(steps):
        logits.append(np.array(session.decode(logits[-1][:, -1].argmax(-1))))
    session.close()
    return logits, mask


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def test_fused_attention_keeps_the_contract_and_the_numbers(export_factory, tmp_path, arch):
    """Qwen3 and Gemma 3 normalize each q/k head before the rotation; Gemma 3 also scales scores by its own
    factor and rotates local and global layers with different tables."""
    export = export_factory(arch)
    engine = build_engine(export, tmp_path)
    fusion = engine.metrics["fusion"]
    assert fusion["attention"] == "fused"
    ops = fusion["op_types_after"]
    assert ops["GroupQueryAttention"] == export.model_facts["layers"] and "Softmax" not in ops
    assert "RotaryEmbedding" not in ops  # applied inside GroupQueryAttention
    # q, k and v packed into one MatMul per layer (4 attention + 3 MLP linear layers become 5, plus the head),
    # except where q and k are normalized between projection and attention
    per_layer = 7 if arch in ("qwen3", "gemma3_text") else 5
    assert ops["MatMul"] == per_layer * export.model_facts["layers"] + 1
    assert fusion["ops_after"] < fusion["ops_before"] / 2
    prompts = [[5, 9, 17, 33, 60, 7, 8, 12], [40, 41, 42]]  # the second row is left-padded
    expected, mask = left_padded_run(export, prompts)
    got, _ = left_padded_run(engine, prompts)
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[0][valid], expected[0][valid], atol=1e-4)
    for step in range(1, len(got)):
        np.testing.assert_allclose(got[step], expected[step], atol=1e-4)


def test_prefill_for_generation_computes_the_last_position_only(export_factory, tmp_path):
    export = export_factory("llama")
    engine = build_engine(export, tmp_path)
    assert engine.metrics["fusion"]["logits_to_keep"]
    ids = np.array([[5, 9, 17, 33, 60, 7], [40, 41, 42, 43, 44, 45]], np.int64)
    session = runtime.open(engine, SessionOptions(threads=1))
    every = np.array(session.prefill(ids))
    last = np.array(session.prefill(ids, last_only=True))
    following = np.array(session.decode(last[:, -1].argmax(-1)))  # the cache is the same either way
    session.close()
    assert every.shape == (2, 6, export.model_facts["vocab_size"]) and last.shape == (2, 1, every.shape[2])
    np.testing.assert_allclose(last[:, 0], every[:, -1], atol=1e-5)
    assert following.shape == (2, 1, every.shape[2])
    # Whoever does not feed logits_to_keep (Polygraphy, plain onnxruntime) gets every position: the contract.
    plain = plain_session(engine.file("model.onnx"), threads=1)
    np.testing.assert_allclose(plain.run(["logits"], prefill_feeds(ids, export.model_facts))[0], every, atol=1e-5)


def test_shared_cache_grows_in_place_and_matches_the_contract_loop(export_factory, tmp_path, monkeypatch):
    """GroupQueryAttention engines keep the cache in buffers bound as past and present; started small, the
    buffers double (copying what they hold) several times in 20 steps, and every logit matches the plain
    loop that passes the cache through the contract's past/present tensors."""
    monkeypatch.setattr(ort_session, "CACHE_MIN_POSITIONS", 1)
    engine = build_engine(export_factory("llama"), tmp_path)
    prompt = np.array([[5, 9, 17, 33, 60, 7]], np.int64)
    expected = plain_greedy(plain_session(engine.file("model.onnx"), threads=1), engine.model_facts, prompt, 21)
    session = runtime.open(engine, SessionOptions(threads=1))
    assert isinstance(session._kv, ort_session.SharedCache)
    logits = [np.array(session.prefill(prompt))[0, -1]]
    for _ in range(20):
        logits.append(np.array(session.decode(np.array([logits[-1].argmax()])))[0, -1])
    assert session.cache_length == 26 and session._kv.buffers[0].shape[2] >= 26 > 2 * prompt.shape[1]  # it grew
    session.prefill(np.array([[5, 9], [7, 8]]))  # another batch size: new buffers, nothing carried over
    again = np.array(session.prefill(prompt))[0, -1]
    session.close()
    np.testing.assert_allclose(again, logits[0], atol=1e-5)
    np.testing.assert_allclose(np.array(logits), np.array(expected.last_logits), atol=1e-4)


def test_family_without_plain_attention_keeps_it_and_says_why(export_factory, tmp_path):
    engine = build_engine(export_factory("gpt2"), tmp_path)
    assert engine.metrics["fusion"]["attention"] == "gpt2 attention is not the plain q/k/v + RoPE kind"
    assert "GroupQueryAttention" not in engine.metrics["fusion"]["op_types_after"]
    assert engine.manifest["backend"] == "ort" and engine.metrics["session"]["provider"] == "cpu"


def test_fusion_can_be_turned_off(export_factory, tmp_path):
    engine = build_engine(export_factory("llama"), tmp_path, fuse_attention=False)
    assert engine.metrics["fusion"]["attention"] == "disabled (--no-fuse-attention)"
    assert "GroupQueryAttention" not in engine.metrics["fusion"]["op_types_after"]


def test_build_verifies_the_engine_and_records_it(tiny_model_factory, tmp_path):
    result = run_cli("export.build", "--model", str(tiny_model_factory("llama")), "--out", str(tmp_path),
                     "--threads", "1")
    assert result.returncode == 0, result.stderr
    manifest = json.loads(next(tmp_path.glob("engine-*/manifest.json")).read_text())
    (check,) = manifest["metrics"]["accuracy"]
    assert check["passed"] and check["logits_statistic"] == "max" and check["logits_diff"] < 1e-3
    assert check["logits_limit"] == 1e-3 and check["ppl_limit_percent"] == 0.5  # fp32: no parent loss, the slack
    assert abs(check["perplexity_increase_percent"]) < 0.01 and check["top1_agreement"] == 1.0
    assert manifest["metrics"]["session"] == {"provider": "cpu", "threads": 1, "graph_optimization": "extended (saved)"}
    # The summary's accuracy column, one formatter for every gate: the export's parity, the engine's check.
    assert "vs pytorch on parity prompt: top-1 1.000, max|dlogits|" in result.stdout
    assert "vs fp32: ppl" in result.stdout and "%, limit 0.5%), top-1 1.000" in result.stdout


def test_precision_matrix_shares_one_export_and_compares_the_engines(tiny_model_factory, tmp_path):
    result = build_tiny_llama(tiny_model_factory, tmp_path, "fp32,int8", "--max-ppl-increase", "50",
                              "--max-float-fraction", "0.5")
    assert result.returncode == 0, result.stderr
    store = tmp_path / "store"
    assert len(list(store.glob("export-*"))) == 1 and len(list(store.glob("engine-*"))) == 2
    engines = {m["precision"]: m for m in (json.loads(p.read_text()) for p in store.glob("engine-*/manifest.json"))}
    int8_ops = engines["int8"]["metrics"]["fusion"]["op_types_after"]
    assert int8_ops["MatMulIntegerToFloat"] > 0 and int8_ops["GroupQueryAttention"] == 2
    assert "MatMulIntegerToFloat" not in engines["fp32"]["metrics"]["fusion"]["op_types_after"]
    assert engines["int8"]["metrics"]["accuracy"][0]["perplexity_increase_percent"] <= 50.5
    table = result.stdout[result.stdout.index("precision  engine"):]
    assert [line.split()[0] for line in table.splitlines()[2:4]] == ["fp32", "int8"]


def test_wrong_engine_fails_verification_naming_the_layer(export_factory, tmp_path):
    export = export_factory("llama")
    broken = tmp_path / "broken"
    shutil.copytree(export.path, broken)
    model = ir.load(str(broken / "model.onnx"))
    weight = model.graph.initializers["model.layers.1.mlp.down_proj.weight"]
    weight.const_value = ir.tensor(weight.const_value.numpy() * 3, name=weight.name)
    ir.save(model, broken / "model.onnx")
    engine = artifacts.load(broken, verify=False)
    windows = np.random.default_rng(0).integers(3, 128, size=(2, 32))
    with pytest.raises(AccuracyError, match=r"first diverging layer: model\.layers\.1\.mlp\.down_proj"):
        verify(engine, export, Baseline((Reference.of(export, windows, threads=1),)))


@pytest.mark.parametrize("flags, code, message", [
    (["--provider", "tpu"], 2, "argument --provider: invalid choice: 'tpu'"),
    (["--provider", "cuda"], 4, "this onnxruntime has no CUDAExecutionProvider"),
    (["--threads", "0"], 2, "argument --threads: 0 is too small; give 1 or more"),
])
def test_bad_engine_flags_are_clear_errors(tiny_model_factory, tmp_path, flags, code, message):
    result = run_cli("export.build", "--model", str(tiny_model_factory("llama")), "--out", str(tmp_path), *flags)
    assert result.returncode == code
    assert message in result.stderr.strip().splitlines()[-1]


def test_float16_keeps_norms_softmax_and_logits_in_float32(export_factory, tmp_path):
    from export.graph.float16 import ConvertToFloat16Pass

    export = export_factory("llama")
    model = ir.load(str(export.file("model.onnx")))
    result = ConvertToFloat16Pass()(model)
    assert result.modified and result.half_nodes > 50
    nodes = list(model.graph)
    dtype = lambda v: (v.const_value.dtype if v.const_value is not None else v.type.dtype)  # noqa: E731
    assert all(dtype(n.inputs[0]) == ir.DataType.FLOAT for n in nodes if n.op_type in ("Softmax", "Pow"))
    assert all(dtype(i) == ir.DataType.FLOAT for n in nodes if n.name == "lm_head" for i in n.inputs)
    assert any(dtype(n.inputs[1]) == ir.DataType.FLOAT16 for n in nodes if n.name.endswith("mlp.down_proj"))
    assert all(v.type.dtype == ir.DataType.FLOAT for v in [*model.graph.inputs[3:], *model.graph.outputs])


def test_float16_build_passes_its_gate_and_fuses(tiny_model_factory, tmp_path):
    result = run_cli("export.build", "--model", str(tiny_model_factory("llama")), "--out", str(tmp_path),
                     "--precision", "fp16", "--threads", "1", "--bench-runs", "0")
    assert result.returncode == 0, result.stderr
    converted = json.loads(next(tmp_path.glob("fp16-*/manifest.json")).read_text())
    (record,) = converted["metrics"]["accuracy"]
    assert converted["precision"] == "fp16" and record["passed"] and record["ppl_limit_percent"] == 0.5
    engine = json.loads(next(tmp_path.glob("engine-*/manifest.json")).read_text())
    assert engine["metrics"]["fusion"]["attention"] == "fused"
    assert abs(engine["metrics"]["accuracy"][0]["perplexity_increase_percent"]) < 0.5


def gate(perplexity: float, reference: float, domain: str = "held-out") -> dict:
    return {"stage": "calibrate", "against": "fp32", "passed": True, "perplexity": perplexity,
            "reference_perplexity": reference, "domain": domain}


@pytest.mark.parametrize("parent_metrics, parent_is_reference, expected", [
    ({"accuracy": [gate(11.0, 10.0)]}, False, 10.0),  # calibrate: its own baseline
    ({"accuracy": [gate(30.0, 10.0, "code"), gate(22.0, 20.0)]}, False, 10.0),  # the held-out text's record
    ({"accuracy": [gate(11.0, 10.0)]}, True, 0.0),  # the reference graph itself
    ({"accuracy": [gate(11.0, 10.0, "code")]}, False, 0.0),  # nothing measured on the held-out text
    ({"distillation": {}}, False, 0.0),  # no gate recorded
    ({"accuracy": [gate(9.9, 10.0)]}, False, 0.0),  # a parent better than float grants nothing below zero
])
def test_the_parents_allowance_is_its_own_gates_figure_whatever_windows_the_reference_used(
        tmp_path, parent_metrics, parent_is_reference, expected):
    from engines.verify import parent_increase
    from runtime.accuracy import Evaluation

    export = artifacts.Artifact(tmp_path, {"id": "export0", "metrics": {}})
    parent = export if parent_is_reference else artifacts.Artifact(tmp_path, {"id": "parent0"})
    parent = artifacts.Artifact(tmp_path, {"id": parent.id, "metrics": parent_metrics})
    # The reference's windows differ from the parent's: its perplexity is unrelated to the parent's baseline.
    reference = Reference(export, np.zeros((1, 4), np.int64), Evaluation(30.0, []), threads=1)
    assert parent_increase(parent, reference) == pytest.approx(expected)


def test_fusion_figures_set_the_kept_norm_fusion_against_onnxscripts_rules(export_factory):
    """The comparison engines/ort.py's docstring rests on (engines/fusion_figures.py), on a tiny Llama: the
    engine's own path first; onnxscript's rules make the same graph there, and its whole pipeline (no GQA
    reached) more ops. A change on either side fails this, and the decision is to be measured again."""
    from engines import fusion_figures

    rows = [line.split() for line in fusion_figures.ops_table([export_factory("llama")]).splitlines()[2:]]
    assert [row[2] for row in rows] == ["ort-optimizer", "onnxscript-rules", "onnxscript-all"]
    kept, rules, everything = (int(row[3]) for row in rows)
    assert rules == kept and len(rows[1]) == 4  # no op added or missing
    assert everything > kept
