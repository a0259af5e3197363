"""Accuracy against the fp32 parent: perplexity on held-out windows and top-1 next-token agreement, and the one
record every accuracy gate reports it in.

Evaluation is used by calibration (on candidate graphs) and by engine verification (through a runtime Session).
`AccuracyRecord` is what each of the six gates (export parity, prune, distill, calibrate, fp16, engine
verification) writes into its manifest's `metrics["accuracy"]`, one record per text domain measured, and what
the build summary, report.json, report.md and the model card read; `AccuracyRecord.text` is their one
formatter. It lives in the runtime because every stage package may import the runtime and none another."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
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


# The text every gate measures on today: held-out windows of the build's calibration text, which no stage fitted on.
HELD_OUT = "held-out"


@dataclass(frozen=True)
class AccuracyRecord:
    """One gate's measurement on one text domain against its reference, with the gate's limits and verdict.
    A metric a gate does not measure is None, and so is a limit it does not enforce."""

    stage: str  # the stage whose gate measured it: export, prune, distill, calibrate, fp16, engine
    against: str  # what it was compared with: "pytorch", "fp32", "parent" (unpruned graph), "teacher"
    passed: bool
    perplexity: float | None = None
    reference_perplexity: float | None = None  # the reference's perplexity on the same windows
    top1_agreement: float | None = None  # share of positions whose top-1 next token is the reference's
    logits_diff: float | None = None  # `logits_statistic` (max or mean) of |logits - reference logits|
    logits_statistic: str = "max"
    ppl_limit_percent: float | None = None  # the most perplexity increase the gate accepts
    logits_limit: float | None = None  # the largest logits_diff the gate accepts
    windows: int | None = None  # held-out windows compared (None for export parity: one fixed prompt)
    domain: str = HELD_OUT
    # The behaviour check (runtime/behaviour.py): share of probes answered right or wrong as the reference did.
    answer_agreement: float | None = None
    answer_limit: float | None = None

    @classmethod
    def of(cls, stage: str, against: str, evaluation: Evaluation, reference: Evaluation, limit: float | None = None,
           passed: bool | None = None, **more) -> AccuracyRecord:
        """The record of `evaluation` against `reference` on the same windows. Unless the gate says otherwise,
        it passed when the perplexity increase is within `limit` (or there is no limit)."""
        if passed is None:
            passed = limit is None or evaluation.increase_over(reference) <= limit
        return cls(stage, against, passed, perplexity=evaluation.perplexity, reference_perplexity=reference.perplexity,
                   top1_agreement=evaluation.agreement(reference), ppl_limit_percent=limit,
                   windows=len(reference.predictions), **more)

    @property
    def perplexity_increase_percent(self) -> float | None:
        if self.perplexity is None or not self.reference_perplexity:
            return None
        return 100 * (self.perplexity / self.reference_perplexity - 1)

    def to_dict(self) -> dict:
        """The manifest and report.json form: the fields, and the increase for readers that want it ready."""
        return asdict(self) | {"perplexity_increase_percent": self.perplexity_increase_percent}

    @classmethod
    def from_dict(cls, data: dict) -> AccuracyRecord:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def text(self) -> str:
        """One line, e.g. `vs fp32: ppl 20.11 -> 20.50 (+1.94%, limit 3%), top-1 0.912`, ending in `missed` when
        the gate was not passed."""
        parts = []
        if self.perplexity_increase_percent is not None:
            limit = "" if self.ppl_limit_percent is None else f", limit {self.ppl_limit_percent:.3g}%"
            parts.append(f"ppl {self.reference_perplexity:.2f} -> {self.perplexity:.2f} "
                         f"({self.perplexity_increase_percent:+.2f}%{limit})")
        if self.top1_agreement is not None:
            parts.append(f"top-1 {self.top1_agreement:.3f}")
        if self.logits_diff is not None:
            limit = "" if self.logits_limit is None else f" (limit {self.logits_limit:.3g})"
            parts.append(f"{self.logits_statistic}|dlogits| {self.logits_diff:.1e}{limit}")
        if self.answer_agreement is not None:
            limit = "" if self.answer_limit is None else f" (limit {self.answer_limit:.3g})"
            parts.append(f"answers agree {self.answer_agreement:.3f}{limit}")
        where = "" if self.domain == HELD_OUT else f" on {self.domain}"
        return f"vs {self.against}{where}: {', '.join(parts) or 'no figures'}" + ("" if self.passed else ", missed")


def records_text(records: Iterable[AccuracyRecord]) -> str:
    """Several records (one per domain) on one line; '-' for none."""
    return "; ".join(record.text() for record in records) or "-"


def as_metrics(records: Iterable[AccuracyRecord]) -> list[dict]:
    """The records as a manifest's `metrics["accuracy"]`."""
    return [record.to_dict() for record in records]


def records_of(metrics: dict) -> list[AccuracyRecord]:
    """The accuracy records an artifact's metrics hold (none where its stage has no gate)."""
    return [AccuracyRecord.from_dict(entry) for entry in metrics.get("accuracy", [])]


def held_out(records: list[AccuracyRecord]) -> AccuracyRecord | None:
    """The record on the build's held-out text, which every gate measures."""
    return next((record for record in records if record.domain == HELD_OUT), None)


def evaluate_domains(evaluate_windows: Callable[[np.ndarray], Evaluation], domains: dict[str, np.ndarray]
                     ) -> dict[str, Evaluation]:
    """One evaluation per text domain (name -> held-out windows)."""
    return {name: evaluate_windows(windows) for name, windows in domains.items()}


def worst_increase(evaluations: dict[str, Evaluation], references: dict[str, Evaluation]) -> float:
    """The largest perplexity increase over the domains: a gate must hold on each, so this is what it judges."""
    return max(evaluations[name].increase_over(references[name]) for name in references)


def domain_records(stage: str, against: str, evaluations: dict[str, Evaluation], references: dict[str, Evaluation],
                   limit: float | None, **more) -> list[AccuracyRecord]:
    """One record per domain, each passing on its own increase."""
    return [AccuracyRecord.of(stage, against, evaluations[name], references[name], limit=limit, domain=name, **more)
            for name in references]
