"""TrtDecoder (``device.trt.runtime``) without TensorRT or CUDA, against the runtime fakes
(trt_runtime_fakes.py) held to the real API of each TensorRT version: I/O discovery, steps and
profiles, latency, level switches by refit and the check against ONNX Runtime after each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import trt_bindings
from epts_export.device.interface import ENGINES_JSON, KVLayout, ShapeRange
from epts_export.device.ort import greedy
from epts_export.device.trt import runtime as tr
from epts_export.device.trt import spec as tspec
from epts_export.errors import UserError
from trt_fakes import no_device, no_tensorrt, run_real
from trt_runtime_fakes import (CONTINUE, CpuBuffers, DECODE, FakeLevels, HEADS, HEAD_DIM, LAYERS, LEVELS, PREFILL,
                               VOCAB, WEIGHTS, new_kv, next_token, prefill_args, runtime_trt)


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
        trt = install(runtime_trt(api, **kw))
        buffers = CpuBuffers()
        trt.rec.memory = buffers
        messages = []
        dec = tr.TrtDecoder(plan, log=messages.append, buffers=buffers, level=level, weights=weights)
        dec.messages = messages
        return dec, trt, buffers

    return open_

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
    install(runtime_trt(api))
    monkeypatch.setattr(tr, "tensorrt_status", lambda: (False, "no CUDA GPU visible"))
    with pytest.raises(UserError, match="no CUDA GPU visible"):
        tr.TrtDecoder(plan, buffers=CpuBuffers())
    with pytest.raises(UserError, match="is missing: build it first"):
        tr.TrtDecoder(tmp_path / "nope.engine")

def test_a_runtime_that_cannot_start_is_one_line(api, install, gpu_ok, plan):
    """The real Runtime raises TypeError where TensorRT cannot start (the probe may have passed on torch's word)."""
    fake = runtime_trt(api)
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
    trt = install(runtime_trt(api))
    trt.rec.memory = buffers = CpuBuffers()
    dec = tr.TrtDecoder(refit_bundle.engine, log=lambda m: None, buffers=buffers, level="0.5", weights=FakeLevels())
    assert dec.level == "0.5" and dec.load_switch["switched"] and dec.load_switch["check"]["passed"]
    logits, _ = dec.step(*prefill_args([[2]]), dec.empty_past(1))
    assert int(logits[0, -1].argmax()) == (2 + 1 + LEVELS["0.5"]) % VOCAB
    trt = install(runtime_trt(api))  # a fresh load of the plan: the build level's weights again
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
