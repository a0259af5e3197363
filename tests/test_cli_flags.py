"""The build's command line: every flag explains itself, and every bad value is refused before any work."""

import pytest

from export import build
from runtime.errors import EXIT_BAD_INPUT, EXIT_UNEXPECTED, BadInputError, LmforgeError


def test_every_flag_has_help():
    options = [action for action in build.build_parser()._actions if action.option_strings]
    undocumented = [action.option_strings[0] for action in options if not (action.help or "").strip()]
    assert len(options) >= 35 and undocumented == []


@pytest.mark.parametrize("flags, named", [
    (["--max-ppl-increase", "-1"], "--max-ppl-increase"),
    (["--max-float-fraction", "2"], "--max-float-fraction"),
    (["--threads", "0"], "--threads"),
    (["--threads", "two"], "--threads"),
    (["--backend", "tpu"], "--backend"),
    (["--calib-method", "guess"], "--calib-method"),
    (["--provider", "rocm"], "--provider"),
    (["--prune-budget", "0"], "--prune-budget"),
    (["--prune-samples", "2"], "--prune-samples"),
    (["--bench-gen", "1"], "--bench-gen"),
    (["--workspace-gb", "0"], "--workspace-gb"),
    (["--calib-seq-len", "1"], "--calib-seq-len"),
    (["--calib-seq-len", "4"], "--calib-seq-len"),  # refused by the data's own rule, not after the export
    (["--max-seq", "4"], "--max-seq"),
    (["--opt-seq", "4096"], "--opt-seq"),
    (["--prune-plan", "/no/such/plan.json"], "--prune-plan"),
    (["--prune", "mlp=2"], "--prune"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_a_bad_flag_value_is_one_line_naming_the_flag_and_exit_2(tmp_path, capsys, flags, named):
    assert build.main([*flags, "--out", str(tmp_path / "store")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and named in err and "\n" not in err
    assert not (tmp_path / "store").exists()  # refused before anything was made


def test_a_wrong_calibration_file_is_found_before_the_export_runs(tmp_path, capsys):
    store = tmp_path / "store"
    code = build.main(["--precision", "int8", "--calib-data", str(tmp_path / "missing.txt"), "--out", str(store),
                       "--bench-runs", "0"])
    assert code == EXIT_BAD_INPUT and "missing.txt does not exist" in capsys.readouterr().err
    assert not [p for p in store.iterdir() if p.name.startswith("export-")]


def test_only_bad_input_exits_2():
    assert BadInputError("x").exit_code == EXIT_BAD_INPUT
    assert LmforgeError("TensorRT could not build the engine").exit_code == EXIT_UNEXPECTED
