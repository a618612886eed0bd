"""The export stage: an elastic artifact -> ONNX, one baked graph per level or one graph with the
level as an input. The graph's interface is ``interface``'s; tracing is ``onnx.trace``; dynamic
mode's surgery is ``onnx.dynamic``.

    <out>/manifest.json              mode, dtype, opset, levels, source artifact + hash, io, sha256 of every file
    <out>/level-<name>/model.onnx    baked: one folder per level (2:4 -> level-2of4), with
                                     config.json, generation_config.json and the tokenizer, so
                                     optimum's ORTModelForCausalLM loads it as is
    <out>/model.onnx                 dynamic: the whole graph (``sparsity_level`` input), with the same
                                     configs and tokenizer; its tensors in model.onnx_data
    <out>/weights.onnx               dynamic: ``sparsity_level`` -> the level's prunable weights
    <out>/decoder.onnx               dynamic: the decoder, its prunable weights supplied at run time
                                     (both parts reuse model.onnx_data: nothing is stored twice)
    <out>/levels.json                dynamic: the level table, also in the graphs' metadata
    <out>/decoder.weights            dynamic: empty; where decoder.onnx's prunable weights lie once a
                                     device writes one level's there (the graph TensorRT builds from)
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifact.folder import Artifact, library_versions
from ..core.levels import Level
from ..errors import UserError
from ..fsutil import MANIFEST, check_destination, file_hashes, staged_dir, write_json
from ..device.interface import DECODER_GRAPH, GRAPH_FILE, LEVEL_INPUT, LEVELS_FILE, LEVELS_METADATA, WEIGHTS_GRAPH, io_names, level_dirname
from ..progress import Progress
from . import graph as onnx_graph
from .reader import EXPORT
from .trace import DUMMY, prunable_weight_names, traceable, trace_to_onnx

DEFAULT_OPSET = 17  # TensorRT 8.5 (JetPack 5) parses up to 17; TensorRT 10 up to 20
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.float32}  # int8: Q/DQ around float32 (onnx.quant)
MODES = ("baked", "dynamic")


@dataclass
class ExportSpec:
    artifact: Path | Artifact  # the folder, or the opened artifact
    out: Path
    mode: str = "baked"
    levels: list[Level] | None = None  # default: the artifact's trained levels
    dtype: str = "fp32"
    opset: int = DEFAULT_OPSET
    overwrite: bool = False
    external_data: str = "auto"  # auto (above 2 GB) | always | never
    calib: str | None = None  # int8: where the activation ranges come from (default: the artifact's calibration)
    smooth: str | float | None = None  # int8: SmoothQuant's alpha "A" or "A,B", 0 = off (default: recipe.DEFAULT_ALPHA)


def _check_spec(spec: ExportSpec) -> None:
    if spec.mode not in MODES:
        raise UserError(f"unknown --mode {spec.mode!r}: use baked (one graph per level) or dynamic (one graph, level as input)")
    if spec.dtype not in DTYPES:
        raise UserError(f"unknown --dtype {spec.dtype!r}: use fp32, fp16 or int8")
    if spec.dtype != "int8" and (spec.calib is not None or spec.smooth is not None):
        raise UserError("--calib and --smooth set up INT8 quantization: they go with --dtype int8")
    if spec.dtype == "int8" and spec.smooth is not None:
        from ..quant.recipe import parse_smooth

        parse_smooth(spec.smooth)  # a bad --smooth fails before any work
    if spec.dtype == "int8" and spec.mode == "dynamic":
        raise UserError("int8 exports are baked (--mode baked): each level has its own weight and activation scales, "
                        "which one graph with a level input cannot hold as constants")
    if not 14 <= spec.opset <= 21:
        raise UserError(f"--opset {spec.opset} is out of range: use 14..21 (17 parses on TensorRT 8.5 and later)")
    if spec.external_data not in ("auto", "always", "never"):
        raise UserError(f"unknown external-data setting {spec.external_data!r}: auto, always or never")
    if spec.mode == "dynamic" and spec.external_data == "never":
        raise UserError("dynamic mode keeps its tensors in model.onnx_data, shared by model.onnx, weights.onnx and "
                        "decoder.onnx: leave out --external-data never")


def _write_hf_side_files(model, tokenizer, folder: Path) -> None:
    """config.json, generation_config.json and the tokenizer, as optimum's ORTModelForCausalLM expects,
    and genai_config.json for ONNX Runtime GenAI (CPU; bundles for GPU targets switch it to CUDA)."""
    from transformers import GenerationConfig

    from .genai import write_genai_config

    from ..models.hf import save_config, save_tokenizer

    cfg = model.config
    cfg.use_cache = True
    save_config(cfg, folder)
    gen = model.generation_config if getattr(model, "generation_config", None) is not None else GenerationConfig.from_model_config(cfg)
    gen.save_pretrained(folder)
    save_tokenizer(tokenizer, folder, input_names=["input_ids", "attention_mask"])  # the graph takes no token_type_ids
    write_genai_config(cfg, folder)


def export(spec: ExportSpec, progress: Progress | None = None, model=None) -> Path:
    """Export ``spec.levels`` of an artifact to ONNX (see the module docstring). Returns the folder.

    ``spec.artifact``: its folder, or the opened Artifact. ``model``: that artifact's ElasticModel
    when the caller has it loaded (it is handed back as it was: ``trace.traceable``)."""
    from ..artifact.materialize import ElasticModel

    progress = progress or Progress(enabled=False)
    _check_spec(spec)
    art = spec.artifact if isinstance(spec.artifact, Artifact) else None
    check_destination(spec.out, overwrite=spec.overwrite, inputs=[art.path if art else spec.artifact])
    art = art or Artifact.open(spec.artifact)
    levels = spec.levels or art.levels
    for lv in levels:
        art.check_level(lv)
    if spec.mode == "dynamic" and not art.is_elastic:
        raise UserError(f"dynamic mode needs an EPTS artifact; this {art.method} artifact holds one level (use --mode baked)")
    if spec.mode == "dynamic" and len(levels) > 255:
        raise UserError("dynamic mode serves at most 255 levels in one graph")
    if model is not None and model.artifact.manifest_sha256 != art.manifest_sha256:
        raise ValueError(f"the model handed to export was loaded from {model.artifact.path}, not {art.path}")
    t0 = time.time()
    with staged_dir(spec.out, overwrite=spec.overwrite) as tmp:
        if model is None:
            with progress.status(f"loading {art.path}"):
                model = ElasticModel(art)
        scratch = Path(tempfile.mkdtemp(prefix="epts-onnx-", dir=tmp))
        try:
            with traceable(model, spec.dtype == "fp16"):
                if spec.mode == "baked":
                    records, timings, extra = _export_baked(model, art, spec, levels, tmp, scratch, progress)
                else:
                    records, timings, extra = _export_dynamic(model, art, spec, levels, tmp, scratch, progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        manifest = {
            **EXPORT.header(), "mode": spec.mode, "dtype": spec.dtype, "opset": spec.opset, "levels": records,
            "source_artifact": {"path": str(art.path.resolve()), "manifest_sha256": art.manifest_sha256,
                                "method": art.method, "model": art.manifest.get("model", {}).get("spec")},
            "io": dict(zip(("inputs", "outputs"), io_names(model.model.config.num_hidden_layers, spec.mode == "dynamic"))),
            "dummy_shape": DUMMY,
            "weights": prunable_weight_names(model.model, model.family),
            "export_seconds": timings, "elapsed_s": round(time.time() - t0, 2),
            "library_versions": {**library_versions(), **_onnx_versions()},
            "parity": None,
            **extra,
            "files": file_hashes(tmp),
        }
        write_json(tmp / MANIFEST, manifest)
        write_export_report(tmp, manifest, None)
    return spec.out


def write_export_report(folder: Path, manifest: dict, parity: dict | None) -> Path:
    """report.html of an export folder (not listed in its manifest: ``validate`` rewrites it with
    the parity it measured)."""
    from ..report.html import REPORT_FILE, write_page
    from ..report.pages import export_page

    return write_page(Path(folder) / REPORT_FILE, export_page(manifest, parity))


def _export_baked(em, art: Artifact, spec: ExportSpec, levels: list[Level], tmp: Path, scratch: Path,
                  progress: Progress) -> tuple[list[dict], dict, dict]:
    """One folder per level: materialize, trace, name, save, side files."""
    model, fam, fp16 = em.model, em.family, spec.dtype == "fp16"
    weights = prunable_weight_names(model, fam)
    records, timings = [], {}
    int8 = _Int8(em, spec, progress) if spec.dtype == "int8" else None
    with progress.count("exporting levels", len(levels)) as advance:
        for lv in levels:
            t = time.time()
            em.at(lv)
            folder = tmp / level_dirname(lv)
            folder.mkdir()
            traced = scratch / level_dirname(lv) / GRAPH_FILE
            traced.parent.mkdir()
            if int8:
                recipe = int8.trace(lv, traced)
            else:
                trace_to_onnx(model, fam, traced, spec.opset, fp16)
            graph = onnx_graph.load(traced)
            onnx_graph.finalize(graph, weights, metadata=_metadata(art, spec, [lv]))
            if int8:
                int8.quantize(graph, recipe, folder, lv.name)
            sp = onnx_graph.weight_sparsity(graph, weights)
            onnx_graph.save(graph, folder / GRAPH_FILE, spec.external_data)
            _write_hf_side_files(model, em.tokenizer, folder)
            shutil.rmtree(traced.parent)
            records.append({"name": lv.name, "dir": level_dirname(lv), "pattern": _pattern(lv),
                            "sparsity": lv.sparsity, "measured_sparsity": round(sp, 6),
                            **({"int8": int8.summaries[lv.name]} if int8 else {})})
            timings[lv.name] = round(time.time() - t, 2)
            advance()
    return records, timings, ({"int8": int8.record()} if int8 else {})


class _Int8:
    """The int8 steps of a baked export: calibration windows once, then per level the recipe
    (ranges and smoothing measured at that level), the smoothed float32 trace and the Q/DQ graph."""

    def __init__(self, em, spec: ExportSpec, progress: Progress):
        from ..quant.calibrate import int8_calibration
        from ..quant.recipe import DEFAULT_ALPHA, parse_smooth

        self.em, self.spec, self.progress = em, spec, progress
        self.alpha = parse_smooth(DEFAULT_ALPHA if spec.smooth is None else spec.smooth)
        with progress.status("building the INT8 calibration set"):
            self.calib = int8_calibration(em, spec.calib)
        self.summaries: dict[str, dict] = {}

    def trace(self, lv: Level, path: Path):
        from ..quant.recipe import build_recipe, input_amax, smoothed

        em = self.em
        with self.progress.count(f"INT8 ranges at {lv.name}", len(self.calib.samples)) as advance:
            stats = input_amax(em.model, em.family, self.calib.samples, advance=advance)
        recipe = build_recipe(em.model, em.family, stats, self.alpha, self.calib.record)
        with smoothed(em.model, em.family, recipe.smooth, restore_prunable=lambda: em.at(lv)):
            trace_to_onnx(em.model, em.family, path, self.spec.opset, False)
        return recipe

    def quantize(self, graph, recipe, folder: Path, level: str) -> None:
        from ..quant.qdq import quantize_graph
        from ..quant.recipe import recipe_summary

        counts = quantize_graph(graph, prunable_weight_names(self.em.model, self.em.family), recipe.act_scale)
        recipe.save(folder)
        self.summaries[level] = {**recipe_summary(recipe), **counts}

    def record(self) -> dict:
        from ..quant.recipe import FORMAT

        return {"format": FORMAT, "alpha": list(self.alpha), "calibration": self.calib.record,
                "weights": "symmetric per output channel", "activations": "symmetric per tensor (max)"}


def _export_dynamic(em, art: Artifact, spec: ExportSpec, levels: list[Level], tmp: Path, scratch: Path,
                    progress: Progress) -> tuple[list[dict], dict, dict]:
    """The whole graph: trace the dense model, then replace each prunable weight by its level
    subgraph; then the same graph in two parts (weights, decoder) over the same tensor file."""
    import onnx

    from .dynamic import PLACEHOLDER, ElasticTables, make_elastic, place_decoder_tensors, split_graphs

    model, fam, fp16 = em.model, em.family, spec.dtype == "fp16"
    weights = prunable_weight_names(model, fam)
    with progress.status(f"exporting one graph for {len(levels)} levels"):
        t = time.time()
        em.at(None)
        traced = scratch / GRAPH_FILE
        trace_to_onnx(model, fam, traced, spec.opset, fp16)
        graph = onnx_graph.load(traced)
        dense_bytes = onnx_graph.initializer_bytes(graph)
        onnx_graph.finalize(graph, weights, metadata=_metadata(art, spec, levels))
        by_module = {module: name for name, module in weights.items()}
        initializers = {(i, n): by_module[f"{fam.blocks}.{i}.{n}"] for (i, n) in em.dense}
        tables = ElasticTables.build(em.elastic, levels, initializers, torch.float16 if fp16 else torch.float32)
        builder = make_elastic(graph, tables)
        onnx_graph.save(graph, tmp / GRAPH_FILE, "always")
        del graph
        whole = onnx.load(str(tmp / GRAPH_FILE), load_external_data=False)  # tensors as references into model.onnx_data
        parts = split_graphs(whole, builder, list(tables.codes))
        (tmp / PLACEHOLDER).write_bytes(b"")
        tensors = place_decoder_tensors(parts[1], tmp, list(tables.codes))
        for part, name in zip(parts, (WEIGHTS_GRAPH, DECODER_GRAPH)):
            onnx_graph.save_references(part, tmp / name)
        write_json(tmp / LEVELS_FILE, {"input": LEVEL_INPUT, "levels": [lv.name for lv in levels]})
        _write_hf_side_files(model, em.tokenizer, tmp)
        elapsed = round(time.time() - t, 2)
    records = [{"name": lv.name, "index": i, "pattern": _pattern(lv), "sparsity": lv.sparsity} for i, lv in enumerate(levels)]
    fields = [{"name": f.name, "bits": f.width} for f in tables.fields]
    engine_graph = {"graph": DECODER_GRAPH, "weights_file": PLACEHOLDER, "tensors": tensors}
    return records, {"all": elapsed}, {"dense_initializer_bytes": dense_bytes, "code_fields": fields, "engine_graph": engine_graph,
                                       "parts": {"weights": WEIGHTS_GRAPH, "decoder": DECODER_GRAPH, "levels": LEVELS_FILE}}


def _pattern(level: Level) -> str:
    return f"{level.n}:{level.m}" if level.is_nm else "unstructured"


def _onnx_versions() -> dict[str, str]:
    import onnx

    return {"onnx": onnx.__version__}


def _metadata(art: Artifact, spec: ExportSpec, levels: list[Level]) -> dict[str, str]:
    meta = {"epts.format": EXPORT.format, "epts.mode": spec.mode, "epts.dtype": spec.dtype,
            "epts.source_manifest_sha256": art.manifest_sha256,
            LEVELS_METADATA: json.dumps([lv.name for lv in levels])}
    if spec.mode == "dynamic":
        meta["epts.sparsity_level"] = ("int64 scalar input: index into epts.levels (also in levels.json); an "
                                       "index outside [0, len(levels)) makes every output NaN")
    return meta
