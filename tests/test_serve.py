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

from runtime.generate import GenerationConfig, generate
from runtime.service import ServiceConfig
from runtime.session import SessionOptions
from runtime.session import open as open_session
from runtime.text import load_codec

PROMPT = "the quick brown fox"


def expected_text(artifact, prompt_text, max_tokens):
    codec = load_codec(artifact)
    session = open_session(artifact, SessionOptions(threads=1))
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
