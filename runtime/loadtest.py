"""`python -m runtime.loadtest ARTIFACT`: the serving figures, several server modes in one run, one client.

Each mode's server is a `python -m runtime.serve` subprocess on loopback, started only once the previous one
is gone (on a small machine two servers would measure each other). This process streams `/v1/completions` at
each concurrency and records throughput, client-side TTFT and inter-token latency (p50, p99), errors, the
server's RSS and the cached prompt tokens it reports; then a shared-system-prompt case, an optional soak on
the first mode, and the ratios between modes of this very run. A ratio to one stream takes the one-stream
requests sent just before its level (`--baseline-requests`), not the one-stream level minutes earlier: this
2-core VM's speed drifts by 1.5x within minutes, which would otherwise move the ratio as much as the server does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime import artifact as artifacts
from runtime.ranges import Range
from runtime.report import percentile

MODE_FLAGS = {"continuous": [], "static": ["--no-continuous-batching"]}
TEXT_SLACK = 32  # spare tokens a text prompt may need when decode/encode merges or splits at the cut
OPENERS = ("could you", "please", "hey, can you", "i need you to", "would you mind if we", "my boss asked me to",
           "quick question: can you", "help me")
VERBS = ("explain", "summarize", "compare", "describe", "list the steps to fix", "write a short note about",
         "double check", "plan")
OBJECTS = ("the history of the old bridge", "a recipe for bean soup", "the rules of chess", "how tides work",
           "our quarterly budget", "the train timetable", "a birthday party for my dog", "why the sky looks blue",
           "a reply to my landlord", "the plot of that film", "the best way to learn piano")
TAILS = ("in simple words.", "for a ten year old.", "with three examples.", "as a short list.", "step by step.",
         "and keep it brief.", "before lunch, thanks!", "if it is not too much trouble.")


def synthetic_text(rng: np.random.Generator, sentences: int) -> str:
    # A random number first: distinct prompts part within their first tokens, so a prefix cache finds nothing.
    words = [f"{rng.integers(10**5, 10**6)}:"]
    words += [" ".join(str(rng.choice(part)) for part in (OPENERS, VERBS, OBJECTS, TAILS)) for _ in range(sentences)]
    return " ".join(words)


def synthetic_ids(codec, tokens: int, seed) -> list[int]:
    """At least `tokens` ids of chat-like English, different for every seed."""
    for sentences in range(1, tokens + 2):  # every sentence adds at least one token
        ids = codec.encode(synthetic_text(np.random.default_rng(seed), sentences))
        if len(ids) >= tokens:
            return ids
    raise ValueError(f"the tokenizer turns the synthetic text into fewer than {tokens} tokens")


def fit_text(codec, ids: list[int], want: int) -> str:
    """Text that encodes to `want` tokens where the tokenizer allows (decoding a cut can merge across it)."""
    cut, text = want, codec.decode(ids[:want])
    for _ in range(16):  # each step moves the cut by the miss; a tokenizer that oscillates gets the nearest
        miss = want - len(codec.encode(text))
        if miss == 0 or not 0 < cut + miss <= len(ids):
            break
        cut += miss
        text = codec.decode(ids[:cut])
    return text


def build_prompt(codec, prefix: list[int], tokens: int, seed, as_text: bool) -> list[int] | str:
    ids = prefix + synthetic_ids(codec, tokens + (TEXT_SLACK if as_text else 0), seed)
    return fit_text(codec, ids, len(prefix) + tokens) if as_text else ids[:len(prefix) + tokens]


def request_body(prompt: list[int] | str, max_tokens: int) -> dict:
    return {"model": "model", "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0, "stream_options": {"include_usage": True}}


def parse_sse_line(line: str) -> dict:
    """One line of an OpenAI event stream as {text, usage, error, done}; {} for blanks, comments, other fields."""
    if not line.startswith("data:"):
        return {}
    data = line[5:].strip()
    if data == "[DONE]":
        return {"done": True}
    try:
        payload = json.loads(data)
        error = payload.get("error")
        text = "".join(choice.get("text") or "" for choice in payload.get("choices") or [])
    except (ValueError, AttributeError, TypeError):
        return {"error": f"undecodable event: {data[:80]}"}
    if error:
        return {"error": str(error.get("message", error) if isinstance(error, dict) else error)}
    return {"text": text, "usage": payload.get("usage")}


@dataclass
class RequestResult:
    stamps: list[float] = field(default_factory=list)  # seconds from sending to each non-empty text chunk
    usage: dict | None = None
    error: str | None = None
    done: bool = False

    def add(self, event: dict, at: float) -> None:
        if event.get("text"):
            self.stamps.append(at)
        self.usage = event.get("usage") or self.usage
        self.error = event.get("error") or self.error
        self.done = self.done or event.get("done", False)

    @property
    def output_tokens(self) -> int:
        # Chunks undercount tokens (the server holds back half characters), so the server's usage wins.
        reported = (self.usage or {}).get("completion_tokens")
        return reported if isinstance(reported, int) else len(self.stamps)

    @property
    def cached_tokens(self) -> int | None:
        return ((self.usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")


async def stream_into(http, body: dict, result: RequestResult) -> None:
    sent = time.perf_counter()
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:200]}"
            return
        async for line in response.aiter_lines():
            result.add(parse_sse_line(line), time.perf_counter() - sent)
            if result.done or result.error:
                return


async def one_request(http, body: dict, timeout: float) -> RequestResult:
    result = RequestResult()
    try:
        await asyncio.wait_for(stream_into(http, body, result), timeout)
    except asyncio.TimeoutError:
        result.error = f"timed out after {timeout:g} s"
    except Exception as exc:  # whatever goes wrong fails this request, never the run
        result.error = f"{type(exc).__name__}: {exc}"
    if result.error is None and not result.done:
        result.error = "the stream ended before [DONE]"
    return result


def quantiles_ms(seconds: list[float]) -> dict:
    return {f"p{q}": (percentile([s * 1e3 for s in seconds], q) if seconds else None) for q in (50, 99)}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def summarize(results: list[RequestResult], wall_s: float) -> dict:
    good = [r for r in results if r.error is None]
    cached = [r.cached_tokens for r in good if r.cached_tokens is not None]
    tokens = sum(r.output_tokens for r in results)
    return {"requests": len(good), "errors": len(results) - len(good),
            "error_samples": sorted({r.error for r in results if r.error})[:3],
            "output_tokens": tokens, "wall_s": wall_s, "tokens_per_second": ratio(tokens, wall_s),
            "ttft_ms": quantiles_ms([r.stamps[0] for r in good if r.stamps]),
            "itl_ms": quantiles_ms([b - a for r in good for a, b in zip(r.stamps, r.stamps[1:])]),
            "cached_tokens": sum(cached) if cached else None}


def vmrss_mb(status_text: str) -> float | None:
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # the kernel reports kB
    return None


def rss_growth_percent(samples: list[tuple[float, float]], warm_s: float) -> float | None:
    """Last RSS sample over the first one taken once warm (`warm_s` in), minus one, in percent."""
    measured = [(at, mb) for at, mb in samples if mb]
    warm = next((i for i, (at, _) in enumerate(measured) if at >= warm_s), None)
    if warm is None or warm == len(measured) - 1:
        return None
    return 100 * (measured[-1][1] / measured[warm][1] - 1)


FIGURES = {"tok/s": lambda row: row["tokens_per_second"], "TTFT p50": lambda row: row["ttft_ms"]["p50"],
           "ITL p50": lambda row: row["itl_ms"]["p50"]}


def ratios(rows: list[dict], modes: list[str], soak: dict | None) -> dict[str, float | None]:
    """The issue's comparisons, named as printed: first mode over second, many streams over one, prefix over none.
    A level measured with a one-stream baseline beside it (`row["baseline"]`) is compared with that."""
    def find(mode: str, clients: int, case: str) -> dict | None:
        return next((r for r in rows if (r["mode"], r["case"], r["clients"]) == (mode, case, clients)), None)

    def get(name: str, mode: str, clients: int, case: str = "plain") -> float | None:
        row = find(mode, clients, case)
        return FIGURES[name](row) if row else None

    def to_one_stream(name: str, mode: str, clients: int, case: str = "plain") -> float | None:
        row = find(mode, clients, case)
        baseline = (row or {}).get("baseline") or find(mode, 1, "plain")
        return ratio(FIGURES[name](row), FIGURES[name](baseline)) if row and baseline else None

    levels = sorted({r["clients"] for r in rows if r["case"] == "plain"})
    found = {f"{a}/{b} {name} at {c} streams": ratio(get(name, a, c), get(name, b, c))
             for a, b in zip(modes[:1], modes[1:2]) for c in levels for name in ("tok/s", "TTFT p50")}
    for mode in modes:
        found |= {f"{mode} ITL p50 at {c} streams / 1 stream": to_one_stream("ITL p50", mode, c)
                  for c in levels if c > 1}
        if any(r["case"] == "shared-system" for r in rows):
            found[f"{mode} shared-system TTFT p50 / plain, 1 stream"] = to_one_stream("TTFT p50", mode, 1,
                                                                                      "shared-system")
    if soak:
        found |= {"soak errors": soak["errors"], "soak RSS growth %": soak["rss_growth_percent"]}
    return found


class ServerError(RuntimeError):
    """The server did not come up; the run goes on with the next mode."""


class ServerProcess:
    """One `runtime.serve` subprocess on loopback; stop() leaves none behind."""

    def __init__(self, artifact: str, threads: int, flags: list[str]):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.command = [sys.executable, "-m", "runtime.serve", artifact, "--host", "127.0.0.1", "--port", str(port),
                        "--name", "model", "--threads", str(threads), *flags]
        self.log = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would stall the server
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float):
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"the server exited with {self.process.returncode}: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.get(self.url + "/health", timeout=5, trust_env=False)
                if response.status_code == 200:
                    with contextlib.suppress(ValueError):
                        return response.json()
                    return response.text
            time.sleep(0.25)
        raise ServerError(f"no healthy answer within {timeout:g} s: {self.log_tail()}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss_mb(self) -> float | None:
        try:
            return vmrss_mb(Path(f"/proc/{self.process.pid}/status").read_text())
        except OSError:
            return None

    def log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        self.log.close()


def loopback_client(url: str, connections: int, timeout: float):
    import httpx

    # trust_env off: a proxy named in the environment must never carry the loopback traffic.
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, trust_env=False)


async def drive_level(url: str, warmup: dict, bodies: list[list[dict]], timeout: float) -> dict:
    """Each client sends its bodies one after another; all clients at once, after one uncounted warm-up."""
    async with loopback_client(url, len(bodies), timeout) as http:
        await one_request(http, warmup, timeout)

        async def client(mine: list[dict]) -> list[RequestResult]:
            return [await one_request(http, body, timeout) for body in mine]

        started = time.perf_counter()
        results = await asyncio.gather(*(client(mine) for mine in bodies))
        return summarize([r for mine in results for r in mine], time.perf_counter() - started)


async def drive_soak(server: ServerProcess, codec, args) -> dict:
    """`--soak-clients` streams until the deadline, sampling the server's RSS every ~10 s."""
    clients, seconds, timeout = args.soak_clients, args.soak_seconds, args.request_timeout
    started = time.monotonic()
    deadline, results, samples = started + seconds, [], []

    async def client(index: int) -> None:
        for count in range(10**9):  # the deadline ends it; a failure backs off so a dead server is not hammered
            if time.monotonic() >= deadline or not server.alive():
                return
            results.append(await one_request(http, body_for(codec, args, [], (1, index, count)), timeout))
            if results[-1].error:
                await asyncio.sleep(0.5)

    async def sample_rss() -> None:
        while time.monotonic() < deadline:
            samples.append((time.monotonic() - started, server.rss_mb()))
            await asyncio.sleep(min(10, max(1, seconds / 10), max(0, deadline - time.monotonic())))

    async with loopback_client(server.url, clients, timeout) as http:
        await asyncio.gather(sample_rss(), *(client(i) for i in range(clients)))
    samples.append((time.monotonic() - started, server.rss_mb()))
    return summarize(results, time.monotonic() - started) | {
        "clients": clients, "seconds": seconds, "rss_samples_mb": samples,
        "rss_growth_percent": rss_growth_percent(samples, min(30, seconds / 3))}


def body_for(codec, args, prefix: list[int], seed: tuple[int, ...]) -> dict:
    return request_body(build_prompt(codec, prefix, args.prompt_tokens, seed, args.prompt_as_text), args.max_tokens)


def one_stream_baseline(args, codec, server: ServerProcess, clients: int, case: str) -> dict | None:
    """`--baseline-requests` plain one-stream requests, sent just before the level (case, clients) they serve."""
    if not args.baseline_requests or (case, clients) == ("plain", 1):
        return None
    seed = (3, clients, int(case != "plain"))  # prompts of their own: no prefix-cache hit from a level's
    bodies = [[body_for(codec, args, [], (*seed, r)) for r in range(args.baseline_requests)]]
    warmup = body_for(codec, args, [], (*seed, args.baseline_requests))
    return asyncio.run(drive_level(server.url, warmup, bodies, args.request_timeout))


def run_levels(args, codec, server: ServerProcess, mode: str, case: str, prefix: list[int], report: dict) -> None:
    for clients in args.clients if case == "plain" else args.system_clients:
        # Seeds depend on the level, not the mode: every mode gets the very same prompts.
        warmup = body_for(codec, args, prefix, (0, clients, 0, args.requests))
        bodies = [[body_for(codec, args, prefix, (0, clients, c, r)) for r in range(args.requests)]
                  for c in range(clients)]
        row = {"mode": mode, "case": case, "clients": clients,
               "baseline": one_stream_baseline(args, codec, server, clients, case)}
        row |= asyncio.run(drive_level(server.url, warmup, bodies, args.request_timeout))
        report["rows"].append(row | {"server_rss_mb": server.rss_mb()})
        print(table_line(report["rows"][-1]), flush=True)


def run_mode(args, codec, mode: str, flags: list[str], report: dict, soak: bool) -> None:
    server = ServerProcess(args.artifact, args.threads, flags)
    try:
        health = server.wait_healthy(args.start_timeout)
        report["servers"][mode] = {"command": server.command, "health": health}
        print(f"[{mode}] server pid {server.process.pid} at {server.url}, flags {shlex.join(flags) or '(none)'}: "
              f"health {json.dumps(health)}")
        print(TABLE_HEADER)
        run_levels(args, codec, server, mode, "plain", [], report)
        if args.system_tokens:
            # The warm-up of each level carries the prefix too: a real system prompt is always cached by then.
            system = synthetic_ids(codec, args.system_tokens, (2,))[:args.system_tokens]
            run_levels(args, codec, server, mode, "shared-system", system, report)
        if soak and args.soak_seconds > 0:
            report["soak"] = {"mode": mode} | asyncio.run(drive_soak(server, codec, args))
            print(soak_line(report["soak"]), flush=True)
    finally:
        server.stop()


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


TABLE_HEADER = (f"{'mode':<12}{'case':<15}{'streams':>7}{'done':>6}{'err':>5}{'tok/s':>9}{'TTFT p50':>10}{'p99':>9}"
                f"{'ITL p50':>9}{'p99':>8}{'RSS MB':>8}{'cached':>8}")


def table_line(row: dict) -> str:
    return (f"{row['mode']:<12}{row['case']:<15}{row['clients']:>7}{row['requests']:>6}{row['errors']:>5}"
            f"{fmt(row['tokens_per_second'], '.1f'):>9}{fmt(row['ttft_ms']['p50'], '.1f'):>10}"
            f"{fmt(row['ttft_ms']['p99'], '.1f'):>9}{fmt(row['itl_ms']['p50'], '.2f'):>9}"
            f"{fmt(row['itl_ms']['p99'], '.2f'):>8}{fmt(row['server_rss_mb'], '.0f'):>8}"
            f"{fmt(row['cached_tokens'], 'd'):>8}")


def soak_line(soak: dict) -> str:
    samples = ", ".join(f"{at:.0f}s {fmt(mb, '.0f')}" for at, mb in soak["rss_samples_mb"])
    return (f"[{soak['mode']}] soak: {soak['clients']} streams for {soak['seconds']:g} s, {soak['requests']} requests, "
            f"{soak['errors']} errors, {fmt(soak['tokens_per_second'], '.1f')} tok/s; server RSS MB: {samples}")


def print_ratios(found: dict) -> None:
    print("\nratios (this run)")
    for name, value in found.items():
        print(f"  {name:<56}{fmt(value, 'd' if isinstance(value, int) else '.2f')}")


def parse_modes(text: str) -> list[tuple[str, list[str]]]:
    """`continuous,static` or `name=--flag value,...`: a mode is a name and the server flags it adds."""
    modes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, has_flags, flags = item.partition("=")
        if not has_flags and name not in MODE_FLAGS:
            raise ValueError(f"unknown mode {name!r}: use one of {sorted(MODE_FLAGS)} or NAME=FLAGS")
        modes.append((name, shlex.split(flags) if has_flags else MODE_FLAGS[name]))
    return modes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(part) for part in text.split(",") if part.strip()]

    parser = argparse.ArgumentParser(prog="python -m runtime.loadtest", description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--modes", default="continuous,static", help="comma list; NAME=FLAGS for your own mode")
    parser.add_argument("--server-args", default="", help="extra flags for every server, e.g. '--max-batch 16'")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=ints, default=[1, 4, 16, 32], help="concurrent streams, e.g. 1,4,16,32")
    parser.add_argument("--requests", type=int, default=4, help="counted requests per client at each level")
    parser.add_argument("--baseline-requests", type=Range("--baseline-requests", low=0).parser(), default=3,
                        help="one-stream requests sent just before each other level, the denominator of its "
                             "ratio to one stream (0: the one-stream level instead)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--system-tokens", type=int, default=384, help="shared prefix length; 0 skips that case")
    parser.add_argument("--system-clients", type=ints, default=[1, 4])
    parser.add_argument("--soak-seconds", type=float, default=0, help="0 skips the soak (the issue wants 600)")
    parser.add_argument("--soak-clients", type=int, default=32)
    parser.add_argument("--prompt-as-text", action="store_true", help="send text prompts (servers without ids)")
    parser.add_argument("--request-timeout", type=float, default=300)
    parser.add_argument("--start-timeout", type=float, default=300)
    parser.add_argument("--json", default="loadtest.json")
    args = parser.parse_args(argv)
    try:
        args.mode_list = parse_modes(args.modes)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    from runtime.text import load_codec

    args = parse_args(argv)
    art = artifacts.load(args.artifact)
    codec = load_codec(art)
    settings = {k: v for k, v in vars(args).items() if k != "mode_list"}
    report = {"engine": art.id, "precision": art.manifest.get("precision"), "settings": settings, "servers": {},
              "rows": [], "soak": None, "ratios": None}
    failed = False
    try:
        for index, (mode, flags) in enumerate(args.mode_list):
            try:
                run_mode(args, codec, mode, flags + shlex.split(args.server_args), report, soak=index == 0)
            except ServerError as exc:
                failed = True
                report["servers"][mode] = {"error": str(exc)}
                print(f"[{mode}] {exc}", file=sys.stderr)
        report["ratios"] = ratios(report["rows"], [m for m, _ in args.mode_list], report["soak"])
        print_ratios(report["ratios"])
    except KeyboardInterrupt:
        print("interrupted: the server is stopped; what was measured is in the JSON", file=sys.stderr)
        return 130
    finally:  # an interrupted run still leaves what it measured
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through the finally that stops the server
    sys.exit(main())
