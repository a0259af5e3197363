"""The load test's parts without a server (prompts of exact length, the event-stream reader, the figures and
ratios, RSS), a request that fails in every way without ending the run, and one real run on a tiny engine."""

import asyncio
import json
import math

import httpx
import pytest
from conftest import run_cli

from runtime import loadtest
from runtime.loadtest import RequestResult


class WordCodec:
    """One token per word: a tokenizer at its simplest, with exact round trips."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return [self.ids.setdefault(word, len(self.ids)) for word in text.split()]

    def decode(self, ids: list[int]) -> str:
        words = {i: word for word, i in self.ids.items()}
        return " ".join(words[i] for i in ids)


@pytest.fixture(scope="module")
def bpe_codec(tmp_path_factory):
    """The tiny models' 128-token BPE, whose decode puts spaces inside words: text round trips change."""
    from tiny_models import make_tiny_tokenizer
    from tokenizers import Tokenizer

    from runtime.text import TextCodec

    folder = tmp_path_factory.mktemp("bpe")
    make_tiny_tokenizer(folder)
    return TextCodec(Tokenizer.from_file(str(folder / "tokenizer.json")), None, {})


@pytest.mark.parametrize("tokens", [1, 7, 128])
def test_prompts_have_exactly_the_asked_tokens_and_differ_by_seed(tokens):
    codec = WordCodec()
    prompts = [loadtest.build_prompt(codec, [], tokens, (0, 4, client, 0), as_text=False) for client in range(4)]
    assert all(len(p) == tokens for p in prompts)
    assert len({p[0] for p in prompts}) == 4  # they part at once: no prefix to share
    assert loadtest.build_prompt(codec, [], tokens, (0, 4, 1, 0), as_text=False) == prompts[1]


def test_a_shared_prefix_comes_first_and_whole():
    codec, system = WordCodec(), list(range(100, 116))
    prompts = [loadtest.build_prompt(codec, system, 8, (2, seed), as_text=False) for seed in range(3)]
    assert all(len(p) == 24 and p[:16] == system for p in prompts) and len({tuple(p) for p in prompts}) == 3


@pytest.mark.parametrize("tokens", [1, 5, 8, 64])
def test_text_prompts_encode_back_to_the_asked_tokens(bpe_codec, tokens):
    for seed in range(5):
        text = loadtest.build_prompt(bpe_codec, [], tokens, (seed,), as_text=True)
        assert isinstance(text, str) and len(bpe_codec.encode(text)) == tokens


def test_request_body_streams_ignores_eos_and_asks_for_usage():
    body = loadtest.request_body([5, 6, 7], 64)
    assert body["prompt"] == [5, 6, 7] and body["max_tokens"] == 64 and body["ignore_eos"] and body["stream"]
    assert body["stream_options"] == {"include_usage": True}


def chunk(text: str) -> str:
    return "data: " + json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": None}]})


STREAM = ["", ": keep-alive", chunk("The"), "", chunk(""), chunk(" fox"), chunk(" ran"),
          "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": 4,
                                                           "prompt_tokens_details": {"cached_tokens": 6}}}),
          "data: [DONE]"]


def read(lines: list[str]) -> RequestResult:
    result = RequestResult()
    for at, line in enumerate(lines):
        result.add(loadtest.parse_sse_line(line), at * 0.01)
    return result


def test_a_stream_gives_chunk_times_usage_and_cached_tokens():
    result = read(STREAM)
    assert result.done and result.error is None
    assert result.stamps == pytest.approx([0.02, 0.05, 0.06])  # empty chunks and comments carry no text
    assert result.output_tokens == 4 and result.cached_tokens == 6  # the server's count beats the chunk count


def test_without_usage_tokens_are_the_chunks_and_cached_is_unknown():
    result = read(STREAM[:7] + ["data: [DONE]"])
    assert result.output_tokens == 3 and result.cached_tokens is None


@pytest.mark.parametrize("line, message", [
    ('data: {"error": {"message": "internal error: boom", "type": "server_error"}}', "internal error: boom"),
    ('data: {"error": "overloaded"}', "overloaded"),
    ("data: {not json", "undecodable event"),
    ("data: [1, 2]", "undecodable event"),
])
def test_error_events_fail_the_request(line, message):
    result = read([chunk("a"), line])
    assert message in result.error and not result.done


def test_figures_of_a_level():
    fine = read(STREAM)
    failed = RequestResult(stamps=[0.5], error="HTTP 500: boom")
    row = loadtest.summarize([fine, fine, failed], wall_s=2.0)
    assert row["requests"] == 2 and row["errors"] == 1 and row["error_samples"] == ["HTTP 500: boom"]
    assert row["output_tokens"] == 9 and row["tokens_per_second"] == 4.5  # streamed tokens count, failed or not
    assert row["ttft_ms"]["p50"] == pytest.approx(20) and row["itl_ms"]["p50"] == pytest.approx(20)
    assert row["cached_tokens"] == 12
    empty = loadtest.summarize([failed], wall_s=1.0)
    assert empty["ttft_ms"] == {"p50": None, "p99": None} and empty["cached_tokens"] is None
    json.dumps(empty, allow_nan=False)  # no NaN: the report stays valid JSON


def test_percentiles_and_ratios():
    assert loadtest.quantiles_ms([0.001 * i for i in range(1, 101)])["p50"] == pytest.approx(50.5)
    assert loadtest.ratio(6, 3) == 2 and loadtest.ratio(None, 3) is None and loadtest.ratio(6, 0) is None


def level(mode, case, clients, tok_s, ttft, itl):
    return {"mode": mode, "case": case, "clients": clients, "tokens_per_second": tok_s,
            "ttft_ms": {"p50": ttft, "p99": ttft}, "itl_ms": {"p50": itl, "p99": itl}}


def test_ratios_between_modes_streams_and_cases():
    rows = [level("continuous", "plain", 1, 20, 100, 50), level("continuous", "plain", 16, 200, 300, 75),
            level("static", "plain", 1, 20, 100, 50), level("static", "plain", 16, 50, 1500, 60),
            level("continuous", "shared-system", 1, 20, 40, 50)]
    found = loadtest.ratios(rows, ["continuous", "static"], {"errors": 0, "rss_growth_percent": 1.5})
    assert found["continuous/static tok/s at 16 streams"] == 4
    assert found["continuous/static TTFT p50 at 16 streams"] == 0.2
    assert found["continuous ITL p50 at 16 streams / 1 stream"] == 1.5
    assert found["continuous shared-system TTFT p50 / plain, 1 stream"] == 0.4
    assert found["static shared-system TTFT p50 / plain, 1 stream"] is None
    assert found["soak errors"] == 0 and found["soak RSS growth %"] == 1.5
    assert not any(key.startswith("static/") for key in found)  # only the first mode over the second


def test_a_negative_baseline_count_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        loadtest.parse_args(["engine", "--baseline-requests", "-1"])
    assert exit_.value.code == 2
    assert "argument --baseline-requests: -1 is too small; give 0 or more" in capsys.readouterr().err


def test_a_level_measured_beside_its_own_one_stream_baseline_is_compared_with_it():
    beside = level("continuous", "plain", 1, 20, 80, 30)
    rows = [level("continuous", "plain", 1, 20, 100, 50),
            level("continuous", "plain", 16, 200, 300, 75) | {"baseline": beside},
            level("continuous", "shared-system", 1, 20, 120, 50) | {"baseline": beside}]
    found = loadtest.ratios(rows, ["continuous"], None)
    assert found["continuous ITL p50 at 16 streams / 1 stream"] == 2.5  # 75 / 30, not 75 / 50
    assert found["continuous shared-system TTFT p50 / plain, 1 stream"] == 1.5  # 120 / 80


def test_rss_from_proc_status_and_its_growth():
    assert loadtest.vmrss_mb("Name:\tpython\nVmPeak:\t  9999 kB\nVmRSS:\t  204800 kB\n") == 200
    assert loadtest.vmrss_mb("Name:\tkthreadd\n") is None
    assert loadtest.vmrss_mb(open("/proc/self/status").read()) > 0
    samples = [(0, 100), (10, 150), (30, 200), (40, 205), (600, 210)]
    assert loadtest.rss_growth_percent(samples, warm_s=30) == pytest.approx(5)
    assert loadtest.rss_growth_percent(samples[:3], warm_s=30) is None  # no sample after the warm one
    assert loadtest.rss_growth_percent([(0, None), (40, 100), (50, None), (60, 110)], 30) == pytest.approx(10)


def test_modes_name_their_server_flags():
    assert loadtest.parse_modes("continuous,static") == [("continuous", []), ("static", ["--no-continuous-batching"])]
    assert loadtest.parse_modes("small=--max-batch 4, static=") == [("small", ["--max-batch", "4"]), ("static", [])]
    with pytest.raises(ValueError, match="unknown mode"):
        loadtest.parse_modes("dynamic")


def fake_server(handler) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url="http://127.0.0.1:1", transport=httpx.MockTransport(handler))


@pytest.mark.parametrize("respond, message", [
    (lambda: httpx.Response(429, json={"error": {"message": "queue full"}}), "HTTP 429"),
    (lambda: httpx.Response(200, text=chunk("a") + "\n\n"), "ended before [DONE]"),
    (lambda: httpx.Response(200, text="\n\n".join(STREAM)), None),
])
def test_a_request_fails_by_status_or_a_cut_stream_and_never_raises(respond, message):
    async def run():
        async with fake_server(lambda request: respond()) as http:
            return await loadtest.one_request(http, loadtest.request_body([1, 2], 4), timeout=5)

    result = asyncio.run(run())
    assert (result.error is None) if message is None else (message in result.error)


def test_a_request_that_takes_too_long_times_out():
    async def slow(request):
        await asyncio.sleep(5)

    async def run():
        async with fake_server(slow) as http:
            return await loadtest.one_request(http, loadtest.request_body([1, 2], 4), timeout=0.2)

    assert "timed out" in asyncio.run(run()).error


def test_a_refused_connection_is_a_failed_request():
    async def run():
        async with httpx.AsyncClient(base_url="http://127.0.0.1:1") as http:
            return await loadtest.one_request(http, loadtest.request_body([1, 2], 4), timeout=5)

    assert "ConnectError" in asyncio.run(run()).error


@pytest.fixture(scope="module")
def tiny_engine(export_factory, tmp_path_factory):
    from engines import ort as ort_engine
    from runtime.artifact import ArtifactWriter

    export = export_factory("llama")
    with ArtifactWriter(tmp_path_factory.mktemp("loadtest-store"), ort_engine.STAGE, "test", export.id, {}) as writer:
        return ort_engine.run(export, writer, ort_engine.EngineConfig(threads=1), progress=lambda _: None)


def test_a_whole_run_against_the_real_server(tiny_engine, tmp_path):
    out = tmp_path / "lt.json"
    result = run_cli("runtime.loadtest", str(tiny_engine.path), "--clients", "1,2", "--requests", "1",
                     "--max-tokens", "4", "--prompt-tokens", "8", "--system-tokens", "8", "--system-clients", "1",
                     "--modes", "continuous,static", "--threads", "1", "--baseline-requests", "1",
                     "--json", str(out), timeout=300)
    report = json.loads(out.read_text())
    assert result.returncode == 0, result.stdout + result.stderr
    assert [(r["mode"], r["case"], r["clients"]) for r in report["rows"]] == [
        (mode, case, clients) for mode in ("continuous", "static")
        for case, clients in (("plain", 1), ("plain", 2), ("shared-system", 1))]
    for row in report["rows"]:
        assert row["errors"] == 0 and row["requests"] == row["clients"], row["error_samples"]
        baseline = row["baseline"]  # one stream just before every level but the one-stream one itself
        assert baseline is None if (row["case"], row["clients"]) == ("plain", 1) else baseline["requests"] == 1
        assert row["tokens_per_second"] > 0 and row["ttft_ms"]["p50"] > 0 and row["server_rss_mb"] > 0
    assert [report["servers"][mode]["health"]["status"] for mode in ("continuous", "static")] == ["ok", "ok"]
    for name in ("continuous/static tok/s at 2 streams", "continuous/static TTFT p50 at 1 streams",
                 "continuous shared-system TTFT p50 / plain, 1 stream"):
        assert math.isfinite(report["ratios"][name]), name
    assert "[continuous] server pid" in result.stdout and "ratios (this run)" in result.stdout
