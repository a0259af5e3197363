"""The real default model (SmolLM2-135M-Instruct from PyPI) through the export stage. Slow: run by CI."""

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_default_model_is_cached_as_float32_safetensors():
    from export.models import SMOLLM2, cache_dir, ensure_default_model

    folder = ensure_default_model()
    assert folder.parent == cache_dir() / "models" and SMOLLM2.parts[0][1][:12] in folder.name
    assert (folder / "model.safetensors").stat().st_size > 500e6  # 135M float32 parameters
    assert (folder / "tokenizer.json").is_file()


def test_default_model_exports_and_passes_parity(default_export):
    facts = default_export.model_facts
    assert (facts["model_type"], facts["layers"], facts["kv_heads"], facts["head_dim"]) == ("llama", 30, 3, 64)
    assert facts["vocab_size"] == 49152 and facts["eos_token_ids"] and facts["chat_template"]
    (parity,) = default_export.metrics["accuracy"]
    assert parity["passed"] and parity["top1_agreement"] == 1.0 and parity["logits_diff"] < 1e-3
    assert default_export.metrics["parity"]["greedy_tokens"] == 32
    assert {"model.onnx", "tokenizer.json"} <= set(default_export.manifest["files"])


def test_default_model_speaks_english(default_export):
    """The de-quantized GGUF weights are the real model: it completes a fact, through the exported graph."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from runtime.contract import prefill_feeds

    facts = default_export.model_facts
    tokenizer = Tokenizer.from_file(str(default_export.file("tokenizer.json")))
    ids = np.array([tokenizer.encode("The capital of France is").ids], dtype=np.int64)
    session = ort.InferenceSession(str(default_export.file("model.onnx")), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], prefill_feeds(ids, facts))[0]
    assert tokenizer.decode([int(logits[0, -1].argmax())]).strip() == "Paris"


def test_runtime_greedy_equals_transformers_generate_for_64_tokens(default_export):
    import torch
    from transformers import AutoTokenizer

    import runtime
    from export.models import ensure_default_model, load_model, resolve
    from runtime.generate import GenerationConfig, generate
    from runtime.text import load_codec

    codec = load_codec(default_export)
    prompt = codec.encode(codec.render_chat([{"role": "user", "content": "Write a short story about a robot."}]))
    with runtime.open(default_export) as session:
        ours = generate(session, prompt, GenerationConfig(max_new_tokens=64, stop_token_ids=())).tokens[0]

    folder = ensure_default_model()
    model = load_model(resolve(str(folder)))
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    with torch.no_grad():
        theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                                pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs
    # The chat template rendered by jinja2 here is the one transformers renders.
    hf = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "Write a short story about a robot."}]
    assert codec.render_chat(messages) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_runtime_logits_match_onnxruntime_python_on_the_default_model(default_export):
    import runtime
    from runtime.baselines import plain_greedy, plain_session

    prompt = np.arange(1000, 1040)[None]
    reference = plain_greedy(plain_session(default_export.file("model.onnx")), default_export.model_facts, prompt, 6)
    with runtime.open(default_export) as session:
        logits = session.prefill(prompt)
        for step, expected in enumerate(reference.last_logits):
            if step:
                logits = session.decode([reference.tokens[step - 1]])
            assert np.abs(logits[0, -1] - expected).max() < 1e-5


def test_generate_cli_streams_an_answer(default_export):
    from conftest import run_cli

    result = run_cli("runtime.generate", str(default_export.path), "What is the capital of France?",
                     "--max-new-tokens", "24")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "TTFT" in result.stderr.strip().splitlines()[-1]


def test_onnxruntime_genai_fp32_is_evaluated_equal_to_our_fp32_export(default_export):
    """The peer baseline's accuracy figures are comparable to ours: its fp32 model, on the windows every engine
    is verified on, scores what our fp32 export scores."""
    from conftest import run_cli

    pytest.importorskip("onnxruntime_genai")
    result = run_cli("export.genai_baseline", str(default_export.path), "--precision", "fp32", "--evaluate",
                     timeout=900)
    assert result.returncode == 0, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    increase = float(line.split("(")[1].split("%")[0])
    agreement = float(line.split("top-1 agreement ")[1].split()[0])
    assert abs(increase) < 0.05 and agreement > 0.99, line


def test_int8_build_end_to_end_meets_the_gates_in_its_report(default_export):
    """`python -m export.build --precision int8` on CPU: export (reused) -> calibration -> fused ONNX Runtime
    engine -> verification -> latency, judged from the report it writes."""
    import json

    from conftest import DEFAULT_INT8_FLAGS, run_cli

    store = default_export.path.parent
    result = run_cli("export.build", *DEFAULT_INT8_FLAGS, "--out", str(store), "--bench-runs", "1", "--bench-gen", "16",
                     timeout=1200)
    assert result.returncode == 0, result.stderr
    report = json.loads((store / "report.json").read_text())
    stages = [s["stage"] for s in report["stages"]]
    assert stages == ["export", "calibrate", "engine"] and report["stages"][0]["reused"]
    (engine,) = report["engines"]
    assert engine["precision"] == "int8" and engine["fusion"] == "fused"
    (accuracy,) = engine["accuracy"]
    assert accuracy["perplexity_increase_percent"] <= 3.0 + 0.5  # the gate, plus the engine's slack
    assert accuracy["top1_agreement"] > 0.85 and accuracy["domain"] == "held-out"
    assert len(engine["kept_in_float"]) <= 21  # at most 10% of the 210 linear layers
    assert engine["latency"]["tpot_ms"]["p50"] > 0 and engine["latency"]["ttft_ms"] > 0
    calibrated = json.loads(next(store.glob("calibrate-*/manifest.json")).read_text())["metrics"]
    # q/k/v and gate/up of 30 layers; not the down_proj, which stay weight-only like the LM head.
    assert calibrated["accuracy"][0]["passed"] and calibrated["smoothquant_layers"] == 150
    assert len(calibrated["weight_only_int8"]) == 31
    # The weight-only layers: int8 weights, float inputs.
    import onnx

    graph = onnx.load(str(next(store.glob("calibrate-*/model.onnx"))), load_external_data=False).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    for node in graph.node:
        if node.name in calibrated["weight_only_int8"]:
            assert producers.get(node.input[1]) == "DequantizeLinear"
            assert producers.get(node.input[0]) != "DequantizeLinear"


def test_continuous_batching_on_the_default_model_equals_each_request_alone(default_export):
    """Requests of different lengths, admitted while others decode and prefilled in chunks, give the tokens
    each gives alone, on the fused fp32 engine of the default build."""
    import runtime
    from export.build import BuildConfig, build
    from runtime.generate import GenerationConfig, generate
    from runtime.service import Service, ServiceConfig
    from runtime.session import SessionOptions
    from runtime.text import load_codec

    results = build(BuildConfig(out=default_export.path.parent, bench_runs=0))
    engine = next(r.artifact for r in results if r.stage == "engine")
    codec = load_codec(engine)
    questions = ["What is the capital of France?", "Name three prime numbers.", "Why is the sky blue?",
                 "Write a haiku about autumn leaves falling on a quiet river.", "Hi", "Explain photosynthesis."]
    prompts = [codec.encode(codec.render_chat([{"role": "user", "content": q}])) for q in questions]
    config = GenerationConfig(max_new_tokens=24, stop_token_ids=())
    with runtime.open(engine, SessionOptions(threads=2)) as reference:
        alone = [generate(reference, [p], config).tokens[0] for p in prompts]
    service = Service(runtime.open(engine, SessionOptions(threads=2)),
                      ServiceConfig(max_batch=4, max_context=256, prefill_chunk=16, prefix_cache_mb=16))
    try:
        assert service.scheduler == "continuous"
        jobs = [service.submit(p, config) for p in prompts]
        batched = [[e.value.id for e in job if e.kind == "token"] for job in jobs]
    finally:
        service.close()
    assert batched == alone
    assert sum(job.cached_tokens for job in jobs) > 0  # the chat template's opening is shared
