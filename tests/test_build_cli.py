"""`python -m export.build` as users run it: bad input, reuse, and a build killed mid-stage."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, run_cli


def assert_one_line_error(result, code, *fragments):
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for fragment in fragments:
        assert fragment in last


def write_gguf(path, truncate=False):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.random.rand(64, 32).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


def test_missing_path(tmp_path):
    result = run_cli("export.build", "--model", "./no/such/model", "--out", str(tmp_path))
    assert_one_line_error(result, 2, "./no/such/model does not exist")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes").mkdir()
    result = run_cli("export.build", "--model", str(tmp_path / "notes"), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, 2, "not a Hugging Face model folder (no config.json)")


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    result = run_cli("export.build", "--model", str(bert), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, 2, "architecture 'bert'", "not supported", "Llama", "GPT-NeoX", "Phi-3")


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_or_truncated_gguf(tmp_path, kind):
    path = tmp_path / "model.gguf"
    if kind == "garbage":
        path.write_bytes(b"this is not a gguf file at all" * 10)
    else:
        write_gguf(path, truncate=True)
    result = run_cli("export.build", "--model", str(path), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, 2, "not a readable GGUF file", "download it again")


@pytest.mark.parametrize("matrix, named", [("int3", "int3"), ("fp32,int3,int8", "int3"), (",", "(none given)")])
def test_unknown_precision(tmp_path, matrix, named):
    result = run_cli("export.build", "--precision", matrix, "--out", str(tmp_path))
    assert_one_line_error(result, 2, f"unknown precision {named}", "fp32")


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_one_line_error(run_cli("export.build", "--out", str(blocker)), 2, "is a file, not a folder")
    assert_one_line_error(run_cli("export.build", "--out", str(blocker / "sub")), 2, "cannot write to --out")


def test_hub_id_without_network(tmp_path):
    result = run_cli("export.build", "--model", "someorg/some-model", "--out", str(tmp_path),
                     env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(result, 2, "cannot reach the Hugging Face Hub for someorg/some-model")


def test_tensorrt_backend_without_tensorrt_exits_4(tmp_path):
    pytest.importorskip("numpy")
    from export.build import _has_module, _has_nvidia_gpu

    if _has_module("tensorrt") and _has_nvidia_gpu():
        pytest.skip("this machine has TensorRT and a GPU")
    result = run_cli("export.build", "--backend", "trt", "--out", str(tmp_path))
    assert_one_line_error(result, 4, "--backend trt needs")


def test_second_build_reuses_the_finished_stage(tiny_model_factory, tmp_path):
    model = str(tiny_model_factory("llama"))
    first = run_cli("export.build", "--model", model, "--out", str(tmp_path))
    assert first.returncode == 0, first.stderr
    second = run_cli("export.build", "--model", model, "--out", str(tmp_path))
    assert second.returncode == 0, second.stderr
    assert "reusing" in second.stderr and "(reused)" in second.stdout
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("export-")]) == 1


def test_build_killed_mid_stage_leaves_no_artifact(tiny_model_factory, tmp_path):
    model = str(tiny_model_factory("llama"))
    process = subprocess.Popen([sys.executable, "-m", "export.build", "--model", model, "--out", str(tmp_path)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=os.environ.copy())
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".tmp-") for p in tmp_path.glob(".tmp-*")):
        time.sleep(0.05)
    assert process.poll() is None, "the build finished before it could be killed"
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("export-")]

    # The next build cleans the dead build's temporary folder and completes.
    result = run_cli("export.build", "--model", model, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir() if p.is_dir()) == [".locks", "engine", "export"]
    assert not list(tmp_path.glob(".tmp-*"))  # the owner files of the killed build's folders too


def test_anything_unexpected_exits_1_naming_the_log(tmp_path, monkeypatch, capsys):
    from export import build

    def broken(config):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(build, "build", broken)
    assert build.main(["--out", str(tmp_path)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unexpected RuntimeError: disk on fire" in last and str(tmp_path / "lmforge-error.log") in last
    assert "Traceback" in (tmp_path / "lmforge-error.log").read_text()


@pytest.mark.parametrize("free_mib, disk_named", [(3, True), (4096, False)])
def test_a_stage_that_fails_on_a_full_disk_says_the_disk_is_full(tmp_path, monkeypatch, free_mib, disk_named):
    import shutil
    from collections import namedtuple

    from export import build
    from runtime.errors import BadInputError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40, free_mib * 2**20))

    def produce(writer):
        (writer.dir / "model.onnx").write_bytes(b"half")
        raise RuntimeError("Protobuf serialization failed.")

    expected = BadInputError if disk_named else RuntimeError
    with pytest.raises(expected) as failure:
        build.run_stage(tmp_path, build.ENGINES["ort"], "parent0", {}, produce)
    assert ("disk holding" in str(failure.value) and "--out" in str(failure.value)) is disk_named
    assert [p.name for p in tmp_path.iterdir()] == [".locks"]  # nothing half-written; the lock files stay
