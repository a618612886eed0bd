"""GGUF file -> plain float32 Hugging Face folder.

:func:`convert_gguf` lets transformers dequantize a GGUF file, saves the result with
``save_pretrained`` as float32 safetensors plus the tokenizer, reloads that folder with a plain
``from_pretrained`` and checks it gives the very same logits and tokens (and that tied embeddings
stay tied). Where the folder goes, and caching it, is :mod:`epts_export.models.resolve`'s business.
torch and transformers are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..errors import UserError, one_line
from .hf import save_model, save_tokenizer

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["convert_gguf"]

_VERIFY_TEXT = "The quick brown fox jumps over the lazy dog. 1, 2, 3."


def convert_gguf(gguf: Path, dest: Path, record: dict) -> dict:
    """Dequantize ``gguf`` with transformers and save it to ``dest`` (created) as a verified plain folder.

    Returns ``record`` plus what the conversion found: ``transformers`` (its version), ``model_type``,
    ``dtype`` and ``verified_max_abs_logit_diff`` (0.0: the reloaded folder matched exactly). A file
    transformers cannot read is a :class:`UserError`; a folder that does not reload identically is a
    RuntimeError (a bug, not the user's to fix).
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from transformers import GgufConfig
        quant = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older transformers always dequantize GGUF files
        quant = {}

    with _quiet_transformers():
        try:
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **quant)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - unsupported architecture, corrupt file, ...
            raise UserError(f"could not read GGUF file {gguf}: {one_line(exc)}; "
                            "pass a Hugging Face model folder instead") from exc
        model.eval()
        check = _save_plain(model, tokenizer, dest)

    record = {
        **record,
        "transformers": transformers.__version__,
        "model_type": model.config.model_type,
        "dtype": "float32",
        "verified_max_abs_logit_diff": check,
    }
    del model
    gc.collect()  # free the float32 weights (model and its reload) now, not whenever the collector runs
    return record


def _save_plain(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", dest: Path) -> float:
    """Save a (GGUF-loaded, dequantized) model as a plain float32 safetensors folder and verify it.

    Drops any quantization state left on the model (``save_pretrained`` refuses quantized models whose
    quantizer is not serializable; dequantized weights are plain tensors), saves model and tokenizer,
    reloads the folder with plain ``from_pretrained`` and checks it gives the same logits and tokens,
    and that tied embeddings stay tied. Returns the largest absolute logit difference (0.0 expected).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _strip_quantization(model)
    model.to(torch.float32)
    model.eval()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied:
        _check_tied(model, "before saving")

    ids = _probe_ids(tokenizer, model.config)
    with torch.no_grad():
        reference = model(input_ids=ids).logits.float().clone()

    dest.mkdir(parents=True, exist_ok=True)
    save_model(model, dest)
    save_tokenizer(tokenizer, dest)
    if not any(p.suffix == ".safetensors" for p in dest.iterdir()):
        raise RuntimeError(f"save_pretrained wrote no safetensors file in {dest}")
    config = json.loads((dest / "config.json").read_text())
    if "quantization_config" in config:
        raise RuntimeError(f"saved config in {dest} still has a quantization_config")

    reloaded = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32)
    reloaded.eval()
    if getattr(reloaded, "hf_quantizer", None) is not None or getattr(reloaded.config, "quantization_config", None):
        raise RuntimeError(f"reloaded {dest} is still marked quantized")
    if tied:
        _check_tied(reloaded, "after reloading")
    with torch.no_grad():
        logits = reloaded(input_ids=ids).logits.float()
    if logits.shape != reference.shape:
        raise RuntimeError(f"reloaded {dest} gives logits of shape {tuple(logits.shape)}, "
                           f"expected {tuple(reference.shape)}")
    diff = float((logits - reference).abs().max())
    if not torch.equal(logits, reference):
        raise RuntimeError(f"reloaded {dest} gives different logits than the model it was saved from "
                           f"(max abs diff {diff:.3g})")

    reloaded_tok = AutoTokenizer.from_pretrained(dest)
    if reloaded_tok(_VERIFY_TEXT)["input_ids"] != tokenizer(_VERIFY_TEXT)["input_ids"]:
        raise RuntimeError(f"reloaded tokenizer in {dest} tokenizes differently than the original")
    del reloaded
    return diff


def _strip_quantization(model: "PreTrainedModel") -> None:
    """Make a model whose weights are already plain tensors look unquantized, so it saves normally.

    With ``GgufConfig(dequantize=True)`` transformers already does this after loading; a GGUF loaded
    without it (or by an older transformers) keeps ``config.quantization_config`` and an
    ``hf_quantizer`` whose ``is_serializable()`` is False, and ``save_pretrained`` refuses it.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)  # transformers' own way; also drops the hf_quantizer
    for obj, names in ((model, ("hf_quantizer", "quantization_method")),
                       (model.config, ("quantization_config", "_is_quantized"))):
        for name in names:
            if name in getattr(obj, "__dict__", {}):
                delattr(obj, name)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    # a model still holding packed (integer) weights cannot be saved as plain tensors
    for name, param in model.named_parameters():
        if not param.is_floating_point():
            raise RuntimeError(f"weight {name} is not a float tensor ({param.dtype}); the model was not "
                               "fully dequantized")


def _check_tied(model: "PreTrainedModel", when: str) -> None:
    """RuntimeError unless the input and output embeddings share one tensor (``when``: for the message)."""
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    if out is None or inp is None:
        return
    if out.weight.data_ptr() != inp.weight.data_ptr():
        raise RuntimeError(f"tie_word_embeddings is set but the output embeddings are not tied {when}")


def _probe_ids(tokenizer: "PreTrainedTokenizerBase", config) -> "torch.Tensor":
    """A (1, <=64) batch of token ids to compare logits on: the tokenized probe text, else 1..16."""
    import torch

    try:
        ids = tokenizer(_VERIFY_TEXT, return_tensors="pt")["input_ids"]
    except Exception:  # noqa: BLE001 - a broken tokenizer still gets caught by the reload check
        ids = None
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if ids is None or ids.numel() == 0 or (vocab and int(ids.max()) >= vocab):
        ids = torch.arange(1, 17).remainder(max(vocab, 2)).unsqueeze(0)
    return ids[:, :64]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' own progress bars and warnings while we convert (we show our own status)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # the GGUF reader uses a plain tqdm, which the switch above does not reach
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
