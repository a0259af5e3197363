"""The reference server with the real OpenAI client: completions and chat, streaming and whole, the same
tokens as the runtime's own greedy loop, sixteen concurrent clients, cancellation and a full queue, and bad
requests answered clearly (tests/test_openai_api.py checks the API field by field)."""

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import RunningServer

import runtime
from runtime.generate import GenerationConfig, generate
from runtime.serve import API_KEY_ENV, Access, ApiKey, api_key_from
from runtime.serve import main as serve_main
from runtime.service import ServiceConfig
from runtime.session import SessionOptions
from runtime.text import load_codec

PROMPT = "the quick brown fox"


def expected_text(artifact, prompt_text, max_tokens):
    codec = load_codec(artifact)
    session = runtime.open(artifact, SessionOptions(threads=1))
    stop = tuple(artifact.model_facts["eos_token_ids"])
    prompt = codec.encode(prompt_text)
    result = generate(session, prompt, GenerationConfig(max_new_tokens=max_tokens, stop_token_ids=stop))
    session.close()
    # What the tokens add after the prompt: this tokenizer's decode puts a space between tokens.
    return codec.decode(prompt + result.tokens[0])[len(codec.decode(prompt)):], result.finish_reasons[0]


def test_completion_equals_the_runtime_greedy_output(client, chat_export):
    text, reason = expected_text(chat_export, PROMPT, 12)
    response = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert response.choices[0].text == text and response.choices[0].finish_reason == reason
    assert response.usage.completion_tokens <= 12 and response.usage.prompt_tokens > 0


def test_streamed_completion_concatenates_to_the_same_text(client, chat_export):
    text, _ = expected_text(chat_export, PROMPT, 12)
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    pieces = [chunk.choices[0].text for chunk in stream]
    assert "".join(pieces) == text and pieces[-1] == "" and len(pieces) >= 2  # the last carries the reason


def test_chat_whole_and_streaming(client, chat_export):
    messages = [{"role": "user", "content": "the lazy dog"}]
    rendered = load_codec(chat_export).render_chat(messages, add_generation_prompt=True)
    text, _ = expected_text(chat_export, rendered, 10)
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.content == text and whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text


def test_sixteen_concurrent_clients_all_complete_correctly(client, chat_export, server):
    expected = expected_text(chat_export, PROMPT, 8)[0]

    def one_client(index):
        texts = []
        for _ in range(20):
            stream = index % 2 == 0
            if stream:
                chunks = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                                   stream=True)
                texts.append("".join(c.choices[0].text for c in chunks))
            else:
                texts.append(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8,
                                                       temperature=0).choices[0].text)
        return texts

    with ThreadPoolExecutor(16) as pool:
        results = [t for texts in pool.map(one_client, range(16)) for t in texts]
    assert len(results) == 320 and all(t == expected for t in results)
    metrics = httpx.get(server.url + "/metrics").text
    assert "gen_ai_server_time_to_first_token_seconds_count" in metrics
    assert 'lmforge_requests_total{outcome="completed"}' in metrics


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "malformed JSON"),
    (json.dumps({"model": "gpt-4", "prompt": "x"}).encode(), 404, "model 'gpt-4' is not served here"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": -1}).encode(), 400, "max_tokens must be"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 10**9}).encode(), 400, "max_tokens must be"),
    (json.dumps({"model": "tiny", "prompt": "fox " * 400, "max_tokens": 8}).encode(), 400, "exceeds the context"),
    (json.dumps({"model": "tiny", "prompt": ""}).encode(), 400, "prompt must be a non-empty string"),
    (b"{" + b" " * (2 << 20) + b"}", 413, "exceeds"),
], ids=["malformed", "unknown model", "negative max_tokens", "huge max_tokens", "long prompt", "empty prompt",
        "2 MiB body"])
def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(server, client, body, status, message):
    response = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert message in response.json()["error"]["message"]
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).choices[0].text is not None


def test_client_that_disconnects_mid_stream_cancels_its_request(server, client):
    with httpx.stream("POST", server.url + "/v1/completions", json={"model": "tiny", "prompt": PROMPT,
                                                                     "max_tokens": 200, "stream": True,
                                                                     "ignore_eos": True}) as response:
        next(response.iter_lines())
    deadline = time.time() + 10
    while time.time() < deadline and 'outcome="cancelled"' not in httpx.get(server.url + "/metrics").text:
        time.sleep(0.1)
    assert 'lmforge_requests_total{outcome="cancelled"}' in httpx.get(server.url + "/metrics").text
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_more_requests_than_the_queue_holds_get_429(chat_export):
    running = RunningServer(chat_export, service_config=ServiceConfig(queue_size=1, max_batch=1))
    try:
        async def burst():
            async with httpx.AsyncClient(base_url=running.url, timeout=60) as http:
                body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 64, "ignore_eos": True}
                return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(12)))

        statuses = [r.status_code for r in asyncio.run(burst())]
        assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
        limited = next(r for r in asyncio.run(burst()) if r.status_code == 429)
        assert "retry later" in limited.json()["error"]["message"]
    finally:
        running.stop()


# -- authentication ------------------------------------------------------------------------------------------

KEY = "sk-lmforge-test-0123456789"


@pytest.fixture(scope="module")
def keyed(chat_export):
    """A server started with an API key (its /metrics need the key, the default)."""
    running = RunningServer(chat_export, access=Access(ApiKey(KEY)))
    yield running
    running.stop()


def openai_with(url: str, key: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def test_with_a_key_the_openai_client_needs_it_and_health_stays_open(keyed):
    import openai

    answer = openai_with(keyed.url, KEY).completions.create(model="tiny", prompt=PROMPT, max_tokens=3)
    assert answer.usage.completion_tokens > 0
    streamed = openai_with(keyed.url, KEY).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=3, stream=True)
    assert [c.choices[0].finish_reason for c in streamed][-1] in ("stop", "length")
    for wrong in ("sk-wrong", KEY + "x", KEY[:-1]):  # (no key at all: this client refuses to send that)
        with pytest.raises(openai.AuthenticationError, match="API key"):
            openai_with(keyed.url, wrong).completions.create(model="tiny", prompt=PROMPT, max_tokens=3)
    with pytest.raises(openai.AuthenticationError):
        openai_with(keyed.url, "sk-wrong").models.list()
    assert httpx.get(keyed.url + "/health").status_code == 200


@pytest.mark.parametrize("headers", [{}, {"authorization": KEY}, {"authorization": f"Basic {KEY}"},
                                     {"authorization": f"Bearer {KEY.upper()}"}, {"authorization": "Bearer"}],
                         ids=["none", "no scheme", "basic", "wrong case", "no token"])
def test_a_request_without_the_right_bearer_token_gets_openais_401(keyed, headers):
    response = httpx.post(keyed.url + "/v1/completions", json={"model": "tiny", "prompt": PROMPT}, headers=headers)
    assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert "Authorization: Bearer <key>" in error["message"]


def test_metrics_need_the_key_unless_made_public(keyed, chat_export):
    with_key = httpx.get(keyed.url + "/metrics", headers={"authorization": f"Bearer {KEY}"})
    assert with_key.status_code == 200 and "lmforge_requests" in with_key.text
    assert httpx.get(keyed.url + "/metrics").status_code == 401
    public = RunningServer(chat_export, access=Access(ApiKey(KEY), public_metrics=True))
    try:
        assert httpx.get(public.url + "/metrics").status_code == 200
        assert httpx.get(public.url + "/v1/models").status_code == 401  # only /metrics is opened
    finally:
        public.stop()


# What may stand in an HTTP header value (RFC 9110: visible ASCII, space, tab, and obs-text bytes).
HEADER_BYTES = [9, *range(0x20, 0x7F), *range(0x80, 0x100)]


def test_any_other_authorization_header_is_refused_without_a_server_error(keyed):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    tokens = (st.lists(st.sampled_from(HEADER_BYTES), max_size=40).map(bytes)
              | st.sampled_from([KEY.encode(), KEY.encode() + b"\xff", KEY.encode()[1:], b"bearer"]))
    headers = st.tuples(st.sampled_from([b"Bearer ", b"bearer ", b"BEARER\t", b"Bearer", b"", b"Token "]), tokens)

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(header=headers)
    def check(header):
        scheme, token = header
        value = (scheme + token).strip(b" \t")
        response = http.get("/v1/models", headers=[(b"authorization", value)])
        accepted = value.split(None, 1) == [scheme.strip(), KEY.encode()] and scheme.strip().lower() == b"bearer"
        assert response.status_code == (200 if accepted else 401), (value, response.text)

    with httpx.Client(base_url=keyed.url) as http:
        check()


def test_listening_beyond_loopback_without_a_key_warns_of_the_risk(monkeypatch, capsys, tmp_path):
    missing = str(tmp_path / "no-artifact")  # the server stops at the artifact, after its warning
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert serve_main([missing, "--host", "0.0.0.0"]) == 2
    warning = capsys.readouterr().err.splitlines()[0]
    assert warning.startswith("warning: listening on 0.0.0.0:8000 without an API key")
    assert "anyone who can reach this port" in warning and API_KEY_ENV in warning
    for quiet in ([missing, "--host", "127.0.0.1"], [missing, "--host", "::1"], [missing, "--host", "0.0.0.0",
                                                                                   "--api-key", KEY]):
        assert serve_main(quiet) == 2
        assert "warning" not in capsys.readouterr().err
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert serve_main([missing, "--host", "0.0.0.0"]) == 2
    assert "warning" not in capsys.readouterr().err


def test_the_key_comes_from_the_environment_and_never_shows_in_a_repr(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, KEY)
    key = api_key_from(None)
    assert key.matches(KEY.encode()) and not key.matches(KEY.encode()[:-1])
    assert KEY not in repr(key) and KEY not in repr(Access(key))
    assert api_key_from("other").matches(b"other")  # the flag wins over the environment
    monkeypatch.delenv(API_KEY_ENV)
    assert api_key_from(None) is None
