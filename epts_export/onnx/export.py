"""ONNX export of an elastic artifact: one baked graph per level, or one graph with the level as an input.

The graph interface is optimum's ``text-generation-with-past`` decoder, as ONE unmerged graph
(TensorRT cannot parse optimum's If-merged decoder):

    inputs   input_ids       (batch, seq)                         int64
             attention_mask  (batch, past + seq)                  int64
             position_ids    (batch, seq)                         int64
             past_key_values.{i}.key|value (batch, kv_heads, past, head_dim)   float32 | float16
             sparsity_level  ()  int64, dynamic mode only: index into the graph's level table
    outputs  logits          (batch, seq, vocab)                  float32 (also for --dtype fp16)
             present.{i}.key|value (batch, kv_heads, past + seq, head_dim)

Every prunable linear becomes ``MatMul(x, W_t)`` with ``W_t`` (in, out) a named initializer
``<module>.weight_t`` (+ ``Add`` of the bias): nothing sits between the weight and its MatMul,
and N:M groups of the torch weight's input axis land on axis 0 of ``W_t``, the reduction axis
that TensorRT's sparse kernels need. In dynamic mode those initializers are replaced by a small
subgraph that builds each level's weight at run time (``onnx_graph.make_elastic``).

    <out>/manifest.json              mode, dtype, opset, levels, source artifact + hash, io, sha256 of every file
    <out>/level-<name>/model.onnx    baked: one folder per level (2:4 -> level-2of4), with
                                     config.json, generation_config.json and the tokenizer, so
                                     optimum's ORTModelForCausalLM loads it as is
    <out>/model.onnx                 dynamic: the one graph, with the same configs and tokenizer
"""

from __future__ import annotations

import contextlib
import inspect
import json
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..artifact.folder import Artifact, library_versions
from ..errors import UserError
from ..models.families import Family, family_for, iter_prunable, get_blocks
from ..fsutil import HashError, ManifestFormat, file_hashes, hash_errors, read_manifest, sha256_file, staged_dir, verify_hashes, write_json
from ..core.levels import Level, parse_level
from ..models.source import save_tokenizer
from ..progress import Progress

EXPORT = ManifestFormat("epts-onnx", 1, "ONNX export", "create one with `epts-export export`")
MANIFEST = "manifest.json"
GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
DEFAULT_OPSET = 17  # TensorRT 8.5 (JetPack 5) parses up to 17; TensorRT 10 up to 20
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
MODES = ("baked", "dynamic")
# The dummy shapes the graph is traced with; validate uses other shapes on purpose.
DUMMY = {"batch": 2, "seq": 4, "past": 3}
EXTERNAL_DATA_LIMIT = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB, with room for the graph itself


@dataclass
class ExportSpec:
    artifact: Path
    out: Path
    mode: str = "baked"
    levels: list[Level] | None = None  # default: the artifact's trained levels
    dtype: str = "fp32"
    opset: int = DEFAULT_OPSET
    overwrite: bool = False
    external_data: str = "auto"  # auto (above 2 GB) | always | never


def level_dirname(level: Level) -> str:
    """Folder of a baked level: 'level-0.5', 'level-2of4' (no ':' in paths: tar, scp and Windows read it as host:path)."""
    return "level-" + level.name.replace(":", "of")


# --------------------------------------------------------------------------------------------
# the traced module


@dataclass(frozen=True)
class KVGeometry:
    layers: int
    kv_heads: int
    head_dim: int


def kv_geometry(config) -> KVGeometry:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return KVGeometry(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim)


def io_names(layers: int, dynamic: bool) -> tuple[list[str], list[str]]:
    """(input names, output names) in graph order."""
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids", *past] + (["sparsity_level"] if dynamic else [])
    outputs = ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return inputs, outputs


def dynamic_axes(layers: int) -> dict[str, dict[int, str]]:
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"}}
    for i in range(layers):
        for kv in ("key", "value"):
            axes[f"past_key_values.{i}.{kv}"] = {0: "batch_size", 2: "past_sequence_length"}
            axes[f"present.{i}.{kv}"] = {0: "batch_size", 2: "total_sequence_length"}
    return axes


class DecoderWithPast(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits float32, *present).

    ``past`` is flat (key0, value0, key1, ...), each (batch, kv_heads, past, head_dim); a past
    length of 0 is a prefill. The same module is the PyTorch reference in ``validate``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model
        self.layers = model.config.num_hidden_layers
        # transformers 5 renamed the kwarg `past_key_values` to `cache` (with a deprecation shim)
        self.cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=True, **{self.cache_kwarg: cache})
        pkv = out.past_key_values
        presents = []
        for i in range(self.layers):
            layer = pkv.layers[i]
            presents += [layer.keys, layer.values]
        return (out.logits.float(), *presents)


class MatMulLinear(nn.Module):
    """y = x @ weight_t (+ bias): exports as MatMul(x, weight_t) with weight_t (in, out) a named initializer."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)  # (in, out)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


class Fp32LayerNorm(nn.Module):
    """LayerNorm computed in float32 for an fp16 graph (TensorRT takes precision from the graph)."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.shape, self.eps = ln.normalized_shape, ln.eps
        self.weight = nn.Parameter(ln.weight.detach().float(), requires_grad=False)
        self.bias = nn.Parameter(ln.bias.detach().float(), requires_grad=False) if ln.bias is not None else None

    def forward(self, x):
        return nn.functional.layer_norm(x.float(), self.shape, self.weight, self.bias, self.eps).to(x.dtype)


@contextlib.contextmanager
def export_view(model: nn.Module, fam: Family, fp16: bool):
    """Swap every prunable nn.Linear for a MatMulLinear (and, in fp16, LayerNorms for fp32 ones)
    for the duration of an export; the original modules are put back afterwards."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []

    def swap(parent: nn.Module, name: str, new: nn.Module):
        swapped.append((parent, name, getattr(parent, name)))
        setattr(parent, name, new)

    for block in get_blocks(model, fam):
        for dotted in fam.prunable:
            parent_name, _, leaf = dotted.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            swap(parent, leaf, MatMulLinear(getattr(parent, leaf)))
    softmax = nn.functional.softmax
    if fp16:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.LayerNorm):
                    swap(parent, name, Fp32LayerNorm(child))

        def softmax_upcast(x, dim=None, _stacklevel=3, dtype=None):
            # HF calls softmax(x, dtype=float32), which the exporter writes as Softmax(fp16) -> Cast:
            # cast first, so that the Softmax itself runs in float32
            return softmax(x.to(dtype) if dtype is not None else x, dim=dim)

        nn.functional.softmax = softmax_upcast
    try:
        yield
    finally:
        nn.functional.softmax = softmax
        for parent, name, old in reversed(swapped):
            setattr(parent, name, old)


def prunable_weight_names(model: nn.Module, fam: Family) -> dict[str, str]:
    """initializer name -> torch module name for every prunable linear ("model.layers.0.mlp.up_proj.weight_t")."""
    out = {}
    for i, name, _ in iter_prunable(model, fam):
        module = f"{fam.blocks}.{i}.{name}"
        out[f"{module}.weight_t"] = module
    return out


def dummy_inputs(config, dtype: torch.dtype, batch: int, seq: int, past: int) -> tuple:
    """Tracing inputs: random ids, a full mask, positions after ``past`` random cached tokens."""
    geo = kv_geometry(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = [torch.randn(batch, geo.kv_heads, past, geo.head_dim, generator=g).to(dtype) for _ in range(2 * geo.layers)]
    return (ids, mask, pos, *kv)


def _traceable_sdpa_mask(batch_size, cache_position, kv_length, kv_offset=0, mask_function=None, attention_mask=None,
                         **kwargs):
    """Causal + padding mask without vmap, for transformers 4.x, whose mask code uses torch.vmap,
    which the TorchScript tracer cannot follow. (batch, 1, q, kv) bool, True = attend.
    transformers 5 traces its own mask code; sliding windows are not reproduced here."""
    from transformers.masking_utils import prepare_padding_mask

    kv_idx = torch.arange(kv_length, device=cache_position.device) + kv_offset  # (kv,)
    mask = (kv_idx[None, :] <= cache_position[:, None])[None, None].expand(batch_size, 1, -1, -1)
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)  # (batch, kv) bool or None
    return mask if padding is None else mask & padding[:, None, None, :]


@contextlib.contextmanager
def _traceable_masks():
    import transformers
    from transformers import masking_utils as mu

    if int(transformers.__version__.split(".")[0]) >= 5 or not hasattr(mu, "sdpa_mask"):
        yield
        return
    original = mu.sdpa_mask
    mu.sdpa_mask = _traceable_sdpa_mask
    try:
        yield
    finally:
        mu.sdpa_mask = original


def trace_to_onnx(model: nn.Module, fam: Family, path: Path, opset: int, fp16: bool) -> None:
    """Trace ``model`` (already at its level, in its export dtype) into ``path`` (+ external data)."""
    layers = model.config.num_hidden_layers
    names_in, names_out = io_names(layers, dynamic=False)
    dtype = torch.float16 if fp16 else torch.float32
    args = dummy_inputs(model.config, dtype, **DUMMY)
    wrapper = DecoderWithPast(model).eval()
    with export_view(model, fam, fp16), _traceable_masks(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, args, str(path), input_names=names_in, output_names=names_out,
                          dynamic_axes=dynamic_axes(layers), opset_version=opset, do_constant_folding=True,
                          dynamo=False)


# --------------------------------------------------------------------------------------------
# export


def _prepare_model(em, fp16: bool):
    model = em.model
    model.eval()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")  # sdpa does not trace into plain ONNX ops on every version
    else:
        model.config._attn_implementation = "eager"
    if fp16:
        model.half()
    return model


def _write_hf_side_files(model, tokenizer, folder: Path) -> None:
    """config.json, generation_config.json and the tokenizer, as optimum's ORTModelForCausalLM expects."""
    from transformers import GenerationConfig

    cfg = model.config
    cfg.use_cache = True
    cfg.save_pretrained(folder)
    gen = model.generation_config if getattr(model, "generation_config", None) is not None else GenerationConfig.from_model_config(cfg)
    gen.save_pretrained(folder)
    save_tokenizer(tokenizer, folder, input_names=["input_ids", "attention_mask"])  # the graph takes no token_type_ids


def export(spec: ExportSpec, progress: Progress | None = None) -> Path:
    """Export ``spec.levels`` of an artifact to ONNX (see the module docstring). Returns the folder."""
    from . import graph as onnx_graph
    from ..artifact.materialize import ElasticModel

    progress = progress or Progress(enabled=False)
    if spec.mode not in MODES:
        raise UserError(f"unknown --mode {spec.mode!r}: use baked (one graph per level) or dynamic (one graph, level as input)")
    if spec.dtype not in DTYPES:
        raise UserError(f"unknown --dtype {spec.dtype!r}: use fp32 or fp16")
    if not 14 <= spec.opset <= 21:
        raise UserError(f"--opset {spec.opset} is out of range: use 14..21 (17 parses on TensorRT 8.5 and later)")
    if spec.external_data not in ("auto", "always", "never"):
        raise UserError(f"unknown external-data setting {spec.external_data!r}: auto, always or never")
    art = Artifact.open(spec.artifact)
    levels = spec.levels or art.levels
    for lv in levels:
        art.check_level(lv)
    if spec.mode == "dynamic" and not art.is_elastic:
        raise UserError(f"dynamic mode needs an EPTS artifact; this {art.method} artifact holds one level (use --mode baked)")
    if spec.mode == "dynamic" and len(levels) > 255:
        raise UserError("dynamic mode serves at most 255 levels in one graph")
    fp16 = spec.dtype == "fp16"
    t0 = time.time()
    with staged_dir(spec.out, overwrite=spec.overwrite) as tmp:
        with progress.status(f"loading {art.path}"):
            em = ElasticModel(art)
            model = _prepare_model(em, fp16)
            fam = family_for(model)
        weights = prunable_weight_names(model, fam)
        level_records = []
        timings: dict[str, float] = {}
        scratch = Path(tempfile.mkdtemp(prefix="epts-onnx-", dir=tmp))
        try:
            if spec.mode == "baked":
                with progress.count("exporting levels", len(levels)) as advance:
                    for lv in levels:
                        t = time.time()
                        em.at(lv)
                        folder = tmp / level_dirname(lv)
                        folder.mkdir()
                        traced = scratch / lv.name.replace(":", "of") / GRAPH_FILE
                        traced.parent.mkdir()
                        trace_to_onnx(model, fam, traced, spec.opset, fp16)
                        graph = onnx_graph.load(traced)
                        onnx_graph.finalize(graph, weights, metadata=_metadata(art, spec, [lv]))
                        sp = onnx_graph.weight_sparsity(graph, weights)
                        onnx_graph.save(graph, folder / GRAPH_FILE, spec.external_data)
                        _write_hf_side_files(model, em.tokenizer, folder)
                        shutil.rmtree(traced.parent)
                        level_records.append({"name": lv.name, "dir": level_dirname(lv), "pattern": _pattern(lv),
                                              "sparsity": lv.sparsity, "measured_sparsity": round(sp, 6)})
                        timings[lv.name] = round(time.time() - t, 2)
                        advance()
            else:
                with progress.status(f"exporting one graph for {len(levels)} levels"):
                    t = time.time()
                    em.at(None)
                    traced = scratch / GRAPH_FILE
                    trace_to_onnx(model, fam, traced, spec.opset, fp16)
                    graph = onnx_graph.load(traced)
                    dense_bytes = onnx_graph.initializer_bytes(graph)
                    onnx_graph.finalize(graph, weights, metadata=_metadata(art, spec, levels))
                    tables = onnx_graph.ElasticTables.build(em, levels, weights, fam, torch.float16 if fp16 else torch.float32)
                    onnx_graph.make_elastic(graph, tables)
                    onnx_graph.save(graph, tmp / GRAPH_FILE, spec.external_data)
                    _write_hf_side_files(model, em.tokenizer, tmp)
                    timings["all"] = round(time.time() - t, 2)
                for i, lv in enumerate(levels):
                    level_records.append({"name": lv.name, "index": i, "pattern": _pattern(lv), "sparsity": lv.sparsity})
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        manifest = {
            **EXPORT.header(), "mode": spec.mode, "dtype": spec.dtype,
            "opset": spec.opset, "levels": level_records,
            "source_artifact": {"path": str(art.path.resolve()), "manifest_sha256": sha256_file(art.path / "manifest.json"),
                                "method": art.method, "model": art.manifest.get("model", {}).get("spec")},
            "io": dict(zip(("inputs", "outputs"), io_names(model.config.num_hidden_layers, spec.mode == "dynamic"))),
            "dummy_shape": DUMMY,
            "weights": weights,
            "export_seconds": timings, "elapsed_s": round(time.time() - t0, 2),
            "library_versions": {**library_versions(), **_onnx_versions()},
            "parity": None,
            "files": file_hashes(tmp),
        }
        if spec.mode == "dynamic":
            manifest["dense_initializer_bytes"] = dense_bytes
        write_json(tmp / MANIFEST, manifest)
    return spec.out


def _pattern(level: Level) -> str:
    return f"{level.n}:{level.m}" if level.is_nm else "unstructured"


def _onnx_versions() -> dict[str, str]:
    import onnx

    return {"onnx": onnx.__version__}


def _metadata(art: Artifact, spec: ExportSpec, levels: list[Level]) -> dict[str, str]:
    meta = {"epts.format": EXPORT.format, "epts.mode": spec.mode, "epts.dtype": spec.dtype,
            "epts.source_manifest_sha256": sha256_file(art.path / "manifest.json"),
            "epts.levels": json.dumps([lv.name for lv in levels])}
    if spec.mode == "dynamic":
        meta["epts.sparsity_level"] = ("int64 scalar input: index into epts.levels; an index outside "
                                       "[0, len(levels)) makes every output NaN")
    return meta


# --------------------------------------------------------------------------------------------
# reading an export back


@dataclass
class OnnxExport:
    path: Path
    manifest: dict
    integrity_errors: list[HashError] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | Path, verify: str = "raise") -> "OnnxExport":
        """Read an export folder. ``verify``: 'raise' (UserError on a bad hash), 'collect' (keep
        the failures in ``integrity_errors``, for validate), or 'skip'."""
        p = Path(path)
        manifest = read_manifest(p, EXPORT)
        exp = cls(p, manifest)
        if verify == "raise":
            verify_hashes(p, manifest.get("files", {}), "export")
        elif verify == "collect":
            exp.integrity_errors = hash_errors(p, manifest.get("files", {}))
        return exp

    @property
    def mode(self) -> str:
        return self.manifest["mode"]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def levels(self) -> list[Level]:
        return [parse_level(r["name"]) for r in self.manifest["levels"]]

    def graph_path(self, level: Level) -> Path:
        if self.mode == "dynamic":
            return self.path / GRAPH_FILE
        return self.path / level_dirname(level) / GRAPH_FILE

    def level_index(self, level: Level) -> int | None:
        """The ``sparsity_level`` value of ``level`` in dynamic mode (None in baked mode)."""
        if self.mode != "dynamic":
            return None
        return [r["name"] for r in self.manifest["levels"]].index(level.name)

    def source_artifact(self, override: str | Path | None = None) -> Artifact:
        src = Path(override) if override else Path(self.manifest["source_artifact"]["path"])
        if not src.exists():
            raise UserError(f"the source artifact {src} of export {self.path} is not there; pass --artifact PATH")
        art = Artifact.open(src)
        want = self.manifest["source_artifact"]["manifest_sha256"]
        if sha256_file(art.path / "manifest.json") != want:
            raise UserError(f"artifact {src} is not the one export {self.path} was made from (manifest sha256 differs)")
        return art

    def record_parity(self, parity: dict) -> None:
        """Store the parity result in the manifest (written atomically)."""
        self.manifest["parity"] = parity
        write_json(self.path / MANIFEST, self.manifest)
