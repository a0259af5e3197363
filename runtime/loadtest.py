"""`python -m runtime.loadtest ARTIFACT`: the service figures. Starts the server in this process on
loopback, drives it with streaming clients, and reports throughput and client-side TTFT/TPOT (p50, p99) at
each concurrency, then the process RSS after 10 and after N requests (the memory-growth check).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import threading
import time
from pathlib import Path

from runtime import artifact as artifacts
from runtime.bench import rss_mb
from runtime.report import percentile
from runtime.session import SessionOptions


def start_server(artifact: artifacts.Artifact, threads: int, batching: bool):
    import uvicorn

    from runtime.serve import create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(artifact, "model", SessionOptions(threads=threads), queue_size=256, batching=batching)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


async def one_request(http, prompt: str, max_tokens: int) -> tuple[float, list[float]]:
    """(TTFT s, gaps between later tokens s) of one streamed completion, as the client sees them."""
    body = {"model": "model", "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    started = time.perf_counter()
    stamps = []
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:])["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    return stamps[0] - started, [b - a for a, b in zip(stamps, stamps[1:])]


async def drive(url: str, clients: int, requests_per_client: int, prompt: str, max_tokens: int) -> dict:
    import httpx

    ttft, gaps, tokens = [], [], 0
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        async def client():
            nonlocal tokens
            for _ in range(requests_per_client):
                first, rest = await one_request(http, prompt, max_tokens)
                ttft.append(first * 1e3)
                gaps.extend(g * 1e3 for g in rest)
                tokens += 1 + len(rest)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        seconds = time.perf_counter() - started
    return {"clients": clients, "requests": clients * requests_per_client, "tokens_per_second": tokens / seconds,
            "ttft_ms": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
            "tpot_ms": {"p50": percentile(gaps, 50), "p99": percentile(gaps, 99)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.loadtest", description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=4, help="requests per client at each concurrency")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rss-requests", type=int, default=1000, help="0 skips the memory-growth check")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-batching", action="store_true")
    parser.add_argument("--json", default="loadtest.json")
    args = parser.parse_args(argv)
    art = artifacts.load(args.artifact)
    server, url = start_server(art, args.threads, not args.no_batching)
    prompt = "The history of science is the study of the development of science and scientific knowledge. " * 2
    results = {"engine": art.id, "precision": art.manifest.get("precision"), "rows": []}
    for clients in (int(c) for c in args.clients.split(",")):
        row = asyncio.run(drive(url, clients, args.requests, prompt, args.max_tokens))
        results["rows"].append(row)
        print(f"{clients:>3} clients: {row['tokens_per_second']:7.1f} tok/s  TTFT p50 {row['ttft_ms']['p50']:7.1f} "
              f"p99 {row['ttft_ms']['p99']:7.1f} ms  TPOT p50 {row['tpot_ms']['p50']:6.2f} "
              f"p99 {row['tpot_ms']['p99']:6.2f} ms")
    if args.rss_requests:
        asyncio.run(drive(url, 10, 1, prompt, 8))
        after_10 = rss_mb()
        asyncio.run(drive(url, 16, max(1, (args.rss_requests - 10) // 16), prompt, 8))
        after_n = rss_mb()
        results["rss"] = {"after_10_mb": after_10, f"after_{args.rss_requests}_mb": after_n,
                          "growth_percent": 100 * (after_n / after_10 - 1)}
        print(f"RSS after 10 requests {after_10:.0f} MB, after {args.rss_requests}: {after_n:.0f} MB "
              f"({results['rss']['growth_percent']:+.1f}%)")
    server.should_exit = True
    Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
