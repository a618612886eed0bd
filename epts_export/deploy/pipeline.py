"""`build`: the whole pipeline for one device target, ending in a bundle to copy to the device.

    model or artifact --optimize--> artifact --export (baked, target precision)--> ONNX
        --validate--> parity report --TensorRT (here, or on the device)--> engines --> bundle

Stages are cached under ``<out>/.stages/`` by a fingerprint of their inputs, so a second build
for another target (or after a failed one) reuses what has not changed. The bundle:

    dist/<target>/
      manifest.json          format, target tuple (device, compute capability, TensorRT, JetPack,
                             CUDA, precision), per level: files + sha256, sparsity, pattern,
                             parity result, engine + sparse-layer report when built; sha256 of
                             every file; how and where engines get built
      level-<name>/          model.onnx (+ model.onnx_data), config.json, generation_config.json,
                             tokenizer (each level loads on its own, in ORT or optimum)
      engines/level-<name>.engine, engines/level-<name>.layers.json     (when built here)
      build_engines.sh       trtexec commands, one per level (always written: the way to
      build_engines.py       rebuild on the device); engines.json lists their specs
      parity.json            the validate report

Exit codes: 1 bad input, 2 engines required (--require-engines) but not buildable here,
3 parity failure.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..fsutil import file_hashes, sha256_bytes, sha256_file, staged_dir, write_json
from ..core.levels import Level, parse_level
from ..artifact.folder import ARTIFACT
from ..progress import Progress
from .bundle import BUNDLE

STAGES = ".stages"
EXIT_NO_ENGINES = 2
EXIT_PARITY = 3


@dataclass
class BuildSpec:
    source: str  # artifact folder, or a model (built-in name, HF folder, .gguf, hub id) to optimize first
    target: str  # profile name, alias or .toml path
    out: Path  # dist/: the bundle goes to <out>/<target name>
    levels: list[Level] | None = None  # default: the target's default levels
    preset: str = "default"  # optimize preset when starting from a model
    require_engines: bool = False
    overwrite: bool = False
    eval_data: str | None = None  # text for a perplexity per level in the manifest (eval's sources)
    eval_seqlen: int = 512
    eval_windows: int | None = 32


def _fingerprint(obj) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True).encode())[:16]


def _is_artifact(path: Path) -> bool:
    mf = path / "manifest.json"
    if not mf.is_file():
        return False
    try:
        return json.loads(mf.read_text()).get("format") == ARTIFACT.format
    except json.JSONDecodeError:
        return False


def memory_preflight(model_config, params: int, target, levels: list[Level]) -> dict:
    """Weights + KV cache at the target's max batch and context + workspace, against its budget.
    Returns the estimate; UserError saying what to change when it does not fit."""
    from ..onnx.export import kv_geometry

    geo = kv_geometry(model_config)
    elem = 4 if target.precision == "fp32" else 2
    weights = params * elem
    kv = 2 * geo.layers * geo.kv_heads * geo.head_dim * target.max_context * target.max_batch * elem
    workspace = target.workspace_mb * 1024**2
    total = weights + kv + workspace
    budget = int(target.memory_budget_gb * 1024**3)
    est = {"weights_bytes": weights, "kv_cache_bytes": kv, "workspace_bytes": workspace, "total_bytes": total,
           "budget_bytes": budget, "fits": total <= budget}
    if total > budget:
        gib = 1024**3
        per_token = 2 * geo.layers * geo.kv_heads * geo.head_dim * target.max_batch * elem
        room = budget - weights - workspace
        hint = (f"lower max_context to {max(room // per_token, 0)} or max_batch in a copy of {target.path.name} "
                f"(pass it with --target path.toml), or pick a target with more memory") if room > 0 else \
            "the weights alone do not fit: pick a target with more memory or a smaller model"
        raise UserError(f"{target.name}: the model needs {total / gib:.2f} GiB (weights {weights / gib:.2f} + KV cache "
                        f"{kv / gib:.2f} at batch {target.max_batch} x {target.max_context} tokens + workspace "
                        f"{workspace / gib:.2f}) but the budget is {target.memory_budget_gb:g} GiB: {hint}")
    return est


def _check_levels(target, levels: list[Level]) -> None:
    sparse_ok = {parse_level(s) for s in target.sparse_levels}
    for lv in levels:
        if lv.is_nm and lv not in sparse_ok:
            can = ", ".join(target.sparse_levels) or "none"
            raise UserError(f"target {target.name} cannot accelerate {lv.name} as sparse (its sparse tensor cores take: {can}); "
                            f"ship an unstructured level instead, or export {lv.name} for ONNX Runtime with `epts-export export`")


def build(spec: BuildSpec, progress: Progress | None = None) -> Path:
    """Run the pipeline for ``spec.target``; returns the bundle folder."""
    from ..artifact.folder import Artifact
    from ..onnx.export import ExportSpec, OnnxExport, export
    from ..onnx.parity import validate, write_report
    from .targets import resolve_target
    from ..trt.builder import tensorrt_status

    progress = progress or Progress(enabled=False)
    t0 = time.time()
    target = resolve_target(spec.target)
    out = Path(spec.out)
    bundle = out / target.name
    if bundle.exists() and not spec.overwrite:
        raise UserError(f"bundle {bundle} already exists: choose another --out or pass --overwrite")
    stages = out / STAGES
    stages.mkdir(parents=True, exist_ok=True)
    levels = spec.levels or [parse_level(s) for s in target.default_levels]
    _check_levels(target, levels)

    # 1. memory pre-flight before any heavy work (from the model's config and weight headers)
    from transformers import AutoConfig

    src = Path(spec.source)
    if _is_artifact(src):
        art = Artifact.open(src)
        model_dir = art.model_dir
    elif src.exists() and (src / "manifest.json").is_file():
        raise UserError(f"{src} has a manifest but is not an elastic artifact; pass an artifact folder or a model")
    else:
        from ..models.resolve import resolve_model

        art, model_dir = None, resolve_model(spec.source, progress=progress.enabled).path
    config = AutoConfig.from_pretrained(model_dir)
    estimate = memory_preflight(config, _param_count(model_dir), target, levels)

    # 2. artifact: given, or optimized once per (model, preset) and reused
    if art is None:
        art = _optimize_stage(spec, levels, stages, progress)
    for lv in levels:
        art.check_level(lv)

    # 3. ONNX, baked per level, in the target's precision (reused when unchanged)
    export_key = _fingerprint({"artifact": sha256_file(art.path / "manifest.json"), "levels": [lv.name for lv in levels],
                               "dtype": target.precision, "opset": 17, "version": _version()})
    onnx_dir = stages / f"onnx-{export_key}"
    if onnx_dir.exists():
        try:
            OnnxExport.open(onnx_dir)
            progress_note(progress, f"reusing ONNX export {onnx_dir}")
        except UserError:
            shutil.rmtree(onnx_dir)
    if not onnx_dir.exists():
        export(ExportSpec(artifact=art.path, out=onnx_dir, mode="baked", levels=levels, dtype=target.precision), progress)
    exp = OnnxExport.open(onnx_dir)

    # 4. parity (reused when the export already passed)
    report_path = onnx_dir.parent / f"parity-{export_key}.json"
    if exp.manifest.get("parity", {}) and exp.manifest["parity"].get("passed") and report_path.is_file():
        report = json.loads(report_path.read_text())
        progress_note(progress, "reusing the parity result of that export")
    else:
        report = validate(onnx_dir, artifact=art.path, progress=progress)
        write_report(report, report_path)
    if not report["passed"]:
        raise UserError("parity failed: " + "; ".join(report["failures"][:5]) + f" (report: {report_path})", EXIT_PARITY)

    # 4b. perplexity per level, when the user gives text (cached with the export)
    ppl = {}
    if spec.eval_data:
        from ..artifact.evaluate import evaluate

        ppl_path = stages / f"ppl-{_fingerprint({'export': export_key, 'data': spec.eval_data, 'seqlen': spec.eval_seqlen, 'windows': spec.eval_windows})}.json"
        if ppl_path.is_file():
            ev = json.loads(ppl_path.read_text())
            progress_note(progress, "reusing the perplexity of those levels")
        else:
            ev = evaluate(art.path, spec.eval_data, spec.eval_seqlen, levels, progress, spec.eval_windows)
            write_json(ppl_path, ev)
        ppl = {r["level"]: {"value": round(r["ppl"], 4), "data": ev["data"]["source"], "data_sha256": ev["data"]["sha256"],
                            "seqlen": ev["seqlen"], "windows": ev["data"]["windows"], "dense": ev["results"][0]["ppl"]}
               for r in ev["results"][1:]}

    # 5. engines: here when TensorRT and a matching GPU are present and the target allows it
    if target.build_on_device:
        ok, why = False, f"{target.name} engines are built on the device itself (there is no cross-building for Jetson)"
    else:
        ok, why = tensorrt_status()
    if not ok and spec.require_engines:
        raise UserError(f"engines were not built: {why} (--require-engines)", EXIT_NO_ENGINES)

    with staged_dir(bundle, overwrite=spec.overwrite) as tmp:
        level_records = []
        parity_by_level = {e["level"]: e for e in report["levels"]}
        for lv in levels:
            rel = exp.graph_path(lv).parent.relative_to(exp.path).as_posix()
            shutil.copytree(exp.path / rel, tmp / rel)
            entry = parity_by_level[lv.name]
            rec = next(r for r in exp.manifest["levels"] if r["name"] == lv.name)
            level_records.append({
                "name": lv.name, "dir": rel, "pattern": rec["pattern"], "sparsity": lv.sparsity,
                "measured_sparsity": rec.get("measured_sparsity"), "sparse_weights": lv.is_nm,
                "perplexity": ppl.get(lv.name),  # None unless build got --eval-data
                "parity": {"passed": entry["passed"], "checks": {k: bool(v.get("passed")) for k, v in entry["checks"].items()}},
            })
        write_report(report, tmp / "parity.json")
        engine_specs = _engine_specs(tmp, target, levels, config)
        from ..trt.scripts import write_build_script

        write_build_script(engine_specs, tmp)
        engines = {}
        if ok:
            engines = _build_engines_here(engine_specs, progress)
            trt_report = _trt_parity(art, exp, engine_specs, target, progress)
            write_report(trt_report, tmp / "parity-tensorrt.json")
            for rec in level_records:
                e = next(x for x in trt_report["levels"] if x["level"] == rec["name"])
                rec["parity"]["tensorrt"] = {"passed": e["passed"], "checks": {k: bool(v.get("passed")) for k, v in e["checks"].items()}}
            if not trt_report["passed"]:
                raise UserError("TensorRT parity failed: " + "; ".join(trt_report["failures"][:5]), EXIT_PARITY)
        by_level = {es.level: es for es in engine_specs}
        for rec in level_records:
            if rec["name"] in engines:  # paths relative to the bundle (tmp is renamed when complete)
                es = by_level[rec["name"]]
                rec["engine"] = {**engines[rec["name"]], "engine": es.engine.relative_to(tmp).as_posix(),
                                 "layer_info": es.layer_info.relative_to(tmp).as_posix()}
        manifest = {
            **BUNDLE.header(),
            "target": target.to_dict(),
            "levels": level_records,
            "engines": {"built": bool(engines), "reason": None if engines else why,
                        "how": "bash build_engines.sh (trtexec) or python build_engines.py, on the device"},
            "memory_estimate": estimate,
            "source": {"artifact": str(art.path.resolve()), "artifact_manifest_sha256": sha256_file(art.path / "manifest.json"),
                       "onnx_export": str(onnx_dir.resolve())},
            "elapsed_s": round(time.time() - t0, 2),
            "files": file_hashes(tmp),
        }
        for rec in level_records:  # each level's own files (graph, configs, tokenizer, engine), from the global list
            mine = [rec["dir"] + "/"] + ([rec["engine"]["engine"], rec["engine"]["layer_info"]] if rec.get("engine") else [])
            rec["files"] = {f: h for f, h in manifest["files"].items() if any(f == m or (m.endswith("/") and f.startswith(m)) for m in mine)}
        write_json(tmp / "manifest.json", manifest)
    return bundle


def progress_note(progress: Progress, message: str) -> None:
    if progress.enabled:
        from ..progress import console

        console.print(f"[green]✓[/] {message}")


def _version() -> str:
    from .. import __version__

    return __version__


def _param_count(model_dir: Path) -> int:
    """Parameters of a Hugging Face folder's model, read from its safetensors headers (no weights loaded)."""
    import struct

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                count = 1
                for d in meta["shape"]:
                    count *= d
                total += count
    return total


def _optimize_stage(spec: BuildSpec, levels: list[Level], stages: Path, progress: Progress):
    from ..artifact.folder import Artifact
    from ..pruning.calibration import CalibSpec
    from ..pruning.epts import TrainConfig
    from ..pruning.optimize import OptimizeSpec, optimize
    from ..pruning.presets import load_preset

    from ..core.levels import DEFAULT_LEVELS, parse_levels

    p = load_preset(spec.preset)
    # train optimize's default range plus whatever this build ships, so that one artifact serves
    # every target whose levels fall in it (optimize once, ship to many devices)
    levels = sorted(set(parse_levels(DEFAULT_LEVELS)) | set(levels), key=lambda lv: (lv.is_nm, lv.sparsity, lv.m))
    key = _fingerprint({"model": spec.source, "levels": [lv.name for lv in levels], "preset": p, "version": _version()})
    out = stages / f"artifact-{key}"
    if out.exists():
        try:
            art = Artifact.open(out)
            progress_note(progress, f"reusing artifact {out}")
            return art
        except UserError:
            shutil.rmtree(out)
    opt = OptimizeSpec(model=spec.source, out=out, levels=levels,
                       calib=CalibSpec(source=p["calib"], nsamples=p["nsamples"], seqlen=p["seqlen"]),
                       train=TrainConfig(rank=p["rank"], epochs=p["epochs"], lr=p["lr"]),
                       resume=(out.parent / (out.name + ".partial")).exists())
    return Artifact.open(optimize(opt, progress))


def _engine_specs(bundle: Path, target, levels: list[Level], config) -> list:
    from ..onnx.export import kv_geometry, level_dirname
    from ..trt.builder import EngineSpec, KVLayout, ShapeRange

    geo = kv_geometry(config)
    sparse = {parse_level(s) for s in target.sparse_levels}
    specs = []
    for lv in levels:
        d = level_dirname(lv)
        specs.append(EngineSpec(
            onnx=bundle / d / "model.onnx", engine=bundle / "engines" / f"{d}.engine", level=lv.name,
            sparse=lv in sparse, precision=target.precision,
            profiles=[ShapeRange(name, p.batch, p.seq, p.past) for name, p in target.profiles.items()],
            kv=KVLayout(geo.layers, geo.kv_heads, geo.head_dim), workspace_mb=target.workspace_mb,
            tactic_dram_mb=target.tactic_dram_mb, timing_cache=bundle / "engines" / f"{target.name}.timing.cache",
            layer_info=bundle / "engines" / f"{d}.layers.json"))
    return specs


def _trt_parity(art, exp, specs, target, progress: Progress) -> dict:
    """Each engine against the float32 PyTorch reference with the export dtype's tolerances:
    the same checks and report as `validate` (ORT's CPU provider cannot compute in fp16, so
    TensorRT and ORT are each compared with the same float32 reference)."""
    from ..artifact.materialize import ElasticModel
    from ..onnx.runtime import TorchDecoder
    from ..onnx.parity import PROMPT, TOLERANCES, _why, compare
    from ..trt.runtime import TrtDecoder

    em = ElasticModel(art)
    prompt = em.tokenizer(PROMPT)["input_ids"]
    names = exp.manifest["io"]["outputs"]
    levels, failures = [], []
    with progress.count("TensorRT parity", len(specs)) as advance:
        for s in specs:
            lv = parse_level(s.level)
            model = em.at(lv)
            checks = compare(TorchDecoder(model), TrtDecoder(s.engine), target.precision, model.config.vocab_size, prompt,
                             names, max_batch=min(3, target.max_batch))
            ok = all(c.get("passed") for c in checks.values())
            failures += [f"level {lv.name} / tensorrt {n}: {_why(c)}" for n, c in checks.items() if not c.get("passed")]
            levels.append({"level": lv.name, "engine": s.engine.name, "passed": ok, "checks": checks})
            advance()
    return {"runtime": "tensorrt", "dtype": target.precision, "passed": not failures, "levels": levels,
            "tolerances": {k: v.to_dict() for k, v in TOLERANCES[target.precision].items()}, "failures": failures}


def _build_engines_here(specs, progress: Progress) -> dict:
    from ..trt.builder import build_engine

    out = {}
    with progress.count("building TensorRT engines", len(specs)) as advance:
        for s in specs:
            s.engine.parent.mkdir(parents=True, exist_ok=True)
            out[s.level] = build_engine(s)
            advance()
    return out
