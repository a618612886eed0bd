"""Engine specs and ``engines.json``, read and written here only.

A bundle's ``engines.json`` says which engines to build on the device, which levels each serves and
how their weights get in:

    {"format": "epts-trt-engines", "version": 3,
     "source": {                                   # elastic bundles (absent in baked-layout ones)
       "graph": "model/trt.onnx",                  #   the decoder TensorRT builds from: decoder.onnx with
       "weights_file": "model/trt.weights",        #   its prunable weights read from this file, which
       "model": "model",                           #   the device writes for one level from the weight
       "levels": {"0.3": 0, ..., "2:4": 5},        #   builder (model/weights.onnx, sparsity_level index)
       "tensors": {"<initializer>": {"file", "offset", "length", "dtype", "shape"}, ...}},
     "engines": [
       {"levels": ["0.3", ..., "0.7"], "weights": "refit", "build_level": "0.3", "sparse": false, ...},
       {"levels": ["2:4"], "weights": "baked", "build_level": "2:4", "sparse": true, ...}]}

A *baked* engine holds its level's weights as constants (what sparse tactics need). A *refit*
engine serves several unstructured levels (TensorRT has no unstructured-sparse kernels: they are
the same dense math with other weights): it is built with ``build_level``'s weights, and a switch
refits the prunable weights of another level (``runtime.TrtDecoder.set_level``). ``tensors`` says
where every initializer of the graph lies (relative to the graph's folder), so that the device
reads any weight TensorRT asks for at a refit without an ONNX parser.

Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import interface
from ..errors import UserError
from ..files import load_json, write_json
from ..interface import ENGINES_JSON, KVLayout, ShapeRange, triple

ENGINES_FORMAT = "epts-trt-engines"
# 3: engines take their weights from the bundle's weight builder ("source"); 2: refit from one baked
# graph per level (epts-export before the elastic bundle; no longer read)
ENGINES_VERSION = 3
WEIGHTS_BAKED, WEIGHTS_REFIT = "baked", "refit"
REPORT_FILE = "engines/report.json"  # what build_engines.py measured: sparse layers, latency, refit time


@dataclass(frozen=True)
class TensorRef:
    """Where one initializer of the engine graph lies: ``length`` bytes at ``offset`` of ``file``
    (relative to the graph's folder), a ``dtype`` array of ``shape``."""

    file: str
    offset: int
    length: int
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"file": self.file, "offset": self.offset, "length": self.length, "dtype": self.dtype,
                "shape": list(self.shape)}


@dataclass
class WeightSource:
    """An elastic bundle's weights, for TensorRT: the level-independent graph and where each of its
    tensors lies; the prunable ones come from ``weights_file``, written for one level at a time."""

    graph: Path  # model/trt.onnx
    weights_file: Path  # model/trt.weights (a device output)
    model: Path  # the elastic model folder: weights.onnx, decoder.onnx, levels.json, config.json
    levels: dict[str, int]  # level name -> sparsity_level index
    tensors: dict[str, TensorRef]

    @property
    def prunable(self) -> list[str]:
        """The initializers a level decides (those stored in ``weights_file``), in file order."""
        mine = [(t.offset, n) for n, t in self.tensors.items() if t.file == self.weights_file.name]
        return [n for _, n in sorted(mine)]


@dataclass
class EngineSpec:
    """What one engine is built from, which levels it serves and where its files go (absolute paths,
    or relative to the cwd)."""

    onnx: Path  # the graph the engine is built from
    engine: Path  # where to write the .engine (plan) file
    levels: list[str]  # the levels it serves: ["2:4"], or ["0.3", "0.5", "0.7"] for a refit engine
    sparse: bool  # set SPARSE_WEIGHTS
    precision: str  # "fp16" | "bf16" | "fp32": informational for strongly typed networks; "int8": weakly typed, FP16+INT8
    profiles: list[ShapeRange]
    kv: KVLayout
    workspace_mb: int
    tactic_dram_mb: int | None
    timing_cache: Path  # persistent per target: loaded if it exists, saved back after the build
    layer_info: Path  # where the engine inspector JSON goes
    refit: bool = False  # serves several levels by refitting their prunable weights
    build_level: str | None = None  # whose weights the plan holds (default: the first level)
    # the weights that differ between the levels (marked refittable with REFIT_INDIVIDUAL); None:
    # every weight is made refittable
    refit_weights: list[str] | None = None
    # {"max_tokens", "target_max_context", "model_max_positions", "capped"}: where the profiles' context came from
    context: dict | None = None
    note: str | None = None  # why a level that could share a refit engine has its own
    source: WeightSource | None = field(default=None, repr=False)  # elastic bundles: where weights come from

    def __post_init__(self):
        if self.build_level is None:
            self.build_level = self.levels[0]

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
    ``spec`` builds; UserError for ranges TensorRT would reject, naming the levels."""
    return interface.profile_shapes(spec.profiles, spec.kv, what=f"engine for {spec.label}")


def context_note(spec: EngineSpec) -> str | None:
    """The line saying that the profiles were capped at the model's context, when they were."""
    c = spec.context or {}
    if not c.get("capped"):
        return None
    return (f"profiles capped at {c['max_tokens']} tokens, the model's max_position_embeddings "
            f"(the target allows {c['target_max_context']})")


def build_record_path(engine: Path) -> Path:
    """engines/level-2of4.engine -> engines/level-2of4.build.json (written after an on-device build)."""
    return Path(engine).with_suffix(".build.json")


def unique_specs(specs) -> list[EngineSpec]:
    """``specs`` (a list, or a level -> spec dict's values) with each engine once, in order."""
    out, seen = [], set()
    for s in specs:
        key = Path(s.engine).resolve()
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


# --------------------------------------------------------------------------------------------
# engines.json


def bundle_relative(p: Path, root: Path) -> str:
    """``p`` as a posix path relative to ``root``; UserError when it lies outside."""
    try:
        return Path(p).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        raise UserError(f"{p} is outside the bundle {root}: engine files must live inside it so the bundle can move") from None


def _inside(root: Path, value, key: str) -> Path:
    rel = Path(str(value))
    if not str(value) or rel.is_absolute() or ".." in rel.parts:
        raise UserError(f"{ENGINES_JSON}: {key} {value!r} must be a path inside the bundle")
    return Path(root) / rel


def spec_to_dict(spec: EngineSpec, root: Path) -> dict:
    """The ``engines.json`` entry of ``spec``, its paths relative to ``root`` (the bundle folder)."""
    d = {"levels": list(spec.levels), "weights": spec.weights, "build_level": spec.build_level,
         "sparse": bool(spec.sparse), "precision": spec.precision,
         "onnx": bundle_relative(spec.onnx, root), "engine": bundle_relative(spec.engine, root)}
    if spec.refit:
        d["refit_weights"] = None if spec.refit_weights is None else list(spec.refit_weights)
    d.update({
        "timing_cache": bundle_relative(spec.timing_cache, root), "layer_info": bundle_relative(spec.layer_info, root),
        "profiles": [{"name": p.name, **p.to_dict()} for p in spec.profiles],
        "kv": {"layers": spec.kv.layers, "kv_heads": spec.kv.kv_heads, "head_dim": spec.kv.head_dim},
        "workspace_mb": int(spec.workspace_mb),
        "tactic_dram_mb": None if spec.tactic_dram_mb is None else int(spec.tactic_dram_mb),
        "context": spec.context,
    })
    if spec.note:
        d["note"] = spec.note
    return d


def source_to_dict(source: WeightSource, root: Path) -> dict:
    return {"graph": bundle_relative(source.graph, root), "weights_file": bundle_relative(source.weights_file, root),
            "model": bundle_relative(source.model, root), "levels": dict(source.levels),
            "tensors": {n: t.to_dict() for n, t in source.tensors.items()}}


def _source_from_dict(d: dict, root: Path) -> WeightSource:
    graph = _inside(root, d["graph"], "source.graph")
    weights_file = _inside(root, d["weights_file"], "source.weights_file")
    if weights_file.parent != graph.parent:
        raise UserError(f"{ENGINES_JSON}: source.weights_file must lie beside source.graph (its external data)")
    tensors = {}
    for name, t in dict(d["tensors"]).items():
        rel = Path(str(t["file"]))
        if rel.is_absolute() or ".." in rel.parts or len(rel.parts) != 1:
            raise UserError(f"{ENGINES_JSON}: tensor {name} lies in {t['file']!r}, not in a file beside the graph")
        ref = TensorRef(str(t["file"]), int(t["offset"]), int(t["length"]), str(t["dtype"]),
                        tuple(int(x) for x in t["shape"]))
        if ref.offset < 0 or ref.length < 0:
            raise ValueError(f"tensor {name} has a negative offset or length")
        tensors[str(name)] = ref
    levels = {str(k): int(v) for k, v in dict(d["levels"]).items()}
    return WeightSource(graph, weights_file, _inside(root, d["model"], "source.model"), levels, tensors)


def spec_from_dict(d: dict, root: Path, source: WeightSource | None = None) -> EngineSpec:
    """The EngineSpec of one ``engines.json`` entry (as ``spec_to_dict`` writes it), its relative
    paths resolved against ``root``. UserError for a malformed entry or a path that leaves the bundle."""
    root = Path(root)
    try:
        levels = [str(x) for x in d["levels"]]
        weights = d.get("weights", WEIGHTS_BAKED)
        if weights not in (WEIGHTS_BAKED, WEIGHTS_REFIT) or not levels or (weights == WEIGHTS_BAKED and len(levels) != 1):
            raise TypeError(f"weights {weights!r} with levels {levels}: a baked engine serves one level, refit several")
        build_level = str(d.get("build_level") or levels[0])
        if build_level not in levels:
            raise KeyError(f"build_level {build_level} is none of the levels {levels}")
        if source is not None and any(lv not in source.levels for lv in levels):
            raise KeyError(f"levels {levels} are not all in the weight builder's table {sorted(source.levels)}")
        if weights == WEIGHTS_REFIT and source is None:
            raise KeyError("a refit engine needs the bundle's weight builder (source)")
        return EngineSpec(
            onnx=_inside(root, d["onnx"], "onnx"), engine=_inside(root, d["engine"], "engine"), levels=levels,
            sparse=bool(d["sparse"]), precision=str(d.get("precision", "fp16")),
            profiles=[ShapeRange(str(p["name"]), triple(p["batch"], "batch"), triple(p["seq"], "seq"),
                                 triple(p["past"], "past")) for p in d["profiles"]],
            kv=KVLayout(int(d["kv"]["layers"]), int(d["kv"]["kv_heads"]), int(d["kv"]["head_dim"])),
            workspace_mb=int(d["workspace_mb"]),
            tactic_dram_mb=None if d.get("tactic_dram_mb") is None else int(d["tactic_dram_mb"]),
            timing_cache=_inside(root, d["timing_cache"], "timing_cache"),
            layer_info=_inside(root, d["layer_info"], "layer_info"),
            refit=weights == WEIGHTS_REFIT, build_level=build_level,
            refit_weights=None if d.get("refit_weights") is None else [str(w) for w in d["refit_weights"]],
            context=dict(d["context"]) if d.get("context") else None, note=d.get("note"), source=source)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{ENGINES_JSON} is malformed ({type(e).__name__}: {e}): regenerate the bundle") from None


def write_engines(bundle: Path, specs, source: WeightSource | None = None) -> Path:
    """Write ``<bundle>/engines.json``: each engine of ``specs`` once, paths relative to ``bundle``."""
    bundle = Path(bundle)
    doc = {"format": ENGINES_FORMAT, "version": ENGINES_VERSION,
           "source": None if source is None else source_to_dict(source, bundle),
           "engines": [spec_to_dict(s, bundle) for s in unique_specs(specs)], "report": REPORT_FILE}
    path = bundle / ENGINES_JSON
    write_json(path, doc)
    return path


def load_engines(bundle: Path) -> tuple[list[EngineSpec], WeightSource | None]:
    """(the engine specs, the weight source) of ``<bundle>/engines.json``, paths resolved against
    ``bundle``. UserError when the file is missing, not JSON, another format or another version."""
    path = Path(bundle) / ENGINES_JSON
    if not path.is_file():
        raise UserError(f"{path} is missing: pass a bundle folder made by epts-export (it holds {ENGINES_JSON})")
    try:
        doc = load_json(path.read_bytes(), f"{path}", "regenerate the bundle")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(doc, dict) or doc.get("format") != ENGINES_FORMAT:
        raise UserError(f"{path} is not an epts-export engine list: regenerate the bundle")
    version = doc.get("version")
    if version != ENGINES_VERSION:
        raise UserError(f"{path} has version {version!r}, this code reads {ENGINES_VERSION}: "
                        + ("update epts-export" if isinstance(version, int) and version > ENGINES_VERSION
                           else "rebuild the bundle with this epts-export"))
    try:
        source = _source_from_dict(doc["source"], Path(bundle)) if doc.get("source") else None
        entries = list(doc["engines"])
        specs = [spec_from_dict(d, bundle, source) for d in entries]
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        raise UserError(f"{path} is malformed ({type(e).__name__}: {e}): regenerate the bundle") from None
    return specs, source


def load_specs(bundle: Path) -> list[EngineSpec]:
    """The engine specs of ``<bundle>/engines.json`` (``load_engines`` without the source)."""
    return load_engines(bundle)[0]


def spec_for_level(specs: list[EngineSpec], level: str) -> EngineSpec | None:
    """The spec that serves ``level`` (a level name as engines.json writes it), or None."""
    return next((s for s in specs if level in s.levels), None)


def plan_problems(specs: list[EngineSpec], levels: list[str] | None = None) -> list[str]:
    """What is wrong with a bundle's engine plan: a level of ``levels`` served by no engine or by
    several, an engine serving a level the bundle lacks (when ``levels`` is given), a graph that is
    missing. Empty when it is sound."""
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
    for graph in sorted({Path(s.onnx) for s in specs}):
        if not graph.is_file():
            problems.append(f"the graph {graph} that engines are built from is missing")
    return problems


def device_outputs(specs: list[EngineSpec], source: WeightSource | None) -> list[Path]:
    """The files building engines on the device may write into a bundle (besides what its manifest
    lists): per engine the plan, layer info, build record and trtexec log; the timing caches; the
    level weights file; the report."""
    out: list[Path] = []
    for s in specs:
        out += [Path(s.engine), Path(s.layer_info), Path(s.timing_cache), build_record_path(s.engine),
                Path(str(s.engine) + ".log")]
    if source is not None:
        out.append(source.weights_file)
    return out


def bundle_engine(engine_path: Path) -> tuple[EngineSpec | None, WeightSource | None]:
    """(the engines.json spec of ``engine_path``, its bundle's weight source) from the bundle (the
    engine's folder or the one above it); (None, None) when no readable engines.json lists it."""
    target = Path(engine_path).resolve()
    for folder in (Path(engine_path).parent, Path(engine_path).parent.parent):
        try:
            specs, source = load_engines(folder)
        except (UserError, OSError):
            continue
        for spec in specs:
            if Path(spec.engine).resolve() == target:
                return spec, source
    return None, None
