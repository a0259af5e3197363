"""`python -m runtime.step_profile ENGINE --batch 1,4,16 --context 160`: where one decode step's time goes, by op
type, at several batch sizes (`--tokens 128`: one prefill chunk per row instead; `--context 0,384`: several
cache lengths).

It runs the step the server runs (the slot cache of `runtime/service.py`: every row at its own length, through
`OrtSession.run_slots`), so its ratios bound what any scheduler can reach: a stream's inter-token latency at
batch n cannot beat the engine's step at batch n (docs/serving.md, "Limits"). Step times come from one session
that takes the cases in turn, step after step, so a machine whose speed drifts (a shared 2-core VM drifts by
1.5x within minutes) shifts every case alike; then each case runs under ONNX Runtime's profiler in its own
session, and its op types' shares of the kernel time split the unprofiled step time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

import runtime
from runtime import artifact as artifacts
from runtime.errors import BadInputError, LmforgeError
from runtime.report import publish
from runtime.session import SessionOptions

KERNEL_SUFFIX = "_kernel_time"  # ONNX Runtime's trace event for one node's compute


def op_shares(trace: list[dict]) -> dict[str, float]:
    """Each op type's share of the kernel time in an ONNX Runtime profile (chrome-trace events)."""
    times: Counter[str] = Counter()
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith(KERNEL_SUFFIX):
            times[event["args"]["op_name"]] += event["dur"]
    total = sum(times.values())
    if not total:
        raise BadInputError("the profile holds no node timings; is this an ONNX Runtime engine?")
    return {op: time_ / total for op, time_ in times.most_common()}


def _case_inputs(batch: int, context: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    # The cache's contents and the tokens do not change the work, so zeros stand for both.
    return np.zeros((batch, tokens), np.int64), np.full(batch, context, np.int64)


def _open(art: artifacts.Artifact, options: SessionOptions, rows: int, positions: int):
    session = runtime.open(art, options)
    try:
        if not getattr(session, "supports_slots", False):
            raise BadInputError(f"engine {art.id} has no per-row cache lengths (unfused attention); the step "
                                "profile runs the continuous-batching step: rebuild it with `python -m export.build`")
        session.open_slots(rows, positions)
    except BaseException:
        session.close()
        raise
    return session


def step_times(art: artifacts.Artifact, cases: list[tuple[int, int]], tokens: int, steps: int, warmup: int,
               threads: int) -> list[list[float]]:
    """Milliseconds of each (batch, context) case's steps, the cases taken in turn within one session."""
    inputs = [_case_inputs(batch, context, tokens) for batch, context in cases]
    rows, positions = max(b for b, _ in cases), max(c for _, c in cases) + tokens
    times: list[list[float]] = [[] for _ in cases]
    with _open(art, SessionOptions(threads=threads), rows, positions) as session:
        for step in range(warmup + steps):
            for case, (ids, lengths) in enumerate(inputs):
                start = time.perf_counter()
                session.run_slots(0, ids, lengths)
                if step >= warmup:
                    times[case].append((time.perf_counter() - start) * 1e3)
    return times


def case_shares(art: artifacts.Artifact, batch: int, context: int, tokens: int, steps: int, threads: int,
                folder: Path) -> dict[str, float]:
    """Op types' shares of one case's kernel time, from ONNX Runtime's profiler in a session of its own."""
    ids, lengths = _case_inputs(batch, context, tokens)
    options = SessionOptions(threads=threads, profile=str(folder / f"batch{batch}-context{context}"))
    with _open(art, options, batch, context + tokens) as session:
        for _ in range(steps):
            session.run_slots(0, ids, lengths)
        return op_shares(json.loads(Path(session.end_profiling()).read_text()))


def measure(art: artifacts.Artifact, batches: list[int], contexts: list[int], steps: int, warmup: int,
            threads: int, tokens: int = 1) -> dict:
    limit = art.model_facts.get("max_context")
    if limit and max(contexts) + tokens > limit:
        raise BadInputError(f"--context {max(contexts)} with --tokens {tokens} exceeds the model's context of "
                            f"{limit} positions; give a shorter --context or fewer --tokens")
    cases = [(batch, context) for batch in batches for context in contexts]
    times = step_times(art, cases, tokens, steps, warmup, threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmforge-profile-") as folder:
        for (batch, context), case_times in zip(cases, times):
            shares = case_shares(art, batch, context, tokens, warmup + steps, threads, Path(folder))
            step_ms = float(np.median(case_times))
            rows.append({"batch": batch, "context": context, "tokens": tokens, "step_ms_p50": step_ms,
                         "op_ms": {op: share * step_ms for op, share in shares.items()}})
    return {"engine": art.id, "threads": threads, "rows": rows}


def table(report: dict, top: int = 6) -> str:
    """Step time and the largest op types per case, each also as a multiple of the first case's."""
    rows = report["rows"]
    base = rows[0]
    ops = list(base["op_ms"])[:top]
    header = f"{'batch':>5} {'context':>7} {'step ms':>8} {'x':>6}  " + "  ".join(f"{op[:22]:>22}" for op in ops)
    lines = [f"engine {report['engine']}, {base['tokens']} new positions per row, {report['threads']} threads; "
             "per op: ms (x the first row)", header]
    for row in rows:
        cells = []
        for op in ops:
            ms, base_ms = row["op_ms"].get(op, 0.0), base["op_ms"][op]
            cells.append(f"{ms:>13.2f} ({ms / base_ms:>5.1f}x)")
        ratio = row["step_ms_p50"] / base["step_ms_p50"]
        lines.append(f"{row['batch']:>5} {row['context']:>7} {row['step_ms_p50']:>8.2f} {ratio:>5.2f}x  "
                     + "  ".join(f"{cell:>22}" for cell in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def ints(low: int):
        def parse(text: str) -> list[int]:
            try:
                values = [int(part) for part in text.split(",") if part.strip()]
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers") from None
            if not values or min(values) < low:
                raise argparse.ArgumentTypeError(f"{text!r}: give values of {low} or more, e.g. 1,4,16")
            return values
        return parse

    parser = argparse.ArgumentParser(prog="python -m runtime.step_profile", description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--batch", type=ints(1), default=[1, 4, 16], help="rows per step, e.g. 1,4,16")
    parser.add_argument("--context", type=ints(0), default=[160],
                        help="cached positions per row, e.g. 0,384 (160: the load test's 128-token prompt, halfway "
                             "through its 64 output tokens)")
    parser.add_argument("--tokens", type=int, default=1, help="new positions per row per step (1: decode; "
                        "128: a prefill chunk of the server's default size)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="step_profile.json", help="where to write the full report")
    args = parser.parse_args(argv)
    try:
        if args.tokens < 1 or args.steps < 1 or args.warmup < 0 or args.threads < 1:
            raise BadInputError("need --tokens >= 1, --steps >= 1, --warmup >= 0 and --threads >= 1")
        report = measure(artifacts.load(args.artifact), args.batch, args.context, args.steps, args.warmup,
                         args.threads, args.tokens)
    except LmforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    publish(table(report), report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
