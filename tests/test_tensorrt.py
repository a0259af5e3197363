"""TensorRT without TensorRT: the names our code uses exist in the 10.x and 11.x bindings, profiles satisfy
TensorRT's rules for every size, the timing cache is keyed and falls back, and the session (over a fake
engine and a fake CUDA) checks shapes before any copy, switches profiles only on change and frees everything;
the real build and run are `gpu` tests."""

import ast
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli
from fake_tensorrt import FakeCudart, FakeEngine, FakeTensorRT

from engines import trt as trt_engine
from runtime.errors import BadInputError, LmforgeError

TRT_SOURCES = [REPO / "engines" / "trt.py", REPO / "runtime" / "trt_session.py"]
# Local names that hold TensorRT objects in those files: every attribute read on them is a TensorRT name.
TRT_OBJECTS = {"trt", "_trt", "builder", "network", "parser", "builder_config", "profile", "engine", "context",
               "runtime", "e", "Monitor", "cache"}
CUDA_OBJECTS = {"cudart", "_cudart"}
BINDINGS = {"tensorrt 10.16": ("tensorrt-cu12-bindings", "10.16.1.11"),
            "tensorrt 11.4": ("tensorrt-cu12-bindings", "11.4.0.106")}
CUDA_BINDINGS = {"cuda-bindings 12.9": ("cuda-bindings", "12.9.4"), "cuda-bindings 13.5": ("cuda-bindings", "13.5.0")}


def used_names(roots: set[str]) -> set[str]:
    """Attribute names read on the given roots (`trt.X.Y`, `self.engine.Z`, `context.W`)."""
    names = set()
    for source in TRT_SOURCES:
        for node in ast.walk(ast.parse(source.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute) and base.attr not in roots:
                chain.append(base.attr)
                base = base.value
            root = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", None)
            if root in roots:
                names.update(chain)
    return names


def wheel_strings(package: str, version: str, cache: Path) -> bytes:
    """Every module of a wheel (compiled and Python), as bytes: the bound names are strings inside them."""
    folder = cache / f"{package}-{version}"
    if not list(folder.glob("*.whl")):
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                 "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "-q", "-d",
                                 str(folder), f"{package}=={version}"], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot download {package}=={version} from PyPI: {result.stderr.strip()[-200:]}")
    with zipfile.ZipFile(next(folder.glob("*.whl"))) as wheel:
        return b"".join(wheel.read(n) for n in wheel.namelist() if n.endswith((".so", ".py", ".pyi")))


@pytest.fixture(scope="module")
def wheel_cache():
    from export.models import cache_dir

    return cache_dir() / "wheels"


@pytest.mark.parametrize("label", sorted(BINDINGS))
def test_every_tensorrt_name_we_use_exists_in_the_bindings(label, wheel_cache):
    blob = wheel_strings(*BINDINGS[label], wheel_cache)
    names = used_names(TRT_OBJECTS) - {"__init__", "__version__"}
    # The network and the plan come from Polygraphy's loaders; these are calls of ours on the builder config,
    # the engine and the context (the scan must find them, or it found nothing).
    assert {"set_timing_cache", "num_optimization_profiles", "execute_async_v3", "set_tensor_address",
            "set_optimization_profile_async", "get_tensor_profile_shape"} <= names
    missing = sorted(n for n in names if n.encode() not in blob)
    assert not missing, f"{label} has no {missing}"
    assert b"EXPLICIT_BATCH" not in blob or label.startswith("tensorrt 10")  # the check can fail: 11 removed it


@pytest.mark.parametrize("label", sorted(CUDA_BINDINGS))
def test_every_cuda_runtime_name_we_use_exists(label, wheel_cache):
    blob = wheel_strings(*CUDA_BINDINGS[label], wheel_cache)
    names = used_names(CUDA_OBJECTS)
    assert {"cudaMalloc", "cudaMemcpyAsync", "cudaEventElapsedTime", "cudaStreamSynchronize"} <= names
    missing = sorted(n for n in names if n.encode() not in blob)
    assert not missing, f"{label} has no {missing}"


def io_for(layers=2, kv_heads=(2, 2), context=256):
    facts = {"layers": layers, "kv_heads": 2, "head_dim": 16, "max_context": context}
    inputs = [{"name": n, "shape": ["batch", "sequence"]} for n in ("input_ids", "attention_mask", "position_ids")]
    inputs += [{"name": f"past_key_values.{i}.{k}", "shape": ["batch", h, "past_sequence", 16]}
               for i, h in enumerate(kv_heads) for k in ("key", "value")]
    return {"inputs": inputs, "outputs": [], "model": facts}


def test_profiles_cover_prefill_from_empty_cache_and_decode():
    prefill, decode = trt_engine.profiles(io_for(kv_heads=(2, 1)), trt_engine.TrtConfig(max_batch=4, max_seq=256,
                                                                                          opt_seq=64))
    assert prefill["input_ids"] == ((1, 1), (4, 64), (4, 256))
    assert prefill["past_key_values.0.key"] == ((1, 2, 0, 16), (4, 2, 0, 16), (4, 2, 0, 16))  # past length 0
    assert decode["input_ids"] == ((1, 1), (4, 1), (4, 1))
    assert decode["past_key_values.1.value"] == ((1, 1, 1, 16), (4, 1, 64, 16), (4, 1, 255, 16))  # per-layer heads
    for profile in (prefill, decode):
        for low, opt, high in profile.values():
            assert all(a <= b <= c for a, b, c in zip(low, opt, high))


def test_a_profile_beyond_the_models_context_is_refused():
    with pytest.raises(BadInputError, match="--max-seq 512 exceeds the model's context of 256"):
        trt_engine.profiles(io_for(), trt_engine.TrtConfig(max_seq=512))


GRID = [(batch, total, opt) for batch in (1, 2, 8) for total in (2, 3, 8, 128, 256)
        for opt in sorted({1, total // 2 or 1, total - 1 or 1, total})]


def corners(profile: dict, index: int) -> dict:
    """Every input's shape at one corner (0 min, 1 opt, 2 max) of a profile."""
    return {name: ranges[index] for name, ranges in profile.items()}


@pytest.mark.parametrize("max_batch, max_seq, opt_seq", GRID)
def test_profiles_satisfy_tensorrts_rules_for_every_size(max_batch, max_seq, opt_seq):
    io = io_for(kv_heads=(2, 1), context=4096)
    points = trt_engine.profile_points(max_batch, max_seq, opt_seq)
    prefill, decode = trt_engine.profile_shapes(io, points)
    for profile in (prefill, decode):
        for name, (low, opt, high) in profile.items():
            assert len(low) == len(opt) == len(high)
            assert all(0 <= a <= b <= c for a, b, c in zip(low, opt, high)), (name, low, opt, high)
        for index in range(3):
            shapes = corners(profile, index)
            assert len({shape[0] for shape in shapes.values()}) == 1, f"batch dims differ at corner {index}: {shapes}"
            pasts = {shape[2] for name, shape in shapes.items() if name.startswith("past_key_values.")}
            assert len(pasts) == 1, f"layers disagree on the past length: {shapes}"
            assert shapes["attention_mask"][1] == pasts.pop() + shapes["input_ids"][1]  # mask = past + new
            assert shapes["position_ids"] == shapes["input_ids"]
            assert shapes["past_key_values.1.key"][1] == 1 and shapes["past_key_values.0.key"][3] == 16  # static dims
    assert all(shape[2] == 0 for name, ranges in prefill.items() if name.startswith("past_") for shape in ranges)
    assert all(ranges[i][1] == 1 for i in range(3) for ranges in [decode["input_ids"]])  # one new token
    # what the plan must accept: a prompt of the whole --max-seq, and decode steps up to --max-seq in all
    assert prefill["input_ids"][2] == (max_batch, max_seq) and decode["attention_mask"][2] == (max_batch, max_seq)
    assert decode["attention_mask"][0][1] >= 2  # a decode step follows at least one cached token


def test_a_plan_needs_room_for_a_decode_step():
    with pytest.raises(BadInputError, match="room for 2 tokens"):
        trt_engine.profile_points(1, 1, 1)


@pytest.mark.parametrize("settings, message", [
    ({"max_seq": 4, "opt_seq": 4}, "--max-seq 4 is too small; give 8 or more"),  # the verification's windows
    ({"max_batch": 0}, "--max-batch 0 is too small; give 1 or more"),
    ({"workspace_gb": 0}, "--workspace-gb 0 must be greater than 0"),
    ({"max_seq": 64, "opt_seq": 128}, "--opt-seq 128 is outside 1 to --max-seq"),
])
def test_build_settings_that_cannot_make_a_verified_plan_are_refused(settings, message):
    with pytest.raises(BadInputError, match=message):
        trt_engine.TrtConfig(**settings)


def test_opt_equal_to_max_is_a_valid_build_setting():
    trt_engine.TrtConfig(max_seq=128, opt_seq=128)  # the default opt with --max-seq 128
    prefill, decode = trt_engine.profiles(io_for(), trt_engine.TrtConfig(max_seq=128, opt_seq=128))
    assert decode["attention_mask"] == ((1, 2), (1, 128), (1, 128))


def test_polygraphy_config_clears_tf32_for_fp32_and_takes_both_profiles():
    from polygraphy.backend.trt import CreateConfig

    config = trt_engine.TrtConfig(max_batch=2, max_seq=64, opt_seq=16, version_compatible=True)
    shapes = trt_engine.profiles(io_for(), config)
    by_precision = {p: CreateConfig(**trt_engine.create_config_options(config, shapes, p)) for p in ("fp32", "int8")}
    assert by_precision["fp32"].tf32 is False and by_precision["int8"].tf32 is True
    made = by_precision["fp32"]
    assert made.version_compatible is True and len(made.profiles) == 2
    for ours, theirs in zip(shapes, made.profiles):
        assert {name: tuple(theirs[name]) for name in ours} == ours


def test_a_profile_tensorrt_did_not_take_fails_the_build():
    class BuilderConfig:
        num_optimization_profiles = 1  # add_optimization_profile returned -1 for the other one

    with pytest.raises(LmforgeError, match="TensorRT accepted 1 of 2 optimization profiles"):
        trt_engine.check_profiles_added(BuilderConfig(), 2)
    BuilderConfig.num_optimization_profiles = 2
    trt_engine.check_profiles_added(BuilderConfig(), 2)


def test_profile_with_max_below_opt_exits_2_before_looking_for_a_gpu(tmp_path):
    result = run_cli("export.build", "--backend", "trt", "--max-seq", "64", "--opt-seq", "128", "--out", str(tmp_path))
    assert result.returncode == 2 and "--opt-seq 128 is outside 1 to --max-seq (64)" in result.stderr.splitlines()[-1]


def test_mismatching_plan_is_a_clear_error(monkeypatch, tmp_path):
    from runtime import trt_session
    from runtime.artifact import Artifact

    monkeypatch.setattr(trt_session, "compatibility_keys", lambda trt, vc: {
        "tensorrt": "11.4.0", "gpu": "NVIDIA H100", "compute_capability": "9.0", "version_compatible": vc})
    plan = Artifact(tmp_path, {"metrics": {"compatibility": {"tensorrt": "10.16.1", "gpu": "NVIDIA L4",
                                                             "compute_capability": "8.9",
                                                             "version_compatible": False}}})
    with pytest.raises(BadInputError, match=r"built with TensorRT 10.16.1, this machine has 11.4.0; built for "
                                            r"NVIDIA L4 \(sm 8.9\)"):
        trt_session.check_compatible(plan, trt=None)


def _gpu_and_tensorrt() -> str | None:
    try:
        import tensorrt  # noqa: F401
        from cuda.bindings import runtime as cudart
    except ImportError:
        return "TensorRT or cuda-python is not installed"
    err, count = cudart.cudaGetDeviceCount()
    return None if err == cudart.cudaError_t.cudaSuccess and count else "no NVIDIA GPU"


NEEDS_GPU = pytest.mark.skipif(_gpu_and_tensorrt() is not None, reason=_gpu_and_tensorrt() or "")


def build_plan_cli(model, out, *flags: str, env: dict | None = None):
    """`python -m export.build --backend trt` on a tiny model, as a user runs it; returns (result, engines)."""
    result = run_cli("export.build", "--model", str(model), "--backend", "trt", "--out", str(out),
                     "--max-ppl-increase", "50", "--max-float-fraction", "0.5", *flags, env=env)
    assert result.returncode == 0, result.stderr
    return result, sorted(out.glob("engine-*"))


@pytest.mark.gpu
@NEEDS_GPU
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_tensorrt_engine_builds_verifies_and_decodes(tiny_model_factory, tmp_path, precision):
    import runtime

    _, engines = build_plan_cli(tiny_model_factory("llama"), tmp_path, "--precision", precision, "--max-seq", "256")
    with runtime.open(engines[0]) as session:
        logits = session.prefill(np.array([[5, 6, 7, 8]]))
        assert np.isfinite(session.decode(np.array([int(logits[0, -1].argmax())]))).all()
        assert session.last_step_ms > 0


@pytest.mark.gpu
@NEEDS_GPU
def test_batched_plan_with_opt_equal_to_max_runs_to_its_limit(tiny_model_factory, tmp_path):
    """--max-batch 2 (the prefill opt point once gave the cache batch 1) and --opt-seq = --max-seq (the decode
    profile's opt once passed its max): the plan builds, a batch of two matches each row run alone, decoding
    reaches --max-seq, and the next step is refused before any copy."""
    import runtime

    _, engines = build_plan_cli(tiny_model_factory("llama"), tmp_path, "--precision", "fp32", "--max-batch", "2",
                                "--max-seq", "32", "--opt-seq", "32")
    prompt = np.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    with runtime.open(engines[0]) as session:
        together = session.prefill(prompt)
        steps = [session.decode([3, 4]) for _ in range(32 - prompt.shape[1])]
        assert all(np.isfinite(step).all() for step in steps)
        with pytest.raises(BadInputError, match="past the plan's --max-seq 32"):
            session.decode([3, 4])
        for row in range(2):
            session.reset()
            alone = session.prefill(prompt[row:row + 1])
            np.testing.assert_allclose(together[row], alone[0], atol=1e-3)  # fp32 with TF32 off


@pytest.mark.gpu
@NEEDS_GPU
def test_version_compatible_plan_builds_and_runs(tiny_model_factory, tmp_path):
    import runtime
    from runtime.artifact import load

    _, engines = build_plan_cli(tiny_model_factory("llama"), tmp_path, "--precision", "fp32", "--max-seq", "64",
                                "--version-compatible")
    assert load(engines[0]).metrics["compatibility"]["version_compatible"] is True
    with runtime.open(engines[0]) as session:  # needs engine_host_code_allowed for the embedded lean runtime
        logits = session.prefill(np.array([[5, 6, 7, 8]]))
        assert np.isfinite(session.decode([int(logits[0, -1].argmax())])).all()


@pytest.mark.gpu
@NEEDS_GPU
def test_a_second_build_reuses_the_timing_cache(tiny_model_factory, tmp_path):
    env = {"LMFORGE_CACHE": str(tmp_path / "cache")}
    model = tiny_model_factory("llama")
    first, _ = build_plan_cli(model, tmp_path / "a", "--precision", "fp32", "--max-seq", "64", env=env)
    caches = list((tmp_path / "cache" / "tensorrt").glob("timing-trt*-sm*.cache"))
    assert "timing cache: fresh" in first.stderr and len(caches) == 1 and caches[0].stat().st_size > 0
    second, _ = build_plan_cli(model, tmp_path / "b", "--precision", "fp32", "--max-seq", "48", env=env)
    assert f"timing cache: reused {caches[0]}" in second.stderr


def test_version_compatible_plan_runs_forward_only_by_version_number(monkeypatch, tmp_path):
    from runtime import trt_session
    from runtime.artifact import Artifact

    def plan(built):
        return Artifact(tmp_path, {"metrics": {"compatibility": {"tensorrt": built, "gpu": "NVIDIA L4",
                                                                 "compute_capability": "8.9",
                                                                 "version_compatible": True}}})

    monkeypatch.setattr(trt_session, "compatibility_keys", lambda trt, vc: {
        "tensorrt": "10.16.1", "gpu": "NVIDIA L4", "compute_capability": "8.9", "version_compatible": vc})
    trt_session.check_compatible(plan("10.9.0"), trt=None)  # older plan, newer runtime: fine ('10.9' > '10.16' as text)
    with pytest.raises(BadInputError, match="built with TensorRT 11.0.0, this machine has 10.16.1"):
        trt_session.check_compatible(plan("11.0.0"), trt=None)


def test_precisions_tensorrt_lacks_are_refused_naming_the_alternatives():
    for precision in trt_engine.PRECISIONS:
        trt_engine.check_precision(precision)
    with pytest.raises(BadInputError, match="no int8-weight-only .* or int8-weight-only with --backend ort"):
        trt_engine.check_precision("int8-weight-only")


# -- the timing cache ---------------------------------------------------------------------------------------


class FakeTimingCache:
    """TensorRT's ITimingCache as bytes 'CACHE:<device>:<entries>'; combine unions the entries."""

    def __init__(self, device: str, entries: set[str]):
        self.device, self.entries = device, set(entries)

    def combine(self, other, ignore_mismatch):
        if other.device != self.device and not ignore_mismatch:
            return False
        self.entries |= other.entries
        return True

    def serialize(self) -> bytes:
        return f"CACHE:{self.device}:{','.join(sorted(self.entries))}".encode()


class FakeBuilderConfig:
    """create/set/get_timing_cache as TensorRT documents them: no cache from a bad blob, False on another
    device's cache; `build` stands for the timings a build adds to the attached cache."""

    def __init__(self, device="sm90", create_raises=False):
        self.device, self.create_raises, self.attached = device, create_raises, None

    def create_timing_cache(self, data: bytes):
        if self.create_raises and data:
            raise RuntimeError("corrupt timing cache")
        if not data:
            return FakeTimingCache(self.device, set())
        parts = bytes(data).decode(errors="replace").split(":")
        if len(parts) != 3 or parts[0] != "CACHE":
            return None
        return FakeTimingCache(parts[1], {e for e in parts[2].split(",") if e})

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.device != self.device and not ignore_mismatch:
            return False
        self.attached = cache
        return True

    def get_timing_cache(self):
        return self.attached

    def build(self, *entries):
        self.attached.entries |= set(entries)


def test_timing_cache_file_is_keyed_by_tensorrt_version_and_gpu_architecture(tmp_path, monkeypatch):
    name = trt_engine.timing_cache_file
    assert name(tmp_path, "10.16.1.11", "9.0") == name(tmp_path, "10.16.1.11", "9.0")
    keys = {name(tmp_path, version, cc) for version in ("10.16.1.11", "11.4.0.106") for cc in ("8.9", "9.0")}
    assert len(keys) == 4 and all(k.parent == tmp_path for k in keys)
    assert "11.4.0.106" in name(tmp_path, "11.4.0.106", "9.0").name and "sm90" in name(tmp_path, "11.4", "9.0").name
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    assert trt_engine.timing_cache_dir(trt_engine.TrtConfig()) == tmp_path / "cache" / "tensorrt"
    assert trt_engine.timing_cache_dir(trt_engine.TrtConfig(timing_cache_dir=str(tmp_path))) == tmp_path
    from export.build import ENGINES, stage_id

    ids = {stage_id(ENGINES["trt"], "parent", trt_engine.stage_config(trt_engine.TrtConfig(timing_cache_dir=where)))[0]
           for where in (None, str(tmp_path))}
    assert len(ids) == 1  # where the cache lives never changes the plan


@pytest.mark.parametrize("saved, create_raises, expected", [
    (None, False, "fresh"),  # first build on this machine
    (b"CACHE:sm90:conv,gemm", False, "reused"),
    (b"CACHE:sm80:gemm", False, "fresh"),  # another device: set_timing_cache returns False
    (b"\x00garbage", False, "fresh"),  # corrupt: no cache from these bytes
    (b"CACHE:sm90:gemm", True, "fresh"),  # corrupt, and the binding raises instead
    (b"", False, "fresh"),  # an empty file (a crash before the atomic write existed)
])
def test_timing_cache_is_reused_only_when_tensorrt_accepts_it(tmp_path, saved, create_raises, expected):
    path = tmp_path / "timing.cache"
    if saved is not None:
        path.write_bytes(saved)
    builder_config, messages = FakeBuilderConfig(create_raises=create_raises), []
    assert trt_engine.attach_timing_cache(builder_config, path, messages.append) == expected
    attached = builder_config.get_timing_cache()
    assert attached is not None and attached.device == "sm90"
    assert attached.entries == ({"conv", "gemm"} if expected == "reused" else set())
    assert any(str(path) in m for m in messages)


def test_saved_timing_cache_merges_concurrent_builds_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "caches" / "timing.cache"
    first, second = FakeBuilderConfig(), FakeBuilderConfig()
    for builder_config in (first, second):  # both load before either saves
        trt_engine.attach_timing_cache(builder_config, path, progress=lambda m: None)
    first.build("conv")
    second.build("gemm")
    assert trt_engine.save_timing_cache(first, path, progress=lambda m: None)
    assert trt_engine.save_timing_cache(second, path, progress=lambda m: None)
    assert path.read_bytes() == b"CACHE:sm90:conv,gemm"  # the second save kept the first's timings
    assert sorted(p.name for p in path.parent.iterdir()) == ["timing.cache", "timing.cache.lock"]  # the lock file


def test_a_failed_timing_cache_write_keeps_the_old_file_and_does_not_fail_the_build(tmp_path, monkeypatch):
    path = tmp_path / "timing.cache"
    path.write_bytes(b"CACHE:sm90:conv")
    builder_config, messages = FakeBuilderConfig(), []
    trt_engine.attach_timing_cache(builder_config, path, messages.append)
    builder_config.build("gemm")

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trt_engine.os, "replace", full_disk)
    assert trt_engine.save_timing_cache(builder_config, path, messages.append) is False
    assert path.read_bytes() == b"CACHE:sm90:conv" and "No space left" in messages[-1]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_no_timing_cache_from_tensorrt_saves_nothing(tmp_path):
    path, messages = tmp_path / "timing.cache", []
    assert trt_engine.save_timing_cache(FakeBuilderConfig(), path, messages.append) is False
    assert not path.exists() and "no timing cache" in messages[-1]


# -- the session, over a fake engine and a fake CUDA ----------------------------------------------------------

VOCAB = 40


def open_fake_session(monkeypatch, tmp_path, config=trt_engine.TrtConfig(max_batch=2, max_seq=16, opt_seq=8),
                      kv_heads=(2, 1), cudart=None, kv_order=None, profiles=None, facts=None, prepare=None):
    """A TrtSession over FakeEngine: profiles from engines.trt (as a build makes them), the manifest's facts
    as the export writes them."""
    from runtime import trt_session
    from runtime.artifact import Artifact
    from runtime.session import SessionOptions

    io = io_for(kv_heads=kv_heads)
    io["model"] |= {"vocab_size": VOCAB, "layer_kv_heads": list(kv_heads)} | (facts or {})
    cudart = cudart or FakeCudart()
    heads = {f"past_key_values.{i}.{k}": h for i, h in enumerate(kv_heads) for k in ("key", "value")}
    engine = FakeEngine(cudart, profiles or trt_engine.profiles(io, config), heads, head_dim=16, vocab=VOCAB,
                        kv_order=kv_order)
    if prepare:
        prepare(engine)
    (tmp_path / trt_session.PLAN_FILE).write_bytes(b"plan")
    keys = {"tensorrt": "10.16.1.11", "gpu": "NVIDIA H100", "compute_capability": "9.0", "version_compatible": False}
    artifact = Artifact(tmp_path, {"io": io, "files": {trt_session.PLAN_FILE: {}}, "metrics": {"compatibility": keys}})
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(engine))
    monkeypatch.setattr(trt_session, "import_cudart", lambda: cudart)
    monkeypatch.setattr(trt_session, "compatibility_keys", lambda trt, vc: keys | {"version_compatible": vc})
    return trt_session.TrtSession(artifact, SessionOptions(threads=1)), engine, cudart


def test_fake_session_prefills_and_decodes_within_the_plan(monkeypatch, tmp_path):
    session, engine, cudart = open_fake_session(monkeypatch, tmp_path)
    assert session.prefill(np.array([[1, 2, 3], [4, 5, 6]])).shape == (2, 3, VOCAB)
    for _ in range(13):  # 3 + 13 = 16 = --max-seq: the last step the plan accepts
        assert session.decode([7, 8]).shape == (2, 1, VOCAB)
    context = engine.contexts[0]
    assert context.shapes["attention_mask"] == (2, 16) and context.shapes["past_key_values.1.value"] == (2, 1, 15, 16)
    assert session.last_step_ms == 0.25


def too_long_prompt(session):
    session.prefill(np.ones((1, 17), np.int64))


def too_large_batch(session):
    session.prefill(np.ones((3, 4), np.int64))


def decode_past_max_seq(session):
    session.prefill(np.ones((1, 16), np.int64))  # fills the plan: no decode step fits after it
    session.decode([1])


@pytest.mark.parametrize("steps, message", [
    (too_long_prompt, "a prompt of 17 tokens exceeds the plan's --max-seq 16"),
    (too_large_batch, "a batch of 3 exceeds the plan's --max-batch 2"),
    (decode_past_max_seq, "would hold 17 tokens, past the plan's --max-seq 16"),
])
def test_input_beyond_the_plan_is_refused_before_anything_is_copied(monkeypatch, tmp_path, steps, message):
    session, engine, cudart = open_fake_session(monkeypatch, tmp_path)
    with pytest.raises(BadInputError, match=message):
        steps(session)
    expected_copies = 3 if steps is decode_past_max_seq else 0  # the prefill's ids, mask and positions
    assert len(cudart.copies_in) == expected_copies  # the refused step copied nothing to the GPU
    assert session._state is None or session._state.length == 16  # and the cache did not move


def test_a_failed_decode_step_leaves_the_cache_where_it_was(monkeypatch, tmp_path):
    session, engine, cudart = open_fake_session(monkeypatch, tmp_path)
    session.prefill(np.array([[1, 2, 3]]))
    context = engine.contexts[0]
    context.fail_execution = True
    with pytest.raises(LmforgeError, match="execution failed"):
        session.decode([4])
    assert session._state.length == 3
    context.fail_execution = False
    session.decode([4])  # the retry runs as the first decode step: past 3, mask 4
    assert context.shapes["past_key_values.0.key"] == (1, 2, 3, 16) and context.shapes["attention_mask"] == (1, 4)


def test_optimization_profile_is_switched_only_when_it_changes(monkeypatch, tmp_path):
    session, engine, cudart = open_fake_session(monkeypatch, tmp_path)
    for _ in range(2):
        session.prefill(np.array([[1, 2]]))
        for token in range(3):
            session.decode([token])
    assert engine.contexts[0].profile_switches == [0, 1, 0, 1]


def test_a_refused_profile_switch_is_an_error(monkeypatch, tmp_path):
    session, engine, cudart = open_fake_session(monkeypatch, tmp_path)
    session.prefill(np.array([[1, 2]]))
    engine.profiles.pop()  # as if the plan lacked the decode profile at run time
    with pytest.raises(LmforgeError, match="TensorRT refused optimization profile 1"):
        session.decode([3])


def test_cache_sizes_come_from_the_plans_tensors_not_the_manifest(monkeypatch, tmp_path):
    """Layer 1 has one KV head, layer 0 two; the plan lists its cache tensors in another order than the
    manifest, whose per-layer list (stale, say) names 3 heads for both: each buffer and bound shape must
    follow the plan's own tensor shapes."""
    order = ["past_key_values.1.value", "past_key_values.0.key", "past_key_values.1.key", "past_key_values.0.value"]
    session, engine, cudart = open_fake_session(monkeypatch, tmp_path, kv_order=order,
                                                facts={"layer_kv_heads": [3, 3], "kv_heads": 3, "vocab_size": VOCAB})
    session.prefill(np.array([[1, 2]]))
    session.decode([3])
    shapes = engine.contexts[0].shapes
    assert shapes["past_key_values.1.value"] == (1, 1, 2, 16) and shapes["past_key_values.0.key"] == (1, 2, 2, 16)
    kv_bytes = sorted(cudart.mallocs[-8:])  # the two ping-pong sets, allocated last
    assert kv_bytes == sorted([2 * h * 16 * 16 * 4 for h in (1, 2, 1, 2)] * 2)  # batch 2, 16 tokens, fp32


@pytest.mark.parametrize("failure", ["no execution context", "out of memory on the 3rd buffer",
                                     "plan with one profile"])
def test_a_failed_open_frees_everything_it_took(monkeypatch, tmp_path, failure):
    from runtime.errors import ArtifactError

    cudart = FakeCudart(fail_malloc_at=3 if failure.startswith("out of memory") else None)
    profiles = trt_engine.profiles(io_for(), trt_engine.TrtConfig(max_seq=16, opt_seq=8))[:1] \
        if failure == "plan with one profile" else None
    prepare = (lambda engine: setattr(engine, "context_fails", True)) if failure == "no execution context" else None
    expected = ArtifactError if failure == "plan with one profile" else LmforgeError
    with pytest.raises(expected):
        open_fake_session(monkeypatch, tmp_path, cudart=cudart, profiles=profiles, prepare=prepare)
    assert cudart.live == {} and cudart.streams == set() and cudart.events == set()
    if failure.startswith("out of memory"):
        assert cudart.calls.count("cudaFree") == 2  # the two buffers allocated before the failure


def test_close_waits_for_the_gpu_then_frees_buffers_events_and_stream(monkeypatch, tmp_path):
    session, engine, cudart = open_fake_session(monkeypatch, tmp_path)
    session.prefill(np.array([[1, 2]]))
    cudart.calls.clear()
    session.close()
    assert cudart.calls[0] == "cudaStreamSynchronize" and cudart.calls[-1] == "cudaStreamDestroy"
    assert cudart.live == {} and cudart.streams == set() and cudart.events == set()
    session.close()  # twice is harmless
    from runtime.session import SessionClosedError

    with pytest.raises(SessionClosedError):
        session.prefill(np.array([[1]]))


# -- verification windows and version compatibility -----------------------------------------------------------


def test_verification_windows_are_cut_to_the_plans_max_seq(monkeypatch, tmp_path):
    """The calibration windows (256 tokens by default) are longer than a --max-seq 64 plan accepts: the engine
    sees, and the fp32 reference is re-evaluated on, each window's first 64 tokens, once per build."""
    from engines import verify as verify_module
    from runtime.accuracy import Evaluation
    from runtime.artifact import Artifact

    windows = np.arange(3 * 256).reshape(3, 256) % 50
    evaluated, engine_windows = [], []

    def evaluation_of(windows_seen):
        return Evaluation(perplexity=10.0, predictions=[np.zeros(w.shape[0] - 1, np.int32) for w in windows_seen])

    def fake_evaluate_model(path, facts, windows_seen, threads):
        evaluated.append(windows_seen.shape)
        return evaluation_of(windows_seen)

    def fake_evaluate_session(session, windows_seen):
        engine_windows.append(windows_seen.shape)
        return evaluation_of(windows_seen)

    class NoSession:
        def close(self):
            pass

    monkeypatch.setattr(verify_module.accuracy, "evaluate_model", fake_evaluate_model)
    monkeypatch.setattr(verify_module.accuracy, "evaluate_session", fake_evaluate_session)
    monkeypatch.setattr(verify_module.runtime, "open", lambda engine, options: NoSession())
    compared = []

    def fake_compare_logits(ref, eng, windows_seen, precision, threads):
        compared.append(windows_seen.shape)
        return {"passed": True, "statistic": "max", "tolerance": 1e-3, "max": 0.0, "mean": 0.0}

    monkeypatch.setattr(verify_module, "compare_logits", fake_compare_logits)
    export = Artifact(tmp_path, {"id": "export0", "files": {"model.onnx": {}}, "io": {"model": {}}})
    reference = verify_module.Baseline((verify_module.Reference.of(export, windows, threads=1),))
    parent = Artifact(tmp_path, {"id": "export0", "metrics": {}})
    for _ in range(2):  # two plans of one build share the shortened reference
        plan = Artifact(tmp_path, {"precision": "fp32", "files": {}, "metrics": {"max_sequence": 64}})
        (record,) = verify_module.verify(plan, parent, reference)
    assert compared[-1] == (2, 64) and engine_windows == [(3, 64), (3, 64)] and record.windows == 3
    assert evaluated == [(3, 256), (3, 64)]
    onnx_engine = Artifact(tmp_path, {"precision": "fp32", "files": {}, "metrics": {}})
    verify_module.verify(onnx_engine, parent, reference)
    assert engine_windows[-1] == (3, 256)  # an engine without a length limit keeps the whole windows


@pytest.mark.parametrize("built, running, compatible, runs", [
    ("10.16.1.11", "10.16.1.11", False, True),
    ("10.16.1.11", "10.16.1.12", False, False),  # a plain plan runs on its own version only
    ("10.9.0", "10.16.1", True, True),  # forward within a major version
    ("10.16.1", "11.4.0.106", True, True),  # 10 -> 11: documented
    ("8.6.1", "10.16.1", True, True),  # 8 -> 10: documented
    ("8.6.1", "11.4.0.106", True, False),  # 8 -> 11: "no other combination across major versions"
    ("8.5.3", "8.6.1", True, False),  # version compatibility begins at 8.6
    ("11.0.0", "10.16.1", True, False),  # never backwards
])
def test_version_compatible_plans_run_only_on_documented_versions(built, running, compatible, runs):
    from runtime import trt_session

    version = trt_session._version
    assert trt_session.runs_here(version(built), version(running), compatible) is runs


# -- the GPU check script ---------------------------------------------------------------------------------------

GPU_CHECK = REPO / "ci" / "gpu-check.sh"


def test_gpu_check_script_builds_both_plans_benches_them_and_stops_early_without_tensorrt(tmp_path):
    import importlib.util

    text = GPU_CHECK.read_text()
    assert os.access(GPU_CHECK, os.X_OK) and subprocess.run(["bash", "-n", str(GPU_CHECK)]).returncode == 0
    assert "python -m export.build --model \"$model\" --backend trt --precision fp32,int8" in text
    assert "python -m runtime.bench" in text and "-m gpu" in text
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the script would run the whole GPU check")
    store = tmp_path / "store"  # given through the environment, as a CI step passes it
    result = subprocess.run([str(GPU_CHECK)], capture_output=True, text=True, timeout=120,
                            env=os.environ | {"GPU_CHECK_STORE": str(store)})
    assert result.returncode == 4 and "needs TensorRT and cuda-python" in result.stderr
    assert not store.exists()  # it stopped before building anything


def test_gpu_check_table_puts_verification_beside_latency(tmp_path):
    import runpy

    table = runpy.run_path(str(REPO / "ci" / "gpu_check_table.py"))["table"]
    engines = []
    for precision, increase, tpot in (("fp32", 0.0, 1.25), ("int8", 1.5, 0.75)):
        plan = tmp_path / f"engine-{precision}"
        plan.mkdir()
        (plan / "manifest.json").write_text(json.dumps({"metrics": {"compatibility": {
            "tensorrt": "11.4.0.106", "gpu": "NVIDIA H200", "compute_capability": "9.0"}}}))
        engines.append({"precision": precision, "engine_id": f"id-{precision}", "path": str(plan), "size_bytes": 2e6,
                        "accuracy": [{"domain": "held-out", "perplexity_increase_percent": increase,
                                      "top1_agreement": 0.98, "logits_statistic": "mean", "logits_diff": 0.05,
                                      "logits_limit": 1.0}]})
        (tmp_path / f"bench-{precision}.json").write_text(json.dumps({"runners": {"lmforge": {
            "ttft_ms": 12.0, "tpot_ms": {"p50": tpot}, "tokens_per_second": 1000 / tpot}}}))
    (tmp_path / "report.json").write_text(json.dumps({"engines": engines}))
    lines = table(tmp_path).splitlines()
    assert lines[0].split()[:2] == ["precision", "plan"] and set(lines[1]) == {"-"} and len(lines) == 4
    assert lines[3].split()[:5] == ["int8", "id-int8", "2.0", "MB", "+1.50%"]
    assert "0.75" in lines[3] and "1333.3" in lines[3] and "NVIDIA H200 (sm 9.0)" in lines[3]


@pytest.mark.parametrize("option, problem", [
    ({"profile": "/tmp/never"}, "ONNX Runtime's profiler; TensorRT engines are profiled with"),
    ({"exact_speculation": True}, "exact_speculation=True. needs a fused CPU engine"),
], ids=["profile", "exact_speculation"])
def test_ort_only_session_options_are_refused_for_a_tensorrt_session_before_anything_loads(option, problem):
    from runtime.session import SessionOptions
    from runtime.trt_session import TrtSession

    with pytest.raises(BadInputError, match=problem):
        TrtSession(None, SessionOptions(**option))
