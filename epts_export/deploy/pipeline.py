"""`build`: the whole pipeline for one device target, ending in a bundle to copy to the device.

    model or artifact --optimize--> artifact --export (dynamic, or baked per level; target
        precision)--> ONNX --validate--> parity report --TensorRT (here, or on the device)-->
        engines --> bundle (``assemble``: its layout, files and manifest)

Stages are cached under ``<out>/.stages/`` by a fingerprint of their inputs, so a second build
for another target (or after a failed one) reuses what has not changed. The default bundle is
*elastic*: one copy of the weights for every level (the dynamic export), every level switched in
place on the device, TensorRT engines built from the same weights (a refit engine for the
unstructured levels, a sparse one per N:M level). ``layout="baked"`` writes one plain ONNX folder
per level instead (for ONNX Runtime GenAI and optimum users).

Exit codes: 1 bad input, 2 engines required (--require-engines) but not buildable here,
3 parity failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..artifact.folder import ARTIFACT, Artifact
from ..core.levels import DEFAULT_LEVELS, Level, parse_levels, sort_levels
from ..errors import UserError
from ..device.bundle import BUNDLE, LAYOUTS
from ..device.interface import KVLayout
from ..fsutil import MANIFEST, check_destination, sha256_bytes, staged_dir, write_json
from ..progress import Progress
from ..report.html import REPORT_FILE
from .assemble import EXIT_PARITY, MODEL_DIR, copy_model, engine_stage, write_manifest
from .engines import engine_specs

if TYPE_CHECKING:  # pragma: no cover
    from ..models.resolve import ResolvedModel

STAGES = ".stages"
EXIT_NO_ENGINES = 2


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
    layout: str | None = None  # "elastic": one copy of the weights for every level (the default), "baked": one
    # ONNX folder per level (the default, and the only layout, for int8)
    dtype: str | None = None  # default: the target's precision; "int8" on targets with int8 = true


@dataclass
class _Source:
    """Where the build starts: an artifact, or a resolved model to optimize first."""

    artifact: Artifact | None
    model_dir: Path  # the Hugging Face folder (the artifact's model/ when starting from one)
    model_sha256: str | None  # the resolved model's weights, for the artifact stage's cache key
    params: int  # its parameters, from the weight headers (0 when they are not safetensors)
    resolved: "ResolvedModel | None" = None  # the model, resolved once, when the build starts from one


class StageLog:
    """What each stage of a build took, and whether it was reused (the bundle's ``stages``)."""

    def __init__(self):
        self.records: list[dict] = []
        self._current: dict | None = None

    @contextlib.contextmanager
    def stage(self, name: str):
        t = time.perf_counter()
        self._current = rec = {"name": name, "seconds": 0.0, "reused": False}
        try:
            yield rec
        finally:
            rec["seconds"] = round(time.perf_counter() - t, 2)
            self.records.append(rec)

    def reused(self) -> None:
        if self._current is not None:
            self._current["reused"] = True


class _Loaded:
    """The artifact's model, loaded on first use and shared by the stages that need it (export,
    parity, perplexity); none is loaded when every stage is reused."""

    def __init__(self, art: Artifact, progress: Progress):
        self.art, self.progress, self._model = art, progress, None

    def get(self):
        from ..artifact.materialize import ElasticModel

        if self._model is None:
            with self.progress.status(f"loading {self.art.path}"):
                self._model = ElasticModel(self.art)
        return self._model


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
    elem = {"fp32": 4, "int8": 1}.get(target.precision, 2)  # int8: the prunable weights, most of the bytes
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
    if spec.layout not in (None, *LAYOUTS):
        raise UserError(f"unknown --layout {spec.layout!r}: elastic (one copy of the weights for every level) or baked "
                        "(one ONNX folder per level)")
    target = resolve_target(spec.target)
    target, spec = _precision(spec, target)
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
    if spec.preset:  # before the stage cache exists: a bad preset leaves nothing behind
        from ..pruning.presets import check_calibration, load_preset

        check_calibration(spec.preset, load_preset(spec.preset), None)
    stages = out / STAGES
    try:
        stages.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {stages}: {e.strerror or e}") from None
    with _stage_lock(stages, progress):
        return _build(spec, target, levels, bundle, stages, progress, t0)


def _precision(spec: BuildSpec, target):
    """(the target at the build's precision, the spec with its layout decided). ``--dtype`` other
    than the target's precision is int8, on targets that take it; int8 ships baked levels."""
    dtype = spec.dtype or target.precision
    layout = spec.layout or ("baked" if dtype == "int8" else "elastic")
    if dtype != target.precision:
        if dtype != "int8":
            raise UserError(f"--dtype {dtype}: {target.name} builds in {target.precision}; --dtype takes int8, on targets "
                            "whose profile sets int8 = true (the Jetson Orin ones)")
        if not target.int8:
            raise UserError(f"{target.name} does not take INT8 engines (its profile does not set int8 = true: that needs "
                            f"TensorRT below 11 and INT8 tensor cores); build it in {target.precision}, or use a Jetson Orin target")
        if layout != "baked":
            raise UserError("--dtype int8 ships baked levels (leave out --layout, or --layout baked): each level has its own "
                            "weight and activation scales, which one elastic graph cannot hold as constants")
        target = dataclasses.replace(target, precision="int8")
    return target, dataclasses.replace(spec, layout=layout)


LOCK_WAIT_S = int(os.environ.get("EPTS_LOCK_WAIT_S", 3 * 3600))  # a cold build of a large model takes hours


@contextlib.contextmanager
def _stage_lock(stages: Path, progress: Progress):
    """One build at a time per --out: a second one waits here (at most ``LOCK_WAIT_S``, saying so),
    then reuses the stages the first wrote."""
    import fcntl

    lock = stages / ".lock"
    if lock.is_symlink() or (lock.exists() and not lock.is_file()):
        raise UserError(f"{lock} is in the way (not the lock file a build leaves): remove it")
    with open(lock, "a") as fh:
        waited = 0.0
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if waited == 0:
                    progress.note(f"waiting for another build that uses {stages.parent} (at most {LOCK_WAIT_S // 60} min)")
                if waited >= LOCK_WAIT_S:
                    raise UserError(f"another build has held {lock} for {LOCK_WAIT_S // 60} min: wait for it to finish or "
                                    "stop it, or choose another --out") from None
                time.sleep(1.0)
                waited += 1.0
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
    estimate = memory_preflight(config, src.params, target)
    # 2. artifact: given, or optimized once per (model, preset) and reused
    log = StageLog()
    with log.stage("optimize"):
        if src.artifact is not None:
            log.reused()
        art = src.artifact or optimize_stage(spec, src, levels, stages, progress, log)
    for lv in levels:
        art.check_level(lv)
    # 3-4b. ONNX baked in the target's precision, parity, perplexity: each reused when unchanged,
    # the model loaded once for whichever of them runs
    model = _Loaded(art, progress)
    with log.stage("export"):
        exp, export_key = export_stage(art, levels, target.precision, "dynamic" if spec.layout == "elastic" else "baked",
                                       stages, progress, model, log)
    with log.stage("parity"):
        report, report_path = parity_stage(exp, art, export_key, stages, progress, model, log)
    if not report["passed"]:
        raise UserError("parity failed: " + "; ".join(report["failures"][:5]) + f" (report: {report_path})", EXIT_PARITY)
    ppl, curve = {}, None
    if spec.eval_data:
        with log.stage("perplexity"):
            ppl, curve = perplexity_stage(spec, art, levels, export_key, stages, progress, model, log)
    # 5. engines here when TensorRT and a matching GPU are present and the target allows it; bundle
    can_build, why = _engines_here(target)
    if not can_build and spec.require_engines:
        raise UserError(f"engines were not built: {why} (--require-engines)", EXIT_NO_ENGINES)
    with staged_dir(bundle, overwrite=spec.overwrite) as tmp:
        records, source, copied = copy_model(exp, report, ppl, levels, tmp)
        specs = engine_specs(tmp, target, levels, config, source)
        engines = {}
        if can_build:
            with log.stage("engines"):
                engines = engine_stage(specs, art, exp, target, records, tmp, progress)
        manifest = {
            **BUNDLE.header(),
            "layout": spec.layout,
            **({"model": {"dir": MODEL_DIR, "dtype": exp.dtype}} if spec.layout == "elastic" else {}),
            "target": target.to_dict(),
            "levels": records,
            "engines": {"built": bool(engines), "reason": None if engines else why,
                        "how": "bash build_engines.sh (trtexec) or python build_engines.py, on the device"},
            "memory_estimate": estimate,
            "source": {"artifact": str(art.path.resolve()), "artifact_manifest_sha256": art.manifest_sha256,
                       "onnx_export": str(exp.path.resolve()), "calibration": art.manifest.get("calibration"),
                       "allocation": art.allocation.to_dict()},
            "stages": log.records,
            "elapsed_s": round(time.time() - t0, 2),
        }
        write_manifest(tmp, manifest, engines, specs, source, copied, report=lambda m: bundle_report(tmp, m, report, curve))
    progress.note(f"report: {bundle / REPORT_FILE}")
    return bundle


def bundle_report(folder: Path, manifest: dict, parity: dict, curve: dict | None) -> str:
    """The bundle's report.html (``report.pages.bundle_page``), with the engine report when built."""
    from ..report.pages import bundle_page

    engines_json = folder / "engines" / "report.json"
    engines = json.loads(engines_json.read_text()) if engines_json.is_file() else None
    return bundle_page(manifest, parity, curve, engines)


def _source(spec: BuildSpec, progress: Progress) -> _Source:
    from ..models.weights import weight_params

    src = Path(spec.source)
    if _is_artifact(src):
        art = Artifact.open(src)
        return _Source(art, art.model_dir, art.manifest["model"].get("sha256"), weight_params(art.model_dir) or 0)
    if src.exists() and (src / MANIFEST).is_file():
        raise UserError(f"{src} has a manifest but is not an elastic artifact; pass an artifact folder or a model")
    from ..models.resolve import resolve_model

    resolved = resolve_model(spec.source, progress=progress.enabled)
    return _Source(None, resolved.path, resolved.source.get("sha256"), resolved.params or 0, resolved)


def _engines_here(target) -> tuple[bool, str]:
    if target.build_on_device:
        return False, f"{target.name} engines are built on the device itself (there is no cross-building for Jetson)"
    from ..device.trt.probe import tensorrt_status

    return tensorrt_status()


def _version() -> str:
    from .. import __version__

    return __version__


# --------------------------------------------------------------------------------------------
# stages: each a function from artifacts and a spec to a (cached) artifact


def optimize_stage(spec: BuildSpec, src: _Source, levels: list[Level], stages: Path, progress: Progress,
                   log: StageLog | None = None) -> Artifact:
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
            progress.note(f"reusing artifact {out}")
            if log:
                log.reused()
            return art
        except UserError:
            shutil.rmtree(out)
    opt = OptimizeSpec.from_preset(spec.source, out, levels, spec.preset, resolved=src.resolved,
                                   resume=(out.parent / (out.name + ".partial")).exists())
    return Artifact.open(optimize(opt, progress), verify=False)  # hashed as it was written


def export_stage(art: Artifact, levels: list[Level], precision: str, mode: str, stages: Path, progress: Progress,
                 model: _Loaded, log: StageLog | None = None):
    """(the ONNX export of ``levels`` in ``precision``, ``mode`` dynamic or baked, its cache key)."""
    from ..onnx.export import DEFAULT_OPSET, ExportSpec, export
    from ..onnx.reader import OnnxExport

    key = _fingerprint({"artifact": art.manifest_sha256, "levels": [lv.name for lv in levels],
                        "dtype": precision, "mode": mode, "opset": DEFAULT_OPSET, "version": _version()})
    onnx_dir = stages / f"onnx-{key}"
    if onnx_dir.exists():
        try:
            exp = OnnxExport.open(onnx_dir)
            progress.note(f"reusing ONNX export {onnx_dir}")
            if log:
                log.reused()
            return exp, key
        except UserError:
            shutil.rmtree(onnx_dir)
    export(ExportSpec(artifact=art, out=onnx_dir, mode=mode, levels=levels, dtype=precision), progress, model.get())
    return OnnxExport.open(onnx_dir, verify="written"), key


def parity_stage(exp, art: Artifact, export_key: str, stages: Path, progress: Progress,
                 model: _Loaded, log: StageLog | None = None) -> tuple[dict, Path]:
    """(the validate report of the export, its path); reused when the export already passed."""
    from ..onnx.parity import validate, write_report

    report_path = stages / f"parity-{export_key}.json"
    files_sha = sha256_bytes(json.dumps(exp.manifest["files"], sort_keys=True).encode())  # what was validated
    if (exp.manifest.get("parity") or {}).get("passed") and report_path.is_file():
        report = _cached_report(report_path)
        if report is not None and report.get("export_files_sha256") == files_sha:
            progress.note("reusing the parity result of that export")
            if log:
                log.reused()
            return report, report_path
        progress.note("the cached parity result does not belong to this export's files: validating again")
    report = validate(exp, artifact=art, progress=progress, model=model.get())
    report["export_files_sha256"] = files_sha
    write_report(report, report_path)
    return report, report_path


def _cached_report(path: Path) -> dict | None:
    """A parity report a build cached, or None when it is unreadable or not one (then validated again)."""
    from ..device.files import load_json

    try:
        doc = load_json(path.read_bytes(), str(path))
    except (OSError, UserError):
        return None
    ok = isinstance(doc, dict) and isinstance(doc.get("levels"), list) and isinstance(doc.get("passed"), bool)
    return doc if ok and all(isinstance(e, dict) and isinstance(e.get("level"), str) for e in doc["levels"]) else None


def perplexity_stage(spec: BuildSpec, art: Artifact, levels: list[Level], export_key: str, stages: Path,
                     progress: Progress, model: _Loaded, log: StageLog | None = None) -> tuple[dict[str, dict], dict]:
    """(level name -> perplexity record on ``spec.eval_data``, the curve: the shipped levels and
    every 0.1 of the artifact's range, for the report), cached with the export. Windows are
    ``spec.eval_seqlen`` tokens, or the model's context when that is shorter (said once)."""
    from transformers import AutoConfig

    from ..report.curve import CURVE_STEP_BUILD, curve_levels, evaluate_curve

    seqlen = spec.eval_seqlen
    context = getattr(AutoConfig.from_pretrained(art.model_dir), "max_position_embeddings", None)
    if isinstance(context, int) and seqlen > context:
        progress.note(f"perplexity windows of {context} tokens: the model's context (not {seqlen})")
        seqlen = context
    ppl_path = stages / f"curve-{_fingerprint({'export': export_key, 'data': spec.eval_data, 'seqlen': seqlen, 'windows': spec.eval_windows})}.json"
    curve = None
    if ppl_path.is_file():
        from ..device.files import load_json

        try:
            curve = load_json(ppl_path.read_bytes(), str(ppl_path))
            names = {p["level"] for p in curve["series"][0]["points"]}
            if not {lv.name for lv in levels} <= names or not isinstance(curve["data"], dict):
                raise ValueError("not the levels asked for")
            progress.note("reusing the perplexity of those levels")
            if log:
                log.reused()
        except (OSError, UserError, ValueError, KeyError, TypeError, IndexError):
            curve = None  # unreadable or not a curve: evaluated again
    if curve is None:
        todo = sort_levels(set(curve_levels(art, CURVE_STEP_BUILD)) | set(levels))
        curve = evaluate_curve(art, spec.eval_data, seqlen, max_windows=spec.eval_windows, levels=todo, model=model.get(),
                               progress=progress)
        write_json(ppl_path, curve)
    points = {p["level"]: p for p in curve["series"][0]["points"]}
    return {lv.name: {"value": round(points[lv.name]["ppl"], 4), "data": curve["data"]["source"],
                      "data_sha256": curve["data"]["sha256"], "seqlen": curve["seqlen"], "windows": curve["data"]["windows"],
                      "dense": curve["dense"]} for lv in levels}, curve
