"""The `trt` backend: a Session over TensorRT's runtime with device memory, a stream and events from
cuda-python's runtime bindings (no torch). Two KV buffer sets at the plan's maximum size are swapped every
step (present of step n is past of step n+1; a Concat-style graph must never read and write one buffer).
Written against ../shared/docs/tensorrt-notes.md §3; every TensorRT call that reports failure by returning
False or None is checked.
"""

from __future__ import annotations

import numpy as np

from runtime import artifact as artifacts
from runtime.errors import ArtifactError, BadInputError, LmforgeError
from runtime.session import (
    CacheState,
    SessionClosedError,
    SessionOptions,
    cache_kv_heads,
    check_prompt,
    decode_step,
    prefill_state,
)

PLAN_FILE = "model.plan"
PREFILL_PROFILE, DECODE_PROFILE = 0, 1


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


def check_compatible(artifact: artifacts.Artifact, trt) -> None:
    keys = artifact.metrics.get("compatibility") or {}
    here = compatibility_keys(trt, keys.get("version_compatible", False))
    problems = []
    built, running = _version(keys.get("tensorrt")), _version(here["tensorrt"])
    if built != running and not (keys.get("version_compatible") and built <= running):
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


class TrtSession:
    backend = "trt"

    def __init__(self, artifact: artifacts.Artifact, options: SessionOptions):
        import tensorrt as trt

        self._trt, self._cudart = trt, import_cudart()
        self.artifact, self.facts, self.options = artifact, artifact.model_facts, options
        self._buffers: list[int] = []
        self._state: CacheState | None = None
        check_compatible(artifact, trt)
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        if artifact.metrics.get("compatibility", {}).get("version_compatible"):
            runtime.engine_host_code_allowed = True
        self.engine = runtime.deserialize_cuda_engine(artifact.file(PLAN_FILE).read_bytes())
        if self.engine is None:
            raise ArtifactError(f"{artifact.path}: TensorRT could not load the plan (corrupt, or built for another "
                                "version); rebuild it with `python -m export.build --backend trt`")
        self.context = self.engine.create_execution_context()
        self.stream = cuda_call(self._cudart.cudaStreamCreate())
        self._start, self._end = (cuda_call(self._cudart.cudaEventCreate()) for _ in range(2))
        self._names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in self._names}
        self._past = [n for n in self._names if n.startswith("past_key_values.")]
        self._past_heads = cache_kv_heads(self.facts)
        self._max = {n: tuple(self.engine.get_tensor_profile_shape(n, PREFILL_PROFILE)[2]) for n in self._names
                     if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        self._kv = [self._allocate_kv(), self._allocate_kv()]  # ping-pong: [past set, present set]
        total = max(self._max["attention_mask"][1], 1)
        batch = self._max["input_ids"][0]
        self._step_buffers = {n: self._malloc(batch * total * 8) for n in ("input_ids", "attention_mask",
                                                                            "position_ids")}
        self._logits = self._malloc(batch * total * self.facts["vocab_size"] * 4)
        self.last_step_ms = 0.0

    # -- memory -----------------------------------------------------------------------------------------------

    def _malloc(self, nbytes: int) -> int:
        pointer = cuda_call(self._cudart.cudaMalloc(max(nbytes, 256)))  # never 0 bytes: even P=0 needs an address
        self._buffers.append(pointer)
        return pointer

    def _allocate_kv(self) -> list[int]:
        batch, total = self._max["input_ids"][0], self._max["attention_mask"][1]
        itemsize = self._dtypes[self._past[0]].itemsize if self._past else 4
        return [self._malloc(batch * h * total * self.facts["head_dim"] * itemsize) for h in self._past_heads]

    def _copy_in(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self._dtypes[name])
        cuda_call(self._cudart.cudaMemcpyAsync(self._step_buffers[name], array.ctypes.data, array.nbytes,
                                               self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        self._keep_alive.append(array)

    # -- one step ---------------------------------------------------------------------------------------------

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past_length: int) -> np.ndarray:
        trt, cudart, context = self._trt, self._cudart, self.context
        profile = PREFILL_PROFILE if past_length == 0 else DECODE_PROFILE
        if not context.set_optimization_profile_async(profile, native_handle(self.stream)):
            raise LmforgeError(f"TensorRT refused optimization profile {profile}")
        self._keep_alive: list[np.ndarray] = []
        for name, array in (("input_ids", ids), ("attention_mask", mask), ("position_ids", positions)):
            self._copy_in(name, array)
            self._bind(name, self._step_buffers[name], array.shape)
        batch = ids.shape[0]
        past_set, present_set = self._kv
        for index, (name, h) in enumerate(zip(self._past, self._past_heads)):
            self._bind(name, past_set[index], (batch, h, past_length, self.facts["head_dim"]))
            present = name.replace("past_key_values.", "present.")
            if not context.set_tensor_address(present, present_set[index]):
                raise LmforgeError(f"TensorRT refused the address of {present}")
        if not context.set_tensor_address("logits", self._logits):
            raise LmforgeError("TensorRT refused the address of logits")
        cuda_call(cudart.cudaEventRecord(self._start, self.stream))
        if not context.execute_async_v3(native_handle(self.stream)):
            raise LmforgeError("TensorRT execution failed; its log above says why")
        cuda_call(cudart.cudaEventRecord(self._end, self.stream))
        shape = tuple(context.get_tensor_shape("logits"))
        logits = np.empty(shape, np.dtype(trt.nptype(self.engine.get_tensor_dtype("logits"))))
        cuda_call(cudart.cudaMemcpyAsync(logits.ctypes.data, self._logits, logits.nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        cuda_call(cudart.cudaStreamSynchronize(self.stream))
        self.last_step_ms = cuda_call(cudart.cudaEventElapsedTime(self._start, self._end))
        self._kv.reverse()  # this step's present is the next step's past; nothing is copied
        return logits.astype(np.float32, copy=False)

    def _bind(self, name: str, pointer: int, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, shape):
            raise BadInputError(f"{name} shape {shape} is outside the plan's profile (max {self._max.get(name)}); "
                                "rebuild with larger --max-batch / --max-seq")
        if not self.context.set_tensor_address(name, pointer):
            raise LmforgeError(f"TensorRT refused the address of {name}")

    # -- the Session protocol -----------------------------------------------------------------------------

    def prefill(self, input_ids, attention_mask=None, last_only: bool = False) -> np.ndarray:
        self._check_open()  # a plan from the fp16 / Q/DQ ONNX has no logits_to_keep: every position comes back
        ids, mask = check_prompt(input_ids, attention_mask, self.facts)
        self._state, positions = prefill_state(mask)
        return self._run(ids, mask, positions, past_length=0)

    def decode(self, tokens) -> np.ndarray:
        self._check_open()
        if self._state is None:
            raise BadInputError("decode called before prefill; call prefill(prompt) first")
        past_length = self._state.length
        ids, mask, positions = decode_step(self._state, tokens, self.facts)
        return self._run(ids, mask, positions, past_length=past_length)

    def reset(self) -> None:
        self._check_open()
        self._state = None

    def close(self) -> None:
        if self.engine is None:
            return
        for pointer in self._buffers:
            self._cudart.cudaFree(pointer)
        self._buffers = []
        self._cudart.cudaStreamDestroy(self.stream)
        self.context = self.engine = None

    def _check_open(self) -> None:
        if self.engine is None:
            raise SessionClosedError("the session is closed; open a new one with runtime.session.open()")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
