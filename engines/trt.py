"""The TensorRT engine (10.x and 11.x): a strongly typed network from the fp32, fp16 or Q/DQ ONNX, two
optimization profiles derived from the manifest's I/O, a timing cache kept across builds, progress, and a
serialized plan with the keys that decide where it may run.

Polygraphy's loaders do the TensorRT calls they cover (network from ONNX, builder config with profiles, engine
bytes), so less unrun code is ours; this module adds what they leave unchecked: that TensorRT took every
profile, that it accepted the timing cache, and a cache file keyed by TensorRT version and GPU, written
atomically under a lock. docs/tensorrt.md has the TensorRT facts it relies on; TensorRT is imported only when a
plan is built or loaded, so everything else runs (and is tested) without it.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runtime.accuracy import as_metrics
from runtime.artifact import MODEL_FILE, Artifact, ArtifactWriter
from runtime.errors import EXIT_BACKEND_UNAVAILABLE, BadInputError, LmforgeError
from runtime.ranges import check_ranges, ranged
from runtime.trt_session import DECODE_PROFILE, PLAN_FILE, PREFILL_PROFILE, compatibility_keys, import_cudart

STAGE = "engine"
STEP_INPUTS = ("input_ids", "position_ids")
# The build verifies every plan on held-out windows cut to --max-seq; perplexity and the calibration data need
# at least this many tokens per window.
MIN_VERIFIED_SEQ = 8


@dataclass(frozen=True)
class TrtConfig:
    # The largest batch and total sequence (past + new) the plan accepts, and the prefill length it is tuned
    # for; the KV cache buffers are sized from these.
    max_batch: int = ranged(1, "--max-batch", low=1)
    max_seq: int = ranged(2048, "--max-seq", low=MIN_VERIFIED_SEQ)  # the build verifies on windows this long
    opt_seq: int = 128
    # Builder scratch memory, in GiB.
    workspace_gb: float = ranged(4.0, "--workspace-gb", low=0, low_open=True)
    # Folder of the timing caches (kernel timings, the slow part of a build), one file per TensorRT version and
    # GPU architecture; None: a `tensorrt` folder in the lmforge cache.
    timing_cache_dir: str | None = None
    # Run on later TensorRT versions (lean runtime inside the plan; a little slower).
    version_compatible: bool = False

    def __post_init__(self):
        check_ranges(self)
        if not 1 <= self.opt_seq <= self.max_seq:
            raise BadInputError(f"--opt-seq {self.opt_seq} is outside 1 to --max-seq ({self.max_seq}); give an "
                                "--opt-seq no longer than --max-seq")


def stage_config(config: TrtConfig) -> dict[str, Any]:
    return {"backend": "trt"} | asdict(config)


Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


# TensorRT takes weight-only quantization in int4 blocks only; int8-weight-only's int8 blocks are ONNX Runtime's.
PRECISIONS = ("fp32", "fp16", "int8", "int4", "mixed")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise BadInputError(f"TensorRT has no {precision} (it takes weight-only blocks in int4 only); build "
                            f"{', '.join(PRECISIONS)} for --backend trt, or {precision} with --backend ort")


# -- optimization profiles ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One corner (min, opt or max) of an optimization profile: rows, new tokens, and tokens already cached.
    Every input's shape is derived from one Point, so at each corner all batch dimensions agree and the mask
    covers exactly past + new: the constraints TensorRT checks an opt shape against."""

    batch: int
    new: int
    past: int

    @property
    def total(self) -> int:
        return self.past + self.new


def profile_points(max_batch: int, max_seq: int, opt_seq: int) -> list[tuple[Point, Point, Point]]:
    """(min, opt, max) of the prefill profile (empty cache, up to max_seq new tokens) and of the decode profile
    (one new token after 1 .. max_seq - 1 cached), in profile-index order. opt is clamped into [min, max] so
    that --opt-seq equal to --max-seq still gives min <= opt <= max in every dimension."""
    if max_batch < 1 or max_seq < 2:
        raise BadInputError(f"--max-batch {max_batch}, --max-seq {max_seq}: a plan needs a batch of 1 or more and "
                            "room for 2 tokens (a prompt token and a decode step)")
    prompt_opt = min(max(opt_seq, 1), max_seq)
    past_opt = min(max(opt_seq, 1), max_seq - 1)  # the step right after an opt-length prompt, inside the max
    prefill = (Point(1, 1, 0), Point(max_batch, prompt_opt, 0), Point(max_batch, max_seq, 0))
    decode = (Point(1, 1, 1), Point(max_batch, 1, past_opt), Point(max_batch, 1, max_seq - 1))
    by_index = {PREFILL_PROFILE: prefill, DECODE_PROFILE: decode}  # the runtime selects them by these indices
    return [by_index[index] for index in sorted(by_index)]


def input_shape(entry: dict[str, Any], point: Point) -> Shape:
    """An ONNX-contract input's shape at one profile corner."""
    name = entry["name"]
    if name in STEP_INPUTS:
        return (point.batch, point.new)
    if name == "attention_mask":
        return (point.batch, point.total)
    if name.startswith("past_key_values."):
        _, heads, _, head_dim = entry["shape"]  # KV heads and head size are static in the exported graph
        return (point.batch, heads, point.past, head_dim)
    raise BadInputError(f"input {name!r} is not part of the ONNX contract; re-export the model")


def profile_shapes(io: dict[str, Any], points: list[tuple[Point, Point, Point]]) -> list[Profile]:
    return [{entry["name"]: tuple(input_shape(entry, p) for p in corners) for entry in io["inputs"]}
            for corners in points]


def profiles(io: dict[str, Any], config: TrtConfig) -> list[Profile]:
    """Two optimization profiles over the ONNX contract: prefill (past 0, up to --max-seq new tokens) and
    decode (one new token, any past up to --max-seq - 1). Every input gets (min, opt, max)."""
    facts = io["model"]
    if facts.get("max_context") and config.max_seq > facts["max_context"]:
        raise BadInputError(f"--max-seq {config.max_seq} exceeds the model's context of {facts['max_context']}")
    return profile_shapes(io, profile_points(config.max_batch, config.max_seq, config.opt_seq))


# -- the timing cache ---------------------------------------------------------------------------------------


def timing_cache_dir(config: TrtConfig) -> Path:
    """--timing-cache folder, else `tensorrt` in the lmforge cache ($LMFORGE_CACHE, else $XDG_CACHE_HOME/lmforge,
    else ~/.cache/lmforge: the rule of export.models.cache_dir, which engines/ may not import)."""
    if config.timing_cache_dir:
        return Path(config.timing_cache_dir)
    if os.environ.get("LMFORGE_CACHE"):
        return Path(os.environ["LMFORGE_CACHE"]) / "tensorrt"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lmforge" / "tensorrt"


def timing_cache_file(folder: Path, tensorrt_version: str, compute_capability: str) -> Path:
    """One file per TensorRT version and GPU architecture: TensorRT refuses a cache from another device, and
    kernel timings of one version say nothing about another's kernels, so a shared file would only ever be
    thrown away and overwritten by whichever machine built last."""
    version = "".join(c if c.isalnum() or c == "." else "_" for c in tensorrt_version)
    return folder / f"timing-trt{version}-sm{compute_capability.replace('.', '')}.cache"


def read_timing_cache(path: Path) -> bytes | None:
    """The saved cache, or None when there is none. No lock is needed to read: writers replace the file
    atomically, so a reader sees the old file or the new one, never half of one."""
    try:
        return path.read_bytes() or None
    except FileNotFoundError:
        return None


def attach_timing_cache(builder_config, path: Path, progress=print) -> str:
    """Attach the saved cache when TensorRT accepts it, else a fresh one; returns which ("reused" / "fresh").
    `set_timing_cache` returns False on another device's cache, and a corrupt file gives no cache at all;
    either way the build goes on without old timings instead of failing."""
    saved = read_timing_cache(path)
    if saved is not None:
        cache = _create_timing_cache(builder_config, saved)
        if cache is not None and builder_config.set_timing_cache(cache, False):
            progress(f"[engine] timing cache: reused {path}")
            return "reused"
        progress(f"[engine] timing cache {path} is corrupt or from another device; starting a fresh one")
    cache = _create_timing_cache(builder_config, b"")
    if cache is None or not builder_config.set_timing_cache(cache, False):
        raise LmforgeError("TensorRT could not create an empty timing cache; its log above says why")
    progress(f"[engine] timing cache: fresh, saved to {path} after the build")
    return "fresh"


def _create_timing_cache(builder_config, data: bytes):
    """TensorRT's cache from bytes, or None when it cannot read them. The C++ call is noexcept and returns
    nullptr on a bad blob; the Python binding's behaviour on garbage is not documented, so a raise counts the
    same as None."""
    try:
        return builder_config.create_timing_cache(data)
    except Exception:  # any failure means: this blob is not a usable cache
        return None


def save_timing_cache(builder_config, path: Path, progress=print) -> bool:
    """Merge this build's timings with the file's (another build may have saved since ours loaded it) and
    replace the file, under Polygraphy's lock file so concurrent builds do not lose each other's timings.
    The plan is already written when this runs, so a failure here only warns: a cache is an optimization."""
    from polygraphy.util import LockFile

    cache = builder_config.get_timing_cache()
    if cache is None:
        progress("[engine] TensorRT returned no timing cache; nothing saved")
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with LockFile(str(path)):
            saved = read_timing_cache(path)
            previous = _create_timing_cache(builder_config, saved) if saved is not None else None
            if previous is not None and not cache.combine(previous, False):
                progress(f"[engine] could not merge the timings already in {path}; keeping this build's")
            write_atomically(path, bytes(cache.serialize()))
    except OSError as exc:
        progress(f"[engine] could not save the timing cache to {path}: {exc}")
        return False
    return True


def write_atomically(path: Path, data: bytes) -> None:
    """Write beside the target and rename over it: a build killed mid-write leaves the old file, never a
    truncated one that the next build would have to throw away."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# -- building -------------------------------------------------------------------------------------------------


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


def tf32_allowed(precision: str) -> bool:
    """TensorRT turns TF32 on by default, which rounds fp32 matmul inputs to 10 mantissa bits: an fp32 plan
    would then miss its own verification (max |dlogits| <= 1e-3). Lower precisions are checked on average,
    and TF32 speeds up the float parts they keep."""
    return precision != "fp32"


def create_config_options(config: TrtConfig, shapes: list[Profile], precision: str) -> dict[str, Any]:
    """Polygraphy CreateConfig's keywords that need no TensorRT to spell (so a CPU test can check them):
    TF32 by precision, the profiles in index order, version compatibility. No precision flags: the precision
    is in the ONNX, and TensorRT 11 removed those flags."""
    from polygraphy.backend.trt import Profile as PolygraphyProfile

    def profile(shape_ranges: Profile):
        built = PolygraphyProfile()
        for name, (low, opt, high) in shape_ranges.items():
            built.add(name, min=low, opt=opt, max=high)
        return built

    return {"tf32": tf32_allowed(precision), "profiles": [profile(p) for p in shapes],
            "version_compatible": config.version_compatible}


class BuilderConfigLoader:
    """Polygraphy's CreateConfig plus the checks it leaves out: it ignores `add_optimization_profile`'s -1 for a
    rejected profile (the plan would then lack the decode profile the runtime selects) and attaches a timing
    cache without looking at `set_timing_cache`'s result. Keeps the config so the cache is saved after the build."""

    def __init__(self, trt, config: TrtConfig, shapes: list[Profile], precision: str, cache_file: Path, progress):
        from polygraphy.backend.trt import CreateConfig

        self.expected_profiles, self.cache_file, self.progress = len(shapes), cache_file, progress
        self.create = CreateConfig(**create_config_options(config, shapes, precision),
                                   memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(config.workspace_gb * 2**30)},
                                   progress_monitor=progress_monitor(trt))
        self.builder_config = None

    def __call__(self, builder, network):
        builder_config = self.create(builder, network)
        check_profiles_added(builder_config, self.expected_profiles)
        attach_timing_cache(builder_config, self.cache_file, self.progress)
        self.builder_config = builder_config
        return builder_config


def check_profiles_added(builder_config, expected: int) -> None:
    if builder_config.num_optimization_profiles != expected:
        raise LmforgeError(f"TensorRT accepted {builder_config.num_optimization_profiles} of {expected} "
                           "optimization profiles; its log above names the input whose min/opt/max it rejected")


def parse_network(onnx_path: Path):
    """(builder, network, parser) of a strongly typed network: precision comes from the ONNX (Q/DQ, fp16
    tensors). Strong typing is required on 10.x for explicit precision and always on in 11.x."""
    from polygraphy.backend.trt import NetworkFromOnnxPath
    from polygraphy.exception import PolygraphyException

    try:
        return NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)()
    except PolygraphyException as exc:
        raise BadInputError(f"TensorRT cannot parse {onnx_path.name}: {exc}; the parser errors above name the "
                            "rejected nodes") from None


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


def build_plan(trt, onnx_path: Path, io: dict, config: TrtConfig, destination: Path, precision: str = "fp32",
               progress=print) -> dict[str, Any]:
    from polygraphy.backend.trt import EngineBytesFromNetwork
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    # Polygraphy prints INFO (the whole builder configuration) on stdout, which is the build's summary;
    # warnings and the parser's errors still show.
    G_LOGGER.module_severity = G_LOGGER.WARNING
    keys = compatibility_keys(trt, config.version_compatible)
    cache_file = timing_cache_file(timing_cache_dir(config), keys["tensorrt"], keys["compute_capability"])
    shapes = profiles(io, config)
    network = parse_network(onnx_path)  # builder, network and parser: the parser must outlive the build
    configure = BuilderConfigLoader(trt, config, shapes, precision, cache_file, progress)
    try:
        plan = EngineBytesFromNetwork(network, config=configure)()
    except PolygraphyException as exc:
        raise LmforgeError(f"TensorRT could not build the engine: {exc}; its log above names the layer") from None
    with open(destination, "wb") as f:
        f.write(plan)
    save_timing_cache(configure.builder_config, cache_file, progress)
    return keys


def run(parent: Artifact, writer: ArtifactWriter, config: TrtConfig, verify=None, progress=print) -> Artifact:
    trt = require_tensorrt()
    started = time.perf_counter()
    precision = parent.manifest.get("precision", "fp32")
    progress(f"[engine] TensorRT {trt.__version__}: strongly typed network from {parent.path.name}")
    keys = build_plan(trt, parent.file(MODEL_FILE), parent.io, config, writer.dir / PLAN_FILE, precision, progress)
    writer.copy_text_files(parent)
    # max_sequence: verification cuts its windows to what the plan accepts (engines/verify.py).
    limits = {"compatibility": keys, "max_sequence": config.max_seq}
    shapes = [{name: list(map(list, ranges)) for name, ranges in p.items()} for p in profiles(parent.io, config)]
    metrics = limits | {"profiles": shapes, "build_seconds": round(time.perf_counter() - started, 1)}
    if verify is not None:
        metrics["accuracy"] = as_metrics(verify(writer.provisional(parent.io, precision=precision, backend="trt",
                                                                   metrics=limits)))
    return writer.commit(io=parent.io, metrics=metrics, precision=precision, backend="trt")
