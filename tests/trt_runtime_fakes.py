"""A fake ``tensorrt`` for the runtime side, held to the real API of one TensorRT version: an
engine whose execution context "runs" a known decoder by reading and writing the buffers behind the
addresses it is given, and whose refitter takes the weights it is handed by name; a stand-in for the
weight builder and its ONNX Runtime reference (``FakeLevels``); CPU stand-ins for the CUDA buffers
(address -> numpy array) and for libcudart; an opened engine with fixed latencies for the report."""

from __future__ import annotations

import types

import numpy as np

import trt_api
from epts_export.device.trt import runtime as tr
from epts_export.errors import UserError
from trt_fakes import fake_loggers


VOCAB, HEADS, HEAD_DIM, LAYERS = 32, 2, 4, 2

PREFILL = {"batch": (1, 1, 2), "seq": (1, 4, 8), "past": (0, 0, 0)}

DECODE = {"batch": (1, 1, 2), "seq": (1, 1, 1), "past": (1, 8, 15)}

CONTINUE = {"batch": (1, 1, 2), "seq": (1, 2, 4), "past": (1, 4, 12)}

LEVELS = {"0.3": 3, "0.5": 5, "0.7": 7}  # level -> the value its graph's weights hold (the fake's token offset)

WEIGHTS = ("w.up", "w.down")  # the weights that differ between levels; w.norm does not

NP = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64}

class CpuBuffers:
    """The DeviceBuffers interface over host memory: every buffer gets a fake address."""

    def __init__(self):
        self.memory: dict[int, np.ndarray] = {}
        self.next = 0x10000
        self.syncs = 0
        self.allocs: list[tuple[tuple, str]] = []

    def _new(self, array: np.ndarray) -> int:
        addr = self.next
        self.next += 0x1000
        self.memory[addr] = array
        return addr

    def stream_handle(self) -> int:
        return 0xBEEF

    def to_device(self, array, dtype):
        assert array.dtype == np.dtype(tr.HOST_DTYPES[dtype]), (array.dtype, dtype)
        assert array.size > 0
        return self._new(np.array(array, copy=True))

    def empty(self, shape, dtype):
        self.allocs.append((tuple(shape), dtype))
        return self._new(np.full(tuple(shape), 99, tr.HOST_DTYPES[dtype]))

    def zeros(self, shape, dtype):
        return self._new(np.zeros(tuple(shape), tr.HOST_DTYPES[dtype]))

    def to_host(self, addr):
        return self.memory[addr].copy()

    def ptr(self, addr):
        return addr

    def sync(self):
        self.syncs += 1

    def device_name(self):
        return "Fake GPU (sm_87, cuda:0)"

def next_token(ids: np.ndarray, past_len: int, offset: int = 0) -> np.ndarray:
    """What the fake decoder predicts: depends on the ids, the cache length (so a cache that does
    not flow from step to step changes the tokens) and the loaded weights (``offset``)."""
    return (ids.astype(np.int64) + 1 + past_len + offset) % VOCAB

def new_kv(ids: np.ndarray, layer: int, kind: int) -> np.ndarray:
    """(B, H, S, D) cache entries for new tokens: a function of id, layer, key/value, head and dim."""
    b, s = ids.shape
    h = np.arange(HEADS).reshape(1, HEADS, 1, 1)
    d = np.arange(HEAD_DIM).reshape(1, 1, 1, HEAD_DIM)
    return ids.reshape(b, 1, s, 1) + 100 * layer + 50 * kind + 10 * h + d + 0.5

def weights_offset(weights: dict) -> int:
    up, down = weights.get("w.up"), weights.get("w.down")
    assert up is not None and down is not None and float(up.flat[0]) == float(down.flat[0]), "refit both or neither"
    return int(float(up.flat[0]))

class FakeReference:
    """What ONNX Runtime computes at a level: the known decoder with that level's offset."""

    def __init__(self, offset: int):
        self.offset, self.kv_heads, self.head_dim = offset, HEADS, HEAD_DIM

    def empty_past(self, batch):
        return [np.zeros((batch, HEADS, 0, HEAD_DIM), np.float16) for _ in range(2 * LAYERS)]

    def step(self, ids, mask, pos, past):
        logits = np.eye(VOCAB, dtype=np.float32)[next_token(ids, past[0].shape[2], self.offset)] * 20.0 - 1.0
        presents = [np.concatenate([p.astype(np.float32), new_kv(ids, n // 2, n % 2)], axis=2).astype(np.float16)
                    for n, p in enumerate(past)]
        return logits, presents

class FakeLevels:
    """The weight builder of an elastic bundle (``weights.LevelWeights``) faked: each level's
    prunable weights hold its offset (LEVELS), w.norm is read from the bundle's files, and the
    reference at a level is the known decoder with that offset."""

    def __init__(self, levels=LEVELS):
        self.levels, self.calls = dict(levels), []

    def arrays(self, level):
        self.calls.append(("arrays", level))
        return {name: np.full((4, 4), self.levels[level], np.float16) for name in WEIGHTS}

    def tensor(self, name):
        self.calls.append(("tensor", name))
        if name != "w.norm":
            raise UserError(f"TensorRT asked for weight {name}, which the engine graph does not hold")
        return np.ones((4,), np.float16)

    def reference(self, level):
        self.calls.append(("reference", level))
        return FakeReference(self.levels[level])

    def vocab_size(self):
        return VOCAB

class FakeIO:
    """The decoder engine's tensors: names, TensorRT types and each profile's shape ranges."""

    def __init__(self, DataType, TensorIOMode, ids: str, kv: str, position_ids: bool, profiles, extra_inputs):
        self.TensorIOMode, self.profiles, self.extra_inputs = TensorIOMode, profiles, extra_inputs
        id_names = ["input_ids", "attention_mask"] + (["position_ids"] if position_ids else [])
        self.past_names = [f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
        self.present_names = [f"present.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
        self.inputs = {**{n: getattr(DataType, ids) for n in id_names}, **{n: getattr(DataType, kv) for n in self.past_names},
                       **{n: getattr(DataType, ids) for n in extra_inputs}}
        self.outputs = {"logits": DataType.FLOAT, **{n: getattr(DataType, kv) for n in self.present_names}}
        self.kv = kv
        self.names = [*self.inputs, *self.outputs]

    def mode(self, name: str):
        return self.TensorIOMode.INPUT if name in self.inputs else self.TensorIOMode.OUTPUT

    def profile_shape(self, name: str, p: int) -> list[tuple]:
        r = self.profiles[p]
        b, s, past = r["batch"], r["seq"], r["past"]
        if name in ("input_ids", "position_ids") or name in self.extra_inputs:
            return [(b[k], s[k]) for k in range(3)]
        if name == "attention_mask":
            return [(b[k], s[k] + past[k]) for k in range(3)]
        return [(b[k], HEADS, past[k], HEAD_DIM) for k in range(3)]

    def engine_shape(self, name: str) -> tuple:
        if name in self.past_names or name in self.present_names:
            return (-1, HEADS, -1, HEAD_DIM)
        return (-1, -1, VOCAB) if name == "logits" else (-1, -1)

def fake_context_class(rec, io: FakeIO, switch_ok: bool):
    """An execution context that runs the known decoder (next_token, new_kv) on the buffers bound to it."""
    class Context:
        def __init__(self, engine):
            self.engine, self.profile, self.shapes, self.addresses = engine, 0, {}, {}

        def set_optimization_profile_async(self, profile_index, stream_handle):
            assert stream_handle == 0xBEEF and 0 <= profile_index < len(io.profiles)
            rec.switches.append(profile_index)
            if not switch_ok:
                return False
            self.profile, self.shapes = profile_index, {}  # switching invalidates the input shapes
            return True

        def set_input_shape(self, name, shape):
            assert io.mode(name) == io.TensorIOMode.INPUT
            mn, _, mx = io.profile_shape(name, self.profile)
            if not tr._fits(tuple(shape), mn, mx):  # TensorRT: false and an error, outside the active profile
                return False
            self.shapes[name] = tuple(int(d) for d in shape)
            return True

        def get_tensor_shape(self, name):
            if name in io.inputs:
                return self.shapes.get(name, io.engine_shape(name))
            b, s = self.shapes["input_ids"]
            past = self.shapes["past_key_values.0.key"][2]
            return (b, s, VOCAB) if name == "logits" else (b, HEADS, past + s, HEAD_DIM)

        def set_tensor_address(self, name, memory):
            assert isinstance(memory, int) and memory != 0
            self.addresses[name] = memory
            return True

        def _inputs(self) -> dict:
            mem, arrays = rec.memory.memory, {}
            assert set(self.shapes) == set(io.inputs), "every input shape is set after a profile switch"
            for name in io.inputs:
                shape, buf = self.shapes[name], mem[self.addresses[name]]
                assert buf.dtype == NP[io.inputs[name].name], (name, buf.dtype)
                if int(np.prod(shape)) == 0:
                    assert buf.size >= 1  # a valid dummy buffer behind a zero-length tensor
                    arrays[name] = np.zeros(shape, buf.dtype)
                else:
                    assert buf.shape == shape
                    arrays[name] = buf
            return arrays

        def execute_async_v3(self, stream_handle):
            assert stream_handle == 0xBEEF
            rec.runs += 1
            mem, arrays = rec.memory.memory, self._inputs()
            ids, past = arrays["input_ids"], arrays["past_key_values.0.key"].shape[2]
            assert arrays["attention_mask"].shape[1] == past + ids.shape[1]
            out = mem[self.addresses["logits"]]
            assert out.shape == self.get_tensor_shape("logits") and out.dtype == np.float32
            out[...] = np.eye(VOCAB, dtype=np.float32)[next_token(ids, past, self.engine.offset)] * 20.0 - 1.0
            for i in range(LAYERS):
                for kind, k in enumerate(("key", "value")):
                    full = np.concatenate([arrays[f"past_key_values.{i}.{k}"].astype(np.float32), new_kv(ids, i, kind)], axis=2)
                    dst = mem[self.addresses[f"present.{i}.{k}"]]
                    assert dst.shape == full.shape and dst.dtype == NP[io.kv]
                    dst[...] = full.astype(dst.dtype)
            return True

    return Context

def fake_refit_classes(rec, refit_ok: bool, fused, drops: str | None):
    """(Weights, Refitter): a refit sets the engine's offset from the weights it was handed by name
    (``drops``: a refit that silently keeps the old value of that weight, as TensorRT 11.3's notes
    say a refit can drop a GEMM bias)."""
    class Weights:
        def __init__(self, a):
            assert isinstance(a, np.ndarray) and a.flags.c_contiguous
            self.array = a

    class Refitter:
        def __init__(self, engine, logger):
            assert engine.refittable
            self.engine, self.pending = engine, {}

        def get_all_weights(self):
            return [*WEIGHTS, "w.norm", "(Unnamed Layer* 7) [Constant]_output"]  # a weight the ONNX does not name

        def set_named_weights(self, name, weights):
            rec.named.append(name)
            self.pending[name] = weights.array
            return name in self.get_all_weights()

        def get_missing_weights(self):
            # TensorRT fused the norm into what the changed weights feed: once they are set, it is needed too
            return [f for f in fused if self.pending and f not in self.pending]

        def refit_cuda_engine(self):
            rec.refits += 1
            if not refit_ok:
                return False
            if drops is None:
                self.engine.offset = weights_offset(self.pending)
            return True

    return Weights, Refitter

def runtime_trt(api: trt_api.Api, ids: str | None = None, kv: str = "HALF", position_ids=True,
                  profiles=(PREFILL, DECODE, CONTINUE), extra_inputs=(), load_ok=True, refittable=True,
                  switch_ok=True, refit_ok=True, fused=("w.norm",), offset=3, drops=None):
    """A fake ``tensorrt`` of ``api``'s version: the real enums; an engine whose outputs depend on its
    weights (``offset``: built with level 0.3's); a refitter that takes weights by name.
    ``ids`` defaults to INT64 where the version has it (8.6 engines take int32)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = api.version
    enums = trt_api.enums(api)
    trt.DataType, trt.TensorIOMode, severity = enums["DataType"], enums["TensorIOMode"], enums["ILogger.Severity"]
    ids = ids or ("INT64" if "INT64" in trt.DataType.__members__ else "INT32")
    rec = types.SimpleNamespace(switches=[], runs=0, contexts=0, plan=None, named=[], refits=0, memory=None)
    trt.rec = rec
    fake_loggers(trt, severity)
    io = FakeIO(trt.DataType, trt.TensorIOMode, ids, kv, position_ids, profiles, extra_inputs)
    Context = fake_context_class(rec, io, switch_ok)

    class Engine:
        num_io_tensors = len(io.names)
        num_optimization_profiles = len(profiles)

        def __init__(self):
            self.offset, self.refittable = offset, refittable

        def get_tensor_name(self, index):
            return io.names[index]

        def get_tensor_mode(self, name):
            return io.mode(name)

        def get_tensor_dtype(self, name):
            return {**io.inputs, **io.outputs}[name]

        def get_tensor_shape(self, name):
            return io.engine_shape(name)

        def get_tensor_profile_shape(self, name, profile_index):
            assert name in io.inputs, "profile shapes exist for inputs only"
            return io.profile_shape(name, profile_index)

        def create_execution_context(self):
            rec.contexts += 1
            return Context(self)

    engine = Engine()

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, serialized_engine):
            rec.plan = bytes(serialized_engine)
            if not load_ok:
                self.logger.log(severity.ERROR, "The engine plan file is not compatible with this version of TensorRT")
                return None
            return engine

    trt.Runtime = Runtime
    trt.Weights, trt.Refitter = fake_refit_classes(rec, refit_ok, fused, drops)
    return trt

def prefill_args(ids):
    ids = np.asarray(ids, np.int64)
    mask = np.ones_like(ids)
    return ids, mask, np.cumsum(mask, axis=1) - 1

class HostCudart:
    """libcudart's calls that DeviceBuffers makes, over host memory (pointer -> bytearray)."""

    path = "host-cudart"

    def __init__(self, devices: int = 1):
        self.devices, self.blocks, self.calls, self.next = devices, {}, [], 0x1000

    def device_count(self):
        return self.devices

    def set_device(self, device):
        self.calls.append(("set_device", device))

    def stream_create(self):
        return 0x5

    def malloc(self, nbytes):
        self.calls.append(("malloc", nbytes))
        ptr, self.next = self.next, self.next + nbytes + 256
        self.blocks[ptr] = bytearray(nbytes)
        return ptr

    def free(self, ptr):
        self.calls.append(("free", ptr))
        del self.blocks[ptr]

    def _view(self, ptr, nbytes):
        return memoryview(self.blocks[ptr])[:nbytes]

    def copy(self, dst, src, nbytes, kind, stream):
        import ctypes

        if kind == 1:  # host to device
            self._view(dst, nbytes)[:] = ctypes.string_at(src, nbytes)
        else:  # device to host
            ctypes.memmove(dst, bytes(self._view(src, nbytes)), nbytes)

    def memset(self, ptr, value, nbytes, stream):
        self._view(ptr, nbytes)[:] = bytes([value]) * nbytes

    def stream_sync(self, stream):
        self.calls.append(("sync", stream))

    def stream_destroy(self, stream):
        self.calls.append(("stream_destroy", stream))

    def name(self, device):
        return "Host GPU"

    def capability(self, device):
        return "8.7"

class TimedEngine:
    """An opened engine for measure_engines: fixed latencies per (seq, past), a check per level,
    refits that take 0.25 s (or drift, for the levels in ``drifts``)."""

    version = "10.3.0.30"

    class buffers:  # noqa: N801
        @staticmethod
        def device_name():
            return "Orin (sm_87, cuda:0)"

    def __init__(self, spec, level, times, drifts=()):
        self.spec, self.times, self.drifts, self.calls = spec, times, set(drifts), []
        self.checked = {level: {"passed": True, "logits_max_abs": 0.01, "logits_atol": 10.0}}

    def latency(self, batch, seq, past, repeats=20):
        self.calls.append((batch, seq, past))
        return self.times["prefill" if past == 0 else "decode"]

    def set_level(self, level):
        if level in self.drifts:
            raise UserError(f"TensorRT level {level} drifts from ONNX Runtime: not served", 3)
        self.checked[level] = {"passed": True, "logits_max_abs": 0.02, "logits_atol": 10.0}
        return {"level": level, "switched": True, "refit_s": 0.25, "weights": 14, "check": self.checked[level]}
