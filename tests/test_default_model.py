"""The real default model (SmolLM2-135M-Instruct from PyPI) through the export stage. Slow: run by CI."""

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_export(tmp_path_factory):
    from export.build import BuildConfig, build

    return build(BuildConfig(out=tmp_path_factory.mktemp("store")))[-1].artifact


def test_default_model_is_cached_as_float32_safetensors():
    from export.models import SMOLLM2, cache_dir, ensure_default_model

    folder = ensure_default_model()
    assert folder.parent == cache_dir() / "models" and SMOLLM2.wheel_sha256[:12] in folder.name
    assert (folder / "model.safetensors").stat().st_size > 500e6  # 135M float32 parameters
    assert (folder / "tokenizer.json").is_file()


def test_default_model_exports_and_passes_parity(default_export):
    facts = default_export.model_facts
    assert (facts["model_type"], facts["layers"], facts["kv_heads"], facts["head_dim"]) == ("llama", 30, 3, 64)
    assert facts["vocab_size"] == 49152 and facts["eos_token_ids"] and facts["chat_template"]
    parity = default_export.metrics["parity"]
    assert parity["passed"] and parity["greedy_tokens_identical"] and parity["greedy_tokens"] == 32
    assert parity["max_abs_logits_diff"] < 1e-3
    assert {"model.onnx", "tokenizer.json"} <= set(default_export.manifest["files"])


def test_default_model_speaks_english(default_export):
    """The de-quantized GGUF weights are the real model: it completes a fact, through the exported graph."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from export.onnx_export import kv_names

    facts = default_export.model_facts
    tokenizer = Tokenizer.from_file(str(default_export.file("tokenizer.json")))
    ids = np.array([tokenizer.encode("The capital of France is").ids], dtype=np.int64)
    session = ort.InferenceSession(str(default_export.file("model.onnx")), providers=["CPUExecutionProvider"])
    past = [np.zeros((1, facts["kv_heads"], 0, facts["head_dim"]), np.float32)] * (2 * facts["layers"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None]} | dict(zip(kv_names(facts["layers"]), past))
    logits = session.run(["logits"], feeds)[0]
    assert tokenizer.decode([int(logits[0, -1].argmax())]).strip() == "Paris"
