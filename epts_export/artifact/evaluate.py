"""Perplexity, the Wanda/SparseGPT protocol: the text tokenized once, cut into non-overlapping
``seqlen`` windows (tail dropped), exp of the mean next-token NLL over every predicted token."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .folder import Artifact
from ..text import read_text_source, tokenize_text
from ..errors import UserError
from ..models.families import measured_sparsity
from ..fsutil import sha256_bytes
from ..core.levels import Level
from .materialize import ElasticModel
from ..progress import Progress


@dataclass
class EvalData:
    ids: torch.Tensor  # (windows, seqlen) int64
    record: dict  # {"source", "sha256", "tokens"}


def check_context(seqlen: int, config, what: str = "--seqlen") -> None:
    """UserError when ``seqlen`` tokens do not fit the model's context (max_position_embeddings):
    OPT fails with an IndexError past it, LLaMA silently extrapolates its RoPE."""
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and seqlen > context:
        raise UserError(f"{what} {seqlen} is longer than the model's context of {context} tokens: use {what} {context} or less")


def load_eval_data(source: str, tokenizer, seqlen: int, max_windows: int | None = None) -> EvalData:
    if max_windows is not None and max_windows < 1:
        raise UserError(f"--max-windows must be >= 1, got {max_windows}")
    text, _ = read_text_source(source, "evaluation text")
    ids = tokenize_text(tokenizer, text)
    n = ids.numel() // seqlen
    if n < 1:
        raise UserError(f"evaluation text {source} has {ids.numel()} tokens, fewer than one --seqlen {seqlen} window")
    if max_windows:
        n = min(n, max_windows)
    return EvalData(ids[: n * seqlen].view(n, seqlen), {"source": source, "sha256": sha256_bytes(text.encode("utf-8")),
                                                       "tokens": int(ids.numel()), "windows": n})


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 1, advance=lambda n=1: None) -> float:
    """exp(mean NLL) of next-token prediction over (N, T) windows; each window predicts T-1 tokens."""
    model.eval()
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(windows), batch):
        x = windows[i: i + batch].to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()  # (B, T, V)
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
        advance(len(x))
    if not math.isfinite(nll):
        raise UserError("the model's outputs are not finite numbers (NaN or Inf in its weights): the artifact is "
                        "broken; optimize it again", 3)
    return math.exp(nll / count)


def evaluate(target: "str | Path | Artifact", data: str, seqlen: int, levels: list[Level] | None = None,
             progress: Progress | None = None, max_windows: int | None = None, model=None, dense: bool = True) -> dict:
    """Perplexity of an artifact at ``levels`` (default: every trained level) plus its dense
    reference (unless not ``dense``), or of a plain model. Returns the JSON report (see README).
    ``target``: a folder, or an opened Artifact; ``model``: that artifact's ElasticModel when the
    caller has it loaded."""
    progress = progress or Progress(enabled=False)
    opened = target if isinstance(target, Artifact) else None
    target = opened.path if opened else Path(target)
    if seqlen < 2:
        raise UserError("--seqlen must be >= 2")
    if max_windows is not None and max_windows < 1:
        raise UserError(f"--max-windows must be >= 1, got {max_windows}")
    rows: list[dict] = []
    if opened or (target / "manifest.json").is_file():
        art = opened or Artifact.open(target)
        if model is not None and model.artifact.manifest_sha256 == art.manifest_sha256:
            em = model
        else:
            with progress.status(f"loading artifact {target}"):
                em = ElasticModel(art)
        levels = levels if levels is not None else art.levels
        for lv in levels:
            art.check_level(lv)
        tok = em.tokenizer
        check_context(seqlen, em.model.config)
        ev = load_eval_data(data, tok, seqlen, max_windows)
        runs: list[tuple[str, object]] = []
        if dense:
            runs.append(("dense", (lambda: em.at(None)) if art.is_elastic else (lambda: _dense_of(art))))
        runs += [(lv.name, (lambda lv=lv: em.at(lv))) for lv in levels]
    else:
        from ..models import load_model, resolve_model

        with progress.status(f"loading model {target}"):
            model, tok = load_model(resolve_model(str(target), progress=progress.enabled).path)
        check_context(seqlen, model.config)
        ev = load_eval_data(data, tok, seqlen, max_windows)
        runs = [("dense", lambda: model)]
    with progress.count(f"perplexity ({len(ev.ids)} x {seqlen} tokens)", total=len(runs) * len(ev.ids)) as advance:
        for name, get in runs:
            model = get()
            if model is None:
                continue
            rows.append({"level": name, "sparsity": round(measured_sparsity(model), 6),
                         "ppl": perplexity(model, ev.ids, advance=advance)})
    return {"results": rows, "data": ev.record, "seqlen": seqlen}


def _dense_of(art: Artifact):
    """The dense reference for a one-level baseline artifact: its source model, when reachable."""
    from ..models import load_model, resolve_model

    spec = art.manifest["model"].get("spec")
    try:
        model, _ = load_model(resolve_model(spec, progress=False).path)
    except UserError:
        return None
    return model
