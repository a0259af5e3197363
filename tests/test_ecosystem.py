"""What other tools open an lmforge artifact with: onnxruntime-genai's generator (genai_config.json), Hugging Face
folder conventions (config.json, generation_config.json), the model card, and the report's plots."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from runtime import artifact as artifacts
from runtime.model_folder import GENAI_CONFIG, PER_LAYER_KEY, genai_folder, pruned_hf_config

GREEDY_TOKENS = 16


def lmforge_greedy(art: artifacts.Artifact, prompt: list[int], steps: int) -> list[int]:
    import runtime
    from runtime.generate import GenerationConfig, generate
    from runtime.session import SessionOptions

    with runtime.open(art, SessionOptions(threads=1)) as session:
        result = generate(session, [prompt], GenerationConfig(max_new_tokens=steps, stop_token_ids=()))
    return result.tokens[0]


def genai_greedy(folder: Path, prompt: list[int], steps: int, overlay: dict | None = None) -> list[int]:
    """onnxruntime-genai's own generator on the folder, exactly `steps` greedy tokens (no stop on EOS)."""
    og = pytest.importorskip("onnxruntime_genai")
    config = og.Config(str(folder))
    if overlay:
        config.overlay(json.dumps(overlay))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    length = len(prompt) + steps
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def prompt_of(art: artifacts.Artifact) -> list[int]:
    from runtime.text import load_codec

    return load_codec(art).encode("the quick brown fox jumps over the lazy dog")


def rebuild(base: artifacts.Artifact, **changes) -> artifacts.Artifact:
    """Another engine from the tiny model in the same store (the export is reused): `changes` replace fields
    of the build config (engine, pruning)."""
    from export.build import BuildConfig, build

    export = next(a for a in [base, *_parents(base)] if a.stage == "export")
    config = BuildConfig(model=export.manifest["config"]["model"], out=base.path.parent, bench_runs=0, **changes)
    return next(r.artifact for r in build(config) if r.stage == "engine")


def _parents(art: artifacts.Artifact) -> list[artifacts.Artifact]:
    from runtime.model_folder import ancestors

    return ancestors(art)


# -- onnxruntime-genai ---------------------------------------------------------------------------------------

def test_fused_engine_runs_in_onnxruntime_genai_with_a_shared_buffer_and_lmforges_tokens(chat_export):
    config = json.loads((chat_export.path / GENAI_CONFIG).read_text())
    decoder = config["model"]["decoder"]
    assert decoder["inputs"]["position_ids"] == "position_ids"  # the graph declares it: genai must feed it
    assert decoder["num_hidden_layers"] == chat_export.model_facts["layers"]
    assert config["search"]["past_present_share_buffer"] is True  # GroupQueryAttention writes the past in place
    prompt = prompt_of(chat_export)
    assert genai_greedy(chat_export.path, prompt, GREEDY_TOKENS) == lmforge_greedy(chat_export, prompt, GREEDY_TOKENS)


def test_unfused_engine_keeps_past_and_present_apart_in_genai(chat_export):
    from engines.ort import EngineConfig

    unfused = rebuild(chat_export, engine=EngineConfig(fuse_attention=False, threads=1))
    config = json.loads((unfused.path / GENAI_CONFIG).read_text())
    assert config["search"]["past_present_share_buffer"] is False
    prompt = prompt_of(unfused)
    expected = lmforge_greedy(unfused, prompt, GREEDY_TOKENS)
    assert genai_greedy(unfused.path, prompt, GREEDY_TOKENS) == expected
    # Why the switch depends on the attention: the exported attention concatenates past and new keys, so over a
    # max-length shared buffer it cannot give the same tokens.
    try:
        shared = genai_greedy(unfused.path, prompt, GREEDY_TOKENS, {"search": {"past_present_share_buffer": True}})
    except Exception:  # noqa: BLE001 - genai refusing the shapes is the other way for it to go wrong
        shared = None
    assert shared != expected


def test_engine_built_before_genai_config_opens_through_a_written_config(chat_export, tmp_path):
    """`bench --genai` on an older artifact: a temporary folder of links and a config from its manifest."""
    old = tmp_path / chat_export.path.name
    shutil.copytree(chat_export.path, old)
    (old / GENAI_CONFIG).unlink()
    manifest = json.loads((old / artifacts.MANIFEST).read_text())
    del manifest["files"][GENAI_CONFIG]
    (old / artifacts.MANIFEST).write_text(json.dumps(manifest))
    art = artifacts.load(old)
    folder, temporary = genai_folder(art)
    assert folder != old and temporary is not None
    prompt = prompt_of(art)
    assert genai_greedy(folder, prompt, GREEDY_TOKENS) == lmforge_greedy(art, prompt, GREEDY_TOKENS)
    temporary.cleanup()


def test_bench_drives_genai_on_the_same_engine(chat_export, tmp_path):
    result = run_cli("runtime.bench", str(chat_export.path), "--prompt-len", "8", "--gen-len", "4", "--runs", "1",
                     "--threads", "1", "--genai", "engine", "--json", str(tmp_path / "bench.json"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report["runners"]) == {"lmforge", "onnxruntime-genai on this engine"}
    assert report["runners"]["onnxruntime-genai on this engine"]["tpot_ms"]["p50"] > 0
    assert report["ratios"]["onnxruntime-genai on this engine"]["tpot"] > 0
    assert "onnxruntime-genai on this engine" in result.stdout


# -- Hugging Face folder files ---------------------------------------------------------------------------------

def test_export_and_engine_carry_the_source_models_config_files(chat_export, tiny_model_factory):
    source = tiny_model_factory("llama")
    export = next(a for a in _parents(chat_export) if a.stage == "export")
    for art in (export, chat_export):
        config = json.loads((art.path / "config.json").read_text())
        expected = json.loads((source / "config.json").read_text())
        assert {k: config.get(k) for k in expected if k != "transformers_version"} == \
            {k: v for k, v in expected.items() if k != "transformers_version"}
        generation = json.loads((art.path / "generation_config.json").read_text())
        assert generation["eos_token_id"] == json.loads((source / "generation_config.json").read_text())["eos_token_id"]
        assert {"config.json", "generation_config.json"} <= set(art.manifest["files"])


def test_pruned_engine_says_what_pruning_changed_and_still_runs_in_genai(chat_export):
    from export.prune import PruneConfig

    # The prune stage's default data: the engine's verification judges the prune's recorded perplexity on the
    # same held-out windows (engines/verify.py).
    pruning = PruneConfig(ratios=(("mlp", 0.5), ("heads", 0.5)), threads=1, repair=False)
    pruned = rebuild(chat_export, pruning=pruning)
    facts = pruned.model_facts
    config = json.loads((pruned.path / "config.json").read_text())
    kv = facts["layer_kv_heads"] or [facts["kv_heads"]] * facts["layers"]
    assert config["num_key_value_heads"] == max(kv) < 2 and config["num_attention_heads"] == 2 * max(kv)
    assert config["head_dim"] == facts["head_dim"] == 16  # no longer hidden_size / num_attention_heads
    assert config["intermediate_size"] == 64 and config["num_hidden_layers"] == facts["layers"]
    genai = json.loads((pruned.path / GENAI_CONFIG).read_text())["model"]["decoder"]
    assert genai["num_key_value_heads"] == max(kv)
    prompt = prompt_of(pruned)
    assert genai_greedy(pruned.path, prompt, GREEDY_TOKENS) == lmforge_greedy(pruned, prompt, GREEDY_TOKENS)


def test_pruned_config_keeps_layers_that_differ_per_layer():
    source = {"num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64,
              "intermediate_size": 128, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
    facts = {"layers": 2, "kv_heads": 2, "attention_heads": 4, "head_dim": 16, "layer_kv_heads": [1, 2]}
    config = pruned_hf_config(source, facts, mlp_widths=[64, 128], dropped_layers=(1,))
    assert config["num_hidden_layers"] == 2 and config["layer_types"] == ["sliding_attention", "sliding_attention"]
    assert config["num_key_value_heads"] == 2 and config["num_attention_heads"] == 4 and config["head_dim"] == 16
    assert config["intermediate_size"] == 128
    assert config[PER_LAYER_KEY] == {"num_key_value_heads": [1, 2], "num_attention_heads": [2, 4],
                                     "intermediate_size": [64, 128]}
    unpruned = pruned_hf_config(source, {"layers": 3, "kv_heads": 2, "attention_heads": 4, "head_dim": 16},
                                mlp_widths=[128, 128, 128])
    assert unpruned == source
    gpt2 = pruned_hf_config({"n_layer": 2, "n_head": 4, "n_embd": 64, "n_inner": None},
                            {"layers": 2, "kv_heads": 4, "attention_heads": 4, "head_dim": 16}, mlp_widths=[128, 128])
    assert gpt2["n_inner"] == 128 and "intermediate_size" not in gpt2


# -- the model card ------------------------------------------------------------------------------------------

def test_engine_model_card_names_source_pipeline_accuracy_and_how_to_run_it(chat_export):
    card = (chat_export.path / "README.md").read_text()
    assert "README.md" in chat_export.manifest["files"]
    export = next(a for a in _parents(chat_export) if a.stage == "export")
    assert f"`{export.manifest['config']['model']}`" in card
    for art in [chat_export, *_parents(chat_export)]:
        assert f"`{art.path.name}`" in card
    from runtime.accuracy import records_of

    (check,) = records_of(chat_export.metrics)
    assert f"- engine: {check.text()}" in card and f"top-1 {check.top1_agreement:.3f}" in card
    assert f"- export (`{export.path.name}`): vs pytorch on parity prompt: top-1 1.000" in card
    name = chat_export.path.name
    for command in (f"python -m runtime.generate {name}", f'og.Model("{name}")', f"python -m runtime.serve {name}",
                    f"python -m runtime.bench {name}"):
        assert command in card
    latency = chat_export.metrics["latency"]
    assert latency["generated_tokens"] == 32 and 0 < latency["tpot_ms"]["p50"] < latency["ttft_ms"] * 100
    assert f"time per output token p50 {latency['tpot_ms']['p50']:.2f} ms" in card


# -- the report's plots ----------------------------------------------------------------------------------------

def test_report_has_its_plots_linked(chat_export, tmp_path):
    """matplotlib is a default dependency: every build report carries its PNGs, linked from report.md."""
    from export import report
    from export.build import BuildConfig, build

    export = next(a for a in _parents(chat_export) if a.stage == "export")
    results = build(BuildConfig(model=export.manifest["config"]["model"], out=chat_export.path.parent, bench_runs=0))
    engines = [r.artifact for r in results if r.stage == "engine"]
    latency = report.measure_latency(engines, prompt_len=8, gen_len=4, runs=1, threads=1)
    written = report.write(tmp_path, results, "tiny", latency, wall_seconds=1.0)
    markdown = (tmp_path / report.REPORT_MD).read_text()
    names = ["latency_per_token.png", "tpot_and_size.png", "perplexity_vs_tpot.png"]
    assert [Path(p).name for p in written["plots"]] == names
    for name in names:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in markdown


# -- the default model (slow) -------------------------------------------------------------------------------

@pytest.mark.slow
def test_default_int8_engine_gives_lmforges_tokens_in_onnxruntime_genai(default_int8_engine):
    engine = default_int8_engine
    assert json.loads((engine.path / GENAI_CONFIG).read_text())["search"]["past_present_share_buffer"] is True
    prompt = prompt_of(engine)
    assert genai_greedy(engine.path, prompt, 32) == lmforge_greedy(engine, prompt, 32)
