"""LatencyReport: how long the user waited, per token, honestly measured (warm-up kept apart)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@dataclass
class LatencyReport:
    engine_id: str
    backend: str
    batch: int
    prompt_tokens: int
    generated_tokens: int  # per sequence, the longest in the batch
    ttft_ms: float  # prompt in → first token out (prefill + first sampling)
    step_ms: list[float] = field(default_factory=list)  # each decode step: inter-token latency
    warmup_ttft_ms: list[float] = field(default_factory=list)  # warm-up runs, reported apart, never averaged in
    warmup_tpot_ms: list[float] = field(default_factory=list)

    @property
    def tpot_ms(self) -> dict[str, float]:
        """Time per output token over the decode steps (the first token's time is TTFT)."""
        return {f"p{q}": percentile(self.step_ms, q) for q in (50, 90, 99)} | {
            "mean": float(np.mean(self.step_ms)) if self.step_ms else float("nan")}

    @property
    def total_ms(self) -> float:
        return self.ttft_ms + sum(self.step_ms)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens (all sequences of the batch) per second of wall time, TTFT included."""
        return self.batch * self.generated_tokens / (self.total_ms / 1000) if self.total_ms else float("nan")

    def to_dict(self) -> dict:
        data = asdict(self)
        data |= {"tpot_ms": self.tpot_ms, "tokens_per_second": self.tokens_per_second, "total_ms": self.total_ms}
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def one_line(self) -> str:
        tpot = self.tpot_ms
        return (f"[{self.backend} {self.engine_id}] prompt {self.prompt_tokens} tok, generated "
                f"{self.generated_tokens} tok: TTFT {self.ttft_ms:.1f} ms, TPOT p50 {tpot['p50']:.2f} / p90 "
                f"{tpot['p90']:.2f} / p99 {tpot['p99']:.2f} ms, {self.tokens_per_second:.1f} tok/s")
