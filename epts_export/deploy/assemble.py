"""Writing a bundle folder from a validated export: its model (one elastic copy, or one folder per
level), the engines when they can be built here, the device's scripts, and the manifest.

    dist/<target>/                       layout "elastic" (the default)
      manifest.json                      format, layout, target, per level: index, pattern, sparsity,
                                         measured sparsity, parity, perplexity, the engine that serves
                                         it and how its weights get in; sha256 and size of every file;
                                         the bytes of the model's ONNX files
      model/                             the dynamic export's weight builder (weights.onnx), decoder
                                         (decoder.onnx, its prunable weights supplied at run time, or
                                         baked into decoder.weights to build an engine), their tensors
                                         (model.onnx_data), levels.json, config, tokenizer
      engines.json, build_engines.sh, build_engines.py, run.py, _epts/, parity.json
      engines/...                        when built here: the engines, their layer info, report.json

    layout "baked": level-<name>/ (model.onnx, configs, tokenizer) per level in place of model/.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..core.levels import Level
from ..device.files import MANIFEST, write_json
from ..device.interface import GRAPH_FILE
from ..device.trt.spec import TensorRef, WeightSource, bundle_relative, unique_specs
from ..errors import UserError
from ..fsutil import file_hashes
from ..progress import Progress
from ..report.html import REPORT_FILE

MODEL_DIR = "model"
EXIT_PARITY = 3
ONNX_SUFFIXES = (".onnx", ".onnx_data")


def copy_model(exp, report: dict, ppl: dict, levels: list[Level], tmp: Path) -> tuple[list[dict], WeightSource | None, dict]:
    """Copy the export's model into the bundle; (each level's manifest record, the weight source of
    an elastic bundle's engines, the copied files: bundle path -> their export hash and stat). The
    export is dynamic for the elastic layout, baked otherwise."""
    from transformers import AutoConfig

    from ..onnx.genai import GENAI_CONFIG, write_genai_config
    from ..onnx.parity import write_report

    parity_by_level = {e["level"]: e for e in report["levels"]}
    records, source = [], None
    if exp.mode == "dynamic":
        dest = tmp / MODEL_DIR
        # the weight builder and the decoder; not the whole graph model.onnx (the level an input, rebuilt
        # on every call: for GenAI and raw ONNX Runtime users of the export, who ship --layout baked)
        shutil.copytree(exp.path, dest, ignore=shutil.ignore_patterns(MANIFEST, GRAPH_FILE, GENAI_CONFIG, REPORT_FILE))
        folders = {lv: MODEL_DIR for lv in levels}
        graph = exp.manifest["engine_graph"]
        source = WeightSource(graph=dest / graph["graph"], weights_file=dest / graph["weights_file"], model=dest,
                              levels={lv.name: exp.level_index(lv) for lv in levels},
                              tensors={n: TensorRef(t["file"], t["offset"], t["length"], t["dtype"], tuple(t["shape"]))
                                       for n, t in graph["tensors"].items()})
    else:
        folders = {}
        for lv in levels:
            folders[lv] = exp.graph_path(lv).parent.relative_to(exp.path).as_posix()
            shutil.copytree(exp.path / folders[lv], tmp / folders[lv], ignore=shutil.ignore_patterns(GENAI_CONFIG))
    for folder in sorted(set(folders.values())) if exp.mode == "baked" else []:
        # every target is an NVIDIA GPU: GenAI runs the level on CUDA there
        write_genai_config(AutoConfig.from_pretrained(tmp / folder), tmp / folder, "cuda")
    prefix = f"{MODEL_DIR}/" if exp.mode == "dynamic" else ""
    copied = {}
    for rel, sha in exp.manifest["files"].items():
        dest = tmp / (prefix + rel)
        if dest.is_file() and dest.name != GENAI_CONFIG:
            st = dest.stat()
            copied[prefix + rel] = (sha, st.st_size, st.st_mtime_ns)
    for lv in levels:
        entry = parity_by_level[lv.name]
        rec = exp.level_record(lv)
        measured = rec.get("measured_sparsity")
        if measured is None:
            measured = entry["checks"].get("switched/sparsity", {}).get("measured")
        records.append({
            "name": lv.name, "dir": folders[lv], **({"index": exp.level_index(lv)} if exp.mode == "dynamic" else {}),
            "pattern": rec["pattern"], "sparsity": lv.sparsity, "measured_sparsity": measured, "sparse_weights": lv.is_nm,
            "perplexity": ppl.get(lv.name),  # None unless build got --eval-data
            "parity": {"passed": entry["passed"], "checks": {k: bool(v.get("passed")) for k, v in entry["checks"].items()}},
        })
    write_report(report, tmp / "parity.json")
    return records, source, copied


def engine_record(spec, root: Path) -> dict:
    """Which engine serves a level and how its weights get in, paths relative to the bundle ``root``."""
    return {"engine": bundle_relative(spec.engine, root), "layer_info": bundle_relative(spec.layer_info, root),
            "levels": list(spec.levels), "build_level": spec.build_level, "weights": spec.weights,
            "sparse": bool(spec.sparse)}


def engine_stage(specs: dict, art, exp, target, records: list[dict], tmp: Path, progress: Progress) -> dict:
    """Build every engine here (a refit engine once for all its levels), gate on TensorRT parity
    (parity-tensorrt.json), measure what the engines bought (engines/report.json); level name ->
    build record, with paths relative to the bundle."""
    from ..device.trt.builder import build_engine
    from ..device.trt.report import measure_engines, table
    from ..device.trt.runtime import TrtDecoder
    from ..device.trt.weights import default_levels
    from ..onnx.parity import write_report
    from ..progress import console

    built, builds = {}, {}
    unique = unique_specs(specs.values())
    shared = default_levels(unique[0], unique[0].source) if unique and unique[0].source is not None else None
    try:
        with progress.count("building TensorRT engines", len(unique)) as advance:
            for s in unique:
                s.engine.parent.mkdir(parents=True, exist_ok=True)
                result = build_engine(s, levels=shared)
                builds[s.engine.name] = result
                for name in s.levels:
                    built[name] = {**result, **engine_record(s, tmp)}
                advance()
    finally:
        if shared is not None:
            shared.clean()

    def open_engine(spec, level: str):
        return TrtDecoder(spec.engine, level=level, weights=shared if spec.source is not None else default_levels(spec, None))

    trt_report = tensorrt_parity(art, exp, specs, target, open_engine, progress)
    write_report(trt_report, tmp / "parity-tensorrt.json")
    by_level = {e["level"]: e for e in trt_report["levels"]}
    for rec in records:
        e = by_level[rec["name"]]
        rec["parity"]["tensorrt"] = {"passed": e["passed"], "checks": {k: bool(v.get("passed")) for k, v in e["checks"].items()}}
    if not trt_report["passed"]:
        raise UserError("TensorRT parity failed: " + "; ".join(trt_report["failures"][:5]), EXIT_PARITY)
    report = measure_engines(tmp, unique, open_engine, builds, log=lambda s: None)
    if progress.enabled:
        console.print("\n".join(table(report)), highlight=False)
    if report["refused"]:
        raise UserError(f"level(s) {', '.join(report['refused'])} drift from ONNX Runtime on TensorRT", EXIT_PARITY)
    return built


def tensorrt_parity(art, exp, specs: dict, target, open_engine, progress: Progress) -> dict:
    """Each level's engine against the float32 PyTorch reference with the export dtype's tolerances,
    through the same validation loop as `validate` (ORT's CPU provider cannot compute in fp16, so
    TensorRT and ORT are each compared with the same float32 reference). A refit engine is opened
    once and switched to each of its levels in turn (``TrtDecoder.set_level``, which also checks the
    level against ONNX Runtime): the switch is what is checked, and its time is in the report."""
    from ..artifact.materialize import ElasticModel
    from ..onnx.parity import TOLERANCES, check_levels

    opened: dict[Path, object] = {}

    def open_level(lv: Level):
        s = specs[lv]
        if s.engine not in opened:
            opened.clear()  # one engine in memory at a time (Jetson memory is shared with the CPU)
            opened[s.engine] = open_engine(s, lv.name)
        dec, info = opened[s.engine], {"engine": s.engine.name, "weights": s.weights}
        switch = dec.set_level(lv.name)
        info["refit_s"] = switch["refit_s"]
        return dec, info

    entries, failures = check_levels(ElasticModel(art), list(specs), open_level, target.precision,
                                     exp.manifest["io"]["outputs"], label="TensorRT parity", progress=progress,
                                     max_batch=min(3, target.max_batch), prefix="tensorrt ")
    return {"runtime": "tensorrt", "dtype": target.precision, "passed": not failures, "levels": entries,
            "tolerances": {k: v.to_dict() for k, v in TOLERANCES[target.precision].items()}, "failures": failures}


def onnx_bytes(folder: Path, manifest: dict) -> dict:
    """The bytes of the bundle's ONNX files (graphs and their tensor files), in all and per folder."""
    sizes = manifest["file_sizes"]
    per = {}
    for f, n in sizes.items():
        if f.endswith(ONNX_SUFFIXES):
            top = f.split("/", 1)[0] if "/" in f else "."
            per[top] = per.get(top, 0) + n
    return {"total": sum(per.values()), "by_folder": per}


def write_manifest(tmp: Path, manifest: dict, engines: dict, specs: dict, source: WeightSource | None,
                   copied: dict | None = None, report=None) -> None:
    """Engine records, the device's scripts, sha256 and size of every file, the ONNX bytes.
    ``copied``: files copied from the (verified) export, with its hashes; one still the size and
    time it was copied with keeps that hash, any other file is hashed. ``report(manifest)``: the
    text of report.html, made from the finished manifest and then listed in it."""
    from .scripts import write_scripts

    write_scripts(tmp, list(specs.values()), source)
    by_name = {lv.name: s for lv, s in specs.items()}
    for rec in manifest["levels"]:
        if rec["name"] in engines:
            rec["engine"] = engines[rec["name"]]
        if rec["name"] in by_name:  # which engine serves each level and how its weights get in, built here or not
            rec["trt_engine"] = engine_record(by_name[rec["name"]], tmp)
    if specs:
        manifest["engines"]["context"] = next(iter(specs.values())).context
    unchanged = {}
    for rel, (sha, size, mtime) in (copied or {}).items():
        st = (tmp / rel).stat() if (tmp / rel).is_file() else None
        if st is not None and (st.st_size, st.st_mtime_ns) == (size, mtime):
            unchanged[rel] = sha
    manifest["files"] = file_hashes(tmp, known=unchanged)
    manifest["file_sizes"] = {f: (tmp / f).stat().st_size for f in manifest["files"]}  # bounds what a tar may unpack
    manifest["onnx_bytes"] = onnx_bytes(tmp, manifest)
    if report is not None:
        from ..device.files import sha256_file, write_text

        write_text(tmp / REPORT_FILE, report(manifest))
        manifest["files"] = dict(sorted({**manifest["files"], REPORT_FILE: sha256_file(tmp / REPORT_FILE)}.items()))
        manifest["file_sizes"][REPORT_FILE] = (tmp / REPORT_FILE).stat().st_size
    write_json(tmp / MANIFEST, manifest)
