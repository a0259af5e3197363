"""The `ort` backend: a Session over ONNX Runtime's C API with I/O binding.

Per step, the new tokens are wrapped (not copied) as OrtValues, the previous step's `present.*` OrtValues
are bound as this step's `past_key_values.*`, and the outputs are allocated by ONNX Runtime; no KV tensor
passes through Python. Logits are a numpy view of the logits OrtValue, valid until the next call.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from runtime import artifact as artifacts
from runtime.errors import BadInputError
from runtime.ort_capi import (
    ELEMENT_DTYPES,
    ELEMENT_TYPES,
    ORT_DEVICE_ALLOCATOR,
    ORT_ENABLE_ALL,
    ORT_LOGGING_LEVEL_ERROR,
    ORT_MEM_TYPE_DEFAULT,
    OrtApi,
    load_api,
)
from runtime.session import CacheState, SessionClosedError, SessionOptions, check_prompt, decode_step, prefill_state

MODEL_FILE = "model.onnx"
STEP_INPUTS = (b"input_ids", b"attention_mask", b"position_ids")
_ENV_LOCK = threading.Lock()
# A memoryview over foreign memory without building a ctypes array type per call (that costs ~0.1 ms).
_memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_view.restype = ctypes.py_object
_memory_view.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int]
_PYBUF_WRITE = 0x200
_ENVS: dict[str, ctypes.c_void_p] = {}


def shared_env(api: OrtApi) -> ctypes.c_void_p:
    """One OrtEnv per library and process, as ONNX Runtime requires; never released."""
    with _ENV_LOCK:
        if api.path not in _ENVS:
            _ENVS[api.path] = api.out("CreateEnv", ORT_LOGGING_LEVEL_ERROR, b"lmforge")
        return _ENVS[api.path]


class OrtSession:
    backend = "ort"

    def __init__(self, artifact: artifacts.Artifact, options: SessionOptions):
        if options.provider != "cpu":
            raise BadInputError(f"execution provider {options.provider!r} is not supported by the ort runtime "
                                "yet; use provider 'cpu'")
        self.artifact = artifact
        self.facts = artifact.model_facts
        self.options = options
        self._api = api = load_api(options.library)
        self._session = self._binding = self._memory = None
        self._allocator = api.out("GetAllocatorWithDefaultOptions")  # owned by ONNX Runtime: never freed
        self._session = self._create_session(artifact.file(MODEL_FILE), options)
        self.input_names = self._names("SessionGetInputCount", "SessionGetInputName")
        self.output_names = self._names("SessionGetOutputCount", "SessionGetOutputName")
        self._past_names = [n.encode() for n in self.input_names if n.startswith("past_key_values.")]
        self._output_names = [n.encode() for n in self.output_names]
        self._memory = api.out("CreateCpuMemoryInfo", ORT_DEVICE_ALLOCATOR, ORT_MEM_TYPE_DEFAULT)
        self._binding = api.out("CreateIoBinding", self._session)
        kv = self.artifact.io["inputs"][-1]
        self._kv_dtype = np.dtype(kv["dtype"]) if self._past_names else np.dtype(np.float32)
        self._outputs: list[ctypes.c_void_p] = []  # OrtValues of the last run: logits, then present.*
        self._step_inputs: list = []  # numpy arrays and OrtValues that must live until the next run
        self._state: CacheState | None = None
        self._closed = False

    # -- set-up -------------------------------------------------------------------------------------------

    def _create_session(self, model_path, options: SessionOptions):
        api = self._api
        session_options = api.out("CreateSessionOptions")
        try:
            api.SetIntraOpNumThreads(session_options, options.threads)
            api.SetInterOpNumThreads(session_options, 1)
            api.SetSessionGraphOptimizationLevel(session_options, ORT_ENABLE_ALL)
            return api.out("CreateSession", shared_env(api), str(model_path).encode(), session_options)
        finally:
            api.ReleaseSessionOptions(session_options)

    def _names(self, count_fn: str, name_fn: str) -> list[str]:
        api = self._api
        names = []
        for i in range(api.out(count_fn, self._session, kind=ctypes.c_size_t)):
            pointer = api.out(name_fn, self._session, i, self._allocator)
            names.append(ctypes.string_at(pointer).decode())
            api.AllocatorFree(self._allocator, pointer)
        return names

    # -- the Session protocol -----------------------------------------------------------------------------

    def prefill(self, input_ids, attention_mask=None) -> np.ndarray:
        self._check_open()
        ids, mask = check_prompt(input_ids, attention_mask, self.facts)
        self._release_outputs()
        self._state, positions = prefill_state(mask)
        empty = np.zeros(1, self._kv_dtype)  # a valid address for tensors with no elements
        shape = (ids.shape[0], self.facts["kv_heads"], 0, self.facts["head_dim"])
        past = [self._wrap(empty, shape) for _ in self._past_names]
        return self._run(ids, mask, positions, past, keep=[empty, *past])

    def decode(self, tokens) -> np.ndarray:
        self._check_open()
        if self._state is None:
            raise BadInputError("decode called before prefill; call prefill(prompt) first")
        ids, mask, positions = decode_step(self._state, tokens, self.facts)
        return self._run(ids, mask, positions, self._outputs[1:], keep=[])

    def reset(self) -> None:
        self._check_open()
        self._release_outputs()
        self._state = None

    def close(self) -> None:
        if self._closed:
            return
        self._release_outputs()
        api = self._api
        if self._binding:
            api.ReleaseIoBinding(self._binding)
        if self._memory:
            api.ReleaseMemoryInfo(self._memory)
        if self._session:
            api.ReleaseSession(self._session)
        self._binding = self._memory = self._session = None
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_api", None) is not None and not getattr(self, "_closed", True):
            self.close()

    @property
    def cache_length(self) -> int:
        return 0 if self._state is None else self._state.length

    # -- one step -----------------------------------------------------------------------------------------

    def _run(self, ids, mask, positions, past, keep) -> np.ndarray:
        api, binding, memory = self._api, self._binding, self._memory
        step_values = [self._wrap(ids), self._wrap(mask), self._wrap(positions)]
        bind_input, bind_output = api.BindInput, api.BindOutputToDevice
        for name, value in zip(STEP_INPUTS, step_values):
            bind_input(binding, name, value)
        for name, value in zip(self._past_names, past):
            bind_input(binding, name, value)
        # Rebinding each output to the device makes ONNX Runtime allocate it afresh, so the present tensors
        # bound as this step's past are never reused as this step's output buffers.
        for name in self._output_names:
            bind_output(binding, name, memory)
        api.RunWithBinding(self._session, None, binding)

        previous, previous_inputs = self._outputs, self._step_inputs
        self._outputs = self._bound_outputs()
        self._step_inputs = [ids, mask, positions, *step_values, *keep]
        self._release(previous)
        self._release([v for v in previous_inputs if isinstance(v, ctypes.c_void_p)])
        return self._view(self._outputs[0])

    def _bound_outputs(self) -> list[ctypes.c_void_p]:
        api = self._api
        array = ctypes.POINTER(ctypes.c_void_p)()
        count = ctypes.c_size_t()
        api.GetBoundOutputValues(self._binding, self._allocator, ctypes.byref(array), ctypes.byref(count))
        values = [ctypes.c_void_p(array[i]) for i in range(count.value)]
        api.AllocatorFree(self._allocator, array)
        return values

    def _wrap(self, array: np.ndarray, shape=None) -> ctypes.c_void_p:
        """An OrtValue over the numpy array's memory (no copy); the array must outlive it."""
        shape = array.shape if shape is None else shape
        dims = (ctypes.c_int64 * len(shape))(*shape)
        nbytes = int(np.prod(shape)) * array.itemsize
        return self._api.out("CreateTensorWithDataAsOrtValue", self._memory, array.ctypes.data, nbytes, dims,
                             len(shape), ELEMENT_TYPES[array.dtype.name])

    def _view(self, value: ctypes.c_void_p) -> np.ndarray:
        api = self._api
        info = api.out("GetTensorTypeAndShape", value)
        try:
            rank = api.out("GetDimensionsCount", info, kind=ctypes.c_size_t)
            dims = (ctypes.c_int64 * rank)()
            api.GetDimensions(info, dims, rank)
            dtype = np.dtype(ELEMENT_DTYPES[api.out("GetTensorElementType", info, kind=ctypes.c_int)])
        finally:
            api.ReleaseTensorTypeAndShapeInfo(info)
        shape = tuple(dims)
        pointer = api.out("GetTensorMutableData", value).value
        count = int(np.prod(shape))
        memory = _memory_view(pointer, count * dtype.itemsize, _PYBUF_WRITE)
        return np.frombuffer(memory, dtype=dtype, count=count).reshape(shape)

    def _release(self, values) -> None:
        release = self._api.ReleaseValue
        for value in values:
            release(value)

    def _release_outputs(self) -> None:
        self._release(self._outputs)
        self._release([v for v in self._step_inputs if isinstance(v, ctypes.c_void_p)])
        self._outputs, self._step_inputs = [], []

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosedError("this session is closed; open a new one with runtime.open(artifact)")
