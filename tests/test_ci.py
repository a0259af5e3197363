"""The CI job: the workflow parses and calls only our real commands, and the shell entry point builds,
verifies, measures and reports on CPU (tiny model) with the documented exit codes."""

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml
from conftest import REPO

WORKFLOW = REPO / "ci" / "github-workflow.yml"
ENTRY = REPO / "ci" / "build.sh"


def test_workflow_parses_and_names_real_commands():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    jobs = workflow["jobs"]
    assert set(jobs) == {"cpu", "gpu"} and jobs["gpu"]["needs"] == "cpu"
    assert "self-hosted" in jobs["gpu"]["runs-on"] and "gpu" in jobs["gpu"]["runs-on"]
    runs = [step["run"] for job in jobs.values() for step in job["steps"] if "run" in step]
    assert any("ci/build.sh" in r and "--backend trt" in r for r in runs)
    for command in runs:
        for script in re.findall(r"(ci/[\w.-]+\.sh)", command):
            assert os.access(REPO / script, os.X_OK), f"{script} is not an executable file"
    cache = next(s for s in jobs["cpu"]["steps"] if s.get("uses", "").startswith("actions/cache"))
    assert cache["with"]["path"] == "artifacts" and "hashFiles(" in cache["with"]["key"]
    assert "python -m export.build" in ENTRY.read_text()


def zizmor_findings(workflow, min_severity="medium"):
    """zizmor's findings (JSON) on one workflow file: offline (no GitHub API), and without any config file
    that could silence an audit."""
    zizmor = shutil.which("zizmor")
    if zizmor is None:
        pytest.skip("zizmor is not installed (pip install -e '.[dev]')")
    result = subprocess.run([zizmor, "--offline", "--no-config", "--format", "json", "--min-severity", min_severity,
                             str(workflow)], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip(), f"zizmor gave no JSON (exit {result.returncode}): {result.stderr[-500:]}"
    return json.loads(result.stdout)


def test_workflow_passes_the_zizmor_audit():
    findings = zizmor_findings(WORKFLOW)
    assert findings == [], "; ".join(f"{f['ident']} ({f['determinations']['severity']}): "
                                     f"{f['locations'][0]['concrete']['feature']}" for f in findings)


def test_zizmor_audit_catches_an_input_expanded_into_a_script(tmp_path):
    """The audit above is live: the same workflow with one input expanded straight into `run:` fails it."""
    text = WORKFLOW.read_text()
    injected = text.replace('run: ci/build.sh "$MODEL" "$PRECISIONS"',
                            'run: ci/build.sh "${{ inputs.model }}" "$PRECISIONS"')
    assert injected != text
    (tmp_path / "workflow.yml").write_text(injected)
    assert "template-injection" in {f["ident"] for f in zizmor_findings(tmp_path / "workflow.yml")}


def test_gpu_job_is_opt_in_checks_the_gpu_first_and_scripts_see_inputs_only_through_env():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    gpu = workflow["jobs"]["gpu"]
    assert "inputs.gpu" in gpu["if"], "without an opt-in the job waits forever where no GPU runner exists"
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as a boolean
    assert triggers["workflow_dispatch"]["inputs"]["gpu"]["default"] is False
    runs = [step.get("run", "") for step in gpu["steps"]]
    check = runs.index("ci/gpu-check.sh")
    assert check < next(i for i, run in enumerate(runs) if "ci/build.sh" in run)
    for job in workflow["jobs"].values():
        assert job["permissions"] == {"contents": "read"}
        for step in job["steps"]:
            assert "${{" not in step.get("run", ""), step["run"]
            if step.get("uses", "").startswith("actions/checkout"):
                assert step["with"]["persist-credentials"] is False


def run_entry(*args):
    return subprocess.run([str(ENTRY), *args], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=os.environ | {"PYTHONPATH": str(REPO)})


def test_entry_point_builds_a_precision_matrix_with_its_report(tiny_model_factory, tmp_path):
    store = tmp_path / "store"
    result = run_entry(str(tiny_model_factory("llama")), "fp32,int8", str(store), "--threads", "1",
                       "--calib-samples", "4", "--calib-seq-len", "32", "--eval-samples", "2",
                       "--max-ppl-increase", "50", "--max-float-fraction", "0.5", "--bench-runs", "1",
                       "--keep-fp", "lm_head")
    assert result.returncode == 0, result.stderr
    report = json.loads((store / "report.json").read_text())
    assert report["schema_version"] == 2
    assert [e["precision"] for e in report["engines"]] == ["fp32", "int8"]
    for engine in report["engines"]:
        (accuracy,) = engine["accuracy"]
        assert engine["latency"]["tpot_ms"]["p50"] > 0 and accuracy["top1_agreement"] > 0
        assert accuracy["perplexity_increase_percent"] <= 50 and accuracy["stage"] == "engine"
    # Every stage's records, in the one shape: export parity, calibration's gate, the two engines' verification.
    gates = [(s["stage"], [r["against"] for r in s["accuracy"]]) for s in report["stages"]]
    assert gates == [("export", ["pytorch"]), ("engine", ["fp32"]), ("calibrate", ["fp32"]), ("engine", ["fp32"])]
    assert report["engines"][1]["kept_in_float"][0] == "lm_head"
    markdown = (store / "report.md").read_text()
    assert "| int8 |" in markdown and "Kept in float (int8): `lm_head`" in markdown
    assert ("matplotlib is not installed" in markdown) == isinstance(report["plots"], str)


@pytest.mark.parametrize("args, code, message", [
    (["/nonexistent/model", "fp32"], 2, "/nonexistent/model"),
    (["default", "fp32,int3"], 2, "unknown precision int3"),
])
def test_entry_point_bad_input_has_the_documented_exit_code(tmp_path, args, code, message):
    result = run_entry(*args, str(tmp_path / "store"))
    assert result.returncode == code
    assert message in result.stderr.strip().splitlines()[-1]


def test_report_path_that_is_a_file_exits_2(tiny_model_factory, tmp_path):
    (tmp_path / "taken").write_text("")
    result = run_entry(str(tiny_model_factory("llama")), "fp32", str(tmp_path / "store"),
                       "--report", str(tmp_path / "taken"))
    assert result.returncode == 2 and "--report" in result.stderr.strip().splitlines()[-1]


def test_figure_scripts_are_executable_bash_naming_real_modules():
    import importlib.util

    scripts = sorted((REPO / "ci").glob("figures-*.sh"))
    assert {s.name for s in scripts} >= {"figures-engines.sh", "figures-pruning.sh", "figures-serving.sh"}
    for script in scripts:
        assert os.access(script, os.X_OK), f"{script} is not executable"
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
        for module in re.findall(r"python -m ([\w.]+)", script.read_text()):
            assert importlib.util.find_spec(module) is not None, f"{script.name} runs a missing module {module}"
