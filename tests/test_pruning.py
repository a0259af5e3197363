"""Structured pruning on tiny models: the passes keep the ONNX contract, equal the same plan applied to the
PyTorch modules, the planner respects its limits, repair helps, and bad plans are clear errors."""

import json

import numpy as np
import onnx_ir as ir
import pytest
import torch
from conftest import run_cli

from export.distill import prune_module
from export.graph.pruning import PrunePlan, PruningError, find_blocks
from export.models import load_model, resolve
from export.prune import apply_plan, pruned_facts
from runtime.baselines import plain_session
from runtime.contract import prefill_feeds
from runtime.errors import BadInputError

PLAN = PrunePlan(mlp_channels={0: list(range(0, 128, 2))}, kv_groups={1: [1]}, dropped_layers=[])


def graph_logits(model: ir.Model, facts: dict, ids: np.ndarray, tmp_path) -> np.ndarray:
    ir.save(model, tmp_path / "pruned.onnx")
    return plain_session(tmp_path / "pruned.onnx", 1).run(["logits"], prefill_feeds(ids, facts))[0]


def pruned_graph(export, plan, tmp_path, ids):
    model = ir.load(str(export.file("model.onnx")))
    apply_plan(model, plan, export.model_facts)
    facts = pruned_facts(export.model_facts, plan, model)
    return model, facts, graph_logits(model, facts, ids, tmp_path)


@pytest.mark.parametrize("plan", [
    PLAN,
    PrunePlan(dropped_layers=[0]),
    PrunePlan(mlp_channels={1: list(range(64))}, kv_groups={0: [0]}, dropped_layers=[1]),
], ids=["mlp+heads", "drop-first", "all-three"])
def test_graph_passes_equal_the_plan_on_the_pytorch_model(tiny_model_factory, export_factory, tmp_path, plan):
    folder = tiny_model_factory("llama")
    ids = np.random.default_rng(0).integers(3, 128, size=(2, 12))
    model, facts, got = pruned_graph(export_factory("llama"), plan, tmp_path, ids)
    with torch.no_grad():
        expected = prune_module(load_model(resolve(str(folder))), plan)(input_ids=torch.as_tensor(ids)).logits
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)
    assert facts["layers"] == 2 - len(plan.dropped_layers) and "lm_head" in facts["linear_layers"]
    names = [v.name for v in model.graph.inputs]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values.{i}.{k}" for i in range(facts["layers"]) for k in ("key", "value")]


def test_pruned_graph_decodes_through_the_runtime_with_per_layer_heads(export_factory, tmp_path):
    import runtime
    from runtime.session import SessionOptions

    result = run_cli("export.build", "--model", str(export_factory("llama").manifest["config"]["model"]),
                     "--out", str(tmp_path), "--prune", "heads=0.25", "--threads", "1")
    assert result.returncode == 0, result.stderr
    pruned = next(tmp_path.glob("prune-*"))
    manifest = json.loads((pruned / "manifest.json").read_text())
    assert sorted(manifest["io"]["model"]["layer_kv_heads"]) == [1, 2]
    assert manifest["metrics"]["parameters_after"] < manifest["metrics"]["parameters_before"]
    session = runtime.open(pruned, SessionOptions(threads=1))
    logits = session.prefill(np.array([[5, 6, 7, 8]]))
    assert np.isfinite(session.decode(np.array([int(logits[0, -1].argmax())]))).all()
    engine = json.loads(next(tmp_path.glob("engine-*/manifest.json")).read_text())
    assert engine["metrics"]["fusion"]["attention"] == "fused"


def test_repair_reduces_the_output_error(export_factory, tmp_path):
    from export.prune import LayerEnergy, measure, remember_weights, repair

    export = export_factory("llama")
    windows = np.random.default_rng(1).integers(3, 128, size=(8, 32))
    source = export.file("model.onnx")
    energies = measure(source, find_blocks(ir.load(str(source)).graph), windows, export.model_facts, 1)
    assert all(isinstance(e, LayerEnergy) and e.mlp_gram.shape == (128, 128) for e in energies.values())
    plan = PrunePlan(mlp_channels={0: list(range(64)), 1: list(range(64))})
    reference = plain_session(source, 1).run(["logits"], prefill_feeds(windows[:2], export.model_facts))[0]
    errors = []
    for do_repair in (False, True):
        model = ir.load(str(source))
        if do_repair:
            remember_weights(model, plan)
        apply_plan(model, plan, export.model_facts)
        if do_repair:
            assert repair(model, plan, energies, export.model_facts) == 2
        errors.append(np.abs(graph_logits(model, export.model_facts, windows[:2], tmp_path) - reference).mean())
    assert errors[1] < 0.8 * errors[0]


def test_masked_graph_scores_a_removal_as_the_pruned_graph_does(export_factory, tmp_path):
    from export.prune import Unit
    from export.sensitivity import MaskedModel
    from runtime.accuracy import evaluate_model

    export = export_factory("llama")
    windows = np.random.default_rng(2).integers(3, 128, size=(2, 16))
    source, facts = export.file("model.onnx"), export.model_facts
    chosen = [Unit("mlp", 0, tuple(range(0, 128, 2)), 0.0, 0), Unit("heads", 1, (0,), 0.0, 0),
              Unit("layers", 1, (1,), 0.0, 0)]
    masked = MaskedModel(source, facts, tmp_path / "masked.onnx", 1)
    assert masked.evaluate([], windows).perplexity == pytest.approx(
        evaluate_model(source, facts, windows, 1).perplexity, rel=1e-5)
    for units, plan in ((chosen[:2], PrunePlan(mlp_channels={0: list(range(1, 128, 2))}, kv_groups={1: [1]})),
                        (chosen, PrunePlan(mlp_channels={0: list(range(1, 128, 2))}, dropped_layers=[1]))):
        model, pruned, _ = pruned_graph(export, plan, tmp_path, windows[:1])
        ir.save(model, tmp_path / "pruned.onnx")
        expected = evaluate_model(tmp_path / "pruned.onnx", pruned, windows, 1)
        assert masked.evaluate(units, windows).perplexity == pytest.approx(expected.perplexity, rel=1e-4)


def test_budget_search_skips_units_that_break_the_budget():
    from export.prune import MAX_EVALUATIONS, Unit, grow_within_budget, largest_fitting_prefix

    # Additive costs: 60 cheap units (0.05 each); early in the queue one that breaks the budget alone (5.0)
    # and one that fits but would spend most of it (2.0).
    queue = [Unit("mlp", 0, (i,), 0.0, 1) for i in range(62)]
    costs = {unit.members: 0.05 for unit in queue} | {(5,): 5.0, (12,): 2.0}
    calls = []

    def increase(units):
        calls.append(len(units))
        return sum(costs[u.members] for u in units)

    accepted = grow_within_budget(queue, increase, 3.0)
    assert not {(5,), (12,)} & {u.members for u in accepted} and len(accepted) >= 50
    assert increase(accepted) <= 3.0 and len(calls) <= MAX_EVALUATIONS
    held_out = largest_fitting_prefix(accepted, lambda units: 0.25 * len(units), 3.0)  # dearer on other text
    assert len(held_out) == 12
    with pytest.raises(BadInputError, match="no pruning fits a 0.05% perplexity budget"):
        grow_within_budget(queue, increase, 0.05)


@pytest.mark.parametrize("flags, message", [
    (["--prune", "mlp=1.2"], "--prune mlp=1.2: a ratio must be in [0, 1)"),
    (["--prune", "depth=2"], "write kind=value with kind one of mlp, heads, layers"),
    (["--prune", "layers=2"], "--prune layers=2: the model has 2 layers; keep at least one"),
    (["--prune", "mlp=0.1", "--prune-budget", "5"], "--prune and --prune-budget both choose what to prune"),
    (["--prune", "mlp=0.5", "--prune-samples", "8"], "argument --prune-samples: 8 is too small; give 9 or more"),
])
def test_bad_pruning_requests_exit_2(tiny_model_factory, shared_store, flags, message):
    result = run_cli("export.build", "--model", str(tiny_model_factory("llama")), "--out", str(shared_store),
                     "--prune-multiple", "16", "--threads", "1", *flags)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
    assert not list(shared_store.glob("prune-*"))


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One store for the refused requests: its export is built once and reused, and nothing else is written."""
    return tmp_path_factory.mktemp("refused")


def test_plan_for_another_model_is_refused(tiny_model_factory, shared_store, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"model": {"model_type": "llama", "layers": 30}, "plan": {"dropped_layers": [3]}}))
    result = run_cli("export.build", "--model", str(tiny_model_factory("llama")), "--out", str(shared_store),
                     "--prune-plan", str(plan))
    assert result.returncode == 2
    assert "was made for another model (layers differ)" in result.stderr.strip().splitlines()[-1]


def test_pruning_every_group_or_unknown_layer_is_a_plain_error(export_factory):
    export = export_factory("llama")
    for plan, message in ((PrunePlan(kv_groups={0: []}), "keep at least one"),
                          (PrunePlan(dropped_layers=[0, 1]), "keep at least one"),
                          (PrunePlan(mlp_channels={7: [0]}), "layer 7 has no MLP this pass knows")):
        with pytest.raises(PruningError, match=message):
            apply_plan(ir.load(str(export.file("model.onnx"))), plan, export.model_facts)


def test_plain_mlp_of_gpt2_prunes_with_its_biases(export_factory, tmp_path):
    export = export_factory("gpt2")
    plan = PrunePlan(mlp_channels={0: list(range(0, 256, 2))})
    ids = np.random.default_rng(0).integers(3, 128, size=(1, 8))
    _, facts, got = pruned_graph(export, plan, tmp_path, ids)
    assert got.shape == (1, 8, 128) and np.isfinite(got).all()
    blocks = find_blocks(ir.load(str(tmp_path / "pruned.onnx")).graph)
    assert blocks[0].mlp_width == 128 and blocks[1].mlp_width == 256


def test_distillation_heals_through_the_export_stage(tiny_model_factory, tmp_path):
    result = run_cli("export.build", "--model", str(tiny_model_factory("llama")), "--out", str(tmp_path),
                     "--prune", "mlp=0.5,heads=0.5", "--prune-multiple", "16", "--distill-steps", "8",
                     "--threads", "1")
    assert result.returncode == 0, result.stderr
    manifest = json.loads(next(tmp_path.glob("distill-*/manifest.json")).read_text())
    figures = manifest["metrics"]["distillation"]
    parity, healed = manifest["metrics"]["accuracy"]  # the export's own check, then distillation's gate
    assert parity["stage"] == "export" and parity["passed"]  # the healed model went through the export's check
    assert healed["stage"] == "distill" and healed["against"] == "teacher" and healed["ppl_limit_percent"] is None
    assert figures["steps"] == 8 and healed["perplexity"] != figures["perplexity_before"]
    assert manifest["io"]["model"]["layer_kv_heads"] == [1, 1]
    engine = json.loads(next(tmp_path.glob("engine-*/manifest.json")).read_text())
    assert engine["parent"] == manifest["id"]
    assert "vs teacher: ppl" in result.stdout


def test_distillation_without_pruning_is_refused(tiny_model_factory, tmp_path):
    result = run_cli("export.build", "--model", str(tiny_model_factory("llama")), "--out", str(tmp_path),
                     "--distill-steps", "8")
    assert result.returncode == 2
    assert "--distill-steps heals a pruned model" in result.stderr.strip().splitlines()[-1]


def test_a_healed_budget_plans_for_more_and_gates_the_healed_model():
    from export.build import HEAL_BUDGET_FACTOR, parse_args

    config = parse_args(["--prune-budget", "5", "--distill-steps", "10"])
    assert config.pruning.budget == HEAL_BUDGET_FACTOR * 5 and config.distillation.max_increase == 5
    config = parse_args(["--prune-budget", "5", "--distill-steps", "10", "--heal-budget", "8"])
    assert config.pruning.budget == 8 and config.distillation.max_increase == 5
    config = parse_args(["--prune", "mlp=0.25", "--distill-steps", "10"])  # ratios: nothing to gate
    assert config.distillation.max_increase is None
    for flags, problem in ((["--heal-budget", "8", "--prune-budget", "5"], "give all three"),
                           (["--heal-budget", "3", "--prune-budget", "5", "--distill-steps", "1"], "below")):
        with pytest.raises(BadInputError, match=problem):
            parse_args(flags)


def test_the_healed_model_must_fit_the_budget():
    from export.distill import DistillConfig, healed_records
    from runtime.errors import AccuracyError

    def healed(perplexity, gate):
        (record,) = healed_records({"held-out": perplexity}, {"held-out": 20.0}, {"held-out": np.zeros((4, 8))}, gate)
        return record

    gate = DistillConfig(steps=10, max_increase=5.0)
    record = healed(20.9, gate)  # +4.5%
    assert record.passed and record.perplexity_increase_percent == pytest.approx(4.5)
    assert (record.ppl_limit_percent, record.windows, record.against) == (5.0, 4, "teacher")
    with pytest.raises(AccuracyError, match=r"by \+6\.00% on held-out, over the 5% --prune-budget"):
        healed(21.2, gate)
    assert not healed(21.2, DistillConfig(steps=10, max_increase=5.0, allow_accuracy_loss=True)).passed
    assert healed(21.2, DistillConfig(steps=10)).passed  # no budget: nothing to miss


def test_pareto_table_measures_every_variant_in_one_run(tiny_model_factory, tmp_path):
    model = str(tiny_model_factory("llama"))
    for flags in ([], ["--prune", "layers=1"]):
        result = run_cli("export.build", "--model", model, "--out", str(tmp_path / "store"), "--threads", "1", *flags)
        assert result.returncode == 0, result.stderr
    result = run_cli("export.pareto", str(tmp_path / "store"), "--runs", "1", "--gen-len", "4",
                     "--json", str(tmp_path / "pareto.json"), "--plot", str(tmp_path / "pareto.png"))
    assert result.returncode == 0, result.stderr
    rows = {r["variant"]: r for r in json.loads((tmp_path / "pareto.json").read_text())}
    assert set(rows) == {"unpruned", '[["layers", 1.0]]'}
    assert rows['[["layers", 1.0]]']["parameters_removed_percent"] > 40
    assert all(r["tpot_ms"] > 0 for r in rows.values()) and any(r["pareto"] for r in rows.values())
    assert "TPOT÷base" in result.stdout


def test_gpt2_layers_drop_and_a_saved_plan_reapplies(tiny_model_factory, tmp_path):
    model = str(tiny_model_factory("gpt2"))
    first = run_cli("export.build", "--model", model, "--out", str(tmp_path / "a"), "--prune", "layers=1,mlp=0.5",
                    "--prune-multiple", "32", "--threads", "1")
    assert first.returncode == 0, first.stderr
    pruned = next((tmp_path / "a").glob("prune-*"))
    again = run_cli("export.build", "--model", model, "--out", str(tmp_path / "b"),
                    "--prune-plan", str(pruned / "plan.json"), "--prune-multiple", "32", "--threads", "1")
    assert again.returncode == 0, again.stderr
    metrics = [json.loads(next((tmp_path / s).glob("prune-*/manifest.json")).read_text())["metrics"] for s in "ab"]
    assert metrics[0]["plan"] == metrics[1]["plan"] and metrics[0]["plan"]["dropped_layers"]
    assert metrics[0]["parameters_after"] == metrics[1]["parameters_after"] < metrics[0]["parameters_before"]
