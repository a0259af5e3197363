"""The draft-choice stage: which of the build's candidate drafts makes the engine decode fastest, measured.

A draft's perplexity says little about the speed-up it gives: a smaller draft is proposed faster but agrees
with the target less often, and where the two balance depends on the engine and the machine. So `export.build
--draft A --draft B` builds every candidate, then this stage speculates with each on prompts no stage trained
on (the teacher's held-out prompts, or held-out calibration text for a model without them), alternated with
plain decoding of the same prompts, and pairs the candidate with the lowest time per output token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import runtime
from runtime.artifact import Artifact, ArtifactWriter
from runtime.bench_speculative import PLAIN, measure_set, runners_of
from runtime.session import SessionOptions
from runtime.speculative import open_speculator
from runtime.text import load_codec

STAGE = "draftchoice"


@dataclass(frozen=True)
class DraftChoiceConfig:
    # Prompts per candidate, and the most tokens answered per prompt: about a second of decoding each on the
    # default model, enough for the governor to settle on a draft length.
    prompts: int = 8
    max_new_tokens: int = 64
    threads: int = 1


def stage_config(config: DraftChoiceConfig, candidates: dict[str, Artifact]) -> dict[str, Any]:
    return {"prompts": config.prompts, "max_new_tokens": config.max_new_tokens, "threads": config.threads,
            "candidates": {ratios: draft.id for ratios, draft in candidates.items()}}


def run(target: Artifact, candidates: dict[str, Artifact], prompts: list[str], writer: ArtifactWriter,
        config: DraftChoiceConfig, progress=print) -> Artifact:
    """Measure speculation on `target` with each candidate (by its pruning ratios) and commit the choice
    (`metrics.chosen`, the draft engine's id)."""
    started = time.perf_counter()
    options = SessionOptions(threads=config.threads)
    speculators = {}
    try:
        with runtime.open(target, options) as session:
            for ratios, draft in candidates.items():
                speculators[ratios] = open_speculator("draft", str(draft.path), target, options)
            measured = measure_set(load_codec(target), prompts[: config.prompts], runners_of(session, speculators),
                                   None, config.max_new_tokens, config.threads, STAGE)
    finally:
        for speculator in speculators.values():
            speculator.close()
    plain = measured["runners"][PLAIN]["ms_per_token"]
    trials = [trial(ratios, draft, measured["runners"][ratios], plain) for ratios, draft in candidates.items()]
    chosen = max(trials, key=lambda t: t["speedup"])
    for t in trials:
        accepted = "-" if t["acceptance_rate"] is None else f"{t['acceptance_rate']:.0%}"
        progress(f"[{STAGE}] {t['ratios']}: {t['ms_per_token']:.2f} ms per token against {plain:.2f} without "
                 f"speculation ({t['speedup']:.2f}x), acceptance {accepted}" + (" <- chosen" if t is chosen else ""))
    if chosen["speedup"] <= 1:
        progress(f"[{STAGE}] no candidate pays on this engine; the governor will mostly decode plainly with it")
    metrics = {"chosen": chosen["draft"], "plain_ms_per_token": plain, "trials": trials,
               "prompts": measured["prompts"], "seconds": round(time.perf_counter() - started, 1)}
    return writer.commit(io=target.io, metrics=metrics, precision=target.manifest.get("precision", "fp32"))


def trial(ratios: str, draft: Artifact, figures: dict, plain_ms: float) -> dict:
    """One candidate's figures against plain decoding's."""
    return {"ratios": ratios, "draft": draft.id, "ms_per_token": figures["ms_per_token"],
            "speedup": plain_ms / figures["ms_per_token"], "acceptance_rate": figures["acceptance_rate"],
            "mean_accepted_length": figures["mean_accepted_length"]}
