"""The `trt` backend: a Session over TensorRT's runtime with device memory, a stream and events from
cuda-python's runtime bindings (no torch). Two KV buffer sets at the plan's maximum size are swapped every
step (present of step n is past of step n+1; a Concat-style graph must never read and write one buffer).

Every size comes from the plan itself (profile limits, KV heads, head size, vocabulary), and every input is
checked against the plan's profile limits before anything is copied to the GPU, so no call can write past a
device buffer. docs/tensorrt.md has the TensorRT facts it relies on; every TensorRT call that reports failure
by returning False or None is checked.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from runtime import artifact as artifacts
from runtime.errors import ArtifactError, BadInputError, LmforgeError
from runtime.session import (
    CacheState,
    SessionClosedError,
    SessionOptions,
    check_prompt,
    decode_step,
    prefill_state,
)

PLAN_FILE = "model.plan"
PREFILL_PROFILE, DECODE_PROFILE = 0, 1
STEP_INPUTS = ("input_ids", "attention_mask", "position_ids")
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."


def import_cudart():
    """cuda-python's runtime API module under the name that works on 12.x and 13.x."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise LmforgeError("the trt backend needs cuda-python (pip install 'lmforge[gpu]')", exit_code=4) from None
    return cudart


def cuda_call(result):
    """Unwrap cuda-python's (cudaError_t, value...) tuples, raising on an error code."""
    cudart = import_cudart()
    err, *rest = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise LmforgeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else (tuple(rest) or None)


def native_handle(obj) -> int:
    """A stream/event as the integer TensorRT takes (`int()` is deprecated from cuda-bindings 13)."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    return get_cuda_native_handle(obj)


def compatibility_keys(trt, version_compatible: bool) -> dict:
    """What decides whether a plan may run on a machine: TensorRT version, GPU name and compute capability."""
    cudart = import_cudart()
    device = cuda_call(cudart.cudaGetDevice())
    properties = cuda_call(cudart.cudaGetDeviceProperties(device))
    name = properties.name.decode() if isinstance(properties.name, bytes) else str(properties.name)
    return {"tensorrt": trt.__version__, "gpu": name.rstrip("\x00"),
            "compute_capability": f"{properties.major}.{properties.minor}", "version_compatible": version_compatible}


# (built major, running major) pairs that TensorRT documents for version-compatible plans across a major
# version: 8 -> 9 and 8 or 9 -> 10 (10.16 "Version Compatibility"), 10 -> 11 (11.1 "Engine Compatibility"; the
# 11.4 support matrix: "No other combination across major versions is supported", e.g. 8 -> 11).
CROSS_MAJOR_VERSION_COMPATIBLE = {(8, 9), (8, 10), (9, 10), (10, 11)}
# Version compatibility exists from 8.6 on, for the building and the running version alike.
FIRST_VERSION_COMPATIBLE = (8, 6)


def runs_here(built: tuple[int, ...], running: tuple[int, ...], version_compatible: bool) -> bool:
    """Whether TensorRT `running` can load a plan built by TensorRT `built`: the very same version, or, for a
    version-compatible plan, a later one within the major version or across a documented major pair."""
    if built == running:
        return True
    if not version_compatible or built[:2] < FIRST_VERSION_COMPATIBLE or built > running:
        return False
    return built[0] == running[0] or (built[0], running[0]) in CROSS_MAJOR_VERSION_COMPATIBLE


def check_compatible(artifact: artifacts.Artifact, trt) -> None:
    keys = artifact.metrics.get("compatibility") or {}
    here = compatibility_keys(trt, keys.get("version_compatible", False))
    problems = []
    built, running = _version(keys.get("tensorrt")), _version(here["tensorrt"])
    if not runs_here(built, running, bool(keys.get("version_compatible"))):
        problems.append(f"built with TensorRT {keys.get('tensorrt')}, this machine has {here['tensorrt']}")
    if keys.get("gpu") != here["gpu"] or keys.get("compute_capability") != here["compute_capability"]:
        problems.append(f"built for {keys.get('gpu')} (sm {keys.get('compute_capability')}), this GPU is "
                        f"{here['gpu']} (sm {here['compute_capability']})")
    if problems:
        raise BadInputError(f"{artifact.path}: the plan does not fit this machine: {'; '.join(problems)}; "
                            "rebuild it here with `python -m export.build --backend trt`")


def _version(text: str | None) -> tuple[int, ...]:
    """'10.16.1.11' -> (10, 16, 1, 11): versions compare by number, not as text ('10.9' < '10.16')."""
    return tuple(int(part) for part in (text or "0").split(".") if part.isdigit())


@dataclass(frozen=True)
class ProfileLimits:
    """The largest batch and sequence each of the plan's two profiles accepts, read from the plan (not the
    manifest) because the plan's profiles are what TensorRT enforces and what the buffers are sized for."""

    prefill_batch: int
    prefill_tokens: int  # the longest prompt
    decode_batch: int
    decode_total: int  # the longest past + 1 of a decode step

    @classmethod
    def of(cls, engine) -> ProfileLimits:
        if engine.num_optimization_profiles < 2:
            raise ArtifactError(f"the plan has {engine.num_optimization_profiles} optimization profile(s), the "
                                "trt backend needs prefill and decode; rebuild it with `python -m export.build "
                                "--backend trt`")
        prefill_batch, prefill_tokens = engine.get_tensor_profile_shape("input_ids", PREFILL_PROFILE)[2]
        decode_batch, decode_total = engine.get_tensor_profile_shape("attention_mask", DECODE_PROFILE)[2]
        return cls(int(prefill_batch), int(prefill_tokens), int(decode_batch), int(decode_total))

    @property
    def batch_capacity(self) -> int:
        return max(self.prefill_batch, self.decode_batch)

    @property
    def total_capacity(self) -> int:
        """Longest cache any step reads or writes: a full-length prompt's present, or a decode step's."""
        return max(self.prefill_tokens, self.decode_total)

    def check_prefill(self, batch: int, tokens: int) -> None:
        if batch > self.prefill_batch:
            raise BadInputError(f"a batch of {batch} exceeds the plan's --max-batch {self.prefill_batch}; send "
                                "fewer sequences or rebuild with a larger --max-batch")
        if tokens > self.prefill_tokens:
            raise BadInputError(f"a prompt of {tokens} tokens exceeds the plan's --max-seq {self.prefill_tokens}; "
                                "shorten it or rebuild with a larger --max-seq")

    def check_decode(self, batch: int, total: int) -> None:
        if batch > self.decode_batch:
            raise BadInputError(f"a batch of {batch} exceeds the plan's --max-batch {self.decode_batch}; rebuild "
                                "with a larger --max-batch")
        if total > self.decode_total:
            raise BadInputError(f"this decode step would hold {total} tokens, past the plan's --max-seq "
                                f"{self.decode_total}; generate fewer tokens or rebuild with a larger --max-seq")


@dataclass(frozen=True)
class KvTensor:
    """One cache input and its output, with the sizes the plan gives it (its graph's static dimensions)."""

    past: str
    present: str
    heads: int
    head_dim: int
    itemsize: int


def kv_tensors(engine, names: list[str], itemsize: dict[str, int]) -> list[KvTensor]:
    """The plan's cache tensors in its own order, each with its KV heads and head size read from its shape
    [batch, heads, past, head_dim]: pruning may leave layers with different head counts, and nothing ties the
    manifest's per-layer list to the plan's tensor order."""
    tensors = []
    for past in (n for n in names if n.startswith(PAST_PREFIX)):
        _, heads, _, head_dim = engine.get_tensor_shape(past)
        present = PRESENT_PREFIX + past[len(PAST_PREFIX):]
        if present not in itemsize:
            raise ArtifactError(f"the plan has {past} but no {present}; rebuild it from the ONNX contract")
        tensors.append(KvTensor(past, present, int(heads), int(head_dim), max(itemsize[past], itemsize[present])))
    return tensors


class TrtSession:
    backend = "trt"

    def __init__(self, artifact: artifacts.Artifact, options: SessionOptions):
        if options.profile:
            raise BadInputError("SessionOptions(profile=...) is ONNX Runtime's profiler; TensorRT engines are "
                                "profiled with `trtexec --dumpProfile` or Nsight Systems")
        if options.exact_speculation:
            raise BadInputError("SessionOptions(exact_speculation=True) needs a fused CPU engine of the `ort` "
                                "backend; TensorRT engines copy their cache and decode without speculation")
        import tensorrt as trt

        self._trt, self._cudart = trt, import_cudart()
        self.artifact, self.facts, self.options = artifact, artifact.model_facts, options
        self.engine = self.context = self.stream = None
        self._events: list = []
        self._buffers: list[int] = []
        self._state: CacheState | None = None
        self._active_profile: int | None = None
        self.last_step_ms = 0.0
        try:
            self._open()
        except BaseException:
            self._release()  # a half-made session would otherwise leak its device memory, stream and events
            raise

    def _open(self) -> None:
        trt, cudart, artifact = self._trt, self._cudart, self.artifact
        check_compatible(artifact, trt)
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        if artifact.metrics.get("compatibility", {}).get("version_compatible"):
            runtime.engine_host_code_allowed = True  # the lean runtime inside a version-compatible plan is code
        self.engine = runtime.deserialize_cuda_engine(artifact.file(PLAN_FILE).read_bytes())
        if self.engine is None:
            raise ArtifactError(f"{artifact.path}: TensorRT could not load the plan (corrupt, or built for another "
                                "version); rebuild it with `python -m export.build --backend trt`")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise LmforgeError("TensorRT could not create an execution context (most often: not enough GPU memory "
                               "for the plan's activations); its log above says why")
        self.stream = cuda_call(cudart.cudaStreamCreate())
        self._events = [cuda_call(cudart.cudaEventCreate()) for _ in range(2)]
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._limits = ProfileLimits.of(self.engine)
        self._kv = kv_tensors(self.engine, names, {n: d.itemsize for n, d in self._dtypes.items()})
        self._vocab = int(self.engine.get_tensor_shape("logits")[-1])
        if self._vocab < 1:
            raise ArtifactError("the plan's logits have no static vocabulary dimension; re-export the model")
        self._allocate()

    # -- memory -----------------------------------------------------------------------------------------------

    def _allocate(self) -> None:
        """Every buffer once, at the largest size the plan's profiles allow (checked before each copy)."""
        batch, total = self._limits.batch_capacity, self._limits.total_capacity
        self._capacity = {n: batch * total * self._dtypes[n].itemsize for n in STEP_INPUTS}
        self._capacity["logits"] = batch * self._limits.prefill_tokens * self._vocab * self._dtypes["logits"].itemsize
        self._step_buffers = {n: self._malloc(size) for n, size in self._capacity.items()}
        # ping-pong: [past set, present set], one buffer per cache tensor in each
        self._kv_sets = [[self._malloc(batch * t.heads * total * t.head_dim * t.itemsize) for t in self._kv]
                         for _ in range(2)]

    def _malloc(self, nbytes: int) -> int:
        pointer = cuda_call(self._cudart.cudaMalloc(max(nbytes, 256)))  # never 0 bytes: even P=0 needs an address
        self._buffers.append(pointer)
        return pointer

    def _copy_in(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self._dtypes[name])
        if array.nbytes > self._capacity[name]:  # the profile checks make this unreachable; a copy must never be
            raise LmforgeError(f"{name} of {array.nbytes} bytes exceeds its {self._capacity[name]}-byte buffer")
        cuda_call(self._cudart.cudaMemcpyAsync(self._step_buffers[name], array.ctypes.data, array.nbytes,
                                               self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        self._keep_alive.append(array)  # the copy is asynchronous: the host array must live until the sync

    def _release(self) -> None:
        """Free everything this session holds; safe on a half-made session and when called twice. Best effort:
        an error from one call (a sticky CUDA error after a failed step) must not keep the rest from being freed."""
        cudart = self._cudart
        if self.stream is not None:
            cudart.cudaStreamSynchronize(self.stream)  # queued copies and kernels may still use these buffers
        for event in self._events:
            cudart.cudaEventDestroy(event)
        self._events = []
        for pointer in self._buffers:
            cudart.cudaFree(pointer)
        self._buffers = []
        if self.stream is not None:
            cudart.cudaStreamDestroy(self.stream)
        self.stream = None
        self.context = None  # the context before the engine it came from
        self.engine = None

    # -- one step ---------------------------------------------------------------------------------------------

    def _select_profile(self, profile: int) -> None:
        """Switch only on change: a switch costs a resource update in the next enqueue. The binding raises
        RuntimeError when TensorRT refuses (it never returns False)."""
        if profile == self._active_profile:
            return
        try:
            self.context.set_optimization_profile_async(profile, native_handle(self.stream))
        except RuntimeError as exc:
            raise LmforgeError(f"TensorRT refused optimization profile {profile}: {exc}") from None
        self._active_profile = profile

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past_length: int) -> np.ndarray:
        """One step; the caller has checked the shapes against the plan's profile limits."""
        self._keep_alive: list[np.ndarray] = []
        try:
            return self._enqueue_and_wait(ids, mask, positions, past_length)
        except BaseException:
            # Copies may still be queued from host arrays about to be dropped; the next step must not overlap.
            self._cudart.cudaStreamSynchronize(self.stream)
            raise

    def _enqueue_and_wait(self, ids, mask, positions, past_length: int) -> np.ndarray:
        cudart, context = self._cudart, self.context
        self._select_profile(PREFILL_PROFILE if past_length == 0 else DECODE_PROFILE)
        for name, array in (("input_ids", ids), ("attention_mask", mask), ("position_ids", positions)):
            self._copy_in(name, array)
            self._bind(name, self._step_buffers[name], array.shape)
        batch = ids.shape[0]
        past_set, present_set = self._kv_sets
        for tensor, past, present in zip(self._kv, past_set, present_set):
            self._bind(tensor.past, past, (batch, tensor.heads, past_length, tensor.head_dim))
            if not context.set_tensor_address(tensor.present, present):
                raise LmforgeError(f"TensorRT refused the address of {tensor.present}")
        if not context.set_tensor_address("logits", self._step_buffers["logits"]):
            raise LmforgeError("TensorRT refused the address of logits")
        start, end = self._events
        cuda_call(cudart.cudaEventRecord(start, self.stream))
        if not context.execute_async_v3(native_handle(self.stream)):
            raise LmforgeError("TensorRT execution failed; its log above says why")
        cuda_call(cudart.cudaEventRecord(end, self.stream))
        shape = tuple(context.get_tensor_shape("logits"))
        logits = np.empty(shape, self._dtypes["logits"])
        cuda_call(cudart.cudaMemcpyAsync(logits.ctypes.data, self._step_buffers["logits"], logits.nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        cuda_call(cudart.cudaStreamSynchronize(self.stream))
        self.last_step_ms = cuda_call(cudart.cudaEventElapsedTime(start, end))
        self._kv_sets.reverse()  # this step's present is the next step's past; nothing is copied
        return logits.astype(np.float32, copy=False)

    def _bind(self, name: str, pointer: int, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, shape):
            raise BadInputError(f"{name} shape {shape} is outside the plan's active profile; rebuild with larger "
                                "--max-batch / --max-seq")
        if not self.context.set_tensor_address(name, pointer):
            raise LmforgeError(f"TensorRT refused the address of {name}")

    # -- the Session protocol -----------------------------------------------------------------------------

    def prefill(self, input_ids, attention_mask=None, last_only: bool = False) -> np.ndarray:
        self._check_open()  # a plan from the fp16 / Q/DQ ONNX has no logits_to_keep: every position comes back
        ids, mask = check_prompt(input_ids, attention_mask, self.facts)
        self._limits.check_prefill(*ids.shape)
        state, positions = prefill_state(mask)
        logits = self._run(ids, mask, positions, past_length=0)
        self._state = state  # only now: a failed step leaves the previous cache, still in the past set, usable
        return logits

    def decode(self, tokens) -> np.ndarray:
        self._check_open()
        if self._state is None:
            raise BadInputError("decode called before prefill; call prefill(prompt) first")
        past_length = self._state.length
        self._limits.check_decode(self._state.mask.shape[0], past_length + 1)
        # decode_step advances the state it is given; advance a copy and keep it only if the step ran, so a
        # refused step leaves the session where it was.
        state = replace(self._state)
        ids, mask, positions = decode_step(state, tokens, self.facts)
        logits = self._run(ids, mask, positions, past_length=past_length)
        self._state = state
        return logits

    def reset(self) -> None:
        self._check_open()
        self._state = None

    def close(self) -> None:
        self._release()

    def _check_open(self) -> None:
        if self.engine is None:
            raise SessionClosedError("the session is closed; open a new one with runtime.open(artifact)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
