"""What other tools read from an artifact folder, beside lmforge's own manifest (which stays the source of truth):

- `config.json` and `generation_config.json`, the Hugging Face model-folder convention (Optimum's ONNX classes,
  transformers.js and model cards read model facts from them): the source model's own files, with the facts
  that structured pruning changed (layers, attention and KV heads, MLP width) rewritten.
- `genai_config.json`, what onnxruntime-genai's generator needs to drive an engine: the decoder's inputs and
  outputs (the ONNX contract's names, `position_ids` included: the graph declares it, so it must be fed), the
  search defaults of the model's generation config, and the session options the engine was built for.

Only json and the manifest: the runtime (`bench --genai`) writes a genai config for engines built before these
files existed, and the engine stage writes all three into every ONNX Runtime engine.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from runtime import artifact as artifacts

HF_CONFIG, GENERATION_CONFIG, GENAI_CONFIG = "config.json", "generation_config.json", "genai_config.json"
MODEL_FILE = artifacts.MODEL_FILE

# Hugging Face config keys by meaning: families spell them differently (GPT-2: n_layer, n_head, n_inner).
LAYER_KEYS = ("num_hidden_layers", "n_layer")
HEAD_KEYS = ("num_attention_heads", "n_head")
KV_HEAD_KEYS = ("num_key_value_heads",)
MLP_KEYS = ("intermediate_size", "n_inner")
# A pruned model whose layers differ (KV groups, MLP channels) cannot be said in one number per fact; the
# largest goes in the standard key and the per-layer values here, so nothing is silently wrong.
PER_LAYER_KEY = "lmforge_per_layer"

# model_type -> onnxruntime-genai's model type. genai dispatches on the type (an unknown one is refused);
# lmforge's graphs are plain decoders with the contract's I/O, so families genai has no name for run as
# its generic "decoder". Gemma 3's text model is "gemma3_text" there ("gemma3" is its vision-language model).
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2",
               "phi3": "phi3", "gemma3": "gemma3_text", "gemma3_text": "gemma3_text"}
GENAI_GENERIC_TYPE = "decoder"
# Search options genai reads from genai_config.json and transformers' generation config shares (same meaning).
SHARED_SEARCH_OPTIONS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "num_beams",
                         "min_length", "length_penalty", "no_repeat_ngram_size")
# transformers' GenerationConfig defaults, which genai needs spelled out (its own defaults differ for none of
# these, but a generation config that omits a key means transformers' value).
GENERATION_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
                       "num_beams": 1, "min_length": 0}


# -- the artifact's provenance ------------------------------------------------------------------------------

def ancestors(art: artifacts.Artifact) -> list[artifacts.Artifact]:
    """The artifact's parents, nearest first, as far as they are in its store (artifacts travel alone too)."""
    chain, current = [], art
    while current.manifest.get("parent"):
        found = sorted(current.path.parent.glob(f"*-{current.manifest['parent']}"))
        found = [path for path in found if (path / artifacts.MANIFEST).is_file()]
        if not found:
            break
        current = artifacts.load(found[0], verify=False)
        chain.append(current)
    return chain


def lineage(parent: artifacts.Artifact) -> list[artifacts.Artifact]:
    """The parent and its ancestors, nearest first."""
    return [parent, *ancestors(parent)]


# -- Hugging Face config.json / generation_config.json -------------------------------------------------------

def pruned_hf_config(config: dict[str, Any], facts: dict[str, Any], mlp_widths: list[int] | None = None,
                     dropped_layers: tuple[int, ...] = ()) -> dict[str, Any]:
    """The source model's config.json with the facts of the graph: layer count and per-layer heads from the
    manifest's model facts, MLP widths as given (per kept layer). Keys the source config does not have stay
    absent; an unpruned model's config comes back unchanged."""
    new = json.loads(json.dumps(config))
    target = new["text_config"] if isinstance(new.get("text_config"), dict) else new  # vision-language configs
    per_layer: dict[str, list[int]] = {}
    layers = facts["layers"]
    if _first(target, LAYER_KEYS) != layers:
        _set(target, LAYER_KEYS, layers)
        if isinstance(target.get("layer_types"), list) and len(target["layer_types"]) != layers:
            kept = [t for i, t in enumerate(target["layer_types"]) if i not in set(dropped_layers)]
            target["layer_types"] = kept if len(kept) == layers else target["layer_types"][:layers]
    _update_heads(target, facts, per_layer)
    if mlp_widths and set(mlp_widths) != {_mlp_width(target)}:
        _set(target, MLP_KEYS, max(mlp_widths))
        if len(set(mlp_widths)) > 1:
            per_layer["intermediate_size"] = list(mlp_widths)
    if per_layer:
        target[PER_LAYER_KEY] = per_layer
    return new


def _update_heads(config: dict[str, Any], facts: dict[str, Any], per_layer: dict[str, list[int]]) -> None:
    """KV groups removed by pruning take their query heads with them; head size stays, so it is written out
    (transformers would otherwise derive it as hidden_size / num_attention_heads)."""
    kv = facts.get("layer_kv_heads") or [facts["kv_heads"]] * facts["layers"]
    queries_per_group = facts["attention_heads"] // facts["kv_heads"]
    heads = [k * queries_per_group for k in kv]
    if max(kv) == facts["kv_heads"] and len(set(kv)) == 1:
        return
    if any(key in config for key in KV_HEAD_KEYS):
        _set(config, KV_HEAD_KEYS, max(kv))
    _set(config, HEAD_KEYS, max(heads))
    config.setdefault("head_dim", facts["head_dim"])
    if len(set(kv)) > 1:
        per_layer["num_key_value_heads"], per_layer["num_attention_heads"] = kv, heads


def _first(config: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((config[k] for k in keys if k in config), None)


def _set(config: dict[str, Any], keys: tuple[str, ...], value: int) -> None:
    """Set the key this family uses (the first of `keys` present), else the first spelling."""
    config[next((k for k in keys if k in config), keys[0])] = value


def _mlp_width(config: dict[str, Any]) -> int | None:
    """The configured MLP width; GPT-2 leaves n_inner null, meaning four times the hidden size."""
    width = _first(config, MLP_KEYS)
    if width is None and "n_embd" in config:
        return 4 * config["n_embd"]
    return width


def mlp_widths_after_plan(plan: dict[str, Any], layers: int, width: int) -> list[int]:
    """MLP widths of the layers a prune plan (the prune manifest's `plan`) keeps, from the unpruned width."""
    dropped = set(plan.get("dropped_layers", []))
    channels = plan.get("mlp_channels", {})
    return [len(channels[str(i)]) if str(i) in channels else width for i in range(layers) if i not in dropped]


def write_hf_files(parent: artifacts.Artifact, folder: Path) -> list[str]:
    """Write config.json and generation_config.json for a graph derived from `parent`: the nearest ancestor
    that has them (an export), with any prune plan made after it applied. Returns the names written (none
    where the export predates these files)."""
    plan, source = None, None
    for art in lineage(parent):
        if HF_CONFIG in art.manifest.get("files", {}):
            source = art
            break
        plan = plan or art.metrics.get("plan")
    if source is None:
        return []
    config = json.loads(source.file(HF_CONFIG).read_text())
    widths, dropped = None, ()
    if plan:
        base = config["text_config"] if isinstance(config.get("text_config"), dict) else config
        widths = mlp_widths_after_plan(plan, source.model_facts["layers"], _mlp_width(base))
        dropped = tuple(plan.get("dropped_layers", []))
    write_json(folder / HF_CONFIG, pruned_hf_config(config, parent.model_facts, widths, dropped))
    written = [HF_CONFIG]
    if GENERATION_CONFIG in source.manifest["files"]:
        (folder / GENERATION_CONFIG).write_bytes(source.file(GENERATION_CONFIG).read_bytes())
        written.append(GENERATION_CONFIG)
    return written


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# -- onnxruntime-genai's genai_config.json ------------------------------------------------------------------

def shares_cache(metrics: dict[str, Any]) -> bool:
    """Whether past and present may be one buffer: GroupQueryAttention (the fused engine) writes new positions
    into the past buffer in place and reads each row only up to its length. The exported attention concatenates
    past and new keys, which over a max-length buffer would attend to its unused tail."""
    return metrics.get("fusion", {}).get("attention") == "fused"


def search_defaults(generation: dict[str, Any] | None, facts: dict[str, Any], share_buffer: bool) -> dict[str, Any]:
    """genai's search options from the model's generation config (transformers' defaults where it is silent).
    max_length: the generation config's if it sets one, else the context (as genai's own builder does)."""
    generation = generation or {}
    search = {key: generation.get(key, GENERATION_DEFAULTS.get(key)) for key in SHARED_SEARCH_OPTIONS}
    search = {key: value for key, value in search.items() if value is not None}
    context = facts.get("max_context") or 2048
    search["max_length"] = min(int(generation.get("max_length") or context), context)
    # genai shares the buffer only without beam search; saying so keeps the file honest about what runs.
    search["past_present_share_buffer"] = bool(share_buffer and search.get("num_beams", 1) == 1)
    return search


def genai_config(manifest: dict[str, Any], generation: dict[str, Any] | None = None, threads: int | None = None
                 ) -> dict[str, Any]:
    """genai_config.json for an artifact with the ONNX contract's I/O (its manifest), as a dict."""
    facts, metrics = manifest["io"]["model"], manifest.get("metrics", {})
    kv = facts.get("layer_kv_heads") or [facts["kv_heads"]]
    inputs = {entry["name"] for entry in manifest["io"]["inputs"]}
    decoder_inputs = {name: name for name in ("input_ids", "attention_mask", "position_ids") if name in inputs}
    decoder_inputs |= {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    session_options: dict[str, Any] = {"log_id": "lmforge", "provider_options": _provider_options(metrics)}
    threads = threads or metrics.get("session", {}).get("threads")
    if threads:  # the engine was verified and measured with these; a service may overlay others
        session_options |= {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
    generation = generation or {}
    eos = generation.get("eos_token_id", facts.get("eos_token_ids") or [])
    eos = [int(t) for t in (eos if isinstance(eos, list) else [eos])]
    pad = generation.get("pad_token_id")
    fallback = eos[0] if eos else 0  # a model without a declared end token still needs some id here
    model = {
        "type": GENAI_TYPES.get(facts.get("model_type"), GENAI_GENERIC_TYPE),
        "bos_token_id": int(facts["bos_token_id"] if facts.get("bos_token_id") is not None else fallback),
        "eos_token_id": eos,
        "pad_token_id": int(pad if pad is not None else fallback),  # genai pads batches with it
        "context_length": int(facts.get("max_context") or 2048),
        "vocab_size": int(facts["vocab_size"]),
        "decoder": {
            "filename": MODEL_FILE,
            "session_options": session_options,
            "head_size": int(facts["head_dim"]),
            "hidden_size": int(facts["hidden_size"]),
            # After pruning removed KV groups, every layer's count where they agree; where they differ, the
            # largest (genai sizes each layer's cache from the graph's inputs, whose head axis is a number).
            "num_attention_heads": int(max(kv) * facts["attention_heads"] // facts["kv_heads"]),
            "num_key_value_heads": int(max(kv)),
            "num_hidden_layers": int(facts["layers"]),
            "inputs": decoder_inputs,
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"},
        },
    }
    return {"model": model, "search": search_defaults(generation, facts, shares_cache(metrics))}


def _provider_options(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """genai's provider list: empty is its CPU provider; a CUDA-optimized engine asks for CUDA."""
    return [{"cuda": {}}] if metrics.get("session", {}).get("provider") == "cuda" else []


def write_genai_config(folder: Path, manifest: dict[str, Any]) -> str:
    """genai_config.json into an engine's folder, from its manifest and the generation config beside it."""
    generation_file = folder / GENERATION_CONFIG
    generation = json.loads(generation_file.read_text()) if generation_file.is_file() else None
    write_json(folder / GENAI_CONFIG, genai_config(manifest, generation))
    return GENAI_CONFIG


def genai_folder(art: artifacts.Artifact) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """A folder onnxruntime-genai can open for this artifact: its own where it carries genai_config.json,
    else (an artifact built before the file existed) a temporary one of links to its files and a config
    written from its manifest. Returns the folder and the temporary directory to clean up (or None)."""
    if GENAI_CONFIG in art.manifest.get("files", {}):
        return art.path, None
    temporary = tempfile.TemporaryDirectory(prefix="lmforge-genai-")
    folder = Path(temporary.name)
    for name in art.manifest.get("files", {}):
        if "/" not in name:
            os.symlink(art.path.resolve() / name, folder / name)
    write_genai_config(folder, art.manifest)
    return folder, temporary
