"""Stage identities: an artifact id covers the code its stage runs and the settings that change its output,
and nothing else, so a CI cache keyed on ids survives edits elsewhere."""

import shutil
from dataclasses import replace

import pytest
from conftest import REPO

from calibration import calibrate
from export import build, prune
from runtime import artifact as artifacts


def relative(files):
    return {str(f.relative_to(REPO)) for f in files}


def test_the_export_runs_its_own_modules_and_their_imports_but_not_the_server():
    files = relative(artifacts.source_closure(build.EXPORT.modules))
    assert {"export/onnx_export.py", "export/models.py", "runtime/artifact.py", "export/__init__.py"} <= files
    assert not files & {"runtime/serve.py", "runtime/service.py", "export/build.py", "calibration/calibrate.py"}


def test_the_engine_stage_covers_the_fusion_it_imports():
    assert "export/graph/attention.py" in relative(artifacts.source_closure(build.ENGINES["ort"].modules))


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("source")
    for package in artifacts.SOURCE_PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.mark.parametrize("edited, changes_export", [
    ("runtime/serve.py", False),
    ("runtime/ray_serve.py", False),
    ("export/onnx_export.py", True),
    ("runtime/artifact.py", True),  # the export imports it
])
def test_editing_a_file_changes_the_export_digest_only_if_the_export_runs_it(source_copy, edited, changes_export):
    before = artifacts.source_digest(build.EXPORT.modules, root=source_copy)
    file = source_copy / edited
    original = file.read_text()
    try:
        file.write_text(original + "\n# an edit\n")
        after = artifacts.source_digest(build.EXPORT.modules, root=source_copy)
    finally:
        file.write_text(original)
    assert (after != before) == changes_export


@pytest.mark.parametrize("stage, stage_config", [
    (build.PRUNE, lambda threads: prune.stage_config(prune.PruneConfig(threads=threads))),
    (build.CALIBRATE, lambda threads: calibrate.stage_config(replace(calibrate.CalibrationConfig(), threads=threads))),
])
def test_threads_stay_out_of_every_stage_id_alike(stage, stage_config):
    one, two = (build.stage_id(stage, "parent", stage_config(threads))[0] for threads in (1, 2))
    assert one == two
    assert "threads" in stage_config(1)  # still recorded in the manifest's config


def test_a_setting_that_changes_the_output_changes_the_id():
    ids = {build.stage_id(build.PRUNE, "parent", prune.stage_config(prune.PruneConfig(ratios=ratios)))[0]
           for ratios in ((("mlp", 0.25),), (("mlp", 0.5),))}
    assert len(ids) == 2
