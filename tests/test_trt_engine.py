"""TensorRT engine building without TensorRT: profiles, trtexec argv, build scripts, the sparse
report, and build_engine against a fake ``tensorrt`` module that records every call."""

from __future__ import annotations

import enum
import json
import os
import shutil
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest

import epts_export.fsutil as fsutil
from epts_export.trt import builder as te
from epts_export.trt import scripts as ts
from epts_export.trt import sparse
from epts_export.errors import UserError

KV = te.KVLayout(layers=2, kv_heads=2, head_dim=16)
PREFILL = te.ShapeRange("prefill", batch=(1, 1, 2), seq=(1, 64, 128), past=(0, 0, 0))
DECODE = te.ShapeRange("decode", batch=(1, 1, 2), seq=(1, 1, 1), past=(0, 64, 127))
INPUTS = ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.0.value",
          "past_key_values.1.key", "past_key_values.1.value"]


def make_spec(root: Path, level: str = "2:4", sparse: bool = True, precision: str = "fp16",
              profiles=(PREFILL, DECODE), tactic_dram_mb: int | None = 256) -> te.EngineSpec:
    d = "level-" + level.replace(":", "of")
    return te.EngineSpec(
        onnx=root / d / "model.onnx", engine=root / "engines" / f"{d}.engine", level=level, sparse=sparse,
        precision=precision, profiles=list(profiles), kv=KV, workspace_mb=1024, tactic_dram_mb=tactic_dram_mb,
        timing_cache=root / "engines" / "target.timing.cache", layer_info=root / "engines" / f"{d}.layers.json")


def write_onnx(spec: te.EngineSpec) -> None:
    spec.onnx.parent.mkdir(parents=True, exist_ok=True)
    spec.onnx.write_bytes(b"onnx")


# --------------------------------------------------------------------------------------------
# profiles and trtexec


def test_profile_shapes_small_layout(tmp_path):
    shapes = te.profile_shapes(make_spec(tmp_path))
    assert list(shapes) == ["prefill", "decode"]
    prefill = {row[0]: row[1:] for row in shapes["prefill"]}
    decode = {row[0]: row[1:] for row in shapes["decode"]}
    assert list(prefill) == INPUTS  # graph order, every input
    assert prefill["input_ids"] == ((1, 1), (1, 64), (2, 128))
    assert prefill["position_ids"] == prefill["input_ids"]
    assert prefill["attention_mask"] == ((1, 1), (1, 64), (2, 128))  # past 0 + seq
    assert prefill["past_key_values.1.value"] == ((1, 2, 0, 16), (1, 2, 0, 16), (2, 2, 0, 16))
    assert decode["input_ids"] == ((1, 1), (1, 1), (2, 1))
    assert decode["attention_mask"] == ((1, 1), (1, 65), (2, 128))  # past + seq
    assert decode["past_key_values.0.key"] == ((1, 2, 0, 16), (1, 2, 64, 16), (2, 2, 127, 16))  # past min 0


@pytest.mark.parametrize("profile", [
    te.ShapeRange("p", (1, 1, 1), (0, 1, 1), (0, 0, 0)),  # seq min 0
    te.ShapeRange("p", (1, 1, 1), (1, 1, 1), (-1, 0, 0)),  # past < 0
    te.ShapeRange("p", (2, 1, 4), (1, 1, 1), (0, 0, 0)),  # min > opt
    te.ShapeRange("p", (1, 1), (1, 1, 1), (0, 0, 0)),  # not a triple
])
def test_profile_shapes_rejects_bad_ranges(tmp_path, profile):
    with pytest.raises(UserError):
        te.profile_shapes(make_spec(tmp_path, profiles=[profile]))


def test_profile_names_must_be_unique(tmp_path):
    with pytest.raises(UserError, match="twice"):
        te.profile_shapes(make_spec(tmp_path, profiles=[PREFILL, PREFILL]))


def _arg(argv, prefix):
    return [a[len(prefix):] for a in argv if a.startswith(prefix)]


def test_trtexec_command_sparse_and_dense(tmp_path):
    sparse = ts.trtexec_command(make_spec(tmp_path, "2:4", sparse=True), root=tmp_path)
    dense = ts.trtexec_command(make_spec(tmp_path, "0.5", sparse=False), root=tmp_path)
    assert sparse[0] == "trtexec"
    assert "--sparsity=enable" in sparse and "--sparsity=enable" not in dense
    assert not any("force" in a for a in sparse + dense)
    assert _arg(sparse, "--onnx=") == ["level-2of4/model.onnx"]
    assert _arg(sparse, "--saveEngine=") == ["engines/level-2of4.engine"]
    # both profiles, each announced by --profile=N right before its three shape flags
    i0, i1 = sparse.index("--profile=0"), sparse.index("--profile=1")
    assert [a.split("=")[0] for a in sparse[i0 + 1:i0 + 4]] == ["--minShapes", "--optShapes", "--maxShapes"]
    assert [a.split("=")[0] for a in sparse[i1 + 1:i1 + 4]] == ["--minShapes", "--optShapes", "--maxShapes"]
    assert len(_arg(sparse, "--minShapes=")) == 2
    decode_max = sparse[i1 + 3]
    assert decode_max.startswith("--maxShapes=input_ids:2x1,attention_mask:2x128,position_ids:2x1,")
    assert "past_key_values.1.value:2x2x127x16" in decode_max
    assert "past_key_values.0.key:1x2x0x16" in sparse[i0 + 1]  # prefill min: empty past
    assert "--memPoolSize=workspace:1024M" in sparse
    assert not any("tacticDram" in a for a in sparse)  # trtexec has no such pool
    assert _arg(sparse, "--timingCacheFile=") == ["engines/target.timing.cache"]
    assert _arg(sparse, "--exportLayerInfo=") == ["engines/level-2of4.layers.json"]
    for flag in ("--profilingVerbosity=detailed", "--stronglyTyped", "--skipInference"):
        assert flag in sparse and flag in dense
    assert not any(a in ("--fp16", "--bf16", "--best") for a in sparse)


def test_trtexec_command_single_profile_has_no_profile_flag(tmp_path):
    argv = ts.trtexec_command(make_spec(tmp_path, profiles=[DECODE]))
    assert not any(a.startswith("--profile=") for a in argv)
    assert len(_arg(argv, "--optShapes=")) == 1
    assert _arg(argv, "--onnx=") == [str(tmp_path / "level-2of4" / "model.onnx")]  # absolute without a root


# --------------------------------------------------------------------------------------------
# engines.json and the scripts


def test_spec_json_roundtrip(tmp_path):
    for spec in (make_spec(tmp_path), make_spec(tmp_path, "0.5", sparse=False, precision="bf16", tactic_dram_mb=None)):
        d = ts.spec_to_dict(spec, tmp_path)
        assert d["onnx"] == f"level-{spec.level.replace(':', 'of')}/model.onnx"
        assert not any(str(tmp_path) in str(v) for v in d.values())
        back = te.spec_from_dict(json.loads(json.dumps(d)), tmp_path)
        assert back == spec
        moved = te.spec_from_dict(d, tmp_path / "elsewhere")
        assert moved.engine == tmp_path / "elsewhere" / spec.engine.relative_to(tmp_path)


def test_spec_paths_must_stay_inside_the_bundle(tmp_path):
    spec = make_spec(tmp_path / "bundle")
    spec.timing_cache = tmp_path / "outside.cache"
    with pytest.raises(UserError, match="outside the bundle"):
        ts.spec_to_dict(spec, tmp_path / "bundle")
    d = ts.spec_to_dict(make_spec(tmp_path), tmp_path)
    d["engine"] = "../escape.engine"
    with pytest.raises(UserError, match="inside the bundle"):
        te.spec_from_dict(d, tmp_path)
    with pytest.raises(UserError, match="malformed"):
        te.spec_from_dict({"level": "2:4"}, tmp_path)


def _bundle(tmp_path: Path) -> tuple[Path, list[te.EngineSpec]]:
    root = tmp_path / "bundle"
    specs = [make_spec(root, "0.5", sparse=False, tactic_dram_mb=None), make_spec(root, "2:4", sparse=True)]
    for s in specs:
        write_onnx(s)
    return root, specs


def test_build_script_is_valid_bash_with_relative_paths(tmp_path):
    root, specs = _bundle(tmp_path)
    sh, py = ts.write_build_script(specs, root)
    assert sh == root / "build_engines.sh" and py == root / "build_engines.py"
    text = sh.read_text()
    assert subprocess.run(["bash", "-n", str(sh)], capture_output=True).returncode == 0
    assert str(root) not in text and str(tmp_path) not in text
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert "built on" in text and "Jetson" in text and "command -v trtexec" in text
    assert ts.JETPACK_TRTEXEC in text
    assert text.count("--saveEngine=") == 2 and text.count("--sparsity=enable") == 1
    assert "force" not in text
    assert os.access(sh, os.X_OK) and os.access(py, os.X_OK)
    doc = json.loads((root / te.ENGINES_JSON).read_text())
    assert doc["format"] == te.ENGINES_FORMAT and [e["level"] for e in doc["engines"]] == ["0.5", "2:4"]
    assert str(root) not in json.dumps(doc)
    compile(py.read_text(), str(py), "exec")
    assert te.load_specs(root) == specs


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


def _fake_trtexec(tmp_path: Path, help_lines: str) -> Path:
    exe = tmp_path / "bin" / "trtexec"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text(FAKE_TRTEXEC % help_lines)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_build_script_runs_from_a_moved_bundle(tmp_path):
    root, specs = _bundle(tmp_path)
    ts.write_build_script(specs, root)
    moved = tmp_path / "device" / "bundle"
    shutil.move(str(root), str(moved))
    exe = _fake_trtexec(tmp_path, 'echo "  --profile   Build with profiles"; echo "  --stronglyTyped  typed"')
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "TRTEXEC": str(exe), "FAKE_TRTEXEC_LOG": str(calls)}
    res = subprocess.run(["bash", str(moved / "build_engines.sh")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (moved / "engines" / "level-2of4.engine").read_text() == "plan"
    assert (moved / "engines" / "level-0.5.engine").is_file()
    assert "(Sparsity) Layers eligible for sparse math: fc1, fc2" in res.stdout
    lines = calls.read_text().splitlines()
    assert len(lines) == 2 and all(str(tmp_path) not in line for line in lines)
    assert "--profile=0" in lines[1] and "--profile=1" in lines[1]


def test_build_script_refuses_old_or_missing_trtexec(tmp_path):
    root, specs = _bundle(tmp_path)
    sh, _ = ts.write_build_script(specs, root)
    old = _fake_trtexec(tmp_path, 'echo "  --minShapes=spec"')
    res = subprocess.run(["bash", str(sh)], env={**os.environ, "TRTEXEC": str(old)}, capture_output=True, text=True)
    assert res.returncode == 1 and "build_engines.py" in res.stderr
    env = {k: v for k, v in os.environ.items() if k != "TRTEXEC"}
    env["PATH"] = "/usr/bin:/bin"
    if shutil.which("trtexec", path=env["PATH"]) or os.path.exists(ts.JETPACK_TRTEXEC):
        pytest.skip("a real trtexec is installed here")
    res = subprocess.run(["bash", str(sh)], env=env, capture_output=True, text=True)
    assert res.returncode == 1 and ts.JETPACK_TRTEXEC in res.stderr and "trtexec not found" in res.stderr


def test_vendored_copy_imports_without_the_package(tmp_path):
    root, specs = _bundle(tmp_path)
    ts.write_build_script(specs, root)
    device = tmp_path / "device"
    shutil.move(str(root), str(device))  # moved, as onto a Jetson
    # -I -S: no site-packages (so no installed or editable epts_export), no PYTHONPATH, no cwd on
    # sys.path; -B: the bundle stays as it was written
    python = [sys.executable, "-I", "-S", "-B"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([*python, "-c", "import epts_export"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "No module named 'epts_export'" in res.stderr  # the real one is out of reach
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import epts_export; from epts_export.trt import builder as m; "
            "print(epts_export.__file__); print(len(m.load_specs(m.Path(sys.argv[2]))), m.UserError.__module__); "
            "print(sorted(n for n in sys.modules if n.startswith('epts_export'))); sys.exit(m.main(['status']))")
    res = subprocess.run([*python, "-c", code, str(device / "_epts"), str(device)], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 1, res.stderr  # status: no TensorRT without site-packages
    origin, loaded, modules, status = res.stdout.splitlines()
    assert Path(origin) == device / "_epts" / "epts_export" / "__init__.py"
    assert loaded.split() == ["2", "epts_export.errors"]
    assert modules == str(sorted(["epts_export", "epts_export.errors", "epts_export.fsutil", "epts_export.interface",
                                  "epts_export.trt", "epts_export.trt.builder", "epts_export.trt.sparse"]))
    assert "tensorrt is not installed" in status
    res = subprocess.run([*python, str(device / "build_engines.py"), "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0 and "--level" in res.stdout
    res = subprocess.run([*python, str(device / "build_engines.py")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 1 and "cannot build engines here: tensorrt is not installed" in res.stderr
    assert not list(device.rglob("__pycache__"))
    # which builder build_engines.py picks: the installed one, else the copy (also when an older
    # epts_export without trt.builder is importable)
    old = tmp_path / "old" / "epts_export"
    old.mkdir(parents=True)
    (old / "__init__.py").write_text("")
    pick = ("import runpy, sys; sys.path[:0] = sys.argv[2:]; "
            "print(runpy.run_path(sys.argv[1])['_builder']().__file__)")
    res = subprocess.run([sys.executable, "-B", "-c", pick, str(device / "build_engines.py")], cwd=tmp_path,
                         capture_output=True, text=True)
    assert res.returncode == 0 and Path(res.stdout.strip()) == Path(te.__file__), res.stderr
    for extra in ([], [str(old.parent)]):
        res = subprocess.run([*python, "-c", pick, str(device / "build_engines.py"), *extra], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert Path(res.stdout.strip()) == device / "_epts" / "epts_export" / "trt" / "builder.py"
    res = subprocess.run([sys.executable, str(device / "build_engines.py"), "--help"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert res.returncode == 0 and "--level" in res.stdout


# --------------------------------------------------------------------------------------------
# sparse report


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


def test_sparse_report_inspector_and_log():
    r = sparse.sparse_report(json.dumps(DETAILED), LOG)
    assert r["source"] == "inspector+log" and r["layers"] == 4
    assert r["picked"] == ["fc_b", "/model/layers.0/mlp/up_proj/MatMul"]
    assert r["eligible"] == ["fc_a", "fc_b", "/model/layers.0/mlp/up_proj/MatMul", "/model/layers.0/mlp/down_proj/MatMul"]
    assert "/model/layers.0/self_attn/q_proj/MatMul" not in r["eligible"]  # HasSparseWeights 0
    assert set(r) == {"eligible", "picked", "layers", "source"}


def test_sparse_report_inspector_only_and_renamed_keys():
    renamed = {"layers": [  # a later TensorRT with other key names and JSON booleans
        {"LayerName": "gemm1", "Type": "Gemm", "Weights": {"Count": 4096, "Sparse": True}, "Tactic": "sm87_sparse_gemm"},
        {"LayerName": "gemm2", "SparseWeights": "true", "Tactic": "sm87_gemm"},
        {"LayerName": "gemm3", "SparseWeights": False, "Tactic": "sm87_gemm"},
    ]}
    r = sparse.sparse_report(json.dumps(renamed), [])
    assert r == {"eligible": ["gemm1", "gemm2"], "picked": ["gemm1"], "layers": 3, "source": "inspector"}


def test_sparse_report_names_only_and_log_only():
    names_only = json.dumps({"Layers": ["a + b", "c"], "Bindings": ["x"]})  # LAYER_NAMES_ONLY verbosity
    r = sparse.sparse_report(names_only, LOG[1:2])
    assert r == {"eligible": ["fc_a", "fc_b", "/model/layers.0/mlp/up_proj/MatMul"], "picked": [], "layers": 2,
                 "source": "inspector+log"}
    assert sparse.sparse_report("", LOG)["source"] == "log"
    assert sparse.sparse_report("not json {", [])["source"] == "none"
    empty = sparse.sparse_report("", ["(Sparsity) Layers eligible for sparse math: ",
                                  "(Sparsity) TRT inference plan picked sparse implementation for layers:"])
    assert empty == {"eligible": [], "picked": [], "layers": 0, "source": "log"}


def test_report_cli(tmp_path, capsys):
    info = tmp_path / "layers.json"
    info.write_text(json.dumps(DETAILED))
    log = tmp_path / "build.log"
    log.write_text("\n".join(LOG))
    assert te.main(["report", str(info), "--log", str(log)]) == 0
    assert json.loads(capsys.readouterr().out)["picked"] == ["fc_b", "/model/layers.0/mlp/up_proj/MatMul"]


# --------------------------------------------------------------------------------------------
# a fake tensorrt that records calls


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


def make_fake_trt(strongly_typed: bool = True, bf16: bool = True, inputs=None, parse_errors=(), build_ok=True,
                  layer_json: str = json.dumps(DETAILED), build_log=tuple(LOG), bad_cache: bool = False):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0.30" if strongly_typed else "8.5.2.2"
    rec = types.SimpleNamespace(network_flags=None, parsed=None, flags=[], pools={}, profiles=[], verbosity=None,
                                cache_blobs=[], set_cache=[], built=0, inspector_format=None, files_at_build=None)
    trt.rec = rec

    class ILogger:
        Severity = Severity

        def __init__(self):
            pass

        def log(self, severity, msg):  # pragma: no cover - overridden
            pass

    class Logger(ILogger):
        WARNING, ERROR, INFO = Severity.WARNING, Severity.ERROR, Severity.INFO

        def __init__(self, min_severity=Severity.WARNING):
            super().__init__()

    trt.ILogger, trt.Logger = ILogger, Logger
    if strongly_typed:
        trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1})
    else:
        trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag",
                                                         {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1})
    flags = {"FP16": 0, "INT8": 1, "SPARSE_WEIGHTS": 7 if strongly_typed else 6}
    if bf16:
        flags["BF16"] = 17
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", flags)
    pools = {"WORKSPACE": 0, "DLA_MANAGED_SRAM": 1}
    if strongly_typed:
        pools["TACTIC_DRAM"] = 4
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", pools)
    trt.ProfilingVerbosity = enum.IntEnum("ProfilingVerbosity", {"LAYER_NAMES_ONLY": 0, "NONE": 1, "DETAILED": 2})
    trt.LayerInformationFormat = enum.IntEnum("LayerInformationFormat", {"ONELINE": 0, "JSON": 1})

    shapes = inputs if inputs is not None else {n: ((-1, -1) if i < 3 else (-1, 2, -1, 16)) for i, n in enumerate(INPUTS)}

    class Network:
        num_inputs = len(shapes)

        def get_input(self, i):
            name = list(shapes)[i]
            return types.SimpleNamespace(name=name, shape=shapes[name])

    class OnnxParser:
        def __init__(self, network, logger):
            self.num_errors = len(parse_errors)

        def parse_from_file(self, path):
            rec.parsed = path
            return not parse_errors

        def get_error(self, i):
            return parse_errors[i]

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, mn, op, mx):
            self.shapes[name] = (tuple(mn), tuple(op), tuple(mx))

    class TimingCache:
        def __init__(self, blob):
            self.blob = bytes(blob)

        def serialize(self):
            return memoryview(self.blob + b"+timings")

    class Config:
        def __init__(self):
            self.cache = None

        def set_flag(self, flag):
            assert isinstance(flag, trt.BuilderFlag)  # by name, from the enum: never a bare int
            rec.flags.append(flag.name)

        def set_memory_pool_limit(self, pool, size):
            rec.pools[pool.name] = size

        @property
        def profiling_verbosity(self):
            return rec.verbosity

        @profiling_verbosity.setter
        def profiling_verbosity(self, v):
            rec.verbosity = v

        def add_optimization_profile(self, profile):
            rec.profiles.append(profile.shapes)

        def create_timing_cache(self, blob):
            rec.cache_blobs.append(bytes(blob))
            if bad_cache and blob:
                raise RuntimeError("cache header mismatch")
            return TimingCache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            rec.set_cache.append(ignore_mismatch)
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            rec.network_flags = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            rec.built += 1
            for line in build_log:
                self.logger.log(Severity.INFO, line)
            self.logger.log(Severity.VERBOSE, "Tactic 0x1 time 0.1 ms")
            self.logger.log(Severity.WARNING, "some warning")
            if not build_ok:
                self.logger.log(Severity.ERROR, "out of memory while timing tactics")
                return None
            return memoryview(b"PLAN-BYTES")

    class Inspector:
        def get_engine_information(self, fmt):
            rec.inspector_format = fmt
            return layer_json

    class Engine:
        def create_engine_inspector(self):
            return Inspector()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            assert bytes(data) == b"PLAN-BYTES"
            return Engine()

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt


@pytest.fixture
def replaces(monkeypatch):
    """Record os.replace calls (src, dst) while keeping their effect."""
    calls = []
    real = os.replace

    def spy(src, dst):
        calls.append((Path(src), Path(dst)))
        return real(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", spy)
    return calls


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_build_engine_sparse_strongly_typed(tmp_path, monkeypatch, replaces):
    trt = make_fake_trt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    spec = make_spec(tmp_path)
    write_onnx(spec)
    messages = []
    result = te.build_engine(spec, log=messages.append)
    rec = trt.rec
    assert rec.network_flags == 1 << 1  # 1 << int(STRONGLY_TYPED)
    assert rec.parsed == str(spec.onnx)
    assert rec.flags == ["SPARSE_WEIGHTS"]  # by name; no FP16 flag on a strongly typed network
    assert rec.pools == {"WORKSPACE": 1024 * 2**20, "TACTIC_DRAM": 256 * 2**20}
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
    assert _files(tmp_path / "engines") == {"level-2of4.engine", "target.timing.cache", "level-2of4.layers.json"}
    assert result["engine"] == str(spec.engine) and result["bytes"] == len(b"PLAN-BYTES")
    assert result["tensorrt"] == "10.3.0.30" and result["build_s"] >= 0
    assert result["sparse_report"]["picked"] == ["fc_b", "/model/layers.0/mlp/up_proj/MatMul"]
    assert result["sparse_report"]["source"] == "inspector+log"
    assert any("some warning" in m for m in messages) and any("(Sparsity)" in m for m in messages)
    assert not any("Tactic 0x1" in m for m in messages)  # verbose lines stay out
    json.dumps(result)  # goes into the bundle manifest


def test_build_engine_dense_reuses_the_timing_cache(tmp_path, monkeypatch):
    trt = make_fake_trt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    spec = make_spec(tmp_path, "0.5", sparse=False, tactic_dram_mb=None)
    write_onnx(spec)
    spec.timing_cache.parent.mkdir(parents=True)
    spec.timing_cache.write_bytes(b"old")
    te.build_engine(spec, log=lambda m: None)
    assert trt.rec.flags == []  # no SPARSE_WEIGHTS for a dense level
    assert trt.rec.pools == {"WORKSPACE": 1024 * 2**20}
    assert trt.rec.cache_blobs == [b"old"]
    assert spec.timing_cache.read_bytes() == b"old+timings"


def test_build_engine_replaces_a_foreign_timing_cache(tmp_path, monkeypatch):
    trt = make_fake_trt(bad_cache=True)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    spec = make_spec(tmp_path)
    write_onnx(spec)
    spec.timing_cache.parent.mkdir(parents=True)
    spec.timing_cache.write_bytes(b"from another GPU")
    messages = []
    te.build_engine(spec, log=messages.append)
    assert trt.rec.cache_blobs == [b"from another GPU", b""]
    assert spec.timing_cache.read_bytes() == b"+timings"
    assert any("fresh" in m for m in messages)


def test_build_engine_tensorrt8_fallback(tmp_path, monkeypatch):
    trt = make_fake_trt(strongly_typed=False, bf16=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    spec = make_spec(tmp_path)  # fp16, sparse, tactic DRAM requested
    write_onnx(spec)
    messages = []
    te.build_engine(spec, log=messages.append)
    assert trt.rec.network_flags == 1 << 0  # EXPLICIT_BATCH
    assert trt.rec.flags == ["FP16", "SPARSE_WEIGHTS"]
    assert trt.rec.pools == {"WORKSPACE": 1024 * 2**20}  # no TACTIC_DRAM pool on this version
    assert any("TACTIC_DRAM" in m for m in messages)

    trt = make_fake_trt(strongly_typed=False, bf16=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    messages = []
    te.build_engine(make_spec(tmp_path, precision="bf16"), log=messages.append)
    assert trt.rec.flags == ["SPARSE_WEIGHTS"] and any("no BF16" in m for m in messages)


def test_build_engine_failures_leave_no_files(tmp_path, monkeypatch):
    spec = make_spec(tmp_path)
    write_onnx(spec)
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(parse_errors=("In node 3: unsupported op If",)))
    with pytest.raises(RuntimeError, match="unsupported op If") as e:
        te.build_engine(spec, log=lambda m: None)
    assert not isinstance(e.value, UserError)
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(build_ok=False))
    with pytest.raises(RuntimeError, match="out of memory"):
        te.build_engine(spec, log=lambda m: None)
    assert not (tmp_path / "engines").exists() or _files(tmp_path / "engines") == set()


def test_atomic_write_cleans_up_on_error(tmp_path, monkeypatch):
    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fsutil.os, "replace", boom)
    with pytest.raises(OSError):
        fsutil.write_bytes(tmp_path / "x.engine", b"data", fsync=True)
    assert list(tmp_path.iterdir()) == []


def test_build_engine_user_errors(tmp_path, monkeypatch):
    spec = make_spec(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(UserError, match=r"epts-export\[tensorrt\]"):
        te.build_engine(spec)
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt())
    with pytest.raises(UserError, match="missing"):
        te.build_engine(spec)
    write_onnx(spec)
    elastic = {n: s for n, s in zip(INPUTS, [(-1, -1)] * 3 + [(-1, 2, -1, 16)] * 4)} | {"sparsity_level": ()}
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(inputs=elastic))
    with pytest.raises(UserError, match="baked"):
        te.build_engine(spec, log=lambda m: None)
    wrong_heads = {n: ((-1, -1) if i < 3 else (-1, 4, -1, 16)) for i, n in enumerate(INPUTS)}
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(inputs=wrong_heads))
    with pytest.raises(UserError, match="kv_heads"):
        te.build_engine(spec, log=lambda m: None)


def test_build_engine_without_position_ids(tmp_path, monkeypatch):
    trt = make_fake_trt(inputs={n: ((-1, -1) if i < 3 else (-1, 2, -1, 16)) for i, n in enumerate(INPUTS)
                                if n != "position_ids"})
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    spec = make_spec(tmp_path)
    write_onnx(spec)
    te.build_engine(spec, log=lambda m: None)
    assert all("position_ids" not in p for p in trt.rec.profiles)


# --------------------------------------------------------------------------------------------
# status and the build CLI


def _fake_torch(available: bool, cuda: str | None = "12.6"):
    cuda_ns = types.SimpleNamespace(is_available=lambda: available, get_device_name=lambda i=0: "Orin",
                                    get_device_capability=lambda i=0: (8, 7))
    return types.SimpleNamespace(cuda=cuda_ns, version=types.SimpleNamespace(cuda=cuda), __version__="2.5")


def test_tensorrt_status_without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    ok, why = te.tensorrt_status()
    assert ok is False
    assert "not installed" in why and "epts-export[tensorrt]" in why


def test_tensorrt_status_with_and_without_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt())
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(True))
    assert te.tensorrt_status() == (True, "TensorRT 10.3.0.30, Orin (sm_87)")
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(False))
    ok, why = te.tensorrt_status()
    assert not ok and why.startswith("no CUDA GPU visible")
    trt = make_fake_trt()

    def no_device(logger):
        raise TypeError("pybind11::init(): factory function returned nullptr")

    trt.Builder = no_device
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "torch", None)  # no torch: TensorRT's own probe
    ok, why = te.tensorrt_status()
    assert not ok and "no CUDA GPU visible" in why


def test_build_cli_builds_every_level(tmp_path, monkeypatch, capsys):
    root, specs = _bundle(tmp_path)
    ts.write_build_script(specs, root)
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt())
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(True))
    assert te.main(["build", str(root)]) == 0
    out = capsys.readouterr().out
    assert "level 0.5:" in out and "level 2:4:" in out and "sparse kernel: fc_b" in out
    assert (root / "engines" / "level-2of4.engine").is_file() and (root / "engines" / "level-0.5.engine").is_file()
    assert te.main(["build", str(root), "--level", "3:4"]) == 1
    assert "no engine for level" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert te.main(["build", str(root)]) == 1
    assert "epts-export[tensorrt]" in capsys.readouterr().err
    assert te.main(["build", str(tmp_path / "nowhere")]) == 1
