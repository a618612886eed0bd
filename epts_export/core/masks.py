"""Importance scores and masks: pure functions on tensors, no hooks or I/O.

Everything is row-wise over a torch ``nn.Linear.weight`` of shape (out, in): each output row
keeps its own most important input weights, and N:M groups run along ``in`` (the reduction axis
that sparse tensor cores need).

The importance order is stored, not the scores: ``order[i, j]`` is the position of weight j in
row i when the row is sorted by descending score (0 = most important). Every unstructured mask
and every N:M mask is a function of the order alone, which makes masks nested by construction
and the artifact compact (int16 for rows up to 32767 wide). ("rank" in this package means the
LoRA rank only.)
"""

from __future__ import annotations

import torch

from .levels import Level


def wanda_scores(weight: torch.Tensor, act_sq_mean: torch.Tensor) -> torch.Tensor:
    """Wanda importance |W_ij| * sqrt(mean_t x_tj^2).

    weight: (out, in); act_sq_mean: (in,) mean of x^2 per input channel over calibration tokens.
    Returns (out, in) float32.
    """
    assert act_sq_mean.shape == weight.shape[1:], f"stats {tuple(act_sq_mean.shape)} vs weight {tuple(weight.shape)}"
    return weight.float().abs() * act_sq_mean.float().clamp_min(0).sqrt().unsqueeze(0)


def obs_scores(weight: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Second-order (OBS) importance |W_ij| / sqrt([H^-1]_jj); H: X^T X / n, dampened by the caller
    (``core.closed_form.dampened``, SparseGPT's) so that it is positive definite.

    The error of removing w_ij alone and re-fitting the rest of its row optimally is
    w_ij^2 / [H^-1]_jj (Optimal Brain Surgeon); Wanda's |W_ij| sqrt(H_jj) is the same with the
    correlations between input channels left out. One fixed order per row, so its masks nest.
    weight: (out, in); H: (in, in). Returns (out, in) float32.
    """
    assert H.shape == (weight.shape[1],) * 2, f"H {tuple(H.shape)} vs weight {tuple(weight.shape)}"
    hinv_diag = torch.diagonal(torch.cholesky_inverse(torch.linalg.cholesky(H.double())))
    return weight.float().abs() * hinv_diag.clamp_min(1e-30).rsqrt().float().unsqueeze(0)


def importance_order(scores: torch.Tensor) -> torch.Tensor:
    """Per-row position of each weight by descending score; ties keep the lower column first.

    scores: (out, in). Returns (out, in) int16 if in <= 32767 else int32, with each row a
    permutation of 0..in-1.
    """
    out_f, in_f = scores.shape
    best_first = torch.argsort(scores, dim=1, descending=True, stable=True)  # (out, in): column ids, best first
    dtype = torch.int16 if in_f <= torch.iinfo(torch.int16).max else torch.int32
    order = torch.empty((out_f, in_f), dtype=dtype, device=scores.device)
    positions = torch.arange(in_f, device=scores.device, dtype=dtype).expand(out_f, in_f)
    order.scatter_(1, best_first, positions)
    return order


def keep_count(in_features: int, sparsity: float) -> int:
    """Weights kept per row at ``sparsity``: round-half-up((1 - s) * in)."""
    return int((1.0 - sparsity) * in_features + 0.5)


def unstructured_mask(order: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep each row's round((1-s)*in) best weights. order: (out, in). Returns bool (out, in)."""
    return order < keep_count(order.shape[1], sparsity)


def nm_mask(order: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n best of every m consecutive input columns. order: (out, in), in % m == 0."""
    out_f, in_f = order.shape
    if in_f % m:
        raise ValueError(f"N:M {n}:{m} needs in_features divisible by {m}, got {in_f}")
    grouped = order.view(out_f, in_f // m, m).long()  # (out, in/m, m)
    best = grouped.topk(n, dim=2, largest=False).indices  # (out, in/m, n): lowest position = best
    mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(2, best, True)
    return mask.view(out_f, in_f)


def level_mask(order: torch.Tensor, level: Level) -> torch.Tensor:
    """The mask of ``level`` (unstructured or N:M) from the importance order."""
    if level.is_nm:
        return nm_mask(order, level.n, level.m)
    return unstructured_mask(order, level.sparsity)


def magnitude_mask(weight: torch.Tensor, level: Level) -> torch.Tensor:
    """Magnitude pruning as in the Wanda repo's baseline: one threshold over the whole matrix
    for unstructured levels, |W| inside each group of m input columns for N:M."""
    w = weight.float().abs()
    if level.is_nm:
        return nm_mask(importance_order(w), level.n, level.m)
    k = int(w.numel() * level.sparsity)
    if k == 0:
        return torch.ones_like(w, dtype=torch.bool)
    threshold = w.flatten().kthvalue(k).values
    return w > threshold


def is_nm_sparse(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive input columns has at most n non-zeros."""
    out_f, in_f = weight.shape
    if in_f % m:
        return False
    nonzero = (weight != 0).view(out_f, in_f // m, m).sum(dim=2)
    return bool((nonzero <= n).all())
