"""`python -m runtime.bench_speculative ARTIFACT [--genai] [--draft DRAFT]`: the speculative-decoding figures.

Two prompt sets written for the purpose, both in the model's chat template, batch 1, greedy:
  grounded  20 input-grounded tasks (summarise, extract, rewrite, continue) over passages of a few hundred
            tokens from the Python standard library's own documentation, the text calibration reads by default;
  chat      open-ended chat prompts, where prompt lookup rarely finds anything to copy.
Per prompt, the runners run back to back in a rotating order (the machine is shared and noisy: ratios from
one alternated run are what counts): no speculation first (with stop tokens: its length L sets every other
runner's), then prompt lookup, the draft model where `--draft` is given, and onnxruntime-genai's int8 model
(`--genai`; built once by `python -m export.genai_baseline`, its loop from runtime/baselines.py). Per set:
ms per output token (decode time / decode tokens), tokens per second (TTFT included), acceptance rate, mean
accepted length, how many outputs equal no speculation's, and the ratios against no speculation and
onnxruntime-genai. `--exact-speculation` adds plain decoding and each speculator on a second session with
SessionOptions(exact_speculation=True); their outputs are compared with each other, and the ratios say what
exactness costs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import os
import subprocess
import sys
from dataclasses import dataclass, field, replace
from typing import Any

import runtime
from runtime import artifact as artifacts
from runtime.baselines import genai_loop
from runtime.errors import LmforgeError
from runtime.generate import GenerationConfig, generate
from runtime.progress import track
from runtime.report import publish
from runtime.session import SessionOptions
from runtime.speculative import open_speculator
from runtime.text import load_codec

PLAIN, NGRAM, DRAFT, GENAI = "no speculation", "ngram", "draft", "onnxruntime-genai int8"
EXACT = ", exact"  # the runners on the session with SessionOptions(exact_speculation=True)
# Modules whose documentation the grounded passages come from (module, class and function docstrings).
PASSAGE_MODULES = ("argparse", "json", "csv", "heapq", "subprocess", "unittest", "itertools", "re", "socket",
                   "uuid", "timeit", "statistics", "random", "configparser", "shelve", "sched", "hashlib",
                   "textwrap", "difflib", "logging")
PASSAGE_CHARS = 1400  # about 350-450 tokens of documentation
TASKS = (
    "Summarise the following documentation in three or four sentences.\n\n{passage}",
    "Extract every function, class and parameter name the following text mentions; list them one per line, "
    "each with the short description the text gives it.\n\n{passage}",
    "Rewrite the following documentation as plain prose for a beginner, keeping every fact.\n\n{passage}",
    "Continue the following documentation with its next paragraph, in the same style.\n\n{passage}",
)
CHAT_PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are some good habits for staying focused while working from home?",
    "Explain to a ten-year-old why the sky is blue.",
    "Give me ideas for a birthday party for someone who loves astronomy.",
    "Write a poem about the first snow of winter.",
    "What should I think about before adopting a dog?",
    "Describe a perfect weekend in a small mountain town.",
    "How would you explain the difference between weather and climate?",
    "Write a friendly letter inviting a neighbour to a community garden day.",
    "What are the pros and cons of learning to play the piano as an adult?",
)


def passage(module_name: str) -> str:
    """About PASSAGE_CHARS of a module's documentation (its docstring, then its public members'), cut at a
    paragraph break: the same kind of text `calibration/` reads by default."""
    module = importlib.import_module(module_name)
    parts = [inspect.getdoc(module) or ""]
    for name, member in inspect.getmembers(module):
        if not name.startswith("_") and (inspect.isclass(member) or inspect.isfunction(member)):
            parts.append(f"{name}: {inspect.getdoc(member) or ''}")
    text = "\n\n".join(p for p in parts if p.strip())
    cut = text.rfind("\n\n", 0, PASSAGE_CHARS)
    return text[: cut if cut > PASSAGE_CHARS // 2 else PASSAGE_CHARS].strip()


def grounded_tasks() -> list[str]:
    return [TASKS[i % len(TASKS)].format(passage=passage(name)) for i, name in enumerate(PASSAGE_MODULES)]


PROMPT_SETS = {"grounded": grounded_tasks, "chat": lambda: list(CHAT_PROMPTS)}


@dataclass
class Tally:
    """One runner's sums over a prompt set."""

    decode_ms: float = 0.0
    decode_tokens: int = 0
    total_ms: float = 0.0
    tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0
    identical: int = 0  # outputs equal to those of its plain runner, out of
    compared: int = 0
    prompts: int = 0
    notes: set = field(default_factory=set)

    def add(self, ttft_ms: float, step_ms: list[float]) -> None:
        self.decode_ms += sum(step_ms)
        self.decode_tokens += len(step_ms)
        self.total_ms += ttft_ms + sum(step_ms)
        self.tokens += 1 + len(step_ms)
        self.prompts += 1

    def summary(self) -> dict:
        return {"ms_per_token": self.decode_ms / max(self.decode_tokens, 1),
                "tokens_per_second": self.tokens / (self.total_ms / 1000) if self.total_ms else float("nan"),
                "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
                "mean_accepted_length": ((self.accepted + self.verify_steps) / self.verify_steps
                                         if self.verify_steps else None),
                "identical_to_plain": f"{self.identical}/{self.compared}" if self.compared else None,
                "tokens": self.tokens, "notes": sorted(self.notes)}


def genai_int8_folder(art: artifacts.Artifact) -> str:
    """onnxruntime-genai's int8 build of the artifact's source model (as `runtime.bench --genai int8` makes it)."""
    result = subprocess.run([sys.executable, "-m", "export.genai_baseline", str(art.path), "--precision", "int8"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise LmforgeError((result.stderr.strip().splitlines() or ["onnxruntime-genai's builder failed"])[-1]
                           .removeprefix("error: "), exit_code=result.returncode)
    return result.stdout.strip().splitlines()[-1]


@dataclass
class Runner:
    """One way of decoding the prompts: a session, and a speculator (None: plain decoding)."""

    session: Any
    speculator: Any = None
    plain: str = PLAIN  # the plain runner whose output a speculative one must equal


def runners_of(session, speculators: dict, suffix: str = "") -> dict[str, Runner]:
    """Plain decoding and each speculator on `session`; with a suffix, every name gets it (a second session)."""
    plain = PLAIN + suffix
    return {plain: Runner(session, plain=plain)} | {name + suffix: Runner(session, speculator, plain)
                                                    for name, speculator in speculators.items()}


def measure_set(codec, prompts: list[str], runners: dict[str, Runner], genai: str | None, gen_len: int,
                threads: int, label: str) -> dict:
    """Every runner (PLAIN first among them) and onnxruntime-genai on every prompt, alternated."""
    tallies = {name: Tally() for name in [*runners, *([GENAI] if genai else [])]}
    for index, text in enumerate(track(prompts, f"[speculative] {label}: {len(prompts)} prompts")):
        ids = codec.encode(codec.render_chat([{"role": "user", "content": text}]) if codec.chat_template else text)
        plain = generate(runners[PLAIN].session, ids, GenerationConfig(max_new_tokens=gen_len))
        tallies[PLAIN].add(plain.report.ttft_ms, plain.report.step_ms)
        outputs = {PLAIN: plain.tokens[0]}
        length = len(plain.tokens[0])  # every other runner makes exactly these many tokens
        fixed = GenerationConfig(max_new_tokens=length, stop_token_ids=())
        others = [name for name in tallies if name != PLAIN]
        shift = index % len(others)  # rotate the order, so no runner always runs right after another
        for name in others[shift:] + others[:shift]:
            if name == GENAI:
                tallies[name].add(*genai_loop(genai, ids, length, threads)())
                continue
            runner = runners[name]
            result = generate(runner.session, ids, fixed, speculator=runner.speculator)
            outputs[name] = result.tokens[0]
            report, tally = result.report, tallies[name]
            tally.add(report.ttft_ms, report.step_ms)
            tally.drafted += report.drafted_tokens
            tally.accepted += report.accepted_tokens
            tally.verify_steps += report.verify_steps
            if report.speculation_note:
                tally.notes.add(report.speculation_note)
        for name, runner in runners.items():  # after all ran: an exact runner's plain may run after it
            if runner.speculator is not None:
                tallies[name].identical += outputs[name] == outputs[runner.plain]
                tallies[name].compared += 1
    summaries = {name: tally.summary() for name, tally in tallies.items()}
    plains = {name: runner.plain for name, runner in runners.items()}
    return {"prompts": len(prompts), "runners": summaries, "ratios": ratios(summaries, plains)}


def ratios(runners: dict, plains: dict[str, str] | None = None) -> dict:
    """ms per output token of each runner against no speculation, against onnxruntime-genai, and where its own
    plain runner is another (`plains`: name -> that runner), against that one too."""
    out = {}
    for name, figures in runners.items():
        if name in (PLAIN, GENAI):
            continue
        for baseline in dict.fromkeys([PLAIN, (plains or {}).get(name, PLAIN), GENAI]):
            if baseline in runners and baseline != name:
                out[f"{name} / {baseline}"] = figures["ms_per_token"] / runners[baseline]["ms_per_token"]
    if GENAI in runners:
        out[f"{PLAIN} / {GENAI}"] = runners[PLAIN]["ms_per_token"] / runners[GENAI]["ms_per_token"]
    return out


def table(report: dict) -> str:
    lines = []
    for label, data in report["sets"].items():
        lines.append(f"{label} ({data['prompts']} prompts)")
        rows = [("runner", "ms/token", "tok/s", "acceptance", "tok/verify", "same output")]
        for name, s in data["runners"].items():
            rows.append((name, f"{s['ms_per_token']:.2f}", f"{s['tokens_per_second']:.1f}",
                         "-" if s["acceptance_rate"] is None else f"{100 * s['acceptance_rate']:.0f}%",
                         "-" if s["mean_accepted_length"] is None else f"{s['mean_accepted_length']:.2f}",
                         s["identical_to_plain"] or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                  for r in rows]
        lines += [f"  {name}: {value:.2f}" for name, value in data["ratios"].items()]
        for notes in (s["notes"] for s in data["runners"].values() if s["notes"]):
            lines += [f"  note: {note}" for note in notes]
    return "\n".join(lines)


def open_speculators(art: artifacts.Artifact, draft: str | None, options: SessionOptions) -> dict:
    """Prompt lookup, and the draft model where one is given."""
    speculators = {NGRAM: open_speculator("ngram", None, art, options)}
    if draft:
        speculators[DRAFT] = open_speculator("draft", draft, art, options)
    return speculators


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.bench_speculative", description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--gen-len", type=int, default=128, help="most tokens per answer (stop tokens end it)")
    parser.add_argument("--sets", default="grounded,chat", help="prompt sets to run: grounded, chat")
    parser.add_argument("--limit", type=int, default=0, help="first N prompts of each set only (0: all)")
    parser.add_argument("--draft", default=None, metavar="ARTIFACT", help="also speculate with this draft model")
    parser.add_argument("--genai", action="store_true", help="also run onnxruntime-genai's int8 model")
    parser.add_argument("--exact-speculation", action="store_true",
                        help="also run plain decoding and each speculator on a second session of the engine opened "
                             "with SessionOptions(exact_speculation=True), compared with each other")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", default="bench_speculative.json", help="where to write the full report")
    args = parser.parse_args(argv)
    speculators = {}
    try:
        sets = [name.strip() for name in args.sets.split(",") if name.strip()]
        unknown = [name for name in sets if name not in PROMPT_SETS]
        if unknown or not sets or args.gen_len < 2:
            raise LmforgeError(f"need --sets from {', '.join(PROMPT_SETS)} (got {args.sets!r}) and --gen-len >= 2")
        art = artifacts.load(args.artifact)
        options = SessionOptions(threads=args.threads)
        genai = genai_int8_folder(art) if args.genai else None
        with contextlib.ExitStack() as sessions:
            session = sessions.enter_context(runtime.open(art, options))
            speculators = open_speculators(art, args.draft, options)
            runners = runners_of(session, speculators)
            if args.exact_speculation:
                exact = sessions.enter_context(runtime.open(art, replace(options, exact_speculation=True)))
                exact_speculators = open_speculators(art, args.draft, options)
                speculators |= {name + EXACT: speculator for name, speculator in exact_speculators.items()}
                runners |= runners_of(exact, exact_speculators, EXACT)
            codec = load_codec(art)
            report = {"artifact": str(art.path), "engine_id": art.id, "threads": args.threads,
                      "gen_len": args.gen_len, "exact_speculation": args.exact_speculation, "sets": {}}
            for name in sets:
                prompts = PROMPT_SETS[name]()[: args.limit or None]
                report["sets"][name] = measure_set(codec, prompts, runners, genai, args.gen_len, args.threads, name)
    except LmforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        for speculator in speculators.values():
            speculator.close()
    publish(table(report), report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
