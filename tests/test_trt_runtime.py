"""TrtDecoder without TensorRT or CUDA: a fake ``tensorrt`` derived from, and checked against, the
real bindings of each TensorRT version (the ``api`` fixture of test_trt_engine), whose execution
context "runs" a known decoder by reading and writing the buffers behind the addresses it is given,
and whose refitter really reads the level graphs it is handed; and a CPU stand-in for the
torch-CUDA buffers (address -> numpy array)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from epts_export.errors import UserError
from epts_export.interface import ShapeRange
from epts_export.onnx.runtime import greedy
from epts_export.trt import builder as te
from epts_export.trt import refit as trefit
from epts_export.trt import runtime as tr
from epts_export.trt import scripts as ts
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


def write_level_graph(path: Path, value: float, external: bool = False, extra_node: bool = False) -> Path:
    """A tiny ONNX graph standing for one level: the weights in WEIGHTS hold ``value``, w.norm 1."""
    inits = [numpy_helper.from_array(np.full((4, 4), value, np.float16), name) for name in WEIGHTS]
    inits.append(numpy_helper.from_array(np.ones((4,), np.float16), "w.norm"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4, 4])
    nodes = [helper.make_node("MatMul", ["x", "w.up"], ["h"]), helper.make_node("MatMul", ["h", "w.down"], ["y"])]
    if extra_node:
        nodes.insert(1, helper.make_node("Relu", ["h"], ["h2"]))
    model = helper.make_model(helper.make_graph(nodes, "level", [x], [y], inits))
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx_data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


def _weights_offset(weights: dict) -> int:
    up, down = weights.get("w.up"), weights.get("w.down")
    assert up is not None and down is not None and float(up.flat[0]) == float(down.flat[0]), "refit both or neither"
    return int(float(up.flat[0]))


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
            out[...] = np.eye(VOCAB, dtype=np.float32)[next_token(ids, past, self.engine.offset)] * 5.0 - 1.0
            for i in range(LAYERS):
                for kind, k in enumerate(("key", "value")):
                    full = np.concatenate([arrays[f"past_key_values.{i}.{k}"].astype(np.float32), new_kv(ids, i, kind)], axis=2)
                    dst = mem[self.addresses[f"present.{i}.{k}"]]
                    assert dst.shape == full.shape and dst.dtype == NP[io.kv]
                    dst[...] = full.astype(dst.dtype)
            return True

    return Context


def fake_refit_classes(rec, refit_ok: bool, parser_errors, fused):
    """(Weights, Refitter, OnnxParserRefitter): a refit sets the engine's offset from the weights it
    was handed, which the level graphs (write_level_graph) hold."""
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
            self.engine.offset = _weights_offset(self.pending)
            return True

    class ParserError:
        def __init__(self, text):
            self.text = text

        def desc(self):
            return self.text

    class OnnxParserRefitter:
        def __init__(self, refitter, logger):
            self.refitter, self.num_errors = refitter, len(parser_errors)

        def refit_from_file(self, model):
            rec.refit_files.append(model)
            if parser_errors:
                return False
            for t in onnx.load(model).graph.initializer:  # what the real one does: every initializer, by name
                self.refitter.pending[t.name] = numpy_helper.to_array(t)
            return True

        def get_error(self, index):
            return ParserError(parser_errors[index])

    return Weights, Refitter, OnnxParserRefitter


def make_fake_trt(api: trt_api.Api, ids: str | None = None, kv: str = "HALF", position_ids=True,
                  profiles=(PREFILL, DECODE, CONTINUE), extra_inputs=(), load_ok=True, refittable=True,
                  switch_ok=True, refit_ok=True, parser_errors=(), fused=("w.norm",), offset=3):
    """A fake ``tensorrt`` of ``api``'s version: the real enums; an engine whose outputs depend on its
    weights (``offset``: built with level 0.3's); a refitter that reads the real level graphs.
    ``ids`` defaults to INT64 where the version has it (8.6 engines take int32)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = api.version
    enums = trt_api.enums(api)
    trt.DataType, trt.TensorIOMode, severity = enums["DataType"], enums["TensorIOMode"], enums["ILogger.Severity"]
    ids = ids or ("INT64" if "INT64" in trt.DataType.__members__ else "INT32")
    rec = types.SimpleNamespace(switches=[], runs=0, contexts=0, plan=None, named=[], refits=0, refit_files=[], memory=None)
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
    trt.Weights, trt.Refitter, parser_refitter = fake_refit_classes(rec, refit_ok, parser_errors, fused)
    if api.has("OnnxParserRefitter"):
        trt.OnnxParserRefitter = parser_refitter
    return trt


@pytest.fixture
def plan(tmp_path):
    p = tmp_path / "engines" / "level-2of4.engine"
    p.parent.mkdir()
    p.write_bytes(b"PLAN")
    return p


@pytest.fixture
def refit_bundle(tmp_path):
    """A bundle whose engines.json lists one refittable engine for LEVELS, with their graphs."""
    root = tmp_path / "bundle"
    graphs = {lv: write_level_graph(root / f"level-{lv}" / "model.onnx", v) for lv, v in LEVELS.items()}
    ranges = [ShapeRange(n, **r) for n, r in (("prefill", PREFILL), ("decode", DECODE), ("continue", CONTINUE))]
    spec = te.EngineSpec(onnx=graphs["0.3"], engine=root / "engines" / "unstructured.engine", levels=list(LEVELS),
                         sparse=False, precision="fp16", profiles=ranges, kv=te.KVLayout(LAYERS, HEADS, HEAD_DIM),
                         workspace_mb=64, tactic_dram_mb=None, timing_cache=root / "engines" / "t.cache",
                         layer_info=root / "engines" / "unstructured.layers.json", refit_from=graphs,
                         refit_weights=list(WEIGHTS))
    ts.write_build_script([spec], root)
    spec.engine.parent.mkdir(parents=True, exist_ok=True)
    spec.engine.write_bytes(b"PLAN")
    return spec


@pytest.fixture
def gpu_ok(monkeypatch):
    monkeypatch.setattr(tr, "tensorrt_status", lambda: (True, "TensorRT 10.3.0.30, Fake GPU (sm_87)"))


@pytest.fixture
def load(api, install, gpu_ok):
    """load(plan, **fake options) -> (TrtDecoder, fake tensorrt, buffers), the fake checked against ``api``."""
    def open_(plan, **kw):
        trt = install(make_fake_trt(api, **kw))
        buffers = CpuBuffers()
        trt.rec.memory = buffers
        messages = []
        dec = tr.TrtDecoder(plan, log=messages.append, buffers=buffers)
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


def test_profile_names_and_levels_come_from_the_bundle(load, refit_bundle):
    dec, _, _ = load(refit_bundle.engine)
    assert dec.profile_names == ["prefill", "decode", "continue"]
    assert dec.levels == ["0.3", "0.5", "0.7"] and dec.level == "0.3"  # the plan holds the build level's weights
    bundle = refit_bundle.engine.parent.parent
    doc = json.loads((bundle / te.ENGINES_JSON).read_text())
    doc["engines"][0]["profiles"][2]["name"] = "chunk"
    (bundle / te.ENGINES_JSON).write_text(json.dumps(doc))
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


def test_torch_buffers_need_cuda():
    import torch

    if torch.cuda.is_available():  # pragma: no cover - CPU-only CI
        pytest.skip("a CUDA GPU is visible")
    with pytest.raises(UserError, match="no CUDA GPU visible"):
        tr._TorchCudaBuffers(0)


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
# levels: one refittable engine, switched by refitting each level's graph


def test_set_level_refits_from_the_bundle_graph(load, refit_bundle, api):
    dec, trt, buffers = load(refit_bundle.engine)
    ids = np.array([[3, 5]])
    logits, _ = dec.step(*prefill_args(ids), dec.empty_past(1))
    assert (logits.argmax(-1) == next_token(ids, 0, LEVELS["0.3"])).all()
    assert dec.set_level("0.3") == {"level": "0.3", "switched": False, "refit_s": 0.0, "onnx": None, "weights": 0}
    syncs = buffers.syncs
    switch = dec.set_level("0.7")
    assert switch["switched"] and switch["level"] == "0.7" and dec.level == "0.7" and switch["refit_s"] >= 0
    assert switch["onnx"] == str(refit_bundle.refit_from["0.7"]) and buffers.syncs > syncs  # idle GPU first
    logits, _ = dec.step(*prefill_args(ids), dec.empty_past(1))
    assert (logits.argmax(-1) == next_token(ids, 0, LEVELS["0.7"])).all()  # the 0.7 weights run now
    if api.has("OnnxParserRefitter"):  # TensorRT >= 10: the ONNX refitter reads the level's graph
        assert trt.rec.refit_files == [str(refit_bundle.refit_from["0.7"])] and trt.rec.named == []
    else:  # 8.6: the weights that differ between levels, then what TensorRT fused with them
        assert trt.rec.named == [*WEIGHTS, "w.norm"] and trt.rec.refit_files == []
    dec.set_level("0.3")  # and back
    logits, _ = dec.step(*prefill_args(ids), dec.empty_past(1))
    assert (logits.argmax(-1) == next_token(ids, 0, LEVELS["0.3"])).all()
    assert dec.refits == 2 and trt.rec.refits == 2 and dec.describe()["level"] == "0.3"


def test_open_an_engine_at_a_level(api, install, gpu_ok, refit_bundle):
    """TrtDecoder(engine, level=...) serves that level from the first step: what a caller does for a
    bundle engine that serves several levels (its plan holds only the first one's weights)."""
    trt = install(make_fake_trt(api))
    trt.rec.memory = buffers = CpuBuffers()
    dec = tr.TrtDecoder(refit_bundle.engine, log=lambda m: None, buffers=buffers, level="0.5")
    assert dec.level == "0.5" and dec.load_switch["switched"] and dec.load_switch["refit_s"] >= 0
    logits, _ = dec.step(*prefill_args([[2]]), dec.empty_past(1))
    assert int(logits[0, -1].argmax()) == (2 + 1 + LEVELS["0.5"]) % VOCAB
    dec = tr.TrtDecoder(refit_bundle.engine, log=lambda m: None, buffers=buffers, level="0.3")
    assert dec.load_switch["switched"] is False and trt.rec.refits == 1  # the plan's own level: no refit


def test_refit_from_any_graph_of_the_model(load, plan, tmp_path, api):
    """Without a bundle: refit_from(onnx) with an explicit graph; on 8.6 every refittable weight the graph names."""
    dec, trt, _ = load(plan)
    graph = write_level_graph(tmp_path / "other" / "model.onnx", 9, external=True)
    out = dec.refit_from(graph, level="custom")
    assert out["level"] == "custom" and dec.level == "custom"
    logits, _ = dec.step(*prefill_args([[1]]), dec.empty_past(1))
    assert int(logits[0, -1].argmax()) == (1 + 1 + 9) % VOCAB
    if not api.has("OnnxParserRefitter"):
        assert sorted(trt.rec.named) == sorted([*WEIGHTS, "w.norm"])  # the unnamed constant is not in the graph
    with pytest.raises(UserError, match="pass the level's model.onnx"):
        dec.set_level("0.5")  # no bundle: no graph known for it


def test_level_switch_errors(load, refit_bundle, plan, api, tmp_path):
    dec, trt, _ = load(refit_bundle.engine)
    with pytest.raises(UserError, match="serves level.*0.3, 0.5, 0.7, not 2:4"):
        dec.set_level("2:4")
    with pytest.raises(UserError, match="is missing: the refit needs the level's graph"):
        dec.refit_from(tmp_path / "gone.onnx")
    dec, _, _ = load(plan, refittable=False)
    with pytest.raises(UserError, match="built without refittable weights"):
        dec.refit_from(refit_bundle.refit_from["0.5"])
    dec, trt, _ = load(refit_bundle.engine, refit_ok=False)
    with pytest.raises(RuntimeError, match="failed to refit"):
        dec.set_level("0.5")
    assert dec.level == "0.3"  # unchanged after a failed switch
    dec, _, _ = load(refit_bundle.engine, fused=("w.missing",))
    with pytest.raises(UserError, match="leaves 1 weight.*unset.*w.missing"):
        dec.set_level("0.5")
    if api.has("OnnxParserRefitter"):
        dec, _, _ = load(refit_bundle.engine, parser_errors=("weights shape mismatch for w.up",))
        with pytest.raises(UserError, match="could not refit .* weights shape mismatch for w.up"):
            dec.set_level("0.5")


@pytest.mark.parametrize("version", list(trt_bindings.VERSIONS))
def test_real_runtime_without_a_gpu(version, tmp_path):
    """TrtDecoder on the real bindings of each version: Runtime's TypeError becomes one UserError line."""
    plan = tmp_path / "x.engine"
    plan.write_bytes(b"PLAN")
    code = ("import sys, json; sys.modules['tensorrt'] = None; sys.path.insert(0, sys.argv[1])\n"
            "from epts_export.trt import runtime as tr\n"
            "tr.tensorrt_status = lambda: (True, 'torch says there is a GPU')\n"
            "try:\n    tr.TrtDecoder(sys.argv[2], buffers=object())\nexcept tr.UserError as e:\n    print(json.dumps(str(e)))\n")
    res = run_real(version, ["-c", code, str(Path(__file__).resolve().parents[1]), str(plan)], isolated=False)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout).startswith(f"TensorRT {version} could not create a Runtime (pybind11::init(): "
                                             "factory function returned nullptr): no CUDA GPU visible")


# --------------------------------------------------------------------------------------------
# the refit plan: which levels can share an engine, and which weights change


def test_refit_plan_names_the_weights_that_differ(tmp_path):
    graphs = {lv: write_level_graph(tmp_path / lv / "model.onnx", v) for lv, v in LEVELS.items()}
    plan = trefit.refit_plan(graphs)
    assert plan.levels == ("0.3", "0.5", "0.7") and plan.weights == WEIGHTS  # w.norm is the same in all
    external = {lv: write_level_graph(tmp_path / "ext" / lv / "model.onnx", v, external=True) for lv, v in LEVELS.items()}
    assert trefit.refit_plan(external).weights == WEIGHTS  # compared in the external data file, not loaded
    assert trefit.read_initializers(external["0.5"], ["w.up"])["w.up"].flat[0] == 5
    with pytest.raises(UserError, match="has no initializer w.gate"):
        trefit.read_initializers(external["0.5"], ["w.up", "w.gate"])


def test_refit_plan_refuses_graphs_that_differ_in_more_than_weights(tmp_path):
    a = write_level_graph(tmp_path / "a" / "model.onnx", 3)
    b = write_level_graph(tmp_path / "b" / "model.onnx", 5, extra_node=True)
    with pytest.raises(trefit.RefitMismatch, match="levels 0.3 and 0.5 are not the same graph .* nodes differ"):
        trefit.refit_plan({"0.3": a, "0.5": b})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(UserError, match="not a readable ONNX model"):
        trefit.refit_plan({"0.3": a, "0.5": tmp_path / "c" / "model.onnx"})


def test_engine_specs_share_one_refit_engine_and_cap_the_context(tmp_path):
    """pipeline.engine_specs for the Jetson and levels 0.3, 0.5, 0.7, 2:4 of a 2048-token model:
    one refit spec for the three unstructured levels (the weights that differ named), its own
    sparse spec for 2:4, every profile cut to 2048 tokens; a level whose graph differs in more
    than weights gets its own engine, with the reason."""
    from epts_export.core.levels import parse_levels
    from epts_export.deploy.pipeline import engine_specs
    from epts_export.deploy.targets import resolve_target

    target = resolve_target("jetson")
    levels = parse_levels("0.3,0.5,0.7,2:4")
    config = types.SimpleNamespace(num_attention_heads=4, hidden_size=64, num_hidden_layers=LAYERS,
                                   num_key_value_heads=HEADS, head_dim=HEAD_DIM, max_position_embeddings=2048)
    for lv, value in [*LEVELS.items(), ("2of4", 2)]:
        write_level_graph(tmp_path / f"level-{lv}" / "model.onnx", value)
    specs = engine_specs(tmp_path, target, levels, config)
    shared = specs[levels[0]]
    assert specs[levels[1]] is shared and specs[levels[2]] is shared and specs[levels[3]] is not shared
    assert shared.levels == ["0.3", "0.5", "0.7"] and shared.refit and list(shared.refit_weights) == list(WEIGHTS)
    assert shared.onnx == tmp_path / "level-0.3" / "model.onnx" and shared.engine.name == "unstructured.engine"
    assert shared.refit_from["0.7"] == tmp_path / "level-0.7" / "model.onnx" and not shared.sparse
    sparse = specs[levels[3]]
    assert sparse.levels == ["2:4"] and sparse.sparse and not sparse.refit and sparse.engine.name == "level-2of4.engine"
    assert shared.context == {"max_tokens": 2048, "target_max_context": 4096, "model_max_positions": 2048, "capped": True}
    assert [p.name for p in shared.profiles] == ["prefill", "decode", "continue"]
    assert all(p.seq[2] + p.past[2] <= 2048 for p in shared.profiles) and shared.profiles[1].past[2] == 2047
    write_level_graph(tmp_path / "level-0.5" / "model.onnx", 5, extra_node=True)
    specs = engine_specs(tmp_path, target, levels, config)
    assert [s.levels for s in specs.values()] == [["0.3"], ["0.5"], ["0.7"], ["2:4"]]
    assert "not the same graph" in specs[levels[1]].note and specs[levels[3]].note is None
    config.max_position_embeddings = 8192  # a longer model than the target: the target's 4096 stand
    one = engine_specs(tmp_path, target, levels[:1], config)[levels[0]]
    assert one.context["capped"] is False and one.profiles == list(target.profiles.values()) and not one.refit
