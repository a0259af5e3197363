"""The OpenAI request and response shapes, without any HTTP: a body becomes a `Completion` (prompts as token
ids, sampling, n, logprobs, echo, stop strings, streaming options) or an `ApiError` with a 4xx status that
names the field; finished choices become the response objects and stream chunks clients parse.

Fields we do not implement (`tools`, `tool_choice`, `response_format` other than text, penalties other than 0,
`logit_bias`, `suffix`, `best_of`) and fields we do not know are refused by name: a client is never silently
given something else than it asked for. Every field is type-checked, so a malformed body is a 400, never a
server error.

Departures from OpenAI, each for a reason:
- /v1/completions takes `logprobs` up to 20 (OpenAI: 5), as evaluation harnesses ask for 10.
- `max_tokens: 0` with `echo: true` scores the prompt without generating (older evaluation harnesses send it;
  the service always generates one token, which is dropped).
- `top_k` and `ignore_eos` (as vLLM spells them) are accepted.
"""

from __future__ import annotations

import math
import os
import reprlib
from dataclasses import dataclass, field, replace

from runtime.generate import GenerationConfig
from runtime.service import MAX_TOP_LOGPROBS, Token

MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings, as the OpenAI API allows
MAX_COMPLETION_LOGPROBS = MAX_TOP_LOGPROBS  # OpenAI allows 5; lm-evaluation-harness asks for 10
DEFAULT_COMPLETION_TOKENS = 16  # the legacy completions API's default max_tokens
SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI's seed is an int64
GREEDY_BELOW = 1e-5  # temperatures under this are greedy: logits divided by them overflow to inf and NaN
LOWEST_LOGPROB = -9999.0  # JSON has no -inf; what other OpenAI-compatible servers send for it
PIECE_CONTEXT = 6  # tokens a token's text is decoded after (see TokenText)

COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
                 "user", "ignore_eos", "presence_penalty", "frequency_penalty", "logit_bias", "top_k"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format",
                               "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs", "echo", "suffix", "best_of"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
STREAM_OPTIONS = {"include_usage", "include_obfuscation"}

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlevel = 3  # a deeply nested value must not recurse while its error message is written


def shown(value) -> str:
    """A value as an error message quotes it: short, whatever the client sent."""
    return _short.repr(value)


class ApiError(Exception):
    """`code`: OpenAI's machine-readable code where it has one (a wrong key: 'invalid_api_key'), else the status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        code = self.code if self.code is not None else self.status
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": code}}


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
    prompt_only: bool = False  # max_tokens 0 with echo: the one generated token is dropped
    prompt_texts: list[str | None] = field(default_factory=list)

    def config_for(self, sample: int) -> GenerationConfig:
        """Sample j of a prompt draws with seed + j, so seeded choices differ yet repeat; the sampler takes
        non-negative seeds only, so an int64 seed wraps onto them."""
        if self.config.seed is None:
            return self.config
        return replace(self.config, seed=(self.config.seed + sample) % 2**64)


@dataclass(frozen=True)
class Budget:
    max_tokens: int  # the most any request may ask for
    max_prompt_tokens: int
    context: int  # positions per sequence: prompt + generated


# -- field types --------------------------------------------------------------------------------------------

def is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(body: dict, name: str, default, low: int, high: int):
    value = body.get(name)
    if value is None:
        return default
    if not is_integer(value) or not low <= value <= high:
        raise bad(f"{name} must be an integer in [{low}, {high}], got {shown(value)}", name)
    return value


def number(body: dict, name: str, default: float, low: float, high: float, open_low: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    inside = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not inside or value > high or (value <= low if open_low else value < low):
        interval = f"{'(' if open_low else '['}{low}, {high}]"
        raise bad(f"{name} must be a number in {interval}, got {shown(value)}", name)
    return float(value)


def boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false, got {shown(value)}", name)
    return value


# -- refused fields -----------------------------------------------------------------------------------------

def check_fields(body: dict, chat: bool) -> None:
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad(f"unknown field {shown(unknown[0])}; this endpoint takes: {', '.join(sorted(allowed))}",
                  unknown[0])
    check_no_tools(body)
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise bad("response_format is not supported except {'type': 'text'}: output is not constrained to JSON",
                  "response_format")
    for name in ("presence_penalty", "frequency_penalty"):
        if number(body, name, 0.0, -2.0, 2.0) != 0:
            raise bad(f"{name} is not supported; leave it at 0", name)
    logit_bias = body.get("logit_bias")
    if logit_bias is not None and not isinstance(logit_bias, dict):
        raise bad(f"logit_bias must be an object of token id to bias, got {shown(logit_bias)}", "logit_bias")
    if logit_bias:
        raise bad("logit_bias is not supported", "logit_bias")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise bad(f"suffix must be a string, got {shown(suffix)}", "suffix")
    if suffix:
        raise bad("suffix (insertion) is not supported", "suffix")
    if body.get("best_of") not in (None, 1) or body.get("best_of") is True:
        raise bad("best_of is not supported; use n", "best_of")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad(f"user must be a string, got {shown(body['user'])}", "user")


def check_no_tools(body: dict) -> None:
    """This server never calls tools: any sign that a client expects it to is refused."""
    for name in ("tools", "functions"):
        if body.get(name) not in (None, []):
            raise bad(f"{name} are not supported: this server does not call tools", name)
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none"):
            raise bad(f"{name} is not supported: this server does not call tools", name)
    if body.get("parallel_tool_calls") not in (None, False):
        raise bad("parallel_tool_calls is not supported: this server does not call tools", "parallel_tool_calls")


# -- prompts ------------------------------------------------------------------------------------------------

def message_text(message, index: int) -> tuple[str, str]:
    """(role, text) of one chat message; content may be a string or a list of text parts."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad(f"{where} must be an object with role and content, got {shown(message)}", "messages")
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise bad(f"{where}.role {shown(role)} is not one of: {', '.join(ROLES)}", "messages")
    if message.get("tool_calls"):
        raise bad(f"{where}.tool_calls are not supported: this server does not call tools", "messages")
    content = message.get("content")
    if content is None and role == "assistant":
        return ROLES[role], ""
    if isinstance(content, str):
        return ROLES[role], content
    if isinstance(content, list) and content:
        return ROLES[role], "\n".join(part_text(part, f"{where}.content[{i}]") for i, part in enumerate(content))
    raise bad(f"{where}.content must be a string or a non-empty list of text parts, got {shown(content)}",
              "messages")


def part_text(part, where: str) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind != "text":
        raise bad(f"{where} is a part of type {shown(kind)}, which is not supported: this model reads text parts "
                  "({'type': 'text', 'text': ...}) only", "messages")
    if not isinstance(part.get("text"), str):
        raise bad(f"{where}.text must be a string, got {shown(part.get('text'))}", "messages")
    return part["text"]


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad(f"messages must be a non-empty list of {{role, content}} objects, got {shown(messages)}",
                  "messages")
    return [{"role": role, "content": text} for role, text in (message_text(m, i) for i, m in enumerate(messages))]


def is_token_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(is_integer(t) for t in value)


PROMPT_SHAPES = "a non-empty string, a list of strings, a list of token ids, or a list of such lists"


def completion_prompts(body: dict, encode) -> tuple[list[list[int]], list[str | None]]:
    """Prompts as token ids, and their texts where given as text."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or is_token_list(prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad(f"prompt must be {PROMPT_SHAPES}, got {shown(prompt)}", "prompt")
    ids, texts = [], []
    for item in prompt:
        if isinstance(item, str) and item:
            ids.append(encode(item))
            texts.append(item)
        elif is_token_list(item):
            ids.append(list(item))
            texts.append(None)
        else:
            raise bad(f"prompt must be {PROMPT_SHAPES}; one item is {shown(item)}", "prompt")
    if any(not p for p in ids):
        raise bad("the prompt encodes to no tokens", "prompt")
    return ids, texts


def stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > MAX_STOP
            or not all(isinstance(s, str) and s for s in stop)):
        raise bad(f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings, got "
                  f"{shown(body.get('stop'))}", "stop")
    return tuple(stop)


# -- the request --------------------------------------------------------------------------------------------

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
    echo = False if chat else boolean(body, "echo")
    max_tokens = max_new_tokens(body, chat, echo, longest, budget)
    completion = Completion(chat, prompts, sampling(body, max(max_tokens, 1), eos),
                            n=integer(body, "n", 1, 1, MAX_N), stop=stop_strings(body), echo=echo,
                            prompt_only=max_tokens == 0, prompt_texts=texts)
    completion.stream = boolean(body, "stream")
    completion.include_usage = include_usage(body, completion.stream)
    completion.logprobs = chat_logprobs(body) if chat else completion_logprobs_wanted(body)
    return completion


def max_new_tokens(body: dict, chat: bool, echo: bool, longest: int, budget: Budget) -> int:
    """Tokens to generate; 0 (completions with echo only) scores the prompt alone."""
    room = budget.context - longest  # at least 1: the prompt left a position
    if chat:
        # max_completion_tokens replaced max_tokens; both are checked, the newer wins.
        older = integer(body, "max_tokens", None, 1, budget.max_tokens)
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        wanted = integer(body, "max_completion_tokens", older, 1, budget.max_tokens)
        default = min(budget.max_tokens, room)
    else:
        name, default = "max_tokens", min(DEFAULT_COMPLETION_TOKENS, room)
        wanted = integer(body, "max_tokens", None, 0, budget.max_tokens)
        if wanted == 0 and not echo:
            raise bad("max_tokens 0 generates nothing; it is allowed only with echo: true (to score the prompt)",
                      name)
    max_tokens = default if wanted is None else wanted
    if longest + max_tokens - 1 > budget.context:
        raise bad(f"the prompt has {longest} tokens; with {name} {max_tokens} that exceeds the context of "
                  f"{budget.context} tokens; shorten it or ask for fewer tokens", name)
    return max_tokens


def sampling(body: dict, max_tokens: int, eos: tuple[int, ...]) -> GenerationConfig:
    seed = integer(body, "seed", None, *SEED_RANGE)
    # `ignore_eos` (as vLLM spells it): generate exactly max_tokens, for benchmarks and load tests.
    stop_ids = () if boolean(body, "ignore_eos") else eos
    temperature = number(body, "temperature", 1.0, 0.0, 2.0)
    return GenerationConfig(max_new_tokens=max_tokens, temperature=0.0 if temperature < GREEDY_BELOW else temperature,
                            top_p=number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
                            top_k=integer(body, "top_k", 0, 0, 1 << 20), seed=seed, stop_token_ids=stop_ids)


def include_usage(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream or not isinstance(options, dict) or set(options) - STREAM_OPTIONS:
        raise bad("stream_options takes only {'include_usage': bool}, and only with stream: true", "stream_options")
    boolean(options, "include_obfuscation")  # padding against traffic analysis: these chunks are not padded
    return boolean(options, "include_usage")


def chat_logprobs(body: dict) -> int | None:
    wanted = boolean(body, "logprobs")
    if body.get("top_logprobs") is not None and not wanted:
        raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    return integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS) if wanted else None


def completion_logprobs_wanted(body: dict) -> int | None:
    return integer(body, "logprobs", None, 0, MAX_COMPLETION_LOGPROBS)


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


# -- token texts --------------------------------------------------------------------------------------------

def added_text(before: str, after: str) -> str:
    """What decoding more tokens added to a text. Where the earlier text changed (it ended in half a
    character, now whole), what follows the common part."""
    if after.startswith(before):
        return after[len(before):]
    return after[len(os.path.commonprefix([before, after])):]


def text_after(decode, context: list[int], ids: list[int]) -> str:
    """The text `ids` add after `context`: decoding them alone can lose what depends on the tokens before
    (SentencePiece drops a first token's leading space; some decoders join tokens with spaces)."""
    tail = list(context[-PIECE_CONTEXT:])
    return added_text(decode(tail), decode(tail + list(ids)))


class TokenText:
    """Each token's text where it stands: what it adds to the text of the tokens before it, so the texts of a
    sequence's tokens concatenate to its text, and a token reads the same in `tokens` and in the
    alternatives of `top_logprobs`. Special tokens keep their text (`</s>`)."""

    def __init__(self, decode):
        self.decode = decode  # ids -> text, special tokens included

    def at(self, ids: list[int], position: int, token: Token) -> dict[int, str]:
        """The texts of the token at `position` of `ids` and of its alternatives, by token id."""
        window = list(ids[max(0, position - PIECE_CONTEXT):position])
        before = self.decode(window)
        wanted = dict.fromkeys([token.id] + [i for i, _ in token.top])
        return {i: added_text(before, self.decode(window + [i])) for i in wanted}


# -- responses ----------------------------------------------------------------------------------------------

def finite(logprob: float) -> float:
    return logprob if logprob > LOWEST_LOGPROB else LOWEST_LOGPROB  # also catches NaN


def chat_logprob_entry(token: Token, text_of: dict[int, str]) -> dict:
    """One token of a chat choice's `logprobs.content`: its text, log-probability, UTF-8 bytes, and the
    `top_logprobs` most likely tokens at its place, most likely first."""

    def entry(token_id: int, logprob: float) -> dict:
        text = text_of[token_id]
        return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode("utf-8", errors="replace"))}

    return entry(token.id, token.logprob) | {"top_logprobs": [entry(i, lp) for i, lp in token.top]}


def completion_logprobs(tokens: list[Token], texts: list[dict[int, str]], start_offset: int = 0) -> dict:
    """The legacy completions shape: parallel lists over tokens; a token without a log-probability (the first
    of a prompt) has None. `top_logprobs` holds the asked-for alternatives and the chosen token."""
    pieces = [text_of[t.id] for t, text_of in zip(tokens, texts)]
    offsets, at = [], start_offset
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {"tokens": pieces, "token_logprobs": [None if t.logprob is None else finite(t.logprob) for t in tokens],
            "top_logprobs": [top_of(t, text_of) for t, text_of in zip(tokens, texts)], "text_offset": offsets}


def top_of(token: Token, text_of: dict[int, str]) -> dict[str, float] | None:
    if token.logprob is None:
        return None
    top: dict[str, float] = {}
    # Tokens of the same text (ids a padded vocabulary has beyond the tokenizer's read as "") share a key:
    # the likeliest keeps it, so the most likely text keeps its log-probability.
    for i, logprob in sorted(token.top + ((token.id, token.logprob),), key=lambda pair: -pair[1]):
        top.setdefault(text_of[i], finite(logprob))
    return top


def joined_logprobs(first: dict, second: dict) -> dict:
    return {key: first[key] + second[key] for key in first}


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}
