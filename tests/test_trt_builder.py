"""The engine builder (``device.trt.builder``) against a fake ``tensorrt`` held to the real API of
TensorRT 8.6.1, 10.3.0 and 11.4.0.106 (the ``api`` fixture), and the checker that holds it."""

from __future__ import annotations

import json

import pytest

import epts_export.device.files as dfiles
import trt_api
from epts_export.device.trt import builder
from epts_export.device.trt import logger as trt_logger
from epts_export.errors import UserError
from trt_fakes import (BY_MAJOR, Baker, DETAILED, INPUTS, PROBED, builder_trt, files_under, make_refit_spec, make_spec,
                       no_device, no_tensorrt, write_onnx)


def test_the_fake_has_what_each_real_version_has(api):
    """The version differences the builder depends on, read from the real modules."""
    flags = api.enum_members["BuilderFlag"]
    assert "SPARSE_WEIGHTS" in flags and "REFIT" in flags and "TACTIC_DRAM" in api.enum_members["MemoryPoolType"]
    assert ("FP16" in flags) == (api.major < 11) and ("BF16" in flags) == (api.major == 10)
    assert ("REFIT_INDIVIDUAL" in flags) == ("STRIP_PLAN" in flags) == api.has("OnnxParserRefitter") == (api.major >= 10)
    creation = api.enum_members["NetworkDefinitionCreationFlag"]
    assert ("EXPLICIT_BATCH" in creation) == (api.major < 11) and ("STRONGLY_TYPED" in creation) == (api.major >= 10)
    assert api.major < 11 or creation["STRONGLY_TYPED"] == 0
    assert api.member("IExecutionContext", "set_optimization_profile_async")["signatures"][0]["returns"] == "bool"
    assert api.has("INetworkDefinition.mark_weights_refittable") == (api.major >= 10)
    assert api.has("Refitter.set_named_weights") and api.has("ICudaEngine.refittable")

def test_checker_rejects_names_and_calls_the_real_version_lacks(api):
    """A misspelled, removed or renamed name fails like the real module; a call the real signature
    does not take, or a fake that lacks a real name, is an ApiViolation."""
    trt = trt_api.checked(api, builder_trt(api))
    with pytest.raises(AttributeError, match="BuilderFlag.SPARSE_WEIGHT$"):
        trt.BuilderFlag.SPARSE_WEIGHT  # noqa: B018 - misspelled
    assert getattr(trt.BuilderFlag, "FP16", None) is (None if api.major >= 11 else trt.BuilderFlag.FP16)  # removed in 11
    assert not hasattr(trt, "OnnxParserRefiter")  # misspelled module attribute: what the real module answers
    logger = trt_logger.make_logger(trt, lambda m: None)
    builder = trt.Builder(logger)
    with pytest.raises(trt_api.ApiViolation, match="no keyword 'strongly_typed'"):
        builder.create_network(flags=0, strongly_typed=True)
    config = builder.create_builder_config()
    with pytest.raises(trt_api.ApiViolation, match="expected a BuilderFlag member"):
        config.set_flag(7)  # a bare int: pybind11 enums take members only
    with pytest.raises(trt_api.ApiViolation, match="2 positional arguments"):
        config.set_flag(trt.BuilderFlag.REFIT, True)
    with pytest.raises(AttributeError, match="IBuilderConfig.set_flags"):
        config.set_flags(trt.BuilderFlag.REFIT)
    with pytest.raises(AttributeError, match="settable property"):
        builder.create_network().num_inputs = 3  # read-only in the real module
    del type(config._target).get_timing_cache
    with pytest.raises(trt_api.ApiViolation, match="fake IBuilderConfig lacks get_timing_cache"):
        config.get_timing_cache()
    assert len(api.violations) == 4
    # a missing name that the code swallows still fails the test
    api.violations.clear()
    assert "BuilderFlag.SPARSE_WEIGHT" in api.misses
    with pytest.raises(AssertionError, match="SPARSE_WEIGHT"):
        api.assert_clean(PROBED)

def test_build_engine_sparse(api, install, tmp_path, replaces):
    trt = install(builder_trt(api))
    spec = make_spec(tmp_path)
    write_onnx(spec)
    messages = []
    result = builder.build_engine(spec, log=messages.append)
    rec = trt.rec
    network_flags, sparse_flags, _ = BY_MAJOR[api.major]
    assert rec.network_flags == network_flags
    assert rec.parsed == str(spec.onnx)
    assert rec.flags == sparse_flags  # by name; FP16 only on weakly typed TensorRT 8
    assert rec.pools == {"WORKSPACE": 1024 * 2**20, "TACTIC_DRAM": 256 * 2**20}  # every version has TACTIC_DRAM
    assert rec.verbosity == trt.ProfilingVerbosity.DETAILED
    assert rec.inspector_format == trt.LayerInformationFormat.JSON
    assert len(rec.profiles) == 2
    prefill, decode = rec.profiles
    assert list(prefill) == INPUTS
    assert prefill["attention_mask"] == ((1, 1), (1, 64), (2, 128))
    assert decode["past_key_values.1.key"] == ((1, 2, 0, 16), (1, 2, 64, 16), (2, 2, 127, 16))
    assert decode["attention_mask"] == ((1, 1), (1, 65), (2, 128))
    assert rec.cache_blobs == [b""] and rec.set_cache == [False]  # fresh cache, ignore_mismatch=False
    # files: written whole via os.replace from a temporary sibling, none left behind
    assert spec.engine.read_bytes() == b"PLAN-BYTES"
    assert spec.timing_cache.read_bytes() == b"+timings"
    assert json.loads(spec.layer_info.read_text()) == DETAILED
    assert {dst for _, dst in replaces} == {spec.engine, spec.timing_cache, spec.layer_info}
    assert all(src.parent == dst.parent and src != dst for src, dst in replaces)
    assert files_under(tmp_path / "engines") == {"level-2of4.engine", "target.timing.cache", "level-2of4.layers.json"}
    assert result["engine"] == str(spec.engine) and result["bytes"] == len(b"PLAN-BYTES")
    assert result["tensorrt"] == api.version and result["build_s"] >= 0
    assert result["levels"] == ["2:4"] and result["weights"] == "baked" and result["refittable"] is None
    assert result["sparse_report"]["picked"] == ["fc_b", "/model/layers.0/mlp/up_proj/MatMul"]
    assert result["sparse_report"]["source"] == "inspector+log"
    assert any("some warning" in m for m in messages) and any("(Sparsity)" in m for m in messages)
    assert not any("Tactic 0x1" in m for m in messages)  # verbose lines stay out
    json.dumps(result)  # goes into the bundle manifest

def test_build_engine_refit(api, install, tmp_path):
    """One engine for three unstructured levels: built from the weight builder's graph with the build
    level's weights written beside it first, refittable, never with those values folded."""
    trt = install(builder_trt(api))
    spec = make_refit_spec(tmp_path)
    write_onnx(spec)
    messages, baker = [], Baker()
    result = builder.build_engine(spec, log=messages.append, levels=baker)
    assert trt.rec.parsed == str(tmp_path / "model" / "decoder.onnx") and baker.baked == ["0.3"]
    assert result["build_level"] == "0.3"
    assert trt.rec.flags == BY_MAJOR[api.major][2]
    assert not {"REFIT_IDENTICAL", "STRIP_PLAN", "SPARSE_WEIGHTS"} & set(trt.rec.flags)
    assert trt.rec.marked == (["w.up", "w.down"] if api.major >= 10 else [])  # only what differs between the levels
    assert result["refittable"] == ("individual" if api.major >= 10 else "all")
    assert result["levels"] == ["0.3", "0.5", "0.7"] and result["weights"] == "refit"
    assert len(trt.rec.profiles) == 3  # prefill, decode, continue
    assert trt.rec.profiles[2]["past_key_values.0.key"] == ((1, 2, 1, 16), (1, 2, 64, 16), (2, 2, 96, 16))
    assert trt.rec.profiles[2]["attention_mask"] == ((1, 2), (1, 80), (2, 128))
    assert any("profiles capped at 128 tokens" in m for m in messages)
    assert any("levels 0.3, 0.5, 0.7, refittable" in m for m in messages)

def test_build_engine_refit_falls_back_to_every_weight(api, install, tmp_path):
    """A weight name the parsed network does not know: REFIT (all weights) rather than a broken switch."""
    trt = install(builder_trt(api, network_weights={"w.up"}))
    spec = make_refit_spec(tmp_path)
    write_onnx(spec)
    messages = []
    assert builder.build_engine(spec, log=messages.append, levels=Baker())["refittable"] == "all"
    assert trt.rec.flags[-1] == "REFIT" and "REFIT_INDIVIDUAL" not in trt.rec.flags
    if api.major >= 10:
        assert any("first: w.down" in m and "(REFIT)" in m for m in messages)
    trt = install(builder_trt(api))
    spec.refit_weights = None  # unknown: every weight
    builder.build_engine(spec, log=lambda m: None, levels=Baker())
    assert trt.rec.flags[-1] == "REFIT" and trt.rec.marked == []

def test_build_engine_dense_reuses_the_timing_cache(api, install, tmp_path):
    trt = install(builder_trt(api))
    spec = make_spec(tmp_path, "0.5", sparse=False, tactic_dram_mb=None)
    write_onnx(spec)
    spec.timing_cache.parent.mkdir(parents=True)
    spec.timing_cache.write_bytes(b"old")
    builder.build_engine(spec, log=lambda m: None)
    assert trt.rec.flags == (["FP16"] if api.major == 8 else [])  # no SPARSE_WEIGHTS for a dense level
    assert trt.rec.pools == {"WORKSPACE": 1024 * 2**20}
    assert trt.rec.cache_blobs == [b"old"]
    assert spec.timing_cache.read_bytes() == b"old+timings"

def test_build_engine_replaces_a_foreign_timing_cache(api, install, tmp_path):
    trt = install(builder_trt(api, bad_cache=True))
    spec = make_spec(tmp_path)
    write_onnx(spec)
    spec.timing_cache.parent.mkdir(parents=True)
    spec.timing_cache.write_bytes(b"from another GPU")
    messages = []
    builder.build_engine(spec, log=messages.append)
    assert trt.rec.cache_blobs == [b"from another GPU", b""]
    assert spec.timing_cache.read_bytes() == b"+timings"
    assert any("fresh" in m for m in messages)

def test_build_engine_precision_flags(api, install, tmp_path):
    """bf16 on a weakly typed TensorRT without a BF16 flag (8.6) builds in FP32 and says so; strongly
    typed versions take precision from the graph and set no precision flag at all."""
    trt = install(builder_trt(api))
    messages = []
    spec = make_spec(tmp_path, precision="bf16")
    write_onnx(spec)
    builder.build_engine(spec, log=messages.append)
    assert trt.rec.flags == ["SPARSE_WEIGHTS"]
    assert any("no BF16 builder flag" in m for m in messages) == (api.major == 8)

def test_build_engine_int8(api, install, tmp_path):
    """int8: the Q/DQ graph built weakly typed with FP16 + INT8 (+ SPARSE_WEIGHTS for 2:4) on 8.6 and
    10.3 (on 10, without STRONGLY_TYPED); 11 builds strongly typed only and refuses in one line."""
    trt = install(builder_trt(api))
    spec = make_spec(tmp_path, precision="int8")
    write_onnx(spec)
    if api.major == 11:
        with pytest.raises(UserError, match="strongly typed networks only"):
            builder.build_engine(spec, log=lambda m: None)
        assert not spec.engine.exists()
        return
    builder.build_engine(spec, log=lambda m: None)
    assert trt.rec.network_flags == 1 << 0  # EXPLICIT_BATCH (ignored by 10), not STRONGLY_TYPED
    assert trt.rec.flags == ["FP16", "INT8", "SPARSE_WEIGHTS"]


def test_build_engine_failures_leave_no_files(api, install, tmp_path):
    spec = make_spec(tmp_path)
    write_onnx(spec)
    install(builder_trt(api, parse_errors=("unsupported op If",)))
    with pytest.raises(RuntimeError, match="node 3: unsupported op If") as e:
        builder.build_engine(spec, log=lambda m: None)
    assert not isinstance(e.value, UserError)
    install(builder_trt(api, build_ok=False))
    with pytest.raises(RuntimeError, match="out of memory"):
        builder.build_engine(spec, log=lambda m: None)
    assert not (tmp_path / "engines").exists() or files_under(tmp_path / "engines") == set()

def test_build_engine_without_a_gpu_is_one_line(api, install, tmp_path):
    """The real Builder/Runtime raise TypeError where TensorRT cannot start: one UserError line."""
    spec = make_spec(tmp_path)
    write_onnx(spec)
    fake = builder_trt(api)
    fake.Builder = no_device
    install(fake)
    with pytest.raises(UserError) as e:
        builder.build_engine(spec, log=lambda m: None)
    msg = str(e.value)
    assert f"TensorRT {api.version} could not create a Builder (pybind11::init(): factory function returned nullptr)" in msg
    assert "no CUDA GPU visible" in msg and "\n" not in msg

def test_atomic_write_cleans_up_on_error(tmp_path, monkeypatch):
    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(dfiles.os, "replace", boom)
    with pytest.raises(OSError):
        dfiles.write_bytes(tmp_path / "x.engine", b"data", fsync=True)
    assert list(tmp_path.iterdir()) == []

def test_build_engine_user_errors(api, install, tmp_path, monkeypatch):
    spec = make_spec(tmp_path)
    no_tensorrt(monkeypatch)
    with pytest.raises(UserError, match=r"epts-export\[tensorrt\]"):
        builder.build_engine(spec)
    install(builder_trt(api))
    with pytest.raises(UserError, match="missing"):
        builder.build_engine(spec)
    write_onnx(spec)
    elastic = {n: s for n, s in zip(INPUTS, [(-1, -1)] * 3 + [(-1, 2, -1, 16)] * 4)} | {"sparsity_level": ()}
    install(builder_trt(api, inputs=elastic))
    with pytest.raises(UserError, match="baked"):
        builder.build_engine(spec, log=lambda m: None)
    wrong_heads = {n: ((-1, -1) if i < 3 else (-1, 4, -1, 16)) for i, n in enumerate(INPUTS)}
    install(builder_trt(api, inputs=wrong_heads))
    with pytest.raises(UserError, match="kv_heads"):
        builder.build_engine(spec, log=lambda m: None)

def test_build_engine_without_position_ids(api, install, tmp_path):
    trt = install(builder_trt(api, inputs={n: ((-1, -1) if i < 3 else (-1, 2, -1, 16)) for i, n in enumerate(INPUTS)
                                             if n != "position_ids"}))
    spec = make_spec(tmp_path)
    write_onnx(spec)
    builder.build_engine(spec, log=lambda m: None)
    assert all("position_ids" not in p for p in trt.rec.profiles)
