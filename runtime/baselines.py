"""Baselines this runtime is measured against. The plain onnxruntime-Python loop: the same graph driven the
way most users first write it (`InferenceSession.run` with numpy feeds, the cache copied back through Python
each step), the baseline the C-API session must not be slower than and the reference its logits are checked
against. And onnxruntime-genai's own loop on a model its builder made (optional: only where it is installed)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.contract import kv_names, prefill_feeds


@dataclass
class LoopRun:
    tokens: list[int] = field(default_factory=list)
    last_logits: list[np.ndarray] = field(default_factory=list)  # logits of the last position, per step
    ttft_ms: float = 0.0
    step_ms: list[float] = field(default_factory=list)


def plain_session(model_path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only, as the runtime's own sessions
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def plain_greedy(session, facts: dict, prompt: np.ndarray, steps: int) -> LoopRun:
    """Greedy decoding of one prompt [1, length] for `steps` tokens, prefill with past length 0."""
    names = kv_names(facts["layers"])
    feeds = prefill_feeds(np.asarray(prompt, dtype=np.int64).reshape(1, -1), facts)
    past: list[np.ndarray] = []
    done = 0
    run = LoopRun()
    for _ in range(steps):
        started = time.perf_counter()
        if run.tokens:  # decode: the last token, attending to everything so far
            feeds = {"input_ids": np.array([[run.tokens[-1]]], dtype=np.int64),
                     "attention_mask": np.ones((1, done + 1), np.int64),
                     "position_ids": np.array([[done]], dtype=np.int64)} | dict(zip(names, past))
        logits, *past = session.run(None, feeds)
        done += feeds["input_ids"].shape[1]
        run.last_logits.append(logits[0, -1])
        run.tokens.append(int(logits[0, -1].argmax()))
        elapsed = (time.perf_counter() - started) * 1000
        if len(run.tokens) == 1:
            run.ttft_ms = elapsed
        else:
            run.step_ms.append(elapsed)
    return run


def genai_loop(model_dir: str | Path, prompt: list[int], steps: int, threads: int | None):
    """onnxruntime-genai's own generation loop on a folder with a genai_config.json (its builder's model, or an
    lmforge engine): a function that runs one greedy generation of exactly `steps` tokens and returns
    (TTFT ms, decode step ms)."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    length = len(prompt) + steps

    def run() -> tuple[float, list[float]]:
        params = og.GeneratorParams(model)
        # min_length too: every run generates exactly `steps` tokens, as ours do (no stop on EOS).
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        generator = og.Generator(model, params)
        started = time.perf_counter()
        generator.append_tokens(prompt)
        generator.generate_next_token()
        ttft = (time.perf_counter() - started) * 1000
        step_ms = []
        while not generator.is_done():
            started = time.perf_counter()
            generator.generate_next_token()
            step_ms.append((time.perf_counter() - started) * 1000)
        return ttft, step_ms

    return run
