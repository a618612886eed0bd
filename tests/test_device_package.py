"""The device package (``epts_export.device``): what ships in every bundle and runs on the device.

It may import the standard library, numpy, tokenizers, onnxruntime and TensorRT's bindings, and
nothing else: every import in it, module-level or inside a function, is walked here. It runs on
the Pythons of JetPack 5 (3.8) and 6 (3.10) as well as ours, and no module is over 500 lines.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import epts_export.device as device

ROOT = Path(device.__file__).resolve().parent
THIRD_PARTY = {"numpy", "tokenizers", "onnxruntime", "tensorrt", "tensorrt_bindings"}
MODULES = sorted(ROOT.rglob("*.py"))
MAX_LINES = 500


def _imports(path: Path) -> list[tuple[int, str, int]]:
    """(line, module, relative level) of every import in ``path``, at any depth, and of every
    ``importlib.import_module`` of a string constant or of a name bound to a tuple of them."""
    tree = ast.parse(path.read_text(), str(path))
    consts = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
            names = [e.value for e in node.value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            for t in node.targets:
                if isinstance(t, ast.Name):
                    consts[t.id] = names
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, node.module or "", node.level))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            out += [(node.lineno, name, 0) for name in consts.get("MODULE_NAMES", [])]
    return out


def test_every_import_is_stdlib_numpy_tokenizers_onnxruntime_or_tensorrt():
    bad = []
    for path in MODULES:
        rel = path.relative_to(ROOT)
        depth = len(rel.parts) - 1  # 0: device/x.py, 1: device/trt/x.py
        for line, module, level in _imports(path):
            where = f"{rel}:{line}"
            if level:
                if level > depth + 1:  # climbs out of epts_export.device
                    bad.append(f"{where}: relative import above the device package ({'.' * level}{module})")
                continue
            top = module.split(".")[0]
            if top not in sys.stdlib_module_names and top not in THIRD_PARTY:
                bad.append(f"{where}: imports {module}")
    assert not bad, "\n".join(bad)
    assert len(MODULES) >= 15  # the walk saw the package (device/ and device/trt/)


def test_the_walk_catches_what_it_must(tmp_path):
    """The check itself: a function-level torch import and a relative import out of the package are found."""
    f = tmp_path / "x.py"
    f.write_text("import json\n\ndef g():\n    import torch\n    from ..onnx import export\n    from .files import x\n")
    found = [(m, lvl) for _, m, lvl in _imports(f)]
    assert ("torch", 0) in found and ("onnx", 2) in found and ("files", 1) in found


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(ROOT)) for p in MODULES])
def test_no_module_is_over_500_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES, f"{path.relative_to(ROOT)}: split it by concern"


def _python(version: str) -> str | None:
    """An interpreter of ``version`` ("3.8") that runs: on PATH, or one of pyenv's (this kind of machine has them)."""
    import glob
    import os

    for exe in [shutil.which(f"python{version}"), *sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")))]:
        if exe and subprocess.run([exe, "-c", "pass"], capture_output=True).returncode == 0:
            return exe
    return None


@pytest.mark.parametrize("version", ["3.8", "3.10"])
def test_the_device_package_compiles_on_jetpack_pythons(version, tmp_path):
    """JetPack 5 ships Python 3.8, JetPack 6 Python 3.10: the package must at least compile there
    (``from __future__ import annotations`` keeps 3.9+ annotations unevaluated; runtime generics
    such as ``tuple[int, ...]`` outside annotations would fail there and are caught by importing the
    modules that need no third-party package)."""
    exe = _python(version)
    if exe is None:
        pytest.skip(f"no Python {version} here")
    copy = tmp_path / "epts_export"
    shutil.copytree(ROOT, copy / "device", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "__init__.py").write_text("")
    res = subprocess.run([exe, "-m", "compileall", "-q", str(copy)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    plain = ["errors", "files", "levels", "interface", "archive", "trt.spec", "trt.logger", "trt.sparsity"]
    code = "import sys; sys.path.insert(0, sys.argv[1])\n" + "".join(f"import epts_export.device.{m}\n" for m in plain)
    res = subprocess.run([exe, "-I", "-B", "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
