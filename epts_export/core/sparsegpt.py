"""SparseGPT one-shot pruning (Frantar & Alistarh 2023), as small pure functions.

Follows the reference implementation (IST-DASLab/sparsegpt, ``SparseGPT.fasterprune``):

1. accumulate the layer-wise Hessian H = 2/n * sum_t x_t x_t^T of the linear layer's inputs
   over n calibration tokens (``HessianAccumulator``);
2. prune W (out, in) column by column, left to right, in blocks of ``blocksize`` input columns.
   Each pruned weight's error is spread over the not-yet-processed columns through the upper
   Cholesky factor of H^-1 (OBS update), so the surviving weights compensate for it.

The reduction axis is the input axis: masks are chosen over columns of W, and the error of a
column is propagated to the columns to its right.

One deliberate difference from the reference: for unstructured sparsity the reference keeps
``tmp <= sort(tmp)[int(numel * sparsity)]``, which prunes one weight more than asked (or more,
on ties) per block, and one weight even at sparsity 0. Here exactly ``int(numel * sparsity)``
weights with the smallest saliency are pruned per block.
"""

from __future__ import annotations

import torch

from .stats import DAMP, dampened


def _hinv_upper(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Dampened inverse Hessian as its upper Cholesky factor.

    Takes H (in, in) float32 (dead columns already patched) and returns U (in, in), upper
    triangular, with U^T U = (H + damp*I)^-1 and damp = percdamp * mean(diag(H)). Row i of U,
    from column i on, holds the OBS update for eliminating column i given columns < i are done.
    Raises ValueError if H (dampened) is not positive definite.
    """
    H = dampened(H, percdamp)
    L, info = torch.linalg.cholesky_ex(H)  # H = L L^T
    if info.item() != 0 or not torch.isfinite(L).all():
        raise ValueError(
            "SparseGPT: the Hessian H is not positive definite (Cholesky failed at minor "
            f"{info.item()}); add calibration data, raise percdamp (now {percdamp}), "
            "or check H for NaN/Inf"
        )
    Hinv = torch.cholesky_inverse(L)  # (in, in) = H^-1
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)  # Hinv = U^T U
    if info.item() != 0 or not torch.isfinite(U).all():
        raise ValueError(
            "SparseGPT: the inverse Hessian is not positive definite (Cholesky of H^-1 failed "
            f"at minor {info.item()}); H is too ill-conditioned, raise percdamp (now {percdamp})"
        )
    return U


def _unstructured_mask(W1: torch.Tensor, d: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask (True = prune) of exactly int(numel * sparsity) entries of the block W1 (out, b).

    Saliency is the OBS error w^2 / [H^-1]_ii^2 with d = diag of the block's Hinv factor (b,);
    the threshold is chosen over the whole block (all rows together), as in the reference.
    """
    tmp = W1**2 / d.reshape(1, -1) ** 2  # (out, b)
    k = int(tmp.numel() * sparsity)
    mask = torch.zeros(tmp.numel(), dtype=torch.bool, device=W1.device)
    if k > 0:
        mask[torch.topk(tmp.flatten(), k, largest=False).indices] = True
    return mask.reshape(tmp.shape)


def sparsegpt_prune(
    weight: torch.Tensor,
    H: torch.Tensor,
    *,
    sparsity: float = 0.0,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = DAMP,
) -> torch.Tensor:
    """Prune a linear layer's weight with SparseGPT.

    Takes weight (out, in) of any float dtype (not modified) and H (in, in) from
    ``core.stats.HessianAccumulator`` (not modified). Either ``sparsity`` (unstructured: that fraction of
    each block of ``blocksize`` columns, chosen over all rows of the block) or ``nm=(N, M)``
    (keep N of every M consecutive input columns per row; ``sparsity`` is then ignored).
    Returns the pruned weight (out, in) in weight's dtype, computed in float32, with exact zeros
    where pruned. Raises ValueError on bad arguments or a Hessian that is not positive definite.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if H.shape != (cols, cols):
        raise ValueError(f"H must be ({cols}, {cols}) for weight {tuple(weight.shape)}, got {tuple(H.shape)}")
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    if percdamp < 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    if nm is not None:
        n_keep, m = nm
        if not (m > 0 and 0 <= n_keep <= m):
            raise ValueError(f"nm must be (N, M) with 0 <= N <= M and M > 0, got {nm}")
        if blocksize % m or cols % m:
            raise ValueError(
                f"N:M with M={m} needs blocksize ({blocksize}) and in_features ({cols}) divisible by M"
            )
        prunen = m - n_keep  # zeros per group of M columns
    else:
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
        m, prunen = 0, 0

    W = weight.detach().to(torch.float32).clone()  # (out, in), our working copy
    H = H.detach().to(device=W.device, dtype=torch.float32).clone()  # (in, in)

    # dead inputs (never nonzero in calibration) carry no information: give them a unit
    # Hessian entry so H stays invertible, and zero their weights
    dead = torch.diag(H) == 0  # (in,)
    H[dead, dead] = 1
    W[:, dead] = 0

    Hinv = _hinv_upper(H, percdamp)  # (in, in) upper triangular

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1

        W1 = W[:, i1:i2].clone()  # (out, b) block being pruned, updated in place
        Q1 = torch.zeros_like(W1)  # (out, b) final (pruned) values of the block
        Err1 = torch.zeros_like(W1)  # (out, b) scaled errors, for the lazy update of later blocks
        Hinv1 = Hinv[i1:i2, i1:i2]  # (b, b)
        d1 = torch.diag(Hinv1)  # (b,)

        if prunen == 0 and nm is None:
            # adaptive mask: chosen once per block from the (already compensated) block weights
            mask1 = _unstructured_mask(W1, d1, sparsity)  # (out, b) True = prune
        else:
            # N:M: filled group by group below, so each group sees the errors of earlier ones
            mask1 = torch.zeros_like(W1, dtype=torch.bool)

        for i in range(count):
            w = W1[:, i]  # (out,)
            d = Hinv1[i, i]  # scalar

            if prunen != 0 and i % m == 0:
                tmp = W1[:, i : i + m] ** 2 / d1[i : i + m].reshape(1, -1) ** 2  # (out, M)
                idx = torch.topk(tmp, prunen, dim=1, largest=False).indices  # (out, prunen)
                mask1.scatter_(1, i + idx, True)

            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q

            # OBS update: spread this column's error over the remaining columns of the block
            err1 = (w - q) / d  # (out,)
            W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)  # (out,1)@(1,b-i)
            Err1[:, i] = err1

        W[:, i1:i2] = Q1
        # lazy batch update: all of this block's errors hit the later columns at once
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # (out, b) @ (b, in-i2)

    return W.to(weight.dtype)
