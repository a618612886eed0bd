"""deploy/pipeline: stages hand each other what they opened. One `build` from a model resolves it
once, loads it once for optimize and once for export + parity, hashes every file once (as it is
written, or as a reused stage is opened), and writes each file once."""

from __future__ import annotations

import collections
import shutil
import sys
from pathlib import Path

import pytest

from epts_export.core.levels import parse_levels
from epts_export.deploy import pipeline
from epts_export.deploy.pipeline import BuildSpec, build


class Calls:
    """Counts calls of the package's functions by name, wherever a module imported them from."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.counts: collections.Counter = collections.Counter()
        self.hashed: list[Path] = []
        self.copied: list[Path] = []
        self.genai: list[Path] = []

    def count(self, module, name: str, record=None):
        real = getattr(module, name)

        def counted(*args, **kwargs):
            self.counts[name] += 1
            if record is not None:
                record(*args, **kwargs)
            return real(*args, **kwargs)

        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith("epts_export") and getattr(mod, name, None) is real:
                self.monkeypatch.setattr(mod, name, counted)

    def wrap_init(self, cls, name: str):
        real = cls.__init__

        def init(obj, *args, **kwargs):
            self.counts[name] += 1
            real(obj, *args, **kwargs)

        self.monkeypatch.setattr(cls, "__init__", init)


def _final(path) -> Path:
    """Where a file written into a staged folder (``<name>.partial``) ends up."""
    return Path(*[p[:-len(".partial")] if p.endswith(".partial") else p for p in Path(path).resolve().parts])


@pytest.fixture
def calls(monkeypatch):
    import epts_export.artifact.materialize as materialize
    import epts_export.deploy.assemble as assemble
    import epts_export.fsutil as fsutil
    import epts_export.models.hf as hf
    import epts_export.models.resolve as resolve
    import epts_export.models.weights as weights
    import epts_export.onnx.export  # noqa: F401 - every importer of what is counted is loaded first
    import epts_export.onnx.genai as genai
    import epts_export.onnx.parity  # noqa: F401
    import epts_export.pruning.optimize  # noqa: F401

    c = Calls(monkeypatch)
    c.count(fsutil, "sha256_file", lambda path, *a, **k: c.hashed.append(_final(path)))
    c.count(hf, "load_model")
    c.count(resolve, "resolve_model")
    c.count(weights, "weight_params")
    c.count(genai, "write_genai_config", lambda config, folder, *a, **k: c.genai.append(_final(folder)))
    c.wrap_init(materialize.ElasticModel, "ElasticModel")
    real_copytree = shutil.copytree

    def copytree(src, dst, *args, **kwargs):
        def copy(s, d, **kw):
            c.copied.append(_final(d))
            return shutil.copy2(s, d, **kw)
        return real_copytree(src, dst, *args, copy_function=copy, **kwargs)

    monkeypatch.setattr(assemble.shutil, "copytree", copytree)  # the module object: patched for its duration only
    return c


def _no_file_hashed_twice(hashed: list[Path]) -> None:
    twice = {str(p): n for p, n in collections.Counter(hashed).items() if n > 1}
    assert twice == {}


def test_a_build_from_a_model_opens_resolves_loads_and_hashes_once(tiny_dirs, tmp_path, calls):
    out = tmp_path / "dist"
    bundle = build(BuildSpec(source=str(tiny_dirs["llama"]), target="rtx-ada", out=out, levels=parse_levels("0.5,2:4"),
                             preset="quick"))
    assert (calls.counts["resolve_model"], calls.counts["weight_params"]) == (1, 1)
    assert calls.counts["load_model"] == 2  # optimize's model; the artifact's, for export and parity
    assert calls.counts["ElasticModel"] == 1
    _no_file_hashed_twice(calls.hashed)
    stages = out / pipeline.STAGES
    (art,) = stages.glob("artifact-*")
    (onnx,) = stages.glob("onnx-*")
    hashed = set(calls.hashed)
    # every file of the artifact and of the export hashed once, as it was written
    for folder in (art, onnx):
        written = {p.resolve() for p in folder.rglob("*") if p.is_file() and p.name not in ("manifest.json", "report.html")}
        assert written <= hashed, sorted(str(p) for p in written - hashed)
    # the bundle's copies of export files keep the export's hashes: none is read again
    copies = {p.relative_to(bundle.resolve()) for p in calls.copied}
    assert copies and not any((bundle / rel).resolve() in hashed for rel in copies)
    assert calls.genai == [onnx.resolve()]  # the export's, for the CPU; the elastic bundle ships none

    # a second target from the same --out, baked: every stage but the export reused, nothing loaded
    # but the model for the new export, the artifact hashed once as it is reopened
    calls.counts.clear()
    calls.hashed.clear()
    calls.genai.clear()
    calls.copied.clear()
    baked = build(BuildSpec(source=str(art), target="hopper", out=out, levels=parse_levels("0.5,2:4"), layout="baked"))
    assert (calls.counts["resolve_model"], calls.counts["load_model"], calls.counts["ElasticModel"]) == (0, 1, 1)
    _no_file_hashed_twice(calls.hashed)
    # each level folder's genai_config.json written once, for CUDA, and never copied from the export first
    folders = sorted({p.parent for p in baked.rglob("model.onnx")})
    assert len(folders) == 2 and sorted(g for g in calls.genai if baked.resolve() in g.parents) == \
        [f.resolve() for f in folders]
    assert not [p for p in calls.copied if p.name == "genai_config.json"]
