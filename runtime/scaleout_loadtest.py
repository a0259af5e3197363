"""`python -m runtime.scaleout_loadtest ARTIFACT`: the scale-out figures, one run, runtime.loadtest's client.

First the Ray hop: its added TTFT at 1 stream. A Ray server with one replica and the single-process server run
side by side on the same engine and threads, and requests alternate between them in a shuffled order, so that
the machine's drift (tens of ms of TTFT between runs on 2 cores) falls on both alike. Twice: with 2 threads the
engine has every core and Ray's own processes take theirs from it (the hop plus that contention); with 1 thread a
core is left for them (the hop alone).

Then the table: three servers in turn, each a `python -m runtime.serve` subprocess streaming the very same
prompts (runtime.loadtest): the plain single-process server (2 threads), Ray Serve with 1 replica x 2 threads,
and Ray Serve with 2 replicas x 1 thread; output tok/s and TTFT p50/p99 at each level of concurrent streams.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
from pathlib import Path

from runtime import artifact as artifacts
from runtime import loadtest
from runtime.report import percentile

MODES = {"single": "--threads 2", "ray-1x2": "--replicas 1 --threads 2", "ray-2x1": "--replicas 2 --threads 1"}
# For the hop: (single-process flags, Ray flags) on the same threads.
HOP_PAIRS = {"2 threads": ("--threads 2", "--replicas 1 --threads 2"),
             "1 thread": ("--threads 1", "--replicas 1 --threads 1")}
SETTLE_S = 10  # after both are healthy: a fresh Ray cluster is still busy starting its own processes
# Between requests: one user's think time, and the last request's after-work (its server's and the other's)
# done before the next starts, so each request meets an idle machine, as a single stream does.
PAUSE_S = 0.3


def loadtest_argv(args, modes: dict[str, str], clients: str, requests: int, json_path: str) -> list[str]:
    return [args.artifact, "--modes", ",".join(f"{name}={flags}" for name, flags in modes.items()),
            "--clients", clients, "--requests", str(requests), "--max-tokens", str(args.max_tokens),
            "--prompt-tokens", str(args.prompt_tokens), "--system-tokens", "0", "--server-args", args.server_args,
            "--json", json_path]


def hop_bodies(args, codec, count: int) -> list[dict]:
    """Distinct prompts (nothing for a prefix cache to find) asking for 2 tokens: the first is what is timed."""
    return [loadtest.request_body(loadtest.build_prompt(codec, [], args.prompt_tokens, (3, i), False), 2)
            for i in range(count)]


async def alternate(urls: dict[str, str], bodies: list[dict], timeout: float,
                    pause_s: float = PAUSE_S) -> dict[str, list[float]]:
    """Each body to every server in turn, the order shuffled each time; seconds to the first text per server."""
    order = random.Random(0)
    ttfts: dict[str, list[float]] = {name: [] for name in urls}
    async with contextlib.AsyncExitStack() as stack:
        clients = {name: await stack.enter_async_context(loadtest.loopback_client(url, 1, timeout))
                   for name, url in urls.items()}
        for body in bodies:
            for name in order.sample(list(clients), len(clients)):
                await asyncio.sleep(pause_s)
                result = await loadtest.one_request(clients[name], body, timeout)
                if result.error is None and result.stamps:
                    ttfts[name].append(result.stamps[0])
    return ttfts


def measure_hop(args, codec, single_flags: str, ray_flags: str) -> dict:
    extra = args.server_args.split()
    servers = {"single": loadtest.ServerProcess(args.artifact, 1, single_flags.split() + extra)}
    try:
        servers["ray"] = loadtest.ServerProcess(args.artifact, 1, ray_flags.split() + extra)
        for server in servers.values():
            server.wait_healthy(args.start_timeout)
        asyncio.run(asyncio.sleep(SETTLE_S))
        bodies = hop_bodies(args, codec, args.hop_requests + 2)
        ttfts = asyncio.run(alternate({name: s.url for name, s in servers.items()}, bodies, args.request_timeout))
    finally:
        for server in servers.values():
            server.stop()
    return hop_figures({name: seconds[2:] for name, seconds in ttfts.items()})  # the first two warm up


def hop_figures(ttfts: dict[str, list[float]]) -> dict:
    p50 = {name: percentile([s * 1e3 for s in seconds], 50) if seconds else None for name, seconds in ttfts.items()}
    added = p50["ray"] - p50["single"] if None not in p50.values() else None
    return {"single_ttft_p50_ms": p50["single"], "ray_ttft_p50_ms": p50["ray"], "added_ms": added,
            "requests": min(len(seconds) for seconds in ttfts.values())}


def row(rows: list[dict], mode: str, clients: int) -> dict | None:
    return next((r for r in rows if r["mode"] == mode and r["clients"] == clients and r["case"] == "plain"), None)


def table(rows: list[dict]) -> dict:
    """Per server and level: tok/s, TTFT p50/p99 (ms), errors."""
    levels = sorted({r["clients"] for r in rows})
    return {mode: {clients: {"tok/s": found["tokens_per_second"], "TTFT p50": found["ttft_ms"]["p50"],
                             "TTFT p99": found["ttft_ms"]["p99"], "errors": found["errors"]}
                   for clients in levels if (found := row(rows, mode, clients))}
            for mode in MODES}


def print_figures(found: dict) -> None:
    print(f"\n{'server':<10}{'streams':>8}{'tok/s':>9}{'TTFT p50':>10}{'p99':>9}{'errors':>8}")
    for mode, levels in found["table"].items():
        for clients, cell in levels.items():
            print(f"{mode:<10}{clients:>8}{loadtest.fmt(cell['tok/s'], '.1f'):>9}"
                  f"{loadtest.fmt(cell['TTFT p50'], '.1f'):>10}{loadtest.fmt(cell['TTFT p99'], '.1f'):>9}"
                  f"{cell['errors']:>8}")
    for threads, hop in found["hop"].items():
        single, ray, added = (loadtest.fmt(hop[key], ".1f") for key in ("single_ttft_p50_ms", "ray_ttft_p50_ms",
                                                                        "added_ms"))
        print(f"Ray hop at 1 stream, {threads}, {hop['requests']} requests each (alternating): TTFT p50 single "
              f"{single} ms, Ray {ray} ms: added {added} ms")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.scaleout_loadtest", description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--clients", default="1,8,16", help="concurrent streams, e.g. 1,8,16")
    parser.add_argument("--requests", type=int, default=4, help="counted requests per client at each level")
    parser.add_argument("--hop-requests", type=int, default=40, help="requests to each server in the hop pass")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--server-args", default="", help="extra flags for every server, e.g. '--max-batch 16'")
    parser.add_argument("--request-timeout", type=float, default=300)
    parser.add_argument("--start-timeout", type=float, default=300)
    parser.add_argument("--json", default="scale-out.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    from runtime.text import load_codec

    args = build_parser().parse_args(argv)
    codec = load_codec(artifacts.load(args.artifact))
    hops = {}
    for threads, (single_flags, ray_flags) in HOP_PAIRS.items():
        try:
            hops[threads] = measure_hop(args, codec, single_flags, ray_flags)
        except loadtest.ServerError as exc:
            print(f"[hop, {threads}] {exc}", file=sys.stderr)
            hops[threads] = hop_figures({"single": [], "ray": []})
    status = loadtest.main(loadtest_argv(args, MODES, args.clients, args.requests, args.json))
    report = json.loads(Path(args.json).read_text())
    report["scale_out"] = {"table": table(report["rows"]), "hop": hops}
    Path(args.json).write_text(json.dumps(report, indent=1))
    print_figures(report["scale_out"])
    return status


if __name__ == "__main__":
    sys.exit(main())
