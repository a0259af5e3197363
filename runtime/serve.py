"""`python -m runtime.serve ARTIFACT --port 8000`: an OpenAI-compatible server over one engine.

/v1/completions and /v1/chat/completions (streaming by server-sent events, or whole), /v1/models, /health and
/metrics (Prometheus, with the OpenTelemetry gen_ai metric names where they exist). Loopback by default; with
$LMFORGE_API_KEY (or --api-key) every request but /health needs `Authorization: Bearer <key>` (docs/serving.md).
A thin HTTP layer: requests are parsed by runtime/openai_api.py and run by the Service (runtime/service.py:
continuous batching, prefix cache), whose worker thread does the engine work, so the event loop only moves
bytes. Starlette + uvicorn: a small, well-kept ASGI stack.

`--replicas N` (or `--ray-address auto`) serves the same API from many replicas on Ray Serve instead:
runtime/ray_serve.py, docs/scale-out.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import os
import sys
import time
from dataclasses import dataclass, field

from jinja2 import TemplateError

import runtime
from runtime import artifact as artifacts
from runtime.errors import BadInputError, LmforgeError
from runtime.openai_api import (
    ApiError,
    Budget,
    Completion,
    StopText,
    TokenText,
    chat_logprob_entry,
    completion_logprobs,
    joined_logprobs,
    parse,
    shown,
    text_after,
    usage,
)
from runtime.service import DEFAULT_MAX_CONTEXT, Job, QueueFullError, Service, ServiceClosedError, ServiceConfig
from runtime.session import SessionOptions
from runtime.speculative import METHODS
from runtime.text import load_codec

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24)


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 512           # per request
    max_prompt_tokens: int = 4096   # also bounded by the model's context
    max_body_bytes: int = 1 << 20

    def validate(self) -> None:
        for name in ("max_tokens", "max_prompt_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:  # a server that refuses every request is a mistake, not a setting
                raise BadInputError(f"--{name.replace('_', '-')} {getattr(self, name)} would refuse every request; "
                                    "give at least 1")


def check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise BadInputError(f"--port {port} is not a TCP port; give one from 0 to 65535")


class Metrics:
    """Service metrics in Prometheus form (prometheus-client, optional)."""

    def __init__(self):
        try:
            import prometheus_client as prom
        except ImportError:
            self.registry = None
            return
        self.prom = prom
        self.registry = prom.CollectorRegistry()

        def histogram(name, doc):
            return prom.Histogram(name, doc, registry=self.registry, buckets=LATENCY_BUCKETS)

        # OpenTelemetry gen_ai semantic-convention names, in Prometheus spelling (dots become underscores).
        self.ttft = histogram("gen_ai_server_time_to_first_token_seconds", "Time to first token")
        self.tpot = histogram("gen_ai_server_time_per_output_token_seconds", "Time per output token after the first")
        self.duration = histogram("gen_ai_server_request_duration_seconds", "Request duration")
        self.queue_wait = histogram("lmforge_queue_wait_seconds", "Time a request waited before its batch started")
        self.tokens = prom.Counter("gen_ai_client_token_usage", "Tokens processed", ["gen_ai_token_type"],
                                   registry=self.registry)
        self.requests = prom.Counter("lmforge_requests", "Requests by outcome", ["outcome"], registry=self.registry)
        self.prefix_query = prom.Counter("lmforge_prefix_cache_query_tokens", "Prompt tokens looked up in the "
                                         "prefix cache", registry=self.registry)
        self.prefix_hit = prom.Counter("lmforge_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache",
                                       registry=self.registry)
        # Acceptance rate: accepted / draft tokens.
        self.drafted = prom.Counter("lmforge_speculative_draft_tokens", "Draft tokens checked by speculative "
                                    "decoding", registry=self.registry)
        self.accepted = prom.Counter("lmforge_speculative_accepted_tokens", "Draft tokens the engine accepted",
                                     registry=self.registry)

    def watch(self, service: Service) -> None:
        """Gauges read from the service at each scrape."""
        if self.registry is None:
            return
        for key, doc in (("slots_active", "Sequences holding a KV slot"), ("queued", "Requests waiting for a slot")):
            gauge = self.prom.Gauge(f"lmforge_{key}", doc, registry=self.registry)
            gauge.set_function(lambda key=key: service.stats().get(key, 0))

    def prefix_lookup(self, prompt_tokens: int, hit_tokens: int) -> None:
        if self.registry is not None:
            self.prefix_query.inc(prompt_tokens)
            self.prefix_hit.inc(hit_tokens)

    def speculated(self, drafted: int, accepted: int) -> None:
        if self.registry is not None:
            self.drafted.inc(drafted)
            self.accepted.inc(accepted)

    def observe(self, job: Job) -> None:
        if self.registry is None:
            return
        end = time.perf_counter()
        if job.started is not None:
            self.queue_wait.observe(job.started - job.submitted)
        if job.first_token is not None:
            self.ttft.observe(job.first_token - job.submitted)
            if len(job.tokens) > 1:
                self.tpot.observe((end - job.first_token) / (len(job.tokens) - 1))
        self.duration.observe(end - job.submitted)
        self.tokens.labels("input").inc(len(job.prompt))
        self.tokens.labels("output").inc(len(job.tokens))
        self.requests.labels("completed").inc()

    def rejected(self) -> None:
        if self.registry is not None:
            self.requests.labels("rejected").inc()

    def cancelled(self) -> None:
        if self.registry is not None:
            self.requests.labels("cancelled").inc()

    def exposition(self) -> tuple[bytes, str]:
        if self.registry is None:
            return b"prometheus-client is not installed: pip install prometheus-client\n", "text/plain"
        return self.prom.generate_latest(self.registry), self.prom.CONTENT_TYPE_LATEST


def error_response(error: ApiError):
    from starlette.responses import JSONResponse

    return JSONResponse(error.body(), status_code=error.status)


# -- who may call: the API key -----------------------------------------------------------------------------------

API_KEY_ENV = "LMFORGE_API_KEY"  # the key's way in that stays out of `ps` and /proc/*/cmdline


class ApiKey:
    """The server's secret. Its repr hides it, so that a log line, a traceback's locals or Ray's record of a
    deployment's arguments never print it."""

    def __init__(self, secret: str):
        # Hashed once: comparing fixed-length digests hides the key's length as well as its bytes.
        self._digest = hashlib.sha256(secret.encode()).digest()

    def matches(self, presented: bytes) -> bool:
        return hmac.compare_digest(hashlib.sha256(presented).digest(), self._digest)

    def __repr__(self) -> str:
        return "ApiKey(<hidden>)"


def api_key_from(flag: str | None, environ=os.environ) -> ApiKey | None:
    """The key from --api-key, else from $LMFORGE_API_KEY, else None (no authentication). An empty or unsendable
    key is refused: `LMFORGE_API_KEY=$UNSET_VARIABLE` must not quietly open the server to everyone."""
    source, value = ("--api-key", flag) if flag is not None else (API_KEY_ENV, environ.get(API_KEY_ENV))
    if value is None:
        return None
    if not value:
        raise BadInputError(f"{source} is set but empty; give it the key clients will send, or unset it to serve "
                            "without authentication")
    if not all(33 <= ord(c) <= 126 for c in value):  # what an HTTP header carries unchanged (RFC 6750's token68)
        raise BadInputError(f"{source} holds spaces or characters outside printable ASCII, which clients cannot "
                            "send in an Authorization header; use letters, digits and punctuation only")
    return ApiKey(value)


@dataclass(frozen=True)
class Access:
    """Who may call the server. `key` None: anyone who reaches the port. /health is always open (load balancers
    and Kubernetes probe it without credentials; it reveals readiness, no data). /metrics needs the key unless
    `public_metrics`: its counters reveal the traffic (requests, tokens, latencies), and Prometheus sends a bearer
    token with one line of scrape config; the flag is for scrapers that cannot."""

    key: ApiKey | None = None
    public_metrics: bool = False

    def open_paths(self) -> frozenset[str]:
        return frozenset({"/health", "/metrics"} if self.public_metrics else {"/health"})


def presented_key(scope) -> bytes | None:
    """The token of the request's first `Authorization: Bearer <token>` header, or None."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            parts = value.split(None, 1)  # RFC 9110 says one or more spaces; tabs are forgiven too
            return parts[1].strip() if len(parts) == 2 and parts[0].lower() == b"bearer" else None
    return None


class RequireKey:
    """ASGI middleware that answers 401 (OpenAI's error shape) before the app sees a request without the key.
    Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer server-sent event streams."""

    def __init__(self, app, access: Access):
        self.app, self.access, self.open_paths = app, access, access.open_paths()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        presented = presented_key(scope)
        if presented is not None and self.access.key.matches(presented):
            return await self.app(scope, receive, send)
        response = error_response(unauthorized(presented))
        response.headers["www-authenticate"] = 'Bearer realm="lmforge"'
        await response(scope, receive, send)


def unauthorized(presented: bytes | None) -> ApiError:
    if presented is None:
        return ApiError(401, "missing API key: this server needs the header `Authorization: Bearer <key>` (the "
                             f"key it was started with, --api-key or ${API_KEY_ENV})", code="invalid_api_key")
    return ApiError(401, "incorrect API key: send the key this server was started with (--api-key or "
                         f"${API_KEY_ENV}) as `Authorization: Bearer <key>`", code="invalid_api_key")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only localhost is known to stay on this machine
        return host == "localhost"


def exposure_warning(host: str, port: int, access: Access) -> str | None:
    """What to print when the server listens beyond this machine and anyone may call it."""
    if access.key is not None or is_loopback(host):
        return None
    return (f"warning: listening on {host}:{port} without an API key: anyone who can reach this port can run the "
            f"model on this machine's compute and read its metrics; set {API_KEY_ENV} (or --api-key) so that "
            "requests need `Authorization: Bearer <key>`")


@dataclass(eq=False)
class _Choice:
    """One sampled answer: its job's tokens as text, cut at a stop string, and what was streamed of it."""

    index: int
    job: Job
    prompt: list[int]
    stop: StopText
    tokens: list = field(default_factory=list)
    sent: str = ""
    reason: str | None = None
    prompt_scores: list | None = None
    offset: int = 0  # characters of logprob tokens streamed so far: the next token's text_offset

    @property
    def ids(self) -> list[int]:
        return [t.id for t in self.tokens]


async def read_body(request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes `limit` bytes, whether or not it declared its length."""
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise ApiError(400, f"content-length {shown(declared)} is not a number")
    if declared is not None and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def json_object(raw: bytes) -> dict:
    """The body as a JSON object of valid Unicode, or a 400 that says what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the body is not valid UTF-8: {exc}") from None
    try:
        body = json.loads(text)
        # A lone surrogate (\ud800) parses but cannot be encoded, tokenized, or echoed: refuse it here, once.
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise ApiError(400, "the JSON body is nested too deeply") from None
    except UnicodeEncodeError:
        raise ApiError(400, "the body holds a lone UTF-16 surrogate escape (such as \\ud800), which is not "
                            "valid Unicode") from None
    except ValueError as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got a JSON {type(body).__name__}")
    return body


class Server:
    def __init__(self, artifact: artifacts.Artifact, name: str, service: Service, limits: Limits):
        self.artifact, self.name, self.service, self.limits = artifact, name, service, limits
        self.codec = load_codec(artifact)
        self.facts = artifact.model_facts
        self.budget = Budget(limits.max_tokens, limits.max_prompt_tokens, service.max_context)
        self.token_text = TokenText(self._decode_all)

    # -- request parsing ----------------------------------------------------------------------------------

    async def body(self, request) -> dict:
        body = json_object(await read_body(request, self.limits.max_body_bytes))
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, f"model must be a string naming the model; this server serves {self.name!r}",
                           param="model")
        if model not in (self.name, self.artifact.id):
            raise ApiError(404, f"model {shown(model)} is not served here; this server serves {self.name!r}",
                           "not_found_error", "model")
        return body

    def parse(self, body: dict, chat: bool) -> Completion:
        if chat and not self.codec.chat_template:
            raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
        try:
            return parse(body, chat, self.codec.encode, self.codec.render_chat, self.budget,
                         tuple(self.facts["eos_token_ids"]))
        except LmforgeError as exc:  # the chat template refused the conversation
            raise ApiError(400, str(exc), param="messages") from None
        except TemplateError as exc:  # the chat template failed on it (a role or field it does not handle)
            raise ApiError(400, f"the chat template cannot render these messages: {exc}", param="messages") from None

    def submit(self, completion: Completion) -> list[_Choice]:
        """One job per prompt and sample; all or none are queued."""
        jobs, room = len(completion.prompts) * completion.n, self.service.config.queue_size
        if jobs > room:  # it could never be queued whole: a 429 would have the client retry forever
            raise ApiError(400, f"this request asks for {jobs} sequences (prompts x n); the server queues at most "
                                f"{room}: send fewer prompts or a smaller n", param="n")
        choices = []
        try:
            for prompt in completion.prompts:
                for sample in range(completion.n):
                    job = self.service.submit(prompt, completion.config_for(sample), completion.logprobs,
                                              prompt_logprobs=completion.echo and completion.logprobs is not None)
                    choices.append(_Choice(len(choices), job, prompt, StopText(completion.stop)))
        except BaseException:
            for choice in choices:
                choice.job.cancel()
            raise
        return choices

    # -- endpoints ------------------------------------------------------------------------------------------

    async def completions(self, request, chat: bool):
        from starlette.responses import JSONResponse, StreamingResponse

        try:
            completion = self.parse(await self.body(request), chat)
            choices = self.submit(completion)
        except ApiError as exc:
            return error_response(exc)
        except QueueFullError as exc:
            return error_response(ApiError(429, str(exc), "rate_limit_error"))
        except ServiceClosedError as exc:
            return error_response(ApiError(503, str(exc), "server_error"))
        except LmforgeError as exc:  # the service found the request cannot run (context, vocabulary)
            return error_response(ApiError(400, str(exc)))
        if completion.stream:
            return StreamingResponse(self._stream(completion, choices), media_type="text/event-stream")
        try:
            async for _ in self._events(completion, choices):
                pass
        except LmforgeError as exc:
            return error_response(ApiError(500, str(exc), "server_error"))
        finally:
            for choice in choices:
                choice.job.cancel()  # no-op when finished; frees the slot when the client went away
        return JSONResponse(self._whole(completion, choices))

    async def _events(self, completion: Completion, choices: list[_Choice]):
        """(choice, kind, new text, token or None) as the jobs produce them, until every choice has a reason.
        kind: 'prompt' (its prompt's log-probabilities came), 'token', or 'end' (the choice is finished)."""
        merged: asyncio.Queue = asyncio.Queue()

        async def follow(choice: _Choice):
            async for event in choice.job:
                await merged.put((choice, event))

        tasks = [asyncio.ensure_future(follow(choice)) for choice in choices]
        try:
            while any(choice.reason is None for choice in choices):
                choice, event = await merged.get()
                if choice.reason is not None:
                    continue
                if event.kind == "error":
                    raise LmforgeError(event.value)
                if event.kind == "prompt":
                    choice.prompt_scores = event.value
                    yield choice, "prompt", "", None
                elif event.kind == "token" and completion.prompt_only:
                    # max_tokens 0: the service generates at least one token; the client asked for none.
                    choice.reason = "length"
                    choice.job.cancel()
                    yield choice, "end", "", None
                elif event.kind == "token":
                    choice.tokens.append(event.value)
                    yield choice, "token", self._advance(choice, True), event.value
                else:
                    choice.reason = event.value
                    yield choice, "end", self._advance(choice, False), None
        finally:
            for task in tasks:
                task.cancel()

    def _advance(self, choice: _Choice, held: bool) -> str:
        """The choice's text not yet sent; a stop string ends the choice. `held`: keep back a tail that may
        still become a stop string or a whole character."""
        text = text_after(self.codec.decode, choice.prompt, choice.ids)
        cut = choice.stop.cut(text)
        if choice.stop.hit:
            choice.reason = "stop"
            choice.job.cancel()
        elif held:
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                return ""
            cut = choice.stop.safe(text)
        if not cut.startswith(choice.sent):  # what was sent stays sent (a tokenizer never rewrites it)
            return ""
        new, choice.sent = cut[len(choice.sent):], cut
        return new

    def _decode_all(self, ids: list[int]) -> str:
        return self.codec.tokenizer.decode(ids, skip_special_tokens=False)

    def _prompt_text(self, completion: Completion, choice: _Choice) -> str:
        given = completion.prompt_texts[choice.index // completion.n]
        return given if given is not None else self._decode_all(choice.prompt)  # a prompt of ids: all of them

    def _usage(self, completion: Completion, choices: list[_Choice]) -> dict:
        prompt_tokens = sum(len(p) for p in completion.prompts)
        cached = sum(c.job.cached_tokens for c in choices[:: completion.n])  # each prompt once, as prompt_tokens
        return usage(prompt_tokens, sum(len(c.tokens) for c in choices), cached)

    def _whole(self, completion: Completion, choices: list[_Choice]) -> dict:
        base = {"id": f"{'chatcmpl' if completion.chat else 'cmpl'}-{choices[0].job.id}", "created": int(time.time()),
                "model": self.name, "usage": self._usage(completion, choices)}
        if completion.chat:
            return base | {"object": "chat.completion", "choices": [self._chat_choice(completion, c) for c in choices]}
        return base | {"object": "text_completion", "choices": [self._text_choice(completion, c) for c in choices]}

    def _generated_texts(self, choice: _Choice, first: int = 0) -> list[dict[int, str]]:
        """Texts of the choice's generated tokens from `first` on (and their alternatives), each in place."""
        sequence = choice.prompt + choice.ids
        return [self.token_text.at(sequence, len(choice.prompt) + k, token)
                for k, token in enumerate(choice.tokens[first:], first)]

    def _prompt_logprobs(self, choice: _Choice) -> dict:
        scores = choice.prompt_scores or []
        return completion_logprobs(scores, [self.token_text.at(choice.prompt, k, s) for k, s in enumerate(scores)])

    def _chat_choice(self, completion: Completion, choice: _Choice) -> dict:
        logprobs = None
        if completion.logprobs is not None:
            texts = self._generated_texts(choice)
            logprobs = {"content": [chat_logprob_entry(t, text) for t, text in zip(choice.tokens, texts)]}
        return {"index": choice.index, "message": {"role": "assistant", "content": choice.sent},
                "logprobs": logprobs, "finish_reason": choice.reason}

    def _text_choice(self, completion: Completion, choice: _Choice) -> dict:
        prompt_text = self._prompt_text(completion, choice) if completion.echo else ""
        logprobs = None
        if completion.logprobs is not None:
            # Generated tokens' offsets count from the returned text's prompt, as the client sees it.
            logprobs = completion_logprobs(choice.tokens, self._generated_texts(choice), len(prompt_text))
            if completion.echo:
                logprobs = joined_logprobs(self._prompt_logprobs(choice), logprobs)
        return {"index": choice.index, "text": prompt_text + choice.sent, "finish_reason": choice.reason,
                "logprobs": logprobs}

    async def _stream(self, completion: Completion, choices: list[_Choice]):
        created, ident = int(time.time()), f"{'chatcmpl' if completion.chat else 'cmpl'}-{choices[0].job.id}"
        kind = "chat.completion.chunk" if completion.chat else "text_completion"

        def chunk(choice_payloads: list[dict], usage_payload=None) -> str:
            payload = {"id": ident, "object": kind, "created": created, "model": self.name, "choices": choice_payloads}
            if completion.include_usage:
                payload["usage"] = usage_payload
            return f"data: {json.dumps(payload)}\n\n"

        try:
            for choice in choices:  # each choice opens with its role (chat) or the echoed prompt (completions)
                opening = self._opening(completion, choice)
                if opening is not None:
                    yield chunk([opening])
            async for choice, event, text, token in self._events(completion, choices):
                payload = self._stream_choice(completion, choice, event, text, token)
                if payload is not None:
                    yield chunk([payload])
            if completion.include_usage:
                yield chunk([], self._usage(completion, choices))
            yield "data: [DONE]\n\n"
        except LmforgeError as exc:
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n"
        finally:
            for choice in choices:
                choice.job.cancel()  # a client that disconnects mid-stream cancels its requests and frees their slots

    def _opening(self, completion: Completion, choice: _Choice) -> dict | None:
        if completion.chat:
            return {"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}
        if completion.echo and completion.logprobs is None:  # with logprobs, the echo waits for the prompt's
            return {"index": choice.index, "text": self._prompt_text(completion, choice), "logprobs": None,
                    "finish_reason": None}
        return None

    def _stream_choice(self, completion: Completion, choice: _Choice, event: str, text: str, token) -> dict | None:
        if event == "prompt":
            prompt_text = self._prompt_text(completion, choice)
            choice.offset = len(prompt_text)
            return {"index": choice.index, "text": prompt_text, "logprobs": self._prompt_logprobs(choice),
                    "finish_reason": None}
        finished = choice.reason if event == "end" or choice.reason == "stop" else None
        if not text and token is None and finished is None:
            return None
        if completion.chat:
            logprobs = None
            if completion.logprobs is not None and token is not None:
                entry = chat_logprob_entry(token, self._generated_texts(choice, len(choice.tokens) - 1)[0])
                logprobs = {"content": [entry]}
            delta = {"content": text} if text or finished is None else {}
            return {"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": finished}
        logprobs = None
        if completion.logprobs is not None:
            texts = self._generated_texts(choice, len(choice.tokens) - 1) if token is not None else []
            logprobs = completion_logprobs([token] if token is not None else [], texts, choice.offset)
            choice.offset += sum(len(piece) for piece in logprobs["tokens"])
        return {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": finished}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "lmforge",
                                            "root": self.artifact.id}]}


def create_app(artifact: artifacts.Artifact, name: str | None = None, options: SessionOptions | None = None,
               limits: Limits = Limits(), service_config: ServiceConfig = ServiceConfig(), service=None,
               health=None, metrics=None, access: Access = Access()):
    """The app over an engine this process opens, or over `service`, one that is ready (runtime/ray_serve.py's,
    whose jobs run on many replicas). `health` (async, returns a status code and a body) and `metrics` (async,
    returns the exposition and its media type) then say how that service reports. `access`: the API key."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    local_metrics = None
    if service is None:
        service_config.validate()  # before the engine loads
        local_metrics = Metrics()
        service = Service(runtime.open(artifact, options or SessionOptions()), service_config, local_metrics)
        local_metrics.watch(service)
    server = Server(artifact, name or artifact.id, service, limits)

    async def local_health() -> tuple[int, dict]:
        return 200, {"status": "ok", "model": server.name, "engine": artifact.id} | service.stats()

    async def local_exposition() -> tuple[bytes, str]:
        return local_metrics.exposition()

    report_health, report_metrics = health or local_health, metrics or local_exposition

    async def completions(request):
        return await server.completions(request, chat=False)

    async def chat(request):
        return await server.completions(request, chat=True)

    async def health_endpoint(request):
        status, body = await report_health()
        return JSONResponse(body, status_code=status)

    async def models(request):
        return JSONResponse(server.models())

    async def metrics_endpoint(request):
        body, media = await report_metrics()
        return Response(body, media_type=media)

    async def routing_error(request, exc):
        # Starlette's 404 and 405 in OpenAI's error shape, so that every refusal parses the same way.
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/chat/completions", chat, methods=["POST"]),
                            Route("/v1/models", models), Route("/health", health_endpoint),
                            Route("/metrics", metrics_endpoint)],
                    lifespan=lifespan, exception_handlers={HTTPException: routing_error},
                    middleware=[Middleware(RequireKey, access=access)] if access.key is not None else [])
    app.state.service, app.state.metrics = service, local_metrics
    return app


def startup_line(service: Service) -> str:
    stats = service.stats()
    memory = (f"KV cache {stats['kv_cache_bytes'] / 2**20:.0f} MiB ({service.config.max_batch} slots x "
              f"{service.max_context} positions), prefix cache {stats['prefix_cache_bytes'] / 2**20:.0f} MiB"
              if service.scheduler == "continuous" else "KV cache per batch while it runs")
    return f"lmforge: {service.scheduler} batching ({service.why}); {memory}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--host", default="127.0.0.1", help="loopback by default; 0.0.0.0 to listen everywhere")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help=f"requests must send `Authorization: Bearer <key>` (/health stays open); prefer "
                             f"${API_KEY_ENV}, which process listings do not show")
    parser.add_argument("--public-metrics", action="store_true",
                        help="serve /metrics without the API key (for a scraper that cannot send one)")
    parser.add_argument("--name", default=None, help="the model name clients send (default: the engine id)")
    parser.add_argument("--threads", type=int, default=None)
    defaults = ServiceConfig()
    parser.add_argument("--queue-size", type=int, default=defaults.queue_size)
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch,
                        help="KV slots: sequences decoded together")
    parser.add_argument("--max-context", type=int, default=None,
                        help=f"positions per slot (default: the model's context, at most {DEFAULT_MAX_CONTEXT})")
    parser.add_argument("--prefill-chunk", type=int, default=defaults.prefill_chunk,
                        help="prompt tokens prefilled per step: the most a running stream stalls for a newcomer")
    parser.add_argument("--prefix-cache-mb", type=float, default=defaults.prefix_cache_mb,
                        help="memory for cached prompt prefixes (0: off)")
    parser.add_argument("--speculative", choices=METHODS, default=None,
                        help="speculative decoding for a request while it runs alone (continuous batching): "
                             "ngram (prompt lookup) or draft (with --draft)")
    parser.add_argument("--draft", default=None, help="the draft engine for --speculative draft (same tokenizer)")
    parser.add_argument("--no-continuous-batching", action="store_true",
                        help="static batching: a batch runs to its end before the next starts (for comparison)")
    parser.add_argument("--max-tokens", type=int, default=Limits.max_tokens)
    parser.add_argument("--max-prompt-tokens", type=int, default=Limits.max_prompt_tokens)
    scale = parser.add_argument_group("scale out on Ray Serve (pip install 'lmforge[ray]'; docs/scale-out.md)")
    scale.add_argument("--replicas", type=int, default=None,
                       help="engine replicas behind one endpoint (each with --threads); turns Ray Serve on")
    scale.add_argument("--ray-address", default=None,
                       help="join this Ray cluster ('auto': the one `ray start` made here) instead of starting one")
    scale.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound (default: --replicas)")
    scale.add_argument("--max-replicas", type=int, default=None,
                       help="autoscaling upper bound (default: --replicas; above --min-replicas turns autoscaling on)")
    scale.add_argument("--target-ongoing", type=float, default=None,
                       help="ongoing requests per replica the autoscaler steers to (default: --max-batch / 2)")
    scale.add_argument("--ingress-replicas", type=int, default=1,
                       help="HTTP ingress replicas (more than 1: behind Ray Serve's proxy on every node)")
    scale.add_argument("--ray-proxy", action="store_true",
                       help="serve HTTP through Ray Serve's proxy on every node's --port, instead of the ingress's "
                            "own listener on this node (that one spares each request a process hop)")
    scale.add_argument("--affinity-slack", type=int, default=None,
                       help="extra ongoing requests a replica holding the prompt's prefix may have over the least "
                            "loaded one and still get it (default: --max-batch / 4)")
    scale.add_argument("--drain-timeout", type=float, default=30,
                       help="seconds running requests get to finish when the application stops")
    scale.add_argument("--artifact-cache", default="/tmp/lmforge-artifacts",
                       help="where a node without the artifact's path keeps the copy it fetches from the driver")
    return parser


def uses_ray(args: argparse.Namespace) -> bool:
    return any(value is not None for value in (args.replicas, args.ray_address, args.min_replicas, args.max_replicas))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # everything the flags alone can get wrong, before a cluster starts or an engine loads
        check_port(args.port)
        Limits(args.max_tokens, args.max_prompt_tokens).validate()
        access = Access(api_key_from(args.api_key), args.public_metrics)
    except LmforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    warning = exposure_warning(args.host, args.port, access)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if uses_ray(args):
        try:
            from runtime import ray_serve
        except ImportError as exc:
            print(f"error: scaling out needs Ray Serve ({exc}): pip install 'lmforge[ray]'", file=sys.stderr)
            return 4
        return ray_serve.main(args, access)
    try:
        import uvicorn
    except ImportError:
        print("error: the server needs uvicorn and starlette: pip install 'lmforge[serve]'", file=sys.stderr)
        return 4
    try:
        art = artifacts.load(args.artifact)
        options = SessionOptions(threads=args.threads) if args.threads else SessionOptions()
        config = ServiceConfig(max_batch=args.max_batch, max_context=args.max_context,
                               prefill_chunk=args.prefill_chunk, prefix_cache_mb=args.prefix_cache_mb,
                               queue_size=args.queue_size, continuous=not args.no_continuous_batching,
                               speculative=args.speculative, draft=args.draft)
        app = create_app(art, args.name, options, Limits(args.max_tokens, args.max_prompt_tokens), config,
                         access=access)
    except LmforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(startup_line(app.state.service), file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
