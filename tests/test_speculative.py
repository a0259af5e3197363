"""Speculative decoding: the verify step and its free rollback, greedy identity with plain decoding, the
rejection rule's distribution, the proposers, the Governor, and the report's new figures."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import run_cli
from scipy.stats import chi2_contingency, chisquare

import runtime
from runtime.errors import BadInputError
from runtime.generate import GenerationConfig, generate
from runtime.report import LatencyReport, engine_traffic
from runtime.session import SessionOptions
from runtime.speculative import (
    DraftProposer,
    Governor,
    NgramProposer,
    Payoff,
    SpeculativeConfig,
    Speculator,
    TokenPicker,
    accept_sampled,
    check_same_tokenizer,
    open_speculator,
)

GREEDY_48 = GenerationConfig(max_new_tokens=48, stop_token_ids=())
# Never pause: these tests check what speculation computes, not whether it pays on a tiny model.
ALWAYS = SpeculativeConfig(judge_after_rounds=10**9, probe_steps=0)


@pytest.fixture(scope="module")
def engine(chat_export):
    """The tiny llama's fused engine (its cache shared between past and present), the serving tests' own."""
    return chat_export


@pytest.fixture(scope="module")
def unfused(engine):
    """Its parent, the plain export: unfused attention, whose present tensors copy the cache every step."""
    from runtime import artifact as artifacts

    return artifacts.load(engine.path.parent / f"export-{engine.manifest['parent']}")


@pytest.fixture(scope="module")
def session(engine):
    with runtime.open(engine, SessionOptions(threads=1)) as s:
        yield s


@pytest.fixture(scope="module")
def repeating_prompt(session):
    """A prompt that contains the model's own greedy continuation of its end, so prompt lookup finds drafts
    the model accepts (and, further on, ones it rejects)."""
    start = [5, 9, 13, 17, 21, 25, 29, 33]
    continuation = generate(session, start, GenerationConfig(max_new_tokens=24, stop_token_ids=())).tokens[0]
    return start + continuation + start


def test_extend_equals_one_token_steps_and_rollback_equals_a_fresh_run(engine, session):
    assert session.supports_rollback
    prompt, steps = [3, 8, 15, 22, 40, 41, 7], [11, 12, 13, 14, 15]
    session.prefill(np.array([prompt]), last_only=True)
    one_by_one = [session.decode([t])[0, -1].copy() for t in steps]
    session.reset()
    session.prefill(np.array([prompt]), last_only=True)
    together = session.extend([steps])[0].copy()
    assert together.shape == (len(steps), 128)
    np.testing.assert_allclose(together, np.stack(one_by_one), atol=1e-5)
    # Keep two of the five, then continue with other tokens: nothing of the dropped three may show.
    session.rollback(len(prompt) + 2)
    assert session.cache_length == len(prompt) + 2
    after = session.extend([[60, 61]])[0].copy()
    with runtime.open(engine, SessionOptions(threads=1)) as fresh:
        expected = fresh.prefill(np.array([prompt + steps[:2] + [60, 61]]))[0, -2:]
    np.testing.assert_allclose(after, expected, atol=1e-5)
    with pytest.raises(BadInputError, match="roll"):
        session.rollback(session.cache_length + 1)


def test_an_engine_that_copies_its_cache_decodes_without_speculation_and_says_so(unfused, session):
    with runtime.open(unfused, SessionOptions(threads=1)) as copying:
        assert not copying.supports_rollback
        copying.prefill(np.array([[5, 6, 7]]))
        with pytest.raises(BadInputError, match="rebuild it fused"):
            copying.rollback(2)
        plain = generate(copying, [5, 6, 7, 8], GREEDY_48)
        result = generate(copying, [5, 6, 7, 8], GREEDY_48, speculator=Speculator(ALWAYS))
    assert result.tokens == plain.tokens
    assert result.report.verify_steps == 0 and "speculation off" in result.report.speculation_note
    batch = generate(session, [[5, 6, 7], [8, 9]], GREEDY_48, speculator=Speculator(ALWAYS))
    assert "batch 1" in batch.report.speculation_note


@pytest.mark.parametrize("config", [ALWAYS, SpeculativeConfig()], ids=["always", "governed"])
def test_greedy_prompt_lookup_equals_plain_decoding(session, repeating_prompt, config):
    rng = np.random.default_rng(3)
    for prompt in (repeating_prompt, [int(t) for t in rng.integers(3, 128, 40)]):
        plain = generate(session, prompt, GREEDY_48)
        speculative = generate(session, prompt, GREEDY_48, speculator=Speculator(config))
        assert speculative.tokens == plain.tokens
        assert len(speculative.report.step_ms) == len(plain.report.step_ms)  # one time per output token
    if config is ALWAYS:  # on the repeating prompt, drafts were verified, some kept and some rejected
        report = generate(session, repeating_prompt, GREEDY_48, speculator=Speculator(config)).report
        assert report.verify_steps > 0 and 0 < report.accepted_tokens < report.drafted_tokens


EXACT = SessionOptions(threads=1, exact_speculation=True)


def one_by_one_and_together(session, prompt, steps) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Logits of `steps` decoded one token at a time, the same tokens in one extend call, after `prompt`, and the
    cache length after each decode step."""
    session.prefill(np.array([prompt]), last_only=True)
    one_by_one, lengths = [], []
    for token in steps:
        one_by_one.append(session.decode([token])[0, -1].copy())
        lengths.append(session.cache_length)
    session.reset()
    session.prefill(np.array([prompt]), last_only=True)
    return np.stack(one_by_one), session.extend([steps])[0].copy(), lengths


def test_exact_speculation_decodes_each_token_as_a_verify_step_computes_it(engine, session):
    """Bit for bit, not within a tolerance: that is what makes greedy speculation exact on int8 engines."""
    prompt, steps = [3, 8, 15, 22, 40, 41, 7], [11, 12, 13, 14, 15]
    if np.array_equal(*one_by_one_and_together(session, prompt, steps)[:2]):
        pytest.skip("ONNX Runtime's one-row and multi-row kernels agree on this machine: nothing to tell apart")
    with runtime.open(engine, EXACT) as exact:
        one_by_one, together, lengths = one_by_one_and_together(exact, prompt, steps)
        assert lengths == [len(prompt) + count for count in range(1, len(steps) + 1)]  # each copy was rolled back
        assert np.array_equal(one_by_one, together)
        # Up to the last position of the context, where there is no room for the copy.
        limit = engine.model_facts["max_context"]
        exact.reset()
        exact.prefill(np.array([[5] * (limit - 2)]), last_only=True)
        last = [exact.decode([6])[0, -1].copy() for _ in range(2)]
        assert exact.cache_length == limit and np.isfinite(last).all()
        with pytest.raises(BadInputError, match="decode got 3 tokens for a batch of 1"):
            exact.decode([1, 2, 3])
        # GroupQueryAttention takes several new tokens after a cache only at batch 1 (as speculation does): a batch
        # decodes one token per row, as without the option.
        prompts, mask = np.array([[0, 0, 3, 8, 15], [4, 9, 16, 23, 42]]), np.array([[0, 0, 1, 1, 1], [1] * 5])
        exact.reset()
        exact.prefill(prompts, mask)
        session.prefill(prompts, mask)
        assert np.array_equal(exact.decode([11, 12]), session.decode([11, 12]))


def test_exact_speculation_is_refused_where_the_cache_cannot_roll_back(unfused):
    with pytest.raises(BadInputError, match="needs an engine that rolls its cache back in place"):
        runtime.open(unfused, EXACT)


def test_greedy_exact_speculation_equals_exact_plain_decoding(engine, repeating_prompt):
    with runtime.open(engine, EXACT) as exact:
        plain = generate(exact, repeating_prompt, GREEDY_48)
        speculative = generate(exact, repeating_prompt, GREEDY_48, speculator=Speculator(ALWAYS))
    assert speculative.tokens == plain.tokens and speculative.report.accepted_tokens > 0


class WrongEveryThird(DraftProposer):
    """A draft whose every third proposal is off by one: rejections, and draft-cache rollbacks, every round."""

    def propose(self, context, count, picker):
        drafts = super().propose(context, count, picker)
        return [(t + 1) % 128 if i % 3 == 2 else t for i, t in enumerate(drafts)]


def test_greedy_with_a_draft_model_equals_plain_decoding(engine, session, repeating_prompt):
    plain = generate(session, repeating_prompt, GREEDY_48)
    with runtime.open(engine, SessionOptions(threads=1)) as draft_session:
        config = SpeculativeConfig(method="draft", judge_after_rounds=10**9, probe_steps=0)
        speculator = Speculator(config, draft_session)
        same = generate(session, repeating_prompt, GREEDY_48, speculator=speculator)
        speculator.proposer = lambda: WrongEveryThird(draft_session)
        wrong = generate(session, repeating_prompt, GREEDY_48, speculator=speculator)
    assert same.tokens == plain.tokens and wrong.tokens == plain.tokens
    assert same.report.acceptance_rate == 1.0 and same.report.mean_accepted_length > 3  # the target as its draft
    assert wrong.report.acceptance_rate < 1.0 and wrong.report.accepted_tokens > 0


def test_stop_tokens_and_the_token_budget_end_speculation_where_they_end_plain_decoding(session, repeating_prompt):
    plain = generate(session, repeating_prompt, GREEDY_48).tokens[0]
    stop = plain[20]
    for config in (GenerationConfig(max_new_tokens=48, stop_token_ids=(stop,)),
                   GenerationConfig(max_new_tokens=13, stop_token_ids=())):
        expected = generate(session, repeating_prompt, config)
        result = generate(session, repeating_prompt, config, speculator=Speculator(ALWAYS))
        assert result.tokens == expected.tokens and result.finish_reasons == expected.finish_reasons


def test_the_rejection_rule_keeps_the_target_distribution():
    """Drafts from q (a full distribution, or a point mass as prompt lookup has), accepted with min(1, p/q)
    and resampled from max(0, p - q): the first emitted token is distributed as p, whatever q."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(6, 0.7))
    q = rng.dirichlet(np.full(6, 0.7))
    draws = 20000
    for name in ("draft model", "point mass"):
        counts = np.zeros(6)
        for _ in range(draws):
            if name == "draft model":
                token = int(rng.choice(6, p=q))
                accepted, resampled = accept_sampled([token], [q], lambda i: p, rng)
            else:
                token = 4  # prompt lookup proposes one fixed token
                accepted, resampled = accept_sampled([token], None, lambda i: p, rng)
            counts[token if accepted else resampled] += 1
        assert chisquare(counts, p * draws).pvalue > 1e-3, name
        assert np.abs(counts / draws - q).max() > 0.02 or name == "point mass"  # q itself would not pass


class HotterDraft(DraftProposer):
    """The engine as its own draft, sampled at twice the temperature: drafts from a q that differs from p, so
    the verify steps both accept and reject (the rule holds for any q the drafts are drawn from)."""

    def propose(self, context, count, picker):
        temperature, top_k, top_p = picker.settings
        hotter = TokenPicker(2 * temperature, 0, 1.0, None)
        hotter.rng = picker.rng
        return super().propose(context, count, hotter)


def test_sampled_speculation_has_plain_sampling_distribution(engine, session, repeating_prompt):
    """Many seeded samples of the first tokens, with and without speculation: the same distribution."""
    config = dict(max_new_tokens=4, temperature=0.7, top_k=40, stop_token_ids=())
    runs = 400
    plain = np.array([generate(session, repeating_prompt, GenerationConfig(seed=s, **config)).tokens[0]
                      for s in range(runs)])
    with runtime.open(engine, SessionOptions(threads=1)) as draft_session:
        draft = Speculator(SpeculativeConfig(method="draft", judge_after_rounds=10**9, probe_steps=0), draft_session)
        draft.proposer = lambda: HotterDraft(draft_session)
        lookup = Speculator(SpeculativeConfig(min_ngram=1, judge_after_rounds=10**9, probe_steps=0))
        for name, speculator in (("draft", draft), ("ngram", lookup)):
            results = [generate(session, repeating_prompt, GenerationConfig(seed=10**6 + s, **config),
                                speculator=speculator) for s in range(runs)]
            drafted = sum(r.report.drafted_tokens for r in results)
            accepted = sum(r.report.accepted_tokens for r in results)
            assert drafted > runs / 2 and 0 < accepted < drafted, name  # verify steps made these tokens
            speculative = np.array([r.tokens[0] for r in results])
            for position in range(1, 4):  # position 0 comes from the prefill alone
                table = contingency(plain[:, position], speculative[:, position])
                assert chi2_contingency(table).pvalue > 1e-3, f"{name}: token {position} is distributed differently"


def contingency(a: np.ndarray, b: np.ndarray, least: int = 10) -> np.ndarray:
    """Counts of each token in the two samples, tokens seen fewer than `least` times in all pooled into one."""
    tokens, counts = np.unique(np.concatenate([a, b]), return_counts=True)
    common = tokens[counts >= least]
    rows = [[np.sum(x == t) for t in common] + [np.sum(~np.isin(x, common))] for x in (a, b)]
    table = np.array(rows)
    return table[:, table.sum(axis=0) > 0]


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    proposer = NgramProposer(SpeculativeConfig(max_ngram=3, min_ngram=2))
    picker = TokenPicker(0.0, 0, 1.0, None)
    context = [1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 8, 2, 3]
    proposer.start(context)
    assert proposer.propose(context, 3, picker) == [5, 6, 7]  # "2 3" last came before 5 6 7
    context += [4]
    assert proposer.propose(context, 2, picker) == [9, 2]  # "2 3 4" only at the start
    assert proposer.propose(context + [42], 4, picker) == []  # "4 42" never seen


def test_the_next_request_starts_from_the_last_ones_payoff():
    """A draft that did not pay is not tried afresh on the next request: the pause goes on, no probe steps."""
    config = SpeculativeConfig(initial_draft=4, judge_after_rounds=1, probe_steps=2, pause_steps=3)
    speculator = Speculator(config)
    first = speculator.governor()
    assert first.draft_length(100) == 0  # probing
    first.record_plain(10.0)
    first.record_plain(10.0)
    first.record_round(drafted=4, accepted=0, ms=30.0)  # 30 ms for one token against 10 plain: pause 3
    first.record_plain(10.0)
    speculator.remember(first)
    second = speculator.governor()
    assert (second.pause_left, second.next_pause, second.plain_ms) == (2, 6, 10.0)
    second.record_plain(10.0)
    second.record_plain(10.0)
    assert second.draft_length(100) == 4  # paused no longer: it tries again, and the next pause is longer
    carried = speculator.carried
    speculator.remember(Governor(config))  # a request that never measured a plain step changes nothing
    assert speculator.carried == carried == Payoff(10.0, 2, 6)


def test_governor_sizes_drafts_by_acceptance_and_pauses_when_speculation_does_not_pay():
    config = SpeculativeConfig(initial_draft=4, max_draft=8, judge_after_rounds=2, pause_steps=3)
    governor = Governor(config)
    assert governor.draft_length(100) == 0  # probe steps first: the plain step time is the reference
    for _ in range(config.probe_steps):
        governor.record_plain(10.0)
    assert governor.draft_length(100) == 4
    governor.record_round(drafted=4, accepted=4, ms=12.0)  # all accepted: longer drafts
    assert governor.draft_length(100) == 6 and governor.draft_length(3) == 2  # never past the budget
    governor.record_round(drafted=6, accepted=1, ms=12.0)  # a rejection: shorter; 24 ms for 7 tokens pays
    assert governor.draft_length(100) == 5 and governor.pauses == 0
    for _ in range(2):  # 15 ms per token against 10 plain: pause
        governor.record_round(drafted=5, accepted=0, ms=15.0)
    assert governor.pauses == 1 and governor.draft_length(100) == 0
    for _ in range(3):
        governor.record_plain(10.0)
    assert governor.draft_length(100) > 0  # the pause is over
    for _ in range(2):
        governor.record_round(drafted=1, accepted=0, ms=15.0)
    assert governor.pauses == 2 and governor.pause_left == 6  # still not paying: twice as long


def test_report_gives_acceptance_bytes_per_step_and_bandwidth(engine):
    report = LatencyReport(engine_id="x", backend="ort", batch=1, prompt_tokens=100, generated_tokens=5,
                           ttft_ms=10.0, step_ms=[2.0] * 4, speculative="ngram", drafted_tokens=10,
                           accepted_tokens=6, verify_steps=3, weight_bytes=1_000_000, kv_bytes_per_position=1000)
    assert report.acceptance_rate == 0.6 and report.mean_accepted_length == 3.0
    assert report.bytes_per_step == 1_000_000 + 1000 * 102.5  # KV at the mean length of the 4 decode steps
    assert report.bandwidth_gbs == pytest.approx(report.bytes_per_step / 0.002 / 1e9)
    line = report.one_line()
    assert "acceptance 60%" in line and "3.00 tok/verify" in line and "GB/s" in line
    data = report.to_dict()
    assert data["acceptance_rate"] == 0.6 and data["bandwidth_gbs"] > 0
    # From a manifest: the model files, the KV cache of 2 layers x 2 tensors x 2 heads x 16 dims x 4 bytes.
    traffic = engine_traffic(engine)
    assert traffic["weight_bytes"] == engine.manifest["files"]["model.onnx"]["size"]
    assert traffic["kv_bytes_per_position"] == 2 * 2 * 2 * 16 * 4


@pytest.mark.parametrize("precision", ["int8", "int8-weight-only", "int4", "mixed"])
def test_a_quantized_engine_does_not_count_the_embedding_table_it_only_gathers(engine, precision):
    quantized = SimpleNamespace(manifest=dict(engine.manifest, precision=precision), model_facts=engine.model_facts,
                                io=engine.io)
    facts = engine.model_facts
    table = facts["vocab_size"] * facts["hidden_size"] * 4
    assert engine_traffic(quantized)["weight_bytes"] == engine_traffic(engine)["weight_bytes"] - table


def test_a_draft_must_share_the_vocabulary_and_tokenizer(engine):
    class Fake:
        path = Path("draft")

        def __init__(self, vocab, tokenizer_hash):
            self.model_facts = {"vocab_size": vocab}
            self.manifest = {"files": {"tokenizer.json": {"sha256": tokenizer_hash, "size": 1}}}

    same = engine.manifest["files"]["tokenizer.json"]["sha256"]
    check_same_tokenizer(engine, Fake(128, same))
    with pytest.raises(BadInputError, match="vocabulary of 64"):
        check_same_tokenizer(engine, Fake(64, same))
    with pytest.raises(BadInputError, match="different tokenizer"):
        check_same_tokenizer(engine, Fake(128, "0" * 64))


def test_generate_cli_speculates_and_refuses_bad_flags(engine):
    ok = run_cli("runtime.generate", str(engine.path), "the quick brown fox", "--raw", "--speculative", "ngram",
                 "--max-new-tokens", "12", "--threads", "1")
    assert ok.returncode == 0, ok.stderr
    assert "ngram" in ok.stderr.strip().splitlines()[-1]
    for flags, fix in ((["--speculative", "draft"], "--draft ARTIFACT"), (["--draft", str(engine.path)],
                                                                           "--speculative draft"),
                       (["--speculative", "medusa"], "--speculative ngram")):
        bad = run_cli("runtime.generate", str(engine.path), "hi", "--raw", *flags)
        assert bad.returncode == 2 and fix in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_bench_speculative_cli_reports_ratios(engine, tmp_path):
    out = tmp_path / "figures.json"
    result = run_cli("runtime.bench_speculative", str(engine.path), "--sets", "chat", "--limit", "2",
                     "--gen-len", "16", "--threads", "1", "--exact-speculation", "--json", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())["sets"]["chat"]
    assert set(data["runners"]) == {"no speculation", "ngram", "no speculation, exact", "ngram, exact"}
    assert data["runners"]["ngram, exact"]["identical_to_plain"] == "2/2"  # against the exact plain runner
    for ratio in ("ngram / no speculation", "ngram, exact / no speculation, exact",
                  "no speculation, exact / no speculation"):
        assert data["ratios"][ratio] > 0
    assert "no speculation, exact / no speculation, exact" not in data["ratios"]


@pytest.mark.slow
def test_default_int8_engine_speculates_losslessly(default_int8_engine):
    """The default model's int8 engine, greedy, on grounded tasks: speculation gives plain decoding's tokens
    wherever the engine computes a position the same in a multi-token call as alone; where ONNX Runtime's
    rounding differs between the two (GroupQueryAttention with one query or several, amplified by the int8
    activation quantization), the token speculation kept is still the argmax of the logits it was given. With
    SessionOptions(exact_speculation=True) every output is plain decoding's."""
    from runtime.bench_speculative import grounded_tasks
    from runtime.text import load_codec

    with runtime.open(default_int8_engine, SessionOptions(threads=2)) as session:
        codec = load_codec(session.artifact)
        config = GenerationConfig(max_new_tokens=64, stop_token_ids=())
        identical, accepted = 0, 0
        for task in grounded_tasks()[:4]:
            ids = codec.encode(codec.render_chat([{"role": "user", "content": task}]))
            plain_recorder, spec_recorder = LogitsRecorder(session), LogitsRecorder(session)
            plain = generate(plain_recorder, ids, config).tokens[0]
            result = generate(spec_recorder, ids, config, speculator=Speculator(ALWAYS))
            spec, accepted = result.tokens[0], accepted + result.report.accepted_tokens
            if spec == plain:
                identical += 1
                continue
            first = next(i for i, (a, b) in enumerate(zip(spec, plain)) if a != b)
            used, alone = (r.logits_for(len(ids) + first) for r in (spec_recorder, plain_recorder))
            assert spec[first] == int(used.argmax()) and plain[first] == int(alone.argmax())
            assert np.abs(alone - used).max() > 0  # the engine's own numbers differ there, not the rule
        print(f"default int8: {identical}/4 outputs identical to plain decoding, {accepted} drafts accepted")
        assert accepted > 0
    with runtime.open(default_int8_engine, SessionOptions(threads=2, exact_speculation=True)) as exact:
        for task in grounded_tasks()[:4]:
            ids = codec.encode(codec.render_chat([{"role": "user", "content": task}]))
            plain = generate(exact, ids, config)
            assert generate(exact, ids, config, speculator=Speculator(ALWAYS)).tokens == plain.tokens


class LogitsRecorder:
    """A session wrapper that keeps a copy of the logits each call returned, by the position they predict."""

    def __init__(self, session):
        self.session, self.by_position = session, {}
        self.artifact, self.backend = session.artifact, session.backend

    def __getattr__(self, name):
        return getattr(self.session, name)

    def _keep(self, logits):
        """Row i of n predicts the token at index cache_length - n + 1 + i of the whole sequence."""
        last = self.session.cache_length
        for i in range(logits.shape[1]):
            self.by_position[last - logits.shape[1] + 1 + i] = logits[0, i].copy()
        return logits

    def prefill(self, ids, mask=None, last_only=False):
        return self._keep(self.session.prefill(ids, mask, last_only=last_only))

    def decode(self, tokens):
        return self._keep(self.session.decode(tokens))

    def extend(self, tokens):
        return self._keep(self.session.extend(tokens))

    def logits_for(self, position):
        return self.by_position[position]


def test_a_build_with_a_draft_pairs_it_with_its_engine_and_the_runtime_finds_it(tiny_model_factory, tmp_path):
    """`export.build --draft layers=1`: the draft (the export pruned by a layer and healed) is built first, the
    engine records it, and `--speculative draft` without --draft speculates with it, losslessly."""
    from export.build import build, parse_args

    model = str(tiny_model_factory("llama"))
    results = build(parse_args(["--model", model, "--out", str(tmp_path), "--draft", "layers=1", "--draft-steps", "2",
                                "--bench-runs", "0", "--threads", "1", "--teacher-prompts", "0"]))
    draft, target = [r.artifact for r in results if r.stage == "engine"]
    assert target.manifest["config"]["draft"] == draft.id
    assert draft.model_facts["layers"] == target.model_facts["layers"] - 1
    assert "distill" in [r.stage for r in results]
    prompt, config = [5, 6, 7, 8] * 4, GenerationConfig(max_new_tokens=12, stop_token_ids=())
    speculator = open_speculator("draft", None, target, SessionOptions(threads=1))
    with runtime.open(target, SessionOptions(threads=1)) as session:
        plain = generate(session, [prompt], config)
        speculated = generate(session, [prompt], config, speculator=speculator)
    speculator.close()
    assert speculated.tokens == plain.tokens
    assert speculated.report.speculative == "draft" and speculated.report.drafted_tokens > 0


def test_a_build_with_several_drafts_pairs_the_one_measured_fastest(tiny_model_factory, tmp_path):
    """`--draft layers=1 --draft mlp=0.5`: both candidates are built, the draft-choice stage measures each one's
    speed-up on the engine a build without --draft makes, and every engine names the fastest."""
    from export import report
    from export.build import build, parse_args

    model = str(tiny_model_factory("llama"))
    results = build(parse_args(["--model", model, "--out", str(tmp_path), "--draft", "layers=1", "--draft", "mlp=0.5",
                                "--draft-steps", "2", "--bench-runs", "0", "--threads", "1", "--teacher-prompts", "0"]))
    choice = next(r.artifact for r in results if r.stage == "draftchoice")
    trials = choice.metrics["trials"]
    assert [t["ratios"] for t in trials] == ["layers=1", "mlp=0.5"]
    assert all(t["ms_per_token"] > 0 and t["speedup"] > 0 for t in trials)
    fastest = max(trials, key=lambda t: t["speedup"])
    assert choice.metrics["chosen"] == fastest["draft"]
    *drafts, target = [r.artifact for r in results if r.stage == "engine"]
    assert {t["draft"] for t in trials} == {d.id for d in drafts}
    assert target.manifest["config"]["draft"] == fastest["draft"]
    measured_on = (tmp_path / f"engine-{choice.manifest['parent']}")  # the unpaired engine, kept in the store
    unpaired = json.loads((measured_on / "manifest.json").read_text())
    assert "draft" not in unpaired["config"] and unpaired["parent"] == target.manifest["parent"]
    built = report.build_report(results, model, {}, 0.0)
    assert built["engines"][-1]["draft"] == fastest["draft"]
    assert f"{fastest['ratios']} {fastest['speedup']:.2f}x (chosen)" in report.markdown(built, [], None)


@pytest.mark.parametrize("flags, problem", [(["--draft", "mlp=1.5"], "a ratio must be in [0, 1)"),
                                            (["--draft", "layers=1", "--draft", "layers=1"], "same candidate twice"),
                                            (["--draft", ","], "--draft needs pruning ratios")])
def test_bad_draft_candidates_are_refused_before_the_export(flags, problem, tmp_path):
    from export.build import parse_args

    with pytest.raises(BadInputError, match=re.escape(problem)):
        parse_args(["--out", str(tmp_path), *flags])


def test_the_draft_choice_prompts_are_the_teachers_held_out_ones():
    from export.graph.data import held_out_prompts, split_documents, teacher_documents

    generations = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(40)]
    held_out = held_out_prompts(generations)
    codec = SimpleNamespace(render_chat=lambda turns, add_generation_prompt: " ".join(t["content"] for t in turns))
    evaluated = split_documents(teacher_documents(generations, codec)).evaluation
    assert held_out and len(held_out) < len(generations)
    assert sorted(held_out) == sorted(text.split(" answer")[0] for text in evaluated)
