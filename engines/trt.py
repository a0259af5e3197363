"""The TensorRT engine (10.x and 11.x): a strongly typed network from the fp16 or Q/DQ ONNX, optimization
profiles derived from the manifest's I/O, a timing cache kept across builds, progress, and a serialized plan
with the keys that decide where it may run. Written against ../shared/docs/tensorrt-notes.md; TensorRT is
imported only when a plan is built or loaded, so everything else runs (and is tested) without it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runtime.artifact import Artifact, ArtifactWriter
from runtime.errors import EXIT_BACKEND_UNAVAILABLE, BadInputError, LmforgeError
from runtime.trt_session import PLAN_FILE, compatibility_keys, import_cudart

STAGE = "engine"
MODEL_FILE = "model.onnx"
STEP_INPUTS = ("input_ids", "position_ids")


@dataclass(frozen=True)
class TrtConfig:
    # The largest batch and total sequence (past + new) the plan accepts, and the prefill length it is tuned
    # for; the KV cache buffers are sized from these.
    max_batch: int = 1
    max_seq: int = 2048
    opt_seq: int = 128
    # Builder scratch memory, in GiB.
    workspace_gb: float = 4.0
    # Where the timing cache lives between builds (kernel timings, the slow part of a build).
    timing_cache: str = str(Path.home() / ".cache" / "lmforge" / "trt-timing.cache")
    # Run on later TensorRT versions (lean runtime inside the plan; a little slower).
    version_compatible: bool = False


def stage_config(config: TrtConfig) -> dict[str, Any]:
    return {"backend": "trt"} | {k: v for k, v in asdict(config).items() if k != "timing_cache"}


Shape = tuple[int, ...]


# TensorRT takes weight-only quantization in int4 blocks only; int8-weight-only's int8 blocks are ONNX Runtime's.
PRECISIONS = ("fp32", "fp16", "int8", "int4")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise BadInputError(f"TensorRT has no {precision} (it takes weight-only blocks in int4 only); build "
                            f"{', '.join(PRECISIONS)} for --backend trt, or {precision} with --backend ort")


def validate(config: TrtConfig) -> None:
    if not 1 <= config.opt_seq <= config.max_seq or config.max_batch < 1:
        raise BadInputError(f"profile sizes must satisfy 1 <= --opt-seq ({config.opt_seq}) <= --max-seq "
                            f"({config.max_seq}) and --max-batch >= 1 ({config.max_batch}); the max is below the opt")
    if config.workspace_gb <= 0:
        raise BadInputError(f"--workspace-gb {config.workspace_gb}: give a positive size, e.g. 4")


def profiles(io: dict[str, Any], config: TrtConfig) -> list[dict[str, tuple[Shape, Shape, Shape]]]:
    """Two optimization profiles over the ONNX contract: prefill (past 0, up to the whole context) and decode
    (one new token, any past). Every dynamic input gets (min, opt, max); a past length of 0 is allowed."""
    validate(config)
    facts = io["model"]
    if facts.get("max_context") and config.max_seq > facts["max_context"]:
        raise BadInputError(f"--max-seq {config.max_seq} exceeds the model's context of {facts['max_context']}")
    batch, total, opt = config.max_batch, config.max_seq, config.opt_seq
    prefill: dict[str, tuple[Shape, Shape, Shape]] = {}
    decode: dict[str, tuple[Shape, Shape, Shape]] = {}
    for entry in io["inputs"]:
        name, shape = entry["name"], entry["shape"]
        if name in STEP_INPUTS:
            prefill[name] = ((1, 1), (batch, opt), (batch, total))
            decode[name] = ((1, 1), (batch, 1), (batch, 1))
        elif name == "attention_mask":
            prefill[name] = ((1, 1), (batch, opt), (batch, total))
            decode[name] = ((1, 2), (batch, opt + 1), (batch, total))
        elif name.startswith("past_key_values."):
            heads, head_dim = shape[1], shape[3]
            prefill[name] = ((1, heads, 0, head_dim),) * 2 + ((batch, heads, 0, head_dim),)
            decode[name] = ((1, heads, 1, head_dim), (batch, heads, opt, head_dim), (batch, heads, total - 1, head_dim))
        else:
            raise BadInputError(f"input {name!r} is not part of the ONNX contract; re-export the model")
    return [prefill, decode]


def require_tensorrt():
    """The tensorrt module, or an exit-4 error saying what is missing (the package, or a GPU)."""
    try:
        import tensorrt as trt
    except ImportError:
        raise LmforgeError("--backend trt needs the tensorrt package (NVIDIA's index: see the README's GPU "
                           "section)", exit_code=EXIT_BACKEND_UNAVAILABLE) from None
    cudart = import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or not count:
        raise LmforgeError("--backend trt needs an NVIDIA GPU, and CUDA reports none",
                           exit_code=EXIT_BACKEND_UNAVAILABLE)
    return trt


def parse(trt, logger, onnx_path: Path):
    builder = trt.Builder(logger)
    # Strong typing: precision comes from the ONNX (Q/DQ, fp16 tensors). Required on 10.x for explicit
    # precision, ignored on 11.x where it is always on; its bit moved between versions, so compute it.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        rejected = sorted({f"{e.node_name()} ({e.node_operator()})" for e in errors if e.node_name()})
        first = errors[0].desc() if errors else "unknown parser error"
        raise BadInputError(f"TensorRT cannot parse {onnx_path.name}: {first}"
                            + (f"; rejected nodes: {', '.join(rejected[:8])}" if rejected else ""))
    return builder, network, parser


def progress_monitor(trt):
    """Builder progress on stderr (TensorRT's IProgressMonitor), one line per finished phase."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.started: dict[str, float] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.started[phase_name] = time.perf_counter()

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            seconds = time.perf_counter() - self.started.pop(phase_name, time.perf_counter())
            print(f"[engine] TensorRT {phase_name} {seconds:.1f}s", file=sys.stderr, flush=True)

    return Monitor()


def build_plan(trt, onnx_path: Path, io: dict, config: TrtConfig, destination: Path) -> dict[str, Any]:
    logger = trt.Logger(trt.Logger.WARNING)
    builder, network, _parser = parse(trt, logger, onnx_path)  # the parser must outlive the network's build
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gb * 2**30))
    builder_config.progress_monitor = progress_monitor(trt)
    if config.version_compatible:
        builder_config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    cache_path = Path(config.timing_cache)
    cache = builder_config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    builder_config.set_timing_cache(cache, False)
    for shapes in profiles(io, config):
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        builder_config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, builder_config)
    if plan is None:
        raise LmforgeError("TensorRT could not build the engine; its log above names the layer")
    with open(destination, "wb") as f:
        f.write(plan)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_bytes(bytes(builder_config.get_timing_cache().serialize()))
    return compatibility_keys(trt, config.version_compatible)


def run(parent: Artifact, writer: ArtifactWriter, config: TrtConfig, verify=None, progress=print) -> Artifact:
    trt = require_tensorrt()
    started = time.perf_counter()
    progress(f"[engine] TensorRT {trt.__version__}: strongly typed network from {parent.path.name}")
    keys = build_plan(trt, parent.file(MODEL_FILE), parent.io, config, writer.dir / PLAN_FILE)
    writer.copy_text_files(parent)
    precision = parent.manifest.get("precision", "fp32")
    metrics = {"compatibility": keys, "profiles": [{k: list(map(list, v)) for k, v in p.items()}
                                                   for p in profiles(parent.io, config)],
               "build_seconds": round(time.perf_counter() - started, 1)}
    if verify is not None:
        metrics["verification"] = verify(writer.provisional(parent.io, precision=precision, backend="trt",
                                                            metrics={"compatibility": keys}))
    return writer.commit(io=parent.io, metrics=metrics, precision=precision, backend="trt")
