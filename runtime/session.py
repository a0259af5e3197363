"""The Session: the runtime's view of one engine. The KV cache lives inside it.

`runtime.open(artifact)` (runtime/__init__.py) picks the implementation from the manifest's backend. Every
backend shares the input checks and the bookkeeping of attention mask and positions (`CacheState`), so the
generation loop drives all of them the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from runtime import artifact as artifacts
from runtime.errors import EXIT_BAD_INPUT, BadInputError, LmforgeError


@dataclass(frozen=True)
class SessionOptions:
    # Intra-op threads; decode of a small model is latency-bound, so all cores of one socket by default.
    threads: int = os.cpu_count() or 1
    # Execution provider: 'cpu' (every onnxruntime wheel has it) or 'cuda' (onnxruntime-gpu and an NVIDIA GPU).
    provider: str = "cpu"
    # Path of the ONNX Runtime shared library; None finds the installed one (runtime.ort_capi.find_library).
    library: str | None = None
    # Back the engine's weights with 2 MiB pages where the OS allows it (runtime/hugepages.py; CPU only).
    huge_pages: bool = True
    # Write ONNX Runtime's per-node profile (chrome-trace JSON) to a file starting with this path; the `ort`
    # backend only. `OrtSession.end_profiling()` closes it and says where it is (runtime/step_profile.py reads it).
    profile: str | None = None
    # Decode each token in a two-token call (the token twice; the copy's position is rolled back at once), so a
    # position is computed exactly as a speculative verify step computes it. ONNX Runtime's CPU kernels round a
    # one-row product differently from a multi-row one, and int8 activation quantization can turn that last bit
    # into another token where the two best are close. Greedy speculation then gives plain decoding's tokens
    # exactly; each plain decode step costs more (docs/speculative.md). Fused CPU engines only (the rollback); batch
    # 1 only, as speculation (a batch decodes as without it).
    exact_speculation: bool = False


# The engines' optional input (a default of 0: every position) that asks for the last n positions' logits.
LOGITS_TO_KEEP = "logits_to_keep"
# The fused engines' optional input (int64 [batch], default [-1]: every row as long as the mask) giving each
# row's cached positions, so one step runs rows of different lengths (engines/fusion.py; the service's slots).
CACHE_LENGTHS = "cache_lengths"


class Session(Protocol):
    """prefill/decode return logits [batch, sequence, vocab] as a view that is valid until the next call.
    `prefill(..., last_only=True)` says only the last position's logits are needed (generation): an engine
    that can skip the others (its LM head then runs on one position) returns [batch, 1, vocab]."""

    artifact: artifacts.Artifact

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                last_only: bool = False) -> np.ndarray: ...

    def decode(self, tokens: np.ndarray) -> np.ndarray: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


class SessionClosedError(LmforgeError):
    exit_code = EXIT_BAD_INPUT  # using a session after close() is the caller's mistake


@dataclass
class CacheState:
    """Attention mask and next positions of the sequences in the cache (left padding allowed)."""

    mask: np.ndarray  # [batch, total] int64, 0 on left padding
    next_position: np.ndarray  # [batch] int64
    padded: bool  # whether any sequence has left padding

    @property
    def length(self) -> int:
        return self.mask.shape[1]


def check_prompt(input_ids, attention_mask, facts: dict) -> tuple[np.ndarray, np.ndarray]:
    """Validate a prefill batch; returns (input_ids, attention_mask) as contiguous int64 [batch, sequence]."""
    ids = np.ascontiguousarray(np.asarray(input_ids, dtype=np.int64))
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
        raise BadInputError("empty prompt: pass at least one token")
    mask = np.ones_like(ids) if attention_mask is None else np.ascontiguousarray(attention_mask, dtype=np.int64)
    if mask.shape != ids.shape:
        raise BadInputError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    if (mask.sum(axis=1) == 0).any():
        raise BadInputError("empty prompt: a sequence in the batch has no tokens")
    check_token_ids(ids[mask.astype(bool)], facts)
    check_context(ids.shape[1], facts)
    return ids, mask


def check_token_ids(ids: np.ndarray, facts: dict) -> None:
    vocab = facts["vocab_size"]
    if not ids.size:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise BadInputError(f"token id {bad} is outside the vocabulary [0, {vocab}); encode text with the "
                            "artifact's tokenizer")


def layer_kv_heads(facts: dict) -> list[int]:
    """KV heads of each layer: equal unless structured pruning removed KV groups from some layers."""
    return facts.get("layer_kv_heads") or [facts["kv_heads"]] * facts["layers"]


def cache_kv_heads(facts: dict) -> list[int]:
    """KV heads of each cache tensor, in the contract's order: layer 0 key, layer 0 value, layer 1 key, ..."""
    return [heads for heads in layer_kv_heads(facts) for _ in ("key", "value")]


def check_context(total: int, facts: dict) -> None:
    limit = facts.get("max_context")
    if limit and total > limit:
        raise BadInputError(f"{total} tokens exceed the model's context of {limit}; shorten the prompt or "
                            "generate fewer tokens")


def prefill_state(mask: np.ndarray) -> tuple[CacheState, np.ndarray]:
    """State after a prefill, and the position ids of the prompt (counted from each row's first real token)."""
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
    return CacheState(mask=mask, next_position=positions[:, -1] + 1, padded=not mask.all()), positions


def decode_tokens(state: CacheState, tokens) -> np.ndarray:
    """A decode step's tokens as input_ids [batch, 1], one per row of the cache."""
    ids = np.array(tokens, dtype=np.int64).reshape(-1, 1)
    if ids.shape[0] != state.mask.shape[0]:
        raise BadInputError(f"decode got {ids.shape[0]} tokens for a batch of {state.mask.shape[0]}")
    return ids


def decode_step(state: CacheState, tokens, facts: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids [batch, 1], attention_mask [batch, total+1], position_ids [batch, 1]) for one decode step."""
    ids = decode_tokens(state, tokens)
    batch = state.mask.shape[0]
    check_token_ids(ids, facts)
    check_context(state.length + 1, facts)
    if state.padded:
        state.mask = np.concatenate([state.mask, np.ones((batch, 1), np.int64)], axis=1)
    else:  # no padding: a fresh block of ones is cheaper than growing the old mask
        state.mask = np.ones((batch, state.length + 1), np.int64)
    positions = state.next_position.reshape(-1, 1)
    state.next_position = state.next_position + 1
    return ids, state.mask, positions


def extend_step(state: CacheState, tokens, facts: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, position_ids) for several tokens per row after the cache in one step
    (speculative decoding's verify step); `tokens` is [batch, n] or, for one row, [n]."""
    ids = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64))
    if ids.ndim == 1:
        ids = ids[None]
    batch = state.mask.shape[0]
    if ids.ndim != 2 or ids.shape[0] != batch or ids.shape[1] == 0:
        raise BadInputError(f"extend takes [batch={batch}, n >= 1] tokens, got shape {list(ids.shape)}")
    check_token_ids(ids, facts)
    check_context(state.length + ids.shape[1], facts)
    state.mask = np.concatenate([state.mask, np.ones(ids.shape, np.int64)], axis=1)
    positions = state.next_position[:, None] + np.arange(ids.shape[1], dtype=np.int64)
    state.next_position = state.next_position + ids.shape[1]
    return ids, state.mask, positions


def rollback_state(state: CacheState, length: int) -> None:
    """Forget every cached position from `length` on: the mask (and so what attention reads) gets shorter and
    the next token takes position `length` again. No cache memory is touched; the next step overwrites it."""
    if not 0 < length <= state.length:
        raise BadInputError(f"cannot roll the cache back to {length} positions; it holds {state.length}")
    state.next_position = state.next_position - (state.length - length)
    state.mask = state.mask[:, :length]
