import json

import pytest

from runtime import artifact as artifacts
from runtime.errors import ArtifactError

IO = {"inputs": [], "outputs": [], "model": {}}


def write(store, ident="abc123def456", payload=b"weights"):
    with artifacts.ArtifactWriter(store, "export", ident, "parent0", {"opset": 18}) as writer:
        (writer.dir / "model.onnx").write_bytes(payload)
        return writer.commit(io=IO, metrics={"x": 1})


def test_id_depends_on_parent_stage_config_and_versions():
    base = artifacts.artifact_id("p", "export", {"opset": 18}, {"torch": "2.13.0"})
    assert base == artifacts.artifact_id("p", "export", {"opset": 18}, {"torch": "2.13.0"})
    assert len(base) == 12 and int(base, 16) >= 0
    variants = [
        artifacts.artifact_id("q", "export", {"opset": 18}, {"torch": "2.13.0"}),
        artifacts.artifact_id("p", "prune", {"opset": 18}, {"torch": "2.13.0"}),
        artifacts.artifact_id("p", "export", {"opset": 17}, {"torch": "2.13.0"}),
        artifacts.artifact_id("p", "export", {"opset": 18}, {"torch": "2.14.0"}),
    ]
    assert base not in variants and len(set(variants)) == 4


def test_commit_writes_manifest_with_hashes_and_renames_into_place(tmp_path):
    art = write(tmp_path)
    assert art.path == tmp_path / "export-abc123def456"
    manifest = json.loads((art.path / "manifest.json").read_text())
    assert manifest["id"] == "abc123def456" and manifest["parent"] == "parent0"
    assert manifest["files"]["model.onnx"] == {"sha256": artifacts.sha256_file(art.path / "model.onnx"), "size": 7}
    assert manifest["versions"]["onnx"] is not None
    assert [p.name for p in tmp_path.iterdir()] == ["export-abc123def456"]
    assert artifacts.load(art.path).metrics == {"x": 1}


def test_failure_inside_the_stage_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with artifacts.ArtifactWriter(tmp_path, "export", "abc", None, {}) as writer:
            (writer.dir / "model.onnx").write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    assert artifacts.find(tmp_path, "export", "abc") is None


def test_load_names_the_tampered_file(tmp_path):
    art = write(tmp_path)
    (art.path / "model.onnx").write_bytes(b"weightz")
    with pytest.raises(ArtifactError, match="model.onnx does not match its sha256"):
        artifacts.load(art.path)


def test_load_names_a_missing_file_and_a_missing_manifest(tmp_path):
    art = write(tmp_path)
    (art.path / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="missing model.onnx"):
        artifacts.load(art.path)
    (art.path / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="not a finished artifact"):
        artifacts.load(art.path)
    with pytest.raises(ArtifactError, match="does not exist"):
        artifacts.load(tmp_path / "nowhere")


def test_stale_temporaries_of_dead_builds_are_removed(tmp_path):
    stale = tmp_path / ".tmp-export-abc-999999999"
    stale.mkdir()
    finished = write(tmp_path)
    artifacts.remove_stale_temporaries(tmp_path)
    assert not stale.exists() and finished.path.exists()
