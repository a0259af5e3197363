"""Graph passes: a tiny model, the pass, then op types, the `modified` flag and numbers against ONNX Runtime."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from export.graph.linear import projection_nodes
from export.graph.naming import NameLinearLayersPass
from runtime.contract import prefill_feeds


def run_prefill(model_path, facts, ids):
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], prefill_feeds(ids, facts))[0]


def test_exported_linear_layers_carry_their_module_names(export_factory):
    art = export_factory("llama")
    names = art.model_facts["linear_layers"]
    assert names[:3] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                         "model.layers.0.self_attn.v_proj"]
    assert "model.layers.1.mlp.down_proj" in names and names[-1] == "lm_head"
    assert len(names) == 2 * 7 + 1
    graph = ir.load(str(art.file("model.onnx"))).graph
    assert graph.initializers["model.layers.1.mlp.down_proj.weight"].const_value.shape == (128, 64)


def test_naming_pass_renames_without_changing_numbers(export_factory, tmp_path):
    art = export_factory("gpt2")
    model = ir.load(str(art.file("model.onnx")))
    for node in projection_nodes(model.graph):  # undo the names, as the exporter leaves them
        node.name = f"node_{id(node)}"
    assert NameLinearLayersPass()(model).modified
    assert not NameLinearLayersPass()(model).modified  # nothing left to name
    names = [n.name for n in projection_nodes(model.graph)]
    assert "model.h.0.attn.c_attn" in names or "transformer.h.0.attn.c_attn" in names
    assert {n.op_type for n in projection_nodes(model.graph)} <= {"MatMul", "Gemm"}
    ir.save(model, tmp_path / "renamed.onnx")
    ids = np.array([[3, 7, 11, 19]], dtype=np.int64)
    np.testing.assert_array_equal(run_prefill(tmp_path / "renamed.onnx", art.model_facts, ids),
                                  run_prefill(art.file("model.onnx"), art.model_facts, ids))
