"""`build`: the whole pipeline for one device target, ending in a bundle to copy to the device.

    model or artifact --optimize--> artifact --export (baked, target precision)--> ONNX
        --validate--> parity report --TensorRT (here, or on the device)--> engines --> bundle

Stages are cached under ``<out>/.stages/`` by a fingerprint of their inputs, so a second build
for another target (or after a failed one) reuses what has not changed. The bundle:

    dist/<target>/
      manifest.json          format, target tuple (device, compute capability, TensorRT, JetPack,
                             CUDA, precision), per level: files + sha256, sparsity, pattern,
                             parity result, the engine that serves it and how its weights get
                             in (trt_engine), engine + sparse-layer report when built; sha256
                             of every file; how and where engines get built, their context
      level-<name>/          model.onnx (+ model.onnx_data), config.json, generation_config.json,
                             tokenizer (each level loads on its own, in ORT or optimum)
      engines/level-<name>.engine, engines/level-<name>.layers.json     (when built here; one
                             engines/unstructured.engine serves every unstructured level, refit
                             from each level's graph, N:M levels keep their own)
      build_engines.sh       trtexec commands, one per engine (always written: the way to
      build_engines.py       rebuild on the device); engines.json lists their specs: which engine
                             serves which levels and how their weights get in
      parity.json            the validate report

Exit codes: 1 bad input, 2 engines required (--require-engines) but not buildable here,
3 parity failure.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..artifact.folder import ARTIFACT, Artifact
from ..core.levels import DEFAULT_LEVELS, Level, parse_levels, sort_levels
from ..errors import UserError
from ..fsutil import MANIFEST, check_destination, file_hashes, sha256_bytes, sha256_file, staged_dir, write_json
from ..interface import GRAPH_FILE, KVLayout, level_dirname
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


@dataclass
class _Source:
    """Where the build starts: an artifact, or a resolved model to optimize first."""

    artifact: Artifact | None
    model_dir: Path  # the Hugging Face folder (the artifact's model/ when starting from one)
    model_sha256: str | None  # the resolved model's weights, for the artifact stage's cache key


def _fingerprint(obj) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True).encode())[:16]


def _is_artifact(path: Path) -> bool:
    mf = path / MANIFEST
    if not mf.is_file():
        return False
    try:
        return json.loads(mf.read_text()).get("format") == ARTIFACT.format
    except json.JSONDecodeError:
        return False


def memory_preflight(model_config, params: int, target) -> dict:
    """Weights + KV cache at the target's max batch and context + workspace, against its budget.
    Returns the estimate; UserError saying what to change when it does not fit."""
    elem = 4 if target.precision == "fp32" else 2
    per_token = KVLayout.from_config(model_config).bytes_per_token(elem) * target.max_batch
    weights = params * elem
    kv = per_token * target.max_context
    workspace = target.workspace_mb * 1024**2
    total = weights + kv + workspace
    budget = int(target.memory_budget_gb * 1024**3)
    est = {"weights_bytes": weights, "kv_cache_bytes": kv, "workspace_bytes": workspace, "total_bytes": total,
           "budget_bytes": budget, "fits": total <= budget}
    if total > budget:
        gib = 1024**3
        room = budget - weights - workspace
        hint = (f"lower max_context to {max(room // per_token, 0)} or max_batch in a copy of {target.path.name} "
                f"(pass it with --target path.toml), or pick a target with more memory") if room > 0 else \
            "the weights alone do not fit: pick a target with more memory or a smaller model"
        raise UserError(f"{target.name}: the model needs {total / gib:.2f} GiB (weights {weights / gib:.2f} + KV cache "
                        f"{kv / gib:.2f} at batch {target.max_batch} x {target.max_context} tokens + workspace "
                        f"{workspace / gib:.2f}) but the budget is {target.memory_budget_gb:g} GiB: {hint}")
    return est


def _check_levels(target, levels: list[Level]) -> None:
    for lv in levels:
        if lv.is_nm and lv not in target.sparse:
            can = ", ".join(target.sparse_levels) or "none"
            raise UserError(f"target {target.name} cannot accelerate {lv.name} as sparse (its sparse tensor cores take: {can}); "
                            f"ship an unstructured level instead, or export {lv.name} for ONNX Runtime with `epts-export export`")


def build(spec: BuildSpec, progress: Progress | None = None) -> Path:
    """Run the pipeline for ``spec.target``; returns the bundle folder."""
    from .targets import resolve_target

    progress = progress or Progress(enabled=False)
    t0 = time.time()
    target = resolve_target(spec.target)
    out = Path(spec.out)
    bundle = out / target.name
    local = [spec.source] if Path(spec.source).expanduser().exists() else []
    check_destination(bundle, overwrite=spec.overwrite, inputs=local)
    if spec.levels is not None and not spec.levels:
        raise UserError("--levels is empty: pass levels like 0.5,2:4, or leave it out for the target's defaults")
    levels = spec.levels or target.levels
    _check_levels(target, levels)
    if spec.eval_data:
        _check_eval_data(spec.eval_data)
    stages = out / STAGES
    try:
        stages.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {stages}: {e.strerror or e}") from None
    with _stage_lock(stages, progress):
        return _build(spec, target, levels, bundle, stages, progress, t0)


@contextlib.contextmanager
def _stage_lock(stages: Path, progress: Progress):
    """One build at a time per --out: a second one waits here, then reuses the stages the first wrote."""
    import fcntl

    with open(stages / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress_note(progress, f"waiting for another build that uses {stages.parent}")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_eval_data(source: str) -> None:
    if source.startswith("hf:"):
        return
    if not Path(source).expanduser().exists():
        raise UserError(f"evaluation text not found: {source} (--eval-data takes a text file, a folder or hf:NAME)")


def _build(spec: BuildSpec, target, levels: list[Level], bundle: Path, stages: Path, progress: Progress, t0: float) -> Path:
    from transformers import AutoConfig

    # 1. memory pre-flight before any heavy work (from the model's config and weight headers)
    src = _source(spec, progress)
    config = AutoConfig.from_pretrained(src.model_dir)
    estimate = memory_preflight(config, _param_count(src.model_dir), target)
    # 2. artifact: given, or optimized once per (model, preset) and reused
    art = src.artifact or optimize_stage(spec, src, levels, stages, progress)
    for lv in levels:
        art.check_level(lv)
    # 3-4b. ONNX baked in the target's precision, parity, perplexity: each reused when unchanged
    exp, export_key = export_stage(art, levels, target.precision, stages, progress)
    report, report_path = parity_stage(exp, art, export_key, stages, progress)
    if not report["passed"]:
        raise UserError("parity failed: " + "; ".join(report["failures"][:5]) + f" (report: {report_path})", EXIT_PARITY)
    ppl = perplexity_stage(spec, art, levels, export_key, stages, progress) if spec.eval_data else {}
    # 5. engines here when TensorRT and a matching GPU are present and the target allows it; bundle
    can_build, why = _engines_here(target)
    if not can_build and spec.require_engines:
        raise UserError(f"engines were not built: {why} (--require-engines)", EXIT_NO_ENGINES)
    with staged_dir(bundle, overwrite=spec.overwrite) as tmp:
        records = _copy_levels(exp, report, ppl, levels, tmp)
        specs = engine_specs(tmp, target, levels, config)
        engines = engine_stage(specs, art, exp, target, records, tmp, progress) if can_build else {}
        manifest = {
            **BUNDLE.header(),
            "target": target.to_dict(),
            "levels": records,
            "engines": {"built": bool(engines), "reason": None if engines else why,
                        "how": "bash build_engines.sh (trtexec) or python build_engines.py, on the device"},
            "memory_estimate": estimate,
            "source": {"artifact": str(art.path.resolve()), "artifact_manifest_sha256": sha256_file(art.path / MANIFEST),
                       "onnx_export": str(exp.path.resolve())},
            "elapsed_s": round(time.time() - t0, 2),
        }
        _write_bundle_manifest(tmp, manifest, engines, specs)
    return bundle


def _source(spec: BuildSpec, progress: Progress) -> _Source:
    src = Path(spec.source)
    if _is_artifact(src):
        art = Artifact.open(src)
        return _Source(art, art.model_dir, art.manifest["model"].get("sha256"))
    if src.exists() and (src / MANIFEST).is_file():
        raise UserError(f"{src} has a manifest but is not an elastic artifact; pass an artifact folder or a model")
    from ..models.resolve import resolve_model

    resolved = resolve_model(spec.source, progress=progress.enabled)
    return _Source(None, resolved.path, resolved.source.get("sha256"))


def _engines_here(target) -> tuple[bool, str]:
    if target.build_on_device:
        return False, f"{target.name} engines are built on the device itself (there is no cross-building for Jetson)"
    from ..trt.builder import tensorrt_status

    return tensorrt_status()


def progress_note(progress: Progress, message: str) -> None:
    if progress.enabled:
        from ..progress import console

        console.print(f"[green]✓[/] {message}")


def _version() -> str:
    from .. import __version__

    return __version__


def _param_count(model_dir: Path) -> int:
    """Parameters of a Hugging Face folder's model, read from its safetensors headers (no weights loaded)."""
    from ..models.resolve import weight_params

    return weight_params(model_dir) or 0


# --------------------------------------------------------------------------------------------
# stages: each a function from artifacts and a spec to a (cached) artifact


def optimize_stage(spec: BuildSpec, src: _Source, levels: list[Level], stages: Path, progress: Progress) -> Artifact:
    """The artifact of (model weights, preset): trains optimize's default range plus whatever this
    build ships, so that one artifact serves every target whose levels fall in it (optimize once,
    ship to many devices). Keyed by the resolved model's sha256, so a model edited in place is
    optimized again."""
    from ..pruning.optimize import OptimizeSpec, optimize
    from ..pruning.presets import load_preset

    levels = sort_levels(set(parse_levels(DEFAULT_LEVELS)) | set(levels))
    key = _fingerprint({"model": src.model_sha256, "levels": [lv.name for lv in levels], "preset": load_preset(spec.preset),
                        "version": _version()})
    out = stages / f"artifact-{key}"
    if out.exists():
        try:
            art = Artifact.open(out)
            progress_note(progress, f"reusing artifact {out}")
            return art
        except UserError:
            shutil.rmtree(out)
    opt = OptimizeSpec.from_preset(spec.source, out, levels, spec.preset,
                                   resume=(out.parent / (out.name + ".partial")).exists())
    return Artifact.open(optimize(opt, progress))


def export_stage(art: Artifact, levels: list[Level], precision: str, stages: Path, progress: Progress):
    """(the baked ONNX export of ``levels`` in ``precision``, its cache key)."""
    from ..onnx.export import DEFAULT_OPSET, ExportSpec, export
    from ..onnx.reader import OnnxExport

    key = _fingerprint({"artifact": sha256_file(art.path / MANIFEST), "levels": [lv.name for lv in levels],
                        "dtype": precision, "opset": DEFAULT_OPSET, "version": _version()})
    onnx_dir = stages / f"onnx-{key}"
    if onnx_dir.exists():
        try:
            OnnxExport.open(onnx_dir)
            progress_note(progress, f"reusing ONNX export {onnx_dir}")
        except UserError:
            shutil.rmtree(onnx_dir)
    if not onnx_dir.exists():
        export(ExportSpec(artifact=art.path, out=onnx_dir, mode="baked", levels=levels, dtype=precision), progress)
    return OnnxExport.open(onnx_dir), key


def parity_stage(exp, art: Artifact, export_key: str, stages: Path, progress: Progress) -> tuple[dict, Path]:
    """(the validate report of the export, its path); reused when the export already passed."""
    from ..onnx.parity import validate, write_report

    report_path = stages / f"parity-{export_key}.json"
    if (exp.manifest.get("parity") or {}).get("passed") and report_path.is_file():
        progress_note(progress, "reusing the parity result of that export")
        return json.loads(report_path.read_text()), report_path
    report = validate(exp.path, artifact=art.path, progress=progress)
    write_report(report, report_path)
    return report, report_path


def perplexity_stage(spec: BuildSpec, art: Artifact, levels: list[Level], export_key: str, stages: Path,
                     progress: Progress) -> dict[str, dict]:
    """level name -> perplexity record on ``spec.eval_data`` (cached with the export). Windows are
    ``spec.eval_seqlen`` tokens, or the model's context when that is shorter (said once)."""
    from transformers import AutoConfig

    from ..artifact.evaluate import evaluate

    seqlen = spec.eval_seqlen
    context = getattr(AutoConfig.from_pretrained(art.model_dir), "max_position_embeddings", None)
    if isinstance(context, int) and seqlen > context:
        progress_note(progress, f"perplexity windows of {context} tokens: the model's context (not {seqlen})")
        seqlen = context
    ppl_path = stages / f"ppl-{_fingerprint({'export': export_key, 'data': spec.eval_data, 'seqlen': seqlen, 'windows': spec.eval_windows})}.json"
    if ppl_path.is_file():
        ev = json.loads(ppl_path.read_text())
        progress_note(progress, "reusing the perplexity of those levels")
    else:
        ev = evaluate(art.path, spec.eval_data, seqlen, levels, progress, spec.eval_windows)
        write_json(ppl_path, ev)
    return {r["level"]: {"value": round(r["ppl"], 4), "data": ev["data"]["source"], "data_sha256": ev["data"]["sha256"],
                         "seqlen": ev["seqlen"], "windows": ev["data"]["windows"], "dense": ev["results"][0]["ppl"]}
            for r in ev["results"][1:]}


def _copy_levels(exp, report: dict, ppl: dict, levels: list[Level], tmp: Path) -> list[dict]:
    """Copy each level's folder into the bundle; its manifest record (without files yet)."""
    from transformers import AutoConfig

    from ..onnx.genai import write_genai_config

    parity_by_level = {e["level"]: e for e in report["levels"]}
    records = []
    for lv in levels:
        rel = exp.graph_path(lv).parent.relative_to(exp.path).as_posix()
        shutil.copytree(exp.path / rel, tmp / rel)
        # every target is an NVIDIA GPU: GenAI runs the level on CUDA there
        write_genai_config(AutoConfig.from_pretrained(tmp / rel), tmp / rel, "cuda")
        entry = parity_by_level[lv.name]
        rec = exp.level_record(lv)
        records.append({
            "name": lv.name, "dir": rel, "pattern": rec["pattern"], "sparsity": lv.sparsity,
            "measured_sparsity": rec.get("measured_sparsity"), "sparse_weights": lv.is_nm,
            "perplexity": ppl.get(lv.name),  # None unless build got --eval-data
            "parity": {"passed": entry["passed"], "checks": {k: bool(v.get("passed")) for k, v in entry["checks"].items()}},
        })
    from ..onnx.parity import write_report

    write_report(report, tmp / "parity.json")
    return records


def engine_context(target, config) -> dict:
    """How many tokens the engines' profiles may span: the target's max_context, capped at the
    model's max_position_embeddings (a 2048-token model gets no 4096-token profile)."""
    model_max = getattr(config, "max_position_embeddings", None)
    model_max = int(model_max) if isinstance(model_max, int) and model_max > 0 else None
    tokens = min(target.max_context, model_max) if model_max else target.max_context
    return {"max_tokens": tokens, "target_max_context": target.max_context, "model_max_positions": model_max,
            "capped": tokens < target.max_context}


def engine_specs(bundle: Path, target, levels: list[Level], config) -> dict[Level, object]:
    """level -> the EngineSpec of the engine that serves it in ``bundle`` (whose level folders are
    in place), from the target's profiles capped at the model's context (``engine_context``).

    Every N:M level gets its own SPARSE_WEIGHTS engine. Two or more unstructured levels share one
    refittable engine (TensorRT has no unstructured-sparse kernels: they are the same dense graph
    with other weights), built from the first one's graph and refit from each level's at run time;
    when their graphs differ in more than weights (``refit.refit_plan``), each gets its own.
    """
    from ..interface import cap_profile
    from ..trt.builder import EngineSpec
    from ..trt.refit import RefitMismatch, refit_plan

    context = engine_context(target, config)
    engines = bundle / "engines"
    common = dict(precision=target.precision, profiles=[cap_profile(p, context["max_tokens"]) for p in target.profiles.values()],
                  kv=KVLayout.from_config(config), workspace_mb=target.workspace_mb, tactic_dram_mb=target.tactic_dram_mb,
                  timing_cache=engines / f"{target.name}.timing.cache", context=context)
    graph = {lv: bundle / level_dirname(lv) / GRAPH_FILE for lv in levels}
    dense = [lv for lv in levels if lv not in target.sparse]
    specs, note = {}, None
    if len(dense) >= 2:
        try:
            plan = refit_plan({lv.name: graph[lv] for lv in dense})
            shared = EngineSpec(onnx=graph[dense[0]], engine=engines / "unstructured.engine", levels=[lv.name for lv in dense],
                                sparse=False, layer_info=engines / "unstructured.layers.json",
                                refit_from={lv.name: graph[lv] for lv in dense}, refit_weights=list(plan.weights), **common)
            specs = {lv: shared for lv in dense}
        except RefitMismatch as e:
            note = f"own engine: {e}"
    for lv in levels:
        if lv not in specs:
            d = level_dirname(lv)
            specs[lv] = EngineSpec(onnx=graph[lv], engine=engines / f"{d}.engine", levels=[lv.name], sparse=lv in target.sparse,
                                   layer_info=engines / f"{d}.layers.json", note=None if lv.is_nm else note, **common)
    return {lv: specs[lv] for lv in levels}


def engine_stage(specs: dict, art: Artifact, exp, target, records: list[dict], tmp: Path, progress: Progress) -> dict:
    """Build every engine here (a refit engine once for all its levels), gate on TensorRT parity
    (parity-tensorrt.json); level name -> build record, with paths relative to the bundle."""
    from ..onnx.parity import write_report
    from ..trt.builder import build_engine
    from ..trt.scripts import unique_specs

    built = {}
    unique = unique_specs(specs.values())
    with progress.count("building TensorRT engines", len(unique)) as advance:
        for s in unique:
            s.engine.parent.mkdir(parents=True, exist_ok=True)
            result = build_engine(s)
            for name in s.levels:
                built[name] = {**result, **_engine_record(s, name, tmp)}
            advance()
    trt_report = tensorrt_parity(art, exp, specs, target, progress)
    write_report(trt_report, tmp / "parity-tensorrt.json")
    by_level = {e["level"]: e for e in trt_report["levels"]}
    for rec in records:
        e = by_level[rec["name"]]
        rec["parity"]["tensorrt"] = {"passed": e["passed"], "checks": {k: bool(v.get("passed")) for k, v in e["checks"].items()}}
    if not trt_report["passed"]:
        raise UserError("TensorRT parity failed: " + "; ".join(trt_report["failures"][:5]), EXIT_PARITY)
    return built


def _engine_record(spec, level: str, root: Path) -> dict:
    """Which engine serves ``level`` and how its weights get in, paths relative to the bundle ``root``."""
    rec = {"engine": spec.engine.relative_to(root).as_posix(), "layer_info": spec.layer_info.relative_to(root).as_posix(),
           "levels": list(spec.levels), "weights": spec.weights, "sparse": bool(spec.sparse)}
    if spec.refit:
        rec["refit_onnx"] = spec.refit_from[level].relative_to(root).as_posix()
    return rec


def tensorrt_parity(art: Artifact, exp, specs: dict, target, progress: Progress) -> dict:
    """Each level's engine against the float32 PyTorch reference with the export dtype's tolerances,
    through the same validation loop as `validate` (ORT's CPU provider cannot compute in fp16, so
    TensorRT and ORT are each compared with the same float32 reference). A refit engine is opened
    once and switched to each of its levels in turn (``TrtDecoder.set_level``): the switch is what
    is checked, and its time is in the report."""
    from ..artifact.materialize import ElasticModel
    from ..onnx.parity import TOLERANCES, check_levels
    from ..trt.runtime import TrtDecoder

    opened: dict[Path, object] = {}

    def open_engine(lv: Level):
        s = specs[lv]
        if s.engine not in opened:
            opened.clear()  # one engine in memory at a time (Jetson memory is shared with the CPU)
            opened[s.engine] = TrtDecoder(s.engine)
        dec, info = opened[s.engine], {"engine": s.engine.name, "weights": s.weights}
        if s.refit:
            switch = dec.set_level(lv.name, s.refit_from[lv.name])
            info["refit_s"] = switch["refit_s"]
        return dec, info

    entries, failures = check_levels(ElasticModel(art), list(specs), open_engine, target.precision,
                                     exp.manifest["io"]["outputs"], label="TensorRT parity", progress=progress,
                                     max_batch=min(3, target.max_batch), prefix="tensorrt ")
    return {"runtime": "tensorrt", "dtype": target.precision, "passed": not failures, "levels": entries,
            "tolerances": {k: v.to_dict() for k, v in TOLERANCES[target.precision].items()}, "failures": failures}


def _write_bundle_manifest(tmp: Path, manifest: dict, engines: dict, specs: dict) -> None:
    """Engine records, the build scripts, sha256 of every file, and each level's own files."""
    from ..trt.scripts import write_build_script
    from .runner import write_runner

    write_build_script(list(specs.values()), tmp)
    write_runner(tmp)
    for rec in manifest["levels"]:
        if rec["name"] in engines:
            rec["engine"] = engines[rec["name"]]
    # which engine serves each level and how its weights get in, built here or not
    by_name = {lv.name: s for lv, s in specs.items()}
    for rec in manifest["levels"]:
        if rec["name"] in by_name:
            rec["trt_engine"] = _engine_record(by_name[rec["name"]], rec["name"], tmp)
    if specs:
        manifest["engines"]["context"] = next(iter(specs.values())).context
    manifest["files"] = file_hashes(tmp)
    manifest["file_sizes"] = {f: (tmp / f).stat().st_size for f in manifest["files"]}  # bounds what a tar may unpack
    for rec in manifest["levels"]:  # each level's own files (graph, configs, tokenizer, engine), from the global list
        mine = [rec["dir"] + "/"] + ([rec["engine"]["engine"], rec["engine"]["layer_info"]] if rec.get("engine") else [])
        rec["files"] = {f: h for f, h in manifest["files"].items() if any(f == m or (m.endswith("/") and f.startswith(m)) for m in mine)}
    write_json(tmp / MANIFEST, manifest)
