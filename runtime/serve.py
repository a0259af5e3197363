"""`python -m runtime.serve ARTIFACT --port 8000`: an OpenAI-compatible server over one engine.

/v1/completions and /v1/chat/completions (streaming by server-sent events, or whole), /v1/models, /health and
/metrics (Prometheus, with the OpenTelemetry gen_ai metric names where they exist). Loopback by default.
Starlette + uvicorn: a small, well-kept ASGI stack; the engine work runs on the service's worker thread, so
the event loop only moves bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass

from runtime import artifact as artifacts
from runtime.errors import LmforgeError
from runtime.generate import GenerationConfig
from runtime.service import Job, QueueFullError, Service
from runtime.session import SessionOptions
from runtime.session import open as open_session
from runtime.text import load_codec

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24)


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 512           # per request
    max_prompt_tokens: int = 4096   # also bounded by the model's context
    max_body_bytes: int = 1 << 20


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


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_response(error: ApiError):
    from starlette.responses import JSONResponse

    body = {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.status}}
    return JSONResponse(body, status_code=error.status)


class Server:
    def __init__(self, artifact: artifacts.Artifact, name: str, service: Service, limits: Limits):
        self.artifact, self.name, self.service, self.limits = artifact, name, service, limits
        self.codec = load_codec(artifact)
        self.facts = artifact.model_facts

    # -- request parsing ----------------------------------------------------------------------------------

    async def body(self, request) -> dict:
        size = int(request.headers.get("content-length") or 0)
        if size > self.limits.max_body_bytes:
            raise ApiError(413, f"request body of {size} bytes exceeds {self.limits.max_body_bytes}")
        raw = await request.body()
        if len(raw) > self.limits.max_body_bytes:
            raise ApiError(413, f"request body exceeds {self.limits.max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, f"malformed JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        model = body.get("model")
        if model not in (self.name, self.artifact.id):
            raise ApiError(404, f"model {model!r} is not served here; this server serves {self.name!r}",
                           "not_found_error", "model")
        return body

    def config(self, body: dict, prompt: list[int]) -> GenerationConfig:
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 16))
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= self.limits.max_tokens:
            raise ApiError(400, f"max_tokens must be an integer in [1, {self.limits.max_tokens}], got {max_tokens!r}",
                           param="max_tokens")
        context = min(self.facts.get("max_context") or 1 << 30, self.limits.max_prompt_tokens + max_tokens)
        if len(prompt) > self.limits.max_prompt_tokens or len(prompt) + max_tokens - 1 > context:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; with max_tokens {max_tokens} that exceeds the "
                           f"context of {context} tokens; shorten it", param="messages")
        temperature = body.get("temperature", 1.0 if body.get("top_p") not in (None, 1, 1.0) else 0.0)
        top_p = body.get("top_p", 1.0)
        if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise ApiError(400, f"temperature must be in [0, 2], got {temperature!r}", param="temperature")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ApiError(400, f"top_p must be in (0, 1], got {top_p!r}", param="top_p")
        # `ignore_eos` (as vLLM spells it): generate exactly max_tokens, for benchmarks and load tests.
        stop = () if body.get("ignore_eos") else tuple(self.facts["eos_token_ids"])
        return GenerationConfig(max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                                seed=body.get("seed"), stop_token_ids=stop)

    def prompt_of(self, body: dict, chat: bool) -> list[int]:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
                raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
            if not self.facts.get("chat_template"):
                raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
            text = self.codec.render_chat(messages, add_generation_prompt=True)
        else:
            text = body.get("prompt")
            if isinstance(text, list) and len(text) == 1:
                text = text[0]
            if not isinstance(text, str) or not text:
                raise ApiError(400, "prompt must be a non-empty string", param="prompt")
        ids = self.codec.encode(text)
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", param="prompt")
        return ids

    # -- endpoints ------------------------------------------------------------------------------------------

    async def completions(self, request, chat: bool):
        from starlette.responses import JSONResponse, StreamingResponse

        try:
            body = await self.body(request)
            prompt = self.prompt_of(body, chat)
            config = self.config(body, prompt)
            job = self.service.submit(Job(prompt, config, asyncio.get_running_loop()))
        except ApiError as exc:
            return error_response(exc)
        except QueueFullError as exc:
            return error_response(ApiError(429, str(exc), "rate_limit_error"))
        if body.get("stream"):
            return StreamingResponse(self._stream(job, chat), media_type="text/event-stream")
        try:
            tokens, reason = await self._collect(job)
        except LmforgeError as exc:
            return error_response(ApiError(500, str(exc), "server_error"))
        finally:
            job.cancel()  # no-op when finished; frees the slot when the client went away
        return JSONResponse(self._whole(job, self.codec.decode(tokens), reason, chat))

    async def _collect(self, job: Job) -> tuple[list[int], str]:
        tokens = []
        while True:
            kind, value = await job.events.get()
            if kind == "token":
                tokens.append(value)
            elif kind == "error":
                raise LmforgeError(value)
            else:
                return tokens, value

    def _whole(self, job: Job, text: str, reason: str, chat: bool) -> dict:
        usage = {"prompt_tokens": len(job.prompt), "completion_tokens": len(job.tokens),
                 "total_tokens": len(job.prompt) + len(job.tokens)}
        base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{job.id}", "created": int(time.time()), "model": self.name,
                "usage": usage}
        if chat:
            return base | {"object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}]}
        return base | {"object": "text_completion", "choices": [
            {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}]}

    async def _stream(self, job: Job, chat: bool):
        created, ident = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{job.id}"
        tokens, sent = [], ""

        def chunk(text: str | None, reason: str | None) -> str:
            if chat:
                delta = {"role": "assistant", "content": text} if text is not None else {}
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
                payload = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": self.name,
                           "choices": [choice]}
            else:
                payload = {"id": ident, "object": "text_completion", "created": created, "model": self.name,
                           "choices": [{"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}]}
            return f"data: {json.dumps(payload)}\n\n"

        try:
            while True:
                kind, value = await job.events.get()
                if kind == "token":
                    tokens.append(value)
                    text = self.codec.decode(tokens)
                    if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                        continue
                    if len(text) > len(sent):
                        yield chunk(text[len(sent):], None)
                        sent = text
                elif kind == "error":
                    yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
                    return
                else:
                    yield chunk(None, value)
                    yield "data: [DONE]\n\n"
                    return
        finally:
            job.cancel()  # a client that disconnects mid-stream cancels its request and frees its state

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "lmforge",
                                            "root": self.artifact.id}]}


def create_app(artifact: artifacts.Artifact, name: str | None = None, options: SessionOptions | None = None,
               limits: Limits = Limits(), queue_size: int = 64, max_batch: int = 8, batching: bool = True):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    metrics = Metrics()
    service = Service(open_session(artifact, options or SessionOptions()), metrics, queue_size, max_batch, batching)
    server = Server(artifact, name or artifact.id, service, limits)

    async def completions(request):
        return await server.completions(request, chat=False)

    async def chat(request):
        return await server.completions(request, chat=True)

    async def health(request):
        return JSONResponse({"status": "ok", "model": server.name, "engine": artifact.id})

    async def models(request):
        return JSONResponse(server.models())

    async def metrics_endpoint(request):
        body, media = metrics.exposition()
        return Response(body, media_type=media)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/chat/completions", chat, methods=["POST"]),
                            Route("/v1/models", models), Route("/health", health),
                            Route("/metrics", metrics_endpoint)],
                    lifespan=lifespan)
    app.state.service, app.state.metrics = service, metrics
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--host", default="127.0.0.1", help="loopback by default; 0.0.0.0 to listen everywhere")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--name", default=None, help="the model name clients send (default: the engine id)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--queue-size", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--no-batching", action="store_true", help="one request at a time")
    parser.add_argument("--max-tokens", type=int, default=Limits.max_tokens)
    parser.add_argument("--max-prompt-tokens", type=int, default=Limits.max_prompt_tokens)
    args = parser.parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        print("error: the server needs uvicorn and starlette: pip install 'lmforge[serve]'", file=sys.stderr)
        return 4
    try:
        art = artifacts.load(args.artifact)
        options = SessionOptions(threads=args.threads) if args.threads else SessionOptions()
        app = create_app(art, args.name, options, Limits(args.max_tokens, args.max_prompt_tokens),
                         args.queue_size, args.max_batch, not args.no_batching)
    except LmforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
