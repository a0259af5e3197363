"""LatencyReport: how long the user waited, per token, honestly measured (warm-up kept apart); what speculative
decoding achieved; and the bytes a decode step reads with the bandwidth that implies, as gpt-fast prints it.

Bytes per decode step (an approximation from the manifest, docs/speculative.md): the engine's model files,
less an input-embedding table that is only gathered (one row per token) where the LM head reads a quantized
copy of its own (int precisions); plus the KV cache at the mean cache length of the decode steps:
cache tensors x kv_heads x head_dim x dtype bytes x length x batch. Bandwidth = those bytes / mean step time:
under speculation a step is shared by several tokens, so it is the effective figure (it can pass the
machine's physical bandwidth, which is the point of speculating)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# Endings of an artifact's model files (graph and weights); tokenizer, configs and model card are not read.
MODEL_FILE_ENDINGS = (".onnx", ".data", ".onnx_data", ".bin", ".plan", ".engine")
FLOAT_TABLE_BYTES = 4  # exported embedding tables are float32


def publish(text: str, report: dict, path: str) -> None:
    """What every measuring command ends with: its table on stdout, the whole report as JSON at `path`."""
    print(text)
    Path(path).write_text(json.dumps(report, indent=2))
    print(f"\nfull report: {path}")


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
    # Speculative decoding: the proposer ('' when off), why it was off where it was asked for, and its work.
    speculative: str = ""
    speculation_note: str = ""
    drafted_tokens: int = 0  # draft tokens sent to the engine's verify steps
    accepted_tokens: int = 0  # of those, the ones the engine kept
    verify_steps: int = 0
    # What one decode step reads (approximated from the manifest, see the module's docstring): the weights, and
    # the KV cache per cached position of one sequence.
    weight_bytes: int = 0
    kv_bytes_per_position: int = 0

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

    @property
    def acceptance_rate(self) -> float:
        """Share of the drafted tokens the engine accepted."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else float("nan")

    @property
    def mean_accepted_length(self) -> float:
        """Tokens each verify step produced: its accepted drafts plus the one the engine adds (1.0 is no gain)."""
        return (self.accepted_tokens + self.verify_steps) / self.verify_steps if self.verify_steps else float("nan")

    @property
    def bytes_per_step(self) -> float:
        """Bytes one decode step reads: the weights and the KV cache at the decode steps' mean cache length."""
        mean_length = self.prompt_tokens + (len(self.step_ms) + 1) / 2
        return self.weight_bytes + self.kv_bytes_per_position * self.batch * mean_length

    @property
    def bandwidth_gbs(self) -> float:
        """bytes_per_step x decode steps per second, GB/s (gpt-fast's "bandwidth achieved")."""
        if not self.weight_bytes or not self.step_ms:
            return float("nan")
        return self.bytes_per_step / (float(np.mean(self.step_ms)) / 1000) / 1e9

    def to_dict(self) -> dict:
        data = asdict(self)
        data |= {"tpot_ms": self.tpot_ms, "tokens_per_second": self.tokens_per_second, "total_ms": self.total_ms,
                 "acceptance_rate": self.acceptance_rate, "mean_accepted_length": self.mean_accepted_length,
                 "bytes_per_step": self.bytes_per_step, "bandwidth_gbs": self.bandwidth_gbs}
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def one_line(self) -> str:
        tpot = self.tpot_ms
        return (f"[{self.backend} {self.engine_id}] prompt {self.prompt_tokens} tok, generated "
                f"{self.generated_tokens} tok: TTFT {self.ttft_ms:.1f} ms, TPOT p50 {tpot['p50']:.2f} / p90 "
                f"{tpot['p90']:.2f} / p99 {tpot['p99']:.2f} ms, {self.tokens_per_second:.1f} tok/s"
                + "".join(f"; {part}" for part in self.extra_lines()))

    def extra_lines(self) -> list[str]:
        """Bandwidth and speculation, each a short phrase (empty where they do not apply)."""
        lines = []
        if self.weight_bytes and self.step_ms:
            lines.append(f"{self.bytes_per_step / 1e6:.0f} MB/step, {self.bandwidth_gbs:.1f} GB/s")
        if self.verify_steps:
            lines.append(f"{self.speculative}: acceptance {100 * self.acceptance_rate:.0f}%, "
                         f"{self.mean_accepted_length:.2f} tok/verify over {self.verify_steps} verify steps")
        elif self.speculative:
            lines.append(f"{self.speculative}: no draft was verified")
        if self.speculation_note:
            lines.append(self.speculation_note)
        return lines


def engine_traffic(art) -> dict[str, int]:
    """{weight_bytes, kv_bytes_per_position} of an artifact, from its manifest (see the module's docstring)."""
    files = art.manifest.get("files", {})
    weights = sum(entry["size"] for name, entry in files.items() if name.endswith(MODEL_FILE_ENDINGS))
    facts = art.model_facts
    if art.manifest.get("precision") not in (None, "fp32", "fp16") and facts.get("hidden_size"):
        # The quantizers give the LM head an int copy of its own: the float table serves only the Gather.
        weights -= facts["vocab_size"] * facts["hidden_size"] * FLOAT_TABLE_BYTES
    heads = facts.get("layer_kv_heads") or [facts.get("kv_heads", 0)] * facts.get("layers", 0)
    past = [entry for entry in art.io.get("inputs", []) if entry["name"].startswith("past_key_values.")]
    itemsize = np.dtype(past[0]["dtype"]).itemsize if past else 4
    return {"weight_bytes": max(weights, 0),
            "kv_bytes_per_position": 2 * sum(heads) * facts.get("head_dim", 0) * itemsize}
