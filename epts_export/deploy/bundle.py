"""On the device: open a bundle (folder or .tar.gz), verify it, and generate text from it.

Exit codes: 1 bad input (not a bundle, unsafe tar), 3 a file is missing or altered,
4 engines built for another GPU or TensorRT version than the one running here.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..fsutil import MANIFEST, HashError, ManifestFormat, hash_errors, read_manifest
from ..core.levels import Level, parse_level
from .archive import EXIT_INTEGRITY, safe_extract

BUNDLE = ManifestFormat("epts-bundle", 1, "bundle", "create one with `epts-export build`",
                        fields=(("target", dict), ("levels", list)))
EXIT_DEVICE = 4


@dataclass
class Bundle:
    path: Path
    manifest: dict
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> "Bundle":
        p = Path(path)
        if not p.exists():
            raise UserError(f"bundle not found: {p}")
        tmp = None
        if p.is_file():
            tmp = tempfile.TemporaryDirectory(prefix="epts-bundle-")
            p = safe_extract(p, Path(tmp.name))
        manifest = read_manifest(p, BUNDLE, EXIT_INTEGRITY)
        return cls(p, manifest, tmp)

    @property
    def levels(self) -> list[Level]:
        return [parse_level(r["name"]) for r in self.manifest["levels"]]

    def level_record(self, level: Level) -> dict:
        for r in self.manifest["levels"]:
            if parse_level(r["name"]) == level:
                return r
        have = ", ".join(r["name"] for r in self.manifest["levels"])
        raise UserError(f"level {level.name} is not in bundle {self.path} (it has {have})")

    def engine_for(self, level: Level) -> tuple[Path | None, dict]:
        """(engine path, its record) for a level; (None, {}) when there is no engine file yet.

        The engine is built by `build` (recorded in the manifest, hashed) or on the device by
        build_engines.py/.sh (the engines.json path; the record from its .build.json when
        build_engines.py wrote one). The record says which levels the engine serves ("levels") and
        how this level's weights get in: "weights" "baked", or "refit" from "refit_onnx" (the level's
        graph, relative to the bundle): open the engine with TrtDecoder, then
        ``set_level(level.name)``; several levels then share one engine and one decoder."""
        rec = self.level_record(level)
        if rec.get("engine"):
            return self.path / rec["engine"]["engine"], {"weights": "baked", **rec["engine"], "compute_capability":
                                                         self.manifest["target"]["compute_capability"], "origin": "build"}
        if not (self.path / "engines.json").is_file():
            return None, {}
        from ..trt.builder import build_record_path, load_specs

        for s in load_specs(self.path):
            name = next((n for n in s.levels if parse_level(n) == level), None)
            if name is None or not Path(s.engine).is_file():
                continue
            rp = build_record_path(s.engine)
            record = json.loads(rp.read_text()) if rp.is_file() else {}
            plan = {"levels": list(s.levels), "weights": s.weights, "sparse": bool(s.sparse)}
            if s.refit:
                plan["refit_onnx"] = Path(s.refit_from[name]).relative_to(self.path).as_posix()
            return Path(s.engine), {**record, **plan, "origin": "device"}
        return None, {}

    def level_errors(self, level: Level) -> list[HashError]:
        """Missing or altered files among the level's own files (graph, configs, tokenizer, engine)."""
        return hash_errors(self.path, self.level_record(level).get("files", {}))

    def integrity_errors(self) -> list[HashError]:
        return hash_errors(self.path, self.manifest.get("files", {}))

    def unlisted_files(self) -> list[str]:
        """Files in the bundle that its manifest does not list, other than what building engines on
        the device writes (the engines.json specs' engine, layer info, timing cache, build record,
        log): a script's folder comes first on sys.path, so an added file could be imported."""
        listed = set(self.manifest.get("files", {})) | {MANIFEST}
        allowed = self._device_outputs()
        out = []
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path).as_posix()
            if (p.is_file() or p.is_symlink()) and rel not in listed and rel not in allowed:
                out.append(rel)
        return out

    def _device_outputs(self) -> set[str]:
        try:
            from ..trt.builder import build_record_path, load_specs

            specs = load_specs(self.path)
        except (UserError, ImportError, OSError, ValueError):
            return set()
        out = set()
        for s in specs:
            for p in (s.engine, s.layer_info, s.timing_cache, build_record_path(s.engine), Path(str(s.engine) + ".log")):
                try:
                    out.add(Path(p).resolve().relative_to(self.path.resolve()).as_posix())
                except ValueError:
                    continue
        return out


def verify(path: str | Path) -> dict:
    """Check every hash and the engine plan (every level served by exactly one engine spec, each
    graph a refit engine switches to present and hashed: ``report["plan"]``); when the bundle holds
    engines, check that this machine's TensorRT and GPU are the ones they were built for. Returns a
    report; raises UserError with exit code 3 or 4."""
    from ..trt.builder import tensorrt_status

    b = Bundle.open(path)
    errors = [*b.integrity_errors(), *(f"file {f} is not listed in manifest.json" for f in b.unlisted_files())]
    if errors:
        raise UserError(f"bundle {b.path} failed verification: " + "; ".join(map(str, errors[:5])) +
                        (f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""), EXIT_INTEGRITY)
    report = {"bundle": str(b.path), "files": len(b.manifest.get("files", {})), "hashes": "ok",
              "target": b.manifest["target"]["name"]}
    report["plan"] = _engine_plan(b)
    engines = {lv.name: b.engine_for(lv) for lv in b.levels}
    engines = {k: v for k, v in engines.items() if v[0] is not None}
    if not engines:
        report["engines"] = "none in the bundle: build them on the device with build_engines.sh or build_engines.py"
        return report
    distinct = {path for path, _ in engines.values()}
    ok, why = tensorrt_status()
    if not ok:
        report["engines"] = f"{len(distinct)} present, not checked here: {why}"
        return report
    from ..trt.builder import compute_capability, import_trt

    trt = import_trt()
    cc = compute_capability() or "unknown"
    unknown, seen = [], set()
    for name, (path, record) in engines.items():
        if path in seen:
            continue  # a refit engine serves several levels: checked once
        seen.add(path)
        what = f"the engine for level(s) {', '.join(record.get('levels') or [name])}"
        if not record.get("tensorrt"):
            unknown.append(name)  # built by trtexec: no record of its TensorRT
            continue
        if record["tensorrt"] != trt.__version__:
            raise UserError(f"{what} in {b.path} was built with TensorRT {record['tensorrt']}, this machine "
                            f"runs {trt.__version__}: rebuild it here with build_engines.sh", EXIT_DEVICE)
        want_cc = record.get("compute_capability")
        if want_cc and want_cc != cc:
            raise UserError(f"{what} in {b.path} is for compute capability {want_cc}, this GPU is {cc}: "
                            "rebuild it here with build_engines.sh", EXIT_DEVICE)
    report["engines"] = f"{len(seen) - len(unknown)} engine(s) match TensorRT {trt.__version__} on sm_{cc.replace('.', '')}" + \
        (f"; {', '.join(unknown)} built by trtexec without a record (run build_engines.py to record them)" if unknown else "")
    return report


def _engine_plan(b: Bundle) -> str:
    """One line on which engine serves which levels; UserError (exit 3) when engines.json does not
    give every level exactly one engine, or a level's refit graph is missing or not hashed."""
    from ..interface import ENGINES_JSON
    from ..trt.builder import load_specs, plan_problems

    if not (b.path / ENGINES_JSON).is_file():
        return f"no {ENGINES_JSON}: engines cannot be built for this bundle"
    specs = load_specs(b.path)
    problems = plan_problems(specs, [r["name"] for r in b.manifest["levels"]])
    hashed = set(b.manifest.get("files", {}))
    for s in specs:
        for lv, graph in s.refit_from.items():
            rel = Path(graph).relative_to(b.path).as_posix()
            if rel not in hashed:
                problems.append(f"the graph level {lv} is refit from, {rel}, is not hashed in manifest.json")
    if problems:
        raise UserError(f"bundle {b.path} failed verification: " + "; ".join(problems[:5]), EXIT_INTEGRITY)
    parts = [f"{Path(s.engine).name} ({', '.join(s.levels)}: {'sparse' if s.sparse else 'refit' if s.refit else 'dense'})"
             for s in specs]
    return f"{len(specs)} engine(s) for {sum(len(s.levels) for s in specs)} level(s): " + ", ".join(parts)
