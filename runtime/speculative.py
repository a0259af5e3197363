"""Lossless speculative decoding at batch 1: propose a few tokens cheaply, check them all with one call of the
target engine, keep the longest prefix the target agrees with.

One decode step reads every weight to make one token; a verify step (`session.extend`) reads them once for
k + 1 tokens, so on a memory-bound engine it costs little more than one step. The cache then rolls back to
the accepted length (`session.rollback`): on fused CPU engines the cache buffers are shared between past and
present and GroupQueryAttention reads only as many positions as the attention mask says, so a rollback is
a shorter mask, nothing copied. Engines without that (unfused attention, a GPU cache) decode without
speculation, and the report says why.

Losslessness: greedy keeps a draft token only where it equals the target's argmax at its position, so the
tokens are the plain loop's. Sampling uses the standard rejection rule (Leviathan et al. 2023; Chen et al.
2023): keep draft token x with probability min(1, p(x) / q(x)), on rejection draw from max(0, p - q)
normalised, where p is the target's distribution after temperature, top-k and top-p, and q the proposer's
(a point mass for prompt lookup). Every emitted token is then distributed as plain sampling would give it.

Proposers: `NgramProposer` (prompt lookup: the tokens that followed the latest earlier occurrence of the last
few tokens, in the prompt or the text so far; no model) and `DraftProposer` (a smaller engine with the same
tokenizer, through its own Session). `Governor` sizes the draft from the measured acceptance and pauses
speculation when its measured time per token is worse than plain decoding, so it never costs much.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

import runtime
from runtime import artifact as artifacts
from runtime.errors import BadInputError

METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class SpeculativeConfig:
    # 'ngram' (prompt lookup, no extra model) or 'draft' (a draft model's session proposes).
    method: str = "ngram"
    # Draft length bounds and start: the Governor moves between them as drafts are accepted or rejected.
    min_draft: int = 1
    max_draft: int = 8
    initial_draft: int = 4
    # Prompt lookup matches the last n tokens, longest n first; below 2, single common tokens match everywhere
    # and propose noise.
    max_ngram: int = 3
    min_ngram: int = 2
    # Rounds of measurement before the Governor judges whether speculation pays, and how long it then pauses
    # (in plain decode steps; doubled each time it still does not pay, up to the maximum).
    judge_after_rounds: int = 4
    # Plain steps at the start, to measure the time a speculative round must beat.
    probe_steps: int = 2
    pause_steps: int = 16
    max_pause_steps: int = 512

    def validate(self) -> None:
        if self.method not in METHODS:
            raise BadInputError(f"unknown speculative method {self.method!r}; use --speculative ngram or "
                                "--speculative draft --draft ARTIFACT")
        if not 1 <= self.min_draft <= self.initial_draft <= self.max_draft:
            raise BadInputError(f"need 1 <= min_draft <= initial_draft <= max_draft, got {self.min_draft}, "
                                f"{self.initial_draft}, {self.max_draft}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise BadInputError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")


# -- distributions and the acceptance rule -------------------------------------------------------------------

def sampling_distribution(row: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The distribution over the vocabulary that generate's Sampler draws from (temperature, then top-k, then
    top-p, with the same cut-offs), as a dense float64 vector: the p and q of the rejection rule."""
    scores = row.astype(np.float64) / temperature
    if not top_k and top_p >= 1.0:  # the common case: a plain softmax, no sort over the vocabulary
        probs = np.exp(scores - scores.max())
        return probs / probs.sum()
    order = np.argsort(-scores)
    if top_k:
        order = order[:top_k]
    kept = np.exp(scores[order] - scores[order[0]])
    kept /= kept.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(kept), top_p) + 1)
        order, kept = order[:keep], kept[:keep] / kept[:keep].sum()
    probs = np.zeros(row.shape[-1])
    probs[order] = kept
    return probs


def accept_greedy(drafts: Sequence[int], logits: np.ndarray) -> tuple[int, int]:
    """(drafts accepted, the target's own next token) for `logits` [len(drafts) + 1, vocab] of the verify step:
    a draft survives only where it is the target's argmax, so the output is plain greedy decoding's."""
    targets = logits.argmax(axis=-1)
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return accepted, int(targets[accepted])


def accept_sampled(drafts: Sequence[int], draft_probs: Sequence[np.ndarray] | None, target_probs,
                   rng: np.random.Generator) -> tuple[int, int]:
    """The rejection rule. `target_probs(i)` is the target's distribution at draft position i (computed only
    as far as needed), `draft_probs[i]` the proposer's, or None for a point mass on the draft (prompt lookup).
    Returns (drafts accepted, the next token: the resample on rejection, else a draw from the position after)."""
    for i, token in enumerate(drafts):
        p = target_probs(i)
        q = draft_probs[i] if draft_probs is not None else None
        q_token = 1.0 if q is None else q[token]
        if rng.random() * q_token < p[token]:  # u < p/q without dividing by a q of 0
            continue
        if q is None:
            residual = p.copy()
            residual[token] = 0.0
        else:
            residual = np.maximum(p - q, 0.0)
        return i, draw(residual, rng)
    return len(drafts), draw(target_probs(len(drafts)), rng)


def draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    """One token from non-negative weights (normalised here): inverse CDF, cheaper than rng.choice on a vocab."""
    cumulative = np.cumsum(weights)
    return int(min(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"), len(weights) - 1))


class TokenPicker:
    """The next token from a logits row, greedy or sampled with the generation's settings; one random stream
    for the whole generation, so a seed repeats a run."""

    def __init__(self, temperature: float, top_k: int, top_p: float, seed: int | None):
        self.greedy = temperature == 0
        self.settings = (temperature, top_k, top_p)
        self.rng = np.random.default_rng(seed)

    def distribution(self, row: np.ndarray) -> np.ndarray:
        return sampling_distribution(row, *self.settings)

    def pick(self, row: np.ndarray) -> int:
        return int(row.argmax()) if self.greedy else draw(self.distribution(row), self.rng)

    def verify(self, drafts: list[int], draft_probs, logits: np.ndarray) -> tuple[int, int]:
        """(drafts accepted, next token) from the verify step's logits [len(drafts) + 1, vocab]."""
        if self.greedy:
            return accept_greedy(drafts, logits)
        return accept_sampled(drafts, draft_probs, lambda i: self.distribution(logits[i]), self.rng)


# -- proposers ------------------------------------------------------------------------------------------------

class NgramProposer:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the context's last n tokens
    (n from max_ngram down to min_ngram), in the prompt or the text so far. An index of n-gram -> where its
    continuation starts, extended by the new tokens on each call, keeps a lookup O(1) however long the text."""

    name = "ngram"

    def __init__(self, config: SpeculativeConfig):
        self.sizes = range(config.max_ngram, config.min_ngram - 1, -1)
        self.index: dict[tuple[int, ...], int] = {}
        self.indexed = 1  # n-grams ending before this position are in the index
        self.draft_probs = None  # a point mass on each proposed token

    def start(self, context: list[int]) -> None:
        self.index, self.indexed = {}, 1

    def propose(self, context: list[int], count: int, picker: TokenPicker) -> list[int]:
        # Index every n-gram that has a token after it: all but those ending at the last position.
        for end in range(self.indexed, len(context)):
            for n in self.sizes:
                if end >= n:
                    self.index[tuple(context[end - n:end])] = end  # the latest occurrence wins
        self.indexed = max(self.indexed, len(context))
        for n in self.sizes:
            start = self.index.get(tuple(context[-n:])) if len(context) > n else None
            if start is not None:
                return context[start:start + count]
        return []


class DraftProposer:
    """A draft model's Session proposes: it decodes `count` tokens after the context, greedy or sampled from
    its own distribution q (kept for the rejection rule) with the target's sampling settings. Its cache follows
    the accepted text: before each proposal it rolls back to what it shares with the context and feeds the
    rest in one call."""

    name = "draft"

    def __init__(self, session):
        self.session = session
        self.cached: list[int] = []  # the tokens in the draft's cache, in order
        self.agreed = 0  # a length up to which the cache and the context are known to be equal
        self.draft_probs: list[np.ndarray] | None = None

    def start(self, context: list[int]) -> None:
        self.cached, self.agreed = [], 0

    def propose(self, context: list[int], count: int, picker: TokenPicker) -> list[int]:
        logits = self._catch_up(context)
        drafts: list[int] = []
        self.draft_probs = None if picker.greedy else []
        for i in range(count):
            if i:
                logits = self.session.decode([drafts[-1]])[0, -1]
                self.cached.append(drafts[-1])
            if picker.greedy:
                drafts.append(int(logits.argmax()))
            else:
                q = picker.distribution(logits)
                self.draft_probs.append(q)
                drafts.append(draw(q, picker.rng))
        return drafts

    def _catch_up(self, context: list[int]) -> np.ndarray:
        """Make the draft's cache hold the whole context, its last token fed now; that token's logits."""
        shared = self._shared_prefix(context)
        if shared == 0:
            self.session.reset()
            logits = self.session.prefill(np.array([context]), last_only=True)[0, -1]
        else:
            shared = min(shared, len(context) - 1)  # at least the last token is fed, for fresh logits
            if shared < len(self.cached):
                self.session.rollback(shared)
            logits = self.session.extend([context[shared:]])[0, -1]
        self.cached, self.agreed = list(context), len(context)
        return logits

    def _shared_prefix(self, context: list[int]) -> int:
        """Leading tokens the draft's cache shares with the context: they agree up to the last proposal's
        context and part at the first rejected draft, so the scan starts there."""
        limit = min(len(self.cached), len(context))
        shared = min(self.agreed, limit)
        while shared < limit and self.cached[shared] == context[shared]:
            shared += 1
        return shared


# -- when to speculate, and how far -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Payoff:
    """What a Governor learned about whether speculation pays, carried from one request to the next: the plain
    step time, the pause still to run and the next pause's length."""

    plain_ms: float
    pause_left: int
    next_pause: int


class Governor:
    """Decides each step's draft length (0: decode plainly).

    Length: +2 after a round whose drafts were all accepted, -1 after one with a rejection (the schedule of
    Hugging Face's assisted generation), within [min_draft, max_draft].
    Payoff: every `judge_after_rounds` speculative rounds, their time per emitted token is compared with the
    measured time of a plain decode step; where speculation costs more, it pauses for `pause_steps` plain
    steps, twice as long each time it still does not pay. The first `probe_steps` steps are plain, to measure
    that time. Given the last request's `Payoff`, it starts from it instead: no probe, and a pause still running
    goes on, so a draft that does not pay is not tried afresh (and its prompt not prefilled) on every request."""

    SMOOTHING = 0.25  # weight of the newest plain step in the running mean of plain step times

    def __init__(self, config: SpeculativeConfig, carried: Payoff | None = None):
        self.config = config
        self.draft = config.initial_draft
        self.plain_ms: float | None = None
        self.pause_left = config.probe_steps
        self.next_pause = config.pause_steps
        if carried is not None:
            self.plain_ms, self.pause_left, self.next_pause = carried.plain_ms, carried.pause_left, carried.next_pause
        self.pauses = 0
        self._window_ms = 0.0
        self._window_tokens = 0
        self._window_rounds = 0

    def draft_length(self, remaining: int) -> int:
        """Draft tokens for this step, given `remaining` tokens still to generate (the verify step adds one)."""
        if self.pause_left:
            return 0
        return max(0, min(self.draft, remaining - 1))

    def record_plain(self, ms: float) -> None:
        self.plain_ms = ms if self.plain_ms is None else (1 - self.SMOOTHING) * self.plain_ms + self.SMOOTHING * ms
        self.pause_left = max(0, self.pause_left - 1)

    def record_round(self, drafted: int, accepted: int, ms: float) -> None:
        config = self.config
        self.draft = (min(config.max_draft, self.draft + 2) if accepted == drafted
                      else max(config.min_draft, self.draft - 1))
        self._window_ms += ms
        self._window_tokens += accepted + 1
        self._window_rounds += 1
        if self._window_rounds >= config.judge_after_rounds:
            self._judge()

    def payoff(self) -> Payoff | None:
        """What the next request's Governor starts from (None before a plain step was measured)."""
        return None if self.plain_ms is None else Payoff(self.plain_ms, self.pause_left, self.next_pause)

    def _judge(self) -> None:
        if self.plain_ms is None:  # no plain step measured yet (probe_steps 0): nothing to compare with
            pass
        elif self._window_ms / self._window_tokens > self.plain_ms:  # slower per token than decoding plainly
            self.pause_left, self.pauses = self.next_pause, self.pauses + 1
            self.next_pause = min(2 * self.next_pause, self.config.max_pause_steps)
        else:
            self.next_pause = self.config.pause_steps
        self._window_ms, self._window_tokens, self._window_rounds = 0.0, 0, 0


# -- the speculative generation loop -----------------------------------------------------------------------------

@dataclass
class SpeculationStats:
    drafted: int = 0  # draft tokens sent to verify steps
    accepted: int = 0  # of those, the ones the target kept
    verify_steps: int = 0  # target calls that checked drafts
    step_ms: list[float] = field(default_factory=list)  # per output token: a verify step's time shared out


@dataclass
class Speculator:
    """What `generate(..., speculator=...)` needs: the settings and, for method 'draft', the draft's Session
    (opened by the caller, or by `open_speculator`, and closed with it)."""

    config: SpeculativeConfig
    draft: object | None = None
    # The last finished request's payoff (Governor.payoff): requests come one after another through one
    # Speculator (generate's loop, or the service's one slot that speculates while it runs alone).
    carried: Payoff | None = None

    def governor(self) -> Governor:
        return Governor(self.config, self.carried)

    def remember(self, governor: Governor) -> None:
        self.carried = governor.payoff() or self.carried

    def close(self) -> None:
        if self.draft is not None:
            self.draft.close()

    def why_not(self, session, batch: int) -> str | None:
        """Why generation on this session cannot speculate (None: it can); the report carries the reason."""
        if batch != 1:
            return f"speculation off: it runs at batch 1, this batch is {batch}"
        for role, engine in (("engine", session), ("draft", self.draft)):
            if engine is not None and not getattr(engine, "supports_rollback", False):
                return (f"speculation off: the {role} {engine.artifact.id} cannot roll its cache back without "
                        "copying (unfused attention or a GPU cache); build it fused for the CPU")
        return None

    def proposer(self):
        return DraftProposer(self.draft) if self.config.method == "draft" else NgramProposer(self.config)


def speculative_decode(session, prompt: list[int], first: int, picker: TokenPicker, speculator: Speculator,
                       max_new_tokens: int, stop: set[int], emit) -> SpeculationStats:
    """Decode after a prefill whose sampled token is `first` (already emitted), until a stop token or
    `max_new_tokens` tokens in all. `emit(token) -> bool` takes each new token and says whether to stop."""
    proposer = speculator.proposer()
    governor = speculator.governor()
    context = [*prompt, first]
    proposer.start(context)
    stats = SpeculationStats()
    generated, finished = 1, first in stop
    while not finished and generated < max_new_tokens:
        started = time.perf_counter()
        count = governor.draft_length(max_new_tokens - generated)
        drafts = proposer.propose(context, count, picker) if count else []
        if drafts:
            cached = session.cache_length
            logits = session.extend([[context[-1], *drafts]])[0]
            accepted, token = picker.verify(drafts, proposer.draft_probs, logits)
            session.rollback(cached + 1 + accepted)  # keep the fed token and the accepted drafts
            new = [*drafts[:accepted], token]
        else:
            new = [picker.pick(session.decode([context[-1]])[0, -1])]
        emitted = 0
        for token in new:
            context.append(token)
            generated, emitted = generated + 1, emitted + 1
            finished = emit(token) or generated >= max_new_tokens
            if finished:
                break
        ms = (time.perf_counter() - started) * 1000
        if drafts:
            governor.record_round(len(drafts), accepted, ms)
            stats.drafted, stats.accepted, stats.verify_steps = (stats.drafted + len(drafts),
                                                                 stats.accepted + accepted, stats.verify_steps + 1)
        else:
            governor.record_plain(ms)
        stats.step_ms += [ms / emitted] * emitted  # time per output token, as the plain loop reports it
    speculator.remember(governor)
    return stats


def open_speculator(method: str | None, draft_path: str | None, target, options=None) -> Speculator | None:
    """A Speculator from the command-line flags `--speculative METHOD` and `--draft ARTIFACT` (None for
    neither); the draft is opened here and checked against the target's vocabulary and tokenizer."""
    check_speculation_flags(method, draft_path)
    if method is None:
        return None
    config = SpeculativeConfig(method=method)
    if method != "draft":
        return Speculator(config)
    draft_path = draft_path or paired_draft(target)
    if draft_path is None:
        raise BadInputError(f"engine {target.id} has no draft built with it; pass --draft ARTIFACT (an engine with "
                            "the same tokenizer), or build one with `python -m export.build --draft layers=N`")
    # The draft only proposes: its rounding cannot change the target's tokens, so it never pays for exactness.
    draft = runtime.open(draft_path, replace(options, exact_speculation=False) if options else options)
    try:
        check_same_tokenizer(target, draft.artifact)
    except BadInputError:
        draft.close()
        raise
    return Speculator(config, draft)


EXACT_SPECULATION_HELP = ("decode each token as a verify step computes it, so greedy speculation gives exactly the "
                          "tokens this session's plain decoding gives, on int8 engines too; plain decode steps cost "
                          "more (fused CPU engines)")


def check_speculation_flags(method: str | None, draft_path: str | None) -> None:
    """`--speculative METHOD` and `--draft ARTIFACT` make sense together, before anything loads (`--speculative
    draft` alone takes the draft the engine was built with)."""
    if method is None:
        if draft_path:
            raise BadInputError("--draft needs --speculative draft")
        return
    SpeculativeConfig(method=method).validate()
    if method != "draft" and draft_path:
        raise BadInputError(f"--draft is for --speculative draft, not {method}; drop --draft")

PAIRED_DRAFT = "draft"  # the key of an engine's manifest config that names the draft built with it


def paired_draft(target) -> Path | None:
    """The draft engine `python -m export.build --draft` built with `target`, in the same store; None if none."""
    ident = target.manifest.get("config", {}).get(PAIRED_DRAFT)
    return target.path.parent / artifacts.folder_name(target.manifest.get("stage", "engine"), ident) if ident else None


def check_same_tokenizer(target, draft) -> None:
    """A draft must speak the target's token ids: the same vocabulary size and, where both ship one, the same
    tokenizer.json."""
    ours, theirs = target.model_facts["vocab_size"], draft.model_facts["vocab_size"]
    if ours != theirs:
        raise BadInputError(f"the draft {draft.path} has a vocabulary of {theirs} tokens, the engine {ours}; "
                            "pick a draft built from the same model family and tokenizer")
    files = [art.manifest.get("files", {}).get("tokenizer.json") for art in (target, draft)]
    if all(files) and files[0]["sha256"] != files[1]["sha256"]:
        raise BadInputError(f"the draft {draft.path} has a different tokenizer.json from the engine; pick a draft "
                            "built with the engine's tokenizer")
