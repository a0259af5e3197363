"""The composite action a user's repository calls (`uses: <org>/lmforge/ci@<sha>`): it parses, passes the zizmor
audit, and its steps' scripts, run here as the runner would run them, build the tiny model and write the job
summary."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml
from conftest import REPO

ACTION = REPO / "ci" / "action.yml"
FULL_SHA = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")
EXPRESSION = re.compile(r"\$\{\{\s*([^}]+?)\s*\}\}")


def action() -> dict:
    return yaml.safe_load(ACTION.read_text())


def test_action_is_a_composite_whose_scripts_see_inputs_only_through_env():
    spec = action()
    assert spec["runs"]["using"] == "composite"
    assert {"model", "precisions"} <= set(spec["inputs"])
    steps = spec["runs"]["steps"]
    for step in steps:
        if "run" in step:
            assert "${{" not in step["run"], f"an expression inside a script: {step['run']}"
            assert step["shell"] == "bash"
            for script in re.findall(r"\$GITHUB_ACTION_PATH/([\w.-]+)", step["run"]):
                assert os.access(REPO / "ci" / script, os.X_OK), f"ci/{script} is not an executable file"
        else:
            assert FULL_SHA.match(step["uses"]), f"{step['uses']} is not pinned to a full commit sha"
    uses = [s["uses"].split("@")[0] for s in steps if "uses" in s]
    needed = {"actions/setup-python", "actions/cache/restore", "actions/cache/save", "actions/upload-artifact"}
    assert needed <= set(uses)
    for line in ACTION.read_text().splitlines():  # the release each pin stands for, to update both together
        if re.search(r"uses: \S+@[0-9a-f]{40}", line):
            assert re.search(r"#\s*v\d+(\.\d+)*\s*$", line), line
    names = [s.get("id") or s.get("uses", "").split("@")[0] for s in steps]
    assert names.index("install") < names.index("actions/cache/restore") < names.index("build")


def zizmor_findings(path):
    zizmor = shutil.which("zizmor")
    if zizmor is None:
        pytest.skip("zizmor is not installed (pip install zizmor)")
    result = subprocess.run([zizmor, "--offline", "--no-config", "--format", "json", "--min-severity", "medium",
                             str(path)], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip(), f"zizmor gave no JSON (exit {result.returncode}): {result.stderr[-500:]}"
    return json.loads(result.stdout)


def test_action_passes_the_zizmor_audit_which_would_catch_an_input_in_a_script(tmp_path):
    assert zizmor_findings(ACTION) == []
    injected = ACTION.read_text().replace("""run: '"$GITHUB_ACTION_PATH/action.sh" build'""",
                                          """run: '"$GITHUB_ACTION_PATH/action.sh" build "${{ inputs.model }}"'""")
    unpinned = re.sub(r"@[0-9a-f]{40}", "@v5", ACTION.read_text(), count=1)
    for name, text in (("injected", injected), ("unpinned", unpinned)):
        assert text != ACTION.read_text()
        (tmp_path / name).mkdir()
        (tmp_path / name / "action.yml").write_text(text)
    assert "template-injection" in {f["ident"] for f in zizmor_findings(tmp_path / "injected" / "action.yml")}
    assert "unpinned-uses" in {f["ident"] for f in zizmor_findings(tmp_path / "unpinned" / "action.yml")}


def expand(value: str, inputs: dict[str, str], context: dict[str, str]) -> str:
    """The runner's expression substitution for the few expressions the action's env uses."""
    def one(match: re.Match) -> str:
        name = match[1]
        if name.startswith("inputs."):
            return inputs[name.removeprefix("inputs.")]
        return context[name]

    return EXPRESSION.sub(one, str(value))


def run_steps(tmp_path, given: dict[str, str]) -> tuple[list[subprocess.CompletedProcess], dict[str, str]]:
    """Each `run:` step as GitHub runs it (bash -eo pipefail, the step's env with expressions expanded, the
    action's folder in GITHUB_ACTION_PATH); the install step in dry-run mode, since it would reinstall lmforge."""
    spec = action()
    inputs = {name: str(entry.get("default", "")) for name, entry in spec["inputs"].items()} | given
    files = {"GITHUB_STEP_SUMMARY": tmp_path / "summary.md", "GITHUB_OUTPUT": tmp_path / "output.txt"}
    base = os.environ | {"GITHUB_ACTION_PATH": str(REPO / "ci"), "LMFORGE_DRY_RUN": "1",
                         "PYTHONPATH": str(REPO)} | {k: str(v) for k, v in files.items()}
    results, env = [], {}
    for step in spec["runs"]["steps"]:
        if "run" not in step:
            continue
        env = {k: expand(v, inputs, {}) for k, v in step.get("env", {}).items()}
        results.append(subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
                                      cwd=tmp_path, env=base | env, capture_output=True, text=True, timeout=600))
    return results, {k: p.read_text() if p.exists() else "" for k, p in files.items()}


def test_action_steps_build_the_tiny_model_and_summarise_its_report(chat_export, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(chat_export.path.parent, store)  # a restored cache: finished stages are reused
    export = json.loads(next(store.glob("export-*/manifest.json")).read_text())
    (install, build, summary), files = run_steps(tmp_path, {
        "model": export["config"]["model"], "precisions": "fp32", "store": str(store),
        "build-args": "--bench-runs 1 --bench-prompt 8 --bench-gen 4"})
    assert install.returncode == 0, install.stderr
    assert str(REPO) in install.stdout and "torch==" in install.stdout  # lmforge from the pinned checkout
    assert build.returncode == 0, build.stderr
    assert summary.returncode == 0, summary.stderr
    report = json.loads((store / "report.json").read_text())
    (engine,) = report["engines"]
    assert f"| fp32 | `{engine['engine_id']}` |" in files["GITHUB_STEP_SUMMARY"]
    assert f"{engine['latency']['tpot_ms']['p50']:.2f}" in files["GITHUB_STEP_SUMMARY"]
    assert f"report={store}/report.md" in files["GITHUB_OUTPUT"]


def test_action_passes_a_hostile_model_name_as_data(tmp_path):
    hostile = 'x"; touch pwned; echo "'
    (_, build, summary), files = run_steps(tmp_path, {"model": hostile, "store": str(tmp_path / "store")})
    assert build.returncode == 2 and hostile in build.stderr  # refused as a model that does not exist
    assert not (tmp_path / "pwned").exists()
    assert summary.returncode == 0 and "No report" in files["GITHUB_STEP_SUMMARY"]
