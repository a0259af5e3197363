"""PyTorch eager baseline for `python -m runtime.bench --baselines`: transformers' `generate` on the model an
artifact was exported from, timed per token. It runs in its own process because the runtime never imports
torch: `python -m export.torch_baseline ARTIFACT PROMPT_JSON --gen-len N --runs R [--threads T]` prints JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time

from export.models import load_model, resolve
from runtime import artifact as artifacts
from runtime.errors import BadInputError, LmforgeError


class TokenClock:
    """A transformers streamer that records when each generated token arrives (the first `put` is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.seen_prompt = False

    def put(self, value) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def export_ancestor(art: artifacts.Artifact) -> artifacts.Artifact:
    """The export the artifact descends from, following parents through the artifact's store."""
    current = art
    while not current.manifest.get("config", {}).get("model"):
        parents = list(current.path.parent.glob(f"*-{current.manifest.get('parent')}"))
        if not current.manifest.get("parent") or not parents:
            raise BadInputError(f"artifact {art.path} does not record the model it came from, and its export is "
                                "not beside it; pass an export artifact")
        current = artifacts.load(parents[0], verify=False)
    return current


def source_model(art: artifacts.Artifact) -> str:
    """The model the artifact's export came from."""
    return export_ancestor(art).manifest["config"]["model"]


def measure(model, prompt: list[int], gen_len: int) -> dict:
    import torch

    ids = torch.tensor([prompt])
    clock = TokenClock()
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_len, min_new_tokens=gen_len,
                       do_sample=False, streamer=clock, pad_token_id=0)
    stamps = [started, *clock.times]
    steps = [(b - a) * 1000 for a, b in zip(stamps[1:], stamps[2:])]
    return {"ttft_ms": (stamps[1] - started) * 1000, "step_ms": steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.torch_baseline")
    parser.add_argument("artifact")
    parser.add_argument("prompt_json", help="a JSON file holding the prompt's token ids")
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        art = artifacts.load(args.artifact, verify=False)
        model = load_model(resolve(source_model(art)))
        prompt = json.loads(open(args.prompt_json).read())
        warmup = measure(model, prompt, min(args.gen_len, 8))
        runs = [measure(model, prompt, args.gen_len) for _ in range(args.runs)]
    except LmforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps({"warmup": warmup, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
