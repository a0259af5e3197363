"""onnxruntime-genai baseline for `python -m runtime.bench --genai PRECISIONS`: onnxruntime-genai's own model
builder run on the weights an artifact was exported from (the unpruned source model), cached. It runs in its
own process because the builder needs torch and the runtime never imports it.
`python -m export.genai_baseline ARTIFACT --precision int8` prints the built model's folder; with `--evaluate`,
also its perplexity and top-1 agreement against the fp32 export on the build's held-out windows (the ones every
engine is verified on), so latency is compared at known accuracy."""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

from export.models import cache_dir, resolve
from export.torch_baseline import export_ancestor, source_model
from runtime import artifact as artifacts
from runtime.errors import EXIT_BACKEND_UNAVAILABLE, BadInputError, LmforgeError

# The builder's precisions: fp32; int8 and int4 are MatMulNBits weights (blocks of 32, int8 compute).
PRECISIONS = ("fp32", "int8", "int4")


def genai_version() -> str:
    try:
        import onnxruntime_genai
    except ImportError as exc:
        raise LmforgeError("onnxruntime-genai is not installed; `pip install onnxruntime-genai` to compare against "
                           "it", exit_code=EXIT_BACKEND_UNAVAILABLE) from exc
    return onnxruntime_genai.__version__


def build(art: artifacts.Artifact, precision: str) -> Path:
    """The genai model folder for the artifact's source model at `precision`, built once and cached."""
    if precision not in PRECISIONS:
        raise BadInputError(f"onnxruntime-genai precision {precision!r} unknown; choose one of {', '.join(PRECISIONS)}")
    source = resolve(source_model(art))
    weights = str(Path(source.location) / source.gguf_file) if source.gguf_file else source.location
    key = hashlib.sha256(f"{source.fingerprint}|{precision}|{genai_version()}".encode()).hexdigest()[:12]
    folder = cache_dir() / "genai" / f"{source.spec.replace('/', '_')}-{precision}-{key}"
    if (folder / "genai_config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    artifacts.remove_stale_temporaries(folder.parent)  # the output of a killed earlier build
    with artifacts.working_folder(folder.parent, folder.name, prefix=artifacts.TEMP_PREFIX) as work:
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", weights, "-o", str(work / "model"),
                   "-p", precision, "-e", "cpu", "-c", str(work / "hf-cache")]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise LmforgeError(f"onnxruntime-genai's builder failed on {weights}: "
                               f"{(result.stderr.strip().splitlines() or ['no message'])[-1]}")
        (work / "model").rename(folder)  # complete, or not there at all
    return folder


def evaluate(model_dir: Path, art: artifacts.Artifact, threads: int) -> dict:
    """Perplexity change and top-1 agreement of the genai model against the fp32 export, on the held-out
    windows of the default calibration data (prefill from an empty cache through its own ONNX graph)."""
    import json

    import numpy as np

    from export.graph.data import DataConfig, verification_windows
    from runtime import accuracy
    from runtime.baselines import plain_session

    export = export_ancestor(art)
    windows = verification_windows(export, DataConfig())
    reference = accuracy.evaluate_model(export.file(artifacts.MODEL_FILE), export.model_facts, windows, threads)
    decoder = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    session = plain_session(model_dir / decoder["filename"], threads)
    empty = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)
    cache = {decoder["inputs"][f"past_{kind}_names"] % i: empty
             for i in range(decoder["num_hidden_layers"]) for kind in ("key", "value")}

    def logits_of(window: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": window[None], "attention_mask": np.ones((1, len(window)), np.int64)} | cache
        return session.run(["logits"], feeds)[0][0]

    evaluation = accuracy.evaluate(logits_of, windows)
    return {"perplexity_fp32": reference.perplexity, "perplexity": evaluation.perplexity,
            "perplexity_increase_percent": evaluation.increase_over(reference),
            "top1_agreement": evaluation.agreement(reference), "windows": len(windows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.genai_baseline")
    parser.add_argument("artifact")
    parser.add_argument("--precision", default="fp32", help=f"one of {', '.join(PRECISIONS)}")
    parser.add_argument("--evaluate", action="store_true", help="also print its accuracy against the fp32 export")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        art = artifacts.load(args.artifact, verify=False)
        folder = build(art, args.precision)
        if args.evaluate:
            figures = evaluate(folder, art, args.threads)
            print(f"onnxruntime-genai {args.precision}: perplexity {figures['perplexity']:.3f} "
                  f"({figures['perplexity_increase_percent']:+.2f}% over fp32 {figures['perplexity_fp32']:.3f}), "
                  f"top-1 agreement {figures['top1_agreement']:.3f} on {figures['windows']} held-out windows",
                  file=sys.stderr)
        print(folder)
    except LmforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
