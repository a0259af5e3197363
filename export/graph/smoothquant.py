"""SmoothQuant as a graph pass: move activation outliers into the weights, exactly in float.

For a group of linear layers reading one activation X, per input channel j:
    s_j = max|X_j|^alpha / max_k |W_jk|^(1 - alpha)
X is divided by s (folded into whatever produced X) and each weight's row j is multiplied by s_j, so
X @ W is unchanged. Folds we know to be exact:
- RMSNorm / LayerNorm's elementwise weight (and LayerNorm's bias): q/k/v and gate/up inputs;
- the up projection of a gated MLP, whose output multiplies the activated gate elementwise: the down_proj
  input (where the worst outliers of the default model live).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from export.graph.linear import add_initializer, linear_groups, linear_nodes, set_constant, weight_array, weight_axis


def smoothing_scales(x_absmax: np.ndarray, weights: list[np.ndarray], axes: list[int], alpha: float) -> np.ndarray:
    w_absmax = np.max([np.abs(w).max(axis=axis) for w, axis in zip(weights, axes)], axis=0)
    scales = np.power(np.maximum(x_absmax, 1e-5), alpha) / np.power(np.maximum(w_absmax, 1e-5), 1 - alpha)
    return np.clip(scales, 1e-4, 1e4).astype(np.float32)


def _single_use_constant(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer() and len(value.uses()) == 1


def _scale_constant_input(node: ir.Node, index: int, factor: np.ndarray) -> None:
    """Multiply the node's constant input by `factor`; a constant shared with other nodes (the exporter
    deduplicates equal ones, such as norm weights that are all ones) gets a private copy first."""
    value = node.inputs[index]
    scaled = value.const_value.numpy() * factor
    if len(value.uses()) == 1:
        set_constant(value, scaled)
        return
    node.replace_input_with(index, add_initializer(node.graph, f"{node.name}.input{index}.smoothed",
                                                   scaled.astype(np.float32)))


def fold_into_producer(x: ir.Value, inverse: np.ndarray) -> bool:
    """Multiply the producer of X by `inverse` per channel, if it is a form we can fold exactly."""
    producer = x.producer()
    if producer is None:
        return False
    if producer.op_type == "Mul":
        constants = [i for i, v in enumerate(producer.inputs) if v is not None and v.is_initializer()]
        if len(constants) == 1 and producer.inputs[constants[0]].const_value.shape[-1:] == inverse.shape:
            _scale_constant_input(producer, constants[0], inverse)  # a norm's weight
            return True
        return _fold_into_linear_factor(producer, inverse)
    if producer.op_type == "LayerNormalization":
        constants = [i for i in (1, 2) if i < len(producer.inputs) and producer.inputs[i] is not None]
        if not all(producer.inputs[i].is_initializer() for i in constants):
            return False
        for index in constants:  # scale, and bias when there is one
            _scale_constant_input(producer, index, inverse)
        return True
    return False


def _fold_into_linear_factor(mul: ir.Node, inverse: np.ndarray) -> bool:
    """X = a * up(h): scale the up projection's output columns (gated MLPs)."""
    linears = {node for node in linear_nodes(mul.graph)}
    for factor in mul.inputs:
        up = factor.producer() if factor is not None else None
        if up in linears and len(factor.uses()) == 1 and _single_use_constant(up.inputs[1]) and len(up.inputs) == 2:
            axis = weight_axis(up)
            shape = [1, 1]
            shape[axis] = -1
            set_constant(up.inputs[1], weight_array(up) * inverse.reshape(shape))
            return True
    return False


@dataclass
class SmoothQuantResult(ir.passes.PassResult):
    smoothed: list[str] = field(default_factory=list)  # the linear layers whose input was smoothed


class SmoothQuantPass(ir.passes.InPlacePass):
    """Applies SmoothQuant to every linear group whose input we can fold into its producer."""

    def __init__(self, channel_absmax: dict[str, np.ndarray], alpha: float = 0.5, skip: frozenset[str] = frozenset()):
        super().__init__()
        self.channel_absmax = channel_absmax
        self.alpha = alpha
        self.skip = skip

    def call(self, model: ir.Model) -> SmoothQuantResult:
        scales = {}
        for x, nodes in linear_groups(model.graph).items():
            if x.name not in self.channel_absmax or any(node.name in self.skip for node in nodes):
                continue
            weights = [weight_array(node) for node in nodes]
            axes = [weight_axis(node) for node in nodes]
            scales[x.name] = smoothing_scales(self.channel_absmax[x.name], weights, axes, self.alpha)
        smoothed = fold_scales(model, scales)
        return SmoothQuantResult(model, bool(smoothed), smoothed=smoothed)


def fold_scales(model: ir.Model, scales: dict[str, np.ndarray]) -> list[str]:
    """For each activation named in `scales` (per input channel s), divide it by s in its producer and multiply
    the rows of every linear layer reading it by s: X @ W is unchanged in float. SmoothQuant and AWQ differ only
    in how they choose s. Activations whose producer cannot take the fold are left alone; returns the layers
    whose input was scaled."""
    scaled = []
    for x, nodes in linear_groups(model.graph).items():
        if x.name not in scales or not fold_into_producer(x, 1.0 / scales[x.name]):
            continue
        for node in nodes:
            shape = [1, 1]
            shape[1 - weight_axis(node)] = -1  # rows of the input-channel axis
            set_constant(node.inputs[1], weight_array(node) * scales[x.name].reshape(shape))
        scaled += [node.name for node in nodes]
    return scaled
