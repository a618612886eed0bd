"""The shape of the epts_export package: no import cycle between its modules (function-level imports
counted: a lazy import that hides a cycle is still one), no module over 500 lines, reading an export
folder or a bundle needs no torch, and no test leans on benchmarks/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import epts_export

ROOT = Path(epts_export.__file__).resolve().parent
MAX_LINES = 500


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def import_graph(modules: dict[str, Path] = MODULES) -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in its body. ``from pkg import sub`` of a
    submodule depends on the submodule (its package is its parent's business), ``from pkg import
    name`` of anything else on the package."""
    graph = {m: set() for m in modules}
    for m, path in modules.items():
        package = m if path.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")
                target = ".".join((base[:len(base) - node.level + 1] if node.level else []) + ([node.module] if node.module else []))
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                targets = subs + ([target] if len(subs) < len(node.names) else [])
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {t for t in targets if t in modules and t != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_modules_or_packages():
    graph = import_graph()
    assert cycles(graph) == []
    packages = {m: m.split(".")[1] if m.count(".") else m for m in graph}  # epts_export.pruning.x -> pruning
    pg: dict[str, set[str]] = {}
    for m, targets in graph.items():
        pg.setdefault(packages[m], set()).update(packages[t] for t in targets if packages[t] != packages[m])
    assert cycles({p: pg.get(p, set()) for p in set(packages.values())}) == []


def test_the_cycle_check_finds_a_lazy_cycle(tmp_path):
    """The check itself: two modules that import each other, one of them inside a function."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    mods = {f"pkg.{n}" if n != "__init__" else "pkg": pkg / f"{n}.py" for n in ("__init__", "a", "b")}
    assert cycles(import_graph(mods)) == [["pkg.a", "pkg.b"]]


def test_no_test_imports_a_benchmark():
    """tests/ tests the package; what tests benchmarks/ code lives in benchmarks/tests."""
    offenders = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "benchmarks"]
    assert offenders == []


@pytest.mark.parametrize("name", sorted(MODULES), ids=sorted(MODULES))
def test_no_module_is_over_500_lines(name):
    assert len(MODULES[name].read_text().splitlines()) <= MAX_LINES, f"{name}: split it by concern"


def test_reading_an_export_or_a_bundle_imports_no_torch(exports, tmp_path):
    """What reads an export folder (its manifest, levels, files) or a bundle runs where torch is not
    installed, and costs no torch import (over a second) where it is."""
    code = ("import sys\nfrom epts_export.onnx.reader import OnnxExport\nfrom epts_export.device.bundle import Bundle\n"
            "from epts_export.device.runner import Runner\n"
            "e = OnnxExport.open(sys.argv[1])\nprint(len(e.levels), e.mode)\n"
            "Runner(sys.argv[1])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))\n")
    res = subprocess.run([sys.executable, "-c", code, str(exports("llama", "dynamic"))], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["4 dynamic", "[]"]


def test_every_subpackage_is_in_the_wheel():
    """pyproject lists the packages by hand (two of them map from calibration/ and targets/): a new
    subpackage left off the list would import from a checkout and be missing from the wheel."""
    import tomllib

    conf = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {"epts_export." + ".".join(p.parent.relative_to(ROOT).parts) if p.parent != ROOT else "epts_export"
               for p in ROOT.rglob("__init__.py") if "__pycache__" not in p.parts}
    assert on_disk - set(conf["packages"]) == set()
    mapped = {name: ROOT.parent / folder for name, folder in conf["package-dir"].items() if name != "epts_export"}
    assert all(folder.is_dir() and any(folder.glob("*.toml")) for folder in mapped.values()), mapped
