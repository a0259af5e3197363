"""The export stage: a PyTorch causal LM → one ONNX graph with a KV cache (the ONNX contract in ARCHITECTURE.md),
checked against PyTorch before it becomes an artifact."""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.graph.linear import projection_nodes
from export.graph.naming import MLP_OUTPUTS, NameLinearLayersPass, split_layer_name
from runtime.accuracy import AccuracyRecord, as_metrics
from runtime.artifact import MODEL_FILE, Artifact, ArtifactWriter
from runtime.baselines import plain_greedy, plain_session
from runtime.contract import kv_names
from runtime.errors import AccuracyError
from runtime.model_folder import GENERATION_CONFIG, HF_CONFIG, pruned_hf_config, write_json
from runtime.ranges import check_ranges, ranged

STAGE = "export"
PARITY_DOMAIN = "parity prompt"  # the accuracy record's domain: PARITY_PROMPT and the greedy tokens after it
PARITY_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village,"


@dataclass(frozen=True)
class ExportConfig:
    # Opset 18 keeps attention as primitive ops with Concat KV: ONNX Runtime and every TensorRT 10.x/11.x
    # parse it, while opset >= 23 may fuse SDPA into an `Attention` node whose KV inputs TensorRT rejects.
    opset: int = 18
    # Max |logits_onnx - logits_torch| allowed over the prefill and decode steps; fp32 export noise is ~1e-4.
    parity_atol: float = ranged(1e-3, "parity_atol", low=0)
    # Decode steps whose logits are compared after the prefill.
    parity_decode_steps: int = ranged(8, "parity_decode_steps", low=0)
    # Greedy tokens that must be identical between ONNX Runtime and PyTorch.
    parity_greedy_tokens: int = ranged(32, "parity_greedy_tokens", low=1)
    # Protobuf cannot hold more than 2 GiB, so larger weights go to an external data file beside the model.
    external_data_threshold_bytes: int = ranged(2 * 1024**3, "external_data_threshold_bytes", low=0)

    def __post_init__(self):
        check_ranges(self)


def _kv_cache_wrapper(model):
    """A module with flat tensor inputs/outputs around the HF model, so the graph gets the Optimum names."""
    import torch
    from transformers import DynamicCache

    class KVCacheWrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, past):
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
            cache = DynamicCache(ddp_cache_data=pairs, config=self.inner.config)
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return KVCacheWrapper(model).eval()


def cache_geometry(model) -> tuple[int, list[int], int]:
    """(layers, KV heads of each layer, head size), read from the cache a one-token forward pass actually
    produces (a pruned model's layers may keep different numbers of KV heads)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True)
    layers = out.past_key_values.layers
    return len(layers), [int(layer.keys.shape[1]) for layer in layers], int(layers[0].keys.shape[3])


@contextlib.contextmanager
def quiet_exporter():
    """The exporter's warnings (missing torchvision ops, deprecations inside torch) say nothing to our users."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch._export", "torch.export")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def export_onnx(model, destination: Path, config: ExportConfig) -> list[str]:
    """torch.onnx.export(dynamo=True) with dynamic batch, sequence and past lengths (past 0 allowed).
    Returns the names of the linear layers in graph order."""
    import torch
    from torch.export import Dim

    layers, kv_heads, head_dim = cache_geometry(model)
    # Example sizes are distinct and > 1 so the tracer keeps every axis symbolic.
    batch, seq, past = 2, 3, 4
    input_ids = torch.randint(0, min(model.config.vocab_size, 100), (batch, seq))
    attention_mask = torch.ones(batch, past + seq, dtype=torch.long)
    position_ids = torch.arange(past, past + seq).expand(batch, seq)
    past_kv = tuple(torch.randn(batch, heads, past, head_dim) for heads in kv_heads for _ in ("key", "value"))

    b, s, p, t = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
    dynamic_shapes = {
        "input_ids": {0: b, 1: s},
        "attention_mask": {0: b, 1: t},
        "position_ids": {0: b, 1: s},
        "past": tuple({0: b, 2: p} for _ in range(2 * layers)),
    }
    with quiet_exporter():
        program = torch.onnx.export(
            _kv_cache_wrapper(model),
            (input_ids, attention_mask, position_ids, past_kv),
            dynamic_shapes=dynamic_shapes,
            input_names=["input_ids", "attention_mask", "position_ids", *kv_names(layers)],
            output_names=["logits", *kv_names(layers, "present")],
            opset_version=config.opset,
            dynamo=True,
            verbose=False,
        )
    NameLinearLayersPass()(program.model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    program.save(str(destination), external_data=weight_bytes > config.external_data_threshold_bytes)
    return [node.name for node in projection_nodes(program.model.graph)]


def describe_io(onnx_path: Path) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of the graph: name, element type and symbolic shape."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)

    def entry(value_info) -> dict[str, Any]:
        tensor = value_info.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
        return {"name": value_info.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                "shape": shape}

    return {"inputs": [entry(v) for v in model.graph.input], "outputs": [entry(v) for v in model.graph.output]}


def model_facts(model, tokenizer) -> dict[str, Any]:
    """What the runtime needs to drive the graph without transformers."""
    config = model.config.get_text_config()
    layers, kv_heads, head_dim = cache_geometry(model)
    configured_kv = getattr(config, "num_key_value_heads", None) or max(kv_heads)  # pruning keeps the config's
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None) or config.eos_token_id
    bos = getattr(generation, "bos_token_id", None) or config.bos_token_id
    return {
        "model_type": config.model_type,
        "layers": layers,
        "kv_heads": configured_kv,
        "layer_kv_heads": kv_heads if any(h != configured_kv for h in kv_heads) else None,
        "head_dim": head_dim,
        "attention_heads": config.num_attention_heads,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "bos_token_id": bos,
        "eos_token_ids": eos if isinstance(eos, list) else ([eos] if eos is not None else []),
        "max_context": context_limit(config),
        "sliding_window": sliding_window(config),
        "rope": rotary_facts(model),
        "attention_scale": attention_scale(model),
        "tokenizer": tokenizer is not None,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }


# Rotary embeddings whose tables depend only on the position: an engine may precompute them (issue: fusion).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rotary_facts(model) -> dict[str, Any] | None:
    """The rotary embedding's inverse frequencies and scaling (`tables`), so engines can build the cos/sin tables
    without torch; None when the model has no rotary embedding or its tables change with the sequence length. A
    model whose layer types rotate differently (Gemma 3: local and global layers) has a table per type and
    `layer_tables`: per layer, the index of its table."""
    for module in model.modules():
        if getattr(module, "inv_freq", None) is not None and hasattr(module, "attention_scaling"):
            table = _rotary_table(module.inv_freq, module.attention_scaling, getattr(module, "rope_type", "default"))
            return table and {"tables": [table], "layer_tables": None}
        by_type = getattr(module, "rope_type", None)
        if isinstance(by_type, dict) and by_type and hasattr(module, "layer_types"):
            return _per_layer_type_rotary(module, model.config.get_text_config())
    return None


def _rotary_table(inv_freq, scaling, rope_type: str) -> dict[str, Any] | None:
    if rope_type not in STATIC_ROPE_TYPES:
        return None
    return {"inv_freq": inv_freq.float().tolist(), "attention_scaling": float(scaling), "rope_type": rope_type}


def _per_layer_type_rotary(module, config) -> dict[str, Any] | None:
    """A rotary module holding `<type>_inv_freq` per layer type (transformers' Gemma 3)."""
    kinds = sorted(module.rope_type)
    tables = [_rotary_table(getattr(module, f"{kind}_inv_freq"), getattr(module, f"{kind}_attention_scaling"),
                            module.rope_type[kind]) for kind in kinds]
    layer_types = getattr(config, "layer_types", None)
    if None in tables or not layer_types or any(kind not in kinds for kind in layer_types):
        return None
    return {"tables": tables, "layer_tables": [kinds.index(kind) for kind in layer_types]}


def attention_scale(model) -> float | None:
    """The factor attention scores are multiplied by (1/sqrt(head_dim) in most families; Gemma 3's comes from
    query_pre_attn_scalar), read from the first attention module that records it."""
    for module in model.modules():
        if hasattr(module, "q_proj") and isinstance(getattr(module, "scaling", None), float):
            return module.scaling
    return None


def context_limit(config) -> int | None:
    """The longest sequence the exported graph is valid for. With sliding-window layers that is the window:
    the exporter traces the window mask for sequences that fit it (past it ONNX Runtime fails in a GatherND)."""
    context = getattr(config, "max_position_embeddings", None)
    window = sliding_window(config)
    return min(context, window) if window and context else context


def sliding_window(config) -> int | None:
    """The attention window when it is shorter than the context (Mistral-style local attention)."""
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    context = getattr(config, "max_position_embeddings", None)
    return window if window and (context is None or window < context) else None


def parity_prompt_ids(tokenizer, vocab_size: int) -> np.ndarray:
    if tokenizer is not None:
        ids = tokenizer(PARITY_PROMPT)["input_ids"]
    else:
        ids = [(7 * i + 3) % vocab_size for i in range(16)]
    return np.asarray([ids], dtype=np.int64)


def torch_greedy(model, prompt: np.ndarray, steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and per-step last-position logits from PyTorch with its own KV cache."""
    import torch

    tokens, logits = [], []
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(prompt), use_cache=True)
        for _ in range(steps):
            last = out.logits[0, -1].numpy()
            logits.append(last)
            tokens.append(int(last.argmax()))
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, logits


def check_parity(model, onnx_path: Path, facts: dict, tokenizer, config: ExportConfig
                 ) -> tuple[AccuracyRecord, dict[str, Any]]:
    """ONNX Runtime against PyTorch: max |logits diff| over prefill + decode steps, and greedy tokens. Returns
    the gate's record (top-1 agreement: the share of greedy tokens that are PyTorch's) and the run's details."""
    prompt = parity_prompt_ids(tokenizer, facts["vocab_size"])
    ort_run = plain_greedy(plain_session(onnx_path), facts, prompt, config.parity_greedy_tokens)
    ort_tokens, ort_logits = ort_run.tokens, ort_run.last_logits
    ref_tokens, ref_logits = torch_greedy(model, prompt, config.parity_greedy_tokens)
    compared = config.parity_decode_steps + 1  # the prefill, then the decode steps
    max_diff = max(float(np.abs(a - b).max()) for a, b in zip(ort_logits[:compared], ref_logits[:compared]))
    same = sum(1 for a, b in zip(ort_tokens, ref_tokens) if a == b)
    first_mismatch = next((i for i, (a, b) in enumerate(zip(ort_tokens, ref_tokens)) if a != b), None)
    record = AccuracyRecord(STAGE, "pytorch", passed=max_diff <= config.parity_atol and first_mismatch is None,
                            top1_agreement=same / len(ref_tokens), logits_diff=max_diff,
                            logits_limit=config.parity_atol, domain=PARITY_DOMAIN)
    return record, {"steps_compared": compared, "greedy_tokens": len(ref_tokens),
                    "greedy_first_mismatch": first_mismatch}


def run(model, tokenizer, writer: ArtifactWriter, config: ExportConfig, extra_metrics: dict | None = None,
        extra_records: tuple[AccuracyRecord, ...] = ()) -> Artifact:
    """Export into the writer's folder, check parity, and commit the artifact (or fail with exit code 3).
    A stage that exports a model of its own (distill) adds its metrics and its gate's records."""
    started = time.perf_counter()
    onnx_path = writer.dir / MODEL_FILE
    linear_layers = export_onnx(model, onnx_path, config)
    export_seconds = time.perf_counter() - started
    _check_model(onnx_path)
    facts = model_facts(model, tokenizer) | {"linear_layers": linear_layers}
    if tokenizer is not None:
        tokenizer.save_pretrained(writer.dir)
    write_hf_files(model, facts, writer.dir)
    record, parity = check_parity(model, onnx_path, facts, tokenizer, config)
    if not record.passed:
        raise AccuracyError(
            f"exported ONNX disagrees with PyTorch: max |logits diff| {record.logits_diff:.2e} "
            f"(limit {config.parity_atol:.0e}), first differing greedy token at step "
            f"{parity['greedy_first_mismatch']}; report this model and your torch/transformers versions")
    metrics = {
        "accuracy": as_metrics([record, *extra_records]),
        "parity": parity,
        "export_seconds": round(export_seconds, 2),
        "stage_seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    } | (extra_metrics or {})
    io = describe_io(onnx_path) | {"model": facts}
    return writer.commit(io=io, metrics=metrics, precision="fp32")


def mlp_widths(model) -> list[int] | None:
    """Each decoder layer's MLP width, read from its modules; None where no layer's MLP is recognised. The
    width is the input width of the projection the MLP ends with, which a pruned-then-distilled model may no
    longer share with its config."""
    widths = {}
    for name, module in model.named_modules():
        parts = split_layer_name(name)
        width = getattr(module, "in_features", None) or getattr(module, "nx", None)  # nn.Linear, GPT-2's Conv1D
        if parts is not None and parts[2] in MLP_OUTPUTS and width:
            widths[parts[0]] = int(width)
    return [widths[i] for i in sorted(widths)] or None


def write_hf_files(model, facts: dict, folder: Path) -> None:
    """config.json and generation_config.json as `save_pretrained` writes them, with the graph's facts (a model
    pruned in PyTorch before distillation keeps its unpruned config): Hugging Face tooling reads them."""
    config = json.loads(model.config.to_json_string(use_diff=True))
    write_json(folder / HF_CONFIG, pruned_hf_config(config, facts, mlp_widths(model)))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        write_json(folder / GENERATION_CONFIG, json.loads(generation.to_json_string(use_diff=True)))


def _check_model(onnx_path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(onnx_path))


def stage_config(config: ExportConfig) -> dict[str, Any]:
    return asdict(config)
