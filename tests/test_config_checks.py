"""Stage configs check their own values (whoever builds them), and the build's flags are parsed by the same rules,
so the command line and the configs refuse the same values in the same words, before any stage runs."""

import argparse
import math
from dataclasses import fields

import pytest

from calibration.calibrate import CalibrationConfig
from engines.ort import EngineConfig
from engines.trt import TrtConfig
from export import build
from export.distill import DistillConfig
from export.graph.data import DataConfig
from export.onnx_export import ExportConfig
from export.prune import PruneConfig
from runtime.errors import EXIT_BAD_INPUT, BadInputError
from runtime.ranges import RANGE, Range

CONFIGS = (build.BuildConfig, EngineConfig, TrtConfig, CalibrationConfig, DataConfig, PruneConfig, DistillConfig,
           ExportConfig)


@pytest.mark.parametrize("make, message", [
    (lambda: EngineConfig(threads=0), "--threads 0 is too small; give 1 or more"),
    (lambda: EngineConfig(provider="tpu"), "--provider 'tpu' is unknown; choose one of: cpu"),
    (lambda: CalibrationConfig(max_ppl_increase=-1), "--max-ppl-increase -1 is too small; give 0 or more"),
    (lambda: CalibrationConfig(max_float_fraction=2), "--max-float-fraction 2 is too large; give 1 or less"),
    (lambda: CalibrationConfig(max_ppl_increase=math.nan), "--max-ppl-increase nan is not a number"),
    (lambda: CalibrationConfig(method="guess"), "--calib-method 'guess' is unknown"),
    (lambda: CalibrationConfig(precision="int3"), "calibration precision 'int3' unknown"),
    (lambda: DataConfig(seq_len=4), "--calib-seq-len 4 is too small; give 8 or more"),
    (lambda: PruneConfig(budget=0), "--prune-budget 0 must be greater than 0"),
    (lambda: PruneConfig(ratios=(("mlp", 1.2),)), r"--prune mlp=1.2: a ratio must be in \[0, 1\)"),
    (lambda: PruneConfig(ratios=(("depth", 2.0),)), "--prune depth=2: write kind=value with kind one of"),
    (lambda: PruneConfig(ratios=(("layers", 1.5),)), "--prune layers=1.5: give a whole number"),
    (lambda: PruneConfig(ratios=(("mlp", 0.1),), budget=5), "--prune and --prune-budget both choose"),
    (lambda: PruneConfig(plan_file="/no/such/plan.json"), "--prune-plan /no/such/plan.json does not exist"),
    (lambda: PruneConfig(data=DataConfig(samples=8)), "--prune-samples 8 is too small; give 9 or more"),
    (lambda: DistillConfig(steps=-1), "--distill-steps -1 is too small"),
    (lambda: DistillConfig(learning_rate=0), "--distill-learning-rate 0 must be greater than 0"),
    (lambda: TrtConfig(max_seq=64, opt_seq=128), "--opt-seq 128 is outside 1 to --max-seq"),
    (lambda: ExportConfig(parity_greedy_tokens=0), "parity_greedy_tokens 0 is too small; give 1 or more"),
    (lambda: build.BuildConfig(precisions=("int3",)), "unknown precision int3"),
    (lambda: build.BuildConfig(precisions=()), "unknown precision"),
    (lambda: build.BuildConfig(bench_gen=1), "--bench-gen 1 is too small; give 2 or more"),
    (lambda: build.BuildConfig(backend="tpu"), "--backend 'tpu' is unknown; choose one of: auto, ort, trt"),
    (lambda: build.BuildConfig(distillation=DistillConfig(steps=5)), "--distill-steps heals a pruned model"),
])
def test_a_config_refuses_a_bad_value_in_one_line_naming_the_flag(make, message):
    with pytest.raises(BadInputError, match=message) as caught:
        make()
    assert "\n" not in str(caught.value)


def test_the_defaults_are_valid():
    for config in CONFIGS:
        config()


def ranged_fields():
    """(config class, field name, its Range) for every field that declares one."""
    return [(config, item.name, item.metadata[RANGE]) for config in CONFIGS for item in fields(config)
            if RANGE in item.metadata]


def out_of_range(rule: Range) -> float:
    return rule.high + 1 if math.isfinite(rule.high) else (rule.low if rule.low_open else rule.low - 1)


def test_every_ranged_flag_is_refused_by_argparse_in_the_words_of_its_config(tmp_path, capsys):
    flags = {option for action in build.build_parser()._actions for option in action.option_strings}
    checked = 0
    for config, name, rule in ranged_fields():
        if rule.flag not in flags or config is DistillConfig and name == "max_increase":  # set by --prune-budget
            continue
        value = out_of_range(rule)
        text = f"{value:g}"
        problem = rule.problem(value)
        assert build.main([rule.flag, text, "--out", str(tmp_path / "store")]) == EXIT_BAD_INPUT
        assert f"argument {rule.flag}: {text} {problem}" in capsys.readouterr().err
        with pytest.raises(BadInputError, match=f"{rule.flag} {text} {problem}"):
            config(**{name: value})
        checked += 1
    assert checked >= 12 and not (tmp_path / "store").exists()


def test_the_distillation_flags_reach_its_config(tmp_path):
    config = build.parse_args(["--prune", "mlp=0.25", "--distill-steps", "4", "--distill-learning-rate", "3e-4",
                               "--distill-batch", "1", "--distill-seq-len", "256", "--distill-samples", "300",
                               "--out", str(tmp_path)])
    settings = config.distillation
    assert (settings.steps, settings.learning_rate, settings.batch, settings.seq_len, settings.samples) == (
        4, 3e-4, 1, 256, 300)
    assert build.parse_args(["--out", str(tmp_path)]).distillation == DistillConfig()


def test_a_range_parses_a_flag_as_argparse_expects():
    parse = Range("--n", low=1).parser(int)
    assert parse("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match="'x' is not an integer"):
        parse("x")
    with pytest.raises(argparse.ArgumentTypeError, match="0 is too small; give 1 or more"):
        parse("0")
    assert Range("--f", low=0, high=1).parser(float)("0.5") == 0.5
