"""The sparse-tactic report: which layers of a TensorRT engine could use 2:4 sparse math and which
got a sparse kernel, from the engine inspector's JSON and the builder's log.

Pure text analysis, standard library only: the device-side builder calls it after each build, and
``report`` puts it in the bundle's engine report.
"""

from __future__ import annotations

import json
import re

# the builder's log (tests/data/trt_layer_info/SOURCES.md has the real lines): TensorRT 8.x-10.x at INFO
#   (Sparsity) Layers eligible for sparse math: conv1, conv2
#   (Sparsity) TRT inference plan picked sparse implementation for layers: conv2
# TensorRT 10.14 and later at VERBOSE (a Myelin subgraph prints its own pair, "(foreignNode) (Sparsity) ...")
#   (Sparsity) Found 2 layer(s) eligible to use sparse tactics: node_conv2d + node_relu, node_linear
#   (Sparsity) Chose 0 layer(s) using sparse tactics:
ELIGIBLE_RE = re.compile(r"\(Sparsity\)\s*(?:layers eligible for sparse math|found \d+ layer\(s\) eligible to use sparse "
                         r"tactics)\s*:?(.*)$", re.IGNORECASE)
INT8_FORMAT_RE = re.compile(r"\bint8\b", re.IGNORECASE)  # "Thirty-two wide channel vectorized row major Int8 format"
INT8_TACTIC_RE = re.compile(r"(?:^|[_\W])(?:i8i8|int8|imma)", re.IGNORECASE)  # ..._i8i8_..., ..._int8int8_...
PICKED_RE = re.compile(r"\(Sparsity\)\s*(?:TRT inference plan picked sparse implementation for layers|chose \d+ layer\(s\) "
                       r"using sparse tactics)\s*:?(.*)$", re.IGNORECASE)

MYELIN_NAME_RE = re.compile(r"^\{ForeignNode\[|_myl\d+_\d+$")


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


def _inspect_layer(entry: dict) -> tuple[bool, bool, bool]:
    """(has sparse weights, runs a sparse tactic, computes in INT8) for one inspector layer entry.
    INT8: an input/output format or weight type naming Int8 (detailed verbosity), or an integer
    tactic name (``..._i8i8_...``, IMMA kernels)."""
    flags = {"weights": False, "tactic": False, "int8": False}

    def on_item(key: str, value) -> None:
        k = key.lower()
        if "tactic" in k:
            if isinstance(value, str) and "sparse" in value.lower():
                flags["tactic"] = True
            if isinstance(value, str) and INT8_TACTIC_RE.search(value):
                flags["int8"] = True
        elif "sparse" in k and not isinstance(value, (dict, list)) and _truthy(value):
            flags["weights"] = True
        elif ("format" in k or "datatype" in k or k == "type") and isinstance(value, str) and INT8_FORMAT_RE.search(value):
            flags["int8"] = True

    _walk(entry, on_item)
    return flags["weights"], flags["tactic"], flags["int8"]


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

    Transformer graphs are often compiled by Myelin: TensorRT 8.6-10.x show one opaque "Myelin"
    layer ("{ForeignNode[...]}") with no sparse flag, later 10.x its kernels as layers named
    "..._myl<N>_<M>" with tactic names only. ``myelin`` counts them: inside them only the log (and
    a tactic name) can tell.
    ``int8``: the layers that compute in INT8 (inspector only); ``picked_int8`` those of them that
    also got a sparse kernel: the sparse INT8 tactics an int8 engine is for (Q/DQ can cost them).
    Returns {"eligible": [...], "picked": [...], "int8": [...], "picked_int8": [...], "layers": n,
    "myelin": n, "source": "inspector+log" | "inspector" | "log" | "none"}.
    """
    eligible, picked, int8 = [], [], []
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
    detailed, myelin = False, 0
    for entry in layers or []:
        if not isinstance(entry, dict):
            continue
        name = _layer_name(entry)
        if name is None:
            continue
        detailed = True
        myelin += str(entry.get("LayerType", "")).lower() == "myelin" or bool(MYELIN_NAME_RE.search(name))
        has_weights, sparse_tactic, in_int8 = _inspect_layer(entry)
        if in_int8:
            int8.append(name)
        if has_weights or sparse_tactic:
            eligible.append(name)
        if sparse_tactic:
            picked.append(name)
    picked = _dedupe(picked)
    eligible = _dedupe(eligible + picked)  # a layer that runs a sparse kernel was eligible
    used_inspector = layers is not None and (detailed or len(layers) > 0)
    source = ("inspector+log" if used_inspector and saw_log else "inspector" if used_inspector
              else "log" if saw_log else "none")
    int8 = _dedupe(int8)
    return {"eligible": eligible, "picked": picked, "int8": int8, "picked_int8": [n for n in picked if n in set(int8)],
            "layers": len(layers or []), "myelin": myelin, "source": source}
