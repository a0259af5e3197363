"""The service a process embeds: continuously batched requests give exactly what each gives alone, slots freed
by cancellation are reused, prefix-cache hits equal a full prefill, log-probabilities are the model's, and
engines without per-row cache lengths fall back to static batching."""

import asyncio
import threading
from dataclasses import replace

import numpy as np
import pytest

import runtime
from runtime.errors import BadInputError
from runtime.generate import GenerationConfig, generate
from runtime.prefix_cache import BLOCK, PrefixCache
from runtime.service import QueueFullError, Service, ServiceConfig, log_softmax
from runtime.session import SessionOptions

GREEDY = GenerationConfig(max_new_tokens=12, stop_token_ids=())
SMALL = ServiceConfig(max_batch=4, max_context=128, prefill_chunk=16, prefix_cache_mb=1)


@pytest.fixture(scope="module")
def engine(tiny_model_factory, tmp_path_factory):
    from export.build import BuildConfig, build

    results = build(BuildConfig(model=str(tiny_model_factory("llama")), out=tmp_path_factory.mktemp("store"),
                                bench_runs=0))
    return next(r.artifact for r in results if r.stage == "engine")


@pytest.fixture(scope="module")
def reference(engine):
    session = runtime.open(engine, SessionOptions(threads=1))
    yield session
    session.close()


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 128, size=int(n))] for n in rng.integers(3, 70, size=count)]


def alone(reference, prompt, config=GREEDY) -> list[int]:
    return generate(reference, [prompt], config).tokens[0]


def tokens_of(job) -> list[int]:
    events = list(job)
    assert events[-1].kind == "done", events[-1]
    return [e.value.id for e in events if e.kind == "token"]


def make_service(engine, config=SMALL) -> Service:
    return Service(runtime.open(engine, SessionOptions(threads=1)), config)


def test_continuously_batched_requests_equal_each_run_alone(engine, reference):
    cases = prompts(10)
    cases += [cases[0] + [5, 6, 7], cases[1][:3]]  # a prefix-cache hit, and a prompt shorter than a block
    configs = [GREEDY if i % 3 else GenerationConfig(max_new_tokens=5 + i, temperature=0.8, top_p=0.9, seed=i,
                                                    stop_token_ids=()) for i in range(len(cases))]
    service = make_service(engine)
    try:
        assert service.scheduler == "continuous"
        jobs = [service.submit(p, c) for p, c in zip(cases, configs)]  # more requests than slots: they queue
        assert [tokens_of(job) for job in jobs] == [alone(reference, p, c) for p, c in zip(cases, configs)]
        assert jobs[10].cached_tokens >= BLOCK  # it starts with case 0, which ran before it
        assert service.stats()["slots_active"] == 0
    finally:
        service.close()


def test_static_batching_gives_the_same_tokens_and_says_why(engine, reference):
    service = make_service(engine, ServiceConfig(continuous=False))
    try:
        assert service.scheduler == "static" and "--no-continuous-batching" in service.why
        jobs = [service.submit(p, GREEDY) for p in prompts(4, seed=1)]
        assert [tokens_of(job) for job in jobs] == [alone(reference, p) for p in prompts(4, seed=1)]
        with pytest.raises(BadInputError, match="need continuous batching"):
            service.submit([1, 2, 3], GREEDY, logprobs=2)
    finally:
        service.close()


def test_a_slot_freed_by_cancellation_mid_prefill_is_reused_correctly(engine, reference):
    service = make_service(engine, ServiceConfig(max_batch=1, max_context=128, prefill_chunk=4, prefix_cache_mb=0))
    long_prompt, next_prompt = list(range(3, 63)), prompts(1, seed=3)[0]
    real_run, chunks = service.session.run_slots, []

    def run_slots(first, ids, lengths, last_only=True):
        chunks.append(ids.shape)
        if len(chunks) == 2:
            cancelled.cancel()  # after the long prompt's second chunk: mid-prefill
        return real_run(first, ids, lengths, last_only)

    service.session.run_slots = run_slots
    try:
        cancelled = service.submit(long_prompt, GREEDY)
        follower = service.submit(next_prompt, GREEDY)
        assert [e.value for e in cancelled if e.kind == "done"] == ["cancelled"]
        assert tokens_of(follower) == alone(reference, next_prompt)
        assert chunks[:2] == [(1, 4), (1, 4)] and len(long_prompt) > 8
    finally:
        service.close()


@pytest.fixture
def session(engine):
    """A session with three slots of 128 positions."""
    with runtime.open(engine, SessionOptions(threads=1)) as session:
        session.open_slots(3, 128)
        yield session


def test_logits_after_a_prefix_cache_hit_equal_a_full_prefill(session):
    cache = PrefixCache(session.slot_buffers, 1 << 20)
    first = prompts(1, seed=4)[0][:50] + list(range(3, 20))
    second = first[:40] + [9, 8, 7, 6, 5]
    session.run_slots(0, np.array([first]), np.array([0]))
    cache.store(first, slot=0)
    blocks = cache.lookup(second)
    assert len(blocks) == 40 // BLOCK
    cached = cache.load(blocks, slot=1)
    hit = session.run_slots(1, np.array([second[cached:]]), np.array([cached]), last_only=False).copy()
    full = session.run_slots(2, np.array([second]), np.array([0]), last_only=False)
    np.testing.assert_allclose(hit, full[:, cached:], rtol=1e-5, atol=1e-5)
    assert cache.hit_tokens == cached and cache.query_tokens == len(second)


def test_the_prefix_cache_evicts_the_least_recently_used_blocks_within_its_budget(session):
    per_block = sum(b.shape[1] * BLOCK * b.shape[3] * b.itemsize for b in session.slot_buffers)
    cache = PrefixCache(session.slot_buffers, 5 * per_block)
    a, b = list(range(3, 3 + 3 * BLOCK + 1)), list(range(60, 60 + 3 * BLOCK + 1))
    cache.store(a, slot=0)
    cache.store(b, slot=0)  # 6 blocks wanted, 5 fit: a's oldest block goes, and a is unreachable
    assert cache.blocks == 5 and cache.bytes == 5 * per_block
    assert cache.lookup(a) == [] and len(cache.lookup(b)) == 3


def test_logprobs_are_the_models_own(engine, reference):
    prompt = prompts(1, seed=5)[0]
    service = make_service(engine)
    try:
        job = service.submit(prompt, GenerationConfig(max_new_tokens=3, stop_token_ids=()), logprobs=3,
                              prompt_logprobs=True)
        events = list(job)
    finally:
        service.close()
    scores = next(e.value for e in events if e.kind == "prompt")
    generated = [e.value for e in events if e.kind == "token"]
    full = reference.prefill(np.array([prompt + [t.id for t in generated[:1]]])).copy()[0]
    assert scores[0].logprob is None and [s.id for s in scores] == prompt
    for position, score in enumerate(scores[1:]):
        expected = log_softmax(full[position])
        assert score.logprob == pytest.approx(expected[score.id], abs=1e-4)
    first = generated[0]
    expected = log_softmax(full[len(prompt) - 1])
    assert first.logprob == pytest.approx(expected.max(), abs=1e-4) and first.id == int(expected.argmax())
    assert [t for t, _ in first.top] == list(np.argsort(-expected)[:3])


def test_jobs_stream_to_threads_and_to_coroutines_alike(engine, reference):
    prompt = prompts(1, seed=6)[0]
    service = make_service(engine)
    try:
        results = {}

        def in_thread():
            results["thread"] = tokens_of(service.submit(prompt, GREEDY))

        async def in_coroutine():
            job = service.submit(prompt, GREEDY)
            return [e.value.id async for e in job if e.kind == "token"]

        worker = threading.Thread(target=in_thread)
        worker.start()
        results["async"] = asyncio.run(in_coroutine())
        worker.join(timeout=60)
        assert results["thread"] == results["async"] == alone(reference, prompt)
    finally:
        service.close()


def test_requests_that_cannot_run_are_refused_at_submit(engine):
    service = make_service(engine, ServiceConfig(max_batch=1, max_context=64, queue_size=1))
    try:
        with pytest.raises(BadInputError, match="exceeds the context of 64"):
            service.submit(list(range(3, 60)), GenerationConfig(max_new_tokens=10))
        with pytest.raises(BadInputError, match="outside the vocabulary"):
            service.submit([1, 100000], GREEDY)
        with pytest.raises(QueueFullError, match="retry later"):
            for _ in range(10):
                service.submit([1, 2, 3], GenerationConfig(max_new_tokens=50, stop_token_ids=()))
    finally:
        service.close()
    with pytest.raises(BadInputError, match="prefill-chunk must be at least 1"):
        ServiceConfig(prefill_chunk=0).validate()


def test_an_unexpected_error_fails_the_running_requests_and_the_service_keeps_working(engine, reference):
    service = make_service(engine)
    real_run, failures = service.session.run_slots, [RuntimeError("boom")]

    def run_slots(*args, **kwargs):
        if failures:
            raise failures.pop()
        return real_run(*args, **kwargs)

    service.session.run_slots = run_slots
    try:
        failed = list(service.submit([1, 2, 3], GREEDY))
        assert [(e.kind, e.value) for e in failed] == [("error", "internal error: RuntimeError: boom")]
        assert tokens_of(service.submit([1, 2, 3], GREEDY)) == alone(reference, [1, 2, 3])
    finally:
        service.close()


def test_a_request_that_fails_at_admission_fails_alone(engine, reference):
    service = make_service(engine)
    real_load, failures = service._runner.prefix.load, [RuntimeError("bad block")]

    def load(*args):
        if failures:
            raise failures.pop()
        return real_load(*args)

    service._runner.prefix.load = load
    try:
        failed = list(service.submit([1, 2, 3], GREEDY))
        assert [(e.kind, e.value) for e in failed] == [("error", "internal error: RuntimeError: bad block")]
        assert tokens_of(service.submit([1, 2, 3], GREEDY)) == alone(reference, [1, 2, 3])
    finally:
        service.close()


@pytest.mark.parametrize("config, message", [
    (GenerationConfig(temperature=float("nan")), "temperature must be >= 0"),
    (GenerationConfig(seed=-1), "seed must be >= 0"),
])
def test_configs_that_would_break_the_sampler_are_refused_at_submit(engine, config, message):
    service = make_service(engine)
    try:
        with pytest.raises(BadInputError, match=message):
            service.submit([1, 2, 3], config)
    finally:
        service.close()


def test_speculation_runs_a_request_alone_and_keeps_its_greedy_output(engine, reference):
    """The engine as its own draft: every greedy draft is the target's own choice, so rounds run and accept; the
    output must still be exactly the plain one, also for requests that overlap (no speculation while batched)
    and after the draft's cache followed another request."""
    from runtime.serve import Metrics

    metrics = Metrics()
    config = replace(SMALL, speculative="draft", draft=str(engine.path))
    service = Service(runtime.open(engine, SessionOptions(threads=1)), config, metrics)
    short, long = GenerationConfig(max_new_tokens=6, stop_token_ids=()), GenerationConfig(max_new_tokens=30,
                                                                                            stop_token_ids=())
    cases = prompts(3, seed=5)
    try:
        alone_job = service.submit(cases[0], long)
        assert tokens_of(alone_job) == alone(reference, cases[0], long)
        assert alone_job.accepted_tokens > 0 and alone_job.drafted_tokens >= alone_job.accepted_tokens
        overlapping = [service.submit(cases[1], short), service.submit(cases[2], long)]
        assert [tokens_of(job) for job in overlapping] == [alone(reference, cases[1], short),
                                                           alone(reference, cases[2], long)]
        plain = service.submit(cases[0], long, speculative=False)
        assert tokens_of(plain) == alone(reference, cases[0], long) and plain.drafted_tokens == 0
        exposition = metrics.exposition()[0].decode()
        drafted = sum(job.drafted_tokens for job in [alone_job, *overlapping])
        assert f"lmforge_speculative_draft_tokens_total {float(drafted)}" in exposition
        assert service.stats()["speculative"] == "draft"
    finally:
        service.close()


def test_speculation_settings_that_cannot_work_are_refused(engine):
    with pytest.raises(BadInputError, match="unknown speculative method"):
        ServiceConfig(speculative="medusa").validate()
    with pytest.raises(BadInputError, match="--draft is for --speculative draft"):
        ServiceConfig(speculative="ngram", draft=str(engine.path)).validate()
    session = runtime.open(engine, SessionOptions(threads=1))
    try:
        with pytest.raises(BadInputError, match="has no draft built with it"):
            Service(session, replace(SMALL, speculative="draft"))
    finally:
        session.close()
    with runtime.open(engine, SessionOptions(threads=1, exact_speculation=True)) as exact:
        with pytest.raises(BadInputError, match="share one engine call among requests, so they cannot be exact"):
            Service(exact, SMALL)


def test_step_profile_splits_each_cases_step_among_op_types(engine):
    from runtime import step_profile

    report = step_profile.measure(engine, [1, 3], [16], steps=3, warmup=1, threads=1)
    assert [(row["batch"], row["context"]) for row in report["rows"]] == [(1, 16), (3, 16)]
    for row in report["rows"]:
        assert "GroupQueryAttention" in row["op_ms"] and "MatMul" in "".join(row["op_ms"])
        assert sum(row["op_ms"].values()) == pytest.approx(row["step_ms_p50"])
    lines = step_profile.table(report).splitlines()
    assert lines[2].split()[:4] == ["1", "16", f"{report['rows'][0]['step_ms_p50']:.2f}", "1.00x"]
    assert lines[3].split()[:2] == ["3", "16"]
    chunks = step_profile.measure(engine, [1], [0, 24], steps=2, warmup=0, threads=1, tokens=8)["rows"]
    assert [(row["context"], row["tokens"]) for row in chunks] == [(0, 8), (24, 8)]
    limit = engine.model_facts["max_context"]
    with pytest.raises(BadInputError, match=f"exceeds the model's context of {limit} positions"):
        step_profile.measure(engine, [1], [limit], steps=1, warmup=0, threads=1)


def test_step_profile_reads_only_kernel_events_and_refuses_a_profile_without_them():
    from runtime.step_profile import op_shares

    trace = [{"cat": "Node", "name": "a_kernel_time", "dur": 30, "args": {"op_name": "MatMul"}},
             {"cat": "Node", "name": "b_kernel_time", "dur": 10, "args": {"op_name": "Add"}},
             {"cat": "Node", "name": "a_fence_before", "dur": 500, "args": {"op_name": "MatMul"}},
             {"cat": "Session", "name": "model_run", "dur": 900}]
    assert op_shares(trace) == {"MatMul": 0.75, "Add": 0.25}
    with pytest.raises(BadInputError, match="no node timings"):
        op_shares(trace[2:])


def test_end_profiling_needs_a_profiled_session(engine):
    with runtime.open(engine, SessionOptions(threads=1)) as session:
        with pytest.raises(BadInputError, match="opened without SessionOptions"):
            session.end_profiling()
