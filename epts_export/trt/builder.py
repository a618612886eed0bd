"""The device-side TensorRT engine builder: it ships in bundles and needs only TensorRT's bindings.

Engine specs (``EngineSpec``, read from a bundle's ``engines.json``), the TensorRT import and
status probe, the one TensorRT logger, the Python-API builder and the ``python -m
epts_export.trt.builder build|report|status`` command line that a bundle's ``build_engines.py``
calls. The host side (trtexec commands, ``build_engines.sh``/``.py``, ``engines.json``) is
``epts_export.trt.scripts``; the sparse-tactic report is ``epts_export.trt.sparse``.

Engines for a Jetson are built on the Jetson, which has TensorRT's Python bindings (JetPack:
python3-libnvinfer) but neither epts-export nor torch nor numpy; so each bundle carries a copy of
this module with the standard-library modules it imports (``_epts/epts_export/``), and this module
uses relative imports of those only. TensorRT (and ``torch``, optional) are imported inside
functions, so the module also loads where TensorRT is absent.

Facts this code relies on (sources in the notes of the project, shared/docs/tensorrt-notes.md;
names checked against the real bindings of 8.6.1, 10.3.0 and 11.4.0.106 by the tests):

* The module is ``tensorrt`` on JetPack and with NVIDIA's meta package, ``tensorrt_bindings`` when
  only the PyPI bindings wheel is installed: both are accepted (``MODULE_NAMES``).
* ``trt.Builder(logger)`` and ``trt.Runtime(logger)`` never return None: without a usable GPU,
  driver or library they raise TypeError ("factory function returned nullptr"); ``start`` turns
  that into one line.
* Engines are not portable across GPUs, TensorRT versions or JetPack releases, and there is no
  x86 -> Jetson cross build: Jetson engines are built on the device.
* TensorRT 10 builds *strongly typed* networks (precision comes from the ONNX dtypes); TensorRT 11
  has no other mode: no FP16/BF16/INT8 builder flags, ``STRONGLY_TYPED`` deprecated and ignored,
  no ``EXPLICIT_BATCH``. On TensorRT 8.x the builder flag named after ``EngineSpec.precision`` is
  set instead.
* Builder flags are set by name (``trt.BuilderFlag.SPARSE_WEIGHTS``); their integer values moved
  between releases. trtexec has no tactic-DRAM pool: ``tactic_dram_mb`` is applied here only.
* TensorRT has no kernels for unstructured sparsity: unstructured levels run the same dense math
  with other weights, so one *refittable* engine serves them all (``EngineSpec.refit_from``).
  REFIT_INDIVIDUAL (TensorRT >= 10) with only the weights that differ between the levels marked
  keeps TensorRT free to fold the rest; REFIT (every weight) otherwise. Never REFIT_IDENTICAL: it
  lets TensorRT optimize for the build level's weight values, which a level switch would break.
  2:4 levels keep their own SPARSE_WEIGHTS engines (refit into a sparse tactic accepts only 2:4
  weights).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import interface
from ..errors import UserError
from ..fsutil import write_bytes
from ..interface import ENGINES_JSON, KVLayout, ShapeRange, triple
from .sparse import sparse_report

INSTALL_HINT = "pip install 'epts-export[tensorrt]' (NVIDIA's index)"
NOT_INSTALLED = f"tensorrt is not installed: {INSTALL_HINT}; on Jetson it ships with JetPack (python3-libnvinfer)"
NO_GPU = "no CUDA GPU visible"
ENGINES_FORMAT = "epts-trt-engines"
# 2: each entry serves "levels" and says how their weights get in ("weights": "baked" | "refit");
# 1: one "level" per entry, weights baked (still read)
ENGINES_VERSION = 2
WEIGHTS_BAKED, WEIGHTS_REFIT = "baked", "refit"
# the module's name on JetPack / with NVIDIA's meta package, then with the PyPI bindings wheel alone
MODULE_NAMES = ("tensorrt", "tensorrt_bindings")


# --------------------------------------------------------------------------------------------
# specs


@dataclass
class EngineSpec:
    """What one engine is built from, which levels it serves and where its files go (paths absolute
    or relative to the cwd).

    A *baked* engine serves one level with that level's weights in the plan. A *refit* engine
    (``refit_from`` set) serves several unstructured levels: it is built from ``onnx`` (the graph of
    its first level) with refittable weights, and the runtime switches level by refitting the
    weights of ``refit_from[level]``.
    """

    onnx: Path  # the graph the engine is built from (external data model.onnx_data may sit beside it)
    engine: Path  # where to write the .engine (plan) file
    levels: list[str]  # the levels it serves: ["2:4"], or ["0.3", "0.5", "0.7"] for a refit engine
    sparse: bool  # set SPARSE_WEIGHTS
    precision: str  # "fp16" | "bf16" | "fp32": informational for strongly typed networks
    profiles: list[ShapeRange]
    kv: KVLayout
    workspace_mb: int
    tactic_dram_mb: int | None
    timing_cache: Path  # persistent per target: loaded if it exists, saved back after the build
    layer_info: Path  # where the engine inspector JSON goes
    refit_from: dict[str, Path] = field(default_factory=dict)  # level -> the graph holding its weights
    # the initializers whose values differ between the levels (marked refittable with
    # REFIT_INDIVIDUAL); None: unknown, every weight is made refittable
    refit_weights: list[str] | None = None
    # {"max_tokens", "target_max_context", "model_max_positions", "capped"}: where the profiles' context came from
    context: dict | None = None
    note: str | None = None  # why a level that could share a refit engine has its own

    @property
    def refit(self) -> bool:
        """Whether the levels' weights are refit at run time (several levels, one engine)."""
        return bool(self.refit_from)

    @property
    def weights(self) -> str:
        """How the levels' weights reach the engine: "refit" or "baked"."""
        return WEIGHTS_REFIT if self.refit else WEIGHTS_BAKED

    @property
    def label(self) -> str:
        """"level 2:4" or "levels 0.3, 0.5, 0.7", for messages."""
        return ("level " if len(self.levels) == 1 else "levels ") + ", ".join(self.levels)


def profile_shapes(spec: EngineSpec) -> dict[str, list[tuple[str, tuple, tuple, tuple]]]:
    """profile name -> [(input name, min shape, opt shape, max shape)] for every input of the graph
    ``spec`` builds (``interface.profile_shapes`` of its profiles and KV layout). UserError for ranges
    TensorRT would reject, naming the levels."""
    return interface.profile_shapes(spec.profiles, spec.kv, what=f"engine for {spec.label}")


def _levels_and_sources(d: dict, version: int, path) -> tuple[list[str], dict[str, Path]]:
    """(levels, refit_from) of one engines.json entry of ``version``; KeyError/TypeError when malformed."""
    if version < 2:
        return [str(d["level"])], {}
    levels = [str(x) for x in d["levels"]]
    weights = d.get("weights", WEIGHTS_BAKED)
    if weights == WEIGHTS_REFIT:
        sources = {str(k): path(v, f"refit_from.{k}") for k, v in d["refit_from"].items()}
        if sorted(sources) != sorted(levels):
            raise KeyError(f"refit_from must give a graph for each of the levels {levels}")
        return levels, sources
    if weights != WEIGHTS_BAKED or len(levels) != 1:
        raise TypeError(f"weights {weights!r} with levels {levels}: a baked engine serves one level, refit several")
    return levels, {}


def spec_from_dict(d: dict, root: Path, version: int = ENGINES_VERSION) -> EngineSpec:
    """The EngineSpec of one ``engines.json`` entry of format ``version`` (as ``scripts.spec_to_dict``
    writes it; version 1 entries name one ``level``), its relative paths resolved against ``root``
    (the bundle folder). UserError for a malformed entry or a path that leaves the bundle."""
    root = Path(root)

    def path(value, key: str) -> Path:
        rel = Path(value)
        if rel.is_absolute() or ".." in rel.parts:
            raise UserError(f"{ENGINES_JSON}: {key} {value!r} must be a path inside the bundle")
        return root / rel

    try:
        levels, sources = _levels_and_sources(d, version, path)
        return EngineSpec(
            onnx=path(d["onnx"], "onnx"), engine=path(d["engine"], "engine"), levels=levels, sparse=bool(d["sparse"]),
            precision=str(d.get("precision", "fp16")),
            profiles=[ShapeRange(str(p["name"]), triple(p["batch"], "batch"), triple(p["seq"], "seq"),
                                 triple(p["past"], "past")) for p in d["profiles"]],
            kv=KVLayout(int(d["kv"]["layers"]), int(d["kv"]["kv_heads"]), int(d["kv"]["head_dim"])),
            workspace_mb=int(d["workspace_mb"]),
            tactic_dram_mb=None if d.get("tactic_dram_mb") is None else int(d["tactic_dram_mb"]),
            timing_cache=path(d["timing_cache"], "timing_cache"), layer_info=path(d["layer_info"], "layer_info"),
            refit_from=sources,
            refit_weights=None if d.get("refit_weights") is None else [str(w) for w in d["refit_weights"]],
            context=dict(d["context"]) if d.get("context") else None, note=d.get("note"))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{ENGINES_JSON} is malformed ({type(e).__name__}: {e}): regenerate the bundle") from None


def load_specs(bundle: Path) -> list[EngineSpec]:
    """The engine specs listed in ``<bundle>/engines.json`` (format version 1 or 2), paths resolved
    against ``bundle``. UserError when the file is missing, not JSON, another format or a newer version."""
    path = Path(bundle) / ENGINES_JSON
    if not path.is_file():
        raise UserError(f"{path} is missing: pass a bundle folder made by epts-export (it holds {ENGINES_JSON})")
    try:
        doc = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}): regenerate the bundle") from None
    if not isinstance(doc, dict) or doc.get("format") != ENGINES_FORMAT:
        raise UserError(f"{path} is not an epts-export engine list: regenerate the bundle")
    version = int(doc.get("version", 0))
    if version > ENGINES_VERSION:
        raise UserError(f"{path} has version {doc.get('version')}, this code reads up to {ENGINES_VERSION}: update epts-export")
    return [spec_from_dict(d, bundle, version) for d in doc.get("engines", [])]


def spec_for_level(specs: list[EngineSpec], level: str) -> EngineSpec | None:
    """The spec that serves ``level`` (a level name as engines.json writes it), or None."""
    return next((s for s in specs if level in s.levels), None)


def plan_problems(specs: list[EngineSpec], levels: list[str] | None = None) -> list[str]:
    """What is wrong with a bundle's engine plan: a level of ``levels`` served by no engine or by
    several, an engine serving a level the bundle lacks (when ``levels`` is given), a refit engine
    whose source graphs are missing or that is not built from one of them. Empty when it is sound."""
    problems = []
    served: dict[str, list[str]] = {}
    for s in specs:
        for lv in s.levels:
            served.setdefault(lv, []).append(Path(s.engine).name)
    for lv in levels or []:
        engines = served.get(lv, [])
        if len(engines) != 1:
            problems.append(f"level {lv} is served by {len(engines)} engine specs ({', '.join(engines) or 'none'}), "
                            f"not exactly one")
    if levels is not None:
        problems += [f"{ENGINES_JSON} lists level {lv}, which the bundle does not hold" for lv in served if lv not in levels]
    for s in specs:
        if s.refit and Path(s.onnx) not in [Path(p) for p in s.refit_from.values()]:
            problems.append(f"{Path(s.engine).name} is built from {s.onnx}, which is none of its levels' graphs")
        problems += [f"the graph level {lv} is refit from, {p}, is missing" for lv, p in s.refit_from.items()
                     if not Path(p).is_file()]
    return problems


def build_record_path(engine: Path) -> Path:
    """engines/level-2of4.engine -> engines/level-2of4.build.json (written after an on-device build)."""
    return Path(engine).with_suffix(".build.json")


# --------------------------------------------------------------------------------------------
# status


def compute_capability() -> str | None:
    """The compute capability of the current CUDA device as "major.minor" ("8.7" on Orin), asked of
    torch; None without torch (build_engines.py runs with TensorRT's bindings only), without a
    visible GPU, or when torch fails to tell."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability()
        return f"{int(major)}.{int(minor)}"
    except Exception:  # a CPU-only or broken torch: no answer is better than a failed build
        return None


def _import_tensorrt():
    """The first module of MODULE_NAMES that imports. ModuleNotFoundError naming "tensorrt" when none
    is installed; a module that is installed but fails to load raises what its import raised."""
    for name in MODULE_NAMES:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name not in (None, name):
                raise  # installed, but something it needs is missing
    raise ModuleNotFoundError(f"No module named {' or '.join(MODULE_NAMES)}", name=MODULE_NAMES[0])


def _import_error(e: Exception) -> str:
    """Why TensorRT cannot be imported, and what to do, for an exception of _import_tensorrt."""
    if isinstance(e, ModuleNotFoundError):
        if e.name in (None, *MODULE_NAMES):
            return NOT_INSTALLED
        return f"tensorrt is installed but incomplete (no module {e.name}): reinstall it with {INSTALL_HINT}"
    # a broken install: bindings without their libnvinfer, wrong CUDA, ...
    return f"tensorrt is installed but does not load ({type(e).__name__}: {' '.join(str(e).split())}): reinstall it with {INSTALL_HINT}"


def tensorrt_status() -> tuple[bool, str]:
    """(True, "TensorRT X.Y.Z, <GPU> (sm_XY)") when TensorRT imports and a CUDA GPU is visible, else (False, why)."""
    try:
        trt = _import_tensorrt()
    except Exception as e:
        return False, _import_error(e)
    version = getattr(trt, "__version__", "?")
    try:
        import torch
    except Exception:
        torch = None
    if torch is not None:
        try:
            if torch.cuda.is_available():
                name = torch.cuda.get_device_name(0)
                cc = compute_capability()
                if cc is not None:
                    return True, f"TensorRT {version}, {name} (sm_{cc.replace('.', '')})"
            elif getattr(getattr(torch, "version", None), "cuda", None):
                return False, f"{NO_GPU} (torch {getattr(torch, '__version__', '?')} with CUDA sees no device)"
        except Exception:
            pass  # fall through to TensorRT's own probe
    # no torch, or a CPU-only torch: ask TensorRT itself (a builder needs a CUDA device)
    try:
        start(trt, "Builder", make_logger(trt, lambda m: None))  # errors kept in its tail, not printed
    except UserError as e:  # the real bindings: TypeError from the constructor, as start words it
        return False, str(e)
    except Exception as e:
        return False, f"{NO_GPU} (TensorRT could not create a builder: {' '.join(str(e).split())})"
    return True, f"TensorRT {version}, CUDA GPU (install torch to see its name and compute capability)"


def import_trt():
    """The TensorRT module (``tensorrt``, else ``tensorrt_bindings``); UserError saying how to
    install it when it is missing or broken."""
    try:
        return _import_tensorrt()
    except Exception as e:
        raise UserError(_import_error(e)) from None


def start(trt, kind: str, logger):
    """``trt.Builder(logger)`` or ``trt.Runtime(logger)`` (``kind`` names the class). The real
    bindings raise TypeError ("factory function returned nullptr") when TensorRT cannot start here
    (no GPU, a broken driver or library): UserError in one line instead, with TensorRT's last
    messages."""
    version = getattr(trt, "__version__", "?")
    try:
        obj = getattr(trt, kind)(logger)
        why = "it returned None"
    except TypeError as e:
        obj, why = None, " ".join(str(e).split())
    if obj is None:
        said = list(getattr(logger, "tail", []))[-3:]
        raise UserError(f"TensorRT {version} could not create a {kind} ({why}): {NO_GPU}, or its driver or "
                        f"libraries are broken (check nvidia-smi)" + (f"; TensorRT said: {' | '.join(said)}" if said else ""))
    return obj


# --------------------------------------------------------------------------------------------
# the one TensorRT logger


_SEVERITY_RANK = {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4}
RANK_WARNING, RANK_INFO = _SEVERITY_RANK["WARNING"], _SEVERITY_RANK["INFO"]


def severity_rank(severity) -> int:
    """0 (INTERNAL_ERROR) .. 4 (VERBOSE) for a ``trt.ILogger.Severity`` (by member name: the enum's
    integer values are not promised), an int, or a name; 3 (INFO) when it cannot tell."""
    name = getattr(severity, "name", None)
    if isinstance(name, str) and name.upper() in _SEVERITY_RANK:
        return _SEVERITY_RANK[name.upper()]
    try:
        return int(severity)
    except (TypeError, ValueError):
        text = str(severity).rsplit(".", 1)[-1].upper()
        return _SEVERITY_RANK.get(text, RANK_INFO)


def make_logger(trt, log: Callable[[str], None], keep_lines: bool = False, forward_level: int = RANK_WARNING):
    """A ``trt.ILogger`` that forwards messages of rank <= ``forward_level`` (see severity_rank) to
    ``log`` as "[TensorRT] <msg>" and keeps a ``.tail`` of messages for error texts.

    ``keep_lines`` (the builder): also keep every INFO-and-above line and every "(Sparsity)" line in
    ``.lines`` (the sparse report reads them), forward "(Sparsity)" lines whatever their severity,
    and keep the last 200 kept lines as the tail. Without it (the runtime): ``.lines`` stays empty
    and the tail is the last 20 forwarded lines. A failing ``log`` never breaks TensorRT's call.
    """
    tail_len = 200 if keep_lines else 20
    base = getattr(trt, "ILogger", None)
    if base is None:  # pragma: no cover - every TensorRT 8+ has ILogger
        logger = trt.Logger(trt.Logger.WARNING)
        logger.lines, logger.tail = [], deque(maxlen=tail_len)
        return logger

    class EptsLogger(base):  # type: ignore[misc, valid-type]
        def __init__(self):
            base.__init__(self)
            self.lines: list[str] = []
            self.tail: deque[str] = deque(maxlen=tail_len)

        def log(self, severity, msg):  # called by TensorRT, possibly from its threads
            text = str(msg)
            rank = severity_rank(severity)
            sparsity = keep_lines and "(Sparsity)" in text
            forward = rank <= forward_level or sparsity
            if keep_lines and (rank <= RANK_INFO or sparsity):
                self.lines.append(text)
                self.tail.append(text)
            elif not keep_lines and forward:
                self.tail.append(text)
            if forward:
                try:
                    log(f"[TensorRT] {text}")
                except Exception:
                    pass

    return EptsLogger()


def _tail(logger, n: int = 20) -> str:
    lines = list(getattr(logger, "tail", []))[-n:]
    return " | ".join(lines) if lines else "(TensorRT logged nothing)"


# --------------------------------------------------------------------------------------------
# the Python-API builder


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


def _creation_flags(trt) -> tuple[int, bool]:
    """(create_network flags, strongly typed?). TensorRT 11 (no FP16 builder flag) has strongly typed
    networks only and ignores STRONGLY_TYPED (deprecated): no flag. TensorRT 10: STRONGLY_TYPED.
    TensorRT 8.x: EXPLICIT_BATCH, weakly typed."""
    creation = trt.NetworkDefinitionCreationFlag
    if not hasattr(trt.BuilderFlag, "FP16"):
        return 0, True
    if hasattr(creation, "STRONGLY_TYPED"):
        return 1 << int(creation.STRONGLY_TYPED), True
    if hasattr(creation, "EXPLICIT_BATCH"):
        return 1 << int(creation.EXPLICIT_BATCH), False
    return 0, False


def _parse_network(trt, builder, logger, onnx: Path):
    """(network, parser, strongly typed?) for the ONNX graph; the parser must outlive the build
    (it owns the weights the network points at). RuntimeError with TensorRT's parse errors."""
    flags, strongly_typed = _creation_flags(trt)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx)):
        errors = [_parser_error(parser.get_error(i)) for i in range(int(parser.num_errors))]
        detail = "; ".join(errors) if errors else _tail(logger)
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
    if not strongly_typed:  # TensorRT 8.x: weakly typed, precision by builder flag
        wanted = {"fp16": "FP16", "bf16": "BF16"}.get(spec.precision.lower())
        if wanted and not _set_flag(trt, config, wanted):
            log(f"TensorRT {version} has no {wanted} builder flag: building in FP32")
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
        raise RuntimeError(f"TensorRT {version} failed to build the engine for {spec.label}: {_tail(logger)}")
    data = _host_bytes(plan)
    if not data:
        raise RuntimeError(f"TensorRT {version} built an empty engine for {spec.label}: {_tail(logger)}")
    return data, build_s


def _inspect(trt, logger, data: bytes, spec: EngineSpec) -> str:
    """The engine inspector's JSON for the plan ``data`` (RuntimeError when the plan does not load)."""
    engine = start(trt, "Runtime", logger).deserialize_cuda_engine(data)
    if engine is None:
        raise RuntimeError(f"TensorRT {getattr(trt, '__version__', '?')} cannot load the engine it just built "
                           f"for {spec.label}: {_tail(logger)}")
    inspector = engine.create_engine_inspector()
    return inspector.get_engine_information(trt.LayerInformationFormat.JSON) or ""


def context_note(spec: EngineSpec) -> str | None:
    """The line saying that the profiles were capped at the model's context, when they were."""
    c = spec.context or {}
    if not c.get("capped"):
        return None
    return (f"profiles capped at {c['max_tokens']} tokens, the model's max_position_embeddings "
            f"(the target allows {c['target_max_context']})")


def build_engine(spec: EngineSpec, log: Callable[[str], None] = print) -> dict:
    """Build the engine for ``spec`` with TensorRT's Python API; write the plan, the timing cache and
    the inspector JSON atomically. Returns {"engine", "bytes", "build_s", "tensorrt", "levels",
    "weights", "refittable" (None, "individual" or "all"), "sparse_report"}.

    UserError for what the user can fix (no TensorRT or no GPU for it, missing ONNX, profiles that
    do not fit the graph); RuntimeError when TensorRT fails (parse errors, a failed build), with
    its messages.
    """
    trt = import_trt()
    onnx = Path(spec.onnx)
    if not onnx.is_file():
        raise UserError(f"ONNX graph {onnx} is missing: export the level first (epts-export export / bundle)")
    shapes = profile_shapes(spec)
    version = getattr(trt, "__version__", "?")

    logger = make_logger(trt, log, keep_lines=True)
    builder = start(trt, "Builder", logger)
    network, parser, strongly_typed = _parse_network(trt, builder, logger, onnx)
    skip = _check_inputs(spec, _network_inputs(network), shapes)
    config = _configure(trt, builder, spec, strongly_typed, log)
    refittable = _enable_refit(trt, config, network, spec, log) if spec.refit else None
    _add_profiles(builder, config, shapes, skip)
    cache_path = Path(spec.timing_cache)
    _attach_timing_cache(config, cache_path, log)

    if context_note(spec):
        log(context_note(spec))
    how = (" with sparse weights" if spec.sparse else
           f", refittable ({'the weights that differ' if refittable == 'individual' else 'every weight'})" if refittable else "")
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
            "levels": list(spec.levels), "weights": spec.weights, "refittable": refittable, "sparse_report": report}


# --------------------------------------------------------------------------------------------
# command line: python -m epts_export.trt.builder build <bundle> | report <layers.json> | status


def _print_report(spec: EngineSpec, result: dict, out) -> None:
    r = result["sparse_report"]
    print(f"{spec.label}: {result['engine']} ({result['bytes'] / 2**20:.1f} MiB, {result['build_s']:.1f} s, "
          f"TensorRT {result['tensorrt']})", file=out)
    if spec.refit:
        print(f"  weights: {spec.levels[0]}'s in the plan; the others are refit at run time from their graphs", file=out)
    print(f"  sparse: {len(r['picked'])} layer(s) picked a sparse kernel of {len(r['eligible'])} eligible, "
          f"{r['layers']} engine layers (source: {r['source']})", file=out)
    for name in r["picked"]:
        print(f"    sparse kernel: {name}", file=out)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m epts_export.trt.builder",
                                 description="Build and inspect TensorRT engines of an epts-export bundle.")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build every engine listed in <bundle>/engines.json")
    b.add_argument("bundle", type=Path)
    b.add_argument("--level", action="append", default=None,
                   help="only the engine serving this level (repeatable; one refit engine serves several levels)")
    r = sub.add_parser("report", help="sparse report from an inspector JSON and/or a build log")
    r.add_argument("layer_info", type=Path, nargs="?")
    r.add_argument("--log", type=Path, default=None, help="a trtexec or TensorRT build log")
    sub.add_parser("status", help="is TensorRT usable here?")
    return ap


def _build_bundle(bundle: Path, levels: list[str] | None) -> int:
    """Build the engines of ``bundle`` (those serving ``levels`` when given), each with its build record."""
    specs = load_specs(bundle)
    served = [lv for s in specs for lv in s.levels]
    if levels:
        unknown = set(levels) - set(served)
        if unknown:
            raise UserError(f"no engine for level(s) {', '.join(sorted(unknown))} in {bundle / ENGINES_JSON}: "
                            f"choose from {', '.join(served)}")
        specs = [s for s in specs if set(s.levels) & set(levels)]
    problems = plan_problems(specs)
    if problems:
        raise UserError(f"{bundle / ENGINES_JSON}: " + "; ".join(problems) + ": copy the whole bundle, or regenerate it")
    ok, why = tensorrt_status()
    if not ok:
        raise UserError(f"cannot build engines here: {why}")
    print(why)
    for s in specs:
        result = build_engine(s)
        _print_report(s, result, sys.stdout)
        # what verify and run check on the device: the TensorRT and GPU this engine is for
        record = {**result, "engine": Path(s.engine).name, "compute_capability": compute_capability()}
        write_bytes(build_record_path(s.engine), (json.dumps(record, indent=2) + "\n").encode(), fsync=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``build <bundle> [--level L]...`` | ``report [layers.json] [--log build.log]`` | ``status``
    (``argv`` defaults to sys.argv[1:]). Returns the exit code: 0, or a UserError's (printed as
    ``error: ...`` on stderr)."""
    args = _parser().parse_args(argv)
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
        return _build_bundle(args.bundle, args.level)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
