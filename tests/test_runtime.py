"""The runtime: the C-API session, the generation loop, the latency report and the CLIs, on tiny models."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from tiny_models import TINY_CONFIGS

import runtime
from export.models import load_model, resolve
from runtime import ort_capi
from runtime.baselines import plain_greedy, plain_session
from runtime.errors import ArtifactError, BadInputError
from runtime.generate import GenerationConfig, generate
from runtime.session import SessionClosedError, SessionOptions

PROMPT = [5, 9, 13, 17, 21, 25, 29]
GREEDY_64 = GenerationConfig(max_new_tokens=64, stop_token_ids=())


def transformers_greedy(folder, prompt, new_tokens):
    model = load_model(resolve(str(folder)))
    model.generation_config.eos_token_id = None  # compare full-length runs; stop tokens are tested apart
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def llama(export_factory):
    return export_factory("llama")


@pytest.fixture
def session(llama):
    with runtime.open(llama, SessionOptions(threads=2)) as s:
        yield s


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_greedy_equals_transformers_generate_for_64_tokens(arch, export_factory, tiny_model_factory):
    art = export_factory(arch)
    with runtime.open(art) as session:
        ours = generate(session, PROMPT, GREEDY_64).tokens[0]
    assert ours == transformers_greedy(tiny_model_factory(arch), PROMPT, 64)


def test_logits_match_onnxruntime_python_api(session, llama):
    reference = plain_greedy(plain_session(llama.file("model.onnx")), llama.model_facts, np.array([PROMPT]), 12)
    logits = session.prefill(np.array([PROMPT]))
    assert logits.shape == (1, len(PROMPT), 128)
    for step, expected in enumerate(reference.last_logits):
        if step:
            logits = session.decode([reference.tokens[step - 1]])
        assert np.abs(logits[0, -1] - expected).max() < 1e-5


def test_seed_makes_sampling_repeatable(session):
    config = GenerationConfig(max_new_tokens=24, temperature=1.5, top_p=0.95, seed=7, stop_token_ids=())
    first = generate(session, PROMPT, config).tokens
    assert generate(session, PROMPT, config).tokens == first
    others = {tuple(generate(session, PROMPT, GenerationConfig(max_new_tokens=24, temperature=1.5, seed=s,
                                                                stop_token_ids=())).tokens[0]) for s in range(4)}
    assert len(others) > 1, "different seeds should give different samples"


def test_top_k_one_and_tiny_top_p_are_greedy(session):
    greedy = generate(session, PROMPT, GenerationConfig(max_new_tokens=16, stop_token_ids=())).tokens
    for config in (GenerationConfig(max_new_tokens=16, temperature=1.0, top_k=1, seed=1, stop_token_ids=()),
                   GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=1e-9, seed=1, stop_token_ids=())):
        assert generate(session, PROMPT, config).tokens == greedy


def test_batch_with_left_padding_matches_single_prompts(session):
    prompts = [PROMPT, [40, 41, 42], [90, 3, 77, 64, 12]]
    config = GenerationConfig(max_new_tokens=20, stop_token_ids=())
    singles = [generate(session, p, config).tokens[0] for p in prompts]
    batched = generate(session, prompts, config)
    assert batched.tokens == singles
    assert batched.report.batch == 3 and batched.report.prompt_tokens == len(PROMPT)


def test_stop_tokens_end_a_sequence_and_the_callback_streams_in_order(session):
    free = generate(session, PROMPT, GenerationConfig(max_new_tokens=30, stop_token_ids=())).tokens[0]
    stop_at = free[5]
    first_index = free.index(stop_at)
    streamed = []
    result = generate(session, PROMPT, GenerationConfig(max_new_tokens=30, stop_token_ids=(stop_at,)),
                      on_token=lambda row, token: streamed.append((row, token)))
    assert result.tokens[0] == free[: first_index + 1]
    assert result.finish_reasons == ["stop"]
    assert streamed == [(0, t) for t in result.tokens[0]]
    assert generate(session, PROMPT, GenerationConfig(max_new_tokens=3, stop_token_ids=())).finish_reasons == ["length"]


def test_latency_report_counts_and_serializes(session, llama):
    report = generate(session, PROMPT, GenerationConfig(max_new_tokens=20, stop_token_ids=())).report
    assert report.generated_tokens == 20 and len(report.step_ms) == 19
    assert report.prompt_tokens == len(PROMPT) and report.engine_id == llama.id and report.backend == "ort"
    tpot = report.tpot_ms
    assert 0 < tpot["p50"] <= tpot["p90"] <= tpot["p99"] and report.ttft_ms > 0
    data = json.loads(report.to_json())
    assert data["tokens_per_second"] == pytest.approx(20 / (report.total_ms / 1000))
    assert "TTFT" in report.one_line()


def test_reset_starts_a_fresh_cache(session):
    first = generate(session, PROMPT, GenerationConfig(max_new_tokens=8, stop_token_ids=())).tokens
    session.prefill([1, 2, 3])
    session.decode([4])
    assert session.cache_length == 4
    session.reset()
    assert session.cache_length == 0
    assert generate(session, PROMPT, GenerationConfig(max_new_tokens=8, stop_token_ids=())).tokens == first


# -- bad input ---------------------------------------------------------------------------------------------


def test_bad_tokens_prompts_and_lengths_are_clear_errors(session):
    with pytest.raises(BadInputError, match="token id 128 is outside the vocabulary"):
        session.prefill([1, 128])
    with pytest.raises(BadInputError, match="token id -1"):
        session.prefill([-1, 3])
    with pytest.raises(BadInputError, match="empty prompt"):
        session.prefill([])
    with pytest.raises(BadInputError, match="empty prompt"):
        generate(session, [[1, 2], []])
    with pytest.raises(BadInputError, match="exceed the model's context of 256"):
        session.prefill(np.ones(257, dtype=np.int64))
    with pytest.raises(BadInputError, match="exceed the model's context"):
        generate(session, [1] * 200, GenerationConfig(max_new_tokens=100))
    with pytest.raises(BadInputError, match="decode called before prefill"):
        session.decode([1])


def test_a_closed_session_refuses_work(llama):
    session = runtime.open(llama)
    session.close()
    session.close()  # closing twice is harmless
    with pytest.raises(SessionClosedError, match="session is closed"):
        session.prefill([1, 2])


def test_tampered_artifact_names_the_file(llama, tmp_path):
    copy = shutil.copytree(llama.path, tmp_path / "copy")
    with open(copy / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    with pytest.raises(ArtifactError, match="model.onnx does not match its sha256"):
        runtime.open(copy)
    with pytest.raises(ArtifactError, match="does not exist"):
        runtime.open(tmp_path / "missing")


def test_a_library_that_is_not_onnxruntime_or_too_old(monkeypatch):
    libc = ort_capi.ctypes.util.find_library("c")
    with pytest.raises(ort_capi.OrtLibraryError, match="is not ONNX Runtime"):
        ort_capi.OrtApi(libc)
    with pytest.raises(ort_capi.OrtLibraryError, match="cannot load ONNX Runtime library"):
        ort_capi.OrtApi("/no/such/libonnxruntime.so")
    monkeypatch.setattr(ort_capi, "ORT_API_VERSION", 10_000)
    with pytest.raises(ort_capi.OrtLibraryError, match="too old"):
        ort_capi.OrtApi(ort_capi.find_library())


def test_execution_provider_comes_from_the_session_options(llama):
    with pytest.raises(BadInputError, match="unknown execution provider 'tpu'"):
        runtime.open(llama, SessionOptions(provider="tpu"))
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the GPU tests cover it")
    with pytest.raises(ort_capi.OrtError, match="(?i)cuda"):
        runtime.open(llama, SessionOptions(provider="cuda"))


def test_ort_status_becomes_an_exception_with_the_message(llama):
    api = ort_capi.load_api()
    with pytest.raises(ort_capi.OrtError, match="NO_SUCHFILE|No such file|does not exist|Load model"):
        api.out("CreateSession", ort_capi_env(api), b"/no/such/model.onnx", api.out("CreateSessionOptions"))


def ort_capi_env(api):
    from runtime.ort_session import shared_env

    return shared_env(api)


def test_generate_cli_streams_text_and_reports_latency(llama):
    result = run_cli("runtime.generate", str(llama.path), "the quick brown fox", "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert "TTFT" in result.stderr.strip().splitlines()[-1]


def test_generate_cli_errors_exit_2(llama, export_factory, tmp_path):
    result = run_cli("runtime.generate", str(tmp_path / "missing"), "hello")
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("runtime.generate", str(export_factory("llama", tokenizer=False).path), "hello")
    assert result.returncode == 2 and "no tokenizer.json" in result.stderr
    result = run_cli("runtime.generate", str(llama.path), "hello", env={ort_capi.LIBRARY_ENV: "/no/lib.so"})
    assert result.returncode == 2 and "cannot load ONNX Runtime library" in result.stderr


def test_bench_cli_measures_baseline_ratio_and_rss(llama, export_factory, tmp_path):
    out = tmp_path / "bench.json"
    other = export_factory("gpt2")
    result = run_cli("runtime.bench", str(llama.path), "--prompt-len", "16", "--gen-len", "32", "--runs", "2",
                     "--threads", "1", "--baselines", "--rss-tokens", "2000", "--json", str(out),
                     "--compare", str(other.path), "--no-huge-pages")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["huge_pages"] is False
    compared = f"export-{other.id} (fp32)"
    assert set(report["runners"]) == {"lmforge", "onnxruntime-python", "pytorch-eager", compared}
    assert report["ratios"][compared]["tpot"] > 0
    assert report["runners"]["lmforge"]["runs"] == 2
    ratio = report["ratios"]["onnxruntime-python"]["tpot"]
    runners = report["runners"]
    expected = runners["lmforge"]["tpot_ms"]["p50"] / runners["onnxruntime-python"]["tpot_ms"]["p50"]
    assert ratio == pytest.approx(expected)
    assert report["rss"]["tokens"] >= 2000 and report["rss"]["growth_percent"] < 5
    assert "onnxruntime-python" in result.stdout and "ours÷it TPOT" in result.stdout
    assert run_cli("runtime.bench", str(tmp_path / "none")).returncode == 2


def test_bench_measures_onnxruntime_genai_on_the_same_weights(llama, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    cache = {"LMFORGE_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "bench.json"
    result = run_cli("runtime.bench", str(llama.path), "--prompt-len", "8", "--gen-len", "6", "--runs", "1",
                     "--threads", "1", "--genai", "fp32,int8", "--json", str(out), env=cache)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    for name in ("onnxruntime-genai fp32", "onnxruntime-genai int8"):
        assert len(report["steps"][name]) == 5  # exactly gen-len tokens, as ours: the first, then 5 steps
        assert report["ratios"][name]["tpot"] > 0 and report["ratios"][name]["ttft"] > 0
    assert len(list((tmp_path / "cache" / "genai").iterdir())) == 2  # built once per precision, cached
    bad = run_cli("runtime.bench", str(llama.path), "--genai", "int3", env=cache)
    assert bad.returncode == 2 and "onnxruntime-genai precision 'int3' unknown" in bad.stderr
    # Its accuracy on the held-out windows (that fp32 genai equals the fp32 export is checked on the default
    # model, in test_default_model: on this random tiny model its builder's graph differs from ours).
    evaluated = run_cli("export.genai_baseline", str(llama.path), "--precision", "fp32", "--evaluate", env=cache)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "top-1 agreement" in evaluated.stderr and "on 16 held-out windows" in evaluated.stderr


def test_runtime_needs_only_its_light_dependencies(llama):
    """A service process that embeds runtime/ never loads torch, transformers or the export stages."""
    code = ("import sys\nimport runtime, runtime.generate\n"
            f"s = runtime.open({str(llama.path)!r})\n"
            "print(runtime.generate.generate(s, [1, 2, 3]).tokens)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'export', 'onnx') if m in sys.modules))")
    import subprocess

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def _smaps_kb(address: int, field: str = "AnonHugePages:") -> int:
    """A field (KiB) of the mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                start, end = (int(a, 16) for a in fields[0].split("-"))
                inside = start <= address < end
            elif inside and fields[0] == field:
                return int(fields[1])
    return 0


def _fresh_memory(size: int):
    """`size` bytes of a new private anonymous mapping, written (as glibc's malloc maps ONNX Runtime's large
    allocations; numpy asks for huge pages itself), and the address of its middle."""
    import ctypes
    import mmap

    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.write(b"\1" * size)
    return memory, ctypes.addressof(ctypes.c_char.from_buffer(memory)) + size // 2


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
def test_committed_zeros_are_resident_at_once_where_untouched_memory_is_not():
    import ctypes
    import mmap

    import numpy as np

    from runtime.hugepages import committed_zeros

    size = 64 << 20
    committed = committed_zeros((size // 4,), np.float32)
    untouched = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # what np.zeros maps, fresh
    assert not committed.any() and committed.shape == (size // 4,)
    assert _smaps_kb(committed.__array_interface__["data"][0] + size // 2, "Rss:") >= size // 1024
    untouched_middle = ctypes.addressof(ctypes.c_char.from_buffer(untouched)) + size // 2
    assert _smaps_kb(untouched_middle, "Rss:") < size // 1024 // 2


THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not THP_MODE.exists() or "[always]" in THP_MODE.read_text() or "[never]" in THP_MODE.read_text(),
                    reason="needs Linux with transparent huge pages on request (madvise mode)")
def test_memory_allocated_inside_the_block_lands_on_huge_pages():
    from runtime.hugepages import huge_pages_for_new_memory

    with huge_pages_for_new_memory():
        weights, weights_middle = _fresh_memory(48 << 20)
    with huge_pages_for_new_memory(enabled=False):
        plain, plain_middle = _fresh_memory(48 << 20)
    assert _smaps_kb(weights_middle) >= 2048
    assert _smaps_kb(plain_middle) == 0


@pytest.mark.parametrize("huge_pages", [True, False])
def test_session_loads_its_weights_under_the_huge_page_block_unless_told_not_to(llama, monkeypatch, huge_pages):
    import contextlib

    from runtime import ort_session

    seen = []
    monkeypatch.setattr(ort_session, "huge_pages_for_new_memory",
                        lambda enabled: seen.append(enabled) or contextlib.nullcontext())
    with runtime.open(llama, SessionOptions(threads=1, huge_pages=huge_pages)) as session:
        assert session.prefill(np.array([PROMPT])).shape[-1] == 128
    assert seen == [huge_pages]
