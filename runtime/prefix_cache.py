"""Prompt prefixes kept as KV blocks, so a request whose prompt starts like an earlier one (a shared system
prompt, a conversation's history) prefills only the rest.

A block holds the cache positions of `BLOCK` consecutive prompt tokens. It is keyed by its tokens and by the
block before it (a serial number, never reused, so a key names one whole prefix and a freed pool entry can
never be mistaken for another): the chain of keys is what automatic prefix caching hashes. The pool is
allocated once from the budget; the least recently used block gives its place to a new one. A block whose
parent was evicted can no longer be reached and ages out in turn.

Not thread-safe: the service's worker thread alone uses it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from runtime.hugepages import committed_zeros

BLOCK = 16  # tokens per block: small enough that most of a shared prefix is reused, large enough to copy fast


@dataclass
class _Entry:
    serial: int
    index: int  # where its positions lie in the pool


class PrefixCache:
    def __init__(self, slot_buffers: list[np.ndarray], budget_bytes: int):
        """`slot_buffers`: the slot cache tensors ([slots, kv_heads, capacity, head_dim] each), whose
        positions this cache copies in and out; the pool takes at most `budget_bytes`."""
        per_block = sum(b.shape[1] * BLOCK * b.shape[3] * b.itemsize for b in slot_buffers)
        self.capacity = budget_bytes // per_block if per_block else 0
        # Per cache tensor [kv_heads, blocks, BLOCK, head_dim]: a run of blocks gathers straight into a slot.
        self.pool = [committed_zeros((b.shape[1], self.capacity, BLOCK, b.shape[3]), b.dtype) for b in slot_buffers]
        self.buffers = slot_buffers
        self.bytes = sum(p.nbytes for p in self.pool)
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._free = list(range(self.capacity - 1, -1, -1))
        self._serial = 0
        self.query_tokens = self.hit_tokens = 0

    def lookup(self, prompt: list[int]) -> list[int]:
        """Pool indices of the longest cached run of whole blocks that starts the prompt, leaving at least
        one token to prefill (its logits give the first generated token)."""
        found, parent = [], -1
        for start in range(0, len(prompt) - BLOCK, BLOCK):  # a run ends before the prompt's last token
            entry = self._entries.get((parent, tuple(prompt[start:start + BLOCK])))
            if entry is None:
                break
            self._entries.move_to_end((parent, tuple(prompt[start:start + BLOCK])))
            found.append(entry.index)
            parent = entry.serial
        self.query_tokens += len(prompt)
        self.hit_tokens += len(found) * BLOCK
        return found

    def load(self, blocks: list[int], slot: int) -> int:
        """Copy the blocks into the slot's first positions; returns how many positions that is."""
        if not blocks:
            return 0
        length = len(blocks) * BLOCK
        for pool, buffer in zip(self.pool, self.buffers):
            target = buffer[slot, :, :length].reshape(buffer.shape[1], len(blocks), BLOCK, buffer.shape[3])
            np.take(pool, blocks, axis=1, out=target, mode="clip")  # ids are valid; 'clip' skips a buffered copy
        return length

    def store(self, prompt: list[int], slot: int) -> None:
        """Keep the prompt's whole blocks from the slot's cache (those not kept already)."""
        parent, new = -1, []
        for start in range(0, len(prompt) - BLOCK + 1, BLOCK):
            key = (parent, tuple(prompt[start:start + BLOCK]))
            entry = self._entries.get(key)
            if entry is None:
                if len(new) + 1 >= self.capacity:  # never evict a block this call stored: it would be copied twice
                    break
                index = self._take()
                if index is None:
                    break
                self._serial += 1
                entry = self._entries[key] = _Entry(self._serial, index)
                new.append((start, index))
            else:
                self._entries.move_to_end(key)
            parent = entry.serial
        for pool, buffer in zip(self.pool, self.buffers):
            for start, index in new:
                pool[:, index] = buffer[slot, :, start:start + BLOCK]

    def _take(self) -> int | None:
        if self._free:
            return self._free.pop()
        if not self._entries:
            return None
        return self._entries.popitem(last=False)[1].index

    @property
    def blocks(self) -> int:
        return len(self._entries)
