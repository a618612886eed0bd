"""TensorRT engines for the exported ONNX decoders: profiles, the trtexec command, the Python-API
builder, the sparse-tactic report and the scripts that rebuild engines on the device.

Nothing here imports ``tensorrt`` (or ``torch``) at module level: the module loads on a machine
without TensorRT, and a copy of it travels with each bundle (``_trt_engine.py``) so that
``build_engines.py`` runs on a Jetson that has TensorRT's Python bindings but not epts-export.

Facts this code relies on (sources in the notes of the project, shared/docs/tensorrt-notes.md):

* Engines are not portable across GPUs, TensorRT versions or JetPack releases, and there is no
  x86 -> Jetson cross build: Jetson engines are built on the device.
* TensorRT >= 10 builds *strongly typed* networks (precision comes from the ONNX dtypes; TensorRT
  11 has no other mode and no FP16/BF16 builder flags). On TensorRT 8.x the builder flag named
  after ``EngineSpec.precision`` is set instead.
* Builder flags are set by name (``trt.BuilderFlag.SPARSE_WEIGHTS``); their integer values moved
  between releases. trtexec's ``--sparsity=force`` overwrites weights and is never used.
* trtexec builds several optimization profiles in one engine with ``--profile=N`` followed by that
  profile's ``--minShapes/--optShapes/--maxShapes`` (shapes given outside a ``--profile`` are then
  an error, so every profile gets its own ``--profile=N``). Older trtexec releases without
  ``--profile`` cannot express two profiles: ``build_engines.sh`` checks ``trtexec --help`` and
  points to ``build_engines.py`` (Python API, any TensorRT >= 8.5) instead.
* trtexec's ``--memPoolSize`` knows ``workspace``, ``dlaSRAM``, ``dlaLocalDRAM``, ``dlaGlobalDRAM``
  and ``tacticSharedMem`` (an unknown pool name is an error); it has no tactic-DRAM pool, so
  ``tactic_dram_mb`` is applied by the Python builder only (``MemoryPoolType.TACTIC_DRAM``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

try:
    from ..errors import UserError
except ImportError:  # pragma: no cover - the standalone copy inside a bundle (_trt_engine.py)
    class UserError(Exception):  # type: ignore[no-redef]
        def __init__(self, message: str, exit_code: int = 1):
            super().__init__(message)
            self.exit_code = exit_code

INSTALL_HINT = "pip install 'epts-export[tensorrt]' (NVIDIA's index)"
NOT_INSTALLED = f"tensorrt is not installed: {INSTALL_HINT}; on Jetson it ships with JetPack (python3-libnvinfer)"
NO_GPU = "no CUDA GPU visible"
JETPACK_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"
ENGINES_JSON = "engines.json"
VENDORED_MODULE = "_trt_engine.py"
ENGINES_FORMAT = "epts-trt-engines"
ENGINES_VERSION = 1

ELIGIBLE_RE = re.compile(r"layers eligible for sparse math\s*:?(.*)$", re.IGNORECASE)
PICKED_RE = re.compile(r"picked sparse implementation for layers\s*:?(.*)$", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# specs


@dataclass(frozen=True)
class ShapeRange:
    """One optimization profile: (min, opt, max) of batch, new tokens (seq) and cached tokens (past)."""

    name: str  # "prefill" | "decode"
    batch: tuple[int, int, int]
    seq: tuple[int, int, int]
    past: tuple[int, int, int]


@dataclass(frozen=True)
class KVLayout:
    layers: int
    kv_heads: int
    head_dim: int


@dataclass
class EngineSpec:
    onnx: Path  # model.onnx (external data model.onnx_data may sit beside it)
    engine: Path  # where to write the .engine (plan) file
    level: str  # "0.5", "2:4"
    sparse: bool  # set SPARSE_WEIGHTS
    precision: str  # "fp16" | "bf16" | "fp32": informational for strongly typed networks
    profiles: list[ShapeRange]
    kv: KVLayout
    workspace_mb: int
    tactic_dram_mb: int | None
    timing_cache: Path  # persistent per target: loaded if it exists, saved back after the build
    layer_info: Path  # where the engine inspector JSON goes


def _triple(value, what: str) -> tuple[int, int, int]:
    try:
        t = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be three integers [min, opt, max], got {value!r}") from None
    if len(t) != 3:
        raise UserError(f"{what} must be three integers [min, opt, max], got {value!r}")
    return t  # type: ignore[return-value]


def _check_range(t: tuple[int, int, int], what: str, low: int) -> None:
    if not (low <= t[0] <= t[1] <= t[2]):
        raise UserError(f"{what} = {list(t)} is not a valid range: it needs {low} <= min <= opt <= max")


def input_names(kv: KVLayout) -> list[str]:
    """Graph inputs of an exported decoder, in graph order (as onnx_export.io_names, baked mode)."""
    past = [f"past_key_values.{i}.{kind}" for i in range(kv.layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past]


def profile_shapes(spec: EngineSpec) -> dict[str, list[tuple[str, tuple, tuple, tuple]]]:
    """profile name -> [(input name, min shape, opt shape, max shape)] for every graph input.

    ``input_ids``/``position_ids`` are (batch, seq), ``attention_mask`` is (batch, past + seq) and each
    ``past_key_values.{i}.key|value`` is (batch, kv_heads, past, head_dim). Pure; raises UserError for
    ranges TensorRT would reject (min > opt, seq < 1, past < 0, duplicate profile names).
    """
    if not spec.profiles:
        raise UserError(f"engine for level {spec.level} has no optimization profiles: give at least one (prefill, decode)")
    kv = spec.kv
    if kv.layers < 1 or kv.kv_heads < 1 or kv.head_dim < 1:
        raise UserError(f"KV layout {kv} is invalid: layers, kv_heads and head_dim must be positive")
    out: dict[str, list[tuple[str, tuple, tuple, tuple]]] = {}
    for p in spec.profiles:
        if p.name in out:
            raise UserError(f"optimization profile {p.name!r} is given twice: profile names must be unique")
        batch = _triple(p.batch, f"profile {p.name} batch")
        seq = _triple(p.seq, f"profile {p.name} seq")
        past = _triple(p.past, f"profile {p.name} past")
        _check_range(batch, f"profile {p.name} batch", 1)
        _check_range(seq, f"profile {p.name} seq", 1)
        _check_range(past, f"profile {p.name} past", 0)
        total = tuple(past[k] + seq[k] for k in range(3))
        rows = [
            ("input_ids", *((batch[k], seq[k]) for k in range(3))),
            ("attention_mask", *((batch[k], total[k]) for k in range(3))),
            ("position_ids", *((batch[k], seq[k]) for k in range(3))),
        ]
        for name in input_names(kv)[3:]:
            rows.append((name, *((batch[k], kv.kv_heads, past[k], kv.head_dim) for k in range(3))))
        out[p.name] = rows
    return out


# --------------------------------------------------------------------------------------------
# status


def tensorrt_status() -> tuple[bool, str]:
    """(True, "TensorRT X.Y.Z, <GPU> (sm_XY)") when TensorRT imports and a CUDA GPU is visible, else (False, why)."""
    try:
        import tensorrt as trt
    except ModuleNotFoundError as e:
        if e.name in (None, "tensorrt"):
            return False, NOT_INSTALLED
        return False, f"tensorrt is installed but incomplete (no module {e.name}): reinstall it with {INSTALL_HINT}"
    except Exception as e:  # a broken install: wheel without its libnvinfer, wrong CUDA, ...
        return False, f"tensorrt is installed but does not load ({type(e).__name__}: {e}): reinstall it with {INSTALL_HINT}"
    version = getattr(trt, "__version__", "?")
    try:
        import torch
    except Exception:
        torch = None
    if torch is not None:
        try:
            if torch.cuda.is_available():
                name = torch.cuda.get_device_name(0)
                major, minor = torch.cuda.get_device_capability(0)
                return True, f"TensorRT {version}, {name} (sm_{major}{minor})"
            if getattr(getattr(torch, "version", None), "cuda", None):
                return False, f"{NO_GPU} (torch {getattr(torch, '__version__', '?')} with CUDA sees no device)"
        except Exception:
            pass  # fall through to TensorRT's own probe
    # no torch, or a CPU-only torch: ask TensorRT itself (a builder needs a CUDA device)
    try:
        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger)
        if builder is None:
            return False, f"{NO_GPU} (TensorRT could not create a builder)"
    except Exception as e:
        return False, f"{NO_GPU} (TensorRT could not create a builder: {e})"
    return True, f"TensorRT {version}, CUDA GPU (install torch to see its name and compute capability)"


def _import_trt():
    try:
        import tensorrt as trt
    except ModuleNotFoundError as e:
        if e.name in (None, "tensorrt"):
            raise UserError(NOT_INSTALLED) from None
        raise UserError(f"tensorrt is installed but incomplete (no module {e.name}): reinstall it with {INSTALL_HINT}") from None
    except Exception as e:
        raise UserError(f"tensorrt does not load ({type(e).__name__}: {e}): reinstall it with {INSTALL_HINT}") from None
    return trt


# --------------------------------------------------------------------------------------------
# trtexec


def _shape_str(dims) -> str:
    return "x".join(str(int(d)) for d in dims)


def _shapes_arg(rows, which: int) -> str:
    return ",".join(f"{row[0]}:{_shape_str(row[which])}" for row in rows)


def _path_arg(p: Path, root: Path | None) -> str:
    if root is None:
        return str(p)
    return _relative(p, root)


def trtexec_command(spec: EngineSpec, root: Path | None = None, trtexec: str = "trtexec") -> list[str]:
    """The trtexec argv that builds ``spec`` (paths relative to ``root`` when given).

    One command builds all profiles: ``--profile=N`` then that profile's min/opt/max shapes, for
    each profile in order (a single profile needs no ``--profile``). ``--stronglyTyped`` (TensorRT
    >= 10) takes precision from the ONNX dtypes, so no ``--fp16``. ``--sparsity=enable`` only for
    sparse specs (never ``force``: it overwrites the weights). ``--memPoolSize`` sizes are MiB with an
    explicit ``M``; trtexec has no tactic-DRAM pool, so ``tactic_dram_mb`` is left to the Python
    builder. ``--skipInference`` stops after the build (layer info is still exported).
    """
    shapes = profile_shapes(spec)
    argv = [trtexec, f"--onnx={_path_arg(spec.onnx, root)}", f"--saveEngine={_path_arg(spec.engine, root)}",
            "--stronglyTyped"]
    many = len(shapes) > 1
    for index, rows in enumerate(shapes.values()):
        if many:
            argv.append(f"--profile={index}")
        argv += [f"--minShapes={_shapes_arg(rows, 1)}", f"--optShapes={_shapes_arg(rows, 2)}",
                 f"--maxShapes={_shapes_arg(rows, 3)}"]
    if spec.sparse:
        argv.append("--sparsity=enable")
    argv += [f"--memPoolSize=workspace:{int(spec.workspace_mb)}M",
             f"--timingCacheFile={_path_arg(spec.timing_cache, root)}",
             "--profilingVerbosity=detailed",
             f"--exportLayerInfo={_path_arg(spec.layer_info, root)}",
             "--skipInference"]
    return argv


# --------------------------------------------------------------------------------------------
# sparse report


def _dedupe(names) -> list[str]:
    seen, out = set(), []
    for n in names:
        if n and n not in seen:
            seen.add(n)
            out.append(n)
    return out


def _split_names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _truthy(v) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return v != 0
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on", "enabled")
    return False


def _layer_name(entry: dict) -> str | None:
    for key in ("Name", "name", "LayerName", "layerName", "layer_name"):
        if isinstance(entry.get(key), str):
            return entry[key]
    return None


def _walk(obj, on_item) -> None:
    """Call on_item(key, value) for every key below obj (dicts and lists, any depth)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            on_item(str(k), v)
            _walk(v, on_item)
    elif isinstance(obj, list):
        for v in obj:
            _walk(v, on_item)


def _inspect_layer(entry: dict) -> tuple[bool, bool]:
    """(has sparse weights, runs a sparse tactic) for one inspector layer entry."""
    flags = {"weights": False, "tactic": False}

    def on_item(key: str, value) -> None:
        k = key.lower()
        if "tactic" in k:
            if isinstance(value, str) and "sparse" in value.lower():
                flags["tactic"] = True
        elif "sparse" in k and not isinstance(value, (dict, list)) and _truthy(value):
            flags["weights"] = True

    _walk(entry, on_item)
    return flags["weights"], flags["tactic"]


def _inspector_layers(layer_info_json: str) -> list | None:
    """The layer list of an engine inspector JSON (None when it is empty or not JSON)."""
    if not layer_info_json or not layer_info_json.strip():
        return None
    try:
        doc = json.loads(layer_info_json)
    except ValueError:
        return None
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key.lower() == "layers" and isinstance(value, list):
                return value
        return []
    return None


def sparse_report(layer_info_json: str, log_lines: list[str]) -> dict:
    """Which layers could use sparse math and which got a sparse kernel.

    Sources: the builder log lines ``(Sparsity) Layers eligible for sparse math: a, b`` and
    ``(Sparsity) TRT inference plan picked sparse implementation for layers: b``; and the engine
    inspector JSON ({"Layers": [...]}): a layer entry with a truthy key containing "sparse" (e.g.
    ``HasSparseWeights``) has 2:4 weights (eligible), a tactic name containing "sparse" means a sparse
    kernel was picked. With ``LAYER_NAMES_ONLY`` verbosity the layers are bare strings and only the
    log tells. Eligible is not picked: TensorRT keeps dense kernels where they are faster.
    Returns {"eligible": [...], "picked": [...], "layers": n, "source": "inspector+log" | "inspector" | "log" | "none"}.
    """
    eligible, picked = [], []
    saw_log = False
    for line in log_lines or []:
        text = str(line)
        m = ELIGIBLE_RE.search(text)
        if m:
            saw_log = True
            eligible += _split_names(m.group(1))
            continue
        m = PICKED_RE.search(text)
        if m:
            saw_log = True
            picked += _split_names(m.group(1))
    layers = _inspector_layers(layer_info_json)
    detailed = False
    for entry in layers or []:
        if not isinstance(entry, dict):
            continue
        name = _layer_name(entry)
        if name is None:
            continue
        detailed = True
        has_weights, sparse_tactic = _inspect_layer(entry)
        if has_weights or sparse_tactic:
            eligible.append(name)
        if sparse_tactic:
            picked.append(name)
    picked = _dedupe(picked)
    eligible = _dedupe(eligible + picked)  # a layer that runs a sparse kernel was eligible
    used_inspector = layers is not None and (detailed or len(layers) > 0)
    source = ("inspector+log" if used_inspector and saw_log else "inspector" if used_inspector
              else "log" if saw_log else "none")
    return {"eligible": eligible, "picked": picked, "layers": len(layers or []), "source": source}


# --------------------------------------------------------------------------------------------
# files


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary sibling and os.replace: a reader never sees half a file, a failure leaves none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise


def _host_bytes(obj) -> bytes:
    """bytes of a TensorRT IHostMemory (buffer protocol) or of bytes-like objects."""
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj)
    return bytes(memoryview(obj))


# --------------------------------------------------------------------------------------------
# the Python-API builder


_SEVERITY_RANK = {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4}


def _severity_rank(severity) -> int:
    name = getattr(severity, "name", None)
    if isinstance(name, str) and name.upper() in _SEVERITY_RANK:
        return _SEVERITY_RANK[name.upper()]
    try:
        return int(severity)
    except (TypeError, ValueError):
        text = str(severity).rsplit(".", 1)[-1].upper()
        return _SEVERITY_RANK.get(text, 3)


def _capture_logger(trt, log: Callable[[str], None]):
    """A trt.ILogger that keeps INFO-and-above lines (and every "(Sparsity)" line), a tail for errors,
    and forwards warnings, errors and sparsity lines to ``log``."""
    base = getattr(trt, "ILogger", None)
    if base is None:  # pragma: no cover - every TensorRT 8+ has ILogger
        logger = trt.Logger(trt.Logger.WARNING)
        logger.lines, logger.tail = [], deque(maxlen=200)
        return logger

    class CaptureLogger(base):  # type: ignore[misc, valid-type]
        def __init__(self):
            base.__init__(self)
            self.lines: list[str] = []
            self.tail: deque[str] = deque(maxlen=200)

        def log(self, severity, msg):  # called by TensorRT, possibly from its threads
            text = str(msg)
            rank = _severity_rank(severity)
            sparsity = "(Sparsity)" in text
            if rank <= 3 or sparsity:
                self.lines.append(text)
                self.tail.append(text)
            if rank <= 2 or sparsity:
                try:
                    log(f"[TensorRT] {text}")
                except Exception:
                    pass

    return CaptureLogger()


def _set_flag(trt, config, name: str) -> bool:
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:
        return False
    config.set_flag(flag)
    return True


def _tail(logger, n: int = 20) -> str:
    lines = list(getattr(logger, "tail", []))[-n:]
    return " | ".join(lines) if lines else "(TensorRT logged nothing)"


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


def build_engine(spec: EngineSpec, log: Callable[[str], None] = print) -> dict:
    """Build the engine for ``spec`` with TensorRT's Python API; write the plan, the timing cache and
    the inspector JSON atomically. Returns {"engine", "bytes", "build_s", "tensorrt", "sparse_report"}.

    UserError for what the user can fix (no TensorRT, missing ONNX, profiles that do not fit the
    graph); RuntimeError when TensorRT fails (parse errors, a failed build), with its messages.
    """
    trt = _import_trt()
    onnx = Path(spec.onnx)
    if not onnx.is_file():
        raise UserError(f"ONNX graph {onnx} is missing: export the level first (epts-export export / bundle)")
    shapes = profile_shapes(spec)
    version = getattr(trt, "__version__", "?")

    logger = _capture_logger(trt, log)
    builder = trt.Builder(logger)
    if builder is None:
        raise UserError(f"TensorRT {version} could not create a builder: {NO_GPU}")

    # network: strongly typed where TensorRT has it (>= 10; mandatory in 11), else explicit batch
    creation = trt.NetworkDefinitionCreationFlag
    strongly_typed = hasattr(creation, "STRONGLY_TYPED")
    flags = 0
    if strongly_typed:
        flags |= 1 << int(creation.STRONGLY_TYPED)
    elif hasattr(creation, "EXPLICIT_BATCH"):
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    network = builder.create_network(flags)

    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx)):
        errors = [str(parser.get_error(i)) for i in range(int(parser.num_errors))]
        detail = "; ".join(errors) if errors else _tail(logger)
        raise RuntimeError(f"TensorRT {version} could not parse {onnx}: {detail}")
    skip = _check_inputs(spec, _network_inputs(network), shapes)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.workspace_mb) << 20)
    if spec.tactic_dram_mb is not None:
        pool = getattr(trt.MemoryPoolType, "TACTIC_DRAM", None)
        if pool is None:
            log(f"TensorRT {version} has no TACTIC_DRAM memory pool: tactic_dram_mb={spec.tactic_dram_mb} ignored")
        else:
            config.set_memory_pool_limit(pool, int(spec.tactic_dram_mb) << 20)
    if not strongly_typed:  # TensorRT 8.x: weakly typed, precision by builder flag
        wanted = {"fp16": "FP16", "bf16": "BF16"}.get(spec.precision.lower())
        if wanted and not _set_flag(trt, config, wanted):
            log(f"TensorRT {version} has no {wanted} builder flag: building in FP32")
        if spec.sparse and not wanted:
            log("sparse tactics need FP16/BF16 (or INT8); with precision fp32 TensorRT keeps dense kernels")
    if spec.sparse and not _set_flag(trt, config, "SPARSE_WEIGHTS"):
        raise RuntimeError(f"TensorRT {version} has no SPARSE_WEIGHTS builder flag")
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED

    for name, rows in shapes.items():
        profile = builder.create_optimization_profile()
        for input_name, mn, op, mx in rows:
            if input_name not in skip:
                profile.set_shape(input_name, mn, op, mx)
        config.add_optimization_profile(profile)

    cache_path = Path(spec.timing_cache)
    _attach_timing_cache(config, cache_path, log)

    log(f"building the TensorRT {version} engine for level {spec.level}"
        f"{' with sparse weights' if spec.sparse else ''} ({', '.join(shapes)} profiles)")
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    if plan is None:
        raise RuntimeError(f"TensorRT {version} failed to build the engine for level {spec.level}: {_tail(logger)}")
    data = _host_bytes(plan)
    if not data:
        raise RuntimeError(f"TensorRT {version} built an empty engine for level {spec.level}: {_tail(logger)}")

    _atomic_write(Path(spec.engine), data)
    _atomic_write(cache_path, _host_bytes(config.get_timing_cache().serialize()))
    # free the builder's memory before loading the plan (Jetson memory is shared with the CPU)
    del plan, parser, network, config, builder

    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise RuntimeError(f"TensorRT {version} cannot load the engine it just built for level {spec.level}: {_tail(logger)}")
    inspector = engine.create_engine_inspector()
    layer_json = inspector.get_engine_information(trt.LayerInformationFormat.JSON) or ""
    _atomic_write(Path(spec.layer_info), layer_json.encode("utf-8"))

    report = sparse_report(layer_json, list(getattr(logger, "lines", [])))
    return {"engine": str(spec.engine), "bytes": len(data), "build_s": round(build_s, 3),
            "tensorrt": version, "sparse_report": report}


# --------------------------------------------------------------------------------------------
# engines.json and the build scripts


def _relative(p: Path, root: Path) -> str:
    """``p`` (absolute, or relative to the current folder) as a posix path relative to ``root``."""
    p, root = Path(p), Path(root)
    try:
        return p.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise UserError(f"{p} is outside the bundle {root}: engine files must live inside it so the bundle can move") from None


def spec_to_dict(spec: EngineSpec, root: Path) -> dict:
    """JSON-ready dict of ``spec`` with paths relative to ``root`` (the bundle folder)."""
    return {
        "level": spec.level, "sparse": bool(spec.sparse), "precision": spec.precision,
        "onnx": _relative(spec.onnx, root), "engine": _relative(spec.engine, root),
        "timing_cache": _relative(spec.timing_cache, root), "layer_info": _relative(spec.layer_info, root),
        "profiles": [{"name": p.name, "batch": list(p.batch), "seq": list(p.seq), "past": list(p.past)}
                     for p in spec.profiles],
        "kv": {"layers": spec.kv.layers, "kv_heads": spec.kv.kv_heads, "head_dim": spec.kv.head_dim},
        "workspace_mb": int(spec.workspace_mb),
        "tactic_dram_mb": None if spec.tactic_dram_mb is None else int(spec.tactic_dram_mb),
    }


def spec_from_dict(d: dict, root: Path) -> EngineSpec:
    """Inverse of spec_to_dict: relative paths are resolved against ``root``."""
    root = Path(root)
    try:
        def path(key: str) -> Path:
            rel = Path(d[key])
            if rel.is_absolute() or ".." in rel.parts:
                raise UserError(f"{ENGINES_JSON}: {key} {d[key]!r} must be a path inside the bundle")
            return root / rel

        return EngineSpec(
            onnx=path("onnx"), engine=path("engine"), level=str(d["level"]), sparse=bool(d["sparse"]),
            precision=str(d.get("precision", "fp16")),
            profiles=[ShapeRange(str(p["name"]), _triple(p["batch"], "batch"), _triple(p["seq"], "seq"),
                                 _triple(p["past"], "past")) for p in d["profiles"]],
            kv=KVLayout(int(d["kv"]["layers"]), int(d["kv"]["kv_heads"]), int(d["kv"]["head_dim"])),
            workspace_mb=int(d["workspace_mb"]),
            tactic_dram_mb=None if d.get("tactic_dram_mb") is None else int(d["tactic_dram_mb"]),
            timing_cache=path("timing_cache"), layer_info=path("layer_info"))
    except (KeyError, TypeError) as e:
        raise UserError(f"{ENGINES_JSON} is malformed ({type(e).__name__}: {e}): regenerate the bundle") from None


def load_specs(bundle: Path) -> list[EngineSpec]:
    path = Path(bundle) / ENGINES_JSON
    if not path.is_file():
        raise UserError(f"{path} is missing: pass a bundle folder made by epts-export (it holds {ENGINES_JSON})")
    try:
        doc = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}): regenerate the bundle") from None
    if not isinstance(doc, dict) or doc.get("format") != ENGINES_FORMAT:
        raise UserError(f"{path} is not an epts-export engine list: regenerate the bundle")
    if int(doc.get("version", 0)) > ENGINES_VERSION:
        raise UserError(f"{path} has version {doc.get('version')}, this code reads {ENGINES_VERSION}: update epts-export")
    return [spec_from_dict(d, bundle) for d in doc.get("engines", [])]


def _sh(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


_SH_HEADER = """#!/usr/bin/env bash
# Build the TensorRT engines of this bundle with trtexec (generated by epts-export).
#
# Engines are tied to the GPU, the TensorRT version and (on Jetson) the JetPack release that
# built them, and there is no cross-building for Jetson: engines for a Jetson MUST be built on
# the device itself. Copy the whole bundle there and run:  bash build_engines.sh
# Paths are relative to this folder, so the bundle can be moved.
# Without a recent trtexec (one with --profile), run  python3 build_engines.py  instead
# (TensorRT's Python API; it also applies the tactic-DRAM cap that trtexec cannot set).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

TRTEXEC="${TRTEXEC:-}"
if [ -z "$TRTEXEC" ]; then
  if command -v trtexec >/dev/null 2>&1; then
    TRTEXEC="$(command -v trtexec)"
  elif [ -x __JETPACK__ ]; then
    TRTEXEC=__JETPACK__
  else
    echo "trtexec not found. On Jetson it ships with JetPack as __JETPACK__" >&2
    echo "(sudo apt install tensorrt); elsewhere it is in NVIDIA's TensorRT tar/deb packages" >&2
    echo "or the NGC TensorRT container. Or set TRTEXEC=/path/to/trtexec, or run: python3 build_engines.py" >&2
    exit 1
  fi
fi
help_text="$("$TRTEXEC" --help 2>&1 || true)"
if ! grep -Eq -- '--profile([= ]|$)' <<<"$help_text" || ! grep -q -- '--stronglyTyped' <<<"$help_text"; then
  echo "$TRTEXEC lacks --profile/--stronglyTyped (TensorRT 10+), needed for the prefill and decode profiles." >&2
  echo "Run  python3 build_engines.py  instead (TensorRT's Python API)." >&2
  exit 1
fi
"""

_PY_SCRIPT = '''#!/usr/bin/env python3
"""Build the TensorRT engines of this bundle with TensorRT's Python API (generated by epts-export).

Engines are tied to the GPU, the TensorRT version and the JetPack release that built them; Jetson
engines must be built on the device itself. Reads engines.json next to this file.

    python3 build_engines.py                 # every level
    python3 build_engines.py --level 2:4     # one level

Uses epts_export.trt_engine when epts-export is installed, else the copy shipped beside this file
(_trt_engine.py), which needs only TensorRT's Python bindings (JetPack: python3-libnvinfer).
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _module():
    try:
        from epts_export import trt_engine
        trt_engine.main  # noqa: B018 - an old epts-export without it falls back to the copy
        return trt_engine
    except (ImportError, AttributeError):
        sys.path.insert(0, str(HERE))
        import _trt_engine
        return _trt_engine


if __name__ == "__main__":
    sys.exit(_module().main(["build", str(HERE), *sys.argv[1:]]))
'''


def write_build_script(specs: list[EngineSpec], out_dir: Path, *, trtexec_var: str = "$TRTEXEC") -> tuple[Path, Path]:
    """Write ``build_engines.sh`` (trtexec, one command per level), ``build_engines.py`` (Python API),
    ``engines.json`` (the specs, paths relative to ``out_dir``) and ``_trt_engine.py`` (a copy of this
    module for devices without epts-export) into ``out_dir``. Returns (sh path, py path).
    Every path in the specs must lie inside ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"format": ENGINES_FORMAT, "version": ENGINES_VERSION,
           "engines": [spec_to_dict(s, out_dir) for s in specs]}
    (out_dir / ENGINES_JSON).write_text(json.dumps(doc, indent=2) + "\n")

    parts = [_SH_HEADER.replace("__JETPACK__", JETPACK_TRTEXEC)]
    for s in specs:
        argv = trtexec_command(s, root=out_dir, trtexec="trtexec")
        engine_rel = _relative(s.engine, out_dir)
        log_rel = engine_rel + ".log"
        dirs = sorted({os.path.dirname(_relative(p, out_dir)) or "." for p in (s.engine, s.layer_info, s.timing_cache)})
        kind = "sparse weights, sparse tactics enabled" if s.sparse else "dense"
        parts.append(f"\necho {_sh(f'== level {s.level}: {kind} -> {engine_rel}')}\n")
        parts.append("mkdir -p " + " ".join(_sh(d) for d in dirs) + "\n")
        if s.tactic_dram_mb is not None:
            parts.append(f"# tactic_dram_mb={s.tactic_dram_mb}: trtexec has no such pool; build_engines.py applies it\n")
        cmd = " \\\n  ".join([f'"{trtexec_var}"'] + [_sh(a) for a in argv[1:]])
        parts.append(f"{cmd} \\\n  2>&1 | tee {_sh(log_rel)}\n")
        if s.sparse:
            parts.append(f"grep -F '(Sparsity)' {_sh(log_rel)} || echo "
                         f"{_sh('  no (Sparsity) lines in the log: no layer was eligible for sparse math')}\n")
    parts.append('\necho "engines built; layer info (HasSparseWeights, TacticName) is in the *.layers.json files"\n')
    sh = out_dir / "build_engines.sh"
    sh.write_text("".join(parts))
    py = out_dir / "build_engines.py"
    py.write_text(_PY_SCRIPT)
    (out_dir / VENDORED_MODULE).write_text(Path(__file__).read_text())
    for p in (sh, py):
        p.chmod(p.stat().st_mode | 0o111)
    return sh, py


# --------------------------------------------------------------------------------------------
# command line: python -m epts_export.trt_engine build <bundle> | report <layers.json> | status


def _print_report(level: str, result: dict, out) -> None:
    r = result["sparse_report"]
    print(f"level {level}: {result['engine']} ({result['bytes'] / 2**20:.1f} MiB, {result['build_s']:.1f} s, "
          f"TensorRT {result['tensorrt']})", file=out)
    print(f"  sparse: {len(r['picked'])} layer(s) picked a sparse kernel of {len(r['eligible'])} eligible, "
          f"{r['layers']} engine layers (source: {r['source']})", file=out)
    for name in r["picked"]:
        print(f"    sparse kernel: {name}", file=out)


def build_record_path(engine: Path) -> Path:
    """engines/level-2of4.engine -> engines/level-2of4.build.json (written after an on-device build)."""
    return Path(engine).with_suffix(".build.json")


def _compute_capability() -> str | None:
    try:
        import torch

        return "%d.%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    except ImportError:  # build_engines.py runs with TensorRT's bindings only
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m epts_export.trt_engine",
                                 description="Build and inspect TensorRT engines of an epts-export bundle.")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build every engine listed in <bundle>/engines.json")
    b.add_argument("bundle", type=Path)
    b.add_argument("--level", action="append", default=None, help="only this level (repeatable)")
    r = sub.add_parser("report", help="sparse report from an inspector JSON and/or a build log")
    r.add_argument("layer_info", type=Path, nargs="?")
    r.add_argument("--log", type=Path, default=None, help="a trtexec or TensorRT build log")
    sub.add_parser("status", help="is TensorRT usable here?")
    args = ap.parse_args(argv)
    try:
        if args.command == "status":
            ok, why = tensorrt_status()
            print(why)
            return 0 if ok else 1
        if args.command == "report":
            text = args.layer_info.read_text() if args.layer_info else ""
            lines = args.log.read_text(errors="replace").splitlines() if args.log else []
            print(json.dumps(sparse_report(text, lines), indent=2))
            return 0
        specs = load_specs(args.bundle)
        if args.level:
            unknown = set(args.level) - {s.level for s in specs}
            if unknown:
                raise UserError(f"no engine for level(s) {', '.join(sorted(unknown))} in {args.bundle / ENGINES_JSON}: "
                                f"choose from {', '.join(s.level for s in specs)}")
            specs = [s for s in specs if s.level in args.level]
        ok, why = tensorrt_status()
        if not ok:
            raise UserError(f"cannot build engines here: {why}")
        print(why)
        for s in specs:
            result = build_engine(s)
            _print_report(s.level, result, sys.stdout)
            # what verify and run check on the device: the TensorRT and GPU this engine is for
            record = {**result, "engine": Path(s.engine).name, "compute_capability": _compute_capability()}
            _atomic_write(build_record_path(s.engine), (json.dumps(record, indent=2) + "\n").encode())
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
