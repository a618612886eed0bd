"""On the device: open a bundle (folder or .tar.gz), check it against its manifest, and find what
serves each level.

Two layouts (``manifest.json`` "layout"):

* ``elastic`` (the default): one copy of the weights for every level, in ``model/``: the weight
  builder ``weights.onnx`` (``sparsity_level`` -> the level's prunable weights), ``decoder.onnx``,
  ``model.onnx`` (the whole graph, the level an input), their tensors in ``model.onnx_data``,
  ``levels.json`` and ``trt.onnx`` (the decoder TensorRT builds from). Each level record gives its
  ``index`` in the level table.
* ``baked``: one folder per level (``level-0.5/model.onnx`` ...), each a plain ONNX folder.

The manifest is the root of trust: every level record is schema-checked when the bundle is opened
(a name, a folder inside the bundle whose files the manifest lists, an index for elastic levels),
and a level's files are hash-checked before it is loaded.

Exit codes: 1 bad input (not a bundle, unsafe tar), 3 a file is missing, altered or not listed,
4 engines built for another GPU or TensorRT version than the one running here.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .archive import safe_extract
from .errors import EXIT_DEVICE, EXIT_INTEGRITY, UserError
from .files import (MANIFEST, HashError, ManifestFormat, check_type, hash_errors, inside, load_json, read_manifest,
                    require_listed, unlisted_under)
from .interface import DECODER_GRAPH, ENGINES_JSON, GRAPH_FILE, WEIGHTS_GRAPH
from .levels import Level, parse_level

BUNDLE = ManifestFormat("epts-bundle", 2, "bundle", "create one with `epts-export build`",
                        upgrade_hint="rebuild it with `epts-export build` (bundles before 2 held one graph per level)",
                        fields=(("layout", str), ("target", dict), ("levels", list)))
LAYOUTS = ("elastic", "baked")


def check_levels(manifest: dict, where: str) -> None:
    """Schema of the level records: each a name that parses, once; a folder inside the bundle whose
    files the manifest lists; elastic levels all in the model folder, with distinct indices."""
    files = manifest["files"]
    layout = manifest["layout"]
    for key, kind in (("name", str), ("compute_capability", str)):
        check_type(manifest["target"], key, kind, f"{where} target", EXIT_INTEGRITY)
    if layout not in LAYOUTS:
        raise UserError(f"{where}: layout {layout!r} is none of {', '.join(LAYOUTS)}", EXIT_INTEGRITY)
    model_dir = None
    if layout == "elastic":
        model = manifest.get("model")
        if not isinstance(model, dict):
            raise UserError(f"{where}: an elastic bundle needs a 'model' record", EXIT_INTEGRITY)
        model_dir = inside(model.get("dir"), f"{where} model")
    if model_dir is not None:
        require_listed(files, model_dir, (WEIGHTS_GRAPH, DECODER_GRAPH, "tokenizer.json", "config.json"), f"{where} model")
    seen, indices, dirs = set(), set(), set()
    for k, r in enumerate(manifest["levels"]):
        at = f"{where} levels[{k}]"
        if not isinstance(r, dict) or not isinstance(r.get("name"), str):
            raise UserError(f"{at}: a level record is an object with a 'name'", EXIT_INTEGRITY)
        level = parse_level(r["name"])
        if level in seen:
            raise UserError(f"{at}: level {level.name} is listed twice", EXIT_INTEGRITY)
        seen.add(level)
        folder = inside(r.get("dir"), at)
        if not any(f.startswith(folder + "/") for f in files):
            raise UserError(f"{at}: manifest.json lists no file in its folder {folder!r}", EXIT_INTEGRITY)
        if layout == "baked":
            if folder in dirs:
                raise UserError(f"{at}: folder {folder!r} is another level's too: each baked level has its own", EXIT_INTEGRITY)
            dirs.add(folder)
            require_listed(files, folder, (GRAPH_FILE, "tokenizer.json", "config.json"), at)
        if layout == "elastic":
            index = r.get("index")
            if folder != model_dir or isinstance(index, bool) or not isinstance(index, int) or index < 0 or index in indices:
                raise UserError(f"{at}: an elastic level lies in {model_dir!r} with an index of its own", EXIT_INTEGRITY)
            indices.add(index)


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
        try:
            if p.is_file():
                tmp = tempfile.TemporaryDirectory(prefix="epts-bundle-")
                p = safe_extract(p, Path(tmp.name))
            manifest = read_manifest(p, BUNDLE, EXIT_INTEGRITY)
            check_levels(manifest, str(p / MANIFEST))
        except BaseException:  # a bad archive, Ctrl-C or SIGTERM mid-extraction: the copy goes now, not at exit
            if tmp is not None:
                tmp.cleanup()
            raise
        return cls(p, manifest, tmp)

    @property
    def elastic(self) -> bool:
        return self.manifest["layout"] == "elastic"

    @property
    def model_dir(self) -> Path | None:
        """The elastic model folder (None in a baked-layout bundle)."""
        return self.path / self.manifest["model"]["dir"] if self.elastic else None

    @property
    def levels(self) -> list[Level]:
        return [parse_level(r["name"]) for r in self.manifest["levels"]]

    def level_record(self, level: Level) -> dict:
        for r in self.manifest["levels"]:
            if parse_level(r["name"]) == level:
                return r
        have = ", ".join(r["name"] for r in self.manifest["levels"])
        raise UserError(f"level {level.name} is not in bundle {self.path} (it has {have})")

    def folder(self, level: Level) -> Path:
        """The folder of the level's graph, config and tokenizer (the shared model folder when elastic)."""
        return self.path / self.level_record(level)["dir"]

    def level_files(self, level: Level) -> dict[str, str]:
        """The manifest's files a level needs: its folder's, and its engine's when built here."""
        rec = self.level_record(level)
        prefix = rec["dir"] + "/"
        engine = rec.get("engine") or {}
        extra = {engine.get("engine"), engine.get("layer_info")} - {None}
        return {f: h for f, h in self.manifest["files"].items() if f.startswith(prefix) or f in extra}

    def level_errors(self, level: Level) -> list[HashError]:
        """Missing, altered or linked files among the level's own files (graphs, configs, tokenizer,
        engine), and files in its folder that the manifest does not list."""
        listed = self.manifest["files"]
        return [*hash_errors(self.path, self.level_files(level)),
                *unlisted_under(self.path, self.level_record(level)["dir"], listed, self._device_outputs())]

    def integrity_errors(self) -> list[HashError]:
        return hash_errors(self.path, self.manifest.get("files", {}))

    # ---- engines

    def engines(self):
        """(specs, weight source) of engines.json; ([], None) when the bundle has none."""
        from .trt.spec import load_engines

        if not (self.path / ENGINES_JSON).is_file():
            return [], None
        return load_engines(self.path)

    def engine_for(self, level: Level) -> tuple[Path | None, dict]:
        """(engine path, its record) for a level; (None, {}) when there is no engine file yet.

        The engine is built by `build` (recorded in the manifest, hashed) or on the device by
        build_engines.py/.sh (the engines.json path; the record from its .build.json when
        build_engines.py wrote one). The record says which levels the engine serves ("levels") and
        how their weights get in ("weights": "baked", or "refit" from the weight builder)."""
        rec = self.level_record(level)
        if rec.get("engine"):
            return self.path / rec["engine"]["engine"], {"weights": "baked", **rec["engine"], "compute_capability":
                                                         self.manifest["target"]["compute_capability"], "origin": "build"}
        from .trt.spec import build_record_path

        specs, _ = self.engines()
        for s in specs:
            if level.name not in s.levels or not Path(s.engine).is_file():
                continue
            record = _read_record(build_record_path(s.engine))
            plan = {"levels": list(s.levels), "weights": s.weights, "sparse": bool(s.sparse), "build_level": s.build_level}
            return Path(s.engine), {**record, **plan, "origin": "device"}
        return None, {}

    def unlisted_files(self) -> list[str]:
        """Files in the bundle that its manifest does not list, other than what building engines on
        the device writes (engines.json's device outputs): a script's folder comes first on
        sys.path, so an added file could be imported."""
        listed = set(self.manifest.get("files", {})) | {MANIFEST}
        allowed = self._device_outputs()
        out = []
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path).as_posix()
            if (p.is_symlink() or not p.is_dir()) and rel not in listed and rel not in allowed:  # FIFOs, devices too
                out.append(rel)
        return out

    def _device_outputs(self) -> set[str]:
        from .trt.spec import REPORT_FILE, device_outputs

        try:
            specs, source = self.engines()
        except (UserError, OSError, ValueError):
            return set()
        out = {REPORT_FILE}
        for p in device_outputs(specs, source):
            try:
                out.add(Path(p).resolve().relative_to(self.path.resolve()).as_posix())
            except ValueError:
                continue
        return out


def _read_record(path: Path) -> dict:
    """An engine's build record (written by build_engines.py); {} when absent or unreadable."""
    try:
        doc = load_json(path.read_bytes(), str(path)) if path.is_file() else {}
    except (OSError, UserError):
        return {}
    return doc if isinstance(doc, dict) else {}


def verify(path: str | Path) -> dict:
    """Check every hash and the engine plan (every level served by exactly one engine spec); when
    the bundle holds engines, check that this machine's TensorRT and GPU are the ones they were
    built for. Returns a report; raises UserError with exit code 3 or 4."""
    from .trt.probe import compute_capability, import_trt, tensorrt_status

    b = Bundle.open(path)
    errors = [*b.integrity_errors(), *(f"file {f} is not listed in manifest.json" for f in b.unlisted_files())]
    if errors:
        raise UserError(f"bundle {b.path} failed verification: " + "; ".join(map(str, errors[:5])) +
                        (f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""), EXIT_INTEGRITY)
    report = {"bundle": str(b.path), "files": len(b.manifest.get("files", {})), "hashes": "ok",
              "target": b.manifest["target"]["name"], "layout": b.manifest["layout"]}
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
        (f"; {', '.join(unknown)} built by trtexec without a record (run build_engines.py report to record them)"
         if unknown else "")
    return report


def _engine_plan(b: Bundle) -> str:
    """One line on which engine serves which levels; UserError (exit 3) when engines.json does not
    give every level exactly one engine, or names a graph the manifest does not hash."""
    from .trt.spec import plan_problems

    if not (b.path / ENGINES_JSON).is_file():
        return f"no {ENGINES_JSON}: engines cannot be built for this bundle"
    specs, source = b.engines()
    problems = plan_problems(specs, [r["name"] for r in b.manifest["levels"]])
    hashed = set(b.manifest.get("files", {}))
    graphs = {Path(s.onnx) for s in specs} | ({source.graph} if source else set())
    for graph in sorted(graphs):
        rel = graph.resolve().relative_to(b.path.resolve()).as_posix() if graph.exists() else str(graph)
        if rel not in hashed:
            problems.append(f"the graph {rel} that engines are built from is not hashed in manifest.json")
    if source is not None:
        want = {r["name"]: r["index"] for r in b.manifest["levels"]}
        if {k: v for k, v in source.levels.items()} != want:
            problems.append(f"{ENGINES_JSON} gives the levels other indices than manifest.json")
    if problems:
        raise UserError(f"bundle {b.path} failed verification: " + "; ".join(problems[:5]), EXIT_INTEGRITY)
    parts = [f"{Path(s.engine).name} ({', '.join(s.levels)}: {'sparse' if s.sparse else 'refit' if s.refit else 'dense'})"
             for s in specs]
    return f"{len(specs)} engine(s) for {sum(len(s.levels) for s in specs)} level(s): " + ", ".join(parts)
