"""A fake ``tensorrt`` for the builder side, held to the real API of one TensorRT version
(``trt_api.checked``), and the specs, bundles and stand-ins (trtexec, the device's python3,
libcudart) the TensorRT tests build on. The real bindings come from ``trt_bindings.py``.

The runtime side (an engine that runs a known decoder, a refitter, CUDA buffers on the host) is
``trt_runtime_fakes.py``; the ``api``, ``install`` and ``replaces`` fixtures are in conftest.py."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest

import trt_api
import trt_bindings
from epts_export.deploy import scripts as hscripts
from epts_export.device.trt import probe
from epts_export.device.trt import spec as tspec
from epts_export.errors import UserError

_APIS: dict[str, object] = {}


REPO = Path(__file__).resolve().parents[1]

KV = tspec.KVLayout(layers=2, kv_heads=2, head_dim=16)

PREFILL = tspec.ShapeRange("prefill", batch=(1, 1, 2), seq=(1, 64, 128), past=(0, 0, 0))

DECODE = tspec.ShapeRange("decode", batch=(1, 1, 2), seq=(1, 1, 1), past=(0, 64, 127))

CONTINUE = tspec.ShapeRange("continue", batch=(1, 1, 2), seq=(1, 16, 32), past=(1, 64, 96))

INPUTS = ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.0.value",
          "past_key_values.1.key", "past_key_values.1.value"]

PROBED = {"BuilderFlag.FP16", "BuilderFlag.BF16", "BuilderFlag.REFIT_INDIVIDUAL",
          "NetworkDefinitionCreationFlag.STRONGLY_TYPED", "NetworkDefinitionCreationFlag.EXPLICIT_BATCH",
          "MemoryPoolType.TACTIC_DRAM", "INetworkDefinition.mark_weights_refittable", "OnnxParserRefitter"}

def make_spec(root: Path, level: str = "2:4", sparse: bool = True, precision: str = "fp16",
              profiles=(PREFILL, DECODE), tactic_dram_mb: int | None = 256) -> tspec.EngineSpec:
    d = "level-" + level.replace(":", "of")
    return tspec.EngineSpec(
        onnx=root / d / "model.onnx", engine=root / "engines" / f"{d}.engine", levels=[level], sparse=sparse,
        precision=precision, profiles=list(profiles), kv=KV, workspace_mb=1024, tactic_dram_mb=tactic_dram_mb,
        timing_cache=root / "engines" / "target.timing.cache", layer_info=root / "engines" / f"{d}.layers.json")

def make_source(root: Path, levels=("0.3", "0.5", "0.7", "2:4")) -> tspec.WeightSource:
    """An elastic bundle's weight source: the decoder graph, its level weights file, the level table."""
    model = root / "model"
    return tspec.WeightSource(model / "decoder.onnx", model / "decoder.weights", model, {lv: k for k, lv in enumerate(levels)},
                              {"w.up": tspec.TensorRef("decoder.weights", 0, 2048, "float16", (32, 32)),
                               "w.down": tspec.TensorRef("decoder.weights", 2048, 2048, "float16", (32, 32)),
                               "w.norm": tspec.TensorRef("model.onnx_data", 128, 64, "float16", (32,))})

def make_refit_spec(root: Path, levels=("0.3", "0.5", "0.7"), refit_weights=("w.up", "w.down"),
                    profiles=(PREFILL, DECODE, CONTINUE)) -> tspec.EngineSpec:
    """One refittable engine for several unstructured levels of an elastic bundle, built from the
    weight builder's graph with the first level's weights."""
    source = make_source(root)
    return tspec.EngineSpec(
        onnx=source.graph, engine=root / "engines" / "unstructured.engine", levels=list(levels), sparse=False,
        precision="fp16", profiles=list(profiles), kv=KV, workspace_mb=1024, tactic_dram_mb=256,
        timing_cache=root / "engines" / "target.timing.cache", layer_info=root / "engines" / "unstructured.layers.json",
        refit=True, refit_weights=None if refit_weights is None else list(refit_weights), source=source,
        context={"max_tokens": 128, "target_max_context": 4096, "model_max_positions": 128, "capped": True})

def make_sparse_spec(root: Path, source: tspec.WeightSource) -> tspec.EngineSpec:
    """The 2:4 engine of the same elastic bundle: its own, weights baked from the weight builder."""
    return tspec.EngineSpec(onnx=source.graph, engine=root / "engines" / "level-2of4.engine", levels=["2:4"], sparse=True,
                            precision="fp16", profiles=[PREFILL, DECODE], kv=KV, workspace_mb=1024, tactic_dram_mb=256,
                            timing_cache=root / "engines" / "target.timing.cache",
                            layer_info=root / "engines" / "level-2of4.layers.json", source=source)

def write_onnx(spec: tspec.EngineSpec) -> None:
    spec.onnx.parent.mkdir(parents=True, exist_ok=True)
    spec.onnx.write_bytes(b"onnx")

class Baker:
    """The weight builder's bake step, recorded (``weights.LevelWeights`` needs a real export)."""

    def __init__(self):
        self.baked, self.cleaned = [], 0

    def bake(self, level):
        self.baked.append(level)

    def clean(self):
        self.cleaned += 1

def fake_python(tmp_path: Path) -> Path:
    """A stand-in for the device's python3 in build_engines.sh: records its arguments."""
    exe = tmp_path / "bin" / "fake-python"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text('#!/usr/bin/env bash\nprintf \'%s\\n\' "$*" >> "$FAKE_PYTHON_LOG"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe

def surface_or_skip(version: str) -> dict:
    """The API surface of the real bindings of ``version`` (prepared once, then cached on disk and
    here); the test skips when they cannot be prepared here."""
    if version not in _APIS:
        try:
            _APIS[version] = trt_bindings.surface(version)
        except trt_bindings.Unavailable as e:
            _APIS[version] = e
    found = _APIS[version]
    if isinstance(found, Exception):
        pytest.skip(f"real TensorRT {version} bindings unavailable: {found}")
    return found

DETAILED = {
    "Layers": [
        {"Name": "/model/layers.0/mlp/up_proj/MatMul", "LayerType": "CaskGemm",
         "Inputs": [{"Name": "x", "Dimensions": [-1, 64], "Format/Datatype": "Row major linear FP16"}],
         "HasSparseWeights": 1, "TacticName": "sm80_xmma_gemm_f16f16_f16f32_f32_tn_n_sparse_tilesize64x64",
         "TacticValue": "0x1"},
        {"Name": "/model/layers.0/mlp/down_proj/MatMul", "LayerType": "CaskGemm", "HasSparseWeights": 1,
         "TacticName": "sm80_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize64x64", "TacticValue": "0x2"},
        {"Name": "/model/layers.0/self_attn/q_proj/MatMul", "LayerType": "CaskGemm", "HasSparseWeights": 0,
         "TacticName": "sm80_xmma_gemm_dense", "TacticValue": "0x3"},
        {"Name": "Reformatting CopyNode for Input Tensor 0", "LayerType": "Reformat", "TacticValue": "0x0"},
    ],
    "Bindings": ["input_ids", "logits"],
}

LOG = [
    "Detected 3 inputs and 2 output network tensors.",
    "[03/23/2021-00:14:05] [I] [TRT] (Sparsity) Layers eligible for sparse math: fc_a, fc_b, /model/layers.0/mlp/up_proj/MatMul",
    "(Sparsity) TRT inference plan picked sparse implementation for layers: fc_b",
]

def fake_loggers(trt, severity) -> None:
    """``trt.ILogger`` and ``trt.Logger`` as the real module has them: the severities on both."""
    class ILogger:
        Severity = severity

        def __init__(self):
            pass

        def log(self, severity, msg):  # pragma: no cover - overridden
            pass

    for name, member in severity.__members__.items():
        setattr(ILogger, name, member)

    class Logger(ILogger):
        def __init__(self, min_severity=severity.WARNING):
            super().__init__()

    trt.ILogger, trt.Logger = ILogger, Logger

def fake_network_classes(rec, shapes: dict, parse_errors, network_weights):
    """(network class, OnnxParser class): a parsed network with ``shapes`` as inputs."""
    class Network:
        num_inputs = len(shapes)

        def get_input(self, index):
            name = list(shapes)[index]
            return types.SimpleNamespace(name=name, shape=shapes[name])

        def mark_weights_refittable(self, name):
            rec.marked.append(name)
            return network_weights is None or name in network_weights

    class ParserError:
        def __init__(self, text):
            self.text = text

        def desc(self):
            return self.text

        def node(self):
            return 3

    class OnnxParser:
        def __init__(self, network, logger):
            self.num_errors = len(parse_errors)

        def parse_from_file(self, model):
            rec.parsed = model
            return not parse_errors

        def get_error(self, index):
            return ParserError(parse_errors[index])

    return Network, OnnxParser

def fake_config_class(rec, bad_cache: bool):
    """A builder config recording flags, pools, verbosity, profiles and its timing cache."""
    class TimingCache:
        def __init__(self, blob):
            self.blob = bytes(blob)

        def serialize(self):
            return memoryview(self.blob + b"+timings")

    class Config:
        def __init__(self):
            self.cache = None

        def set_flag(self, flag):
            rec.flags.append(flag.name)

        def set_memory_pool_limit(self, pool, pool_size):
            rec.pools[pool.name] = pool_size

        @property
        def profiling_verbosity(self):
            return rec.verbosity

        @profiling_verbosity.setter
        def profiling_verbosity(self, v):
            rec.verbosity = v

        def add_optimization_profile(self, profile):
            rec.profiles.append(profile.shapes)
            return len(rec.profiles) - 1

        def create_timing_cache(self, serialized_timing_cache):
            rec.cache_blobs.append(bytes(serialized_timing_cache))
            if bad_cache and serialized_timing_cache:
                raise RuntimeError("cache header mismatch")
            return TimingCache(serialized_timing_cache)

        def set_timing_cache(self, cache, ignore_mismatch):
            rec.set_cache.append(ignore_mismatch)
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    return Config

def builder_trt(api: trt_api.Api, inputs=None, parse_errors=(), build_ok=True, layer_json: str = json.dumps(DETAILED),
                  build_log=tuple(LOG), bad_cache: bool = False, network_weights=None):
    """A fake ``tensorrt`` of ``api``'s version: every enum of the real module with its real
    members (so an 11.4 BuilderFlag has no FP16), builder classes that record in ``trt.rec``.
    ``network_weights``: the weight names the parsed network knows (None: any)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = api.version
    enums = trt_api.enums(api)
    for qual, cls in enums.items():
        if "." not in qual:
            setattr(trt, qual, cls)
    severity = enums["ILogger.Severity"]
    rec = types.SimpleNamespace(network_flags=None, parsed=None, flags=[], pools={}, profiles=[], verbosity=None,
                                cache_blobs=[], set_cache=[], built=0, inspector_format=None, marked=[])
    trt.rec = rec
    fake_loggers(trt, severity)
    shapes = inputs if inputs is not None else {n: ((-1, -1) if i < 3 else (-1, 2, -1, 16)) for i, n in enumerate(INPUTS)}
    Network, trt.OnnxParser = fake_network_classes(rec, shapes, parse_errors, network_weights)
    Config = fake_config_class(rec, bad_cache)

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, input, min, opt, max):  # noqa: A002 - the real keyword names
            self.shapes[input] = (tuple(min), tuple(opt), tuple(max))

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            rec.network_flags = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            rec.built += 1
            for line in build_log:
                self.logger.log(severity.INFO, line)
            self.logger.log(severity.VERBOSE, "Tactic 0x1 time 0.1 ms")
            self.logger.log(severity.WARNING, "some warning")
            if not build_ok:
                self.logger.log(severity.ERROR, "out of memory while timing tactics")
                return None
            return memoryview(b"PLAN-BYTES")

    class Inspector:
        def get_engine_information(self, format):  # noqa: A002 - the real keyword name
            rec.inspector_format = format
            return layer_json

    class Engine:
        def create_engine_inspector(self):
            return Inspector()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, serialized_engine):
            assert bytes(serialized_engine) == b"PLAN-BYTES"
            return Engine()

    trt.Builder, trt.Runtime = Builder, Runtime
    return trt

def no_device(*args):
    """What the real Builder/Runtime constructors do where TensorRT cannot start (checked on the stubbed bindings)."""
    raise TypeError("pybind11::init(): factory function returned nullptr")

BY_MAJOR = {
    8: (1 << 0, ["FP16", "SPARSE_WEIGHTS"], ["FP16", "REFIT"]),  # EXPLICIT_BATCH; weakly typed; no REFIT_INDIVIDUAL
    10: (1 << 1, ["SPARSE_WEIGHTS"], ["REFIT_INDIVIDUAL"]),  # STRONGLY_TYPED = 1
    11: (0, ["SPARSE_WEIGHTS"], ["REFIT_INDIVIDUAL"]),  # strongly typed only: STRONGLY_TYPED ignored, no FP16 flag
}

def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}

def no_tensorrt(monkeypatch) -> None:
    for name in probe.MODULE_NAMES:
        monkeypatch.setitem(sys.modules, name, None)

class FakeCudart:
    """What probe asks of libcudart: how many devices, their name and compute capability."""

    path = "libcudart.so.12"

    def __init__(self, devices=1):
        self.devices = devices

    def device_count(self):
        return self.devices

    def name(self, device):
        return "Orin"

    def capability(self, device):
        return "8.7"

def cudart(monkeypatch, devices: int | None) -> None:
    """libcudart with ``devices`` GPUs, or (None) none found at all."""
    from epts_export.device import cuda

    def load():
        if devices is None:
            raise UserError("the CUDA runtime library (libcudart) was not found")
        return FakeCudart(devices)

    monkeypatch.setattr(cuda.CudaRuntime, "load", staticmethod(load))

def run_real(version: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
    """Run ``argv`` in a fresh interpreter with the real bindings of ``version`` (skip: not preparable here)."""
    surface_or_skip(version)
    return trt_bindings.run_python(version, argv, timeout=120, **kw)

def no_gpu_status(version: str) -> str:
    """What tensorrt_status says here, with no GPU: libcudart's answer where a CUDA runtime is
    installed (this kind of machine has one), else TensorRT's own (its Builder cannot start)."""
    from epts_export.device.cuda import CudaRuntime

    try:
        return f"no CUDA GPU visible ({CudaRuntime.load().path} sees no device; check nvidia-smi)"
    except UserError:
        return (f"TensorRT {version} could not create a Builder (pybind11::init(): factory function returned nullptr): "
                "no CUDA GPU visible, or its driver or libraries are broken (check nvidia-smi)")

def device_path() -> str:
    """Where numpy, tokenizers and onnxruntime are, and nothing else of ours: the bare venv's
    site-packages (.ci/run's EPTS_BARE_PYTHON), else this interpreter's (torch is there, but the
    tests check it is never imported)."""
    bare = os.environ.get("EPTS_BARE_PYTHON")
    python = bare or sys.executable
    res = subprocess.run([python, "-c", "import numpy, os; print(os.path.dirname(os.path.dirname(numpy.__file__)))"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()

def baked_bundle_dir(tmp_path: Path) -> tuple[Path, list[tspec.EngineSpec]]:
    root = tmp_path / "bundle"
    specs = [make_spec(root, "0.5", sparse=False, tactic_dram_mb=None), make_spec(root, "2:4", sparse=True)]
    for s in specs:
        write_onnx(s)
    return root, specs

FAKE_TRTEXEC = """#!/usr/bin/env bash
if [ "${1:-}" = "--help" ]; then
  %s
  exit 0
fi
printf '%%s\\n' "$*" >> "$FAKE_TRTEXEC_LOG"
for a in "$@"; do
  case "$a" in
    --saveEngine=*) printf plan > "${a#--saveEngine=}" ;;
    --exportLayerInfo=*) printf '{"Layers": []}' > "${a#--exportLayerInfo=}" ;;
    --sparsity=enable) echo "[I] [TRT] (Sparsity) Layers eligible for sparse math: fc1, fc2" ;;
  esac
done
"""

def fake_trtexec(tmp_path: Path, help_lines: str) -> Path:
    exe = tmp_path / "bin" / "trtexec"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text(FAKE_TRTEXEC % help_lines)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe

def hashed_bundle(tmp_path: Path) -> Path:
    """A moved bundle with its scripts, _epts/ and a manifest that hashes every file (as build writes)."""
    from epts_export.fsutil import file_hashes

    root, specs = baked_bundle_dir(tmp_path)
    hscripts.write_scripts(root, specs, None)
    (root / "manifest.json").write_text(json.dumps({"format": "epts-bundle", "files": file_hashes(root)}))
    device = tmp_path / "device"
    shutil.move(str(root), str(device))  # moved, as onto a Jetson
    return device
