"""`python -m runtime.step_profile ENGINE --batch 1,4,16 --context 160`: where one decode step's time goes, by op
type, at several batch sizes (`--tokens 128`: one prefill chunk per row instead).

It runs the step the server runs (the slot cache of `runtime/service.py`: every row at its own length, through
`OrtSession.run_slots`), so its ratios bound what any scheduler can reach: a stream's inter-token latency at
batch n cannot beat the engine's step at batch n (docs/serving.md, "Limits"). Each batch size is measured twice
in a fresh session: step times without the profiler (the profiler slows small ops), then ONNX Runtime's
per-node profile, whose shares of the step split the unprofiled time among op types.
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


def _steps(session, batch: int, context: int, tokens: int, steps: int) -> list[float]:
    """Milliseconds of `steps` runs that append `tokens` positions to each of `batch` slot rows holding `context`."""
    lengths = np.full(batch, context, np.int64)
    ids = np.zeros((batch, tokens), np.int64)  # the cache's contents and the tokens do not change the work
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        session.run_slots(0, ids, lengths)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def profile_batch(art: artifacts.Artifact, batch: int, context: int, tokens: int, steps: int, warmup: int,
                  threads: int, folder: Path) -> dict:
    options = SessionOptions(threads=threads)
    with runtime.open(art, options) as session:
        if not getattr(session, "supports_slots", False):
            raise BadInputError(f"engine {art.id} has no per-row cache lengths (unfused attention); the step "
                                "profile runs the continuous-batching step: rebuild it with `python -m export.build`")
        session.open_slots(batch, context + tokens)
        _steps(session, batch, context, tokens, warmup)
        times = _steps(session, batch, context, tokens, steps)
    profiled = SessionOptions(threads=threads, profile=str(folder / f"batch{batch}"))
    with runtime.open(art, profiled) as session:
        session.open_slots(batch, context + tokens)
        _steps(session, batch, context, tokens, warmup + steps)
        shares = op_shares(json.loads(Path(session.end_profiling()).read_text()))
    step_ms = float(np.median(times))
    return {"batch": batch, "context": context, "tokens": tokens, "step_ms_p50": step_ms,
            "op_ms": {op: share * step_ms for op, share in shares.items()}}


def measure(art: artifacts.Artifact, batches: list[int], context: int, steps: int, warmup: int, threads: int,
            tokens: int = 1) -> dict:
    with tempfile.TemporaryDirectory(prefix="lmforge-profile-") as folder:
        rows = [profile_batch(art, batch, context, tokens, steps, warmup, threads, Path(folder))
                for batch in batches]
    return {"engine": art.id, "threads": threads, "rows": rows}


def table(report: dict, top: int = 6) -> str:
    """Step time and the largest op types per batch size, each also as a multiple of the smallest batch's."""
    rows = report["rows"]
    base = rows[0]
    ops = list(base["op_ms"])[:top]
    header = f"{'batch':>5} {'step ms':>8} {'x':>6}  " + "  ".join(f"{op[:22]:>22}" for op in ops)
    lines = [f"engine {report['engine']}, {base['tokens']} new and {base['context']} cached positions per row, "
             f"{report['threads']} threads; per op: ms (x batch {base['batch']})", header]
    for row in rows:
        cells = []
        for op in ops:
            ms, base_ms = row["op_ms"].get(op, 0.0), base["op_ms"][op]
            cells.append(f"{ms:>13.2f} ({ms / base_ms:>5.1f}x)")
        lines.append(f"{row['batch']:>5} {row['step_ms_p50']:>8.2f} {row['step_ms_p50'] / base['step_ms_p50']:>5.2f}x  "
                     + "  ".join(f"{cell:>22}" for cell in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def ints(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers") from None
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: give batch sizes of 1 or more, e.g. 1,4,16")
        return values

    parser = argparse.ArgumentParser(prog="python -m runtime.step_profile", description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--batch", type=ints, default=[1, 4, 16], help="rows per step, e.g. 1,4,16")
    parser.add_argument("--context", type=int, default=160,
                        help="cached positions per row (160: the load test's 128-token prompt, halfway through 64)")
    parser.add_argument("--tokens", type=int, default=1, help="new positions per row per step (1: decode; "
                        "128: a prefill chunk of the server's default size)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="step_profile.json", help="where to write the full report")
    args = parser.parse_args(argv)
    try:
        if args.context < 0 or args.tokens < 1 or args.steps < 1 or args.warmup < 0 or args.threads < 1:
            raise BadInputError("need --context >= 0, --tokens >= 1, --steps >= 1, --warmup >= 0 and --threads >= 1")
        report = measure(artifacts.load(args.artifact), args.batch, args.context, args.steps, args.warmup,
                         args.threads, args.tokens)
    except LmforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(table(report))
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nfull report: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
