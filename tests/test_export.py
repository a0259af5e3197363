"""The export stage on a tiny random model of every supported family."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tiny_models import TINY_CONFIGS

from export import onnx_export
from export.models import load_model, resolve
from runtime import artifact as artifacts
from runtime.contract import kv_names
from runtime.errors import BadInputError


def contract_names(layers):
    inputs = ["input_ids", "attention_mask", "position_ids"] + kv_names(layers)
    outputs = ["logits"] + kv_names(layers, "present")
    return inputs, outputs


def feeds_for(ids, past, start):
    batch, length = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones((batch, start + length), np.int64),
             "position_ids": np.tile(np.arange(start, start + length, dtype=np.int64), (batch, 1))}
    return feeds | dict(zip(kv_names(len(past) // 2), past))


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_every_family_exports_to_the_contract_and_passes_parity(arch, export_factory):
    art = export_factory(arch)
    facts = art.model_facts
    assert facts["model_type"] == arch and facts["layers"] == 2 and facts["vocab_size"] == 128

    (parity,) = art.metrics["accuracy"]  # the gate's one record, against PyTorch on the parity prompt
    assert parity["stage"] == "export" and parity["against"] == "pytorch" and parity["domain"] == "parity prompt"
    assert parity["passed"] and parity["top1_agreement"] == 1.0 and parity["logits_diff"] < 1e-3
    assert parity["logits_limit"] == 1e-3
    details = art.metrics["parity"]
    assert details["greedy_tokens"] == 32 and details["greedy_first_mismatch"] is None
    assert details["steps_compared"] == 9

    inputs, outputs = contract_names(facts["layers"])
    assert [i["name"] for i in art.io["inputs"]] == inputs
    assert [o["name"] for o in art.io["outputs"]] == outputs
    by_name = {i["name"]: i for i in art.io["inputs"] + art.io["outputs"]}
    assert by_name["input_ids"]["dtype"] == "int64" and by_name["input_ids"]["shape"] == ["batch", "sequence"]
    assert by_name["attention_mask"]["shape"] == ["batch", "total_sequence"]
    past = by_name["past_key_values.0.key"]
    assert past["dtype"] == "float32"
    assert past["shape"] == ["batch", facts["kv_heads"], "past_sequence", facts["head_dim"]]
    assert by_name["logits"]["shape"][0] == "batch" and by_name["logits"]["shape"][2] == 128

    model = onnx.load(str(art.file(onnx_export.MODEL_FILE)))
    assert model.opset_import[0].version == 18
    assert not any(n.op_type == "Attention" for n in model.graph.node)  # TensorRT rejects its KV inputs


def test_sliding_window_caps_the_context_and_the_runtime_says_so(export_factory):
    import runtime
    from runtime.session import SessionOptions

    facts = export_factory("gemma3_text").model_facts
    assert facts["sliding_window"] == 128 and facts["max_context"] == 128
    with runtime.open(export_factory("gemma3_text"), SessionOptions(threads=1)) as session:
        with pytest.raises(BadInputError, match="129 tokens exceed the model.s context of 128"):
            session.prefill(np.ones((1, 129), np.int64))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_graph_serves_batched_prefill_from_empty_cache_and_decode(arch, tiny_model_factory, export_factory):
    """Batch 2, past length 0, then a decode step: logits match PyTorch on both."""
    folder = tiny_model_factory(arch)
    art = export_factory(arch)
    facts = art.model_facts
    session = ort.InferenceSession(str(art.file(onnx_export.MODEL_FILE)), providers=["CPUExecutionProvider"])
    model = load_model(resolve(str(folder)))

    ids = np.array([[5, 9, 13, 17, 21], [40, 41, 42, 43, 44]], dtype=np.int64)
    empty = [np.zeros((2, facts["kv_heads"], 0, facts["head_dim"]), np.float32)] * (2 * facts["layers"])
    logits, *present = session.run(None, feeds_for(ids, empty, 0))
    step = np.array([[7], [8]], dtype=np.int64)
    step_logits, *_ = session.run(None, feeds_for(step, present, ids.shape[1]))

    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), use_cache=True)
        ref_step = model(input_ids=torch.from_numpy(step), past_key_values=ref.past_key_values, use_cache=True)
    assert np.abs(logits - ref.logits.numpy()).max() < 1e-4
    assert np.abs(step_logits - ref_step.logits.numpy()).max() < 1e-4


def test_large_models_get_external_data(tiny_model_factory, tmp_path):
    source = resolve(str(tiny_model_factory("llama")))
    config = onnx_export.ExportConfig(external_data_threshold_bytes=0)
    with artifacts.ArtifactWriter(tmp_path, "export", "ext", None, {}) as writer:
        art = onnx_export.run(load_model(source), None, writer, config)
    assert "model.onnx.data" in art.manifest["files"]
    graph = onnx.load(str(art.file("model.onnx")), load_external_data=False).graph
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
    assert art.metrics["accuracy"][0]["passed"]


def test_a_failed_parity_check_fails_the_stage_and_leaves_no_artifact(tiny_model_factory, tmp_path):
    from runtime.errors import AccuracyError

    source = resolve(str(tiny_model_factory("llama")))
    impossible = onnx_export.ExportConfig(parity_atol=0.0)
    with pytest.raises(AccuracyError, match="disagrees with PyTorch"):
        with artifacts.ArtifactWriter(tmp_path, "export", "bad", None, {}) as writer:
            onnx_export.run(load_model(source), None, writer, impossible)
    assert list(tmp_path.iterdir()) == []
