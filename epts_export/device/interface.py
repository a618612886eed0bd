"""The exported decoder's interface, written once: names, KV layout, shape ranges, folder names.

The graph is optimum's ``text-generation-with-past`` decoder, as ONE unmerged graph:

    inputs   input_ids       (batch, seq)                         int64
             attention_mask  (batch, past + seq)                  int64
             position_ids    (batch, seq)                         int64
             past_key_values.{i}.key|value (batch, kv_heads, past, head_dim)   float32 | float16
             sparsity_level  ()  int64, dynamic mode only: index into the graph's level table
    outputs  logits          (batch, seq, vocab)                  float32 (also for fp16 graphs)
             present.{i}.key|value (batch, kv_heads, past + seq, head_dim)

The exporter, the parity check, ONNX Runtime and TensorRT runtimes, the engine builder and the
trtexec script writer all read these definitions. Standard library only: a copy travels inside
bundles with the device-side engine builder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Tuple

from .errors import UserError
from .files import ManifestFormat

GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"  # external weights, beside the graph
# dynamic mode also writes the whole graph in two parts that share DATA_FILE, and its level table
WEIGHTS_GRAPH = "weights.onnx"  # sparsity_level -> the level's prunable weights
DECODER_GRAPH = "decoder.onnx"  # the decoder, its prunable weights supplied by the runtime
LEVELS_FILE = "levels.json"  # {"input": "sparsity_level", "levels": [names]}: index -> level name
LEVELS_METADATA = "epts.levels"  # the same table in the graphs' metadata_props (JSON list of names)
ENGINES_JSON = "engines.json"  # the engine specs of a bundle
# an ONNX export folder's manifest (written by onnx.export, read by onnx.reader and the runner)
EXPORT = ManifestFormat("epts-onnx", 1, "ONNX export", "create one with `epts-export export`",
                        fields=(("mode", str), ("dtype", str), ("levels", list), ("io", dict), ("weights", dict),
                                ("source_artifact", dict)))

ID_INPUTS = ("input_ids", "attention_mask", "position_ids")
LEVEL_INPUT = "sparsity_level"
LOGITS = "logits"
PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
PRESENT_RE = re.compile(r"^present\.(\d+)\.(key|value)$")

PRECISIONS = ("fp16", "bf16", "fp32")  # what a device target may ask for


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def io_names(layers: int, dynamic: bool = False) -> tuple[list[str], list[str]]:
    """(input names, output names) in graph order."""
    inputs = [*ID_INPUTS, *past_names(layers)] + ([LEVEL_INPUT] if dynamic else [])
    return inputs, [LOGITS, *present_names(layers)]


def dynamic_axes(layers: int) -> dict[str, dict[int, str]]:
    """torch.onnx.export's dynamic_axes for the decoder (optimum's axis names)."""
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            LOGITS: {0: "batch_size", 1: "sequence_length"}}
    for name in past_names(layers):
        axes[name] = {0: "batch_size", 2: "past_sequence_length"}
    for name in present_names(layers):
        axes[name] = {0: "batch_size", 2: "total_sequence_length"}
    return axes


def level_dirname(level) -> str:
    """Folder of a baked level (a Level or its name): 'level-0.5', 'level-2of4'. No ':' in paths:
    tar, scp and Windows read it as host:path."""
    return "level-" + str(getattr(level, "name", level)).replace(":", "of")


@dataclass(frozen=True)
class KVLayout:
    """The KV cache of one model: ``layers`` x (key, value), each (batch, kv_heads, past, head_dim)."""

    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> "KVLayout":
        """From a Hugging Face config (LLaMA, OPT, ...): grouped-query heads and head_dim when given."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim)

    def bytes_per_token(self, elem_bytes: int) -> int:
        """KV cache bytes per cached token of one sequence."""
        return 2 * self.layers * self.kv_heads * self.head_dim * elem_bytes


Triple = Tuple[int, int, int]  # typing.Tuple: JetPack 5 runs Python 3.8


@dataclass(frozen=True)
class ShapeRange:
    """One optimization profile: (min, opt, max) of batch, new tokens (seq) and cached tokens (past)."""

    name: str  # "prefill" | "decode" | "continue"
    batch: Triple
    seq: Triple
    past: Triple

    AXES = ("batch", "seq", "past")

    def to_dict(self) -> dict[str, list[int]]:
        """The three triples as JSON lists, keyed by axis name."""
        return {axis: list(getattr(self, axis)) for axis in self.AXES}

    @classmethod
    def from_dict(cls, name: str, d: dict) -> "ShapeRange":
        return cls(name, *(triple(d[axis], f"profile {name} {axis}") for axis in cls.AXES))


def triple(value, what: str) -> Triple:
    try:
        t = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be three integers [min, opt, max], got {value!r}") from None
    if len(t) != 3:
        raise UserError(f"{what} must be three integers [min, opt, max], got {value!r}")
    return t  # type: ignore[return-value]


def _check_range(t: Triple, what: str, low: int) -> None:
    if not (low <= t[0] <= t[1] <= t[2]):
        raise UserError(f"{what} = {list(t)} is not a valid range: it needs {low} <= min <= opt <= max")


def profile_shapes(profiles: list[ShapeRange], kv: KVLayout, what: str = "engine") -> dict[str, list[tuple[str, tuple, tuple, tuple]]]:
    """profile name -> [(input name, min shape, opt shape, max shape)] for every decoder input.

    ``input_ids``/``position_ids`` are (batch, seq), ``attention_mask`` is (batch, past + seq) and
    each ``past_key_values.{i}.key|value`` is (batch, kv_heads, past, head_dim). Pure; UserError for
    ranges TensorRT would reject (min > opt, seq < 1, past < 0, duplicate profile names).
    """
    if not profiles:
        raise UserError(f"{what} has no optimization profiles: give at least one (prefill, decode)")
    if kv.layers < 1 or kv.kv_heads < 1 or kv.head_dim < 1:
        raise UserError(f"KV layout {kv} is invalid: layers, kv_heads and head_dim must be positive")
    out: dict[str, list[tuple[str, tuple, tuple, tuple]]] = {}
    for p in profiles:
        if p.name in out:
            raise UserError(f"optimization profile {p.name!r} is given twice: profile names must be unique")
        batch = triple(p.batch, f"profile {p.name} batch")
        seq = triple(p.seq, f"profile {p.name} seq")
        past = triple(p.past, f"profile {p.name} past")
        _check_range(batch, f"profile {p.name} batch", 1)
        _check_range(seq, f"profile {p.name} seq", 1)
        _check_range(past, f"profile {p.name} past", 0)
        total = tuple(past[k] + seq[k] for k in range(3))
        rows = [
            ("input_ids", *((batch[k], seq[k]) for k in range(3))),
            ("attention_mask", *((batch[k], total[k]) for k in range(3))),
            ("position_ids", *((batch[k], seq[k]) for k in range(3))),
        ]
        for name in past_names(kv.layers):
            rows.append((name, *((batch[k], kv.kv_heads, past[k], kv.head_dim) for k in range(3))))
        out[p.name] = rows
    return out


def cap_profile(profile: ShapeRange, max_tokens: int) -> ShapeRange:
    """``profile`` with seq max + past max cut to ``max_tokens`` (a model's max_position_embeddings),
    both in the proportion the profile gives them, keeping each min and the opt within the max:
    prefill (past 0) keeps max_tokens new tokens, decode (one new token) max_tokens - 1 cached ones.
    Unchanged when it already fits. Pure; UserError when even the mins do not fit."""
    seq, past = triple(profile.seq, "seq"), triple(profile.past, "past")
    if seq[2] + past[2] <= max_tokens:
        return profile
    if seq[0] + past[0] > max_tokens:
        raise UserError(f"profile {profile.name} needs at least {seq[0] + past[0]} tokens (seq min {seq[0]} + past "
                        f"min {past[0]}), more than the model's {max_tokens}: lower the mins in the target")
    seq_max = seq[2] * max_tokens // (seq[2] + past[2])
    seq_max = min(max(seq_max, seq[0]), max_tokens - past[0])
    past_max = max_tokens - seq_max if past[2] > 0 else 0
    past_max = min(past_max, past[2])

    def cut(t: Triple, mx: int) -> Triple:
        return (min(t[0], mx), min(t[1], mx), mx)

    return ShapeRange(profile.name, profile.batch, cut(seq, seq_max), cut(past, past_max))
