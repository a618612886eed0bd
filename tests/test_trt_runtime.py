"""TrtDecoder without TensorRT or CUDA: a fake ``tensorrt`` module whose execution context "runs" a
known decoder by reading and writing the buffers behind the addresses it is given, and a CPU
stand-in for the torch-CUDA buffers (address -> numpy array)."""

from __future__ import annotations

import enum
import json
import sys
import types

import numpy as np
import pytest

from epts_export.trt import runtime as tr
from epts_export.errors import UserError
from epts_export.onnx.runtime import greedy
from test_trt_engine import Severity  # the same fake TensorRT severities

VOCAB, HEADS, HEAD_DIM, LAYERS = 32, 2, 4, 2
# (batch, seq, past) ranges, as epts-export bundles build them: prefill first, decode second
PREFILL = {"batch": (1, 1, 2), "seq": (1, 4, 8), "past": (0, 0, 0)}
DECODE = {"batch": (1, 1, 2), "seq": (1, 1, 1), "past": (1, 8, 15)}


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    BF16 = 7
    INT64 = 8


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32, DataType.INT64: np.int64}


class CpuBuffers:
    """The _TorchCudaBuffers interface over host memory: every buffer gets a fake address."""

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

    def to_host(self, addr):
        return self.memory[addr].copy()

    def ptr(self, addr):
        return addr

    def sync(self):
        self.syncs += 1

    def device_name(self):
        return "Fake GPU (sm_87, cuda:0)"


def next_token(ids: np.ndarray, past_len: int) -> np.ndarray:
    """What the fake decoder predicts: depends on the ids and the cache length (so a cache that does
    not flow from step to step changes the tokens)."""
    return (ids.astype(np.int64) + 1 + past_len) % VOCAB


def new_kv(ids: np.ndarray, layer: int, kind: int) -> np.ndarray:
    """(B, H, S, D) cache entries for new tokens: a function of id, layer, key/value, head and dim."""
    b, s = ids.shape
    h = np.arange(HEADS).reshape(1, HEADS, 1, 1)
    d = np.arange(HEAD_DIM).reshape(1, 1, 1, HEAD_DIM)
    return ids.reshape(b, 1, s, 1) + 100 * layer + 50 * kind + 10 * h + d + 0.5


def make_fake_trt(ids=DataType.INT64, kv=DataType.HALF, position_ids=True, profiles=(PREFILL, DECODE),
                  extra_inputs=(), load_ok=True):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0.30"
    trt.DataType, trt.TensorIOMode = DataType, TensorIOMode
    rec = types.SimpleNamespace(switches=[], runs=0, contexts=0, bound={}, plan=None)
    trt.rec = rec

    class ILogger:
        def __init__(self):
            pass

    class Logger(ILogger):
        WARNING = Severity.WARNING

        def __init__(self, min_severity=Severity.WARNING):
            super().__init__()

    trt.ILogger, trt.Logger = ILogger, Logger

    id_names = ["input_ids", "attention_mask"] + (["position_ids"] if position_ids else [])
    past_names = [f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
    present_names = [f"present.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
    inputs = {**{n: ids for n in id_names}, **{n: kv for n in past_names}, **{n: DataType.INT64 for n in extra_inputs}}
    outputs = {"logits": DataType.FLOAT, **{n: kv for n in present_names}}
    names = [*inputs, *outputs]

    def profile_shape(name, p):
        r = profiles[p]
        b, s, past = r["batch"], r["seq"], r["past"]
        if name in ("input_ids", "position_ids") or name in extra_inputs:
            return [(b[k], s[k]) for k in range(3)]
        if name == "attention_mask":
            return [(b[k], s[k] + past[k]) for k in range(3)]
        return [(b[k], HEADS, past[k], HEAD_DIM) for k in range(3)]

    class Context:
        def __init__(self, engine):
            self.engine = engine
            self.profile = 0
            self.shapes = {}
            self.addresses = {}

        def set_optimization_profile_async(self, index, stream):
            assert stream == 0xBEEF and 0 <= index < len(profiles)
            rec.switches.append(index)
            self.profile = index
            self.shapes = {}  # switching invalidates the input shapes: they are set again

        def set_input_shape(self, name, shape):
            assert engine_inputs_mode(name) == TensorIOMode.INPUT
            mn, _, mx = profile_shape(name, self.profile)
            if not tr._fits(tuple(shape), mn, mx):  # TensorRT: false and an error, outside the active profile
                return False
            self.shapes[name] = tuple(int(d) for d in shape)
            return True

        def get_tensor_shape(self, name):
            if name in inputs:
                return self.shapes.get(name, engine.get_tensor_shape(name))
            b, s = self.shapes["input_ids"]
            past = self.shapes["past_key_values.0.key"][2]
            if name == "logits":
                return (b, s, VOCAB)
            return (b, HEADS, past + s, HEAD_DIM)

        def set_tensor_address(self, name, address):
            assert isinstance(address, int) and address != 0
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream_handle):
            assert stream_handle == 0xBEEF
            rec.runs += 1
            mem = rec.memory.memory
            assert set(self.shapes) == set(inputs), "every input shape is set after a profile switch"
            arrays = {}
            for name in inputs:
                shape = self.shapes[name]
                buf = mem[self.addresses[name]]
                assert buf.dtype == NP[inputs[name]], (name, buf.dtype)
                if int(np.prod(shape)) == 0:
                    assert buf.size >= 1  # a valid dummy buffer behind a zero-length tensor
                    arrays[name] = np.zeros(shape, buf.dtype)
                else:
                    assert buf.shape == shape
                    arrays[name] = buf
            ids = arrays["input_ids"]
            past = arrays["past_key_values.0.key"].shape[2]
            assert arrays["attention_mask"].shape[1] == past + ids.shape[1]
            tok = next_token(ids, past)
            out = mem[self.addresses["logits"]]
            assert out.shape == self.get_tensor_shape("logits") and out.dtype == np.float32
            out[...] = np.eye(VOCAB, dtype=np.float32)[tok] * 5.0 - 1.0
            for i in range(LAYERS):
                for kind, k in enumerate(("key", "value")):
                    prev = arrays[f"past_key_values.{i}.{k}"]
                    full = np.concatenate([prev.astype(np.float32), new_kv(ids, i, kind)], axis=2)
                    dst = mem[self.addresses[f"present.{i}.{k}"]]
                    assert dst.shape == full.shape and dst.dtype == NP[kv]
                    dst[...] = full.astype(dst.dtype)
            return True

    class Engine:
        num_io_tensors = len(names)
        num_optimization_profiles = len(profiles)

        def get_tensor_name(self, i):
            return names[i]

        def get_tensor_mode(self, name):
            return engine_inputs_mode(name)

        def get_tensor_dtype(self, name):
            return {**inputs, **outputs}[name]

        def get_tensor_shape(self, name):
            if name in past_names or name in present_names:
                return (-1, HEADS, -1, HEAD_DIM)
            if name == "logits":
                return (-1, -1, VOCAB)
            return (-1, -1)

        def get_tensor_profile_shape(self, name, profile_index):
            assert name in inputs, "profile shapes exist for inputs only"
            return profile_shape(name, profile_index)

        def create_execution_context(self):
            rec.contexts += 1
            return Context(self)

    def engine_inputs_mode(name):
        return TensorIOMode.INPUT if name in inputs else TensorIOMode.OUTPUT

    engine = Engine()

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            rec.plan = bytes(data)
            if not load_ok:
                self.logger.log(Severity.ERROR, "The engine plan file is not compatible with this version of TensorRT")
                return None
            return engine

    trt.Runtime = Runtime
    return trt


@pytest.fixture
def plan(tmp_path):
    p = tmp_path / "engines" / "level-2of4.engine"
    p.parent.mkdir()
    p.write_bytes(b"PLAN")
    return p


@pytest.fixture
def gpu_ok(monkeypatch):
    monkeypatch.setattr(tr, "tensorrt_status", lambda: (True, "TensorRT 10.3.0.30, Fake GPU (sm_87)"))


def load(monkeypatch, plan, **kw) -> tuple[tr.TrtDecoder, types.ModuleType, CpuBuffers]:
    trt = make_fake_trt(**kw)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    buffers = CpuBuffers()
    trt.rec.memory = buffers
    messages = []
    dec = tr.TrtDecoder(plan, log=messages.append, buffers=buffers)
    dec.messages = messages
    return dec, trt, buffers


def prefill_args(ids):
    ids = np.asarray(ids, np.int64)
    mask = np.ones_like(ids)
    return ids, mask, np.cumsum(mask, axis=1) - 1


# --------------------------------------------------------------------------------------------


def test_loads_and_discovers_io(monkeypatch, plan, gpu_ok):
    dec, trt, _ = load(monkeypatch, plan)
    assert trt.rec.plan == b"PLAN" and trt.rec.contexts == 1
    assert dec.past_dtype is np.float16 and (dec.kv_heads, dec.head_dim, dec.layers) == (HEADS, HEAD_DIM, LAYERS)
    assert dec.past_names == [f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
    assert dec.output_names[0] == "logits" and dec.output_names[1:] == [f"present.{i}.{k}" for i in range(LAYERS)
                                                                        for k in ("key", "value")]
    assert dec.profile_names == ["prefill", "decode"] and dec.active_profile == 0
    past = dec.empty_past(2)
    assert len(past) == 2 * LAYERS and all(p.shape == (2, HEADS, 0, HEAD_DIM) and p.dtype == np.float16 for p in past)


def test_step_outputs_follow_get_tensor_shape(monkeypatch, plan, gpu_ok):
    dec, trt, buffers = load(monkeypatch, plan)
    ids = np.array([[3, 5, 7], [1, 2, 4]])
    logits, presents = dec.step(*prefill_args(ids), dec.empty_past(2))
    assert logits.shape == (2, 3, VOCAB) and logits.dtype == np.float32
    assert (logits.argmax(-1) == next_token(ids, 0)).all()
    assert len(presents) == 2 * LAYERS
    for n, p in enumerate(presents):
        assert p.shape == (2, HEADS, 3, HEAD_DIM) and p.dtype == np.float16
        np.testing.assert_array_equal(p, new_kv(ids, n // 2, n % 2).astype(np.float16))
    # output buffers were allocated with the context's shapes and the engine's dtypes
    allocs = [a for a in buffers.allocs if a[0] != (1,)]  # (1,): the dummies behind the empty past
    assert allocs[0] == ((2, 3, VOCAB), "float32")
    assert allocs[1:] == [((2, HEADS, 3, HEAD_DIM), "float16")] * (2 * LAYERS)
    assert buffers.syncs == 1 and trt.rec.runs == 1


def test_zero_length_past_gets_a_dummy_buffer(monkeypatch, plan, gpu_ok):
    dec, _, buffers = load(monkeypatch, plan)
    dec.step(*prefill_args([[3, 5]]), dec.empty_past(1))
    dummies = [a for a in buffers.allocs if a[0] == (1,)]
    assert dummies == [((1,), "float16")] * (2 * LAYERS)  # one per past tensor, in the KV dtype
    assert all(addr != 0 for addr in dec.context.addresses.values())


def test_profile_selection_switches_only_when_needed(monkeypatch, plan, gpu_ok):
    dec, trt, _ = load(monkeypatch, plan)
    ids = np.array([[3, 5, 7]])
    logits, past = dec.step(*prefill_args(ids), dec.empty_past(1))
    assert dec.active_profile == 0 and trt.rec.switches == []  # prefill: profile 0, already active
    mask = np.ones((1, 4), np.int64)
    for n in range(3):  # decode: one switch to profile 1, then it stays
        tok = np.array([[int(logits[0, -1].argmax())]])
        logits, past = dec.step(tok, mask, np.array([[mask.shape[1] - 1]]), past)
        assert dec.active_profile == 1
        assert past[0].shape == (1, HEADS, 4 + n, HEAD_DIM)
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
    assert trt.rec.switches == [1]
    dec.step(*prefill_args([[1, 2]]), dec.empty_past(1))  # a new prompt: back to prefill
    assert dec.active_profile == 0 and trt.rec.switches == [1, 0] and dec.profile_switches == 2


def test_cache_flows_between_steps(monkeypatch, plan, gpu_ok):
    dec, _, _ = load(monkeypatch, plan)
    ids = np.array([[3, 5]])
    _, past = dec.step(*prefill_args(ids), dec.empty_past(1))
    tok = np.array([[9]])
    _, presents = dec.step(tok, np.ones((1, 3), np.int64), np.array([[2]]), past)
    for n, p in enumerate(presents):
        want = np.concatenate([new_kv(ids, n // 2, n % 2), new_kv(tok, n // 2, n % 2)], axis=2)
        np.testing.assert_array_equal(p, want.astype(np.float16))


def test_shape_outside_every_profile_lists_the_ranges(monkeypatch, plan, gpu_ok):
    dec, trt, _ = load(monkeypatch, plan)
    with pytest.raises(UserError) as e:
        dec.step(*prefill_args([list(range(9))]), dec.empty_past(1))  # seq 9 > prefill max 8
    msg = str(e.value)
    assert "input_ids [1, 9]" in msg and "past length 0" in msg
    assert "prefill (profile 0): input_ids [1..2, 1..8]" in msg
    assert "attention_mask [1..2, 1..8]" in msg and "past_key_values.0.key [1..2, 2, 0, 4]" in msg
    assert "decode (profile 1): input_ids [1..2, 1]" in msg and "past_key_values.0.key [1..2, 2, 1..15, 4]" in msg
    past = [np.zeros((1, HEADS, 16, HEAD_DIM), np.float16)] * (2 * LAYERS)
    with pytest.raises(UserError, match="past length 16"):  # decode past max 15
        dec.step(np.array([[1]]), np.ones((1, 17), np.int64), np.array([[16]]), past)
    with pytest.raises(UserError, match="no optimization profile"):  # batch 3
        dec.step(*prefill_args([[1], [2], [3]]), dec.empty_past(3))
    assert trt.rec.runs == 0 and trt.rec.switches == []


def test_int32_id_inputs_are_converted(monkeypatch, plan, gpu_ok):
    dec, _, _ = load(monkeypatch, plan, ids=DataType.INT32, kv=DataType.FLOAT)
    assert dec.inputs["input_ids"] == "int32" and dec.past_dtype is np.float32
    ids = np.array([[4, 6]], np.int64)
    logits, presents = dec.step(*prefill_args(ids), dec.empty_past(1))  # fake asserts int32 buffers
    assert int(logits[0, -1].argmax()) == 7 and presents[0].dtype == np.float32


def test_greedy_end_to_end(monkeypatch, plan, gpu_ok):
    dec, trt, _ = load(monkeypatch, plan)
    prompt, n = [3, 5], 5
    seen = []
    out = greedy(dec.step, dec.empty_past(1), prompt, n, on_token=seen.append)
    want, last = [], prompt[-1]
    for k in range(n):  # the fake's rule: (id + 1 + past length) % VOCAB
        last = (last + 1 + (0 if k == 0 else len(prompt) + k - 1)) % VOCAB
        want.append(last)
    assert out == want == seen
    assert trt.rec.runs == n and trt.rec.switches == [1]
    assert greedy(dec.step, dec.empty_past(1), prompt, n, stop=want[1]) == want[:2]


def test_engine_without_position_ids(monkeypatch, plan, gpu_ok):
    dec, _, _ = load(monkeypatch, plan, position_ids=False)
    assert "position_ids" not in dec.inputs
    assert greedy(dec.step, dec.empty_past(1), [1, 2, 3], 3)[0] == 4


def test_describe(monkeypatch, plan, gpu_ok):
    dec, _, _ = load(monkeypatch, plan)
    d = dec.describe()
    assert d["tensorrt"] == "10.3.0.30" and d["engine"] == str(plan) and d["gpu"].startswith("Fake GPU")
    assert [(p["index"], p["name"]) for p in d["profiles"]] == [(0, "prefill"), (1, "decode")]
    assert d["profiles"][1]["ranges"]["past_key_values.1.value"] == {
        "min": [1, HEADS, 1, HEAD_DIM], "opt": [1, HEADS, 8, HEAD_DIM], "max": [2, HEADS, 15, HEAD_DIM]}
    assert d["kv"] == {"layers": LAYERS, "kv_heads": HEADS, "head_dim": HEAD_DIM, "dtype": "float16"}
    json.dumps(d)


def test_profile_names_come_from_the_bundle(monkeypatch, plan, gpu_ok):
    bundle = plan.parent.parent
    doc = {"format": "epts-trt-engines", "version": 1, "engines": [
        {"engine": "engines/other.engine", "profiles": [{"name": "x"}, {"name": "y"}]},
        {"engine": "engines/level-2of4.engine", "profiles": [{"name": "prompt"}, {"name": "token"}]}]}
    (bundle / "engines.json").write_text(json.dumps(doc))
    dec, _, _ = load(monkeypatch, plan)
    assert dec.profile_names == ["prompt", "token"]


def test_missing_tensorrt_gives_the_status_error(monkeypatch, plan):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(UserError, match=r"tensorrt is not installed: pip install 'epts-export\[tensorrt\]'"):
        tr.TrtDecoder(plan)


def test_no_gpu_and_missing_plan(monkeypatch, plan, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt())
    monkeypatch.setattr(tr, "tensorrt_status", lambda: (False, "no CUDA GPU visible"))
    with pytest.raises(UserError, match="no CUDA GPU visible"):
        tr.TrtDecoder(plan, buffers=CpuBuffers())
    with pytest.raises(UserError, match="is missing: build it first"):
        tr.TrtDecoder(tmp_path / "nope.engine")


def test_torch_buffers_need_cuda():
    import torch

    if torch.cuda.is_available():  # pragma: no cover - CPU-only CI
        pytest.skip("a CUDA GPU is visible")
    with pytest.raises(UserError, match="no CUDA GPU visible"):
        tr._TorchCudaBuffers(0)


def test_plan_that_does_not_load(monkeypatch, plan, gpu_ok):
    with pytest.raises(UserError, match="not compatible with this version.*rebuild it here"):
        load(monkeypatch, plan, load_ok=False)


def test_unknown_inputs_are_rejected(monkeypatch, plan, gpu_ok):
    with pytest.raises(UserError, match="sparsity_level.*baked export"):
        load(monkeypatch, plan, extra_inputs=("sparsity_level",))


def test_wrong_number_of_past_tensors(monkeypatch, plan, gpu_ok):
    dec, _, _ = load(monkeypatch, plan)
    with pytest.raises(UserError, match="3 past tensors given"):
        dec.step(*prefill_args([[1]]), dec.empty_past(1)[:3])
