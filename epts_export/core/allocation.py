"""Layer-wise sparsity allocation that keeps the masks nested: which sparsity each block prunes to
at a global level.

At global unstructured level s, block l prunes to

    s_l(s) = s + d_l * ramp(s),   ramp(s) = min(s, 1 - s, R) / R

``d_l`` is a fixed per-block offset whose parameter-weighted mean is 0, so the prunable weights'
overall sparsity is s (up to each row's rounding of its keep count). ``ramp`` is 1 over [R, 1 - R]
and shrinks the offsets linearly to 0 at s = 0 and s = 1, so that s_l stays in [0, 1]. With
|d_l| <= R every s_l rises with s: a weight pruned at one level stays pruned at every higher one,
the masks of one block stay nested and one elastic model still serves every level. N:M levels are
a pattern, not a fraction: every block keeps it.

The offsets come from one score per block, scaled to [0, 2 lambda]; each block's offset is minus
its scaled score's distance from their mean (a higher score, fewer weights pruned):

- ``owl`` (Yin et al., 2024, "Outlier Weighed Layerwise sparsity"): the outlier ratio D_l, the
  fraction of the block's Wanda scores above M times their mean. The paper's setting for LLaMA:
  M = 5, lambda = 0.08.
- ``error``: the block's sensitivity, the log of its output error when pruned alone
  (``pruning.allocate``).

Nothing here needs torch except ``outlier_ratio``: reading an artifact reads its allocation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError

RAMP = 0.25  # R: offsets apply in full over [0.25, 0.75]
OWL_M = 5.0
OWL_LAMBDA = 0.08
METHODS = ("uniform", "owl", "error")  # pruning/allocate.py scores the blocks


@dataclass(frozen=True)
class Allocation:
    """Per-block offsets (empty: uniform, every block at the level) and the setting they came from."""

    method: str = "uniform"
    offsets: tuple[float, ...] = ()
    ramp: float = RAMP
    lam: float = 0.0
    m: float = 0.0

    @property
    def uniform(self) -> bool:
        return not any(self.offsets)

    def sparsity(self, block: int, s: float) -> float:
        """Block ``block``'s unstructured sparsity at global level ``s``."""
        if not self.offsets:
            return s
        return s + self.offsets[block] * max(0.0, min(s, 1.0 - s, self.ramp)) / self.ramp

    def to_dict(self) -> dict:
        return {"method": self.method, "lambda": self.lam, "m": self.m, "ramp": self.ramp,
                "offsets": [round(d, 8) for d in self.offsets]}

    @classmethod
    def from_dict(cls, d: dict | None, nblocks: int | None = None) -> "Allocation":
        """An artifact's record (None: written before allocations existed, i.e. uniform); ValueError
        on anything that would break the nesting or the block count."""
        if not d:
            return UNIFORM
        offsets = tuple(float(x) for x in d.get("offsets", []))
        alloc = cls(str(d["method"]), offsets, float(d.get("ramp", RAMP)), float(d.get("lambda", 0.0)), float(d.get("m", 0.0)))
        if alloc.method not in METHODS:
            raise ValueError(f"unknown allocation {alloc.method!r}")
        if not (math.isfinite(alloc.ramp) and 0 < alloc.ramp <= 0.5):
            raise ValueError(f"allocation ramp {alloc.ramp!r} is not in (0, 0.5]")
        if any(not math.isfinite(x) or abs(x) > alloc.ramp + 1e-9 for x in offsets):
            raise ValueError("allocation offsets must be finite and at most the ramp in size (else masks would not nest)")
        if nblocks is not None and offsets and len(offsets) != nblocks:
            raise ValueError(f"allocation has {len(offsets)} offsets for {nblocks} blocks")
        return alloc

    def describe(self) -> str:
        if self.uniform:
            return "uniform (every block at the level)"
        lo, hi = min(self.offsets), max(self.offsets)
        setting = f"lambda {self.lam:g}" + (f", M {self.m:g}" if self.method == "owl" else "")
        return f"{self.method} ({setting}): blocks at level {lo:+.3f} to {hi:+.3f}"


UNIFORM = Allocation()


def parse_allocation(text: str) -> tuple[str, float, float]:
    """``uniform``, ``owl[:LAMBDA[,M]]`` or ``error[:LAMBDA]`` -> (method, lambda, M); UserError otherwise."""
    name, _, args = text.strip().partition(":")
    name = name.strip().lower()
    if name == "uniform" and not args:
        return "uniform", 0.0, 0.0
    if name not in ("owl", "error"):
        raise UserError(f"--allocation must be uniform, owl[:LAMBDA[,M]] or error[:LAMBDA], got {text!r}")
    parts = [p.strip() for p in args.split(",")] if args else []
    if name == "error" and len(parts) > 1:
        raise UserError(f"--allocation {text!r}: error takes LAMBDA only, e.g. error:0.08")
    try:
        lam = float(parts[0]) if parts else OWL_LAMBDA
        m = float(parts[1]) if len(parts) > 1 else OWL_M
    except ValueError:
        raise UserError(f"--allocation {text!r}: LAMBDA and M must be numbers, e.g. owl:0.08,5") from None
    if len(parts) > 2 or not (0 < lam <= RAMP / 2 and math.isfinite(m) and m > 0):
        raise UserError(f"--allocation {text!r}: LAMBDA must be in (0, {RAMP / 2:g}] and M > 0, e.g. owl:0.08,5")
    return name, lam, (m if name == "owl" else 0.0)


def score_offsets(ratios: list[float], params: list[int], lam: float) -> tuple[float, ...]:
    """Per-block offsets from block scores (OWL: outlier ratios): scaled to [0, 2 lambda], minus
    their parameter-weighted mean, negated (a higher score, less pruning). All zero when every
    score is equal."""
    lo, hi = min(ratios), max(ratios)
    if hi - lo <= 0:
        return tuple(0.0 for _ in ratios)
    scaled = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    mean = sum(w * x for w, x in zip(params, scaled)) / sum(params)
    return tuple(mean - x for x in scaled)


def outlier_fraction(scores: list, m: float) -> float:
    """Fraction of one block's Wanda scores (tensors, all its prunable linears) above m times
    their mean, as OWL counts outliers."""
    total = sum(float(s.double().sum()) for s in scores)
    count = sum(s.numel() for s in scores)
    threshold = m * total / count
    return sum(int((s > threshold).sum()) for s in scores) / count
