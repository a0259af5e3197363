"""The ONNX Runtime engine: the parent graph (fp32, pruned or Q/DQ) rewritten the way ONNX Runtime runs it
fastest, with the ONNX contract's inputs and outputs kept so the runtime drives every engine the same way.

1. `FuseAttentionPass` (ours, export/graph/attention.py): attention -> GroupQueryAttention + RotaryEmbedding.
2. ONNX Runtime's transformer optimizer: RMSNorm / residual-add fusions (SkipSimplifiedLayerNormalization),
   and for the families whose attention stays as exported, GELU, LayerNorm and reshape fusions.
3. ONNX Runtime's offline graph optimization for the target provider (Q/DQ -> MatMulIntegerToFloat,
   MatMulNBits, constant folding), saved into the artifact so a session starts without redoing it.

Why step 2 is ONNX Runtime's (legacy) optimizer and not onnxscript's rewrite rules, measured by
`python -m engines.fusion_figures` (`ci/figures-fusion.sh` reruns it; its output is the figures, in the
README's "Fusion" section): on the default model, onnxscript's normalization and GELU rules give the same
engine (the same ops after step 3, the same weights and logits), hence the same decode speed, and build
faster; on the tiny models of every family they match op for op except gpt2, gpt_neox and phi3, where they
leave shape arithmetic (Concat, Reshape) that ONNX Runtime's reshape fusion folds. Never fewer ops, sometimes
more: the optimizer stays. onnxscript's own attention rules (`optimize_for_ort`: rotary, SDPA, GQA) do not
reach GroupQueryAttention on our exports: where we fuse attention they leave several times the ops, decode no
faster (far slower at int8) and, on the int8 graph, change the logits; so step 1 stays ours. (On the families
we do not fuse they make MultiHeadAttention with fewer ops, but fail on gpt2 and were not measured for
accuracy or speed there.)
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from engines.model_card import CARD, model_card
from export.graph.attention import AttentionFacts, FuseAttentionPass
from export.graph.linear import add_initializer
from runtime.accuracy import as_metrics
from runtime.artifact import MODEL_FILE, Artifact, ArtifactWriter
from runtime.errors import EXIT_BACKEND_UNAVAILABLE, BadInputError, LmforgeError
from runtime.model_folder import write_genai_config, write_hf_files
from runtime.ort_session import PROVIDERS as RUNTIME_PROVIDERS
from runtime.progress import Ticker
from runtime.ranges import check_ranges, ranged
from runtime.session import LOGITS_TO_KEEP

STAGE = "engine"
HEAD_NAMES = ("lm_head", "embed_out")  # the LM head as the export's naming pass calls it (NeoX: embed_out)
# The runtime's providers (the one list, runtime/ort_session.py) by ONNX Runtime's name for each, which it
# spells `<NAME>ExecutionProvider` (CPUExecutionProvider, CUDAExecutionProvider).
PROVIDERS = {name: f"{name.upper()}ExecutionProvider" for name in RUNTIME_PROVIDERS}


@dataclass(frozen=True)
class EngineConfig:
    # Execution provider the graph is optimized for; ONNX Runtime's offline fusions are provider-specific.
    provider: str = "cpu"
    # Intra-op threads the engine is verified and measured with (recorded; a service may choose others).
    threads: int = ranged(2, "--threads", low=1)
    # Replace each layer's exported attention with GroupQueryAttention where the model family allows it.
    fuse_attention: bool = True

    def __post_init__(self):
        check_ranges(self)
        if self.provider not in PROVIDERS:
            raise BadInputError(f"--provider {self.provider!r} is unknown; choose one of: {', '.join(PROVIDERS)}")


def stage_config(config: EngineConfig) -> dict[str, Any]:
    return {"backend": "ort"} | asdict(config)


def check_provider(provider: str) -> None:
    """Whether this onnxruntime has the (known: EngineConfig checked it) provider: exit 4 when it has not."""
    import onnxruntime

    if PROVIDERS[provider] not in onnxruntime.get_available_providers():
        raise LmforgeError(f"this onnxruntime has no {PROVIDERS[provider]}; install onnxruntime-gpu for "
                           "--provider cuda, or use --provider cpu", exit_code=EXIT_BACKEND_UNAVAILABLE)


def build_graph(parent: Artifact, destination: Path, config: EngineConfig, work: Path) -> dict[str, Any]:
    """Write the optimized graph to `destination`; returns what was fused and the op counts."""
    check_provider(config.provider)
    model = ir.load(parent.file(MODEL_FILE))
    before = op_counts(model)
    facts, reason = AttentionFacts.from_model_facts(parent.model_facts)
    if not config.fuse_attention:
        facts, reason = None, "disabled (--no-fuse-attention)"
    if facts is not None and not FuseAttentionPass(facts)(model).modified:
        reason = "no q/k/v/o projections named in the graph"
    last_logits = add_logits_to_keep(model)
    normed = fuse_norms(model, work)
    del model
    optimize_offline(normed, destination, config)
    after = op_counts(ir.load(destination))
    return {"attention": reason, "logits_to_keep": last_logits, "ops_before": sum(before.values()),
            "ops_after": sum(after.values()), "op_types_after": dict(after.most_common())}


def add_logits_to_keep(model: ir.Model) -> bool:
    """An optional input `logits_to_keep` (int64 [1], default 0: every position; n: the last n), applied to
    the LM head's input. A prefill for generation needs the last position only, and the head is the largest
    MatMul: over a 128-token prompt it is most of the time to first token. An input with a default value (an
    initializer of the same name) keeps the contract: whoever does not feed it gets every position."""
    head = next((node for node in model.graph if node.name in HEAD_NAMES), None)
    if head is None:
        return False
    keep = add_initializer(model.graph, LOGITS_TO_KEEP, np.zeros(1, np.int64))
    model.graph.inputs.append(keep)
    start = ir.node("Neg", [keep], name="logits_to_keep/start")
    end = add_initializer(model.graph, "logits_to_keep.end", np.array([np.iinfo(np.int64).max]))
    axis = add_initializer(model.graph, "logits_to_keep.axis", np.array([1], np.int64))
    kept = ir.node("Slice", [head.inputs[0], start.outputs[0], end, axis], name="logits_to_keep/slice")
    model.graph.insert_before(head, [start, kept])
    head.replace_input_with(0, kept.outputs[0])
    return True


def fuse_norms(model: ir.Model, work: Path) -> Path:
    """ONNX Runtime's transformer optimizer, only for what it recognises in our export: RMSNorm and the
    residual add before it. Its own attention fusions do not match a dynamo export; ours did that. Returns the
    path of the graph it wrote into `work`."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    source, destination = work / "fused.onnx", work / "normed.onnx"
    ir.save(model, source)
    # The generic ('bert') optimizer without the fusions that would change the graph's inputs (embedding)
    # or that we do ourselves (attention, rotary); the 'gpt2' one rewrites Gemm nodes it assumes have a bias.
    options = FusionOptions("bert")
    options.enable_attention = options.enable_rotary_embeddings = options.enable_embed_layer_norm = False
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    optimized = optimize_model(str(source), model_type="bert", num_heads=0, hidden_size=0, opt_level=0,
                               optimization_options=options, use_gpu=False)
    _keep_contract_inputs(onnx.load(str(source), load_external_data=False), optimized.model)
    optimized.save_model_to_file(str(destination), use_external_data_format=_needs_external_data(source))
    return destination


def _keep_contract_inputs(source: onnx.ModelProto, optimized: onnx.ModelProto) -> None:
    """The optimizer prunes graph inputs nothing reads (position_ids, once GroupQueryAttention derives the
    rotary positions itself); the contract keeps every input, so the runtime feeds every engine alike."""
    present = {value.name for value in optimized.graph.input}
    for index, value in enumerate(source.graph.input):
        if value.name not in present:
            optimized.graph.input.insert(index, value)


def optimize_offline(source: Path, destination: Path, config: EngineConfig) -> None:
    """Let ONNX Runtime apply its provider's graph optimizations once and save the result. Extended level:
    the layout-specific ones of the 'all' level are redone cheaply when a session loads the engine."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(destination)
    options.intra_op_num_threads = config.threads
    if _needs_external_data(source):
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         destination.name + ".data")
    onnxruntime.InferenceSession(str(source), options, providers=[PROVIDERS[config.provider]])


def _needs_external_data(path: Path) -> bool:
    """Protobuf cannot hold a model over 2 GiB in one file."""
    total = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + "*.data"))
    return total > 1.8 * 2**30


def op_counts(model: ir.Model | onnx.ModelProto) -> collections.Counter:
    nodes = model.graph if isinstance(model, ir.Model) else model.graph.node
    return collections.Counter(node.op_type for node in nodes)


def run(parent: Artifact, writer: ArtifactWriter, config: EngineConfig, verify=None, progress=print) -> Artifact:
    """Build the engine into the writer's folder, verify it (`verify(provisional_artifact) -> metrics`, which
    raises to fail the build) and commit it."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # not, per session, that logits_to_keep (an input) is no constant
    started = time.perf_counter()
    with writer.working_folder() as work:
        progress(f"[engine] fusing attention and norms, ONNX Runtime offline optimization ({config.provider})")
        with Ticker("[engine]"):
            graph = build_graph(parent, writer.dir / MODEL_FILE, config, work)
    writer.copy_text_files(parent)
    progress(f"[engine] {graph['ops_before']} -> {graph['ops_after']} ops; attention: {graph['attention']}")
    session = {"provider": config.provider, "threads": config.threads, "graph_optimization": "extended (saved)"}
    metrics = {"fusion": graph, "session": session, "build_seconds": round(time.perf_counter() - started, 1)}
    precision = parent.manifest.get("precision", "fp32")
    write_ecosystem_files(parent, writer, metrics)
    provisional = writer.provisional(parent.io, precision=precision, backend="ort")
    if verify is not None:
        metrics["accuracy"] = as_metrics(verify(provisional))
    metrics["latency"] = build_latency(provisional, config)
    files = sorted(p.name for p in writer.dir.iterdir() if p.is_file())
    (writer.dir / CARD).write_text(model_card(parent, writer.ident, writer.config, metrics, files,
                                              latency=metrics["latency"]))
    return writer.commit(io=parent.io, metrics=metrics, precision=precision, backend="ort")


# The engine stage's own latency run, for the model card: short, since the build's report measures every engine
# thoroughly afterwards (runs alternated with the others), and the card needs only a figure beside its accuracy.
CARD_PROMPT_TOKENS, CARD_NEW_TOKENS = 64, 32


def build_latency(engine: Artifact, config: EngineConfig) -> dict[str, Any]:
    """TTFT and time per output token of one greedy run through lmforge's runtime, after a warm-up run."""
    import runtime
    from runtime.generate import GenerationConfig, generate
    from runtime.session import SessionOptions

    facts = engine.model_facts
    length = min(CARD_PROMPT_TOKENS, (facts.get("max_context") or 2 * CARD_PROMPT_TOKENS) // 2)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, facts["vocab_size"], length)]
    generation = GenerationConfig(max_new_tokens=CARD_NEW_TOKENS, stop_token_ids=[])  # the full count, always
    with runtime.open(engine, SessionOptions(threads=config.threads, provider=config.provider)) as session:
        generate(session, prompt, generation)  # warm-up: first-run allocations are not the engine's speed
        report = generate(session, prompt, generation).report
    return {"ttft_ms": report.ttft_ms, "tpot_ms": report.tpot_ms, "tokens_per_second": report.tokens_per_second,
            "prompt_tokens": length, "generated_tokens": report.generated_tokens, "threads": config.threads}


def write_ecosystem_files(parent: Artifact, writer: ArtifactWriter, metrics: dict[str, Any]) -> None:
    """What other tools open the engine folder with: Hugging Face's config.json and generation_config.json
    (from the export, pruning applied) and onnxruntime-genai's genai_config.json (runtime/model_folder.py)."""
    write_hf_files(parent, writer.dir)
    write_genai_config(writer.dir, {"io": parent.io, "metrics": metrics})
