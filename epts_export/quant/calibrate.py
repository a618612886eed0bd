"""Calibration windows for INT8 ranges: by default the artifact's own calibration set, rebuilt
from its record (the same source, seed and window length; at most ``MAX_WINDOWS`` windows, which
is plenty for per-tensor maxima), or another source the user names."""

from __future__ import annotations

import torch

from ..errors import UserError
from ..pruning.calibration import CalibSpec, build_calibration

MAX_WINDOWS = 32
MAX_SEQLEN = 512


def int8_calibration(em, source: str | None = None):
    """``Calibration`` (windows and record) for the INT8 ranges of ``em``'s levels.

    ``source`` None: the artifact's recorded calibration; a text source must still hash to the
    recorded sha256 (else UserError: the text changed since optimize; pass --calib). Self-sampled
    windows come from the dense model (cached like optimize's) when the artifact is elastic."""
    rec = em.artifact.manifest.get("calibration") or {}
    src = source or rec.get("source") or "self"
    n = min(int(rec.get("nsamples") or MAX_WINDOWS), MAX_WINDOWS)
    t = min(int(rec.get("seqlen") or 256), MAX_SEQLEN, em.model.config.max_position_embeddings)
    spec = CalibSpec(src, n, t, int(rec.get("seed") or 0))
    elastic = em.elastic is not None
    model = em.at(None) if elastic and src == "self" else em.model
    key = (em.artifact.manifest.get("model") or {}).get("sha256") if elastic else None
    try:
        with torch.no_grad():
            calib = build_calibration(spec, em.tokenizer, model, model_key=key)
    except UserError as e:
        if "too short" not in str(e):
            raise
        raise UserError(f"calibration text {src} is too short for the INT8 ranges: they take {n} windows of {t} tokens"
                        f"{'' if source else ' (the artifact recorded this text)'}; give --calib a longer text") from None
    if source is None and rec.get("kind") not in (None, "self", "random") and rec.get("sha256") != calib.record["sha256"]:
        raise UserError(f"calibration text {src} changed since the artifact was optimized (its sha256 differs): "
                        "pass --calib with the text to take the INT8 ranges from")
    return calib
