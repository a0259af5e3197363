"""One loaded engine serving many requests: a bounded queue with back-pressure, one worker thread that owns
the Session, and static batching of requests that arrive together (left padding), with a switch to turn it
off. Each request has its own generation state; the KV cache of a batch lives only while it runs.

Thread safety: `Service.submit`, `Job.cancel` and `Metrics` are safe from any thread. A `Session` is not
(one thread drives it: the worker here). `TextCodec` encode/decode is safe to share.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, replace

from runtime.errors import LmforgeError
from runtime.generate import GenerationConfig, generate
from runtime.session import Session


class QueueFullError(LmforgeError):
    """More requests than the queue holds; the client should retry later (HTTP 429)."""


class _Cancelled(Exception):
    pass


_STOP = object()  # put on the queue by close(): the worker finishes its batch and ends


@dataclass
class Job:
    """A request in flight. Events arrive on `events` (an asyncio queue of the caller's loop):
    ('token', id), then ('done', finish_reason) or ('error', message)."""

    prompt: list[int]
    config: GenerationConfig
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    first_token: float | None = None
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    _cancel: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def post(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


def batch_key(config: GenerationConfig) -> tuple:
    """Requests batch together when they sample alike (each keeps its own max_tokens)."""
    return replace(config, max_new_tokens=0)


class Service:
    def __init__(self, session: Session, metrics=None, queue_size: int = 64, max_batch: int = 8,
                 batching: bool = True):
        self.session, self.metrics = session, metrics
        self.max_batch = max_batch if batching else 1
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._held = None  # taken from the queue but not batchable with the running batch (or _STOP)
        self._worker = threading.Thread(target=self._run, name="lmforge-service", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> Job:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            if self.metrics is not None:
                self.metrics.rejected()
            raise QueueFullError(f"the queue holds {self._queue.maxsize} requests already; retry later") from None
        return job

    def close(self) -> None:
        self._queue.put(_STOP)
        self._worker.join(timeout=30)

    # -- the worker -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self._held if self._held is not None else self._queue.get()
            self._held = None
            if first is _STOP:
                return
            batch = self._gather(first)
            live = [job for job in batch if not job.cancelled]
            for job in batch:
                if job.cancelled:
                    job.post("done", "cancelled")
            if live:
                self._generate(live)

    def _gather(self, first: Job) -> list[Job]:
        """The first job and whatever is already waiting that samples alike, up to max_batch."""
        batch, key = [first], batch_key(first.config)
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP or batch_key(job.config) != key:
                self._held = job  # the next batch starts with it (or, for _STOP, the worker ends after this one)
                break
            batch.append(job)
        return batch

    def _generate(self, jobs: list[Job]) -> None:
        now = time.perf_counter()
        for job in jobs:
            job.started = now
        config = replace(jobs[0].config, max_new_tokens=max(j.config.max_new_tokens for j in jobs))

        def on_token(row: int, token: int) -> None:
            job = jobs[row]
            if job.finished or job.cancelled:
                if all(j.finished or j.cancelled for j in jobs):
                    raise _Cancelled
                return
            if job.first_token is None:
                job.first_token = time.perf_counter()
            job.tokens.append(token)
            job.post("token", token)
            if len(job.tokens) >= job.config.max_new_tokens:
                self._finish(job, "length")

        try:
            result = generate(self.session, [job.prompt for job in jobs], config, on_token=on_token)
            for job, reason in zip(jobs, result.finish_reasons):
                if not job.finished and not job.cancelled:
                    self._finish(job, reason)
        except _Cancelled:
            pass
        except Exception as exc:  # fails this batch, never the worker: its clients would wait forever
            message = str(exc) if isinstance(exc, LmforgeError) else f"internal error: {type(exc).__name__}: {exc}"
            for job in jobs:
                if not job.finished:
                    job.finished = True
                    job.post("error", message)
        for job in jobs:
            if job.cancelled and not job.finished:
                job.finished = True
                job.post("done", "cancelled")
                if self.metrics is not None:
                    self.metrics.cancelled()

    def _finish(self, job: Job, reason: str) -> None:
        job.finished = True
        job.post("done", reason)
        if self.metrics is not None:
            self.metrics.observe(job)
