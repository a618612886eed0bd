"""A bundle's entry points (``deploy.scripts``, ``deploy.engines.trtexec_command``): trtexec commands,
build_engines.sh run against a fake trtexec, and the hashed device package both scripts run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from epts_export.deploy import engines as hengines
from epts_export.deploy import scripts as hscripts
from epts_export.device.trt import spec as tspec
from trt_fakes import (DECODE, baked_bundle_dir, fake_python, fake_trtexec, hashed_bundle, make_refit_spec,
                       make_sparse_spec, make_spec, write_onnx)


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

def test_build_script_is_valid_bash_with_relative_paths(tmp_path):
    root, specs = baked_bundle_dir(tmp_path)
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

def test_build_script_runs_from_a_moved_bundle(tmp_path):
    root, specs = baked_bundle_dir(tmp_path)
    hscripts.write_scripts(root, specs, None)
    moved = tmp_path / "device" / "bundle"
    shutil.move(str(root), str(moved))
    exe = fake_trtexec(tmp_path, 'echo "  --profile   Build with profiles"; echo "  --stronglyTyped  typed"')
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
    exe = fake_trtexec(tmp_path, 'echo "  --profile   Build with profiles"; echo "  --stronglyTyped  typed"')
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
    broken = fake_trtexec(tmp_path / "broken", 'echo "  --profile x"; echo "  --stronglyTyped x"').parent / "trtexec"
    broken.write_text(broken.read_text().replace('printf \'%s\\n\' "$*"', "exit 7; #"))
    res = subprocess.run(["bash", str(sh)], env={**env, "TRTEXEC": str(broken)}, capture_output=True, text=True)
    assert res.returncode != 0 and pycalls.read_text().splitlines() == ["build_engines.py bake 0.3", "build_engines.py clean"]

def test_build_script_refuses_old_or_missing_trtexec(tmp_path):
    root, specs = baked_bundle_dir(tmp_path)
    hscripts.write_scripts(root, specs, None)
    sh = root / "build_engines.sh"
    old = fake_trtexec(tmp_path, 'echo "  --minShapes=spec"')
    res = subprocess.run(["bash", str(sh)], env={**os.environ, "TRTEXEC": str(old)}, capture_output=True, text=True)
    assert res.returncode == 1 and "build_engines.py" in res.stderr
    env = {k: v for k, v in os.environ.items() if k != "TRTEXEC"}
    env["PATH"] = "/usr/bin:/bin"
    if shutil.which("trtexec", path=env["PATH"]) or os.path.exists(hscripts.JETPACK_TRTEXEC):
        pytest.skip("a real trtexec is installed here")
    res = subprocess.run(["bash", str(sh)], env=env, capture_output=True, text=True)
    assert res.returncode == 1 and hscripts.JETPACK_TRTEXEC in res.stderr and "trtexec not found" in res.stderr

def test_vendored_copy_runs_without_the_package_and_only_as_hashed(tmp_path):
    """build_engines.py and run.py in an interpreter with numpy, tokenizers and onnxruntime only:
    they check every file of _epts/ against the manifest before importing from it, import nothing
    from beside them (a tensorrt.py dropped there is not TensorRT), and leave no __pycache__."""
    bare = os.environ.get("EPTS_BARE_PYTHON")
    if not bare:
        pytest.skip("EPTS_BARE_PYTHON is not set: .ci/run points it at a venv with only numpy, tokenizers, onnxruntime")
    device = hashed_bundle(tmp_path)
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
