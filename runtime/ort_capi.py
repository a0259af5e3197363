"""ctypes bindings to ONNX Runtime's C API (`OrtGetApiBase` → `OrtApi`), written from
`include/onnxruntime/core/session/onnxruntime_c_api.h`.

`OrtApi` is a struct of function pointers that only ever grows at its end, so a function's position in it
is stable across releases: the table below names each function we call by that position. We ask for API
version 13 (ONNX Runtime 1.13, 2022), which holds every function listed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
from ctypes import POINTER, c_char_p, c_int, c_int64, c_size_t, c_uint32, c_void_p
from pathlib import Path

from runtime.errors import EXIT_BAD_INPUT, LmforgeError

ORT_API_VERSION = 13
LIBRARY_ENV = "LMFORGE_ORT_LIBRARY"

# ONNXTensorElementDataType values for the dtypes the contract uses.
ELEMENT_TYPES = {"float32": 1, "uint8": 2, "int8": 3, "int32": 6, "int64": 7, "float16": 10, "bool": 9}

ORT_LOGGING_LEVEL_ERROR = 3
ORT_ENABLE_ALL = 99
ORT_DEVICE_ALLOCATOR, ORT_ARENA_ALLOCATOR, ORT_MEM_TYPE_DEFAULT = 0, 1, 0

Status = c_void_p  # OrtStatus*; NULL means success
P = c_void_p

# name: (index in OrtApi, return type, argument types)
FUNCTIONS = {
    "GetErrorCode": (1, c_int, [Status]),
    "GetErrorMessage": (2, c_char_p, [Status]),
    "CreateEnv": (3, Status, [c_int, c_char_p, POINTER(P)]),
    "CreateSession": (7, Status, [P, c_char_p, P, POINTER(P)]),
    "CreateSessionOptions": (10, Status, [POINTER(P)]),
    "EnableProfiling": (14, Status, [P, c_char_p]),
    "SetSessionGraphOptimizationLevel": (23, Status, [P, c_int]),
    "SetIntraOpNumThreads": (24, Status, [P, c_int]),
    "SetInterOpNumThreads": (25, Status, [P, c_int]),
    "SessionGetInputCount": (30, Status, [P, POINTER(c_size_t)]),
    "SessionGetOutputCount": (31, Status, [P, POINTER(c_size_t)]),
    "SessionGetOverridableInitializerCount": (32, Status, [P, POINTER(c_size_t)]),
    "SessionGetInputName": (36, Status, [P, c_size_t, P, POINTER(c_void_p)]),
    "SessionGetOutputName": (37, Status, [P, c_size_t, P, POINTER(c_void_p)]),
    "SessionGetOverridableInitializerName": (38, Status, [P, c_size_t, P, POINTER(c_void_p)]),
    "CreateTensorWithDataAsOrtValue": (49, Status, [P, c_void_p, c_size_t, POINTER(c_int64), c_size_t, c_int,
                                                    POINTER(P)]),
    "GetTensorMutableData": (51, Status, [P, POINTER(c_void_p)]),
    "CreateMemoryInfo": (68, Status, [c_char_p, c_int, c_int, c_int, POINTER(P)]),
    "CreateCpuMemoryInfo": (69, Status, [c_int, c_int, POINTER(P)]),
    "AllocatorFree": (76, Status, [P, c_void_p]),
    "GetAllocatorWithDefaultOptions": (78, Status, [POINTER(P)]),
    "ReleaseStatus": (93, None, [P]),
    "ReleaseMemoryInfo": (94, None, [P]),
    "ReleaseSession": (95, None, [P]),
    "ReleaseValue": (96, None, [P]),
    "ReleaseSessionOptions": (100, None, [P]),
    "SessionEndProfiling": (110, Status, [P, P, POINTER(c_void_p)]),
    "RunWithBinding": (133, Status, [P, P, P]),
    "CreateIoBinding": (134, Status, [P, POINTER(P)]),
    "ReleaseIoBinding": (135, None, [P]),
    "BindInput": (136, Status, [P, c_char_p, P]),
    "BindOutput": (137, Status, [P, c_char_p, P]),
    "BindOutputToDevice": (138, Status, [P, c_char_p, P]),
    "GetBoundOutputValues": (140, Status, [P, P, POINTER(POINTER(P)), POINTER(c_size_t)]),
    "SessionOptionsAppendExecutionProvider_CUDA": (152, Status, [P, P]),
}


class OrtError(LmforgeError):
    """An OrtStatus from ONNX Runtime, carrying its message."""


class OrtLibraryError(LmforgeError):
    """The library named is missing, is not ONNX Runtime, or is too old."""

    exit_code = EXIT_BAD_INPUT


def find_library() -> str:
    """$LMFORGE_ORT_LIBRARY, else the libonnxruntime inside the installed onnxruntime(-gpu) package, else the
    system's. The package is located without importing it, so its Python bindings never load."""
    if os.environ.get(LIBRARY_ENV):
        return os.environ[LIBRARY_ENV]
    spec = importlib.util.find_spec("onnxruntime")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            found = sorted(glob.glob(str(Path(location) / "capi" / "libonnxruntime.so*")) +
                           glob.glob(str(Path(location) / "capi" / "libonnxruntime*.dylib")) +
                           glob.glob(str(Path(location) / "capi" / "onnxruntime.dll")))
            if found:
                return found[0]
    system = ctypes.util.find_library("onnxruntime")
    if system:
        return system
    raise OrtLibraryError("no ONNX Runtime library found; `pip install onnxruntime`, or set "
                          f"{LIBRARY_ENV} to the path of libonnxruntime")


class OrtApi:
    """The OrtApi function table of one loaded library. Every call that returns an OrtStatus is checked:
    a non-NULL status becomes an `OrtError` with ONNX Runtime's message."""

    def __init__(self, path: str):
        try:
            self.library = ctypes.CDLL(path)
        except OSError as exc:
            raise OrtLibraryError(f"cannot load ONNX Runtime library {path} ({exc}); set {LIBRARY_ENV} to a "
                                  "valid libonnxruntime or reinstall onnxruntime") from None
        try:
            get_api_base = self.library.OrtGetApiBase
        except AttributeError:
            raise OrtLibraryError(f"{path} is not ONNX Runtime (it has no OrtGetApiBase); set {LIBRARY_ENV} "
                                  "to libonnxruntime") from None
        get_api_base.restype = POINTER(_OrtApiBase)
        base = get_api_base().contents
        self.version = base.GetVersionString().decode()
        table = base.GetApi(ORT_API_VERSION)
        if not table:
            raise OrtLibraryError(f"ONNX Runtime {self.version} at {path} is too old (C API version "
                                  f"{ORT_API_VERSION} needed, i.e. 1.13 or newer); upgrade onnxruntime")
        pointers = ctypes.cast(table, POINTER(c_void_p))
        self.path = path
        raw = {name: ctypes.CFUNCTYPE(restype, *argtypes)(pointers[index])
               for name, (index, restype, argtypes) in FUNCTIONS.items()}
        self._get_message, self._get_code, self._release_status = (
            raw["GetErrorMessage"], raw["GetErrorCode"], raw["ReleaseStatus"])
        # Plain attributes, built once: the decode loop makes hundreds of calls per token.
        for name, function in raw.items():
            setattr(self, name, self._checked(function) if FUNCTIONS[name][1] is Status else function)

    def _checked(self, function):
        def call(*args):
            status = function(*args)
            if status:
                self.raise_status(status)

        return call

    def raise_status(self, status) -> None:
        message = self._get_message(status).decode(errors="replace")
        code = self._get_code(status)
        self._release_status(status)
        raise OrtError(f"ONNX Runtime error {code}: {message}")

    def out(self, function: str, *args, kind=P):
        """Call a function whose last argument is an output pointer, and return what it wrote: the handle
        (a c_void_p) for pointers, the Python value for numbers."""
        result = kind()
        getattr(self, function)(*args, ctypes.byref(result))
        return result.value if kind is not P else result


class CudaProviderOptions(ctypes.Structure):
    """OrtCUDAProviderOptions. Later releases appended fields to it, so zeroed padding follows the fields
    we know: a newer library reads zeros (its defaults: features off) instead of whatever lies beyond."""

    _fields_ = [("device_id", c_int), ("cudnn_conv_algo_search", c_int), ("gpu_mem_limit", c_size_t),
                ("arena_extend_strategy", c_int), ("do_copy_in_default_stream", c_int),
                ("has_user_compute_stream", c_int), ("user_compute_stream", c_void_p),
                ("default_memory_arena_cfg", c_void_p), ("_reserved", ctypes.c_byte * 256)]

    @classmethod
    def defaults(cls, device_id: int = 0) -> CudaProviderOptions:
        # The C++ defaults: exhaustive cuDNN search (0), no memory limit, copies on the compute stream.
        return cls(device_id=device_id, cudnn_conv_algo_search=0, gpu_mem_limit=ctypes.c_size_t(-1).value,
                   arena_extend_strategy=0, do_copy_in_default_stream=1)


class _OrtApiBase(ctypes.Structure):
    _fields_ = [("GetApi", ctypes.CFUNCTYPE(c_void_p, c_uint32)),
                ("GetVersionString", ctypes.CFUNCTYPE(c_char_p))]


_LOADED: dict[str, OrtApi] = {}


def load_api(path: str | None = None) -> OrtApi:
    """The OrtApi of the library at `path` (default: `find_library()`), loaded once per process."""
    path = path or find_library()
    if path not in _LOADED:
        _LOADED[path] = OrtApi(path)
    return _LOADED[path]

