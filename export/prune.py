"""The prune stage: importance from calibration activations, a global plan under a perplexity budget (or
explicit ratios, or a saved plan), the graph passes, and a least-squares repair of the output projections.

Importance is first-order and activation-aware (Wanda/FLAP style): removing MLP channel c of a layer
perturbs the residual stream by x_c * W_down[c, :], whose expected energy is E[x_c^2] * ||W_down[c, :]||^2;
a KV group perturbs it through its o_proj rows; a whole layer by everything it writes. Each cost is divided
by the energy of the residual stream there, so costs compare across layers and kinds, and units are taken
cheapest-per-parameter first. That order is only a guess (one 64-channel block can cost 5% alone), so the
budget search measures real perplexity of each candidate plan on a masked graph (export/sensitivity.py)
and skips the units that do not fit.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from export.graph import stats
from export.graph.data import DataConfig, stage_text
from export.graph.linear import bias_value, linear_nodes, set_constant, weight_axis
from export.graph.pruning import (
    Block,
    DropLayersPass,
    PruneAttentionHeadsPass,
    PruneMlpChannelsPass,
    PrunePlan,
    PruningError,
    _residual_span,
    find_blocks,
    group_channels,
)
from export.graph.sequence import PassSequence
from export.sensitivity import MaskedModel
from runtime import accuracy
from runtime.artifact import MODEL_FILE, Artifact, ArtifactWriter
from runtime.contract import cache_layer
from runtime.errors import BadInputError
from runtime.ranges import Range, check_ranges, ranged

STAGE = "prune"
# The budget search (group testing on the masked graph): windows it measures on, its first and largest
# batch, how many single units in a row may fail before it stops, and its cap on evaluations (each one is
# a forward pass over the search windows, seconds each on a small model). The windows
# are the first calibration windows; the activation energies come from the others.
SEARCH_WINDOWS = 8
FIRST_STEP, MAX_STEP = 16, 64
REJECTED_IN_A_ROW = 6
MAX_EVALUATIONS = 40
KINDS = ("mlp", "heads", "layers")
# The pruning data's windows: the search windows and at least one more for the activation energies.
SAMPLES = Range("--prune-samples", low=SEARCH_WINDOWS + 1)


@dataclass(frozen=True)
class PruneConfig:
    # Explicit ratios, e.g. {"mlp": 0.25, "heads": 0.1, "layers": 2}: MLP channels removed per layer,
    # share of all KV groups, number of layers. Empty: plan by the budget instead.
    ratios: tuple[tuple[str, float], ...] = ()
    # Perplexity increase (percent over the parent) the planner may spend, when no ratios are given.
    budget: float | None = ranged(None, "--prune-budget", low=0, low_open=True)
    # A plan saved by an earlier build (manifest `plan`, or a plan.json), applied as it is.
    plan_file: str | None = None
    # Kept MLP widths are multiples of this (whole heads are always kept or removed).
    multiple: int = ranged(64, "--prune-multiple", low=1)
    # Least-squares refit of down_proj / o_proj on calibration activations after removing their inputs.
    repair: bool = True
    threads: int = ranged(2, "--threads", low=1)
    data: DataConfig = field(default_factory=lambda: DataConfig(samples=24))

    def __post_init__(self):
        check_ranges(self)
        SAMPLES.check(self.data.samples)
        for kind, value in self.ratios:
            check_ratio(kind, value)
        chosen = [flag for flag, given in (("--prune", self.ratios), ("--prune-budget", self.budget is not None),
                                           ("--prune-plan", self.plan_file)) if given]
        if len(chosen) > 1:
            raise BadInputError(f"{' and '.join(chosen)} both choose what to prune; give one of them")
        if self.plan_file and not Path(self.plan_file).is_file():
            raise BadInputError(f"--prune-plan {self.plan_file} does not exist; pass the plan.json of a prune "
                                "artifact")

    def wanted(self) -> bool:
        return bool(self.ratios or self.budget is not None or self.plan_file)


def stage_config(config: PruneConfig) -> dict[str, Any]:
    config_dict = asdict(config)
    if config.plan_file:  # the plan's content, not its path, decides what is built
        config_dict["plan_file"] = json.loads(Path(config.plan_file).read_text())
    return config_dict


def parse_ratios(text: str) -> tuple[tuple[str, float], ...]:
    """`mlp=0.25,heads=0.1,layers=2` -> (('mlp', 0.25), ('heads', 0.1), ('layers', 2.0))."""
    ratios = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, number = part.partition("=")
        if not kind or not number:
            raise BadInputError(f"--prune {part!r}: write kind=value with kind one of {', '.join(KINDS)} "
                                "(e.g. --prune mlp=0.25,heads=0.1,layers=2)")
        try:
            value = float(number)
        except ValueError:
            raise BadInputError(f"--prune {part!r}: {number!r} is not a number") from None
        ratios.append((kind, value))
    return tuple(ratios)


def format_ratios(ratios: tuple[tuple[str, float], ...]) -> str:
    """(('layers', 20.0), ('mlp', 0.25)) -> 'layers=20,mlp=0.25': parse_ratios' input."""
    return ",".join(f"{kind}={value:g}" for kind, value in ratios)


def check_ratio(kind: str, value: float) -> None:
    if kind not in KINDS:
        raise BadInputError(f"--prune {kind}={value:g}: write kind=value with kind one of {', '.join(KINDS)} "
                            "(e.g. --prune mlp=0.25,heads=0.1,layers=2)")
    if kind == "layers" and (value < 0 or value != int(value)):
        raise BadInputError(f"--prune layers={value:g}: give a whole number of layers to drop")
    if kind != "layers" and not 0 <= value < 1:
        raise BadInputError(f"--prune {kind}={value:g}: a ratio must be in [0, 1)")


# -- importance -----------------------------------------------------------------------------------------------


@dataclass
class LayerEnergy:
    """Second moments of one layer's projection inputs, and the energies of what the layer writes."""

    mlp_gram: np.ndarray | None = None     # E[x x^T] of the MLP output projection's input
    mlp_mean: np.ndarray | None = None
    attn_gram: np.ndarray | None = None    # E[x x^T] of o_proj's input
    attn_mean: np.ndarray | None = None
    residual: float = 0.0                  # typical E[||h||^2] of the residual stream leaving the layer
    writes: float = 0.0                    # E[||attn out||^2] + E[||mlp out||^2]


def measure(model_path: Path, blocks: dict[int, Block], samples: np.ndarray, facts: dict, threads: int,
            scratch: Path | None = None) -> dict[int, LayerEnergy]:
    tensors: dict[str, tuple[int, str]] = {}
    for index, block in blocks.items():
        if block.mlp_out is not None:
            tensors[block.mlp_out.inputs[0].name] = (index, "mlp")
            tensors[block.mlp_out.outputs[0].name] = (index, "mlp_write")
        if block.attention_out is not None:
            tensors[block.attention_out.inputs[0].name] = (index, "attn")
            tensors[block.attention_out.outputs[0].name] = (index, "attn_write")
        try:
            tensors[_residual_span(block)[1].name] = (index, "residual")
        except PruningError:
            pass
    energies = {index: LayerEnergy() for index in blocks}
    residual_sums: dict[int, np.ndarray] = {}  # per dimension
    rows = 0
    for outputs in stats.stream(model_path, list(tensors), samples, facts, threads, scratch):
        for name, value in outputs.items():
            index, role = tensors[name]
            x = value.reshape(-1, value.shape[-1]).astype(np.float64)
            energy = energies[index]
            if role in ("mlp", "attn"):
                gram, mean = x.T @ x, x.sum(axis=0)
                old_gram, old_mean = getattr(energy, f"{role}_gram"), getattr(energy, f"{role}_mean")
                setattr(energy, f"{role}_gram", gram if old_gram is None else old_gram + gram)
                setattr(energy, f"{role}_mean", mean if old_mean is None else old_mean + mean)
            elif role == "residual":
                residual_sums[index] = residual_sums.get(index, 0) + (x * x).sum(axis=0)
            else:
                energy.writes += float((x * x).sum())
        rows += samples.shape[1]
    for index, energy in energies.items():
        for role in ("mlp", "attn"):
            if getattr(energy, f"{role}_gram") is not None:
                setattr(energy, f"{role}_gram", getattr(energy, f"{role}_gram") / rows)
                setattr(energy, f"{role}_mean", getattr(energy, f"{role}_mean") / rows)
        # A few massive-activation dimensions hold up to 98% of the residual energy (SmolLM2 from layer 11
        # on), which made every later unit look 100x cheaper than its measured cost; the median dimension,
        # times the width, is the scale of what the rest of the stream carries.
        if index in residual_sums:
            energy.residual = float(np.median(residual_sums[index]) * residual_sums[index].size) / rows
        energy.writes = energy.writes / rows
    return energies


def _weight_in_out(node: ir.Node) -> np.ndarray:
    weight = node.inputs[1].const_value.numpy()
    return weight if weight_axis(node) == 1 else weight.T


def channel_scores(gram: np.ndarray, node: ir.Node) -> np.ndarray:
    """E[x_c^2] * ||W[c, :]||^2: the expected energy channel c adds to the layer's output."""
    weight = _weight_in_out(node).astype(np.float64)
    return np.diag(gram) * (weight * weight).sum(axis=1)


@dataclass
class Unit:
    """The smallest thing the planner removes: a block of MLP channels, one KV group, or a layer."""

    kind: str
    layer: int
    members: tuple[int, ...]
    cost: float
    params: int


def units(blocks: dict[int, Block], energies: dict[int, LayerEnergy], facts: dict, multiple: int) -> list[Unit]:
    found = []
    hidden = facts["hidden_size"]
    rep = facts["attention_heads"] // facts["kv_heads"]
    hd = facts["head_dim"]
    for index, block in blocks.items():
        energy = energies[index]
        scale = max(energy.residual, 1e-12)
        if block.mlp_out is not None and energy.mlp_gram is not None:
            scores = channel_scores(energy.mlp_gram, block.mlp_out)
            order = np.argsort(scores)
            per_channel = hidden * (len(block.mlp_in) + 1)
            for start in range(0, len(order) - multiple, multiple):  # at least one block stays
                chunk = order[start:start + multiple]
                found.append(Unit("mlp", index, tuple(int(c) for c in chunk), float(scores[chunk].sum()) / scale,
                                  per_channel * len(chunk)))
        if len(block.attention) == 4 and energy.attn_gram is not None:
            scores = channel_scores(energy.attn_gram, block.attention["o_proj"])
            per_group = [float(scores[g * rep * hd:(g + 1) * rep * hd].sum()) for g in range(facts["kv_heads"])]
            params = hidden * hd * (2 * rep + 2)
            found += [Unit("heads", index, (g,), cost / scale, params) for g, cost in enumerate(per_group)]
        layer_params = sum(int(np.prod(n.inputs[1].const_value.shape)) for n in block.nodes)
        found.append(Unit("layers", index, (index,), energy.writes / scale, layer_params))
    return found



def plan_from_units(chosen: list[Unit], blocks: dict[int, Block], facts: dict) -> PrunePlan:
    """Turn chosen units into a plan that keeps at least one layer, one KV group and one MLP block each."""
    dropped = sorted({u.layer for u in chosen if u.kind == "layers"})[: len(blocks) - 1]
    removed_channels: dict[int, set[int]] = {}
    removed_groups: dict[int, set[int]] = {}
    for unit in chosen:
        if unit.layer in dropped:
            continue
        if unit.kind == "mlp":
            removed_channels.setdefault(unit.layer, set()).update(unit.members)
        elif unit.kind == "heads":
            removed_groups.setdefault(unit.layer, set()).update(unit.members)
    plan = PrunePlan(dropped_layers=dropped)
    for layer, removed in removed_channels.items():
        plan.mlp_channels[layer] = [c for c in range(blocks[layer].mlp_width) if c not in removed]
    for layer, removed in removed_groups.items():
        kept = [g for g in range(facts["kv_heads"]) if g not in removed]
        plan.kv_groups[layer] = kept or [max(removed)]  # never every group: that is dropping the layer
    return plan


def ratio_plan(ratios: dict[str, float], all_units: list[Unit], blocks: dict[int, Block], facts: dict,
               multiple: int) -> PrunePlan:
    chosen: list[Unit] = []
    if ratios.get("mlp"):
        for index, block in blocks.items():
            mlp_units = sorted((u for u in all_units if u.kind == "mlp" and u.layer == index), key=lambda u: u.cost)
            count = int(ratios["mlp"] * (block.mlp_width if block.mlp_kind else 0)) // multiple
            chosen += mlp_units[:count]
    if ratios.get("heads"):
        head_units = sorted((u for u in all_units if u.kind == "heads"), key=lambda u: u.cost)
        chosen += _keep_one_group_per_layer(head_units, round(ratios["heads"] * len(head_units)), facts)
    if ratios.get("layers"):
        count = int(ratios["layers"])
        if count >= len(blocks):
            raise BadInputError(f"--prune layers={count}: the model has {len(blocks)} layers; keep at least one")
        chosen += sorted((u for u in all_units if u.kind == "layers"), key=lambda u: u.cost)[:count]
    return plan_from_units(chosen, blocks, facts)


def _keep_one_group_per_layer(head_units: list[Unit], count: int, facts: dict) -> list[Unit]:
    taken, per_layer = [], {}
    for unit in head_units:
        if len(taken) == count:
            break
        if per_layer.get(unit.layer, 0) + 1 < facts["kv_heads"]:
            per_layer[unit.layer] = per_layer.get(unit.layer, 0) + 1
            taken.append(unit)
    return taken


def budget_order(all_units: list[Unit], blocks: dict[int, Block], facts: dict) -> list[Unit]:
    """Every unit, cheapest per parameter first, with no layer losing its last KV group or MLP block, and
    the model keeping at least one layer."""
    ordered = sorted(all_units, key=lambda u: u.cost / u.params)
    heads = _keep_one_group_per_layer([u for u in ordered if u.kind == "heads"], len(ordered), facts)
    droppable = [u for u in ordered if u.kind == "layers"][: len(blocks) - 1]
    allowed = {id(u) for u in heads + droppable}
    return [u for u in ordered if u.kind == "mlp" or id(u) in allowed]


def removed_parameters(chosen: list[Unit]) -> int:
    """Parameters the units remove together (a dropped layer's own MLP blocks and groups count once)."""
    dropped = {u.layer for u in chosen if u.kind == "layers"}
    return sum(u.params for u in chosen if u.kind == "layers" or u.layer not in dropped)


# -- applying, repairing, measuring ------------------------------------------------------------------------


def apply_plan(model: ir.Model, plan: PrunePlan, facts: dict) -> None:
    PassSequence(PruneMlpChannelsPass(plan),
                 PruneAttentionHeadsPass(plan, facts["attention_heads"], facts["kv_heads"], facts["head_dim"]),
                 DropLayersPass(plan),
                 ir.passes.common.RemoveUnusedNodesPass(),
                 ir.passes.common.RemoveUnusedOpsetsPass())(model)


def repair(model: ir.Model, plan: PrunePlan, energies: dict[int, LayerEnergy], facts: dict) -> int:
    """Least-squares refit of each output projection that lost inputs: W' = argmin E||x_K W' - x W||^2
    = G_KK^-1 G_K: W, with the bias absorbing the mean error where the layer has one. Returns layers refit."""
    blocks = find_blocks(model.graph)
    rep, hd = facts["attention_heads"] // facts["kv_heads"], facts["head_dim"]
    refit = 0
    for layer, kept in plan.mlp_channels.items():
        if layer in blocks and energies[layer].mlp_gram is not None:
            _refit(blocks[layer].mlp_out, np.asarray(kept), energies[layer].mlp_gram, energies[layer].mlp_mean)
            refit += 1
    for layer, groups in plan.kv_groups.items():
        if layer in blocks and energies[layer].attn_gram is not None:
            kept = group_channels(groups, rep * hd)
            _refit(blocks[layer].attention["o_proj"], kept, energies[layer].attn_gram, energies[layer].attn_mean)
            refit += 1
    return refit


def _refit(node: ir.Node, kept: np.ndarray, gram: np.ndarray, mean: np.ndarray, damping: float = 1e-2) -> None:
    """Refit `node` (already holding rows `kept` of its weight) from its unpruned weight, which
    `remember_weights` stored before the passes ran."""
    original = node.meta.get("lmforge.unpruned_weight")
    if original is None:
        return
    g_kk = gram[np.ix_(kept, kept)]
    g_k = gram[kept]
    ridge = damping * float(np.mean(np.diag(g_kk))) * np.eye(len(kept))
    refit = np.linalg.solve(g_kk + ridge, g_k @ original.astype(np.float64))
    axis = weight_axis(node)
    set_constant(node.inputs[1], (refit if axis == 1 else refit.T).astype(np.float32))
    bias = bias_value(node)
    if bias is not None:
        drift = mean @ original.astype(np.float64) - mean[kept] @ refit
        set_constant(bias, (bias.const_value.numpy() + drift).astype(np.float32))


def remember_weights(model: ir.Model, plan: PrunePlan) -> None:
    """Keep the unpruned weights of the projections the repair will refit (the passes overwrite them)."""
    blocks = find_blocks(model.graph)
    for layer in plan.mlp_channels:
        if layer in blocks and blocks[layer].mlp_out is not None:
            node = blocks[layer].mlp_out
            node.meta["lmforge.unpruned_weight"] = _weight_in_out(node).copy()
    for layer in plan.kv_groups:
        if layer in blocks and "o_proj" in blocks[layer].attention:
            node = blocks[layer].attention["o_proj"]
            node.meta["lmforge.unpruned_weight"] = _weight_in_out(node).copy()


def pruned_facts(facts: dict, plan: PrunePlan, model: ir.Model) -> dict:
    kept_layers = [i for i in range(facts["layers"]) if i not in plan.dropped_layers]
    layer_kv = [len(plan.kv_groups.get(i, range(facts["kv_heads"]))) for i in kept_layers]
    new = dict(facts)
    new["layers"] = len(kept_layers)
    new["layer_kv_heads"] = layer_kv if len(set(layer_kv)) > 1 or layer_kv[0] != facts["kv_heads"] else None
    remaining = {node.name for node in model.graph}  # a tied LM head reads a Transpose: not a linear_node
    new["linear_layers"] = [name for name in facts["linear_layers"] if name in remaining]
    return new


def parameter_count(model: ir.Model) -> int:
    """Parameters of the linear layers (the embedding table is not counted: it costs a lookup, not a MatMul)."""
    return sum(int(np.prod(n.inputs[1].const_value.shape)) for n in linear_nodes(model.graph))


def build_candidate(source: Path, plan: PrunePlan, energies, facts: dict, destination: Path, do_repair: bool,
                    final: bool = False) -> tuple[ir.Model, int]:
    model = ir.load(str(source))
    if do_repair:
        remember_weights(model, plan)
    apply_plan(model, plan, facts)
    refit = repair(model, plan, energies, facts) if do_repair else 0
    if final:  # the artifact (not every search candidate) gets its shapes inferred again and the checker
        ir.passes.common.ShapeInferencePass()(model)
        ir.passes.common.CheckerPass(full_check=False)(model)
    ir.save(model, destination)
    return model, refit


def build_repaired(source: Path, plan: PrunePlan, energies, facts: dict, destination: Path, config: PruneConfig,
                   windows: np.ndarray, work: Path, progress) -> tuple[ir.Model, int]:
    """The final model, refit only where the refit lowers perplexity on windows it was not fitted on: on the
    default model it overfits (16 windows of activations for 1536 inputs) and cost +1% at a 5% budget."""
    model, refit = build_candidate(source, plan, energies, facts, destination, config.repair, final=True)
    if not refit:
        return model, refit
    plain_path = work / "unrepaired.onnx"
    plain, _ = build_candidate(source, plan, energies, facts, plain_path, False, final=True)
    new_facts = pruned_facts(facts, plan, model)
    repaired = accuracy.evaluate_model(destination, new_facts, windows, config.threads).perplexity
    unrepaired = accuracy.evaluate_model(plain_path, new_facts, windows, config.threads).perplexity
    progress(f"[prune] repair: perplexity {repaired:.3f} refit, {unrepaired:.3f} without")
    if repaired <= unrepaired:
        return model, refit
    shutil.move(plain_path, destination)
    return plain, 0


def run(parent: Artifact, writer: ArtifactWriter, config: PruneConfig, generations: list[dict] | None = None,
        progress=print) -> Artifact:
    """The pruned graph. Importance, the budget search and the repair fit on the calibration text mixed half and
    half with the teacher's answers (`generations`) where there are any, so the plan is chosen for the model's
    whole use; the budget is checked on every held-out domain."""
    started = time.perf_counter()
    facts = parent.model_facts
    source = parent.file(MODEL_FILE)
    samples, domains = stage_text(config.data, parent, generations, fit_on_teacher=True)
    graph_model = ir.load(str(source))
    try:
        blocks = find_blocks(graph_model.graph)
    except PruningError as exc:
        raise BadInputError(str(exc)) from None
    if not blocks:
        raise BadInputError("no decoder layers recognised: expected linear layers named like "
                            "`model.layers.N.mlp.down_proj`; re-export with `python -m export.build`")
    try:
        with writer.working_folder() as work:
            fitting = samples.calibration[SEARCH_WINDOWS:]  # the first windows judge the search and the repair
            progress(f"[prune] activation energies of {len(blocks)} layers on {len(fitting)} windows")
            energies = measure(source, blocks, fitting, facts, config.threads, scratch=work)
            all_units = units(blocks, energies, facts, config.multiple)
            reference = accuracy.evaluate_model_on(source, facts, domains, config.threads)
            plan, tried = choose_plan(config, all_units, blocks, facts, source, samples, domains, reference, work,
                                      progress)
            model, refit = build_repaired(source, plan, energies, facts, writer.dir / MODEL_FILE, config,
                                          samples.calibration[:SEARCH_WINDOWS], work, progress)
            evaluations = accuracy.evaluate_model_on(writer.dir / MODEL_FILE, pruned_facts(facts, plan, model), domains,
                                      config.threads)
    except PruningError as exc:
        raise BadInputError(str(exc)) from None
    writer.copy_text_files(parent)
    new_facts = pruned_facts(facts, plan, model)
    before, after = parameter_count(graph_model), parameter_count(model)
    (writer.dir / "plan.json").write_text(json.dumps(plan_record(plan, facts), indent=1))
    metrics = {
        "plan": plan.to_json(),
        "parameters_before": before, "parameters_after": after,
        "parameters_removed_percent": 100 * (1 - after / before),
        "flops_per_token_before": 2 * before, "flops_per_token_after": 2 * after,
        # The budget steers the plan (on the search windows) and fails nothing; the record says whether the
        # held-out windows kept to it.
        "accuracy": accuracy.as_metrics(accuracy.domain_records(STAGE, "parent", evaluations, reference,
                                                                limit=config.budget)),
        "repaired_layers": refit, "tried": tried,
        "prune_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    io = dict(parent.io) | {"model": new_facts}
    io["inputs"] = [i for i in parent.io["inputs"] if _kept(i["name"], new_facts["layers"])]
    io["outputs"] = [o for o in parent.io["outputs"] if _kept(o["name"], new_facts["layers"])]
    return writer.commit(io=io, metrics=metrics, precision=parent.manifest.get("precision", "fp32"))


def _kept(name: str, layers: int) -> bool:
    """Whether an input or output survives pruning to `layers` layers (cache I/O is renumbered from 0)."""
    layer = cache_layer(name)
    return layer is None or layer < layers


def plan_record(plan: PrunePlan, facts: dict) -> dict:
    """The plan with the facts of the model it was made for, so it is never applied to another model."""
    model = {k: facts[k] for k in ("model_type", "layers", "hidden_size", "attention_heads", "kv_heads", "vocab_size")}
    return {"model": model, "plan": plan.to_json()}


def load_plan(path: str, facts: dict) -> PrunePlan:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise BadInputError(f"--prune-plan {path}: cannot read a plan ({exc}); pass a plan.json from a prune "
                            "artifact") from None
    if "plan" not in record:
        raise BadInputError(f"--prune-plan {path} holds no plan; pass the plan.json of a prune artifact")
    made_for = record.get("model", {})
    mismatched = [k for k, v in made_for.items() if facts.get(k) != v]
    if mismatched:
        raise BadInputError(f"--prune-plan {path} was made for another model ({', '.join(mismatched)} differ); "
                            "plan again for this model with --prune or --prune-budget")
    return PrunePlan.from_json(record["plan"])


def choose_plan(config, all_units, blocks, facts, source, samples, domains, reference, work, progress):
    if config.plan_file:
        return load_plan(config.plan_file, facts), []
    if config.ratios:
        return ratio_plan(dict(config.ratios), all_units, blocks, facts, config.multiple), []
    return budget_search(config, all_units, blocks, facts, source, samples, domains, reference, work, progress)


def budget_search(config, all_units, blocks, facts, source, samples, domains, reference, work, progress):
    """The most units whose measured perplexity increase fits the budget: grown by group testing on
    calibration windows, then cut back from its end until it fits on every held-out domain too."""
    masked = MaskedModel(source, facts, work / "masked.onnx", config.threads)
    search_windows = samples.calibration[:SEARCH_WINDOWS]
    base = masked.evaluate([], search_windows)
    layer_params = max(1, sum(u.params for u in all_units if u.kind == "layers"))
    tried: list[dict] = []

    def measure_on(windows: dict[str, np.ndarray], baseline: dict[str, accuracy.Evaluation], held_out: bool):
        def increase(units: list[Unit]) -> float:
            value = accuracy.worst_increase({name: masked.evaluate(units, w) for name, w in windows.items()},
                                            baseline)
            removed = 100 * removed_parameters(units) / layer_params
            tried.append({"units": len(units), "perplexity_increase_percent": value,
                          "parameters_removed_percent": removed, "held_out": held_out})
            progress(f"[prune] {len(units)} units ({removed:.1f}% of layer parameters): "
                     f"{'held-out' if held_out else 'search'} perplexity {value:+.2f}%")
            return value
        return increase

    accepted = grow_within_budget(budget_order(all_units, blocks, facts),
                                  measure_on({"search": search_windows}, {"search": base}, False), config.budget)
    accepted = largest_fitting_prefix(accepted, measure_on(domains, reference, True), config.budget)
    return plan_from_units(accepted, blocks, facts), tried


def grow_within_budget(queue: list[Unit], increase: Callable[[list[Unit]], float], budget: float) -> list[Unit]:
    """Group testing in queue order. A batch is kept when it fits and spends at most half of the budget
    left, and then the next batch doubles; otherwise it is halved, and a single unit is skipped. The first-
    order order misjudges whole layers (on the default model a KV group of layer 0 costs +2.6% and comes
    second in the queue, while blocks of the middle layers cost +0.05%), and the half rule stops such a unit
    from spending the budget. Stops after REJECTED_IN_A_ROW skips or MAX_EVALUATIONS."""
    accepted: list[Unit] = []
    spent, position, step, rejected_in_a_row, evaluations, cheapest = 0.0, 0, FIRST_STEP, 0, 0, None
    while position < len(queue) and rejected_in_a_row < REJECTED_IN_A_ROW and evaluations < MAX_EVALUATIONS:
        batch = queue[position:position + step]
        value = increase(accepted + batch)
        evaluations += 1
        if not accepted and len(batch) == 1:
            cheapest = value if cheapest is None else min(cheapest, value)
        if value <= budget and value - spent <= (budget - spent) / 2:
            accepted, spent = accepted + batch, value
            position, step, rejected_in_a_row = position + len(batch), min(2 * step, MAX_STEP), 0
        elif len(batch) > 1:
            step = len(batch) // 2
        else:
            position, rejected_in_a_row = position + 1, rejected_in_a_row + 1
    if not accepted:
        cost = "" if cheapest is None else f" (the cheapest unit tried already costs {cheapest:.2f}%)"
        raise BadInputError(f"no pruning fits a {budget}% perplexity budget{cost}; raise --prune-budget")
    return accepted


def largest_fitting_prefix(units: list[Unit], increase: Callable[[list[Unit]], float], budget: float
                           ) -> list[Unit]:
    if increase(units) <= budget:
        return units
    low, high = 0, len(units)
    while high - low > 1:
        middle = (low + high) // 2
        if increase(units[:middle]) <= budget:
            low = middle
        else:
            high = middle
    if not low:
        raise BadInputError(f"no pruning fits a {budget}% perplexity budget on the held-out text; "
                            "raise --prune-budget")
    return units[:low]
