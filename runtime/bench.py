"""`python -m runtime.bench ARTIFACT --prompt-len 128 --gen-len 128 --runs 5 [--baselines]`

Token latency of the artifact through this runtime (and of `--compare` artifacts, runs alternated, each
printed as a ratio: an int8 build against its fp32 parent, say). With `--baselines`, the same graph through the plain
onnxruntime-Python loop is measured in the same process, runs alternated with ours so both see the same
machine state; PyTorch eager (transformers `generate`) is measured afterwards in a subprocess when torch is
installed. `--genai fp32,int8,int4` adds onnxruntime-genai's own builder and loop on the same source weights
(built once in a subprocess and cached; needs onnxruntime-genai), runs alternated with ours. Each baseline is
printed as a ratio to this runtime. `--genai` also drives onnxruntime-genai's loop on this artifact's own graph
(`--genai engine` does only that), so the two runtimes are compared on the same graph. Warm-up runs are kept apart.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

import runtime
from runtime import artifact as artifacts
from runtime.baselines import genai_loop, plain_greedy, plain_session
from runtime.errors import BadInputError, LmforgeError
from runtime.generate import GenerationConfig, generate
from runtime.model_folder import genai_folder
from runtime.progress import track
from runtime.report import percentile, publish
from runtime.session import SessionOptions
from runtime.speculative import EXACT_SPECULATION_HELP, open_speculator

THIS = "lmforge"
NO_SPECULATION = "lmforge, no speculation"
SAMPLE_TEXT = ("The history of science is the study of the development of science and scientific knowledge, "
               "including both the natural and social sciences. Science is a body of empirical, theoretical, "
               "and practical knowledge about the natural world, produced by scientists who emphasize the "
               "observation, explanation, and prediction of real-world phenomena. ")

Run = tuple[float, list[float]]  # (TTFT ms, decode step ms)


@dataclass
class Measurements:
    name: str
    warmup: list[Run] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)

    def summary(self) -> dict:
        steps = [ms for _, run_steps in self.runs for ms in run_steps]
        ttft = [t for t, _ in self.runs]
        generated = 1 + (len(self.runs[0][1]) if self.runs else 0)
        total_s = np.median([(t + sum(s)) / 1000 for t, s in self.runs]) if self.runs else float("nan")
        return {
            "ttft_ms": float(np.median(ttft)) if ttft else float("nan"),
            "tpot_ms": {f"p{q}": percentile(steps, q) for q in (50, 90, 99)},
            "tokens_per_second": generated / total_s,
            "runs": len(self.runs),
            "warmup": [{"ttft_ms": t, "tpot_ms_p50": percentile(s, 50)} for t, s in self.warmup],
        }


def prompt_ids(art: artifacts.Artifact, length: int) -> list[int]:
    """A deterministic prompt of exactly `length` tokens: English text when the artifact has a tokenizer."""
    if "tokenizer.json" in art.manifest["files"]:
        from runtime.text import load_codec

        codec = load_codec(art)
        ids = codec.encode(SAMPLE_TEXT)
        ids = (ids * (length // len(ids) + 1))[:length]
        return ids
    vocab = art.model_facts["vocab_size"]
    return [(7 * i + 3) % vocab for i in range(length)]


def this_runtime(art: artifacts.Artifact, prompt: list[int], gen_len: int, options: SessionOptions,
                 speculator=None) -> Callable[[], Run]:
    session = runtime.open(art, options)
    # No stop tokens: every run generates exactly gen_len tokens, so runs are comparable.
    config = GenerationConfig(max_new_tokens=gen_len, stop_token_ids=())

    def run() -> Run:
        report = generate(session, [prompt], config, speculator=speculator).report
        run.last_report = report  # acceptance and bandwidth of the latest run (runtime/report.py)
        return report.ttft_ms, report.step_ms

    return run


def plain_onnxruntime(art: artifacts.Artifact, prompt: list[int], gen_len: int, threads: int) -> Callable[[], Run]:
    session = plain_session(art.file("model.onnx"), threads)
    ids = np.asarray([prompt], dtype=np.int64)

    def run() -> Run:
        result = plain_greedy(session, art.model_facts, ids, gen_len)
        return result.ttft_ms, result.step_ms

    return run


def pytorch_eager(art: artifacts.Artifact, prompt: list[int], gen_len: int, runs: int, threads: int
                  ) -> Measurements | None:
    """transformers generate in a subprocess (the runtime never imports torch); None without torch."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("export") is None:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompt, f)
    try:
        cmd = [sys.executable, "-m", "export.torch_baseline", str(art.path), f.name, "--gen-len", str(gen_len),
               "--runs", str(runs), "--threads", str(threads)]
        result = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if result.returncode != 0:
        print(f"warning: PyTorch baseline failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    data = json.loads(result.stdout.strip().splitlines()[-1])
    return Measurements("pytorch-eager", warmup=[(data["warmup"]["ttft_ms"], data["warmup"]["step_ms"])],
                        runs=[(r["ttft_ms"], r["step_ms"]) for r in data["runs"]])


def onnxruntime_genai(art: artifacts.Artifact, precision: str, prompt: list[int], gen_len: int, threads: int
                      ) -> Callable[[], Run]:
    """onnxruntime-genai's loop on its builder's model of the artifact's source weights (built in a subprocess:
    the builder needs torch; it also says, exit code 4, when onnxruntime-genai is not installed)."""
    result = subprocess.run([sys.executable, "-m", "export.genai_baseline", str(art.path), "--precision", precision],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise LmforgeError((result.stderr.strip().splitlines() or ["onnxruntime-genai's builder failed"])[-1]
                           .removeprefix("error: "), exit_code=result.returncode)
    return genai_loop(result.stdout.strip().splitlines()[-1], prompt, gen_len, threads)


GENAI_ENGINE = "engine"  # `--genai engine`: onnxruntime-genai's loop on the artifact's own graph
GENAI_ON_ENGINE = "onnxruntime-genai on this engine"


def onnxruntime_genai_on_engine(art: artifacts.Artifact, prompt: list[int], gen_len: int, threads: int
                                ) -> Callable[[], Run]:
    """onnxruntime-genai's loop on this very artifact (its genai_config.json, or one written from the manifest
    for an artifact built before the file existed): what each runtime does with the same graph."""
    folder, temporary = genai_folder(art)
    run = genai_loop(folder, prompt, gen_len, threads)
    run.keeps = temporary  # the linked folder lives as long as the runner
    return run


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_growth(run: Callable[[], Run], gen_len: int, tokens: int) -> dict:
    """RSS before and after generating `tokens` tokens in runs of gen_len (after warm-up)."""
    before = rss_mb()
    generated = 0
    while generated < tokens:
        generated += 1 + len(run()[1])
    after = rss_mb()
    return {"tokens": generated, "rss_before_mb": before, "rss_after_mb": after,
            "growth_percent": 100 * (after - before) / before}


def measure(art: artifacts.Artifact, prompt_len: int, gen_len: int, runs: int, options: SessionOptions, warmup: int,
            baselines: bool, rss_tokens: int, compare: tuple[artifacts.Artifact, ...] = (),
            genai: tuple[str, ...] = (), speculator=None) -> dict:
    prompt = prompt_ids(art, prompt_len)
    threads = options.threads
    runners = {THIS: this_runtime(art, prompt, gen_len, options, speculator)}
    if speculator is not None:  # speculation (ours) against plain decoding, alternated like every runner
        runners[NO_SPECULATION] = this_runtime(art, prompt, gen_len, options)
    for other in compare:  # other artifacts (say, the fp32 parent of an int8 build) through this runtime
        runners[f"{other.stage}-{other.id} ({other.manifest.get('precision')})"] = this_runtime(
            other, prompt, gen_len, replace(options, exact_speculation=False))
    if baselines:
        runners["onnxruntime-python"] = plain_onnxruntime(art, prompt, gen_len, threads)
    if genai:
        runners[GENAI_ON_ENGINE] = onnxruntime_genai_on_engine(art, prompt, gen_len, threads)
    for precision in (p for p in genai if p != GENAI_ENGINE):
        runners[f"onnxruntime-genai {precision}"] = onnxruntime_genai(art, precision, prompt, gen_len, threads)
    results = {name: Measurements(name) for name in runners}
    for name, run in runners.items():
        results[name].warmup = [run() for _ in range(warmup)]
    for _ in track(range(runs), f"[bench] {len(runners)} runner(s) alternated"):  # drift hits every runner alike
        for name, run in runners.items():
            results[name].runs.append(run())
    report = {"artifact": str(art.path), "engine_id": art.id, "threads": threads, "provider": options.provider,
              "huge_pages": options.huge_pages, "exact_speculation": options.exact_speculation,
              "prompt_len": prompt_len,
              "gen_len": gen_len, "runners": {name: m.summary() for name, m in results.items()},
              "steps": {name: m.runs[-1][1] for name, m in results.items()}}  # per-token ms of the last run
    if baselines:
        eager = pytorch_eager(art, prompt, gen_len, runs, threads)
        if eager is not None:
            report["runners"][eager.name] = eager.summary()
    report["ratios"] = ratios(report["runners"])
    last = runners[THIS].last_report
    report["decode"] = {key: last.to_dict()[key] for key in (
        "speculative", "speculation_note", "acceptance_rate", "mean_accepted_length", "bytes_per_step",
        "bandwidth_gbs")}
    if rss_tokens:
        report["rss"] = rss_growth(runners[THIS], gen_len, rss_tokens)
    return report


def ratios(runners: dict) -> dict:
    """This runtime ÷ each baseline, for median TTFT and median TPOT (below 1.0: we are faster)."""
    ours = runners[THIS]
    return {name: {"ttft": ours["ttft_ms"] / other["ttft_ms"], "tpot": ours["tpot_ms"]["p50"] / other["tpot_ms"]["p50"]}
            for name, other in runners.items() if name != THIS}


def table(report: dict) -> str:
    rows = [("runner", "TTFT ms", "TPOT p50", "p90", "p99", "tok/s", "ours÷it TTFT", "ours÷it TPOT")]
    for name, s in report["runners"].items():
        ratio = report["ratios"].get(name)
        rows.append((name, f"{s['ttft_ms']:.1f}", f"{s['tpot_ms']['p50']:.2f}", f"{s['tpot_ms']['p90']:.2f}",
                     f"{s['tpot_ms']['p99']:.2f}", f"{s['tokens_per_second']:.1f}",
                     f"{ratio['ttft']:.2f}" if ratio else "-", f"{ratio['tpot']:.2f}" if ratio else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    decode = report.get("decode") or {}
    if decode.get("bytes_per_step"):
        lines.append(f"{THIS}: {decode['bytes_per_step'] / 1e6:.0f} MB read per decode step, "
                     f"{decode['bandwidth_gbs']:.1f} GB/s")
    if decode.get("speculative"):
        lines.append(f"{THIS} speculative {decode['speculative']}: acceptance "
                     f"{100 * (decode['acceptance_rate'] or 0):.0f}%, {decode['mean_accepted_length']:.2f} tok/verify "
                     f"{decode['speculation_note']}".rstrip())
    if "rss" in report:
        rss = report["rss"]
        lines.append(f"RSS over {rss['tokens']} generated tokens: {rss['rss_before_mb']:.0f} -> "
                     f"{rss['rss_after_mb']:.0f} MB ({rss['growth_percent']:+.2f}%)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.bench", description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--provider", default="cpu", help="ONNX Runtime execution provider: cpu or cuda")
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="leave this runtime's engine memory on the pages malloc gave it, as the baselines' is")
    parser.add_argument("--baselines", action="store_true",
                        help="also measure the plain onnxruntime-Python loop and PyTorch eager")
    parser.add_argument("--genai", default="",
                        help="also measure onnxruntime-genai's loop on this artifact's graph and on its builder's "
                             "model at these precisions (fp32,int8,int4; 'engine': this artifact's graph only)")
    parser.add_argument("--rss-tokens", type=int, default=0, help="measure RSS growth over this many tokens")
    parser.add_argument("--compare", nargs="*", default=[],
                        help="more artifacts to run through this runtime in the same run (e.g. the fp32 parent)")
    parser.add_argument("--speculative", default=None, metavar="ngram|draft",
                        help="speculative decoding for this runtime, measured against plain decoding in the same run")
    parser.add_argument("--draft", default=None, metavar="ARTIFACT", help="the draft model for --speculative draft")
    parser.add_argument("--exact-speculation", action="store_true",
                        help=EXACT_SPECULATION_HELP)
    parser.add_argument("--json", default="bench.json", help="where to write the full report")
    args = parser.parse_args(argv)
    speculator = None
    try:
        if args.runs < 1 or args.prompt_len < 1 or args.gen_len < 2:
            raise BadInputError("need --runs >= 1, --prompt-len >= 1 and --gen-len >= 2")
        art = artifacts.load(args.artifact)
        options = SessionOptions(threads=args.threads, provider=args.provider, huge_pages=not args.no_huge_pages,
                                 exact_speculation=args.exact_speculation)
        compare = tuple(artifacts.load(path) for path in args.compare)
        speculator = open_speculator(args.speculative, args.draft, art, options)
        report = measure(art, args.prompt_len, args.gen_len, args.runs, options, args.warmup,
                         args.baselines, args.rss_tokens, compare,
                         tuple(p.strip() for p in args.genai.split(",") if p.strip()), speculator)
    except LmforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        if speculator is not None:
            speculator.close()
    publish(table(report), report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
