"""Activation statistics in bounded memory, collected by running ONNX Runtime on the parent graph.

For every tensor that feeds a linear layer we keep: the absolute maximum, the per-channel absolute maximum
(what SmoothQuant needs), a streaming histogram of |x| (what percentile, entropy and MSE need), and a small
reservoir of rows (what the per-layer sensitivity estimate needs). Nothing grows with the number of
samples: onnxruntime's stock entropy calibrator keeps every tensor of every sample (~0.5 GB per 256-token
sample on the default model), so we collect our own and use its session machinery only.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from runtime.baselines import plain_session
from runtime.contract import prefill_feeds
from runtime.progress import track

BINS = 2048
RESERVOIR_ROWS = 64
METHODS = ("minmax", "percentile", "entropy", "mse")
QMAX = 127.0


@dataclass
class TensorStats:
    channels: int
    absmax: float = 0.0
    channel_absmax: np.ndarray = field(default=None)
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))
    range: float = 0.0  # the histogram covers [0, range)
    rows: np.ndarray = field(default=None)  # reservoir of activation rows [<= RESERVOIR_ROWS, channels]
    seen_rows: int = 0

    def update(self, x: np.ndarray, rng: np.random.Generator) -> None:
        x = x.reshape(-1, self.channels).astype(np.float32, copy=False)
        magnitude = np.abs(x)
        batch_max = float(magnitude.max())
        channel_max = magnitude.max(axis=0)
        self.channel_absmax = channel_max if self.channel_absmax is None else np.maximum(self.channel_absmax,
                                                                                         channel_max)
        self.absmax = max(self.absmax, batch_max)
        self._grow_range(batch_max)
        counts, _ = np.histogram(magnitude, bins=BINS, range=(0.0, self.range))
        self.histogram += counts
        self._sample_rows(x, rng)

    def _grow_range(self, needed: float) -> None:
        """Double the histogram's range until it covers `needed`, merging bins pairwise (exact for counts)."""
        if self.range == 0.0:
            self.range = needed if needed > 0 else 1.0
            return
        while needed > self.range:
            merged = self.histogram.reshape(-1, 2).sum(axis=1)
            self.histogram = np.concatenate([merged, np.zeros(BINS // 2, dtype=np.int64)])
            self.range *= 2

    def _sample_rows(self, x: np.ndarray, rng: np.random.Generator) -> None:
        """Reservoir sampling of rows, so the kept rows are a uniform sample of all rows seen."""
        if self.rows is None:
            self.rows = np.empty((0, self.channels), dtype=np.float32)
        for row in x[rng.permutation(len(x))[: RESERVOIR_ROWS]]:
            self.seen_rows += 1
            if len(self.rows) < RESERVOIR_ROWS:
                self.rows = np.vstack([self.rows, row[None]])
            else:
                slot = rng.integers(0, self.seen_rows)
                if slot < RESERVOIR_ROWS:
                    self.rows[slot] = row

    def threshold(self, method: str, percentile: float = 99.99) -> float:
        """The clipping threshold for a symmetric int8 range, by the named method."""
        if method == "minmax" or self.histogram.sum() == 0:
            return self.absmax
        edges = np.linspace(0.0, self.range, BINS + 1)
        if method == "percentile":
            cumulative = np.cumsum(self.histogram) / self.histogram.sum()
            index = int(np.searchsorted(cumulative, percentile / 100.0))
            return float(min(edges[min(index + 1, BINS)], self.absmax))
        if method == "mse":
            return _mse_threshold(self.histogram, edges, self.absmax)
        if method == "entropy":
            return _entropy_threshold(self.histogram, edges, self.absmax)
        raise ValueError(f"unknown calibration method {method!r}")

    def scale(self, method: str) -> float:
        return max(self.threshold(method), 1e-8) / QMAX


def _candidate_indices(histogram: np.ndarray) -> np.ndarray:
    last = int(np.nonzero(histogram)[0][-1]) + 1
    return np.unique(np.linspace(max(last // 16, 8), last, 128).astype(int))


def _mse_threshold(histogram: np.ndarray, edges: np.ndarray, absmax: float) -> float:
    """Threshold minimizing expected squared error: clipping error above it, rounding error below."""
    centers = (edges[:-1] + edges[1:]) / 2
    best, best_error = absmax, np.inf
    for index in _candidate_indices(histogram):
        t = edges[index]
        step = t / QMAX
        clipped = np.clip(centers - t, 0, None)
        error = float((histogram * clipped**2).sum() + histogram[:index].sum() * step**2 / 12)
        if error < best_error:
            best, best_error = float(t), error
    return min(best, absmax)


def _entropy_threshold(histogram: np.ndarray, edges: np.ndarray, absmax: float) -> float:
    """TensorRT-style KL-divergence search: the threshold whose 128-level quantized distribution is
    closest to the observed one."""
    best, best_divergence = absmax, np.inf
    for index in _candidate_indices(histogram):
        if index < 128:
            continue
        reference = histogram[:index].astype(np.float64).copy()
        reference[index - 1] += histogram[index:].sum()  # the clipped mass lands in the last bin
        chunks = np.array_split(reference, 128)
        quantized = np.concatenate([np.where(c > 0, c.sum() / max((c > 0).sum(), 1), 0) for c in chunks])
        p, q = reference / reference.sum(), quantized / max(quantized.sum(), 1e-12)
        mask = p > 0
        divergence = float((p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))).sum())
        if divergence < best_divergence:
            best, best_divergence = float(edges[index]), divergence
    return min(best, absmax)


def linear_inputs(model: ir.Model, layers: Iterable[str]) -> dict[str, str]:
    """layer name -> name of the activation tensor feeding it."""
    wanted = set(layers)
    return {node.name: node.inputs[0].name for node in model.graph if node.name in wanted}


def collect(model_path: Path, tensors: list[str], samples: np.ndarray, facts: dict, threads: int,
            seed: int = 0, scratch: Path | None = None) -> dict[str, TensorStats]:
    """Run the prefill of each sample with the named tensors added as outputs; stream them into stats.
    `scratch`: where the augmented model copy goes (a stage's working folder, so a killed build's copy is
    cleaned by the next build; the system's temporary folder when None)."""
    rng = np.random.default_rng(seed)
    stats: dict[str, TensorStats] = {}
    for outputs in stream(model_path, tensors, samples, facts, threads, scratch):
        for name, value in outputs.items():
            if name not in stats:
                stats[name] = TensorStats(channels=value.shape[-1])
            stats[name].update(value, rng)
    return stats


def stream(model_path: Path, tensors: list[str], samples: np.ndarray, facts: dict, threads: int,
           scratch: Path | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The named intermediate tensors of each sample's prefill, one sample at a time (bounded memory)."""
    model = ir.load(str(model_path))
    values = {v.name: v for node in model.graph for v in node.outputs}
    for name in tensors:
        if values[name] not in model.graph.outputs:
            model.graph.outputs.append(values[name])
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        augmented = Path(tmp) / "augmented.onnx"
        ir.save(model, augmented)
        del model, values
        session = plain_session(augmented, threads)
        for window in track(samples, f"[statistics] {len(tensors)} tensors"):
            yield dict(zip(tensors, session.run(tensors, prefill_feeds(window[None], facts))))


def gram_matrices(model_path: Path, channels: dict[str, int], samples: np.ndarray, facts: dict, threads: int,
                  budget_bytes: int = 512 * 2**20, scratch: Path | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(tensor, XᵀX over every calibration position) for each named tensor of `channels` (name -> width), one
    at a time: GPTQ's Hessians. Memory is bounded by `budget_bytes` of float64 sums, not by the model: the
    tensors are taken in chunks that fit it, one pass over the samples per chunk (two passes on the default
    model at the default budget)."""
    for chunk in _chunks(channels, budget_bytes):
        grams = {name: np.zeros((channels[name], channels[name])) for name in chunk}
        for outputs in stream(model_path, chunk, samples, facts, threads, scratch):
            for name, value in outputs.items():
                x = value.reshape(-1, channels[name]).astype(np.float32, copy=False)
                grams[name] += x.T @ x  # one window's product in float32 (twice as fast), the sum in float64
        for name in chunk:
            yield name, grams.pop(name)


def _chunks(channels: dict[str, int], budget_bytes: int) -> list[list[str]]:
    """The tensors in order, grouped so that each group's float64 Gram matrices fit the budget (a tensor whose
    Gram alone is larger goes alone)."""
    chunks, used = [[]], 0
    for name, width in channels.items():
        size = 8 * width * width
        if chunks[-1] and used + size > budget_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += size
    return [chunk for chunk in chunks if chunk]
