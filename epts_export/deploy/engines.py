"""The host side of TensorRT engines: which engines a bundle for a target needs, and the trtexec
command that builds each. Nothing here runs TensorRT; the device side is ``device.trt``.

Facts this code relies on (sources in the project's notes, shared/docs/tensorrt-notes.md):

* TensorRT has no kernels for unstructured sparsity: the unstructured levels are one dense graph
  with other weights, so one *refittable* engine serves them all; every N:M level gets its own
  SPARSE_WEIGHTS engine with its weights as constants (sparse tactics need them so, and a refit into
  a sparse tactic accepts only 2:4 weights).
* trtexec builds several optimization profiles in one engine with ``--profile=N`` followed by that
  profile's ``--minShapes/--optShapes/--maxShapes`` (shapes given outside a ``--profile`` are then
  an error, so every profile gets its own ``--profile=N``).
* trtexec's ``--sparsity=force`` overwrites weights and is never used. ``--refit`` makes every
  weight refittable (trtexec cannot mark single weights, as the Python builder's REFIT_INDIVIDUAL
  does). ``--memPoolSize`` knows ``workspace`` and others but no tactic-DRAM pool, so
  ``tactic_dram_mb`` is applied by the Python builder only.
"""

from __future__ import annotations

from pathlib import Path

from ..core.levels import Level
from ..device.interface import GRAPH_FILE, KVLayout, cap_profile, level_dirname
from ..device.trt.spec import EngineSpec, WeightSource, bundle_relative, profile_shapes

ENGINES_DIR = "engines"


def engine_context(target, config) -> dict:
    """How many tokens the engines' profiles may span: the target's max_context, capped at the
    model's max_position_embeddings (a 2048-token model gets no 4096-token profile)."""
    model_max = getattr(config, "max_position_embeddings", None)
    model_max = int(model_max) if isinstance(model_max, int) and model_max > 0 else None
    tokens = min(target.max_context, model_max) if model_max else target.max_context
    return {"max_tokens": tokens, "target_max_context": target.max_context, "model_max_positions": model_max,
            "capped": tokens < target.max_context}


def engine_specs(bundle: Path, target, levels: list[Level], config, source: WeightSource | None = None) -> dict[Level, EngineSpec]:
    """level -> the EngineSpec of the engine that serves it in ``bundle``.

    Elastic bundles (``source``): every engine is built from the weight builder's level weights and
    ``source.graph``; the unstructured levels share one refittable engine (built with the least
    sparse level's weights, the others refit at run time), each N:M level gets its own sparse engine.
    Baked-layout bundles (no ``source``): one engine per level from its own graph, weights baked.
    Profiles are the target's, capped at the model's context (``engine_context``).
    """
    context = engine_context(target, config)
    engines = Path(bundle) / ENGINES_DIR
    common = dict(precision=target.precision, profiles=[cap_profile(p, context["max_tokens"]) for p in target.profiles.values()],
                  kv=KVLayout.from_config(config), workspace_mb=target.workspace_mb, tactic_dram_mb=target.tactic_dram_mb,
                  timing_cache=engines / f"{target.name}.timing.cache", context=context)
    specs: dict[Level, EngineSpec] = {}
    dense = [lv for lv in levels if lv not in target.sparse]
    if source is not None and len(dense) > 1:
        shared = EngineSpec(onnx=source.graph, engine=engines / "unstructured.engine", levels=[lv.name for lv in dense],
                            sparse=False, layer_info=engines / "unstructured.layers.json", refit=True,
                            refit_weights=source.prunable, source=source, **common)
        specs = {lv: shared for lv in dense}
    for lv in levels:
        if lv not in specs:
            d = level_dirname(lv)
            graph = source.graph if source is not None else Path(bundle) / d / GRAPH_FILE
            specs[lv] = EngineSpec(onnx=graph, engine=engines / f"{d}.engine", levels=[lv.name], sparse=lv in target.sparse,
                                   layer_info=engines / f"{d}.layers.json", source=source, **common)
    return {lv: specs[lv] for lv in levels}


def _shapes_arg(rows, which: int) -> str:
    return ",".join(f"{row[0]}:" + "x".join(str(int(d)) for d in row[which]) for row in rows)


def trtexec_command(spec: EngineSpec, root: Path | None = None, trtexec: str = "trtexec") -> list[str]:
    """The trtexec argv that builds ``spec`` (paths relative to ``root`` when given).

    One command builds all profiles: ``--profile=N`` then that profile's min/opt/max shapes, for
    each profile in order (a single profile needs no ``--profile``). ``--stronglyTyped`` (TensorRT
    >= 10) takes precision from the ONNX dtypes, so no ``--fp16``; int8 specs are built weakly typed
    with ``--fp16 --int8`` instead (``builder._creation_flags``). ``--sparsity=enable`` only for
    sparse specs. ``--memPoolSize`` sizes are MiB with an explicit ``M``. ``--refit`` for a spec
    serving several levels (every weight refittable). ``--skipInference`` stops after the build
    (layer info is still exported). An elastic bundle's graph needs its level's weights written
    first (``build_engines.py bake LEVEL``; ``build_engines.sh`` does it).
    """
    def arg(p: Path) -> str:
        return str(p) if root is None else bundle_relative(p, root)

    shapes = profile_shapes(spec)
    argv = [trtexec, f"--onnx={arg(spec.onnx)}", f"--saveEngine={arg(spec.engine)}"]
    # int8: the Q/DQ graph built weakly typed, INT8 where its Q/DQ say and fp16 elsewhere
    argv += ["--fp16", "--int8"] if spec.precision == "int8" else ["--stronglyTyped"]
    many = len(shapes) > 1
    for index, rows in enumerate(shapes.values()):
        if many:
            argv.append(f"--profile={index}")
        argv += [f"--minShapes={_shapes_arg(rows, 1)}", f"--optShapes={_shapes_arg(rows, 2)}",
                 f"--maxShapes={_shapes_arg(rows, 3)}"]
    if spec.sparse:
        argv.append("--sparsity=enable")
    if spec.refit:
        argv.append("--refit")
    argv += [f"--memPoolSize=workspace:{int(spec.workspace_mb)}M", f"--timingCacheFile={arg(spec.timing_cache)}",
             "--profilingVerbosity=detailed", f"--exportLayerInfo={arg(spec.layer_info)}", "--skipInference"]
    return argv
