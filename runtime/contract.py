"""The ONNX contract's names and feeds (docs/architecture.md, "The ONNX contract"): the cache tensors
`past_key_values.{i}.key/value` (inputs) and `present.{i}.key/value` (outputs), and the feeds of a prefill.
Here, in the runtime, because the runtime drives the contract and may import nothing above it; the export,
the graph passes and verification use the same helpers."""

from __future__ import annotations

import numpy as np

from runtime.session import cache_kv_heads

PAST, PRESENT = "past_key_values", "present"


def kv_names(layers: int, prefix: str = PAST) -> list[str]:
    """The contract's cache names: `past_key_values.{i}.key/value` (inputs) or `present.{i}...` (outputs)."""
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def cache_layer(name: str) -> int | None:
    """The layer a cache input or output belongs to (`past_key_values.3.key` -> 3); None for any other name."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] in (PAST, PRESENT) and len(parts) == 3 else None


def prefill_feeds(ids: np.ndarray, facts: dict) -> dict[str, np.ndarray]:
    """Feeds for a prefill of `ids` [batch, sequence] from an empty cache (past length 0)."""
    ids = np.asarray(ids, dtype=np.int64)
    batch, length = ids.shape
    heads = cache_kv_heads(facts)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.tile(np.arange(length, dtype=np.int64), (batch, 1))}
    return feeds | {name: np.zeros((batch, h, 0, facts["head_dim"]), np.float32)
                    for name, h in zip(kv_names(facts["layers"]), heads)}
