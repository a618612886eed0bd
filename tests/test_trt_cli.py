"""build_engines.py's command line (``device.trt.cli``): building every engine with its record, and
a moved bundle's script with nothing but the real bindings, numpy and onnxruntime."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import trt_bindings
from epts_export.deploy import scripts as hscripts
from epts_export.device.trt import cli
from trt_fakes import (Baker, builder_trt, cudart, device_path, hashed_bundle, make_refit_spec, make_sparse_spec,
                       no_gpu_status, no_tensorrt, run_real, write_onnx)


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
    install(builder_trt(api))
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

@pytest.mark.parametrize("version", list(trt_bindings.VERSIONS))
def test_build_engines_py_needs_only_the_real_bindings(version, tmp_path):
    """A moved bundle's build_engines.py, with the real bindings, numpy and onnxruntime importable
    and nothing else (-I -S: no epts-export, no torch): it checks and loads the vendored device
    package and fails in one line, no GPU; its libcudart probe finds none."""
    device = hashed_bundle(tmp_path)
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
