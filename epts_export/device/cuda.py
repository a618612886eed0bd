"""CUDA device memory without torch: the CUDA runtime library (``libcudart``) through ctypes, as
Polygraphy's ``cuda`` module does, so that a device runs TensorRT engines with TensorRT's
bindings and numpy alone.

    rt = CudaRuntime.load()              # UserError in one line when there is no libcudart or no GPU
    buf = DeviceBuffers(rt, device=0)    # what TrtDecoder allocates, copies and synchronizes with
    x = buf.to_device(np.ones((2, 3), np.float16), "float16")
    buf.to_host(x)                       # -> the array back, after the stream's work is done

The calls used are the runtime's stable C API (cudaMalloc, cudaFree, cudaMemcpyAsync, cudaMemsetAsync,
cudaStream*, cudaGetDeviceCount, cudaSetDevice, cudaDeviceGetAttribute, cudaGetDeviceProperties,
cudaRuntimeGetVersion, cudaGetErrorString), the same in CUDA 11, 12 and 13. Freed blocks are kept
for reuse by size (a decoder step allocates the same shapes again), so a step costs no cudaMalloc
once the cache is warm. bfloat16 tensors travel as float32 on the host (numpy has no bfloat16):
rounded to nearest even on the way in, widened on the way out.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import UserError

CUDART_ENV = "EPTS_CUDART"  # a path to libcudart.so.*, tried first
SONAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0")
# cudaMemcpyKind, cudaDeviceAttr (driver_types.h); stable since CUDA 4
HOST_TO_DEVICE, DEVICE_TO_HOST, DEVICE_TO_DEVICE = 1, 2, 3
ATTR_CC_MAJOR, ATTR_CC_MINOR = 75, 76
_PROPS_BYTES = 16384  # larger than cudaDeviceProp in any CUDA release; ``name`` is its first field (char[256])
_ALIGN = 256

# dtype name -> (numpy dtype on the device side, bytes per element)
DEVICE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "int32": np.int32,
                 "int64": np.int64, "bool": np.bool_, "int8": np.int8, "uint8": np.uint8}


def _candidates() -> list[str]:
    """Where libcudart may be: $EPTS_CUDART, the loader's search path, CUDA's install folders
    (JetPack: /usr/local/cuda), and the NVIDIA wheels of the running Python."""
    found = [os.environ[CUDART_ENV]] if os.environ.get(CUDART_ENV) else []
    found += list(SONAMES)
    for pattern in ("/usr/local/cuda/lib64/libcudart.so*", "/usr/local/cuda/targets/*/lib/libcudart.so*",
                    "/usr/lib/*-linux-gnu/libcudart.so*"):
        found += sorted(glob.glob(pattern), reverse=True)
    for site in sys.path:
        for sub in ("nvidia/cuda_runtime/lib", "nvidia/cu13/lib", "nvidia/cu12/lib"):
            found += sorted(glob.glob(str(Path(site or ".") / sub / "libcudart.so*")), reverse=True)
    return list(dict.fromkeys(found))


class CudaRuntime:
    """The functions of one loaded ``libcudart``; every call checks its cudaError_t."""

    def __init__(self, lib, path: str = "libcudart"):
        self.lib, self.path = lib, path
        vp, sz, i, st = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p
        sigs = {"cudaMalloc": [ctypes.POINTER(vp), sz], "cudaFree": [vp],
                "cudaMemcpyAsync": [vp, vp, sz, i, st], "cudaMemsetAsync": [vp, i, sz, st],
                "cudaStreamCreate": [ctypes.POINTER(st)], "cudaStreamSynchronize": [st], "cudaStreamDestroy": [st],
                "cudaGetDeviceCount": [ctypes.POINTER(i)], "cudaSetDevice": [i],
                "cudaDeviceGetAttribute": [ctypes.POINTER(i), i, i], "cudaRuntimeGetVersion": [ctypes.POINTER(i)]}
        for name, args in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        lib.cudaGetErrorString.argtypes, lib.cudaGetErrorString.restype = [ctypes.c_int], ctypes.c_char_p
        self._props = next((getattr(lib, n) for n in ("cudaGetDeviceProperties_v2", "cudaGetDeviceProperties")
                            if hasattr(lib, n)), None)
        if self._props is not None:
            self._props.argtypes, self._props.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_int

    @classmethod
    def load(cls) -> "CudaRuntime":
        """The first libcudart that loads (see ``_candidates``); UserError naming where it looked."""
        tried = _candidates()
        for name in tried:
            try:
                return cls(ctypes.CDLL(name), name)
            except (OSError, AttributeError):
                continue
        raise UserError(f"the CUDA runtime library (libcudart) was not found: TensorRT engines need it for device memory "
                        f"(JetPack: /usr/local/cuda/lib64; pip: nvidia-cuda-runtime-cu12), or set {CUDART_ENV}=/path/to/libcudart.so")

    def check(self, code: int, what: str) -> None:
        if code != 0:
            text = self.lib.cudaGetErrorString(code)
            raise RuntimeError(f"CUDA {what} failed: {text.decode() if text else code} (error {code})")

    # ---- devices

    def device_count(self) -> int:
        n = ctypes.c_int(0)
        code = self.lib.cudaGetDeviceCount(ctypes.byref(n))
        return int(n.value) if code == 0 else 0  # no driver or no device: none visible

    def set_device(self, device: int) -> None:
        self.check(self.lib.cudaSetDevice(int(device)), f"cudaSetDevice({device})")

    def capability(self, device: int = 0) -> str:
        """The compute capability of ``device`` as "major.minor" ("8.7" on Orin)."""
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(major), ATTR_CC_MAJOR, int(device)), "cudaDeviceGetAttribute")
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(minor), ATTR_CC_MINOR, int(device)), "cudaDeviceGetAttribute")
        return f"{major.value}.{minor.value}"

    def name(self, device: int = 0) -> str:
        if self._props is None:
            return "CUDA GPU"
        props = ctypes.create_string_buffer(_PROPS_BYTES)
        self.check(self._props(props, int(device)), "cudaGetDeviceProperties")
        return props.raw[:256].split(b"\0", 1)[0].decode(errors="replace") or "CUDA GPU"

    def version(self) -> str:
        v = ctypes.c_int(0)
        self.check(self.lib.cudaRuntimeGetVersion(ctypes.byref(v)), "cudaRuntimeGetVersion")
        return f"{v.value // 1000}.{v.value % 1000 // 10}"

    # ---- memory and streams

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), max(int(nbytes), 1)), f"cudaMalloc({nbytes} bytes)")
        return int(ptr.value)

    def free(self, ptr: int) -> None:
        self.check(self.lib.cudaFree(ctypes.c_void_p(ptr)), "cudaFree")

    def copy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), int(nbytes), kind,
                                            ctypes.c_void_p(stream)), "cudaMemcpyAsync")

    def memset(self, ptr: int, value: int, nbytes: int, stream: int) -> None:
        self.check(self.lib.cudaMemsetAsync(ctypes.c_void_p(ptr), int(value), int(nbytes), ctypes.c_void_p(stream)),
                   "cudaMemsetAsync")

    def stream_create(self) -> int:
        s = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(s)), "cudaStreamCreate")
        return int(s.value or 0)

    def stream_sync(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")

    def stream_destroy(self, stream: int) -> None:
        self.check(self.lib.cudaStreamDestroy(ctypes.c_void_p(stream)), "cudaStreamDestroy")


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(a), np.uint16(0x7FC0), rounded)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    return (np.ascontiguousarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


class DeviceArray:
    """A block of device memory holding one tensor; returned to its pool when dropped."""

    def __init__(self, pool: "DeviceBuffers", ptr: int, size: int, shape: tuple, dtype: str):
        self.pool, self.ptr, self.size, self.shape, self.dtype = pool, ptr, size, shape, dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(DEVICE_DTYPES[self.dtype]).itemsize

    def __del__(self):
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool._release(self.ptr, self.size)
            self.pool = None


class DeviceBuffers:
    """Device tensors on one GPU and the stream TensorRT runs on, with a cache of freed blocks.

    The interface TrtDecoder and the latency report use: ``to_device``, ``empty``, ``to_host``,
    ``ptr``, ``sync``, ``stream_handle``, ``device_name``. ``runtime`` replaces the real libcudart
    (tests pass a stand-in that keeps memory on the host)."""

    def __init__(self, runtime: CudaRuntime | None = None, device: int = 0):
        self.rt = runtime or CudaRuntime.load()
        count = self.rt.device_count()
        if count < 1:
            raise UserError(f"no CUDA GPU visible to {self.rt.path}: TensorRT engines need one (check nvidia-smi)")
        if not 0 <= int(device) < count:
            raise UserError(f"CUDA device {device} does not exist: {count} visible (use 0..{count - 1})")
        self.device = int(device)
        self.rt.set_device(self.device)  # TensorRT deserializes and runs on the current device
        self.stream = self.rt.stream_create()
        self._free: dict[int, list[int]] = {}
        self._all: list[int] = []
        self.closed = False

    # ---- allocation

    def _alloc(self, nbytes: int) -> tuple[int, int]:
        if self.closed:
            raise RuntimeError("these device buffers were closed")
        size = max(_ALIGN, -(-int(nbytes) // _ALIGN) * _ALIGN)
        free = self._free.get(size)
        if free:
            return free.pop(), size
        ptr = self.rt.malloc(size)
        self._all.append(ptr)
        return ptr, size

    def _release(self, ptr: int, size: int) -> None:
        if self.closed:
            return  # freed with the pool
        self._free.setdefault(size, []).append(ptr)

    def empty(self, shape: Sequence[int], dtype: str) -> DeviceArray:
        shape = tuple(int(d) for d in shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(DEVICE_DTYPES[dtype]).itemsize
        ptr, size = self._alloc(nbytes)
        return DeviceArray(self, ptr, size, shape, dtype)

    def zeros(self, shape: Sequence[int], dtype: str) -> DeviceArray:
        out = self.empty(shape, dtype)
        self.rt.memset(out.ptr, 0, max(out.nbytes, 1), self.stream)
        return out

    # ---- copies

    def to_device(self, array: np.ndarray, dtype: str) -> DeviceArray:
        host = to_bf16_bits(array) if dtype == "bfloat16" else np.ascontiguousarray(array, DEVICE_DTYPES[dtype])
        out = self.empty(host.shape, dtype)
        if host.nbytes:
            self.rt.copy(out.ptr, host.ctypes.data, host.nbytes, HOST_TO_DEVICE, self.stream)
            self.rt.stream_sync(self.stream)  # the host array may go as soon as this returns
        return out

    def to_host(self, dev: DeviceArray) -> np.ndarray:
        host = np.empty(dev.shape, DEVICE_DTYPES[dev.dtype])
        if host.nbytes:
            self.rt.copy(host.ctypes.data, dev.ptr, host.nbytes, DEVICE_TO_HOST, self.stream)
            self.rt.stream_sync(self.stream)
        return from_bf16_bits(host) if dev.dtype == "bfloat16" else host

    def ptr(self, dev: DeviceArray) -> int:
        return int(dev.ptr)

    def sync(self) -> None:
        self.rt.stream_sync(self.stream)

    def stream_handle(self) -> int:
        return int(self.stream)

    def device_name(self) -> str:
        return f"{self.rt.name(self.device)} (sm_{self.rt.capability(self.device).replace('.', '')}, cuda:{self.device})"

    def close(self) -> None:
        """Free every block (those still held by live arrays too) and the stream."""
        if self.closed:
            return
        self.sync()
        for ptr in self._all:
            self.rt.free(ptr)
        self._all, self._free, self.closed = [], {}, True
        self.rt.stream_destroy(self.stream)
