"""The OpenAI API as clients use it, against a running server on the tiny model: text parts, n with seeds,
chat and completions log-probabilities equal to the model's own (the evaluation harnesses' echo requests
included), every prompt shape, stop strings, usage with cached tokens; and every unsupported field or malformed
body is a 4xx that names the problem, never a 500 or a dropped connection."""

import json

import httpx
import numpy as np
import openai
import pytest

import runtime
from runtime.generate import GenerationConfig, generate
from runtime.openai_api import StopText, TokenText, text_after
from runtime.service import Token, log_softmax
from runtime.session import SessionOptions
from runtime.text import load_codec

PROMPT = "the quick brown fox"
MESSAGES = [{"role": "user", "content": "the lazy dog"}]
NEVER = ["@@", "##", "%%"]  # characters the tiny tokenizer has no tokens for: stop strings that never match


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as session:
        yield session


class Model:
    """The runtime on its own: what the server's answers must equal."""

    def __init__(self, artifact):
        self.session = runtime.open(artifact, SessionOptions(threads=1))
        self.codec = load_codec(artifact)

    def logprobs(self, ids: list[int]) -> np.ndarray:
        """Row i: the log-softmax that predicts token i + 1."""
        return np.array([log_softmax(row) for row in self.session.prefill(np.array([ids])).copy()[0]])

    def greedy(self, prompt: list[int], count: int) -> list[int]:
        return generate(self.session, prompt, GenerationConfig(max_new_tokens=count, stop_token_ids=())).tokens[0]

    def greedy_text(self, prompt: list[int], count: int) -> str:
        return text_after(self.codec.decode, prompt, self.greedy(prompt, count))

    def chat_prompt(self, messages) -> list[int]:
        return self.codec.encode(self.codec.render_chat(messages))

    def all_text(self, ids: list[int]) -> str:
        return self.codec.tokenizer.decode(ids, skip_special_tokens=False)


@pytest.fixture(scope="module")
def model(chat_export):
    reference = Model(chat_export)
    yield reference
    reference.session.close()


def post(http, path: str, body: dict) -> dict:
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def stream_events(http, path: str, body: dict) -> list[dict]:
    """The parsed `data:` events of a stream, [DONE] included as the string."""
    with http.stream("POST", path, json=body | {"stream": True}) as response:
        assert response.status_code == 200, response.read()
        lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]] + ["[DONE]"]


def streamed_texts(chunks) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
    return texts


# -- 1. content as text parts ---------------------------------------------------------------------------------

def test_content_as_text_parts_reads_as_their_text_and_other_parts_are_refused(client):
    def reply(content):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                              max_tokens=6, temperature=0).choices[0].message.content

    parts = [{"type": "text", "text": "the lazy"}, {"type": "text", "text": "dog"}]
    assert reply(parts) == reply("the lazy\ndog")
    with pytest.raises(openai.BadRequestError, match="image_url"):
        reply([{"type": "text", "text": "what is this?"},
               {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}])


# -- 2. n --------------------------------------------------------------------------------------------------------

def test_n_seeded_choices_use_seed_plus_index_whole_and_streaming(client):
    def chat(**kwargs):
        return client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=1.5,
                                              extra_body={"ignore_eos": True}, **kwargs)

    singles = [chat(seed=7 + j).choices[0].message.content for j in range(3)]
    assert len(set(singles)) > 1  # else this test could not tell seed + j from seed
    whole = chat(n=3, seed=7)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert [c.message.content for c in whole.choices] == singles
    chunks = list(chat(n=3, seed=7, stream=True))
    assert streamed_texts(chunks) == dict(enumerate(singles))
    finished = {c.index: c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason}
    assert finished == {0: "length", 1: "length", 2: "length"}
    assert whole.usage.completion_tokens == 24


def test_n_greedy_choices_are_identical(client, model):
    expected = model.greedy_text(model.codec.encode(PROMPT), 6)
    whole = client.completions.create(model="tiny", prompt=PROMPT, n=4, max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert [(c.index, c.text) for c in whole.choices] == [(i, expected) for i in range(4)]


# -- 3. chat logprobs ------------------------------------------------------------------------------------------

def test_chat_logprobs_are_the_models_log_softmax_whole_and_streaming(client, model):
    prompt = model.chat_prompt(MESSAGES)
    ids = model.greedy(prompt, 5)
    rows = model.logprobs(prompt + ids)[len(prompt) - 1:]
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
                  extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs).choices[0]
    content = whole.logprobs.content
    assert len(content) == 5
    for k, entry in enumerate(content):
        assert entry.logprob == pytest.approx(rows[k][ids[k]], abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(np.sort(rows[k])[::-1][:3], abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
        assert entry.bytes == list(entry.token.encode())
    if not set(ids) & {0, 1, 2}:  # special tokens have text in logprobs, none in the message
        assert "".join(entry.token for entry in content) == whole.message.content
    streamed = [entry for chunk in client.chat.completions.create(stream=True, **kwargs)
                for choice in chunk.choices if choice.logprobs for entry in choice.logprobs.content]
    assert [(e.token, e.logprob, [t.logprob for t in e.top_logprobs]) for e in streamed] == [
        (e.token, e.logprob, [t.logprob for t in e.top_logprobs]) for e in content]


def test_chat_logprobs_without_top_and_refusals(client, http):
    choice = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=0,
                                            logprobs=True).choices[0]
    assert choice.logprobs.content and all(entry.top_logprobs == [] for entry in choice.logprobs.content)
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3).choices[0].logprobs is None
    for extra, field in (({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21},
                                                                  "top_logprobs"), ({"logprobs": 1}, "logprobs")):
        response = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES} | extra)
        assert response.status_code == 400 and response.json()["error"]["param"] == field


# -- 4. echo with logprobs: how evaluation harnesses score a served model ------------------------------------

def check_echo_logprobs(model, prompt: list[int], choice: dict, generated: int) -> None:
    """Prompt-token log-likelihoods are the model's, the first is None; tokens and offsets match the text."""
    logprobs, expected = choice["logprobs"], model.logprobs(prompt)
    assert len(logprobs["tokens"]) == len(prompt) + generated
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for i in range(1, len(prompt)):
        assert logprobs["token_logprobs"][i] == pytest.approx(expected[i - 1][prompt[i]], abs=1e-4)
        top = logprobs["top_logprobs"][i]
        assert max(top.values()) == pytest.approx(expected[i - 1].max(), abs=1e-4)
        assert top[logprobs["tokens"][i]] == logprobs["token_logprobs"][i]  # the chosen token is always there
    pieces, text = logprobs["tokens"], choice["text"]
    assert logprobs["text_offset"] == [len("".join(pieces[:i])) for i in range(len(pieces))]
    assert "".join(pieces[:len(prompt)]) == model.all_text(prompt) == text[:len(model.all_text(prompt))]
    if not generated or "</s>" not in pieces[-1]:
        assert "".join(pieces) == text


def test_echo_logprobs_as_lm_evaluation_harness_requests_them(http, model):
    context, continuation = model.codec.encode(PROMPT), model.codec.encode(" jumps over the lazy dog")
    whole = context + continuation
    # local-completions' loglikelihood payload (lm-eval 0.4.x): token-id prompts, one token generated.
    body = {"model": "tiny", "prompt": [whole, context], "max_tokens": 1, "logprobs": 1, "echo": True,
            "temperature": 0, "seed": 1234}
    response = post(http, "/v1/completions", body)
    choices = sorted(response["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1]
    check_echo_logprobs(model, whole, choices[0], generated=1)
    check_echo_logprobs(model, context, choices[1], generated=1)
    # The harness' arithmetic: the continuation's log-likelihood, and whether greedy decoding would give it.
    rows = model.logprobs(whole)
    expected = sum(rows[i - 1][whole[i]] for i in range(len(context), len(whole)))
    token_logprobs = choices[0]["logprobs"]["token_logprobs"][len(context):-1]
    assert sum(token_logprobs) == pytest.approx(expected, abs=1e-3)
    is_greedy = all(t == max(top.values()) for t, top in
                    zip(token_logprobs, choices[0]["logprobs"]["top_logprobs"][len(context):-1]))
    assert is_greedy == all(rows[i - 1].argmax() == whole[i] for i in range(len(context), len(whole)))
    assert response["usage"]["prompt_tokens"] == len(whole) + len(context)


def test_max_tokens_zero_with_echo_scores_the_prompt_only_whole_and_streaming(http, model):
    prompt = model.codec.encode(PROMPT + " jumps over")
    # lm-eval 0.4.0's openai-completions payload: no token generated, ten alternatives.
    body = {"model": "tiny", "prompt": [prompt], "max_tokens": 0, "logprobs": 10, "echo": True, "temperature": 0}
    response = post(http, "/v1/completions", body)
    choice = response["choices"][0]
    check_echo_logprobs(model, prompt, choice, generated=0)
    assert choice["text"] == model.all_text(prompt) and choice["finish_reason"] == "length"
    assert response["usage"]["completion_tokens"] == 0
    assert all(len(top) <= 11 for top in choice["logprobs"]["top_logprobs"][1:])  # fewer where texts are alike
    events = stream_events(http, "/v1/completions", body)[:-1]
    assert "".join(c["text"] for e in events for c in e["choices"]) == choice["text"]
    streamed = [lp for e in events for c in e["choices"] if c["logprobs"] for lp in c["logprobs"]["token_logprobs"]]
    assert streamed == choice["logprobs"]["token_logprobs"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    response = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 0})
    assert response.status_code == 400 and "echo" in response.json()["error"]["message"]


def test_echo_of_a_text_prompt_with_logprobs_streams_as_whole(http, model):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "logprobs": 2, "echo": True, "temperature": 0,
            "ignore_eos": True}
    choice = post(http, "/v1/completions", body)["choices"][0]
    prompt = model.codec.encode(PROMPT)
    assert choice["text"] == PROMPT + model.greedy_text(prompt, 4)
    check_echo_logprobs(model, prompt, choice, generated=4)
    events = stream_events(http, "/v1/completions", body)[:-1]
    assert "".join(c["text"] for e in events for c in e["choices"]) == choice["text"]
    merged = {key: [v for e in events for c in e["choices"] if c["logprobs"] for v in c["logprobs"][key]]
              for key in ("tokens", "token_logprobs", "text_offset")}
    assert merged == {key: choice["logprobs"][key] for key in merged}


# -- 5. prompt shapes --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["token ids", "token id lists", "strings"])
def test_every_prompt_shape_gives_choices_in_prompt_order(client, model, shape):
    texts = [PROMPT, "the lazy dog", "some punctuation"]
    ids = [model.codec.encode(t) for t in texts]
    prompt, prompts = {"token ids": (ids[0], ids[:1]), "token id lists": (ids, ids), "strings": (texts, ids)}[shape]
    expected = [model.greedy_text(p, 3) for p in prompts]
    kwargs = dict(model="tiny", prompt=prompt, n=2, max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    assert [(c.index, c.text) for c in whole.choices] == [(i, expected[i // 2]) for i in range(2 * len(prompts))]
    assert whole.usage.prompt_tokens == sum(len(p) for p in prompts)
    assert whole.usage.completion_tokens == 3 * 2 * len(prompts)
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert streamed_texts(client.completions.create(stream=True, **kwargs)) == {c.index: c.text for c in whole.choices}


# -- 6. stop strings ---------------------------------------------------------------------------------------------

def test_stop_strings_cut_the_text_whole_and_streaming(client, http, model):
    full = model.greedy_text(model.codec.encode(PROMPT), 12)
    middle = len(full) // 2
    stop = full[middle - 2: middle + 2]  # likely across a token boundary: streaming must hold it back
    expected = full[: full.find(stop)]
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=NEVER + [stop],
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0]
    assert (whole.text, whole.finish_reason) == (expected, "stop")
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0,
                                          stop=stop, stream=True)
    assert stop not in "".join(c.choices[0].delta.content or "" for c in chat)
    response = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "stop": NEVER + ["a", "b"]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stop"


def test_stop_text_holds_back_only_what_may_become_a_stop_string():
    stop = StopText(("world", "xy"))
    assert stop.safe("hello wor") == "hello " and stop.safe("hello x") == "hello " and stop.safe("abc") == "abc"
    assert stop.cut("hello world and xy") == "hello " and stop.hit
    assert not StopText(()).hit and StopText(()).cut("text") == "text"


def test_token_texts_concatenate_to_the_decoded_text(model):
    ids = model.codec.encode("the quick brown fox, jumps over: (a, b)")
    texts = TokenText(model.all_text)
    pieces = [texts.at(ids, i, Token(t))[t] for i, t in enumerate(ids)]
    assert "".join(pieces) == model.all_text(ids)


# -- 7. usage and cached tokens ----------------------------------------------------------------------------------

def test_stream_usage_comes_last_and_a_repeated_long_prompt_reports_cached_tokens(client, model):
    prompt = "calibration text for a tiny model, with numbers 0123456789 and some punctuation: (a, b); c! d? e-f. " * 2
    assert len(model.codec.encode(prompt)) > 48  # three prefix-cache blocks and a token

    def usage_of_stream():
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))
        assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
        return chunks[-1].usage

    first, second = usage_of_stream(), usage_of_stream()
    assert first.prompt_tokens == len(model.codec.encode(prompt)) and first.completion_tokens == 3
    assert first.prompt_tokens_details.cached_tokens == 0
    assert second.prompt_tokens_details.cached_tokens >= 32
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0)
    assert whole.usage.prompt_tokens_details.cached_tokens >= 32


# -- 8. not implemented: a 400 that names the field ------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("path, extra, field", [
    ("chat", {"tools": [TOOL]}, "tools"),
    ("chat", {"tool_choice": "auto"}, "tool_choice"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat", {"presence_penalty": 0.5}, "presence_penalty"),
    ("chat", {"frequency_penalty": -1}, "frequency_penalty"),
    ("chat", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("chat", {"store": True}, "store"),
    ("chat", {"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ("completions", {"suffix": "end"}, "suffix"),
    ("completions", {"best_of": 2}, "best_of"),
    ("completions", {"frequency_penalty": 0.1}, "frequency_penalty"),
    ("completions", {"top_logprobs": 2}, "top_logprobs"),
])
def test_what_is_not_implemented_is_refused_by_name(http, path, extra, field):
    base = {"model": "tiny", "messages": MESSAGES} if path == "chat" else {"model": "tiny", "prompt": PROMPT}
    response = http.post(f"/v1/{'chat/' if path == 'chat' else ''}completions", json=base | {"max_tokens": 2} | extra)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and (field in error["message"] or "robot" in error["message"])


def test_neutral_values_of_refused_fields_are_accepted(client):
    response = client.chat.completions.create(
        model="tiny", messages=[{"role": "developer", "content": "be brief"}, {"role": "assistant", "content": None},
                                {"role": "tool", "content": "42", "tool_call_id": "1"}] + MESSAGES, max_tokens=2,
        temperature=0, presence_penalty=0, frequency_penalty=0.0, logit_bias={}, tool_choice="none",
        response_format={"type": "text"}, user="someone", seed=-5)
    assert response.choices[0].message.role == "assistant"


# -- 9. malformed bodies: always a 4xx, the server keeps serving ---------------------------------------------

def completion_body(**fields) -> bytes:
    return json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 2} | fields).encode()


def chat_body(**fields) -> bytes:
    return json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 2} | fields).encode()


MALFORMED = {
    "a JSON array": b"[1, 2]",
    "a JSON string": b'"hi"',
    "a JSON number": b"5",
    "null": b"null",
    "deep brackets": b"[" * 100_000,
    "deep value": completion_body()[:-1] + b', "n": ' + b"[" * 900 + b"]" * 900 + b"}",
    "invalid UTF-8": b'{"model": "tiny", "prompt": "\xff\xfe"}',
    "a lone surrogate": completion_body(prompt="\ud800 fox"),
    "empty": b"",
    "missing model": json.dumps({"prompt": PROMPT}).encode(),
    "model of a wrong type": completion_body(model=["tiny"]),
    "missing prompt": json.dumps({"model": "tiny"}).encode(),
    "n as a string": completion_body(n="2"),
    "stop as a number": completion_body(stop=5),
    "max_tokens true": completion_body(max_tokens=True),
    "temperature NaN": completion_body()[:-1] + b', "temperature": NaN}',
    "top_p Infinity": completion_body()[:-1] + b', "top_p": Infinity}',
    "stream as a string": completion_body(stream="false"),
    "echo as a number": completion_body(echo=1),
    "logprobs too many": completion_body(logprobs=21),
    "token id out of vocabulary": completion_body(prompt=[5, 1_000_000]),
    "token id negative": completion_body(prompt=[[5, -1]]),
    "seed too large": completion_body(seed=2**64),
    "stream_options without stream": completion_body(stream_options={"include_usage": True}),
    "messages as a string": chat_body(messages="hi"),
    "a message without role": chat_body(messages=[{"content": "hi"}]),
    "role as a list": chat_body(messages=[{"role": ["user"], "content": "hi"}]),
    "content as a number": chat_body(messages=[{"role": "user", "content": 5}]),
    "a text part without text": chat_body(messages=[{"role": "user", "content": [{"type": "text"}]}]),
    "chat logprobs as a number": chat_body(logprobs=1),
    "max_completion_tokens as a string": chat_body(max_completion_tokens="5"),
    "tools as a string": chat_body(tools="yes"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_bodies_get_a_4xx_json_error(server, http, name):
    path = "/v1/chat/completions" if b'"messages"' in MALFORMED[name] else "/v1/completions"
    response = http.post(path, content=MALFORMED[name], headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["message"]


def test_a_body_without_length_is_cut_off_at_the_limit(http):
    chunks = (b" " * 65536 for _ in range(32))  # 2 MiB, sent chunked: no content-length to refuse up front
    response = http.post("/v1/completions", content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "exceeds" in response.json()["error"]["message"]


def test_more_sequences_than_the_queue_holds_is_a_400_not_an_endless_429(http):
    response = http.post("/v1/completions", json={"model": "tiny", "prompt": [PROMPT] * 5, "n": 16, "max_tokens": 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"


def test_a_vanishing_temperature_is_greedy_not_a_server_error(client, model):
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=1e-300,
                                      extra_body={"ignore_eos": True})
    assert whole.choices[0].text == model.greedy_text(model.codec.encode(PROMPT), 6)


def test_the_server_keeps_serving_after_malformed_bodies(client):
    response = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 2


FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
          "stream", "stream_options", "stop", "seed", "user", "ignore_eos", "presence_penalty", "frequency_penalty",
          "logit_bias", "top_k", "logprobs", "top_logprobs", "echo", "suffix", "best_of", "response_format",
          "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "unknown",
          "message.role", "message.content", "message.tool_calls"]


def edited_body(chat: bool, edits: list[tuple[str, object]]) -> dict:
    """A valid body with a field or two (of the body, or of its one message) set to something else."""
    message = {"role": "user", "content": "the lazy dog"}
    message |= {path.split(".")[1]: value for path, value in edits if path.startswith("message.")}
    body = {"model": "tiny", "max_tokens": 2} | ({"messages": [message]} if chat else {"prompt": PROMPT})
    return body | {path: value for path, value in edits if not path.startswith("message.")}


# -- 10. fuzzing every endpoint -------------------------------------------------------------------------------

FUZZ_EXAMPLES = 1500  # about 15 s on 2 cores
ENDPOINTS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
             ("GET", "/health"), ("GET", "/metrics")]
# Routes that exist under another method, and paths that do not: a 404 or 405, in OpenAI's error shape.
STRAYS = [("GET", "/v1/completions"), ("PUT", "/v1/chat/completions"), ("POST", "/v1/models"), ("DELETE", "/health"),
          ("POST", "/metrics"), ("POST", "/v1/embeddings"), ("GET", "/v1/models/tiny/../../health"), ("GET", "/%ff")]
CONTENT_TYPES = [None, "application/json", "text/plain", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x", "application/json; charset=latin-1", "application/octet-stream"]
# Numbers past every range a field checks: integers past int64 and float64, their JSON spellings of infinity.
HUGE_NUMBERS = [2**63, 2**64, -(2**63) - 1, 10**400, -(10**400), 1e308, -1e308, 5e-324]
HUGE_LITERALS = [b"1e999", b"-1e999", b"NaN", b"Infinity", b"-Infinity", b"1" + b"0" * 5000, b"0." + b"0" * 5000 + b"1"]


def fuzz_strategies():
    """Hypothesis strategies of (method, path, content type, body bytes) over every endpoint."""
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers(-3, 40) | st.integers() | st.floats() | st.text(max_size=8)
               | st.sampled_from(["user", "assistant", "text", "none", "auto"]) | st.sampled_from(HUGE_NUMBERS))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=6) | st.sampled_from(["type", "text"]), inner,
                                            max_size=3), max_leaves=8)
    chat = st.booleans()
    edited = st.tuples(chat, st.lists(st.tuples(st.sampled_from(FIELDS), values), min_size=1, max_size=2)).map(
        lambda pair: (pair[0], json.dumps(edited_body(*pair), allow_nan=True).encode()))
    any_json = st.tuples(chat, values.map(lambda v: json.dumps(v, allow_nan=True).encode()))

    def deep(pair):  # nesting far past any parser's recursion limit, whole or cut short, alone or in a field
        (depth, opener, closed, in_field) = pair
        closer = {b"[": b"]", b'{"a":': b"}"}[opener]
        nested = opener * depth + ((b"1" + closer * depth) if closed else b"")
        return completion_body()[:-1] + b', "prompt": ' + nested + b"}" if in_field else nested

    deeply = st.tuples(chat, st.tuples(st.integers(1, 200_000), st.sampled_from([b"[", b'{"a":']), st.booleans(),
                                       st.booleans()).map(deep))
    huge = st.tuples(chat, st.tuples(st.sampled_from(FIELDS[3:12]), st.sampled_from(HUGE_LITERALS)).map(
        lambda pair: completion_body()[:-1] + b', "' + pair[0].encode() + b'": ' + pair[1] + b"}"))

    def spliced(parts):  # a valid body with raw bytes (mostly not UTF-8) put inside or around it
        body, junk, at = parts
        at = at % (len(body) + 1)
        return body[:at] + junk + body[at:]

    invalid_utf8 = st.tuples(chat, st.tuples(st.sampled_from([completion_body(), chat_body()]),
                                             st.binary(min_size=1, max_size=8), st.integers(0, 400)).map(spliced))
    raw = st.tuples(chat, st.binary(max_size=64))
    posts = st.tuples(st.one_of(edited, any_json, deeply, huge, invalid_utf8, raw), st.sampled_from(CONTENT_TYPES))
    to_completions = posts.map(lambda p: ("POST", "/v1/chat/completions" if p[0][0] else "/v1/completions",
                                          p[1], p[0][1]))
    queries = st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=12)
    others = st.tuples(st.sampled_from(ENDPOINTS[2:] + STRAYS), st.sampled_from(CONTENT_TYPES),
                       st.binary(max_size=32) | any_json.map(lambda pair: pair[1]), queries).map(
        lambda t: (t[0][0], t[0][1] + ("?" + t[3] if t[3] else ""), t[1], t[2]))
    return st.one_of(to_completions, to_completions, others)


def test_fuzzed_requests_to_every_endpoint_never_get_a_server_error(server, http, client, capsys):
    """Generated requests to every endpoint: bodies of every JSON shape, deeply nested, with wrong types, huge
    numbers, invalid UTF-8 and raw bytes, under every content type; wrong methods and unknown paths. None gets a
    5xx or a dropped connection (httpx would raise), every refusal is an OpenAI error object, and afterwards the
    server is healthy, holds no slot, and answers a valid request."""
    from hypothesis import HealthCheck, given, settings

    sent: dict[str, int] = {}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(request=fuzz_strategies())
    def check(request):
        method, path, content_type, body = request
        headers = {"content-type": content_type} if content_type else {}
        response = http.request(method, path, content=body, headers=headers)
        endpoint = f"{method} {path.split('?')[0]}"
        sent[endpoint] = sent.get(endpoint, 0) + 1
        assert response.status_code < 500, (request, response.text)
        if response.status_code >= 400:
            assert response.json()["error"]["message"], (request, response.text)
        assert "server_error" not in response.text, (request, response.text)

    check()
    health = http.get("/health").json()
    assert health["status"] == "ok"
    assert health["slots_active"] == 0 and health["queued"] == 0  # nothing a refused request left behind
    answer = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, extra_body={"ignore_eos": True})
    assert answer.usage.completion_tokens == 2
    total = sum(sent.values())
    assert total >= FUZZ_EXAMPLES and all(sent.get(f"{m} {p}") for m, p in ENDPOINTS)
    with capsys.disabled():
        print(f"\nHTTP fuzz: {total} generated requests, 0 failures; by endpoint: "
              + ", ".join(f"{e} {n}" for e, n in sorted(sent.items(), key=lambda item: -item[1])[:12]))
