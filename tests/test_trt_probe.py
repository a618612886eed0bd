"""Is TensorRT usable here (``device.trt.probe``): the import under both module names, the GPU
through libcudart, and the real bindings of each version without a GPU."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest

import trt_bindings
from epts_export.device.trt import probe
from epts_export.device.trt import spec as tspec
from trt_fakes import (REPO, builder_trt, cudart, device_path, make_spec, no_device, no_gpu_status, no_tensorrt,
                       run_real, write_onnx)


def test_tensorrt_status_without_tensorrt(monkeypatch):
    no_tensorrt(monkeypatch)
    ok, why = probe.tensorrt_status()
    assert ok is False
    assert "not installed" in why and "epts-export[tensorrt]" in why

def test_both_module_names_are_accepted(monkeypatch):
    """JetPack and NVIDIA's meta package give ``tensorrt``; the PyPI bindings wheel alone ``tensorrt_bindings``."""
    wheel = types.ModuleType("tensorrt_bindings")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_bindings", wheel)
    assert probe.import_trt() is wheel
    jetpack = types.ModuleType("tensorrt")
    monkeypatch.setitem(sys.modules, "tensorrt", jetpack)
    assert probe.import_trt() is jetpack  # tensorrt first

def test_tensorrt_status_with_and_without_gpu(api, install, monkeypatch):
    """The GPU is asked of libcudart (ctypes, no torch); without libcudart, of TensorRT itself."""
    install(builder_trt(api))
    cudart(monkeypatch, 1)
    assert probe.tensorrt_status() == (True, f"TensorRT {api.version}, Orin (sm_87)")
    assert probe.compute_capability() == "8.7" and probe.gpu() == ("Orin", "8.7")
    cudart(monkeypatch, 0)
    ok, why = probe.tensorrt_status()
    assert not ok and why.startswith("no CUDA GPU visible (libcudart.so.12 sees no device")
    assert probe.compute_capability() is None
    cudart(monkeypatch, None)  # no libcudart: TensorRT's own probe
    assert probe.tensorrt_status() == (True, f"TensorRT {api.version}, CUDA GPU (no libcudart found to name it; "
                                          f"engines run through libcudart)")
    fake = builder_trt(api)
    fake.Builder = no_device
    install(fake)
    ok, why = probe.tensorrt_status()
    assert not ok and why.startswith(f"TensorRT {api.version} could not create a Builder (pybind11::init(): factory "
                                     f"function returned nullptr): no CUDA GPU visible")

@pytest.mark.parametrize("version", list(trt_bindings.VERSIONS))
def test_real_bindings_without_a_gpu(version, tmp_path):
    """The real module, imported as ``tensorrt_bindings``: status, import_trt and build_engine say
    in one line that TensorRT cannot start (the stubs' factories return NULL, as without a GPU)."""
    spec = make_spec(tmp_path)
    write_onnx(spec)
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); from pathlib import Path\n"
            "from epts_export.device.trt import builder, probe, spec as tspec\n"
            "print(probe.import_trt().__name__); print(json.dumps(probe.tensorrt_status()))\n"
            "spec = tspec.load_specs(Path(sys.argv[2]))[0]\n"
            "try:\n    builder.build_engine(spec, log=lambda m: None)\nexcept builder.UserError as e:\n    print(json.dumps(str(e)))\n")
    tspec.write_engines(tmp_path, [spec])
    res = run_real(version, ["-c", code, str(REPO), str(tmp_path)], env={**os.environ, "EPTS_EXEC_PATH": device_path()})
    assert res.returncode == 0, res.stderr
    name, status, error = res.stdout.splitlines()
    assert name == "tensorrt_bindings"
    ok, why = json.loads(status)
    assert not ok and why == no_gpu_status(version)
    assert json.loads(error).startswith(f"TensorRT {version} could not create a Builder (pybind11::init(): factory "
                                        "function returned nullptr): no CUDA GPU visible")
