"""TensorRT without TensorRT: the names our code uses exist in the 10.x and 11.x bindings, profiles follow
the manifest, bad input is refused before any GPU is needed; the real build and run are `gpu` tests."""

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli

from engines import trt as trt_engine
from runtime.errors import BadInputError

TRT_SOURCES = [REPO / "engines" / "trt.py", REPO / "runtime" / "trt_session.py"]
# Local names that hold TensorRT objects in those files: every attribute read on them is a TensorRT name.
TRT_OBJECTS = {"trt", "_trt", "builder", "network", "parser", "builder_config", "profile", "engine", "context",
               "runtime", "e", "Monitor"}
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
    assert {"STRONGLY_TYPED", "build_serialized_network", "execute_async_v3", "set_tensor_address"} <= names
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
    assert prefill["past_key_values.0.key"] == ((1, 2, 0, 16), (1, 2, 0, 16), (4, 2, 0, 16))  # past length 0
    assert decode["input_ids"] == ((1, 1), (4, 1), (4, 1))
    assert decode["past_key_values.1.value"] == ((1, 1, 1, 16), (4, 1, 64, 16), (4, 1, 255, 16))  # per-layer heads
    for profile in (prefill, decode):
        for low, opt, high in profile.values():
            assert all(a <= b <= c for a, b, c in zip(low, opt, high))


@pytest.mark.parametrize("config, message", [
    (trt_engine.TrtConfig(max_seq=64, opt_seq=128), "the max is below the opt"),
    (trt_engine.TrtConfig(max_seq=512), "--max-seq 512 exceeds the model's context of 256"),
])
def test_bad_profiles_are_refused(config, message):
    with pytest.raises(BadInputError, match=message):
        trt_engine.profiles(io_for(), config)


def test_profile_with_max_below_opt_exits_2_before_looking_for_a_gpu(tmp_path):
    result = run_cli("export.build", "--backend", "trt", "--max-seq", "64", "--opt-seq", "128", "--out", str(tmp_path))
    assert result.returncode == 2 and "the max is below the opt" in result.stderr.strip().splitlines()[-1]


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


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_and_tensorrt() is not None, reason=_gpu_and_tensorrt() or "")
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_tensorrt_engine_builds_verifies_and_decodes(tiny_model_factory, tmp_path, precision):
    from runtime.session import open as open_session

    result = run_cli("export.build", "--model", str(tiny_model_factory("llama")), "--backend", "trt",
                     "--precision", precision, "--max-seq", "256", "--out", str(tmp_path),
                     "--max-ppl-increase", "50", "--max-float-fraction", "0.5")
    assert result.returncode == 0, result.stderr
    engine = next(p for p in tmp_path.glob("engine-*"))
    with open_session(engine) as session:
        logits = session.prefill(np.array([[5, 6, 7, 8]]))
        assert np.isfinite(session.decode(np.array([int(logits[0, -1].argmax())]))).all()
        assert session.last_step_ms > 0


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
