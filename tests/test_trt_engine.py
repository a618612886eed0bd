"""TensorRT engine building without TensorRT: profiles, trtexec argv, build scripts, the sparse
report, and build_engine (and build_engines.py) against a fake ``tensorrt`` that is derived from,
and checked against, the real bindings of TensorRT 8.6.1, 10.3.0 and 11.4.0.106
(tests/trt_bindings.py prepares them, tests/trt_api.py checks the fake; see the ``api`` fixture).
Tests that take ``api`` run once per version and skip, saying why, where the bindings cannot be
prepared (no gcc/binutils, no package registry)."""

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

import epts_export.device.files as dfiles
import trt_api
import trt_bindings
from epts_export.deploy import engines as hengines
from epts_export.deploy import scripts as hscripts
from epts_export.device.trt import builder, cli, probe, sparsity
from epts_export.device.trt import logger as trt_logger
from epts_export.device.trt import spec as tspec
from epts_export.errors import UserError

REPO = Path(__file__).resolve().parents[1]
KV = tspec.KVLayout(layers=2, kv_heads=2, head_dim=16)
PREFILL = tspec.ShapeRange("prefill", batch=(1, 1, 2), seq=(1, 64, 128), past=(0, 0, 0))
DECODE = tspec.ShapeRange("decode", batch=(1, 1, 2), seq=(1, 1, 1), past=(0, 64, 127))
CONTINUE = tspec.ShapeRange("continue", batch=(1, 1, 2), seq=(1, 16, 32), past=(1, 64, 96))
INPUTS = ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.0.value",
          "past_key_values.1.key", "past_key_values.1.value"]
# the names epts_export looks up with a default on purpose, because some versions lack them
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


# --------------------------------------------------------------------------------------------
# the real bindings, one version per test


_APIS: dict[str, object] = {}


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


@pytest.fixture(params=list(trt_bindings.VERSIONS))
def api(request) -> trt_api.Api:
    """The real API of one TensorRT version (a fresh record of misses and violations per test)."""
    return trt_api.Api(surface_or_skip(request.param))


@pytest.fixture
def install(api, monkeypatch):
    """install(fake) puts ``fake``, checked against ``api``, in sys.modules as ``tensorrt`` and
    returns ``fake`` (its records); after the test, no violation and no unexpected missing name."""
    def put(fake):
        monkeypatch.setitem(sys.modules, "tensorrt", trt_api.checked(api, fake))
        monkeypatch.setitem(sys.modules, "tensorrt_bindings", None)
        return fake

    yield put
    api.assert_clean(PROBED)


# --------------------------------------------------------------------------------------------
# profiles and trtexec


def test_profile_shapes_small_layout(tmp_path):
    shapes = tspec.profile_shapes(make_spec(tmp_path))
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
    tspec.ShapeRange("p", (1, 1, 1), (0, 1, 1), (0, 0, 0)),  # seq min 0
    tspec.ShapeRange("p", (1, 1, 1), (1, 1, 1), (-1, 0, 0)),  # past < 0
    tspec.ShapeRange("p", (2, 1, 4), (1, 1, 1), (0, 0, 0)),  # min > opt
    tspec.ShapeRange("p", (1, 1), (1, 1, 1), (0, 0, 0)),  # not a triple
])
def test_profile_shapes_rejects_bad_ranges(tmp_path, profile):
    with pytest.raises(UserError):
        tspec.profile_shapes(make_spec(tmp_path, profiles=[profile]))


def test_profile_names_must_be_unique(tmp_path):
    with pytest.raises(UserError, match="twice"):
        tspec.profile_shapes(make_spec(tmp_path, profiles=[PREFILL, PREFILL]))


def _arg(argv, prefix):
    return [a[len(prefix):] for a in argv if a.startswith(prefix)]


def test_trtexec_command_sparse_and_dense(tmp_path):
    sparse = hengines.trtexec_command(make_spec(tmp_path, "2:4", sparse=True), root=tmp_path)
    dense = hengines.trtexec_command(make_spec(tmp_path, "0.5", sparse=False), root=tmp_path)
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
    argv = hengines.trtexec_command(make_spec(tmp_path, profiles=[DECODE]))
    assert not any(a.startswith("--profile=") for a in argv)
    assert len(_arg(argv, "--optShapes=")) == 1
    assert _arg(argv, "--onnx=") == [str(tmp_path / "level-2of4" / "model.onnx")]  # absolute without a root


# --------------------------------------------------------------------------------------------
# engines.json and the scripts


def test_spec_json_roundtrip(tmp_path):
    """engines.json holds the weight source once and every engine's spec, paths relative to the
    bundle: it reads back equal, and in a moved bundle every path follows."""
    refit = make_refit_spec(tmp_path)
    specs = [refit, make_sparse_spec(tmp_path, refit.source)]
    tspec.write_engines(tmp_path, specs, refit.source)
    doc = json.loads((tmp_path / tspec.ENGINES_JSON).read_text())
    assert doc["version"] == 3 and doc["source"]["graph"] == "model/decoder.onnx" and doc["report"] == "engines/report.json"
    assert doc["source"]["weights_file"] == "model/decoder.weights" and doc["source"]["levels"]["2:4"] == 3
    assert [(e["levels"], e["weights"], e["build_level"]) for e in doc["engines"]] == [
        (["0.3", "0.5", "0.7"], "refit", "0.3"), (["2:4"], "baked", "2:4")]
    assert str(tmp_path) not in json.dumps(doc)
    back, source = tspec.load_engines(tmp_path)
    assert back == specs and source == refit.source and source.prunable == ["w.up", "w.down"]
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path, moved, ignore=shutil.ignore_patterns("elsewhere"))
    specs2, source2 = tspec.load_engines(moved)
    assert specs2[0].engine == moved / "engines" / "unstructured.engine" and source2.graph == moved / "model" / "decoder.onnx"
    for spec in (make_spec(tmp_path), make_spec(tmp_path, "0.5", sparse=False, precision="bf16", tactic_dram_mb=None)):
        d = tspec.spec_to_dict(spec, tmp_path)  # a baked-layout bundle: each level's own graph, no source
        assert d["onnx"] == f"level-{spec.levels[0].replace(':', 'of')}/model.onnx" and d["weights"] == "baked"
        assert tspec.spec_from_dict(json.loads(json.dumps(d)), tmp_path) == spec
    d = tspec.spec_to_dict(refit, tmp_path)
    for broken, source in (({**d, "weights": "baked"}, refit.source),  # a baked engine serves one level
                           ({**d, "build_level": "0.9"}, refit.source),  # built with a level it does not serve
                           (d, None),  # a refit engine without the weight builder
                           ({**d, "levels": ["0.3", "0.6"]}, refit.source)):  # a level the builder's table lacks
        with pytest.raises(UserError, match="malformed"):
            tspec.spec_from_dict(broken, tmp_path, source)


def test_older_or_newer_engines_json_is_refused(tmp_path):
    """Version 2 refit each level from its own baked graph (one copy per level): rebuild; a newer one: update."""
    spec = make_spec(tmp_path)
    for version, hint in ((2, "rebuild the bundle"), (4, "update epts-export"), ("abc", "rebuild the bundle")):
        (tmp_path / tspec.ENGINES_JSON).write_text(json.dumps({"format": tspec.ENGINES_FORMAT, "version": version,
                                                               "engines": [tspec.spec_to_dict(spec, tmp_path)]}))
        with pytest.raises(UserError, match=f"has version .*{hint}"):
            tspec.load_specs(tmp_path)


def test_plan_problems(tmp_path):
    refit = make_refit_spec(tmp_path)
    sparse_spec = make_sparse_spec(tmp_path, refit.source)
    write_onnx(refit)
    assert tspec.plan_problems([refit, sparse_spec], ["0.3", "0.5", "0.7", "2:4"]) == []
    assert tspec.spec_for_level([refit, sparse_spec], "0.5") is refit and tspec.spec_for_level([refit], "0.9") is None
    problems = tspec.plan_problems([refit, sparse_spec, make_spec(tmp_path, "0.5", sparse=False)], ["0.3", "0.5", "0.7"])
    assert any("level 0.5 is served by 2 engine specs" in p for p in problems)
    assert any("lists level 2:4, which the bundle does not hold" in p for p in problems)
    assert any("level-0.5/model.onnx that engines are built from is missing" in p for p in problems)
    refit.onnx.unlink()
    assert tspec.plan_problems([refit]) == [f"the graph {refit.onnx} that engines are built from is missing"]


def test_spec_paths_must_stay_inside_the_bundle(tmp_path):
    spec = make_spec(tmp_path / "bundle")
    spec.timing_cache = tmp_path / "outside.cache"
    with pytest.raises(UserError, match="outside the bundle"):
        tspec.spec_to_dict(spec, tmp_path / "bundle")
    d = tspec.spec_to_dict(make_spec(tmp_path), tmp_path)
    d["engine"] = "../escape.engine"
    with pytest.raises(UserError, match="inside the bundle"):
        tspec.spec_from_dict(d, tmp_path)
    with pytest.raises(UserError, match="malformed"):
        tspec.spec_from_dict({"level": "2:4"}, tmp_path)
    refit = make_refit_spec(tmp_path)
    tspec.write_engines(tmp_path, [refit], refit.source)
    doc = json.loads((tmp_path / tspec.ENGINES_JSON).read_text())
    for key, value, match in (("weights_file", "/etc/decoder.weights", "inside the bundle"),
                              ("weights_file", "engines/decoder.weights", "beside source.graph"),
                              ("tensors", {"w.norm": {"file": "../../etc/passwd", "offset": 0, "length": 8, "dtype": "uint8",
                                                      "shape": [8]}}, "not in a file beside the graph"),
                              ("tensors", {"w.norm": {"file": "model.onnx_data", "offset": -8, "length": 8, "dtype": "uint8",
                                                      "shape": [8]}}, "negative offset")):
        bad = json.loads(json.dumps(doc))
        bad["source"][key] = value
        (tmp_path / tspec.ENGINES_JSON).write_text(json.dumps(bad))
        with pytest.raises(UserError, match=match):
            tspec.load_engines(tmp_path)


def _bundle(tmp_path: Path) -> tuple[Path, list[tspec.EngineSpec]]:
    root = tmp_path / "bundle"
    specs = [make_spec(root, "0.5", sparse=False, tactic_dram_mb=None), make_spec(root, "2:4", sparse=True)]
    for s in specs:
        write_onnx(s)
    return root, specs


def test_build_script_is_valid_bash_with_relative_paths(tmp_path):
    root, specs = _bundle(tmp_path)
    hscripts.write_scripts(root, specs, None)
    sh, py, run = root / "build_engines.sh", root / "build_engines.py", root / "run.py"
    text = sh.read_text()
    assert subprocess.run(["bash", "-n", str(sh)], capture_output=True).returncode == 0
    assert str(root) not in text and str(tmp_path) not in text
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert "built on" in text and "Jetson" in text and "command -v trtexec" in text
    assert hscripts.JETPACK_TRTEXEC in text
    assert text.count("--saveEngine=") == 2 and text.count("--sparsity=enable") == 1
    assert "force" not in text and " bake " not in text  # a baked-layout bundle: each level's own graph
    assert text.rstrip().endswith('"$PY" build_engines.py report  # check each level against ONNX Runtime, time the engines')
    assert all(os.access(f, os.X_OK) for f in (sh, py, run))
    doc = json.loads((root / tspec.ENGINES_JSON).read_text())
    assert doc["format"] == tspec.ENGINES_FORMAT and doc["version"] == 3 and doc["source"] is None
    assert [e["levels"] for e in doc["engines"]] == [["0.5"], ["2:4"]]
    assert str(root) not in json.dumps(doc)
    for script in (py, run):
        compile(script.read_text(), str(script), "exec")
    assert tspec.load_specs(root) == specs
    assert (root / "_epts" / "epts_export" / "device" / "trt" / "cli.py").is_file()


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
    hscripts.write_scripts(root, specs, None)
    moved = tmp_path / "device" / "bundle"
    shutil.move(str(root), str(moved))
    exe = _fake_trtexec(tmp_path, 'echo "  --profile   Build with profiles"; echo "  --stronglyTyped  typed"')
    calls, pycalls = tmp_path / "calls.txt", tmp_path / "py.txt"
    env = {**os.environ, "TRTEXEC": str(exe), "FAKE_TRTEXEC_LOG": str(calls), "PYTHON": str(fake_python(tmp_path)),
           "FAKE_PYTHON_LOG": str(pycalls)}
    res = subprocess.run(["bash", str(moved / "build_engines.sh")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (moved / "engines" / "level-2of4.engine").read_text() == "plan"
    assert (moved / "engines" / "level-0.5.engine").is_file()
    assert "(Sparsity) Layers eligible for sparse math: fc1, fc2" in res.stdout
    lines = calls.read_text().splitlines()
    assert len(lines) == 2 and all(str(tmp_path) not in line for line in lines)
    assert "--profile=0" in lines[1] and "--profile=1" in lines[1]
    assert pycalls.read_text().splitlines() == ["build_engines.py report"]  # then checked and timed


def test_build_script_for_an_elastic_bundle(tmp_path):
    """The unstructured levels share one refittable engine (trtexec --refit), 2:4 has its own sparse
    one; both are built from the weight builder's graph after its build level's weights are written
    beside it (build_engines.py bake), which is emptied again at the end, even after a failure."""
    root = tmp_path / "bundle"
    refit = make_refit_spec(root)
    sparse_spec = make_sparse_spec(root, refit.source)
    write_onnx(refit)
    by_level = {"0.3": refit, "0.5": refit, "0.7": refit, "2:4": sparse_spec}  # as engines.engine_specs maps them
    hscripts.write_scripts(root, list(by_level.values()), refit.source)
    sh = root / "build_engines.sh"
    text = sh.read_text()
    assert subprocess.run(["bash", "-n", str(sh)]).returncode == 0
    assert text.count("--saveEngine=") == 2  # one engine for the three unstructured levels
    blocks = text.split("\necho '== ")[1:]
    refit_block = next(b for b in blocks if b.startswith("levels 0.3, 0.5, 0.7: dense, refittable"))
    assert "--refit" in refit_block and "--onnx=model/decoder.onnx" in refit_block and "--sparsity" not in refit_block
    assert "--saveEngine=engines/unstructured.engine" in refit_block
    assert refit_block.index('build_engines.py bake 0.3') < refit_block.index("--onnx=")
    sparse_block = next(b for b in blocks if b.startswith("level 2:4: sparse"))
    assert "--refit" not in sparse_block and "--sparsity=enable" in sparse_block and "bake 2:4" in sparse_block
    doc = json.loads((root / tspec.ENGINES_JSON).read_text())
    assert [(e["levels"], e["weights"]) for e in doc["engines"]] == [(["0.3", "0.5", "0.7"], "refit"), (["2:4"], "baked")]
    assert tspec.load_specs(root) == [refit, sparse_spec]
    argv = hengines.trtexec_command(refit, root=root)
    assert "--refit" in argv and not any("strip" in a.lower() or "identical" in a.lower() for a in argv)
    assert [a for a in argv if a.startswith("--profile=")] == ["--profile=0", "--profile=1", "--profile=2"]
    exe = _fake_trtexec(tmp_path, 'echo "  --profile   Build with profiles"; echo "  --stronglyTyped  typed"')
    calls, pycalls = tmp_path / "calls.txt", tmp_path / "py.txt"
    env = {**os.environ, "TRTEXEC": str(exe), "FAKE_TRTEXEC_LOG": str(calls), "PYTHON": str(fake_python(tmp_path)),
           "FAKE_PYTHON_LOG": str(pycalls)}
    res = subprocess.run(["bash", str(sh)], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "profiles capped at 128 tokens, the model's max_position_embeddings (the target allows 4096)" in res.stdout
    lines = calls.read_text().splitlines()
    assert len(lines) == 2 and "--refit" in lines[0] and "--refit" not in lines[1]
    assert pycalls.read_text().splitlines() == ["build_engines.py bake 0.3", "build_engines.py bake 2:4",
                                                "build_engines.py report", "build_engines.py clean"]
    assert (root / "engines" / "unstructured.engine").is_file()
    pycalls.unlink()
    broken = _fake_trtexec(tmp_path / "broken", 'echo "  --profile x"; echo "  --stronglyTyped x"').parent / "trtexec"
    broken.write_text(broken.read_text().replace('printf \'%s\\n\' "$*"', "exit 7; #"))
    res = subprocess.run(["bash", str(sh)], env={**env, "TRTEXEC": str(broken)}, capture_output=True, text=True)
    assert res.returncode != 0 and pycalls.read_text().splitlines() == ["build_engines.py bake 0.3", "build_engines.py clean"]


def test_build_script_refuses_old_or_missing_trtexec(tmp_path):
    root, specs = _bundle(tmp_path)
    hscripts.write_scripts(root, specs, None)
    sh = root / "build_engines.sh"
    old = _fake_trtexec(tmp_path, 'echo "  --minShapes=spec"')
    res = subprocess.run(["bash", str(sh)], env={**os.environ, "TRTEXEC": str(old)}, capture_output=True, text=True)
    assert res.returncode == 1 and "build_engines.py" in res.stderr
    env = {k: v for k, v in os.environ.items() if k != "TRTEXEC"}
    env["PATH"] = "/usr/bin:/bin"
    if shutil.which("trtexec", path=env["PATH"]) or os.path.exists(hscripts.JETPACK_TRTEXEC):
        pytest.skip("a real trtexec is installed here")
    res = subprocess.run(["bash", str(sh)], env=env, capture_output=True, text=True)
    assert res.returncode == 1 and hscripts.JETPACK_TRTEXEC in res.stderr and "trtexec not found" in res.stderr


def _hashed_bundle(tmp_path: Path) -> Path:
    """A moved bundle with its scripts, _epts/ and a manifest that hashes every file (as build writes)."""
    from epts_export.fsutil import file_hashes

    root, specs = _bundle(tmp_path)
    hscripts.write_scripts(root, specs, None)
    (root / "manifest.json").write_text(json.dumps({"format": "epts-bundle", "files": file_hashes(root)}))
    device = tmp_path / "device"
    shutil.move(str(root), str(device))  # moved, as onto a Jetson
    return device


def test_vendored_copy_runs_without_the_package_and_only_as_hashed(tmp_path):
    """build_engines.py and run.py in an interpreter with numpy, tokenizers and onnxruntime only:
    they check every file of _epts/ against the manifest before importing from it, import nothing
    from beside them (a tensorrt.py dropped there is not TensorRT), and leave no __pycache__."""
    bare = os.environ.get("EPTS_BARE_PYTHON")
    if not bare:
        pytest.skip("EPTS_BARE_PYTHON is not set: .ci/run points it at a venv with only numpy, tokenizers, onnxruntime")
    device = _hashed_bundle(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*argv):
        return subprocess.run([bare, *map(str, argv)], cwd=tmp_path, env=env, capture_output=True, text=True)

    res = run(device / "build_engines.py", "--help")
    assert res.returncode == 0 and "bake" in res.stdout and "report" in res.stdout, res.stderr
    res = run(device / "build_engines.py", "status")
    assert res.returncode == 1 and "tensorrt is not installed" in res.stdout
    res = run(device / "build_engines.py")
    assert res.returncode == 1 and "cannot build engines here: tensorrt is not installed" in res.stderr
    code = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='probe'); import epts_export.device.trt.cli as c; "
            "import epts_export; print(epts_export.__file__); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'transformers')))")
    res = run("-c", code, device / "build_engines.py")
    assert res.returncode == 0, res.stderr
    origin, heavy = res.stdout.splitlines()
    assert Path(origin) == device / "_epts" / "epts_export" / "__init__.py" and heavy == "[]"
    (device / "tensorrt.py").write_text("raise SystemExit(42)\n")  # beside the scripts: never imported
    res = run(device / "build_engines.py", "status")
    assert res.returncode == 1 and "tensorrt is not installed" in res.stdout
    (device / "tensorrt.py").unlink()
    assert not list(device.rglob("__pycache__"))
    for tamper, why in ((lambda: (device / "_epts" / "numpy.py").write_text("x = 1\n"), "_epts/numpy.py is not listed"),
                        (lambda: (device / "_epts" / "epts_export" / "device" / "runner.py").write_text("import os\n"),
                         "_epts/epts_export/device/runner.py is missing or does not match")):
        tamper()
        for script in ("run.py", "build_engines.py"):
            res = run(device / script, "--help")
            assert res.returncode == 3 and why in res.stderr and "Traceback" not in res.stderr, (script, res.stderr)
        (device / "_epts" / "numpy.py").unlink(missing_ok=True)


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
    r = sparsity.sparse_report(json.dumps(DETAILED), LOG)
    assert r["source"] == "inspector+log" and r["layers"] == 4
    assert r["picked"] == ["fc_b", "/model/layers.0/mlp/up_proj/MatMul"]
    assert r["eligible"] == ["fc_a", "fc_b", "/model/layers.0/mlp/up_proj/MatMul", "/model/layers.0/mlp/down_proj/MatMul"]
    assert "/model/layers.0/self_attn/q_proj/MatMul" not in r["eligible"]  # HasSparseWeights 0
    assert set(r) == {"eligible", "picked", "layers", "myelin", "source"}


def test_sparse_report_inspector_only_and_renamed_keys():
    renamed = {"layers": [  # a later TensorRT with other key names and JSON booleans
        {"LayerName": "gemm1", "Type": "Gemm", "Weights": {"Count": 4096, "Sparse": True}, "Tactic": "sm87_sparse_gemm"},
        {"LayerName": "gemm2", "SparseWeights": "true", "Tactic": "sm87_gemm"},
        {"LayerName": "gemm3", "SparseWeights": False, "Tactic": "sm87_gemm"},
    ]}
    r = sparsity.sparse_report(json.dumps(renamed), [])
    assert r == {"eligible": ["gemm1", "gemm2"], "picked": ["gemm1"], "layers": 3, "myelin": 0, "source": "inspector"}


def test_sparse_report_names_only_and_log_only():
    names_only = json.dumps({"Layers": ["a + b", "c"], "Bindings": ["x"]})  # LAYER_NAMES_ONLY verbosity
    r = sparsity.sparse_report(names_only, LOG[1:2])
    assert r == {"eligible": ["fc_a", "fc_b", "/model/layers.0/mlp/up_proj/MatMul"], "picked": [], "layers": 2,
                 "myelin": 0, "source": "inspector+log"}
    assert sparsity.sparse_report("", LOG)["source"] == "log"
    assert sparsity.sparse_report("not json {", [])["source"] == "none"
    empty = sparsity.sparse_report("", ["(Sparsity) Layers eligible for sparse math: ",
                                  "(Sparsity) TRT inference plan picked sparse implementation for layers:"])
    assert empty == {"eligible": [], "picked": [], "layers": 0, "myelin": 0, "source": "log"}


REAL = REPO / "tests" / "data" / "trt_layer_info"  # real layer information, trimmed (SOURCES.md says from where)


def _fragment(name: str, layer: str) -> dict:
    """The body of one layer of TensorRT 10.1's output (the #4020 fragments): its complete top-level
    key lines, verbatim, under the layer name the fragment's header gives (the paste lost the Name line)."""
    text = (REAL / "trt10.1-resnet18-int8-sparsity-force.fragments.txt").read_text()
    block = text.split(f"----- fragment {name}:", 1)[1].split("\n----- fragment", 1)[0].split("\n", 1)[1]
    block = block.split("\n},{", 1)[0]  # the first layer of the fragment
    keep = [ln for ln in block.splitlines() if ln.startswith('  "') and not ln.startswith('   ')
            and ln.rstrip().endswith(",") and ln.count('"') % 2 == 0]
    return {"Name": layer, **json.loads("{" + "\n".join(keep).rstrip(",") + "}")}


def test_sparse_report_on_real_layer_information():
    """The report on TensorRT's own files: 8.x and 8.6 layer info (no sparse weights there; 8.6
    compiles the transformer into one opaque Myelin layer), TensorRT 10.1 layers of a
    --sparsity=force ResNet (2:4 weights with a dense tactic: eligible, not picked; a sparse
    ``..._sparse_...`` tactic: picked), and the log lines of 8.x and of 10.14 and later."""
    r = sparsity.sparse_report((REAL / "trt8.6-controlnet-fp16-myelin.json").read_text(), [])
    assert r == {"eligible": [], "picked": [], "layers": 14, "myelin": 1, "source": "inspector"}
    r = sparsity.sparse_report((REAL / "trt8.x-trex-mobilenet-qat-int8.json").read_text(), [])
    assert r["layers"] == 10 and r["eligible"] == [] and r["source"] == "inspector"
    assert sparsity.sparse_report((REAL / "trt10.1-resnet18-int8-sparsity-force.json").read_text(), [])["layers"] == 2
    dense, sparse_layer = _fragment("C", "resnetv15_stage3_conv0"), _fragment("D", "resnetv15_stage3_conv4")
    assert dense["HasSparseWeights"] == 1 and "_sparse_" not in dense["TacticName"]
    assert sparse_layer["HasSparseWeights"] == 1 and "_sparse_" in sparse_layer["TacticName"]
    r = sparsity.sparse_report(json.dumps({"Layers": [dense, sparse_layer]}), [])
    assert r["eligible"] == [dense["Name"], sparse_layer["Name"]] and r["picked"] == [sparse_layer["Name"]]
    log_10 = ["[V] (Sparsity) Found 2 layer(s) eligible to use sparse tactics: node_conv2d + node_relu, node_linear",
              "[V] (Sparsity) Chose 1 layer(s) using sparse tactics: node_linear",
              "[V]  (foreignNode) (Sparsity) Found 1 layer(s) eligible to use sparse tactics: node_mlp"]
    r = sparsity.sparse_report("", log_10)
    assert r["eligible"] == ["node_conv2d + node_relu", "node_linear", "node_mlp"] and r["picked"] == ["node_linear"]
    chose_none = sparsity.sparse_report("", ["[V] (Sparsity) Chose 0 layer(s) using sparse tactics:"])
    assert chose_none["picked"] == [] and chose_none["source"] == "log"


def test_report_cli(tmp_path, capsys):
    info = tmp_path / "layers.json"
    info.write_text(json.dumps(DETAILED))
    log = tmp_path / "build.log"
    log.write_text("\n".join(LOG))
    assert cli.main(["sparsity", str(info), "--log", str(log)]) == 0
    assert json.loads(capsys.readouterr().out)["picked"] == ["fc_b", "/model/layers.0/mlp/up_proj/MatMul"]


# --------------------------------------------------------------------------------------------
# a fake tensorrt derived from the real one: its enums, held to its API, recording every call


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


def make_fake_trt(api: trt_api.Api, inputs=None, parse_errors=(), build_ok=True, layer_json: str = json.dumps(DETAILED),
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


# what each major version's real API makes build_engine do: (create_network flags, builder flags for
# an fp16 sparse spec, builder flags for a refit spec with known weights)
BY_MAJOR = {
    8: (1 << 0, ["FP16", "SPARSE_WEIGHTS"], ["FP16", "REFIT"]),  # EXPLICIT_BATCH; weakly typed; no REFIT_INDIVIDUAL
    10: (1 << 1, ["SPARSE_WEIGHTS"], ["REFIT_INDIVIDUAL"]),  # STRONGLY_TYPED = 1
    11: (0, ["SPARSE_WEIGHTS"], ["REFIT_INDIVIDUAL"]),  # strongly typed only: STRONGLY_TYPED ignored, no FP16 flag
}


@pytest.fixture
def replaces(monkeypatch):
    """Record os.replace calls (src, dst) while keeping their effect."""
    calls = []
    real = os.replace

    def spy(src, dst):
        calls.append((Path(src), Path(dst)))
        return real(src, dst)

    monkeypatch.setattr(dfiles.os, "replace", spy)
    return calls


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


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
    trt = trt_api.checked(api, make_fake_trt(api))
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
    trt = install(make_fake_trt(api))
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
    assert _files(tmp_path / "engines") == {"level-2of4.engine", "target.timing.cache", "level-2of4.layers.json"}
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
    trt = install(make_fake_trt(api))
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
    trt = install(make_fake_trt(api, network_weights={"w.up"}))
    spec = make_refit_spec(tmp_path)
    write_onnx(spec)
    messages = []
    assert builder.build_engine(spec, log=messages.append, levels=Baker())["refittable"] == "all"
    assert trt.rec.flags[-1] == "REFIT" and "REFIT_INDIVIDUAL" not in trt.rec.flags
    if api.major >= 10:
        assert any("first: w.down" in m and "(REFIT)" in m for m in messages)
    trt = install(make_fake_trt(api))
    spec.refit_weights = None  # unknown: every weight
    builder.build_engine(spec, log=lambda m: None, levels=Baker())
    assert trt.rec.flags[-1] == "REFIT" and trt.rec.marked == []


def test_build_engine_dense_reuses_the_timing_cache(api, install, tmp_path):
    trt = install(make_fake_trt(api))
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
    trt = install(make_fake_trt(api, bad_cache=True))
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
    trt = install(make_fake_trt(api))
    messages = []
    spec = make_spec(tmp_path, precision="bf16")
    write_onnx(spec)
    builder.build_engine(spec, log=messages.append)
    assert trt.rec.flags == ["SPARSE_WEIGHTS"]
    assert any("no BF16 builder flag" in m for m in messages) == (api.major == 8)


def test_build_engine_failures_leave_no_files(api, install, tmp_path):
    spec = make_spec(tmp_path)
    write_onnx(spec)
    install(make_fake_trt(api, parse_errors=("unsupported op If",)))
    with pytest.raises(RuntimeError, match="node 3: unsupported op If") as e:
        builder.build_engine(spec, log=lambda m: None)
    assert not isinstance(e.value, UserError)
    install(make_fake_trt(api, build_ok=False))
    with pytest.raises(RuntimeError, match="out of memory"):
        builder.build_engine(spec, log=lambda m: None)
    assert not (tmp_path / "engines").exists() or _files(tmp_path / "engines") == set()


def test_build_engine_without_a_gpu_is_one_line(api, install, tmp_path):
    """The real Builder/Runtime raise TypeError where TensorRT cannot start: one UserError line."""
    spec = make_spec(tmp_path)
    write_onnx(spec)
    fake = make_fake_trt(api)
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


def no_tensorrt(monkeypatch) -> None:
    for name in probe.MODULE_NAMES:
        monkeypatch.setitem(sys.modules, name, None)


def test_build_engine_user_errors(api, install, tmp_path, monkeypatch):
    spec = make_spec(tmp_path)
    no_tensorrt(monkeypatch)
    with pytest.raises(UserError, match=r"epts-export\[tensorrt\]"):
        builder.build_engine(spec)
    install(make_fake_trt(api))
    with pytest.raises(UserError, match="missing"):
        builder.build_engine(spec)
    write_onnx(spec)
    elastic = {n: s for n, s in zip(INPUTS, [(-1, -1)] * 3 + [(-1, 2, -1, 16)] * 4)} | {"sparsity_level": ()}
    install(make_fake_trt(api, inputs=elastic))
    with pytest.raises(UserError, match="baked"):
        builder.build_engine(spec, log=lambda m: None)
    wrong_heads = {n: ((-1, -1) if i < 3 else (-1, 4, -1, 16)) for i, n in enumerate(INPUTS)}
    install(make_fake_trt(api, inputs=wrong_heads))
    with pytest.raises(UserError, match="kv_heads"):
        builder.build_engine(spec, log=lambda m: None)


def test_build_engine_without_position_ids(api, install, tmp_path):
    trt = install(make_fake_trt(api, inputs={n: ((-1, -1) if i < 3 else (-1, 2, -1, 16)) for i, n in enumerate(INPUTS)
                                             if n != "position_ids"}))
    spec = make_spec(tmp_path)
    write_onnx(spec)
    builder.build_engine(spec, log=lambda m: None)
    assert all("position_ids" not in p for p in trt.rec.profiles)


# --------------------------------------------------------------------------------------------
# importing TensorRT, status and the build CLI


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


def test_tensorrt_status_with_and_without_gpu(api, install, monkeypatch):
    """The GPU is asked of libcudart (ctypes, no torch); without libcudart, of TensorRT itself."""
    install(make_fake_trt(api))
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
    fake = make_fake_trt(api)
    fake.Builder = no_device
    install(fake)
    ok, why = probe.tensorrt_status()
    assert not ok and why.startswith(f"TensorRT {api.version} could not create a Builder (pybind11::init(): factory "
                                     f"function returned nullptr): no CUDA GPU visible")


def test_build_cli_builds_every_engine(api, install, tmp_path, monkeypatch, capsys):
    """build_engines.py build: each engine once (the refit one for its three levels), each with its
    build record (TensorRT version, compute capability), the build level's weights written before
    each build and emptied after; --level picks the engine serving a level."""
    from epts_export.device.trt import weights

    root = tmp_path / "bundle"
    refit = make_refit_spec(root)
    sparse_spec = make_sparse_spec(root, refit.source)
    write_onnx(refit)
    hscripts.write_scripts(root, [refit, refit, refit, sparse_spec], refit.source)
    baker = Baker()
    monkeypatch.setattr(weights, "LevelWeights", lambda source, threads=None: baker)
    install(make_fake_trt(api))
    cudart(monkeypatch, 1)
    assert cli.main(["--bundle", str(root), "build", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "levels 0.3, 0.5, 0.7:" in out and "level 2:4:" in out and "sparse kernel: fc_b" in out
    assert "0.3's in the plan; the others are refit at run time from the weight builder" in out
    assert baker.baked == ["0.3", "2:4"] and baker.cleaned == 1
    record = json.loads((root / "engines" / "unstructured.build.json").read_text())
    assert record["levels"] == ["0.3", "0.5", "0.7"] and record["weights"] == "refit" and record["build_level"] == "0.3"
    assert record["tensorrt"] == api.version and record["compute_capability"] == "8.7"
    assert (root / "engines" / "level-2of4.engine").is_file()
    assert cli.main(["--bundle", str(root), "build", "--level", "0.5", "--no-report"]) == 0  # the engine serving 0.5
    assert "levels 0.3, 0.5, 0.7:" in capsys.readouterr().out
    assert cli.main(["--bundle", str(root), "build", "--level", "3:4"]) == 1
    assert "no engine for level(s) 3:4" in capsys.readouterr().err
    refit.onnx.unlink()
    assert cli.main(["--bundle", str(root), "build"]) == 1
    assert "decoder.onnx that engines are built from is missing" in capsys.readouterr().err
    write_onnx(refit)
    no_tensorrt(monkeypatch)
    assert cli.main(["--bundle", str(root), "build", "--level", "2:4"]) == 1
    assert "epts-export[tensorrt]" in capsys.readouterr().err
    assert cli.main(["--bundle", str(tmp_path / "nowhere")]) == 1
    assert cli.main(["sparsity"]) == 0 and cli.main(["build"]) == 1  # build needs the bundle; sparsity does not


# --------------------------------------------------------------------------------------------
# the real bindings themselves (each version in its own interpreter)


def run_real(version: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
    """Run ``argv`` in a fresh interpreter with the real bindings of ``version`` (skip: not preparable here)."""
    surface_or_skip(version)
    return trt_bindings.run_python(version, argv, timeout=120, **kw)


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


@pytest.mark.parametrize("version", list(trt_bindings.VERSIONS))
def test_build_engines_py_needs_only_the_real_bindings(version, tmp_path):
    """A moved bundle's build_engines.py, with the real bindings, numpy and onnxruntime importable
    and nothing else (-I -S: no epts-export, no torch): it checks and loads the vendored device
    package and fails in one line, no GPU; its libcudart probe finds none."""
    device = _hashed_bundle(tmp_path)
    env = {**os.environ, "EPTS_EXEC_PATH": device_path()}
    res = run_real(version, [str(device / "build_engines.py"), "build", "--level", "0.5"], cwd=tmp_path, env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stderr.strip().splitlines() == [f"error: cannot build engines here: {no_gpu_status(version)}"]
    code = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='probe')\n"
            "from epts_export.device.trt import cli, probe; print(cli.__file__)\n"
            "print(probe.import_trt().__name__, sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'onnx', 'transformers')))")
    res = run_real(version, ["-c", code, str(device / "build_engines.py")], cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    origin, modules = res.stdout.splitlines()
    assert Path(origin) == device / "_epts" / "epts_export" / "device" / "trt" / "cli.py"
    assert modules == "tensorrt_bindings []"
    assert not list(device.rglob("__pycache__"))
