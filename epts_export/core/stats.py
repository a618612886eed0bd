"""The statistics a block's calibration pass gathers per linear layer, one accumulator each, and the
one dampening of a second-moment matrix.

- ``RowScalars``: per input channel, the sum of x^2 over every token and the token count (Wanda's
  statistic: its mean is E[x_j^2]). EPTS's importance order and the Wanda baseline read it.
- ``InputGram``: X^T X summed over every token, float32, and the token count (its mean is the
  input's second moment, the metric of EPTS's closed-form start and of the OBS order).
- ``HessianAccumulator``: SparseGPT's H = 2/n X^T X as the reference keeps it, a running mean
  rescaled at every batch (so that the scale never grows), which the SparseGPT baseline prunes with.

InputGram and HessianAccumulator hold the same statistic up to a factor 2/n; they are summed
differently (a plain float32 sum, the reference's running mean), and each method keeps the
rounding its artifacts were produced with. Each accumulator ``combine``s the accumulators of
disjoint token sets, one per process (``torchrun``), given an in-place sum over the processes
(``torch.distributed.all_reduce``): the result is what one accumulator fed every token holds, up
to float rounding.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

DAMP = 0.01  # H + DAMP * mean(diag H) * I: SparseGPT's dampening, the closed form's and the OBS order's too
AllReduce = Callable[[torch.Tensor], None]


def dampened(H: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """H + damp * mean(diag H) * I (float32, a copy); a dead input channel (zero diagonal) gets 1."""
    H = H.float().clone()
    diag = torch.diagonal(H)
    diag[diag == 0] = 1.0
    diag += damp * diag.mean()
    return H


def _sum_count(count: int, device, all_reduce: AllReduce) -> int:
    n = torch.tensor([float(count)], dtype=torch.float64, device=device)
    all_reduce(n)
    return int(n.item())


class RowScalars:
    """sum_t x_tj^2 per input channel j (float64) and the tokens seen, for one linear layer."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Fold the layer inputs x (..., in) in."""
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.sq_sum += x.pow(2).sum(0).double()
        self.tokens += x.shape[0]

    def combine(self, all_reduce: AllReduce) -> None:
        all_reduce(self.sq_sum)
        self.tokens = _sum_count(self.tokens, self.sq_sum.device, all_reduce)

    def mean(self) -> torch.Tensor:
        """E[x_j^2] per input channel (in,), float32."""
        return (self.sq_sum / max(self.tokens, 1)).float()


class InputGram:
    """X^T X (in, in) summed over every token in float32, and the tokens seen, for one linear layer."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, xtx: torch.Tensor, tokens: int) -> None:
        """Fold x^T x (in, in) of ``tokens`` inputs in (the caller computes it once for the layers
        that read the same input: q, k and v)."""
        self.sum += xtx
        self.tokens += tokens

    def combine(self, all_reduce: AllReduce) -> None:
        all_reduce(self.sum)
        self.tokens = _sum_count(self.tokens, self.sum.device, all_reduce)

    def mean(self) -> torch.Tensor:
        """X^T X / n (in, in), float32."""
        return self.sum / max(self.tokens, 1)


class HessianAccumulator:
    """Accumulates H = 2/n * sum x x^T over calibration tokens for one linear layer with in_features columns.

    Keeps a running mean exactly as the reference does (so the scale never blows up):
    ``H *= n/(n+t); x = sqrt(2/(n+t)) * x; H += x^T x``, in float32. Unlike the reference, which
    counts sequences, ``n`` counts tokens (every row of the flattened input), so after feeding
    the rows of X (n, in) in any number of batches, ``H == 2/n * X^T X``.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        self.in_features = in_features
        self.nsamples: int = 0  # tokens seen so far
        self._H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)

    def add_batch(self, x: torch.Tensor) -> None:
        """Fold a batch of layer inputs x (..., in_features), any leading dims, into H."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected inputs with last dim {self.in_features}, got shape {tuple(x.shape)}"
            )
        x = x.reshape(-1, self.in_features).to(device=self._H.device, dtype=torch.float32)  # (t, in)
        t = x.shape[0]
        if t == 0:
            return
        # rescale the old mean to the new count, then add the new tokens at weight 2/(n+t)
        self._H *= self.nsamples / (self.nsamples + t)
        self.nsamples += t
        x = math.sqrt(2 / self.nsamples) * x  # (t, in)
        self._H += x.t() @ x  # (in, t) @ (t, in) -> (in, in)

    def combine(self, all_reduce: AllReduce) -> None:
        """H = sum_r n_r H_r / sum_r n_r over the processes: 2/n X^T X over every token."""
        self._H *= self.nsamples  # (in, in) = 2 X_r^T X_r, float32 like the running mean itself
        all_reduce(self._H)
        self.nsamples = _sum_count(self.nsamples, self._H.device, all_reduce)
        self._H /= max(self.nsamples, 1)

    @property
    def H(self) -> torch.Tensor:
        """The accumulated Hessian (in, in), float32 (the live buffer, not a copy)."""
        return self._H
