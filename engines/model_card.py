"""The engine's model card (`README.md` in the artifact): where the model came from, the stages that made the
engine and their settings, its accuracy against fp32, and how to run it with lmforge, onnxruntime-genai and
the server. Written from the manifests alone, so it says nothing the artifacts do not record."""

from __future__ import annotations

from typing import Any

from runtime import artifact as artifacts
from runtime.accuracy import AccuracyRecord, records_of
from runtime.model_folder import GENAI_CONFIG, GENERATION_CONFIG, HF_CONFIG, lineage

CARD = "README.md"
# Stage settings that repeat what the card says elsewhere, or that only matter to lmforge's own cache.
UNSHOWN_SETTINGS = ("external_data_threshold_bytes",)


def settings_text(config: dict[str, Any], prefix: str = "") -> list[str]:
    """A stage's config as `key=value` items (nested tables as `table.key`), skipping unset values."""
    items = []
    for key, value in sorted(config.items()):
        if key in UNSHOWN_SETTINGS or value in (None, "", [], (), {}):
            continue
        if isinstance(value, dict):
            items += settings_text(value, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={value}")
    return items


def source_line(chain: list[artifacts.Artifact]) -> str:
    """The source model as the export recorded it (spec and family, size), or why it is unknown."""
    export = next((a for a in reversed(chain) if a.stage == "export"), None)
    if export is None:
        return "Source model: not recorded (the export artifact is not beside this engine)."
    facts = export.model_facts
    parameters = export.metrics.get("parameters")
    size = f", {parameters / 1e6:.1f}M parameters" if parameters else ""
    return (f"Source model: `{export.manifest.get('config', {}).get('model', '?')}` ({facts.get('model_type')}, "
            f"{facts.get('layers')} layers, hidden size {facts.get('hidden_size')}, vocabulary "
            f"{facts.get('vocab_size')}{size}), exported as `{export.path.name}`.")


def pipeline_rows(chain: list[artifacts.Artifact], engine_id: str, engine_config: dict[str, Any],
                  metrics: dict[str, Any]) -> list[str]:
    rows = ["| stage | artifact | precision | settings |", "|---|---|---|---|"]
    for art in reversed(chain):
        rows.append(f"| {art.stage} | `{art.path.name}` | {art.manifest.get('precision', '-')} | "
                    f"{', '.join(settings_text(art.manifest.get('config', {}))) or '-'} |")
    fusion = metrics.get("fusion", {})
    built = f"; attention: {fusion.get('attention')}, {fusion.get('ops_before')} -> {fusion.get('ops_after')} ops"
    rows.append(f"| engine | `engine-{engine_id}` | {chain[0].manifest.get('precision', 'fp32')} | "
                f"{', '.join(settings_text(engine_config))}{built if fusion else ''} |")
    return rows


def accuracy_lines(chain: list[artifacts.Artifact], records: list[AccuracyRecord]) -> list[str]:
    if not records:
        return ["Not verified at build time (the engine was built without a verification step)."]
    lines = ["Measured by the engine stage on held-out text through lmforge's runtime, against the float32 "
             "graph it was built from, and by each stage before it at its own gate:", ""]
    for art in reversed(chain):  # from the export on, as the pipeline table goes
        lines += [f"- {art.stage} (`{art.path.name}`): {record.text()}" for record in records_of(art.metrics)]
    lines += [f"- engine: {record.text()}" for record in records]
    calibrated = next((a for a in chain if a.stage == "calibrate"), None)
    if calibrated and calibrated.metrics.get("kept_in_float"):
        lines.append(f"- layers kept in float by calibration: {', '.join(calibrated.metrics['kept_in_float'])}")
    if calibrated and calibrated.metrics.get("eight_bit") is not None:
        lines.append(f"- mixed precision: {len(calibrated.metrics['eight_bit'])} linear layers 8-bit, "
                     f"{calibrated.metrics['four_bit']} 4-bit (the plan: the calibrate artifact's metrics.eight_bit)")
    pruned = next((a for a in chain if a.stage == "prune"), None)
    if pruned:
        lines.append(f"- structured pruning removed {pruned.metrics['parameters_removed_percent']:.1f}% of the "
                     "linear layers' parameters (before this measurement)")
    return lines


def latency_lines(name: str, latency: dict[str, Any] | None) -> list[str]:
    bench = ["On your machine, beside onnxruntime-genai on this same graph:", "",
             f"    python -m runtime.bench {name} --prompt-len 128 --gen-len 128 --genai engine"]
    if not latency:
        return ["Not measured at build time; the build's `report.md` has every engine's figures.", "", *bench]
    tpot = latency.get("tpot_ms") or {}
    return [f"Measured by the engine stage on the machine that built it ({latency.get('threads')} threads, batch 1, "
            f"a {latency.get('prompt_tokens')}-token prompt, {latency.get('generated_tokens')} tokens, one run "
            f"after a warm-up): time to first token {latency['ttft_ms']:.1f} ms, time per output token p50 "
            f"{tpot.get('p50', float('nan')):.2f} ms, {latency.get('tokens_per_second', float('nan')):.1f} "
            "tokens/s. The build's `report.md` has more runs, alternated with the other engines.", "", *bench]


def usage_lines(name: str, has_genai: bool) -> list[str]:
    lines = ["### lmforge's runtime (numpy, tokenizers and ONNX Runtime; no torch)", "",
             f'    python -m runtime.generate {name} "What is the capital of France?"', "",
             "```python", "import runtime, runtime.generate",
             f'with runtime.open("{name}") as session:',
             "    result = runtime.generate.generate(session, [token_ids], "
             "runtime.generate.GenerationConfig(max_new_tokens=64))", "```", ""]
    if has_genai:
        lines += ["### onnxruntime-genai", "",
                  f"`{GENAI_CONFIG}` describes the decoder, so genai's own generator opens this folder as it is "
                  "(`pip install onnxruntime-genai`):", "",
                  "```python", "import onnxruntime_genai as og",
                  f'model = og.Model("{name}")', "tokenizer = og.Tokenizer(model)",
                  "params = og.GeneratorParams(model)", "params.set_search_options(max_length=64)",
                  "generator = og.Generator(model, params)",
                  'generator.append_tokens(tokenizer.encode("The capital of France is"))',
                  "while not generator.is_done():", "    generator.generate_next_token()",
                  "print(tokenizer.decode(generator.get_sequence(0)))", "```", "",
                  "The engine's optional inputs (`logits_to_keep`, `cache_lengths`) keep their defaults there: "
                  "every position's logits, every row as long as the mask.", ""]
    lines += ["### The OpenAI-compatible server", "",
              f"    pip install 'lmforge[serve]' && python -m runtime.serve {name} --port 8000",
              "    curl localhost:8000/v1/completions -H 'Content-Type: application/json' "
              "-d '{\"prompt\": \"The capital of France is\", \"max_tokens\": 16}'"]
    return lines


def files_lines(files: list[str]) -> list[str]:
    described = {
        artifacts.MODEL_FILE: "the engine: ONNX with the KV cache (inputs `input_ids`, `attention_mask`, "
                              "`position_ids`, `past_key_values.N.key/value`; outputs `logits`, `present.N.key/value`)",
        GENAI_CONFIG: "onnxruntime-genai's description of the decoder and its search defaults",
        HF_CONFIG: "the source model's Hugging Face config, with the facts pruning changed updated",
        GENERATION_CONFIG: "the source model's generation defaults",
        "tokenizer.json": "the tokenizer", "tokenizer_config.json": "the tokenizer's settings",
        "chat_template.jinja": "the chat template",
        "manifest.json": "lmforge's manifest: every file's sha256, the inputs and outputs, model facts, versions, "
                         "provenance (the source of truth)",
    }
    return [f"- `{name}`: {described[name]}" for name in [*files, "manifest.json"] if name in described]


def model_card(parent: artifacts.Artifact, engine_id: str, engine_config: dict[str, Any], metrics: dict[str, Any],
               files: list[str], latency: dict[str, Any] | None = None) -> str:
    """README.md for the engine made from `parent` (files: those in the engine folder besides the card)."""
    chain = lineage(parent)
    name = f"engine-{engine_id}"
    precision = parent.manifest.get("precision", "fp32")
    export = next((a for a in reversed(chain) if a.stage == "export"), None)
    model = export.manifest.get("config", {}).get("model", "?") if export else "?"
    lines = ["---", "library_name: onnxruntime", "pipeline_tag: text-generation",
             f"tags: [onnx, lmforge, {precision}]", "---", "",
             f"# {model}: {precision} ONNX Runtime engine", "",
             f"Built by lmforge (`python -m export.build`) as artifact `{name}`. " + source_line(chain), "",
             "## Pipeline", "", *pipeline_rows(chain, engine_id, engine_config, metrics), "",
             "## Accuracy against fp32", "", *accuracy_lines(chain, records_of(metrics)), "",
             "## Latency", "", *latency_lines(name, latency), "",
             "## How to run it", "", *usage_lines(name, GENAI_CONFIG in files), "",
             "## Files", "", *files_lines(files)]
    return "\n".join(lines) + "\n"
