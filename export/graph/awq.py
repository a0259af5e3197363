"""AWQ-style activation-aware scaling for 4-bit weights (Lin et al. 2023), as a graph pass.

The input channels that carry the most activation energy matter most to a layer's output, and rounding their
weights costs most. Per activation X read by a group of linear layers (q/k/v, gate/up, down), scales
s_j = m_j^alpha (m: the RMS of channel j) multiply the weights' rows before rounding and divide X, folded into
X's producer exactly as SmoothQuant's are (`smoothquant.fold_scales`: the same folds, another choice of s).
alpha is searched per activation on the output error ‖X·Q(diag(s)W)/s - XW‖, which the Gram matrix G = XᵀX of
the calibration activations gives exactly over every position: tr(DᵀGD) with D the weight error. alpha = 0 is
round-to-nearest itself, so the search never picks worse than it on the calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from export.graph.gptq import Int4Spec, rtn
from export.graph.linear import linear_groups, weight_array, weight_axis
from export.graph.smoothquant import fold_scales

ALPHAS = tuple(np.linspace(0.0, 1.0, 11))


def gram_error(delta: np.ndarray, gram: np.ndarray) -> float:
    """‖X·delta‖² over the calibration positions, from G = XᵀX alone."""
    return float(np.sum(delta * (gram @ delta)))


def _scaled_error(weight: np.ndarray, gram: np.ndarray, scales: np.ndarray, spec: Int4Spec) -> float:
    restored = rtn(weight * scales[:, None], spec).dequantized() / scales[:, None]
    return gram_error(restored - weight, gram)


def search_scales(weight: np.ndarray, gram: np.ndarray, spec: Int4Spec,
                  alphas: tuple[float, ...] = ALPHAS) -> tuple[np.ndarray, float]:
    """(per-channel scales, alpha) with the least output error for `weight` [in, out] (a group's weights
    concatenated along out) reading inputs whose Gram matrix is `gram`."""
    magnitude = np.sqrt(np.maximum(np.diag(gram), 0.0))
    magnitude = np.where(magnitude > 0, magnitude, magnitude[magnitude > 0].min(initial=1.0))
    best = (np.inf, np.ones(len(weight), np.float32), 0.0)
    for alpha in alphas:
        scales = magnitude ** alpha
        # centred around 1; float32, the graph's type (the fold multiplies float32 constants by them)
        scales = np.clip(scales / np.sqrt(scales.max() * scales.min()), 1e-4, 1e4).astype(np.float32)
        error = _scaled_error(weight, gram, scales, spec)
        if error < best[0]:
            best = (error, scales, float(alpha))
    return best[1], best[2]


@dataclass
class AwqResult(ir.passes.PassResult):
    scaled: list[str] = field(default_factory=list)  # the linear layers whose input was scaled
    scales: dict[str, np.ndarray] = field(default_factory=dict)  # activation -> the scales folded into it
    alphas: dict[str, float] = field(default_factory=dict)  # activation -> the alpha the search chose


class AwqPass(ir.passes.InPlacePass):
    """Searches and folds AWQ scales for every group of MatMul layers whose input has a Gram matrix in `grams`
    and none of whose layers is in `skip`. The Gram of a scaled input X/s is G / (s sᵀ): `scaled_gram`."""

    def __init__(self, grams: dict[str, np.ndarray], spec: Int4Spec, skip: frozenset[str] = frozenset()):
        super().__init__()
        self.grams = grams
        self.spec = spec
        self.skip = skip

    def call(self, model: ir.Model) -> AwqResult:
        scales, alphas, readers = {}, {}, {}
        for x, nodes in linear_groups(model.graph).items():
            if (x.name not in self.grams or any(node.name in self.skip for node in nodes)
                    or any(node.op_type != "MatMul" or weight_axis(node) != 1 for node in nodes)):
                continue
            weight = np.concatenate([weight_array(node) for node in nodes], axis=1)
            scales[x.name], alphas[x.name] = search_scales(weight, self.grams[x.name], self.spec)
            readers[x.name] = [node.name for node in nodes]
        scaled = fold_scales(model, scales)
        folded = {name for name, layers in readers.items() if layers[0] in scaled}
        return AwqResult(model, bool(scaled), scaled=scaled, scales={k: scales[k] for k in folded},
                         alphas={k: alphas[k] for k in folded})


def scaled_gram(gram: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """XᵀX of X / s, from XᵀX: what GPTQ needs after AWQ, without running the model again."""
    return gram / np.outer(scales, scales)
