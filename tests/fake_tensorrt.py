"""Stand-ins for TensorRT's runtime and cuda-python's runtime module, so the `trt` session's own logic (shape
checks before copies, profile switching, buffer sizes, cleanup) runs on a CPU. They keep TensorRT's contract
where it matters here: an engine reports its profiles and tensor shapes, a context refuses input shapes
outside the active profile, and device memory is a table of allocations that flags any copy past an end."""

from __future__ import annotations

import types

import numpy as np

SUCCESS, OUT_OF_MEMORY = 0, 2
HOST_TO_DEVICE, DEVICE_TO_HOST = 1, 2


class FakeCudart:
    """cuda.bindings.runtime: (error, value...) tuples, with every call logged in order."""

    class cudaError_t:  # noqa: N801 - cuda-python's spelling
        cudaSuccess = SUCCESS

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice = HOST_TO_DEVICE
        cudaMemcpyDeviceToHost = DEVICE_TO_HOST

    def __init__(self, fail_malloc_at: int | None = None):
        self.fail_malloc_at = fail_malloc_at  # the n-th cudaMalloc (from 1) reports out of memory
        self.live: dict[int, int] = {}  # device pointer -> bytes
        self.streams: set[int] = set()
        self.events: set[int] = set()
        self.calls: list[str] = []
        self.copies_in: list[tuple[int, int]] = []  # (device pointer, bytes) of host-to-device copies
        self.mallocs: list[int] = []
        self._next = 0x1000

    def _handle(self) -> int:
        self._next += 0x1000
        return self._next

    def cudaMalloc(self, nbytes):  # noqa: N802
        self.calls.append("cudaMalloc")
        self.mallocs.append(nbytes)
        if self.fail_malloc_at == len(self.mallocs):
            return (OUT_OF_MEMORY, None)
        pointer = self._handle()
        self.live[pointer] = nbytes
        return (SUCCESS, pointer)

    def cudaFree(self, pointer):  # noqa: N802
        self.calls.append("cudaFree")
        del self.live[pointer]
        return (SUCCESS,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):  # noqa: N802
        self.calls.append("cudaMemcpyAsync")
        if kind == HOST_TO_DEVICE:
            assert dst in self.live and count <= self.live[dst], "a copy past the end of a device buffer"
            self.copies_in.append((dst, count))
        return (SUCCESS,)

    def cudaStreamCreate(self):  # noqa: N802
        self.calls.append("cudaStreamCreate")
        stream = self._handle()
        self.streams.add(stream)
        return (SUCCESS, stream)

    def cudaStreamDestroy(self, stream):  # noqa: N802
        self.calls.append("cudaStreamDestroy")
        self.streams.remove(stream)
        return (SUCCESS,)

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        self.calls.append("cudaStreamSynchronize")
        return (SUCCESS,)

    def cudaEventCreate(self):  # noqa: N802
        self.calls.append("cudaEventCreate")
        event = self._handle()
        self.events.add(event)
        return (SUCCESS, event)

    def cudaEventDestroy(self, event):  # noqa: N802
        self.calls.append("cudaEventDestroy")
        self.events.remove(event)
        return (SUCCESS,)

    def cudaEventRecord(self, event, stream):  # noqa: N802
        return (SUCCESS,)

    def cudaEventElapsedTime(self, start, end):  # noqa: N802
        return (SUCCESS, 0.25)


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine = engine
        self.profile = 0  # TensorRT starts a context on profile 0
        self.profile_switches: list[int] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.fail_execution = False

    def set_optimization_profile_async(self, index, stream):
        if not 0 <= index < self.engine.num_optimization_profiles:
            raise RuntimeError("Error in set optimization profile async.")  # the binding raises, never False
        self.profile = index
        self.profile_switches.append(index)
        return True

    def set_input_shape(self, name, shape):
        low, _, high = self.engine.get_tensor_profile_shape(name, self.profile)
        if len(shape) != len(low) or not all(a <= s <= b for a, s, b in zip(low, shape, high)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, pointer):
        return pointer in self.engine.cudart.live

    def execute_async_v3(self, stream):
        return not self.fail_execution

    def get_tensor_shape(self, name):
        batch, new = self.shapes["input_ids"]
        return (batch, new, self.engine.vocab)


class FakeEngine:
    """A plan with the given profiles (engines.trt.profiles' output) and cache tensors in `kv_order`."""

    def __init__(self, cudart: FakeCudart, profiles: list[dict], kv_heads: dict[str, int], head_dim: int,
                 vocab: int, kv_order: list[str] | None = None):
        self.cudart, self.profiles, self.vocab, self.head_dim = cudart, profiles, vocab, head_dim
        self.kv_heads = kv_heads
        past = kv_order or sorted(kv_heads)
        self.inputs = ["input_ids", "attention_mask", "position_ids", *past]
        self.outputs = ["logits", *(p.replace("past_key_values.", "present.") for p in past)]
        self.context_fails = False
        self.contexts: list[FakeContext] = []

    @property
    def num_optimization_profiles(self):
        return len(self.profiles)

    @property
    def num_io_tensors(self):
        return len(self.inputs) + len(self.outputs)

    def get_tensor_name(self, index):
        return (self.inputs + self.outputs)[index]

    def get_tensor_mode(self, name):
        return FakeTensorRT.TensorIOMode.INPUT if name in self.inputs else FakeTensorRT.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return np.float32 if name.startswith(("past", "present", "logits")) else np.int64

    def get_tensor_shape(self, name):
        if name == "logits":
            return (-1, -1, self.vocab)
        if name.startswith(("past_key_values.", "present.")):
            past = name.replace("present.", "past_key_values.")
            return (-1, self.kv_heads[past], -1, self.head_dim)
        return (-1, -1)

    def get_tensor_profile_shape(self, name, index):
        return [tuple(shape) for shape in self.profiles[index][name]]

    def create_execution_context(self):
        if self.context_fails:
            return None  # what TensorRT returns when, say, activation memory cannot be allocated
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


class FakeTensorRT(types.ModuleType):
    """The `tensorrt` module, as far as runtime/trt_session.py uses it."""

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            self.severity = severity

    class TensorIOMode:
        INPUT, OUTPUT = 1, 2

    def __init__(self, engine: FakeEngine | None):
        super().__init__("tensorrt")
        self.__version__ = "10.16.1.11"
        engine_to_load = engine

        class Runtime:
            def __init__(self, logger):
                self.engine_host_code_allowed = False

            def deserialize_cuda_engine(self, data):
                return engine_to_load

        self.Runtime = Runtime

    @staticmethod
    def nptype(dtype):
        return dtype
