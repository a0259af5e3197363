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
from runtime.hugepages import committed_zeros, huge_pages_for_new_memory
from runtime.ort_capi import (
    ELEMENT_TYPES,
    ORT_ARENA_ALLOCATOR,
    ORT_DEVICE_ALLOCATOR,
    ORT_ENABLE_ALL,
    ORT_LOGGING_LEVEL_ERROR,
    ORT_MEM_TYPE_DEFAULT,
    CudaProviderOptions,
    OrtApi,
    load_api,
)
from runtime.session import (
    CACHE_LENGTHS,
    LOGITS_TO_KEEP,
    CacheState,
    SessionClosedError,
    SessionOptions,
    cache_kv_heads,
    check_prompt,
    check_token_ids,
    decode_step,
    decode_tokens,
    extend_step,
    prefill_state,
    rollback_state,
)

MODEL_FILE = artifacts.MODEL_FILE
STEP_INPUTS = (b"input_ids", b"attention_mask", b"position_ids")
_LOGITS_TO_KEEP = LOGITS_TO_KEEP.encode()
_CACHE_LENGTHS = CACHE_LENGTHS.encode()
CACHE_MIN_POSITIONS = 256  # the smallest shared cache allocated; it doubles when full
PROVIDERS = ("cpu", "cuda")
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


ROLLBACK_NEEDS = ("rolls its cache back in place, and this one copies it (unfused attention or a GPU cache): "
                  "rebuild it fused for the CPU with `python -m export.build`")


def rolls_back_in_place(artifact: artifacts.Artifact, options: SessionOptions) -> bool:
    """Fused attention on the CPU: the cache buffers are shared between past and present (SharedCache)."""
    return options.provider == "cpu" and artifact.metrics.get("fusion", {}).get("attention") == "fused"


class OrtSession:
    backend = "ort"

    def __init__(self, artifact: artifacts.Artifact, options: SessionOptions):
        if options.provider not in PROVIDERS:
            raise BadInputError(f"unknown execution provider {options.provider!r}; choose one of: "
                                f"{', '.join(PROVIDERS)}")
        if options.exact_speculation and not rolls_back_in_place(artifact, options):
            raise BadInputError(f"SessionOptions(exact_speculation=True) needs an engine that {ROLLBACK_NEEDS}")
        self.artifact = artifact
        self.facts = artifact.model_facts
        self.options = options
        self._api = api = load_api(options.library)
        self._session = self._binding = self._memory = self._cache_memory = None
        self._logits_to_keep_values: dict[bool, int] = {}
        self._allocator = api.out("GetAllocatorWithDefaultOptions")  # owned by ONNX Runtime: never freed
        with huge_pages_for_new_memory(options.huge_pages and options.provider == "cpu"):  # the weights
            self._session = self._create_session(artifact.file(MODEL_FILE), options)
        self.input_names = self._names("SessionGetInputCount", "SessionGetInputName")
        self.output_names = self._names("SessionGetOutputCount", "SessionGetOutputName")
        self._past_names = [n.encode() for n in self.input_names if n.startswith("past_key_values.")]
        self._output_names = [n.encode() for n in self.output_names]
        self._memory = api.out("CreateCpuMemoryInfo", ORT_DEVICE_ALLOCATOR, ORT_MEM_TYPE_DEFAULT)
        # Engines take an optional `logits_to_keep` (an input with a default value): bound to 1, the LM head
        # runs on the last position only. Its two values are built once and rebound on every step.
        overridable = self._names("SessionGetOverridableInitializerCount", "SessionGetOverridableInitializerName")
        self._logits_to_keep = ({last: np.full(1, int(last), np.int64) for last in (False, True)}
                                if LOGITS_TO_KEEP in overridable else {})
        self._logits_to_keep_values = {last: self._wrap(array) for last, array in self._logits_to_keep.items()}
        # The KV cache stays where the provider computes it (GPU memory for CUDA); logits come to the host.
        self._cache_memory = (api.out("CreateMemoryInfo", b"Cuda", ORT_ARENA_ALLOCATOR, 0, ORT_MEM_TYPE_DEFAULT)
                              if options.provider == "cuda" else self._memory)
        self._binding = api.out("CreateIoBinding", self._session)
        kv = self.artifact.io["inputs"][-1]
        self._kv_dtype = np.dtype(kv["dtype"]) if self._past_names else np.dtype(np.float32)
        self._bind_names = list(STEP_INPUTS) + self._past_names
        presents_as_past = [n.replace(b"present.", b"past_key_values.") for n in self._output_names[1:]]
        if presents_as_past != self._past_names:
            raise BadInputError(f"{artifact.path}: the graph's present.* outputs do not pair with its "
                                "past_key_values.* inputs in order; re-export it with `python -m export.build`")
        self._output_bindings = [(self._output_names[0], self._memory)]  # logits: read on the host
        self._output_bindings += [(name, self._cache_memory) for name in self._output_names[1:]]
        api.BindOutputToDevice(self._binding, *self._output_bindings[0])  # logits first among bound outputs
        logits = self.artifact.io["outputs"][0]
        self._vocab, self._logits_dtype = int(logits["shape"][-1]), np.dtype(logits["dtype"])
        self._data = ctypes.c_void_p()
        self._outputs: list[int] = []  # OrtValues of the last run: logits, then present.*
        self._owned: list[int] = []  # other OrtValues of the last run, released after the next
        self._arrays: list[np.ndarray] = []  # numpy memory those OrtValues view
        self._state: CacheState | None = None
        self._cache_heads = cache_kv_heads(self.facts)
        shares = bool(self._past_names) and rolls_back_in_place(artifact, options)
        self._kv: SharedCache | CopiedCache = SharedCache(self) if shares else CopiedCache(self)
        # Slots (continuous batching): a fixed cache of `slots` rows, each row its own sequence at its own
        # length, run through the engine's `cache_lengths` input; one IoBinding per row range, made on first use.
        self._has_cache_lengths = CACHE_LENGTHS in overridable
        self.slot_buffers: list[np.ndarray] = []
        self._slot_bindings: dict[tuple[int, int], tuple[int, list[int]]] = {}
        self._slot_run: list[int] = []  # OrtValues of the last slot run (its inputs and logits), released next run
        self._slot_arrays: list[np.ndarray] = []
        self._closed = False

    # -- set-up -------------------------------------------------------------------------------------------

    def _create_session(self, model_path, options: SessionOptions):
        api = self._api
        env = shared_env(api)  # before anything else: providers log through the environment's logger
        session_options = api.out("CreateSessionOptions")
        try:
            api.SetIntraOpNumThreads(session_options, options.threads)
            api.SetInterOpNumThreads(session_options, 1)
            api.SetSessionGraphOptimizationLevel(session_options, ORT_ENABLE_ALL)
            if options.profile:
                api.EnableProfiling(session_options, str(options.profile).encode())
            if options.provider == "cuda":
                cuda = CudaProviderOptions.defaults()
                api.SessionOptionsAppendExecutionProvider_CUDA(session_options, ctypes.byref(cuda))
            return api.out("CreateSession", env, str(model_path).encode(), session_options)
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

    def end_profiling(self) -> str:
        """Stop the profiler that `SessionOptions.profile` started; returns the path of its JSON trace."""
        self._check_open()
        if not self.options.profile:
            raise BadInputError("this session was opened without SessionOptions(profile=...); nothing to end")
        pointer = self._api.out("SessionEndProfiling", self._session, self._allocator)
        path = ctypes.string_at(pointer).decode()
        self._api.AllocatorFree(self._allocator, pointer)
        return path

    # -- the Session protocol -----------------------------------------------------------------------------

    def prefill(self, input_ids, attention_mask=None, last_only: bool = False) -> np.ndarray:
        self._check_open()
        ids, mask = check_prompt(input_ids, attention_mask, self.facts)
        self._release_outputs()
        self._state, positions = prefill_state(mask)
        past, owned, arrays = self._kv.for_prefill(ids.shape[0], ids.shape[1])
        return self._run(ids, mask, positions, past, owned=owned, arrays=arrays, last_only=last_only)

    def decode(self, tokens) -> np.ndarray:
        if self.options.exact_speculation and self._state is not None and self._room_for_a_pair():
            return self._decode_as_pair(tokens)
        return self._append("decode", decode_step, tokens, last_only=True)

    def _room_for_a_pair(self) -> bool:
        """Whether the copy fits: one row (GroupQueryAttention takes several new tokens after a cache only at batch
        1, as speculation does), and room in the context (at its very last position a token is decoded alone)."""
        limit = self.facts.get("max_context")
        return self._state.mask.shape[0] == 1 and (not limit or self._state.length + 2 <= limit)

    def _decode_as_pair(self, tokens) -> np.ndarray:
        """One decode step as a two-token call, the copy rolled back: the logits of the first position, computed
        by the multi-row kernels a verify step runs (SessionOptions.exact_speculation)."""
        column = decode_tokens(self._state, tokens)
        length = self._state.length
        logits = self.extend(np.concatenate([column, column], axis=1))
        self.rollback(length + 1)
        return logits[:, :1]

    def extend(self, tokens) -> np.ndarray:
        """Append n tokens per row ([batch, n], or [n] for one row) after the cache in one call and return the
        logits of all n positions [batch, n, vocab]: speculative decoding's verify step, one read of the
        weights for n tokens."""
        return self._append("extend", extend_step, tokens, last_only=False)

    def _append(self, call: str, step, tokens, last_only: bool) -> np.ndarray:
        """One run of new tokens after the cache: `step` checks them and advances the cache state."""
        self._check_open()
        if self._state is None:
            raise BadInputError(f"{call} called before prefill; call prefill(prompt) first")
        length = self._state.length
        ids, mask, positions = step(self._state, tokens, self.facts)
        past = self._kv.for_step(ids.shape[0], length, ids.shape[1])
        return self._run(ids, mask, positions, past, owned=[], arrays=[], last_only=last_only)

    @property
    def supports_rollback(self) -> bool:
        """Whether `rollback` is free: the shared cache buffers, which GroupQueryAttention reads only up to the
        attention mask's length, so a shorter mask is all a rollback needs. An unfused graph's present tensors
        are fresh copies of the whole cache each step, so cutting them back would copy it again."""
        return isinstance(self._kv, SharedCache)

    def rollback(self, length: int) -> None:
        """Keep only the first `length` cached positions (speculative decoding drops its rejected drafts)."""
        self._check_open()
        if not self.supports_rollback:
            raise BadInputError(f"rollback needs an engine that {ROLLBACK_NEEDS}")
        if self._state is None:
            raise BadInputError("rollback called before prefill; call prefill(prompt) first")
        rollback_state(self._state, length)

    def reset(self) -> None:
        self._check_open()
        self._release_outputs()
        self._state = None

    def close(self) -> None:
        if self._closed:
            return
        self._release_outputs()
        self._kv.release()
        self._release_slots()
        api = self._api
        for value in self._logits_to_keep_values.values():
            api.ReleaseValue(value)
        self._logits_to_keep_values = {}
        if self._binding:
            api.ReleaseIoBinding(self._binding)
        if self._cache_memory and self._cache_memory is not self._memory:
            api.ReleaseMemoryInfo(self._cache_memory)
        if self._memory:
            api.ReleaseMemoryInfo(self._memory)
        if self._session:
            api.ReleaseSession(self._session)
        self._binding = self._memory = self._cache_memory = self._session = None
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

    # -- slots: rows of one fixed cache, each at its own length ------------------------------------------------

    @property
    def supports_slots(self) -> bool:
        """Whether this engine runs rows of different lengths in one step (fused attention on the CPU)."""
        return isinstance(self._kv, SharedCache) and self._has_cache_lengths

    def open_slots(self, slots: int, capacity: int) -> int:
        """Allocate the slot cache once: `slots` rows of `capacity` positions per cache tensor; returns its bytes.
        The buffers (`slot_buffers`, [slots, kv_heads, capacity, head_dim]) are the caller's to copy positions
        in and out of between runs (the prefix cache)."""
        self._check_open()
        if not self.supports_slots:
            raise BadInputError(f"engine {self.artifact.id} has no per-row cache lengths (unfused attention, or "
                                "built before they existed); rebuild it with `python -m export.build`")
        self._release_slots()
        head_dim = self.facts["head_dim"]
        self.slot_buffers = [committed_zeros((slots, heads, capacity, head_dim), self._kv_dtype)
                             for heads in self._cache_heads]
        return sum(buffer.nbytes for buffer in self.slot_buffers)

    def run_slots(self, first: int, input_ids: np.ndarray, lengths: np.ndarray, last_only: bool = True
                  ) -> np.ndarray:
        """One step over slot rows [first, first + batch): row r appends `input_ids[r]` after its `lengths[r]`
        cached positions. Returns logits [batch, 1 or sequence, vocab], a view valid until the next run."""
        self._check_open()
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        batch, sequence = ids.shape
        check_token_ids(ids, self.facts)
        capacity = self.slot_buffers[0].shape[2]
        if int(lengths.max()) + sequence > capacity:
            raise BadInputError(f"{int(lengths.max()) + sequence} positions exceed the slot capacity of {capacity}")
        total = int(lengths.max()) + sequence
        mask = (np.arange(total) < (lengths + sequence)[:, None]).astype(np.int64)
        positions = lengths[:, None] + np.arange(sequence, dtype=np.int64)
        binding = self._slot_binding(first, batch)
        api = self._api
        arrays = [ids, mask, positions, lengths]
        values = [self._wrap(array) for array in arrays]
        for name, value in zip((*STEP_INPUTS, _CACHE_LENGTHS), values):
            api.BindInput(binding, name, value)
        last_only = last_only and bool(self._logits_to_keep)
        if self._logits_to_keep:
            api.BindInput(binding, _LOGITS_TO_KEEP, self._logits_to_keep_values[last_only])
        api.BindOutputToDevice(binding, *self._output_bindings[0])
        api.RunWithBinding(self._session, None, binding)
        for value in self._slot_run:
            api.ReleaseValue(value)
        outputs = self._bound_outputs(binding)  # logits, then references to the slot views (released next run)
        self._slot_run, self._slot_arrays = [*values, *outputs], arrays
        return self._logits_of(outputs[0], (batch, 1 if last_only else sequence))

    def _slot_binding(self, first: int, batch: int) -> int:
        """The IoBinding whose cache inputs and outputs are views of slot rows [first, first + batch)."""
        key = (first, batch)
        if key not in self._slot_bindings:
            api = self._api
            binding = api.out("CreateIoBinding", self._session).value
            views = [self._wrap(buffer[first:first + batch]) for buffer in self.slot_buffers]
            api.BindOutputToDevice(binding, *self._output_bindings[0])  # logits first among bound outputs
            for past, value in zip(self._past_names, views):
                api.BindInput(binding, past, value)
                api.BindOutput(binding, past.replace(b"past_key_values.", b"present."), value)
            self._slot_bindings[key] = (binding, views)
        return self._slot_bindings[key][0]

    def _release_slots(self) -> None:
        api = self._api
        for value in self._slot_run:
            api.ReleaseValue(value)
        for binding, views in self._slot_bindings.values():
            for value in views:
                api.ReleaseValue(value)
            api.ReleaseIoBinding(binding)
        self._slot_run, self._slot_arrays, self._slot_bindings, self.slot_buffers = [], [], {}, []

    # -- one step -----------------------------------------------------------------------------------------

    def _run(self, ids, mask, positions, past: list[int], owned: list[int], arrays: list, last_only: bool
             ) -> np.ndarray:
        """One RunWithBinding. `past` are the OrtValues to bind as past_key_values; `owned` the OrtValues this
        step created beyond its own inputs, and `arrays` the numpy arrays they view: both live until the
        next step. The hot path keeps handles as ints and calls few functions: on a model this small the
        per-call cost of Python adds up against a ~20 ms step."""
        api, binding = self._api, self._binding
        step_inputs = [self._wrap(ids), self._wrap(mask), self._wrap(positions)]
        bind_input = api.BindInput
        for name, value in zip(self._bind_names, step_inputs + past):  # past: [] where the cache is shared
            bind_input(binding, name, value)
        last_only = last_only and bool(self._logits_to_keep)
        if self._logits_to_keep:
            bind_input(binding, _LOGITS_TO_KEEP, self._logits_to_keep_values[last_only])
        bind_output = api.BindOutputToDevice  # rebinding makes ONNX Runtime allocate the output afresh
        for name, memory in self._kv.rebound_outputs:
            bind_output(binding, name, memory)
        api.RunWithBinding(self._session, None, binding)

        stale = self._outputs + self._owned
        self._outputs = self._bound_outputs(binding)
        self._owned = step_inputs + owned
        self._arrays = [ids, mask, positions, *arrays]
        release = api.ReleaseValue
        for value in stale:
            release(value)
        return self._logits_of(self._outputs[0], (ids.shape[0], 1 if last_only else ids.shape[1]))

    def _bound_outputs(self, binding: int) -> list[int]:
        array, count = ctypes.POINTER(ctypes.c_void_p)(), ctypes.c_size_t()
        self._api.GetBoundOutputValues(binding, self._allocator, ctypes.byref(array), ctypes.byref(count))
        values = array[: count.value]
        self._api.AllocatorFree(self._allocator, array)
        return values

    def _wrap(self, array: np.ndarray, shape=None) -> int:
        """An OrtValue over the numpy array's memory (no copy); the array must outlive it."""
        shape = array.shape if shape is None else shape
        dims = (ctypes.c_int64 * len(shape))(*shape)
        nbytes = array.itemsize
        for dim in shape:
            nbytes *= dim
        address = array.__array_interface__["data"][0]  # cheaper than array.ctypes.data on the hot path
        return self._api.out("CreateTensorWithDataAsOrtValue", self._memory, address, nbytes, dims, len(shape),
                             ELEMENT_TYPES[array.dtype.name]).value

    def _logits_of(self, value: int, input_shape) -> np.ndarray:
        """Logits [batch, sequence, vocab] as a view of the OrtValue's memory."""
        self._api.GetTensorMutableData(value, ctypes.byref(self._data))
        shape = (input_shape[0], input_shape[1], self._vocab)
        count = shape[0] * shape[1] * shape[2]
        memory = _memory_view(self._data.value, count * self._logits_dtype.itemsize, _PYBUF_WRITE)
        return np.frombuffer(memory, dtype=self._logits_dtype, count=count).reshape(shape)

    def _release_outputs(self) -> None:
        for value in self._outputs + self._owned:
            self._api.ReleaseValue(value)
        self._outputs, self._owned, self._arrays = [], [], []

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosedError("this session is closed; open a new one with runtime.open(artifact)")


class SharedCache:
    """GroupQueryAttention engines on the CPU: one buffer per cache tensor ([batch, kv_heads, capacity, head_dim])
    bound as both past and present, so the kernel writes new positions in place instead of copying the whole
    cache into a fresh present tensor every step. Attention reads only as far as the mask, so a shorter mask is a
    free rollback."""

    def __init__(self, session: OrtSession):
        self.session = session
        self.buffers: list[np.ndarray] = []
        self.values: list[int] = []
        self.rebound_outputs = session._output_bindings[:1]  # logits only; the cache outputs stay on the buffers

    def for_prefill(self, batch: int, new: int) -> tuple[list[int], list[int], list]:
        """(past to bind, OrtValues the step owns, arrays they view): nothing, the buffers are bound already."""
        self.reserve(batch, new, keep=0)
        return [], [], []

    def for_step(self, batch: int, cached: int, new: int) -> list[int]:
        self.reserve(batch, cached + new, keep=cached)
        return []

    def reserve(self, batch: int, needed: int, keep: int) -> None:
        """Buffers of at least `needed` positions for `batch` rows, bound as past and present; growing doubles
        the capacity and copies the first `keep` positions."""
        if self.buffers and self.buffers[0].shape[0] == batch and self.buffers[0].shape[2] >= needed:
            return
        session = self.session
        limit = session.facts.get("max_context") or 2 * needed
        capacity = min(limit, max(CACHE_MIN_POSITIONS, 2 * needed))
        head_dim = session.facts["head_dim"]
        buffers = [np.zeros((batch, h, capacity, head_dim), session._kv_dtype) for h in session._cache_heads]
        for old, new in zip(self.buffers, buffers) if keep else ():  # a prefill keeps nothing (and may change batch)
            new[:, :, :keep] = old[:, :, :keep]
        self.release()
        self.buffers, self.values = buffers, [session._wrap(buffer) for buffer in buffers]
        for past, value in zip(session._past_names, self.values):
            session._api.BindInput(session._binding, past, value)
            session._api.BindOutput(session._binding, past.replace(b"past_key_values.", b"present."), value)

    def release(self) -> None:
        for value in self.values:
            self.session._api.ReleaseValue(value)
        self.buffers, self.values = [], []


class CopiedCache:
    """Every other engine (unfused attention, or a GPU): each step's present tensors, which ONNX Runtime
    allocates, are the next step's past."""

    def __init__(self, session: OrtSession):
        self.session = session
        # Rebinding each output to its device makes ONNX Runtime allocate it afresh, so the present tensors bound
        # as this step's past are never reused as this step's output buffers.
        self.rebound_outputs = session._output_bindings

    def for_prefill(self, batch: int, new: int) -> tuple[list[int], list[int], list]:
        session = self.session
        empty = np.zeros(1, session._kv_dtype)  # a valid address for tensors with no elements
        past = [session._wrap(empty, (batch, h, 0, session.facts["head_dim"])) for h in session._cache_heads]
        return past, past, [empty]

    def for_step(self, batch: int, cached: int, new: int) -> list[int]:
        return self.session._outputs[1:]

    def release(self) -> None:
        pass  # the present tensors are the last step's outputs, released with them
