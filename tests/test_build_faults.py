"""Builds that are killed, interrupted or run side by side on one store, for real: subprocesses of
`python -m export.build` on a tiny model, signalled mid-stage."""

import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

from runtime import artifact as artifacts

# Small calibration and no latency runs: the stages still run in full, on little data.
FAST = ["--threads", "1", "--calib-samples", "4", "--calib-seq-len", "32", "--eval-samples", "2",
        "--max-ppl-increase", "50", "--max-float-fraction", "0.5", "--keep-fp", "lm_head", "--bench-runs", "0"]


def start_build(model, store, precision, log):
    """A build in its own process, its progress (stderr) and summary (stdout) going to `log`."""
    return subprocess.Popen([sys.executable, "-m", "export.build", "--model", str(model), "--precision", precision,
                             "--out", str(store), *FAST], cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)


def leftovers(store):
    """Everything a build leaves that is not a finished artifact, its report, or its (empty) lock files."""
    return sorted(p.name for p in store.iterdir() if p.name.startswith(artifacts.WORKING_PREFIXES))


def wait_for_working_folder(build, store, stage, log, timeout=120):
    """Block until `stage` has a working folder in the store, i.e. the build is in the middle of it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(store.glob(f"{artifacts.WORK_PREFIX}{stage}-*")):
            return
        assert build.poll() is None, f"the build ended (exit {build.returncode}) before {stage}: {log.read_text()}"
        time.sleep(0.005)
    pytest.fail(f"no {stage} working folder within {timeout}s")


@pytest.fixture(scope="module")
def two_builds(tiny_model_factory, tmp_path_factory):
    """Two fp32 builds started together on one empty store: (store, exit codes, outputs, store listing after)."""
    folder = tmp_path_factory.mktemp("shared")
    store, logs = folder / "store", [folder / "first.log", folder / "second.log"]
    builds = [start_build(tiny_model_factory("llama"), store, "fp32", log) for log in logs]
    try:
        codes = [build.wait(timeout=300) for build in builds]
    finally:
        for build in builds:
            build.kill()
    return store, codes, [log.read_text() for log in logs], sorted(p.name for p in store.iterdir())


def test_two_builds_sharing_a_store_run_each_stage_once_and_both_succeed(two_builds):
    store, codes, outputs, listing = two_builds
    assert codes == [0, 0], outputs
    for stage in ("export", "engine"):
        made = [out.count(f"[{stage}] done in") for out in outputs]
        reused = [out.count(f"[{stage}] reusing") for out in outputs]
        assert sorted(made) == [0, 1] and sorted(reused) == [0, 1], (stage, made, reused)
        assert len([name for name in listing if name.startswith(f"{stage}-")]) == 1
    # Started together, the second reached the export while the first was making it: it waited, not redid it.
    assert any("[export] waiting for another build" in out for out in outputs)
    assert not [name for name in listing if name.startswith(artifacts.WORKING_PREFIXES)]


def test_interrupted_and_killed_builds_leave_nothing_behind(two_builds, tiny_model_factory, tmp_path, capsys):
    """SIGTERM mid-stage: the build removes its own working folders and exits 143. kill -9 mid-stage: the
    folders stay, and the next build removes them. (The store holds the export already: only int8's
    calibration and engine are new.)"""
    from export.build import main

    store, model = two_builds[0], tiny_model_factory("llama")
    terminated = start_build(model, store, "int8", tmp_path / "terminated.log")
    try:
        wait_for_working_folder(terminated, store, "calibrate", tmp_path / "terminated.log")
        terminated.send_signal(signal.SIGTERM)
        assert terminated.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        terminated.kill()
    assert "interrupted (SIGTERM)" in (tmp_path / "terminated.log").read_text().strip().splitlines()[-1]
    assert leftovers(store) == [] and not list(store.glob("calibrate-*"))

    killed = start_build(model, store, "int8", tmp_path / "killed.log")
    try:
        wait_for_working_folder(killed, store, "calibrate", tmp_path / "killed.log")
        killed.kill()  # SIGKILL: no handler, no finally, nothing of the build's own cleanup runs
        killed.wait(timeout=60)
    finally:
        killed.kill()
    left = leftovers(store)
    assert [n for n in left if n.startswith(".work-calibrate-") and not n.endswith(artifacts.OWNER_SUFFIX)], left
    assert [n for n in left if n.startswith(".tmp-calibrate-") and not n.endswith(artifacts.OWNER_SUFFIX)], left

    assert main(["--model", str(model), "--precision", "int8", "--out", str(store), *FAST]) == 0
    assert "[calibrate] done in" in capsys.readouterr().err
    assert leftovers(store) == []
