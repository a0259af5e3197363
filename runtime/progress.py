"""One progress bar for every long step (statistics, searches, engine builds, benchmarks), on stderr so
stdout stays the summary that scripts parse. Redraws in place on a terminal; one line per 10% elsewhere."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
WIDTH = 30


class Bar:
    def __init__(self, label: str, total: int, stream=None):
        self.label, self.total, self.done = label, max(total, 1), 0
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()
        self._tty = getattr(self.stream, "isatty", lambda: False)()
        self._last_decile = -1

    def advance(self, note: str = "") -> None:
        self.done = min(self.done + 1, self.total)
        decile = 10 * self.done // self.total
        if not self._tty and decile == self._last_decile and self.done != self.total:
            return
        self._last_decile = decile
        filled = WIDTH * self.done // self.total
        elapsed = time.perf_counter() - self.started
        line = (f"{self.label} [{'#' * filled}{'.' * (WIDTH - filled)}] {self.done}/{self.total} "
                f"{elapsed:.0f}s{' ' + note if note else ''}")
        end = "\n" if self.done == self.total or not self._tty else ""
        print(("\r" if self._tty else "") + line, end=end, file=self.stream, flush=True)


def track(items: Iterable[T], label: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a bar (the total from len() when not given)."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    bar = Bar(label, total if total is not None else len(items))
    for item in items:
        yield item
        bar.advance()


class Ticker:
    """For one long call with no steps to count (the ONNX export, an engine build): elapsed time every
    `every` seconds until the block ends."""

    def __init__(self, label: str, every: float = 10.0, stream=None):
        self.label, self.every, self.stream = label, every, stream or sys.stderr

    def __enter__(self) -> Ticker:
        import threading

        self._stop = threading.Event()
        self.started = time.perf_counter()
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()
        return self

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            print(f"{self.label} ... {time.perf_counter() - self.started:.0f}s", file=self.stream, flush=True)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
