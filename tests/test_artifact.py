import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import REPO

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


# Untrusted artifacts: every name in a manifest, and every external-data location in its ONNX models, must be
# a plain relative name inside the folder, refused with a one-line error naming it before any file is read.

def tamper_manifest(art, **changes):
    manifest = json.loads((art.path / "manifest.json").read_text())
    manifest.update(changes)
    (art.path / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def reads(monkeypatch):
    """The files the loader hashes (to check it refuses before reading any)."""
    hashed = []
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda path: hashed.append(path) or real(path))
    return hashed


def outside_entry(kind, art, outside):
    """A manifest entry of the given kind that leads to `outside`, a file beyond the artifact folder."""
    if kind == "symlink":
        (art.path / "link.bin").symlink_to(outside)
        return "link.bin"
    if kind == "symlinked folder":
        (art.path / "sub").symlink_to(outside.parent, target_is_directory=True)
        return f"sub/{outside.name}"
    return {"absolute": str(outside), "dot-dot": f"../{outside.name}", "nested dot-dot": f"x/../../{outside.name}",
            "windows absolute": "C:\\Windows\\win.ini", "windows dot-dot": f"..\\{outside.name}"}[kind]


@pytest.mark.parametrize("kind, problem", [
    ("absolute", "an absolute path"), ("dot-dot", "a path through '..'"), ("nested dot-dot", "a path through '..'"),
    ("windows absolute", "an absolute path"), ("windows dot-dot", "a path through '..'"),
    ("symlink", "a symlink leading out"), ("symlinked folder", "a symlink leading out"),
])
def test_manifest_names_outside_the_folder_are_refused_before_reading(tmp_path, reads, kind, problem):
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    art = write(tmp_path / "store")
    entry = outside_entry(kind, art, outside)
    files = json.loads((art.path / "manifest.json").read_text())["files"]
    tamper_manifest(art, files={**files, entry: {"sha256": artifacts.sha256_file(outside), "size": 9}})
    reads.clear()
    for verify in (True, False):
        with pytest.raises(ArtifactError) as refused:
            artifacts.load(art.path, verify=verify)
        message = str(refused.value)
        assert repr(entry) in message and problem in message and "\n" not in message
    assert reads == []


def onnx_with_external_data(folder, locations, subgraph_location=None):
    """A small ONNX model in `folder` whose initializers name the given external-data locations (and, with
    `subgraph_location`, one more inside an If node's branch, where ONNX Runtime would also follow it)."""
    import onnx
    from onnx import TensorProto, helper

    def external(name, location):
        tensor = helper.make_tensor(name, TensorProto.FLOAT, [4], [0.0] * 4)
        tensor.ClearField("float_data")
        for key, value in (("location", location), ("offset", "0"), ("length", "16")):
            tensor.external_data.add(key=key, value=value)
        tensor.data_location = TensorProto.EXTERNAL
        return tensor

    nodes = [helper.make_node("Add", ["x", f"w{i}"], [f"y{i}"]) for i in range(len(locations))]
    if subgraph_location is not None:
        branch = helper.make_graph([helper.make_node("Identity", ["b"], ["z"])], "branch", [],
                                   [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4])],
                                   [external("b", subgraph_location)])
        nodes.append(helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [4])
                               for i in range(len(locations))],
                              [external(f"w{i}", location) for i, location in enumerate(locations)])
    onnx.save(helper.make_model(graph), folder / "model.onnx")


def write_onnx_artifact(store, locations, subgraph_location=None, data_files=("weights.bin",)):
    with artifacts.ArtifactWriter(store, "export", "abc123def456", None, {}) as writer:
        onnx_with_external_data(writer.dir, locations, subgraph_location)
        for name in data_files:
            (writer.dir / name).write_bytes(bytes(16))
        return writer.commit(io=IO)


def test_external_data_inside_the_folder_loads(tmp_path):
    art = write_onnx_artifact(tmp_path, ["weights.bin", "./weights.bin"], subgraph_location="weights.bin")
    assert artifacts.load(art.path).id == "abc123def456"


def test_external_data_locations_are_read_from_every_tensor_like_onnx_does(tmp_path):
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    from runtime.onnx_external import external_data_locations

    onnx_with_external_data(tmp_path, ["a.bin", "../b.bin"], subgraph_location="/c.bin")
    model = onnx.load(tmp_path / "model.onnx", load_external_data=False)
    expected = [entry.value for tensor in _get_all_tensors(model) for entry in tensor.external_data
                if entry.key == "location"]
    assert sorted(external_data_locations(tmp_path / "model.onnx")) == sorted(expected)
    assert sorted(expected) == ["../b.bin", "/c.bin", "/c.bin", "a.bin"]  # the If's two branches: /c.bin twice


@pytest.mark.parametrize("where", ["initializer", "subgraph"])
@pytest.mark.parametrize("location, problem", [
    ("/etc/hostname", "an absolute path"), ("../../../../etc/hostname", "a path through '..'"),
    ("escape.bin", "a symlink leading out"), ("unlisted.bin", "not listed in the manifest"),
])
def test_external_data_outside_the_folder_is_refused_before_reading(tmp_path, reads, where, location, problem):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(bytes(16))
    locations, subgraph = (["weights.bin", location], None) if where == "initializer" else (["weights.bin"], location)
    art = write_onnx_artifact(tmp_path / "store", locations, subgraph)
    if location == "escape.bin":
        (art.path / "escape.bin").symlink_to(outside)
    if location == "unlisted.bin":
        (art.path / "unlisted.bin").write_bytes(bytes(16))
    reads.clear()
    with pytest.raises(ArtifactError) as refused:
        artifacts.load(art.path)
    message = str(refused.value)
    assert "model.onnx" in message and repr(location) in message and problem in message and "\n" not in message
    assert reads == []


# Working folders and locks: owned through OS-level locks, so a dead owner's are found whatever its pid was.

HOLD_AND_WAIT = """
import sys, time
from pathlib import Path
from runtime import artifact as artifacts
with artifacts.{what} as held:
    print(held, flush=True)
    time.sleep(600)
"""


def hold_in_child(what):
    """A child process holding `what` (a context manager of runtime.artifact) until it is killed."""
    child = subprocess.Popen([sys.executable, "-c", HOLD_AND_WAIT.format(what=what)], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    return child, child.stdout.readline().strip()


def test_working_folder_of_a_live_owner_is_kept_and_of_a_killed_one_removed(tmp_path):
    child, held = hold_in_child(f"working_folder({str(tmp_path)!r}, 'calibrate')")
    try:
        folder = Path(held)
        (folder / "half.onnx").write_bytes(b"x")
        with artifacts.working_folder(tmp_path, "engine") as mine:
            artifacts.remove_stale_temporaries(tmp_path)
            assert folder.is_dir() and mine.is_dir()  # both owners alive: nothing removed
            child.kill()
            child.wait()
            assert folder.is_dir()  # a kill -9 leaves it behind ...
            artifacts.remove_stale_temporaries(tmp_path)
            assert not folder.exists() and mine.is_dir()  # ... and the next cleanup removes only that one
        assert sorted(p.name for p in tmp_path.iterdir()) == []
    finally:
        child.kill()


def test_artifact_lock_waits_for_its_holder_and_a_killed_holder_blocks_nobody(tmp_path):
    child, _ = hold_in_child(f"building({str(tmp_path)!r}, 'export', 'abc123def456')")
    waited = []
    try:

        def build_the_same_artifact():
            with artifacts.building(tmp_path, "export", "abc123def456", waited.append):
                pass

        waiter = threading.Thread(target=build_the_same_artifact)
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive() and "waiting for another build" in waited[0]
        child.kill()  # kill -9: no cleanup runs in the holder
        waiter.join(timeout=10)
        assert not waiter.is_alive(), "the lock of a killed build still blocks"
    finally:
        child.kill()
