"""The one generation loop for every backend, and `python -m runtime.generate ARTIFACT "prompt"`.

Greedy or sampled (temperature, top-k, top-p, seed), stop tokens, `max_new_tokens`, a streaming callback,
and a batch of prompts with left padding. Returns the tokens and a LatencyReport. With a `Speculator`
(`--speculative ngram|draft`), batch-1 decoding proposes and verifies several tokens per engine call
(runtime/speculative.py), with the same greedy output and the same sampling distribution.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from runtime.errors import BadInputError, LmforgeError
from runtime.report import LatencyReport, engine_traffic
from runtime.session import Session, check_context

TokenCallback = Callable[[int, int], None]  # (sequence index in the batch, token id)


@dataclass(frozen=True)
class GenerationConfig:
    # Tokens to generate per sequence at most (the first comes from the prefill).
    max_new_tokens: int = 128
    # 0 means greedy (argmax); above 0, logits are divided by it before sampling.
    temperature: float = 0.0
    # Sample only among the k most likely tokens; 0 keeps all.
    top_k: int = 0
    # Sample only among the most likely tokens whose probabilities add up to p; 1.0 keeps all.
    top_p: float = 1.0
    # Seed of the sampler, for repeatable sampling; None draws fresh entropy.
    seed: int | None = None
    # Tokens that end a sequence; None means the model's end-of-sequence tokens.
    stop_token_ids: tuple[int, ...] | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise BadInputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # NaN fails this too
            raise BadInputError(f"temperature must be >= 0, got {self.temperature}")
        if self.seed is not None and self.seed < 0:
            raise BadInputError(f"seed must be >= 0, got {self.seed}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise BadInputError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={self.top_k}, top_p={self.top_p}")


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated tokens per sequence, the stop token included when one was met
    finish_reasons: list[str]  # 'stop' or 'length'
    report: LatencyReport


class Sampler:
    def __init__(self, config: GenerationConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """Next token per row of `logits` [batch, vocab]."""
        if self.config.temperature == 0:
            return logits.argmax(axis=-1)
        return np.array([self._sample_row(row) for row in logits])

    def _sample_row(self, row: np.ndarray) -> int:
        scores = row.astype(np.float64) / self.config.temperature
        top_k = self.config.top_k
        if top_k and top_k < len(scores):  # partition first: sorting the whole vocabulary costs ms per row
            order = np.argpartition(-scores, top_k)[:top_k]
            order = order[np.argsort(-scores[order])]
        else:
            order = np.argsort(-scores)
        probs = np.exp(scores[order] - scores[order[0]])
        probs /= probs.sum()
        if self.config.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), self.config.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(len(order), p=probs)])


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack prompts of different lengths into (input_ids, attention_mask), padding on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise BadInputError("empty prompt: every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def generate(session: Session, prompts: Sequence[Sequence[int]] | Sequence[int],
             config: GenerationConfig = GenerationConfig(), on_token: TokenCallback | None = None,
             speculator=None) -> GenerationResult:
    """Run prefill and decode steps until every sequence stops or reaches max_new_tokens. With a
    `runtime.speculative.Speculator`, decode speculatively where the engine allows it (else plainly, and the
    report's speculation_note says why)."""
    config.validate()
    facts = session.artifact.model_facts
    if prompts and isinstance(prompts[0], (int, np.integer)):
        prompts = [list(prompts)]
    stop = set(facts["eos_token_ids"] if config.stop_token_ids is None else config.stop_token_ids)
    pad_id = next(iter(stop), 0)
    ids, mask = left_pad(prompts, pad_id)
    check_context(ids.shape[1] + config.max_new_tokens - 1, facts)
    sampler = Sampler(config)
    batch = len(prompts)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)

    def accept(next_tokens: np.ndarray) -> np.ndarray:
        for row, token in enumerate(next_tokens):
            if done[row]:
                continue
            tokens[row].append(int(token))
            if on_token is not None:
                on_token(row, int(token))
            done[row] = token in stop
        return np.where(done, pad_id, next_tokens)

    note = speculator.why_not(session, batch) if speculator is not None else None
    speculating = speculator is not None and note is None
    if speculating:  # one sampler for prefill and verify steps: the rejection rule needs its distributions
        from runtime.speculative import TokenPicker, speculative_decode

        sampler = TokenPicker(config.temperature, config.top_k, config.top_p, config.seed)

    def emit(token: int) -> bool:
        """Take one token of the single sequence; whether it ended the sequence."""
        accept(np.array([token]))
        return bool(done[0])

    session.reset()
    started = time.perf_counter()
    logits = session.prefill(ids, mask, last_only=True)
    if speculating:
        first = sampler.pick(logits[0, -1])
        emit(first)
    else:
        feed = accept(sampler(logits[:, -1, :]))
    ttft_ms = (time.perf_counter() - started) * 1000
    step_ms = []
    if speculating:
        stats = speculative_decode(session, list(prompts[0]), first, sampler, speculator, config.max_new_tokens,
                                   stop, emit)
        step_ms = stats.step_ms
    else:
        while not done.all() and len(step_ms) + 1 < config.max_new_tokens:
            step_started = time.perf_counter()
            logits = session.decode(feed)
            feed = accept(sampler(logits[:, -1, :]))
            step_ms.append((time.perf_counter() - step_started) * 1000)

    report = LatencyReport(engine_id=session.artifact.id, backend=getattr(session, "backend", "?"), batch=batch,
                           prompt_tokens=int(ids.shape[1]), generated_tokens=max(len(t) for t in tokens),
                           ttft_ms=ttft_ms, step_ms=step_ms, **engine_traffic(session.artifact))
    if speculator is not None:
        report.speculative, report.speculation_note = speculator.config.method, note or ""
    if speculating:
        report.drafted_tokens, report.accepted_tokens = stats.drafted, stats.accepted
        report.verify_steps = stats.verify_steps
    reasons = ["stop" if done[row] else "length" for row in range(batch)]
    return GenerationResult(tokens, reasons, report)


class TextStreamer:
    """Prints each sequence-0 token as text as soon as it decodes to whole characters."""

    def __init__(self, codec, out=sys.stdout):
        self.codec, self.out, self.ids, self.printed = codec, out, [], ""

    def __call__(self, row: int, token: int) -> None:
        if row != 0:
            return
        self.ids.append(token)
        text = self.codec.decode(self.ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text


def main(argv: list[str] | None = None) -> int:
    from runtime.speculative import EXACT_SPECULATION_HELP, open_speculator

    parser = argparse.ArgumentParser(prog="python -m runtime.generate", description="Generate text from an artifact")
    parser.add_argument("artifact", help="an artifact folder written by `python -m export.build`")
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--provider", default="cpu", help="ONNX Runtime execution provider: cpu or cuda")
    parser.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's chat template")
    parser.add_argument("--speculative", default=None, metavar="ngram|draft",
                        help="speculative decoding (same output): 'ngram' looks drafts up in the prompt and the text "
                             "so far; 'draft' asks a draft model (--draft)")
    parser.add_argument("--draft", default=None, metavar="ARTIFACT",
                        help="the draft model for --speculative draft: an engine with the same tokenizer")
    parser.add_argument("--exact-speculation", action="store_true",
                        help=EXACT_SPECULATION_HELP)
    args = parser.parse_args(argv)

    import runtime
    from runtime.session import SessionOptions
    from runtime.text import load_codec

    speculator = None
    try:
        # Every flag is checked before the engine loads (seconds for a real model).
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        config.validate()
        if args.threads < 1:
            raise BadInputError(f"--threads {args.threads} is not a thread count; give 1 or more")
        options = SessionOptions(threads=args.threads, provider=args.provider,
                                 exact_speculation=args.exact_speculation)
        with runtime.open(args.artifact, options) as session:
            speculator = open_speculator(args.speculative, args.draft, session.artifact, options)
            codec = load_codec(session.artifact)
            text = args.prompt
            if not args.raw and codec.chat_template:
                text = codec.render_chat([{"role": "user", "content": args.prompt}])
            result = generate(session, [codec.encode(text)], config, on_token=TextStreamer(codec),
                              speculator=speculator)
    except LmforgeError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        if speculator is not None:
            speculator.close()
    print(file=sys.stdout)
    print(result.report.one_line(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
