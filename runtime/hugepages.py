"""Backing an engine's weights with 2 MiB pages (Linux transparent huge pages).

Decode streams every weight once per token: a few hundred MB through 4 KiB pages is a TLB miss every few
KB, and in a virtual machine each miss walks two page tables. ONNX Runtime allocates the weights (and
their prepacked copies) with malloc, which glibc hands out on 4 KiB pages unless the process started with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1. So the session asks the kernel to collapse, in place, the
anonymous memory that appeared while ONNX Runtime loaded the engine: `madvise(MADV_COLLAPSE)`, Linux 6.1+,
which works whatever the system's THP mode (except when a process opted out). Older kernels get
`MADV_HUGEPAGE` alone, which lets khugepaged collapse the memory in the background. Elsewhere this does
nothing.

On the default model's int8-weight-only engine (2 threads, plain ONNX Runtime, 6 rounds): 7.56 ms per token
collapsed against 8.42 ms for an identical session left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from collections.abc import Iterator

import numpy as np

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
Region = tuple[int, int]  # [start, end) addresses


def anonymous_regions() -> set[Region]:
    """The process's writable anonymous mappings of at least one huge page (malloc's mmaps and heap)."""
    regions = set()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                start, end = (int(address, 16) for address in fields[0].split("-"))
                path = fields[5] if len(fields) > 5 else ""
                if fields[1].startswith("rw") and path in ("", "[heap]") and end - start >= HUGE_PAGE:
                    regions.add((start, end))
    except OSError:  # no procfs: not Linux
        return set()
    return regions


def back_with_huge_pages(regions: set[Region]) -> None:
    """Collapse each region's whole huge pages (best effort: a kernel that cannot says so in errno only)."""
    madvise = _madvise()
    if madvise is None:
        return
    for start, end in sorted(regions):
        first, last = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
        if last > first:
            madvise(first, last - first, MADV_HUGEPAGE)  # also what a kernel without MADV_COLLAPSE can do
            madvise(first, last - first, MADV_COLLAPSE)


@contextlib.contextmanager
def huge_pages_for_new_memory(enabled: bool = True) -> Iterator[None]:
    """Back the anonymous memory that the body allocates (an engine's weights) with huge pages: the
    mappings that appeared or changed meanwhile (the kernel merges neighbouring mappings, so memory next
    to the new may come along). Memory that malloc hands out again from mappings it already had stays as
    it was: a long-lived process that freed a large model before loading this one may get less."""
    before = anonymous_regions() if enabled else set()
    yield
    if enabled:
        back_with_huge_pages(anonymous_regions() - before)


def committed_zeros(shape, dtype) -> np.ndarray:
    """A zeroed array whose memory is committed now rather than at first touch. For the KV slots and the
    prefix cache: np.zeros maps its pages lazily, and a prefill into a slot never used before faulted them
    in on the way (a first 128-token prefill into a fresh slot of the default model took 290 ms against
    110 ms once its pages existed). numpy asks for huge pages for large arrays itself (madvise), so the
    memory written here lands on 2 MiB pages where the kernel allows."""
    array = np.empty(shape, dtype)
    array.fill(0)
    return array


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise
