"""The OpenAI request and response shapes, without any HTTP: a body becomes a `Completion` (prompts as token
ids, sampling, n, logprobs, echo, stop strings, streaming options) or an `ApiError` with a 4xx status that
names the field; finished choices become the response objects and stream chunks clients parse.

Fields we do not implement (`tools`, `response_format` other than text, penalties, `logit_bias`, `suffix`,
`best_of`) and fields we do not know are refused by name: a client is never silently given something else
than it asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.generate import GenerationConfig
from runtime.service import MAX_TOP_LOGPROBS, Token

MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings, as the OpenAI API allows
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's limit
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
                 "user", "ignore_eos", "presence_penalty", "frequency_penalty", "logit_bias", "top_k"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format",
                               "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs", "echo", "suffix", "best_of"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


@dataclass
class Completion:
    """One parsed request: every prompt runs `n` times; choice i * n + j is prompt i's j-th sample."""

    chat: bool
    prompts: list[list[int]]
    config: GenerationConfig
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # top alternatives per token, None: no log-probabilities
    echo: bool = False  # completions: the prompt is part of the returned text (and of its logprobs)
    prompt_texts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Budget:
    max_tokens: int  # the most any request may ask for
    max_prompt_tokens: int
    context: int  # positions per sequence: prompt + generated


def check_fields(body: dict, chat: bool) -> None:
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad(f"unknown field {unknown[0]!r}; this endpoint takes: {', '.join(sorted(allowed))}", unknown[0])
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad(f"{name} are not supported: this server does not call tools", name)
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none"):
            raise bad(f"{name} is not supported: this server does not call tools", name)
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise bad("response_format is not supported except {'type': 'text'}: output is not constrained to JSON",
                  "response_format")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise bad(f"{name} is not supported; leave it at 0", name)
    if body.get("logit_bias"):
        raise bad("logit_bias is not supported", "logit_bias")
    if body.get("suffix"):
        raise bad("suffix (insertion) is not supported", "suffix")
    if body.get("best_of") not in (None, 1):
        raise bad("best_of is not supported; use n", "best_of")


def message_text(message, index: int) -> tuple[str, str]:
    """(role, text) of one chat message; content may be a string or a list of text parts."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad(f"{where} must be an object with role and content", "messages")
    role = message.get("role")
    if role not in ROLES:
        raise bad(f"{where}.role {role!r} is not one of: {', '.join(ROLES)}", "messages")
    if message.get("tool_calls"):
        raise bad(f"{where}.tool_calls are not supported: this server does not call tools", "messages")
    content = message.get("content")
    if content is None and role == "assistant":
        return ROLES[role], ""
    if isinstance(content, str):
        return ROLES[role], content
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}.content part of type {kind!r} is not supported: this model reads text parts "
                          "({'type': 'text', 'text': ...}) only", "messages")
            texts.append(part["text"])
        return ROLES[role], "\n".join(texts)
    raise bad(f"{where}.content must be a string or a non-empty list of text parts", "messages")


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    return [{"role": role, "content": text} for role, text in (message_text(m, i) for i, m in enumerate(messages))]


def is_token_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in value)


def completion_prompts(body: dict, encode) -> tuple[list[list[int]], list[str | None]]:
    """Prompts as token ids, and their texts where given as text: a string, a list of strings, a list of token
    ids, or a list of token-id lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or is_token_list(prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad("prompt must be a non-empty string, a list of strings, a list of token ids, or a list of such "
                  "lists", "prompt")
    ids, texts = [], []
    for item in prompt:
        if isinstance(item, str) and item:
            ids.append(encode(item))
            texts.append(item)
        elif is_token_list(item):
            ids.append(list(item))
            texts.append(None)
        else:
            raise bad("prompt must be a non-empty string, a list of strings, a list of token ids, or a list of "
                      "such lists", "prompt")
    if any(not p for p in ids):
        raise bad("the prompt encodes to no tokens", "prompt")
    return ids, texts


def integer(body: dict, name: str, default, low: int, high: int) -> int:
    value = body.get(name, default)
    if value is None:
        value = default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise bad(f"{name} must be an integer in [{low}, {high}], got {value!r}", name)
    return value


def number(body: dict, name: str, default: float, low: float, high: float, open_low: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        value = default
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or value > high
            or (value <= low if open_low else value < low)):
        interval = f"{'(' if open_low else '['}{low}, {high}]"
        raise bad(f"{name} must be a number in {interval}, got {value!r}", name)
    return float(value)


def stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > MAX_STOP
            or not all(isinstance(s, str) and s for s in stop)):
        raise bad(f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings", "stop")
    return tuple(stop)


def parse(body: dict, chat: bool, encode, render_chat, budget: Budget, eos: tuple[int, ...]) -> Completion:
    """Validate the whole request before anything runs."""
    check_fields(body, chat)
    if chat:
        prompts, texts = [encode(render_chat(chat_messages(body)))], [None]
    else:
        prompts, texts = completion_prompts(body, encode)
    longest = max(len(p) for p in prompts)
    limit = min(budget.max_prompt_tokens, budget.context - 1)
    if longest > limit:
        raise bad(f"the prompt has {longest} tokens, which exceeds the context of {limit} prompt tokens; shorten it",
                  "messages" if chat else "prompt")
    name = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    default = min(budget.max_tokens, budget.context - longest) if chat else 16
    max_tokens = integer(body, name, default, 1, budget.max_tokens)
    if longest + max_tokens - 1 > budget.context:
        raise bad(f"the prompt has {longest} tokens; with {name} {max_tokens} that exceeds the context of "
                  f"{budget.context} tokens; shorten it or ask for fewer tokens", name)
    top_p = number(body, "top_p", 1.0, 0.0, 1.0, open_low=True)
    temperature = number(body, "temperature", 1.0 if top_p < 1 else 0.0, 0.0, 2.0)
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise bad(f"seed must be an integer, got {seed!r}", "seed")
    # `ignore_eos` (as vLLM spells it): generate exactly max_tokens, for benchmarks and load tests.
    stop_ids = () if body.get("ignore_eos") else eos
    config = GenerationConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              top_k=integer(body, "top_k", 0, 0, 1 << 20), seed=seed, stop_token_ids=stop_ids)
    completion = Completion(chat, prompts, config, n=integer(body, "n", 1, 1, MAX_N), stop=stop_strings(body),
                            prompt_texts=texts)
    completion.stream = bool(body.get("stream"))
    options = body.get("stream_options")
    if options is not None:
        if not completion.stream or not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad("stream_options takes only {'include_usage': bool}, and only with stream: true",
                      "stream_options")
        completion.include_usage = bool(options.get("include_usage"))
    if chat:
        completion.logprobs = chat_logprobs(body)
    else:
        completion.logprobs = None if body.get("logprobs") is None else integer(body, "logprobs", 0, 0,
                                                                                 MAX_COMPLETION_LOGPROBS)
        completion.echo = bool(body.get("echo"))
    return completion


def chat_logprobs(body: dict) -> int | None:
    wanted = body.get("logprobs")
    if wanted not in (None, True, False):
        raise bad(f"logprobs must be a boolean on chat completions, got {wanted!r}", "logprobs")
    top = body.get("top_logprobs")
    if top is not None and not wanted:
        raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    return integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS) if wanted else None


class StopText:
    """Cuts a choice's text at the first stop string; while streaming, holds back a tail that might still
    become one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.hit = False

    def cut(self, text: str) -> str:
        """The text up to the first stop string (which sets `hit`), or all of it."""
        ends = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if ends:
            self.hit = True
            return text[: min(ends)]
        return text

    def safe(self, text: str) -> str:
        """The part of an unfinished text that no stop string can still claim."""
        keep = len(text)
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    keep = min(keep, len(text) - size)
                    break
        return text[:keep]


# -- responses ----------------------------------------------------------------------------------------------

def token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprob_entry(token: Token, text_of) -> dict:
    text = text_of(token.id)
    top = [{"token": text_of(i), "logprob": lp, "bytes": token_bytes(text_of(i))} for i, lp in token.top]
    return {"token": text, "logprob": token.logprob, "bytes": token_bytes(text), "top_logprobs": top}


def completion_logprobs(tokens: list[Token], text_of, start_offset: int = 0) -> dict:
    """The legacy completions shape: parallel lists over tokens; the first prompt token has None."""
    texts = [text_of(t.id) for t in tokens]
    offsets, at = [], start_offset
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.logprob is None else {text_of(i): lp for i, lp in t.top} for t in tokens],
            "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}
