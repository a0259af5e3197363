"""One loaded engine serving many requests: the object a service embeds (`python -m runtime.serve` is a thin
HTTP layer over it).

    service = Service(runtime.open(artifact), ServiceConfig(max_batch=16))
    job = service.submit(prompt_ids, GenerationConfig(max_new_tokens=64))
    for event in job: ...            # from a thread: blocks per event
    async for event in job: ...      # from a coroutine (submitted there): awaits per event
    job.cancel()                     # any thread; the sequence frees its slot at the next step

Events: `Event("prompt", [Token])` first where prompt log-probabilities were asked for, then `Event("token",
Token)` per generated token, and last `Event("done", finish_reason)` ('stop', 'length', 'cancelled') or
`Event("error", message)`.

Schedulers (one worker thread owns the Session and runs one of them):
- continuous (engines whose attention is fused; the default): a fixed set of KV-cache slots allocated once
  (`max_batch` rows of `max_context` positions). Every step decodes all running sequences at their own
  lengths (the engine's `cache_lengths` input); new requests are admitted at every step into free slots,
  their prompts prefilled `prefill_chunk` tokens at a time between decode steps, so a running stream stalls
  by at most one chunk. Prompt prefixes seen before come from the prefix cache (runtime/prefix_cache.py)
  instead of being prefilled again. Each request samples with its own settings.
- static (engines without per-row lengths, or `continuous=False`): requests that arrive together and
  sample alike run as one left-padded batch to the end; the KV cache lives only while the batch runs.

Thread safety: `Service.submit`, `Service.close`, `Job.cancel` and iterating a Job are safe from any thread
(a job is iterated by one consumer). The Session is used only by the worker thread.
Memory: the slot cache and the prefix cache are allocated at start and never grow (`memory()` reports
them); the queue holds at most `queue_size` requests (more are refused with QueueFullError).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, replace

import numpy as np

from runtime.errors import BadInputError, LmforgeError
from runtime.generate import GenerationConfig, Sampler, generate
from runtime.prefix_cache import PrefixCache
from runtime.session import Session
from runtime.speculative import Governor, TokenPicker, check_speculation_flags, open_speculator

MAX_TOP_LOGPROBS = 20  # as the OpenAI API allows


class QueueFullError(LmforgeError):
    """More requests than the queue holds; the client should retry later (HTTP 429)."""


class ServiceClosedError(LmforgeError):
    """The service is shutting down and takes no new requests (HTTP 503)."""


@dataclass(frozen=True)
class ServiceConfig:
    # Sequences decoded together: the continuous scheduler's slots, the static scheduler's largest batch.
    max_batch: int = 16
    # Positions per slot (prompt + generated); None: the model's context, at most DEFAULT_MAX_CONTEXT.
    max_context: int | None = None
    # Prompt tokens prefilled per step: a running stream waits at most one chunk for a newcomer's prefill.
    prefill_chunk: int = 128
    # Memory for prompt prefixes' KV blocks; 0 turns the prefix cache off.
    prefix_cache_mb: float = 256
    # Requests waiting for a slot at most; more get QueueFullError (429).
    queue_size: int = 64
    # False: the static scheduler even where the engine could batch continuously (for comparison).
    continuous: bool = True
    # Speculative decoding ('ngram', or 'draft' with `draft` an engine artifact of the same tokenizer) for a
    # sequence while it runs alone: at batch 1 a decode step reads every weight for one token, and speculation
    # checks several with that read; with more rows running, batching already shares it (continuous only).
    speculative: str | None = None
    draft: str | None = None

    def validate(self) -> None:
        for name in ("max_batch", "prefill_chunk", "queue_size"):
            if getattr(self, name) < 1:
                raise BadInputError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_context is not None and self.max_context < 2:
            raise BadInputError(f"max-context must be at least 2, got {self.max_context}")
        if self.prefix_cache_mb < 0:
            raise BadInputError(f"prefix-cache-mb must be >= 0, got {self.prefix_cache_mb}")
        check_speculation_flags(self.speculative, self.draft)


DEFAULT_MAX_CONTEXT = 2048  # per slot: with 16 slots, 1.5 GB of fp32 KV for the default model


@dataclass(frozen=True)
class Token:
    id: int
    logprob: float | None = None  # log-probability under the model (no temperature), where asked for
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens and their log-probabilities


@dataclass(frozen=True)
class Event:
    kind: str  # 'prompt', 'token', 'done' or 'error'
    value: object


@dataclass(eq=False)
class Job:
    """A request in flight. `logprobs`: None for none, k for each token's log-probability and the k most
    likely alternatives; `prompt_logprobs`: the log-probability of every prompt token after the first (how
    evaluation harnesses score a served model; such prompts bypass the prefix cache)."""

    prompt: list[int]
    config: GenerationConfig
    logprobs: int | None = None
    prompt_logprobs: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    first_token: float | None = None
    cached_tokens: int = 0  # prompt positions that came from the prefix cache
    speculative: bool = True  # may the service speculate for this request (where it has a speculator)
    drafted_tokens: int = 0  # speculative decoding: draft tokens checked, and how many the engine accepted
    accepted_tokens: int = 0
    tokens: list[int] = field(default_factory=list)
    prompt_scores: list[Token] = field(default_factory=list)
    finished: bool = False
    _cancel: threading.Event = field(default_factory=threading.Event)
    _loop: asyncio.AbstractEventLoop | None = None
    _events: object = None  # asyncio.Queue on the submitting loop, else queue.Queue

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _attach(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
            self._events = asyncio.Queue()
        except RuntimeError:  # submitted from a plain thread
            self._events = queue.Queue()

    def post(self, kind: str, value) -> None:
        event = Event(kind, value)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        else:
            self._events.put(event)

    def __iter__(self):
        while True:
            event = self._events.get()
            yield event
            if event.kind in ("done", "error"):
                return

    async def __aiter__(self):
        while True:
            event = await self._events.get()
            yield event
            if event.kind in ("done", "error"):
                return


def slot_context(model_facts: dict, config: ServiceConfig) -> int:
    """Positions per slot: --max-context (default DEFAULT_MAX_CONTEXT), never more than the model's context."""
    model_context = model_facts.get("max_context") or DEFAULT_MAX_CONTEXT
    return min(config.max_context or DEFAULT_MAX_CONTEXT, model_context)


def check_request(job: Job, vocab_size: int, max_context: int, scheduler: str, why: str) -> None:
    """Raise BadInputError for a request that could never run; shared with the Ray ingress so that both
    refuse with the same words before any work starts."""
    if not job.prompt:
        raise BadInputError("empty prompt: pass at least one token")
    if min(job.prompt) < 0 or max(job.prompt) >= vocab_size:
        raise BadInputError(f"a prompt token id is outside the vocabulary [0, {vocab_size}); encode text with the "
                            "model's tokenizer")
    needed = len(job.prompt) + job.config.max_new_tokens - 1
    if needed > max_context:
        raise BadInputError(f"the prompt has {len(job.prompt)} tokens; with max_tokens "
                            f"{job.config.max_new_tokens} that exceeds the context of {max_context} tokens; "
                            "shorten it or ask for fewer tokens")
    if job.logprobs is not None and not 0 <= job.logprobs <= MAX_TOP_LOGPROBS:
        raise BadInputError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {job.logprobs}")
    if (job.logprobs is not None or job.prompt_logprobs) and scheduler != "continuous":
        raise BadInputError(f"log-probabilities need continuous batching, and this service runs static "
                            f"batching ({why})")


_STOP = object()  # put on the queue by close(): the worker finishes what runs and ends


class Service:
    def __init__(self, session: Session, config: ServiceConfig = ServiceConfig(), metrics=None):
        config.validate()
        options = getattr(session, "options", None)
        if getattr(options, "exact_speculation", False):
            raise BadInputError("the service's decode steps share one engine call among requests, so they cannot be "
                                "exact; open its session without SessionOptions(exact_speculation=True)")
        self.session, self.config, self.metrics = session, config, metrics
        self.speculator = open_speculator(config.speculative, config.draft, session.artifact, options)
        self.max_context = slot_context(session.artifact.model_facts, config)
        self._queue: queue.Queue = queue.Queue(maxsize=config.queue_size)
        self._closing = False
        if not config.continuous:
            self.scheduler, self.why = "static", "continuous batching is off (--no-continuous-batching)"
        elif not getattr(session, "supports_slots", False):
            self.scheduler, self.why = "static", ("the engine has no per-row cache lengths (attention not fused, "
                                                  "or built before they existed): static batching")
        else:
            self.scheduler, self.why = "continuous", "continuous batching over fixed KV slots"
        runner = _Continuous(self) if self.scheduler == "continuous" else _Static(self)
        self._runner = runner
        self._worker = threading.Thread(target=runner.run, name="lmforge-service", daemon=True)
        self._worker.start()

    def submit(self, prompt: list[int], config: GenerationConfig, logprobs: int | None = None,
               prompt_logprobs: bool = False, speculative: bool = True) -> Job:
        """Queue a request; raises BadInputError (it can never run), QueueFullError or ServiceClosedError.
        `speculative=False` keeps a service's speculation off for this request."""
        config.validate()
        job = Job(list(prompt), config, logprobs, prompt_logprobs, speculative=speculative)
        self._check(job)
        if self._closing:
            raise ServiceClosedError("the service is shutting down; retry on another replica")
        job._attach()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            if self.metrics is not None:
                self.metrics.rejected()
            raise QueueFullError(f"the queue holds {self._queue.maxsize} requests already; retry later") from None
        return job

    def _check(self, job: Job) -> None:
        check_request(job, self.session.artifact.model_facts["vocab_size"], self.max_context, self.scheduler, self.why)

    @property
    def alive(self) -> bool:
        """False once the worker thread has ended (closed, or killed by a bug): a health probe's answer."""
        return self._worker.is_alive()

    def memory(self) -> dict:
        """Bytes the service allocated at start: the slot KV cache and the prefix cache."""
        return self._runner.memory()

    def stats(self) -> dict:
        """What /health shows: the scheduler, its memory and occupancy."""
        return {"scheduler": self.scheduler, "why": self.why, "max_batch": self.config.max_batch,
                "max_context": self.max_context, "queued": self._queue.qsize()} | self._runner.stats()

    def close(self, timeout: float = 30) -> None:
        """Take no new requests, let the running ones finish (up to `timeout` seconds, then cancel them)."""
        self._closing = True
        self._runner.deadline = time.perf_counter() + timeout
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._worker.join(timeout=timeout + 5)
        if self.speculator is not None and not self._worker.is_alive():
            self.speculator.close()


def _fail(job: Job, exc: Exception) -> None:
    message = str(exc) if isinstance(exc, LmforgeError) else f"internal error: {type(exc).__name__}: {exc}"
    job.finished = True
    job.post("error", message)


def log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    shifted = row - row.max()
    return shifted - np.log(np.exp(shifted).sum())


def scored(token: int, row: np.ndarray, top: int | None) -> Token:
    """The token with its log-probability and the `top` most likely alternatives (None: none asked for)."""
    if top is None:
        return Token(token)
    logp = log_softmax(row)
    best = np.argpartition(-logp, top)[:top] if top else np.array([], np.int64)
    best = best[np.argsort(-logp[best])]
    return Token(token, float(logp[token]), tuple((int(i), float(logp[i])) for i in best))


@dataclass(eq=False)
class _Slot:
    index: int
    job: Job | None = None
    length: int = 0  # positions in the slot's cache
    pending: list[int] = field(default_factory=list)  # prompt tokens still to prefill
    sampler: Sampler | None = None
    stop: frozenset = frozenset()
    next_token: int = 0  # what the next decode step feeds
    admitted: int = 0  # admission order: prefill is first come, first served
    speculation: _Speculation | None = None


@dataclass(eq=False)
class _Speculation:
    """One sequence's speculative decoding: its proposer, the governor that sets the draft length and switches
    speculation off where it does not pay, and the token picker whose random stream the rejection rule uses
    (every token of the sequence comes from it)."""

    proposer: object
    governor: Governor
    picker: TokenPicker


class _Continuous:
    def __init__(self, service: Service):
        self.service = service
        self.session = service.session
        self.config = service.config
        self.kv_bytes = self.session.open_slots(self.config.max_batch, service.max_context)
        budget = int(self.config.prefix_cache_mb * 2**20)
        self.prefix = PrefixCache(self.session.slot_buffers, budget) if budget else None
        if self.prefix is not None and self.prefix.capacity == 0:
            self.prefix = None
        self.slots = [_Slot(i) for i in range(self.config.max_batch)]
        self.eos = frozenset(self.session.artifact.model_facts["eos_token_ids"])
        self.deadline: float | None = None
        self._stopping = False
        self._admitted = 0
        self._proposing_for: Job | None = None  # whose text the proposers' state follows (a draft's cache)

    def memory(self) -> dict:
        return {"kv_cache_bytes": self.kv_bytes, "prefix_cache_bytes": self.prefix.bytes if self.prefix else 0}

    def stats(self) -> dict:
        active = [s for s in self.slots if s.job is not None]
        prefix = ({"blocks": self.prefix.blocks, "capacity_blocks": self.prefix.capacity,
                   "hit_tokens": self.prefix.hit_tokens, "query_tokens": self.prefix.query_tokens}
                  if self.prefix else None)
        return {"slots_active": len(active), "prefilling": sum(1 for s in active if s.pending),
                "prefix_cache": prefix} | self.memory() | self._speculation_stats()

    def _speculation_stats(self) -> dict:
        speculator = self.service.speculator
        return {"speculative": speculator.config.method if speculator is not None else None}

    # -- the loop -------------------------------------------------------------------------------------------

    def run(self) -> None:
        while True:
            busy = any(s.job is not None for s in self.slots)
            if self._stopping and not busy:
                return
            self._admit(block=not busy)
            self._drop_cancelled()
            try:
                self._prefill_one_chunk()
                self._decode()
            except Exception as exc:  # fails the running requests, never the worker: later ones still run
                for slot in self.slots:
                    if slot.job is not None:
                        _fail(slot.job, exc)
                        self._free(slot)

    def _admit(self, block: bool) -> None:
        free = [s for s in self.slots if s.job is None]
        while free and not self._stopping:
            try:
                job = self.service._queue.get(block=block and len(free) == len(self.slots))
            except queue.Empty:
                return
            if job is _STOP:
                self._stopping = True
                self._refuse_queued()
                return
            if job.cancelled:
                job.finished = True
                job.post("done", "cancelled")
                continue
            slot = free.pop(0)
            try:
                self._start(slot, job)
            except Exception as exc:  # fails this request alone; the slot stays free
                _fail(job, exc)
                self._free(slot)
                free.insert(0, slot)
        if self._stopping and self.deadline is not None and time.perf_counter() > self.deadline:
            for slot in self.slots:
                if slot.job is not None:
                    slot.job.cancel()

    def _refuse_queued(self) -> None:
        while True:
            try:
                job = self.service._queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP:
                _fail(job, ServiceClosedError("the service shut down before this request started; retry"))

    def _start(self, slot: _Slot, job: Job) -> None:
        job.started = time.perf_counter()
        config = job.config
        slot.job, slot.sampler, slot.length = job, Sampler(config), 0
        speculator = self.service.speculator
        slot.speculation = (_Speculation(speculator.proposer(), speculator.governor(),
                                         TokenPicker(config.temperature, config.top_k, config.top_p, config.seed))
                            if speculator is not None and job.speculative else None)
        slot.stop = self.eos if config.stop_token_ids is None else frozenset(config.stop_token_ids)
        self._admitted += 1
        slot.admitted = self._admitted
        if self.prefix is not None and not job.prompt_logprobs:
            slot.length = self.prefix.load(self.prefix.lookup(job.prompt), slot.index)
            if self.service.metrics is not None:
                self.service.metrics.prefix_lookup(len(job.prompt), slot.length)
        job.cached_tokens = slot.length
        slot.pending = job.prompt[slot.length:]
        if job.prompt_logprobs:
            job.prompt_scores = [Token(job.prompt[0])]  # the first token has no log-probability

    def _drop_cancelled(self) -> None:
        for slot in self.slots:
            if slot.job is not None and slot.job.cancelled:
                slot.job.finished = True
                slot.job.post("done", "cancelled")
                if self.service.metrics is not None:
                    self.service.metrics.cancelled()
                self._free(slot)

    def _free(self, slot: _Slot) -> None:
        if slot.speculation is not None:
            self.service.speculator.remember(slot.speculation.governor)
        slot.job, slot.sampler, slot.pending, slot.length, slot.speculation = None, None, [], 0, None

    # -- steps ----------------------------------------------------------------------------------------------

    def _prefill_one_chunk(self) -> None:
        waiting = [s for s in self.slots if s.job is not None and s.pending]
        if not waiting:
            return
        slot = min(waiting, key=lambda s: s.admitted)
        job = slot.job
        chunk = slot.pending[: self.config.prefill_chunk]
        logits = self.session.run_slots(slot.index, np.array([chunk]), np.array([slot.length]),
                                        last_only=not job.prompt_logprobs)
        if job.prompt_logprobs:
            after = job.prompt[slot.length + 1: slot.length + len(chunk) + 1]  # the tokens these positions predict
            job.prompt_scores += [scored(t, logits[0, i], job.logprobs or 0) for i, t in enumerate(after)]
        slot.length += len(chunk)
        slot.pending = slot.pending[len(chunk):]
        if slot.pending:
            return
        if self.prefix is not None:
            self.prefix.store(job.prompt, slot.index)
        if job.prompt_logprobs:
            job.post("prompt", job.prompt_scores)
        self._accept(slot, logits[0, -1])

    def _decode(self) -> None:
        running = [s for s in self.slots if s.job is not None and not s.pending and s.length > 0]
        if not running:
            return
        alone = running[0] if len(running) == 1 and sum(s.job is not None for s in self.slots) == 1 else None
        if alone is not None and alone.speculation is not None and self._speculate(alone):
            return
        started = time.perf_counter()
        first, end = min(s.index for s in running), max(s.index for s in running) + 1  # the busy rows' range
        ids = np.zeros((end - first, 1), np.int64)
        lengths = np.zeros(end - first, np.int64)
        for slot in self.slots[first:end]:
            # A slot mid-prefill runs along at its own length: the position it writes is its next chunk's first.
            lengths[slot.index - first] = slot.length
        for slot in running:
            ids[slot.index - first, 0] = slot.next_token
        logits = self.session.run_slots(first, ids, lengths)[:, 0]
        greedy = logits.argmax(axis=-1)
        if alone is not None and alone.speculation is not None:  # the time a speculative round must beat
            alone.speculation.governor.record_plain((time.perf_counter() - started) * 1000)
        for slot in running:
            slot.length += 1
            self._accept(slot, logits[slot.index - first], int(greedy[slot.index - first]))

    def _speculate(self, slot: _Slot) -> bool:
        """One speculative round for a sequence running alone: drafts after its last token, checked in one run
        of the engine (its slot keeps only the accepted positions: the slot's length is the rollback). False
        when there is nothing to propose (the governor paused it, or no match): decode it plainly."""
        started = time.perf_counter()
        job, speculation = slot.job, slot.speculation
        context = job.prompt + job.tokens
        if self._proposing_for is not job:
            speculation.proposer.start(context)
            self._proposing_for = job
        count = speculation.governor.draft_length(job.config.max_new_tokens - len(job.tokens))
        drafts = speculation.proposer.propose(context, count, speculation.picker) if count else []
        if not drafts:
            return False
        logits = self.session.run_slots(slot.index, np.array([[slot.next_token, *drafts]]),
                                        np.array([slot.length]), last_only=False)[0]
        accepted, token = speculation.picker.verify(drafts, speculation.proposer.draft_probs, logits)
        slot.length += 1 + accepted
        job.drafted_tokens, job.accepted_tokens = job.drafted_tokens + len(drafts), job.accepted_tokens + accepted
        if self.service.metrics is not None:
            self.service.metrics.speculated(len(drafts), accepted)
        for i, new in enumerate([*drafts[:accepted], token]):
            self._emit(slot, new, logits[i])
            if slot.job is not job:  # it finished (a stop token, or max_tokens)
                break
        speculation.governor.record_round(len(drafts), accepted, (time.perf_counter() - started) * 1000)
        return True

    def _accept(self, slot: _Slot, row: np.ndarray, greedy: int | None = None) -> None:
        """Sample the slot's next token from its logits row, hand it to the client, finish if it ends."""
        job = slot.job
        if slot.speculation is not None:  # one random stream for plain and speculative steps alike
            token = slot.speculation.picker.pick(row)
        elif greedy is not None and job.config.temperature == 0:
            token = greedy
        else:
            token = int(slot.sampler(row[None])[0])
        self._emit(slot, token, row)

    def _emit(self, slot: _Slot, token: int, row: np.ndarray) -> None:
        """Hand the slot's next token to the client; finish the sequence if it ends there."""
        job = slot.job
        if job.first_token is None:
            job.first_token = time.perf_counter()
        job.tokens.append(token)
        job.post("token", scored(token, row, job.logprobs))
        slot.next_token = token
        if token in slot.stop:
            self._finish(slot, "stop")
        elif len(job.tokens) >= job.config.max_new_tokens:
            self._finish(slot, "length")

    def _finish(self, slot: _Slot, reason: str) -> None:
        job = slot.job
        job.finished = True
        job.post("done", reason)
        if self.service.metrics is not None:
            self.service.metrics.observe(job)
        self._free(slot)


def batch_key(config: GenerationConfig) -> tuple:
    """Requests batch together when they sample alike (each keeps its own max_tokens)."""
    return replace(config, max_new_tokens=0)


class _Cancelled(Exception):
    pass


class _Static:
    """Requests that arrive together and sample alike run as one left-padded batch to its end."""

    def __init__(self, service: Service):
        self.service = service
        self.max_batch = service.config.max_batch
        self._held = None  # taken from the queue but not batchable with the running batch (or _STOP)
        self.deadline: float | None = None

    def memory(self) -> dict:
        return {"kv_cache_bytes": 0, "prefix_cache_bytes": 0}  # the cache lives only while a batch runs

    def stats(self) -> dict:
        return self.memory()

    def run(self) -> None:
        while True:
            first = self._held if self._held is not None else self.service._queue.get()
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
                job = self.service._queue.get_nowait()
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
            job.post("token", Token(token))
            if len(job.tokens) >= job.config.max_new_tokens:
                self._finish(job, "length")

        try:
            result = generate(self.service.session, [job.prompt for job in jobs], config, on_token=on_token)
            for job, reason in zip(jobs, result.finish_reasons):
                if not job.finished and not job.cancelled:
                    self._finish(job, reason)
        except _Cancelled:
            pass
        except Exception as exc:  # fails this batch, never the worker: its clients would wait forever
            for job in jobs:
                if not job.finished:
                    _fail(job, exc)
        for job in jobs:
            if job.cancelled and not job.finished:
                job.finished = True
                job.post("done", "cancelled")
                if self.service.metrics is not None:
                    self.service.metrics.cancelled()

    def _finish(self, job: Job, reason: str) -> None:
        job.finished = True
        job.post("done", reason)
        if self.service.metrics is not None:
            self.service.metrics.observe(job)
