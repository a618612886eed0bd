"""TrtDecoder without TensorRT or CUDA: a fake ``tensorrt`` derived from, and checked against, the
real bindings of each TensorRT version (the ``api`` fixture of test_trt_engine), whose execution
context "runs" a known decoder by reading and writing the buffers behind the addresses it is given,
and whose refitter takes the weights it is handed by name; a stand-in for the weight builder and
its ONNX Runtime reference (``FakeLevels``); a CPU stand-in for the CUDA buffers (address -> numpy
array); and ``device.cuda.DeviceBuffers`` over a host stand-in for libcudart."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest

from epts_export.errors import UserError
from epts_export.device.interface import ENGINES_JSON, KVLayout, ShapeRange
from epts_export.device.ort import greedy
from epts_export.device.trt import runtime as tr
from epts_export.device.trt import spec as tspec
import trt_api
import trt_bindings
from test_trt_engine import api, fake_loggers, install, no_device, no_tensorrt, run_real  # noqa: F401 - fixtures

VOCAB, HEADS, HEAD_DIM, LAYERS = 32, 2, 4, 2
# (batch, seq, past) ranges, as epts-export bundles build them: prefill, decode, continue
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


def _weights_offset(weights: dict) -> int:
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
                self.engine.offset = _weights_offset(self.pending)
            return True

    return Weights, Refitter


def make_fake_trt(api: trt_api.Api, ids: str | None = None, kv: str = "HALF", position_ids=True,
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


@pytest.fixture
def plan(tmp_path):
    p = tmp_path / "engines" / "level-2of4.engine"
    p.parent.mkdir()
    p.write_bytes(b"PLAN")
    return p


@pytest.fixture
def refit_bundle(tmp_path):
    """A bundle whose engines.json lists one refittable engine for LEVELS, its weights from the
    bundle's weight builder (the source: w.up and w.down in decoder.weights, w.norm in model.onnx_data)."""
    root = tmp_path / "bundle"
    model = root / "model"
    tensors = {"w.up": tspec.TensorRef("decoder.weights", 0, 32, "float16", (4, 4)),
               "w.down": tspec.TensorRef("decoder.weights", 64, 32, "float16", (4, 4)),
               "w.norm": tspec.TensorRef("model.onnx_data", 0, 8, "float16", (4,))}
    source = tspec.WeightSource(model / "decoder.onnx", model / "decoder.weights", model,
                                {lv: k for k, lv in enumerate(LEVELS)}, tensors)
    ranges = [ShapeRange(n, **r) for n, r in (("prefill", PREFILL), ("decode", DECODE), ("continue", CONTINUE))]
    spec = tspec.EngineSpec(onnx=source.graph, engine=root / "engines" / "unstructured.engine", levels=list(LEVELS),
                            sparse=False, precision="fp16", profiles=ranges, kv=KVLayout(LAYERS, HEADS, HEAD_DIM),
                            workspace_mb=64, tactic_dram_mb=None, timing_cache=root / "engines" / "t.cache",
                            layer_info=root / "engines" / "unstructured.layers.json", refit=True,
                            refit_weights=source.prunable, source=source)
    model.mkdir(parents=True)
    tspec.write_engines(root, [spec], source)
    spec.engine.parent.mkdir(parents=True, exist_ok=True)
    spec.engine.write_bytes(b"PLAN")
    return spec


@pytest.fixture
def gpu_ok(monkeypatch):
    monkeypatch.setattr(tr, "tensorrt_status", lambda: (True, "TensorRT 10.3.0.30, Fake GPU (sm_87)"))


@pytest.fixture
def load(api, install, gpu_ok):
    """load(plan, level=None, weights=None, **fake options) -> (TrtDecoder, fake tensorrt, buffers),
    the fake checked against ``api``."""
    def open_(plan, level=None, weights=None, **kw):
        trt = install(make_fake_trt(api, **kw))
        buffers = CpuBuffers()
        trt.rec.memory = buffers
        messages = []
        dec = tr.TrtDecoder(plan, log=messages.append, buffers=buffers, level=level, weights=weights)
        dec.messages = messages
        return dec, trt, buffers

    return open_


def prefill_args(ids):
    ids = np.asarray(ids, np.int64)
    mask = np.ones_like(ids)
    return ids, mask, np.cumsum(mask, axis=1) - 1


# --------------------------------------------------------------------------------------------


def test_loads_and_discovers_io(load, plan):
    dec, trt, _ = load(plan)
    assert trt.rec.plan == b"PLAN" and trt.rec.contexts == 1
    assert dec.past_dtype is np.float16 and (dec.kv_heads, dec.head_dim, dec.layers) == (HEADS, HEAD_DIM, LAYERS)
    assert dec.past_names == [f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
    assert dec.output_names[0] == "logits" and dec.output_names[1:] == [f"present.{i}.{k}" for i in range(LAYERS)
                                                                        for k in ("key", "value")]
    assert dec.profile_names == ["prefill", "decode", "continue"] and dec.active_profile == 0
    assert dec.levels == [] and dec.level is None  # no bundle around this plan
    past = dec.empty_past(2)
    assert len(past) == 2 * LAYERS and all(p.shape == (2, HEADS, 0, HEAD_DIM) and p.dtype == np.float16 for p in past)


def test_step_outputs_follow_get_tensor_shape(load, plan):
    dec, trt, buffers = load(plan)
    ids = np.array([[3, 5, 7], [1, 2, 4]])
    logits, presents = dec.step(*prefill_args(ids), dec.empty_past(2))
    assert logits.shape == (2, 3, VOCAB) and logits.dtype == np.float32
    assert (logits.argmax(-1) == next_token(ids, 0, 3)).all()
    assert len(presents) == 2 * LAYERS
    for n, p in enumerate(presents):
        assert p.shape == (2, HEADS, 3, HEAD_DIM) and p.dtype == np.float16
        np.testing.assert_array_equal(p, new_kv(ids, n // 2, n % 2).astype(np.float16))
    # output buffers were allocated with the context's shapes and the engine's dtypes
    allocs = [a for a in buffers.allocs if a[0] != (1,)]  # (1,): the dummies behind the empty past
    assert allocs[0] == ((2, 3, VOCAB), "float32")
    assert allocs[1:] == [((2, HEADS, 3, HEAD_DIM), "float16")] * (2 * LAYERS)
    assert buffers.syncs == 1 and trt.rec.runs == 1


def test_zero_length_past_gets_a_dummy_buffer(load, plan):
    dec, _, buffers = load(plan)
    dec.step(*prefill_args([[3, 5]]), dec.empty_past(1))
    dummies = [a for a in buffers.allocs if a[0] == (1,)]
    assert dummies == [((1,), "float16")] * (2 * LAYERS)  # one per past tensor, in the KV dtype
    assert all(addr != 0 for addr in dec.context._target.addresses.values())  # the fake behind the checked proxy


def test_profile_selection_switches_only_when_needed(load, plan):
    dec, trt, _ = load(plan)
    ids = np.array([[3, 5, 7]])
    logits, past = dec.step(*prefill_args(ids), dec.empty_past(1))
    assert dec.active_profile == 0 and trt.rec.switches == []  # prefill: profile 0, already active
    mask = np.ones((1, 4), np.int64)
    for n in range(3):  # decode: one switch to profile 1, then it stays (continue fits too, but comes later)
        tok = np.array([[int(logits[0, -1].argmax())]])
        logits, past = dec.step(tok, mask, np.array([[mask.shape[1] - 1]]), past)
        assert dec.active_profile == 1
        assert past[0].shape == (1, HEADS, 4 + n, HEAD_DIM)
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
    assert trt.rec.switches == [1]
    dec.step(*prefill_args([[1, 2]]), dec.empty_past(1))  # a new prompt: back to prefill
    assert dec.active_profile == 0 and trt.rec.switches == [1, 0] and dec.profile_switches == 2


def test_a_prompt_that_continues_a_cache(load, plan):
    """A second chat turn: several new tokens on a non-empty cache run on the continue profile."""
    dec, trt, _ = load(plan)
    first = np.array([[3, 5]])
    _, past = dec.step(*prefill_args(first), dec.empty_past(1))
    turn = np.array([[7, 9, 11]])
    mask = np.ones((1, 5), np.int64)
    logits, presents = dec.step(turn, mask, np.array([[2, 3, 4]]), past)
    assert dec.active_profile == 2 and dec.profile_names[2] == "continue" and trt.rec.switches == [2]
    assert (logits.argmax(-1) == next_token(turn, 2, 3)).all()  # computed on the cache of the first turn
    for n, p in enumerate(presents):
        want = np.concatenate([new_kv(first, n // 2, n % 2), new_kv(turn, n // 2, n % 2)], axis=2)
        np.testing.assert_array_equal(p, want.astype(np.float16))
    tok = np.array([[int(logits[0, -1].argmax())]])
    logits, presents = dec.step(tok, np.ones((1, 6), np.int64), np.array([[5]]), presents)  # decode goes on
    assert dec.active_profile == 1 and presents[0].shape == (1, HEADS, 6, HEAD_DIM)
    assert int(logits[0, -1].argmax()) == int(next_token(tok, 5, 3)[0, 0])


def test_cache_flows_between_steps(load, plan):
    dec, _, _ = load(plan)
    ids = np.array([[3, 5]])
    _, past = dec.step(*prefill_args(ids), dec.empty_past(1))
    tok = np.array([[9]])
    _, presents = dec.step(tok, np.ones((1, 3), np.int64), np.array([[2]]), past)
    for n, p in enumerate(presents):
        want = np.concatenate([new_kv(ids, n // 2, n % 2), new_kv(tok, n // 2, n % 2)], axis=2)
        np.testing.assert_array_equal(p, want.astype(np.float16))


def test_shape_outside_every_profile_lists_the_ranges(load, plan):
    dec, trt, _ = load(plan)
    with pytest.raises(UserError) as e:
        dec.step(*prefill_args([list(range(9))]), dec.empty_past(1))  # seq 9 > prefill max 8
    msg = str(e.value)
    assert "input_ids [1, 9]" in msg and "past length 0" in msg
    assert "prefill (profile 0): input_ids [1..2, 1..8]" in msg
    assert "attention_mask [1..2, 1..8]" in msg and "past_key_values.0.key [1..2, 2, 0, 4]" in msg
    assert "decode (profile 1): input_ids [1..2, 1]" in msg and "past_key_values.0.key [1..2, 2, 1..15, 4]" in msg
    assert "continue (profile 2): input_ids [1..2, 1..4]" in msg
    past = [np.zeros((1, HEADS, 16, HEAD_DIM), np.float16)] * (2 * LAYERS)
    with pytest.raises(UserError, match="past length 16"):  # decode past max 15
        dec.step(np.array([[1]]), np.ones((1, 17), np.int64), np.array([[16]]), past)
    past = [np.zeros((1, HEADS, 13, HEAD_DIM), np.float16)] * (2 * LAYERS)
    with pytest.raises(UserError, match="past length 13"):  # a continuation past the continue box
        dec.step(np.array([[1, 2]]), np.ones((1, 15), np.int64), np.array([[13, 14]]), past)
    with pytest.raises(UserError, match="no optimization profile"):  # batch 3
        dec.step(*prefill_args([[1], [2], [3]]), dec.empty_past(3))
    assert trt.rec.runs == 0 and trt.rec.switches == []


def test_int32_id_inputs_are_converted(load, plan):
    dec, _, _ = load(plan, ids="INT32", kv="FLOAT")
    assert dec.inputs["input_ids"] == "int32" and dec.past_dtype is np.float32
    ids = np.array([[4, 6]], np.int64)
    logits, presents = dec.step(*prefill_args(ids), dec.empty_past(1))  # fake asserts int32 buffers
    assert int(logits[0, -1].argmax()) == 10 and presents[0].dtype == np.float32


def test_greedy_end_to_end(load, plan):
    dec, trt, _ = load(plan, offset=0)
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


def test_engine_without_position_ids(load, plan):
    dec, _, _ = load(plan, position_ids=False, offset=0)
    assert "position_ids" not in dec.inputs
    assert greedy(dec.step, dec.empty_past(1), [1, 2, 3], 3)[0] == 4


def test_describe(load, plan, api):
    dec, _, _ = load(plan)
    d = dec.describe()
    assert d["tensorrt"] == api.version and d["engine"] == str(plan) and d["gpu"].startswith("Fake GPU")
    assert [(p["index"], p["name"]) for p in d["profiles"]] == [(0, "prefill"), (1, "decode"), (2, "continue")]
    assert d["profiles"][1]["ranges"]["past_key_values.1.value"] == {
        "min": [1, HEADS, 1, HEAD_DIM], "opt": [1, HEADS, 8, HEAD_DIM], "max": [2, HEADS, 15, HEAD_DIM]}
    assert d["kv"] == {"layers": LAYERS, "kv_heads": HEADS, "head_dim": HEAD_DIM, "dtype": "float16"}
    assert d["levels"] == [] and d["refittable"] is True and d["refits"] == 0
    json.dumps(d)


def test_latency_times_engine_runs_with_inputs_on_the_device(load, plan):
    """latency() binds device-resident inputs once and times execute + sync only (no host copies):
    the prefill shape runs on profile 0, a decode step on a cache on profile 1; the median of the
    timed runs after the warm-up is returned."""
    dec, trt, buffers = load(plan)
    ticks = iter(range(1000))
    durations = [0.004, 0.002, 0.009, 0.002, 0.003, 0.001, 0.003]  # 2 warm-up runs, then 5 timed
    now = [0.0]

    def clock():
        k = next(ticks)
        if k % 2:  # the end of a run
            now[0] += durations[k // 2]
        return now[0]

    t = dec.latency(1, 8, 0, repeats=5, warmup=2, clock=clock)
    assert t == pytest.approx(0.002)  # median of 0.009, 0.002, 0.003, 0.001, 0.003 ... sorted: .001 .002 .003 .003 .009
    assert trt.rec.runs == 7 and dec.active_profile == 0
    ctx = dec.context._target
    assert ctx.shapes["input_ids"] == (1, 8) and ctx.shapes["past_key_values.0.key"] == (1, HEADS, 0, HEAD_DIM)
    dec.latency(1, 1, 8, repeats=3, warmup=1)
    assert dec.active_profile == 1 and ctx.shapes["attention_mask"] == (1, 9) and trt.rec.runs == 11


def test_profile_names_and_levels_come_from_the_bundle(load, refit_bundle):
    dec, _, _ = load(refit_bundle.engine)
    assert dec.profile_names == ["prefill", "decode", "continue"]
    assert dec.levels == ["0.3", "0.5", "0.7"] and dec.level == "0.3"  # the plan holds the build level's weights
    bundle = refit_bundle.engine.parent.parent
    doc = json.loads((bundle / ENGINES_JSON).read_text())
    doc["engines"][0]["profiles"][2]["name"] = "chunk"
    (bundle / ENGINES_JSON).write_text(json.dumps(doc))
    dec, _, _ = load(refit_bundle.engine)
    assert dec.profile_names == ["prefill", "decode", "chunk"]


def test_missing_tensorrt_gives_the_status_error(monkeypatch, plan):
    no_tensorrt(monkeypatch)
    with pytest.raises(UserError, match=r"tensorrt is not installed: pip install 'epts-export\[tensorrt\]'"):
        tr.TrtDecoder(plan)


def test_no_gpu_and_missing_plan(api, install, monkeypatch, plan, tmp_path):
    install(make_fake_trt(api))
    monkeypatch.setattr(tr, "tensorrt_status", lambda: (False, "no CUDA GPU visible"))
    with pytest.raises(UserError, match="no CUDA GPU visible"):
        tr.TrtDecoder(plan, buffers=CpuBuffers())
    with pytest.raises(UserError, match="is missing: build it first"):
        tr.TrtDecoder(tmp_path / "nope.engine")


def test_a_runtime_that_cannot_start_is_one_line(api, install, gpu_ok, plan):
    """The real Runtime raises TypeError where TensorRT cannot start (the probe may have passed on torch's word)."""
    fake = make_fake_trt(api)
    fake.Runtime = no_device
    install(fake)
    with pytest.raises(UserError) as e:
        tr.TrtDecoder(plan, buffers=CpuBuffers())
    assert str(e.value).startswith(f"TensorRT {api.version} could not create a Runtime (pybind11::init(): factory "
                                   "function returned nullptr): no CUDA GPU visible") and "\n" not in str(e.value)


def test_a_refused_profile_switch_is_an_error(load, plan):
    """set_optimization_profile_async returns a bool: False must not run on the old profile."""
    dec, trt, _ = load(plan, switch_ok=False)
    _, past = dec.step(*prefill_args([[3, 5]]), dec.empty_past(1))
    with pytest.raises(RuntimeError, match="refused to switch .* to profile decode"):
        dec.step(np.array([[1]]), np.ones((1, 3), np.int64), np.array([[2]]), past)
    assert trt.rec.runs == 1 and dec.active_profile == 0


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


def test_device_buffers_copy_reuse_and_free():
    """device.cuda.DeviceBuffers (what TrtDecoder uses instead of torch): arrays round-trip in every
    dtype (bfloat16 as float32 on the host, rounded to nearest even), a dropped block is reused for
    the same size without another cudaMalloc, close() frees every block once."""
    from epts_export.device.cuda import DeviceBuffers

    rt = HostCudart()
    buf = DeviceBuffers(rt, device=0)
    for dtype, host in (("float16", np.float16), ("float32", np.float32), ("int64", np.int64), ("int32", np.int32)):
        a = (np.arange(24).reshape(2, 3, 4) - 5).astype(host)
        dev = buf.to_device(a, dtype)
        assert dev.shape == a.shape and buf.ptr(dev) in rt.blocks
        np.testing.assert_array_equal(buf.to_host(dev), a)
    bf = np.array([1.0, 1.00390625, 1.005859375, -3.14159, 3.0e38], np.float32)
    back = buf.to_host(buf.to_device(bf, "bfloat16"))
    assert back.dtype == np.float32 and list(back[:4]) == [1.0, 1.0, 1.0078125, -3.140625]  # what torch's bfloat16 gives
    mallocs = sum(c[0] == "malloc" for c in rt.calls)
    x = buf.empty((4, 8), "float16")
    ptr = x.ptr
    del x
    y = buf.empty((8, 4), "float16")  # the same bytes: the freed block comes back
    assert y.ptr == ptr and sum(c[0] == "malloc" for c in rt.calls) == mallocs + (0 if mallocs else 1)
    np.testing.assert_array_equal(buf.to_host(buf.zeros((3, 3), "float32")), np.zeros((3, 3), np.float32))
    assert buf.device_name() == "Host GPU (sm_87, cuda:0)"
    held = len(rt.blocks)
    buf.close()
    assert not rt.blocks and sum(c[0] == "free" for c in rt.calls) == held and ("stream_destroy", 0x5) in rt.calls
    del y  # after close: released to nothing, freed once
    with pytest.raises(UserError, match="no CUDA GPU visible"):
        DeviceBuffers(HostCudart(devices=0))
    with pytest.raises(UserError, match="CUDA device 3 does not exist: 1 visible"):
        DeviceBuffers(HostCudart(), device=3)


def test_without_libcudart_device_memory_is_one_line(monkeypatch):
    """No CUDA runtime library anywhere (this CI machine): one UserError saying where to get it."""
    from epts_export.device import cuda

    monkeypatch.setattr(cuda, "_candidates", lambda: ["/nonexistent/libcudart.so.12"])
    with pytest.raises(UserError, match="libcudart.* was not found.*EPTS_CUDART"):
        cuda.DeviceBuffers()


def test_plan_that_does_not_load(load, plan):
    with pytest.raises(UserError, match="not compatible with this version.*rebuild it here"):
        load(plan, load_ok=False)


def test_unknown_inputs_are_rejected(load, plan):
    with pytest.raises(UserError, match="sparsity_level.*baked export"):
        load(plan, extra_inputs=("sparsity_level",))


def test_wrong_number_of_past_tensors(load, plan):
    dec, _, _ = load(plan)
    with pytest.raises(UserError, match="3 past tensors given"):
        dec.step(*prefill_args([[1]]), dec.empty_past(1)[:3])


# --------------------------------------------------------------------------------------------
# levels: one refittable engine, switched by refitting the weight builder's weights, each checked


def test_set_level_refits_from_the_weight_builder_and_checks(load, refit_bundle):
    """A switch takes the level's prunable weights from the weight builder, sets them by name, then
    what TensorRT fused with them (read from the bundle), refits, and checks one prefill against
    ONNX Runtime at that level before the level is served."""
    levels = FakeLevels()
    dec, trt, buffers = load(refit_bundle.engine, weights=levels)
    assert dec.level == "0.3" and dec.checked == {}  # the plan holds 0.3's weights, but nothing is served yet
    ids = np.array([[3, 5]])
    with pytest.raises(UserError, match="no level is served yet"):
        dec.step(*prefill_args(ids), dec.empty_past(1))
    out = dec.set_level("0.3")  # the build level: no refit, only the check
    assert out["switched"] is False and out["check"]["passed"] and trt.rec.refits == 0
    assert levels.calls == [("reference", "0.3")]
    logits, _ = dec.step(*prefill_args(ids), dec.empty_past(1))
    assert (logits.argmax(-1) == next_token(ids, 0, LEVELS["0.3"])).all()
    syncs = buffers.syncs
    switch = dec.set_level("0.7")
    assert switch["switched"] and switch["level"] == "0.7" and dec.level == "0.7" and switch["refit_s"] >= 0
    assert switch["weights"] == 2 and switch["check"]["passed"] and buffers.syncs > syncs  # idle GPU first
    assert trt.rec.named == [*WEIGHTS, "w.norm"]  # the level's weights, then what TensorRT fused with them
    assert ("tensor", "w.norm") in levels.calls and ("arrays", "0.7") in levels.calls
    logits, _ = dec.step(*prefill_args(ids), dec.empty_past(1))
    assert (logits.argmax(-1) == next_token(ids, 0, LEVELS["0.7"])).all()  # the 0.7 weights run now
    dec.set_level("0.3")  # and back: refit and checked again
    logits, _ = dec.step(*prefill_args(ids), dec.empty_past(1))
    assert (logits.argmax(-1) == next_token(ids, 0, LEVELS["0.3"])).all()
    assert dec.refits == 2 and trt.rec.refits == 2 and dec.describe()["level"] == "0.3"
    assert [c for c in levels.calls if c[0] == "reference"] == [("reference", lv) for lv in ("0.3", "0.7", "0.3")]


def test_a_refit_that_drops_a_weight_is_refused(load, refit_bundle):
    """TensorRT 11.3's notes list a refit that can drop a GEMM bias: the refit reports success, the
    engine keeps computing the old level. The check catches it (exit 3) and the level is not served."""
    dec, trt, _ = load(refit_bundle.engine, weights=FakeLevels(), drops="w.down")
    dec.set_level("0.3")
    with pytest.raises(UserError, match=r"TensorRT level 0.5 .* drifts from ONNX Runtime .* not served") as e:
        dec.set_level("0.5")
    assert e.value.exit_code == 3 and trt.rec.refits == 1
    with pytest.raises(UserError, match="no level is served yet"):
        dec.step(*prefill_args([[3, 5]]), dec.empty_past(1))


def test_open_an_engine_at_a_level(api, install, gpu_ok, refit_bundle):
    """TrtDecoder(engine, level=...) serves that level from the first step: what a caller does for a
    bundle engine that serves several levels (its plan holds only the build level's weights)."""
    trt = install(make_fake_trt(api))
    trt.rec.memory = buffers = CpuBuffers()
    dec = tr.TrtDecoder(refit_bundle.engine, log=lambda m: None, buffers=buffers, level="0.5", weights=FakeLevels())
    assert dec.level == "0.5" and dec.load_switch["switched"] and dec.load_switch["check"]["passed"]
    logits, _ = dec.step(*prefill_args([[2]]), dec.empty_past(1))
    assert int(logits[0, -1].argmax()) == (2 + 1 + LEVELS["0.5"]) % VOCAB
    trt = install(make_fake_trt(api))  # a fresh load of the plan: the build level's weights again
    trt.rec.memory = buffers
    dec = tr.TrtDecoder(refit_bundle.engine, log=lambda m: None, buffers=buffers, level="0.3", weights=FakeLevels())
    assert dec.load_switch["switched"] is False and trt.rec.refits == 0  # the plan's own level: no refit, checked
    assert dec.load_switch["check"]["passed"]


def test_an_engine_outside_a_bundle_runs_without_levels(load, plan):
    dec, _, _ = load(plan)
    assert dec.weights is None and dec.levels == []
    logits, _ = dec.step(*prefill_args([[1]]), dec.empty_past(1))  # nothing to check it against: it runs
    assert int(logits[0, -1].argmax()) == (1 + 1 + 3) % VOCAB
    with pytest.raises(UserError, match="no level weights"):
        dec.set_level("0.5")


def test_level_switch_errors(load, refit_bundle, plan):
    dec, trt, _ = load(refit_bundle.engine, weights=FakeLevels())
    with pytest.raises(UserError, match="serves level.*0.3, 0.5, 0.7, not 2:4"):
        dec.set_level("2:4")
    dec, _, _ = load(plan, refittable=False, weights=FakeLevels())
    with pytest.raises(UserError, match="built without refittable weights"):
        dec.set_level("0.5")
    dec, trt, _ = load(refit_bundle.engine, refit_ok=False, weights=FakeLevels())
    with pytest.raises(RuntimeError, match="failed to refit"):
        dec.set_level("0.5")
    assert dec.level is None  # no level is served after a failed switch
    dec, _, _ = load(refit_bundle.engine, fused=("w.missing",), weights=FakeLevels())
    with pytest.raises(UserError, match="w.missing, which the engine graph does not hold"):
        dec.set_level("0.5")
    levels = FakeLevels({**LEVELS})
    levels.arrays = lambda level: {"w.gate": np.zeros((4, 4), np.float16)}  # a weight the engine cannot refit
    dec, _, _ = load(refit_bundle.engine, weights=levels)
    with pytest.raises(UserError, match="cannot refit 1 of the level's weights .*w.gate"):
        dec.set_level("0.5")


@pytest.mark.parametrize("version", list(trt_bindings.VERSIONS))
def test_real_runtime_without_a_gpu(version, tmp_path):
    """TrtDecoder on the real bindings of each version: Runtime's TypeError becomes one UserError line."""
    plan = tmp_path / "x.engine"
    plan.write_bytes(b"PLAN")
    code = ("import sys, json; sys.modules['tensorrt'] = None; sys.path.insert(0, sys.argv[1])\n"
            "from epts_export.device.trt import runtime as tr\n"
            "tr.tensorrt_status = lambda: (True, 'torch says there is a GPU')\n"
            "try:\n    tr.TrtDecoder(sys.argv[2], buffers=object())\nexcept tr.UserError as e:\n    print(json.dumps(str(e)))\n")
    res = run_real(version, ["-c", code, str(Path(__file__).resolve().parents[1]), str(plan)], isolated=False)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout).startswith(f"TensorRT {version} could not create a Runtime (pybind11::init(): "
                                             "factory function returned nullptr): no CUDA GPU visible")


# --------------------------------------------------------------------------------------------
# which engines a bundle needs


def test_engine_specs_share_one_refit_engine_and_cap_the_context(tmp_path):
    """deploy.engines.engine_specs for the Jetson and levels 0.3, 0.5, 0.7, 2:4 of a 2048-token model:
    an elastic bundle gets one refit spec for the three unstructured levels (its prunable weights
    named, built with 0.3's) and a sparse spec for 2:4, both from the weight builder's graph; a
    baked-layout bundle one engine per level from its own graph; every profile cut to 2048 tokens."""
    from epts_export.core.levels import parse_levels
    from epts_export.deploy.engines import engine_specs
    from epts_export.deploy.targets import resolve_target

    target = resolve_target("jetson")
    levels = parse_levels("0.3,0.5,0.7,2:4")
    config = types.SimpleNamespace(num_attention_heads=4, hidden_size=64, num_hidden_layers=LAYERS,
                                   num_key_value_heads=HEADS, head_dim=HEAD_DIM, max_position_embeddings=2048)
    model = tmp_path / "model"
    source = tspec.WeightSource(model / "decoder.onnx", model / "decoder.weights", model,
                                {"0.3": 0, "0.5": 1, "0.7": 2, "2:4": 3},
                                {"w.up": tspec.TensorRef("decoder.weights", 0, 32, "float16", (4, 4)),
                                 "w.down": tspec.TensorRef("decoder.weights", 64, 32, "float16", (4, 4)),
                                 "w.norm": tspec.TensorRef("model.onnx_data", 0, 8, "float16", (4,))})
    specs = engine_specs(tmp_path, target, levels, config, source)
    shared = specs[levels[0]]
    assert specs[levels[1]] is shared and specs[levels[2]] is shared and specs[levels[3]] is not shared
    assert shared.levels == ["0.3", "0.5", "0.7"] and shared.refit and shared.refit_weights == ["w.up", "w.down"]
    assert shared.onnx == model / "decoder.onnx" and shared.engine.name == "unstructured.engine"
    assert shared.build_level == "0.3" and not shared.sparse and shared.source is source
    sparse = specs[levels[3]]
    assert sparse.levels == ["2:4"] and sparse.sparse and not sparse.refit and sparse.engine.name == "level-2of4.engine"
    assert sparse.onnx == model / "decoder.onnx" and sparse.build_level == "2:4" and sparse.source is source
    assert shared.context == {"max_tokens": 2048, "target_max_context": 4096, "model_max_positions": 2048, "capped": True}
    assert [p.name for p in shared.profiles] == ["prefill", "decode", "continue"]
    assert all(p.seq[2] + p.past[2] <= 2048 for p in shared.profiles) and shared.profiles[1].past[2] == 2047
    baked = engine_specs(tmp_path, target, levels, config)
    assert [s.levels for s in baked.values()] == [["0.3"], ["0.5"], ["0.7"], ["2:4"]]
    assert baked[levels[1]].onnx == tmp_path / "level-0.5" / "model.onnx" and not any(s.refit for s in baked.values())
    config.max_position_embeddings = 8192  # a longer model than the target: the target's 4096 stand
    one = engine_specs(tmp_path, target, levels[:1], config, source)[levels[0]]
    assert one.context["capped"] is False and one.profiles == list(target.profiles.values()) and not one.refit


# --------------------------------------------------------------------------------------------
# what the engines bought: the report build_engines.py writes


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


def test_the_report_times_each_engine_and_says_what_2_4_bought(tmp_path):
    """measure_engines: prefill (1 x 512) and decode (1 token on a 512-token cache) per engine, cut to
    what the profiles take; the refit engine switched through its levels (refit time, check); the
    2:4 engine against the engine of the nearest unstructured level; report.json and its table; a
    level that drifts is refused, not served."""
    from epts_export.device.trt.report import REPORT_FILE, fitted_shapes, measure_engines, nearest_dense, table, verdict

    ranges = [ShapeRange("prefill", (1, 1, 1), (1, 128, 2048), (0, 0, 0)), ShapeRange("decode", (1, 1, 1), (1, 1, 1),
                                                                                       (0, 512, 2047))]
    common = dict(precision="fp16", profiles=ranges, kv=KVLayout(LAYERS, HEADS, HEAD_DIM), workspace_mb=64,
                  tactic_dram_mb=None, timing_cache=tmp_path / "engines" / "t.cache")
    dense = tspec.EngineSpec(onnx=tmp_path / "model" / "decoder.onnx", engine=tmp_path / "engines" / "unstructured.engine",
                             levels=["0.3", "0.5", "0.7"], sparse=False, layer_info=tmp_path / "engines" / "u.layers.json",
                             refit=True, **common)
    sparse = tspec.EngineSpec(onnx=tmp_path / "model" / "decoder.onnx", engine=tmp_path / "engines" / "level-2of4.engine",
                              levels=["2:4"], sparse=True, layer_info=tmp_path / "engines" / "s.layers.json", **common)
    assert fitted_shapes(dense) == {"prefill": (512, 0), "decode": (1, 512)}
    short = tspec.EngineSpec(**{**dense.__dict__, "profiles": [ShapeRange("p", (1, 1, 1), (1, 8, 256), (0, 0, 0)),
                                                               ShapeRange("d", (1, 1, 1), (1, 1, 1), (0, 8, 255))]})
    assert fitted_shapes(short) == {"prefill": (256, 0), "decode": (1, 255)}  # a 256-token model
    assert nearest_dense("2:4", ["0.3", "0.5", "0.7"]) == "0.5" and nearest_dense("2:4", ["0.4", "0.6"]) == "0.4"
    opened = {}

    def open_engine(spec, level):
        times = {"prefill": 0.012, "decode": 0.004} if not spec.sparse else {"prefill": 0.010, "decode": 0.004}
        opened[spec.engine.name] = TimedEngine(spec, level, times, drifts={"0.7"})
        return opened[spec.engine.name]

    builds = {"level-2of4.engine": {"sparse_report": {"eligible": ["a", "b", "c"], "picked": ["b"], "layers": 9,
                                                      "myelin": 0, "source": "inspector+log"}}}
    report = measure_engines(tmp_path, [dense, dense, sparse], open_engine, builds, log=lambda m: None)
    assert opened["unstructured.engine"].calls == [(1, 512, 0), (1, 1, 512)]
    e_dense, e_sparse = report["engines"]
    assert e_dense["latency_ms"] == {"prefill": 12.0, "decode": 4.0} and e_sparse["latency_ms"] == {"prefill": 10.0, "decode": 4.0}
    assert e_sparse["sparsity"] == {"eligible": 3, "picked": 1, "picked_layers": ["b"], "source": "inspector+log"}
    assert e_dense["sparsity"]["source"] == "none"  # no layer file was written for it here
    assert e_sparse["speedup"] == {"2:4": {"against": "0.5", "prefill": 1.2, "decode": 1.0}}
    assert report["verdicts"] == ["2:4: prefill 1.20x, decode 1.00x the dense engine (level 0.5) on Orin (sm_87, cuda:0) "
                                  "with TensorRT 10.3.0.30"]
    assert report["levels"]["0.3"]["refit_s"] == 0.0 and report["levels"]["0.5"]["refit_s"] == 0.25
    assert report["refused"] == ["0.7"] and not report["levels"]["0.7"]["served"]
    assert json.loads((tmp_path / REPORT_FILE).read_text())["verdicts"] == report["verdicts"]
    lines = table(report)
    assert lines[1].split()[:2] == ["unstructured.engine", "0.3,"] and "1/3" in lines[2]
    assert any(line.startswith("  level 0.7: REFUSED: TensorRT level 0.7 drifts") for line in lines)
    assert any("level 0.5: refit 0.250 s, check vs ONNX Runtime passed" in line for line in lines)
    assert verdict("2:4", "0.5", {"prefill": 1.02, "decode": 0.98}, "Orin") == (
        "2:4 buys nothing on Orin: prefill 1.02x, decode 0.98x the dense engine (level 0.5)")
    assert "no dense engine in this bundle" in verdict("2:4", None, None, "Orin")
