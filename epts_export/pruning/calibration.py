"""Calibration data: token windows from a text file or folder, a dataset, or the model itself.

Sources (``--calib``):
  path/to/file.txt | path/to/folder   plain text (folder: every *.txt / *.md inside, sorted)
  hf:NAME[:CONFIG[:SPLIT]]            a `datasets` dataset; `hf:c4` and `hf:wikitext2` are the papers' sets
  self                                sequences sampled from the dense model itself (no data needed)
  random                              uniformly random token ids (no data needed; a baseline for `self`)

``nsamples`` windows of ``seqlen`` tokens are drawn with ``seed``. A text source is cut into
non-overlapping windows at a random offset and ``nsamples`` of them are picked without
replacement, so no token is seen twice; a source with fewer than nsamples*seqlen tokens is an
error rather than a silent shortfall.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from ..fsutil import atomic_path, sha256_bytes
from ..text import read_text_source, tokenize_text, window_samples
from .presets import DATA_FREE

@dataclass(frozen=True)
class CalibSpec:
    source: str = "self"
    nsamples: int = 32
    seqlen: int = 256
    seed: int = 0


@dataclass
class Calibration:
    samples: torch.Tensor  # (nsamples, seqlen) int64 token ids
    record: dict  # what the artifact stores: source, kind, sha256, tokens, nsamples, seqlen, seed


@torch.no_grad()
def self_samples(model, tokenizer, nsamples: int, seqlen: int, seed: int, batch: int = 16) -> torch.Tensor:
    """Sequences sampled from the model (temperature 1, from its BOS token), seeded; (N, T) int64.

    Data-free calibration as in LLM-QAT: the dense model's own distribution stands in for text.
    EOS tokens are allowed; sampling simply continues past them.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (tokenizer.eos_token_id or 0)
    gen_cfg = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=seqlen - 1, min_new_tokens=seqlen - 1,
                   pad_token_id=tokenizer.eos_token_id, eos_token_id=None)
    rows = []
    torch.manual_seed(seed)  # generate() samples from the global generator
    for i in range(0, nsamples, batch):
        b = min(batch, nsamples - i)
        prompt = torch.full((b, 1), start, dtype=torch.long)
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **gen_cfg)
        rows.append(out[:, :seqlen])
    return torch.cat(rows)


def _cached_self_samples(model, tokenizer, spec: CalibSpec, model_key: str | None) -> torch.Tensor:
    """``self_samples``, cached per (model, nsamples, seqlen, seed): sampling is the slow part on CPU."""
    if not model_key:
        return self_samples(model, tokenizer, spec.nsamples, spec.seqlen, spec.seed)
    from safetensors.torch import load_file, save_file

    from ..models.resolve import cache_dir

    path = cache_dir() / "calib" / f"self-{model_key[:16]}-{spec.nsamples}x{spec.seqlen}-seed{spec.seed}.safetensors"
    if path.is_file():
        return load_file(path)["samples"]
    samples = self_samples(model, tokenizer, spec.nsamples, spec.seqlen, spec.seed)
    with atomic_path(path) as tmp:
        save_file({"samples": samples.contiguous()}, str(tmp))
    return samples


def build_calibration(spec: CalibSpec, tokenizer, model=None, model_key: str | None = None) -> Calibration:
    """Calibration windows and their record. ``model`` is needed only for the ``self`` source;
    ``model_key`` (the model's sha256) lets self-generated sets be cached and reused."""
    if spec.nsamples < 1 or spec.seqlen < 2:
        raise UserError("--nsamples must be >= 1 and --seqlen >= 2")
    if spec.source in DATA_FREE:
        assert model is not None, f"the {spec.source} source needs the model"
        if spec.source == "self":
            samples = _cached_self_samples(model, tokenizer, spec, model_key)
        else:
            gen = torch.Generator().manual_seed(spec.seed)
            samples = torch.randint(0, model.config.vocab_size, (spec.nsamples, spec.seqlen), generator=gen)
        sha = sha256_bytes(samples.numpy().tobytes())
        return Calibration(samples, {"source": spec.source, "kind": spec.source, "sha256": sha, "tokens": int(samples.numel()),
                                     "nsamples": spec.nsamples, "seqlen": spec.seqlen, "seed": spec.seed})
    text, kind = read_text_source(spec.source)
    ids = tokenize_text(tokenizer, text)
    samples = window_samples(ids, spec.nsamples, spec.seqlen, spec.seed, f"calibration source {spec.source}")
    record = {"source": spec.source, "kind": kind, "sha256": sha256_bytes(text.encode("utf-8")), "tokens": int(ids.numel()),
              "nsamples": spec.nsamples, "seqlen": spec.seqlen, "seed": spec.seed}
    return Calibration(samples, record)
