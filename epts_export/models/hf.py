"""Loading a plain Hugging Face folder, and writing folders that every supported transformers reads.

This is the one place that calls ``AutoModelForCausalLM.from_pretrained`` on a local folder: a model
resolved by :func:`epts_export.models.resolve.resolve_model`, or any other plain folder (an artifact's
model). torch and transformers are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError, one_line
from ..fsutil import write_text

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["load_model", "save_config", "save_model", "save_tokenizer", "compatible_config"]


def load_model(folder: Path | str, dtype: "torch.dtype | None" = None) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load a Hugging Face causal LM folder (a ``ResolvedModel``'s ``path``, an artifact's model) on
    CPU, in eval mode, in ``dtype`` (float32 by default). Returns ``(model, tokenizer)``. A folder transformers cannot read (missing or bad config,
    weights or tokenizer files) is a one-line :class:`UserError` ("could not load ...").
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype is None:
        dtype = torch.float32
    path = Path(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=None)
    except Exception as exc:  # noqa: BLE001 - OSError, a truncated safetensors (SafetensorError), a bad config...
        raise UserError(f"could not load model from {path}: {one_line(exc)}; "
                        "pass a Hugging Face causal LM folder or a .gguf file") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - every failure means the same to the user
        raise UserError(f"could not load the tokenizer from {path}: {one_line(exc)}; "
                        "the folder needs its tokenizer files (tokenizer.json or tokenizer.model)") from exc
    model.to("cpu")
    model.eval()
    return model, tokenizer


def compatible_config(config: dict) -> dict:
    """A config.json dict that transformers 4.x and 5.x read the same way (changed in place, returned).

    transformers 5 keeps RoPE settings only in ``rope_parameters``; 4.x reads ``rope_theta`` and
    ``rope_scaling`` at the top level and, when they are missing, silently falls back to
    ``rope_theta = 10000`` (SmolLM2 uses 100000: generation diverges after a few tokens, with no
    error). 5.x reads ``rope_parameters`` first, so the copies below change nothing there.
    """
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
        config.setdefault("rope_scaling", None if scaling.get("rope_type", "default") == "default" else scaling)
        if "partial_rotary_factor" in rope:
            config.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
    return config


def _rewrite_config(folder: Path) -> None:
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    write_text(path, json.dumps(compatible_config(config), indent=2, sort_keys=True) + "\n")


def save_model(model, folder: Path) -> None:
    """``model.save_pretrained(folder)`` with a config.json that transformers 4.x and 5.x read alike."""
    model.save_pretrained(folder)
    _rewrite_config(folder)


def save_config(config, folder: Path) -> None:
    """``config.save_pretrained(folder)``, made readable alike by transformers 4.x and 5.x."""
    config.save_pretrained(folder)
    _rewrite_config(folder)


def save_tokenizer(tokenizer, folder: Path, input_names: list[str] | None = None) -> None:
    """``tokenizer.save_pretrained`` that both transformers 4.57 and 5.x can read back.

    transformers 5 writes its new class name ``TokenizersBackend``, unknown to 4.57 (the line
    optimum-onnx needs); ``PreTrainedTokenizerFast`` names the same fast tokenizer in both.
    ``input_names`` overrides ``model_input_names`` (an exported graph takes no token_type_ids).
    """
    tokenizer.save_pretrained(folder)
    tc = Path(folder) / "tokenizer_config.json"
    if not tc.is_file():
        return
    conf = json.loads(tc.read_text())
    if conf.get("tokenizer_class") == "TokenizersBackend":
        conf["tokenizer_class"] = "PreTrainedTokenizerFast"
    if input_names is not None:
        conf["model_input_names"] = input_names
    write_text(tc, json.dumps(conf, indent=2) + "\n")
