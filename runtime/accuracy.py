"""Accuracy against the fp32 parent: perplexity on held-out windows and top-1 next-token agreement.

Used by calibration (on candidate graphs) and by engine verification (through a runtime Session)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.baselines import plain_session
from runtime.contract import prefill_feeds


@dataclass
class Evaluation:
    perplexity: float
    predictions: list[np.ndarray]  # argmax next token per position, per window

    def increase_over(self, reference: Evaluation) -> float:
        """Perplexity increase over the reference, in percent."""
        return 100 * (self.perplexity / reference.perplexity - 1)

    def agreement(self, reference: Evaluation) -> float:
        """Share of positions whose top-1 next token equals the reference's."""
        same = sum(int((a == b).sum()) for a, b in zip(self.predictions, reference.predictions))
        return same / sum(len(p) for p in reference.predictions)


def evaluate_model(model_path: Path, facts: dict, windows: np.ndarray, threads: int) -> Evaluation:
    """Evaluate an ONNX file with onnxruntime's Python API (candidate graphs that are not artifacts yet)."""
    session = plain_session(model_path, threads)
    return evaluate(lambda window: session.run(["logits"], prefill_feeds(window[None], facts))[0][0], windows)


def evaluate_session(session, windows: np.ndarray) -> Evaluation:
    """Evaluate through a runtime Session, the way services will run the engine."""

    def logits_of(window: np.ndarray) -> np.ndarray:
        session.reset()
        return np.array(session.prefill(window[None])[0])

    return evaluate(logits_of, windows)


def evaluate(logits_of: Callable[[np.ndarray], np.ndarray], windows: Iterable[np.ndarray]) -> Evaluation:
    """Perplexity of each window's next tokens (teacher forcing), and the top-1 predictions."""
    nll, count, predictions = 0.0, 0, []
    for window in windows:
        logits = logits_of(window)[:-1].astype(np.float64)
        targets = window[1:]
        peak = logits.max(axis=-1, keepdims=True)
        log_norm = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=-1))
        nll += float((log_norm - logits[np.arange(len(targets)), targets]).sum())
        count += len(targets)
        predictions.append(logits.argmax(axis=-1).astype(np.int32))
    return Evaluation(perplexity=float(np.exp(nll / count)), predictions=predictions)
