"""The device-side TensorRT engine builder: TensorRT's Python API over one ``EngineSpec``.

Facts this code relies on (sources in the project's notes, shared/docs/tensorrt-notes.md; names
checked against the real bindings of 8.6.1, 10.3.0 and 11.4.0.106 by the tests):

* Engines are not portable across GPUs, TensorRT versions or JetPack releases, and there is no
  x86 -> Jetson cross build: Jetson engines are built on the device.
* TensorRT 10 builds *strongly typed* networks (precision comes from the ONNX dtypes); TensorRT 11
  has no other mode: no FP16/BF16/INT8 builder flags, ``STRONGLY_TYPED`` deprecated and ignored,
  no ``EXPLICIT_BATCH``. On TensorRT 8.x the builder flag named after ``EngineSpec.precision`` is
  set instead.
* Builder flags are set by name (``trt.BuilderFlag.SPARSE_WEIGHTS``); their integer values moved
  between releases. trtexec has no tactic-DRAM pool: ``tactic_dram_mb`` is applied here only.
* Sparse tactics need the weights as constants at build time: an elastic bundle's engines are built
  from ``trt.onnx`` after ``LevelWeights.bake`` wrote the build level's weights beside it.
* One *refittable* engine serves every unstructured level. REFIT_INDIVIDUAL (TensorRT >= 10) with
  only the prunable weights marked keeps TensorRT free to fold the rest; REFIT (every weight)
  otherwise. Never REFIT_IDENTICAL: it lets TensorRT optimize for the build level's weight values,
  which a level switch would break. 2:4 levels keep their own SPARSE_WEIGHTS engines (refit into a
  sparse tactic accepts only 2:4 weights).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..files import write_bytes
from .logger import make_logger, tail
from .probe import import_trt, start
from .sparsity import sparse_report
from .spec import EngineSpec, context_note, profile_shapes


def _host_bytes(obj) -> bytes:
    """bytes of a TensorRT IHostMemory (buffer protocol) or of bytes-like objects."""
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj)
    return bytes(memoryview(obj))


def _set_flag(trt, config, name: str) -> bool:
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:
        return False
    config.set_flag(flag)
    return True


def _network_inputs(network) -> dict[str, tuple]:
    out = {}
    for i in range(int(network.num_inputs)):
        t = network.get_input(i)
        try:
            shape = tuple(int(d) for d in t.shape)
        except TypeError:
            shape = ()
        out[t.name] = shape
    return out


def _check_inputs(spec: EngineSpec, network_inputs: dict[str, tuple], shapes: dict) -> set[str]:
    """Compare the graph's inputs with the profiles; returns the profile inputs the graph lacks
    (only position_ids may be absent). UserError for anything the profiles cannot serve."""
    first = next(iter(shapes.values()))
    wanted = {row[0]: row for row in first}
    extra = [n for n in network_inputs if n not in wanted]
    if extra:
        hint = (" (an elastic graph: export the baked mode for TensorRT)" if "sparsity_level" in extra
                else f" (does the KV layout {spec.kv} match the model?)")
        raise UserError(f"{spec.onnx} has inputs {', '.join(extra)} that the engine profiles do not cover{hint}")
    missing = {n for n in wanted if n not in network_inputs}
    if missing - {"position_ids"}:
        raise UserError(f"{spec.onnx} lacks inputs {', '.join(sorted(missing - {'position_ids'}))}: "
                        f"check the KV layout {spec.kv} against the model and re-export if needed")
    for name, shape in network_inputs.items():
        _, mn, op, mx = wanted[name]
        if shape and len(shape) != len(mn):
            raise UserError(f"{spec.onnx}: input {name} has rank {len(shape)}, the profiles give {len(mn)} dims")
        for k, d in enumerate(shape):
            if d >= 0 and not (mn[k] == op[k] == mx[k] == d):
                raise UserError(f"{spec.onnx}: input {name} dim {k} is fixed at {d} but the profiles ask "
                                f"{mn[k]}..{mx[k]}: check the KV layout {spec.kv} (kv_heads, head_dim) against the model")
    return missing


def _creation_flags(trt, precision: str = "fp16") -> tuple[int, bool]:
    """(create_network flags, strongly typed?). TensorRT 11 (no FP16 builder flag) has strongly typed
    networks only and ignores STRONGLY_TYPED (deprecated): no flag. TensorRT 10: STRONGLY_TYPED,
    except for int8: a Q/DQ graph around float32 ops is built weakly typed, the FP16 and INT8 flags
    letting TensorRT run the rest in fp16 (strongly typed, it would run fp32 there). TensorRT 8.x:
    EXPLICIT_BATCH, weakly typed."""
    creation = trt.NetworkDefinitionCreationFlag
    if not hasattr(trt.BuilderFlag, "FP16"):
        if precision == "int8":
            raise UserError(f"TensorRT {getattr(trt, '__version__', '?')} builds strongly typed networks only: INT8 "
                            "engines from a float32 Q/DQ graph need TensorRT 8.6-10.x (the Jetson Orin JetPacks)")
        return 0, True
    if hasattr(creation, "STRONGLY_TYPED") and precision != "int8":
        return 1 << int(creation.STRONGLY_TYPED), True
    if hasattr(creation, "EXPLICIT_BATCH"):
        return 1 << int(creation.EXPLICIT_BATCH), False
    return 0, False


def _parse_network(trt, builder, logger, onnx: Path, precision: str = "fp16"):
    """(network, parser, strongly typed?) for the ONNX graph; the parser must outlive the build
    (it owns the weights the network points at). RuntimeError with TensorRT's parse errors."""
    flags, strongly_typed = _creation_flags(trt, precision)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx)):
        errors = [_parser_error(parser.get_error(i)) for i in range(int(parser.num_errors))]
        detail = "; ".join(errors) if errors else tail(logger)
        raise RuntimeError(f"TensorRT {getattr(trt, '__version__', '?')} could not parse {onnx}: {detail}")
    return network, parser, strongly_typed


def _parser_error(err) -> str:
    """One line for a TensorRT ParserError (its ``desc()`` and ``node()``), or str() of anything else."""
    try:
        return f"node {int(err.node())}: {err.desc()}"
    except Exception:  # not a ParserError (a plain message)
        return str(err)


def _configure(trt, builder, spec: EngineSpec, strongly_typed: bool, log: Callable[[str], None]):
    """The builder config: memory pools, precision (TensorRT 8.x only), sparse weights, detailed
    profiling verbosity (so the inspector names each layer's tactic)."""
    version = getattr(trt, "__version__", "?")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.workspace_mb) << 20)
    if spec.tactic_dram_mb is not None:
        pool = getattr(trt.MemoryPoolType, "TACTIC_DRAM", None)
        if pool is None:
            log(f"TensorRT {version} has no TACTIC_DRAM memory pool: tactic_dram_mb={spec.tactic_dram_mb} ignored")
        else:
            config.set_memory_pool_limit(pool, int(spec.tactic_dram_mb) << 20)
    if not strongly_typed:  # TensorRT 8.x, or int8: weakly typed, precision by builder flag
        wanted = {"fp16": "FP16", "bf16": "BF16", "int8": "FP16"}.get(spec.precision.lower())
        if wanted and not _set_flag(trt, config, wanted):
            log(f"TensorRT {version} has no {wanted} builder flag: building in FP32")
        if spec.precision.lower() == "int8" and not _set_flag(trt, config, "INT8"):
            raise UserError(f"TensorRT {version} has no INT8 builder flag: it cannot build this int8 engine")
        if spec.sparse and not wanted:
            log("sparse tactics need FP16/BF16 (or INT8); with precision fp32 TensorRT keeps dense kernels")
    if spec.sparse and not _set_flag(trt, config, "SPARSE_WEIGHTS"):
        raise RuntimeError(f"TensorRT {version} has no SPARSE_WEIGHTS builder flag")
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    return config


def _enable_refit(trt, config, network, spec: EngineSpec, log: Callable[[str], None]) -> str:
    """Make the weights of a refit spec refittable; returns "individual" or "all".

    REFIT_INDIVIDUAL (TensorRT >= 10) with only ``spec.refit_weights`` marked (the weights that
    differ between its levels, by their ONNX initializer names, which the parser gives the
    network's weights): TensorRT may still fold and fuse everything else. Otherwise (8.x, or a name
    the network does not know) REFIT: every weight stays refittable. Never REFIT_IDENTICAL, which
    optimizes for the build level's values."""
    flags = trt.BuilderFlag
    mark = getattr(network, "mark_weights_refittable", None)
    if spec.refit_weights and mark is not None and hasattr(flags, "REFIT_INDIVIDUAL"):
        unknown = [w for w in spec.refit_weights if not mark(w)]
        if not unknown:
            config.set_flag(flags.REFIT_INDIVIDUAL)
            return "individual"
        log(f"{len(unknown)} of the {len(spec.refit_weights)} weights to refit are not weights of the parsed network "
            f"(first: {unknown[0]}): making every weight refittable instead (REFIT)")
    config.set_flag(flags.REFIT)
    return "all"


def _add_profiles(builder, config, shapes: dict, skip: set[str]) -> None:
    """One optimization profile per entry of ``shapes``, in order, without the inputs in ``skip``."""
    for rows in shapes.values():
        profile = builder.create_optimization_profile()
        for input_name, mn, op, mx in rows:
            if input_name not in skip:
                profile.set_shape(input_name, mn, op, mx)
        config.add_optimization_profile(profile)


def _attach_timing_cache(config, path: Path, log: Callable[[str], None]) -> None:
    """Load the per-target timing cache when it exists and fits this GPU/TensorRT, else start an empty one."""
    blob = path.read_bytes() if path.is_file() else b""
    if blob:
        try:
            cache = config.create_timing_cache(blob)
            if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False) is not False:
                return
        except Exception:
            pass
        log(f"timing cache {path} was made by another GPU, CUDA or TensorRT: starting a fresh one")
    cache = config.create_timing_cache(b"")
    if cache is None or config.set_timing_cache(cache, ignore_mismatch=False) is False:
        raise RuntimeError("TensorRT could not create an empty timing cache")


def _build_plan(trt, builder, network, config, logger, spec: EngineSpec) -> tuple[bytes, float]:
    """(serialized engine, build seconds); RuntimeError with TensorRT's last messages on failure."""
    version = getattr(trt, "__version__", "?")
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    if plan is None:
        raise RuntimeError(f"TensorRT {version} failed to build the engine for {spec.label}: {tail(logger)}")
    data = _host_bytes(plan)
    if not data:
        raise RuntimeError(f"TensorRT {version} built an empty engine for {spec.label}: {tail(logger)}")
    return data, build_s


def _inspect(trt, logger, data: bytes, spec: EngineSpec) -> str:
    """The engine inspector's JSON for the plan ``data`` (RuntimeError when the plan does not load)."""
    engine = start(trt, "Runtime", logger).deserialize_cuda_engine(data)
    if engine is None:
        raise RuntimeError(f"TensorRT {getattr(trt, '__version__', '?')} cannot load the engine it just built "
                           f"for {spec.label}: {tail(logger)}")
    inspector = engine.create_engine_inspector()
    return inspector.get_engine_information(trt.LayerInformationFormat.JSON) or ""


def build_engine(spec: EngineSpec, log: Callable[[str], None] = print, levels=None) -> dict:
    """Build the engine for ``spec`` with TensorRT's Python API; write the plan, the timing cache and
    the inspector JSON atomically. Returns {"engine", "bytes", "build_s", "tensorrt", "levels",
    "build_level", "weights", "refittable" (None, "individual" or "all"), "sparse_report"}.

    An elastic bundle's spec (``spec.source``) takes its build level's weights from ``levels`` (a
    ``weights.LevelWeights``; opened here when not given), written beside the graph first.

    UserError for what the user can fix (no TensorRT or no GPU for it, missing ONNX, profiles that
    do not fit the graph); RuntimeError when TensorRT fails (parse errors, a failed build), with
    its messages.
    """
    trt = import_trt()
    onnx = Path(spec.onnx)
    if spec.source is not None:
        from .weights import LevelWeights

        levels = levels if levels is not None else LevelWeights(spec.source)
        log(f"writing the weights of level {spec.build_level} from the weight builder")
        levels.bake(spec.build_level)
    if not onnx.is_file():
        raise UserError(f"ONNX graph {onnx} is missing: export the level first (epts-export export / bundle)")
    shapes = profile_shapes(spec)
    version = getattr(trt, "__version__", "?")

    logger = make_logger(trt, log, keep_lines=True)
    builder = start(trt, "Builder", logger)
    network, parser, strongly_typed = _parse_network(trt, builder, logger, onnx, spec.precision)
    skip = _check_inputs(spec, _network_inputs(network), shapes)
    config = _configure(trt, builder, spec, strongly_typed, log)
    refittable = _enable_refit(trt, config, network, spec, log) if spec.refit else None
    _add_profiles(builder, config, shapes, skip)
    cache_path = Path(spec.timing_cache)
    _attach_timing_cache(config, cache_path, log)

    if context_note(spec):
        log(context_note(spec))
    how = (" with sparse weights" if spec.sparse else
           f", refittable ({'the prunable weights' if refittable == 'individual' else 'every weight'})" if refittable else "")
    log(f"building the TensorRT {version} engine for {spec.label}{how} ({', '.join(shapes)} profiles)")
    data, build_s = _build_plan(trt, builder, network, config, logger, spec)
    write_bytes(Path(spec.engine), data, fsync=True)
    write_bytes(cache_path, _host_bytes(config.get_timing_cache().serialize()), fsync=True)
    # free the builder's memory before loading the plan (Jetson memory is shared with the CPU)
    del parser, network, config, builder

    layer_json = _inspect(trt, logger, data, spec)
    write_bytes(Path(spec.layer_info), layer_json.encode("utf-8"), fsync=True)
    report = sparse_report(layer_json, list(getattr(logger, "lines", [])))
    return {"engine": str(spec.engine), "bytes": len(data), "build_s": round(build_s, 3), "tensorrt": version,
            "levels": list(spec.levels), "build_level": spec.build_level, "weights": spec.weights, "refittable": refittable,
            "sparse_report": report}
