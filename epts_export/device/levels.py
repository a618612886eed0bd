"""Sparsity levels as a user names them: "0.5" (unstructured) or "2:4" (N:M), parsed and ordered.

Standard library only: it ships in bundles (``epts_export.device``). The groups of the hierarchy
and which adapters serve a level are ``core.levels`` and ``core.rule``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import UserError

MAX_SPARSITY = 0.90  # above this, LLMs collapse; refuse rather than produce garbage


@dataclass(frozen=True, order=True)
class Level:
    """One servable sparsity. ``n``/``m`` set for N:M (keep n of every m), else ``sparsity``."""

    sparsity: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def name(self) -> str:
        if self.is_nm:
            return f"{self.n}:{self.m}"
        return f"{self.sparsity:g}"

    def __str__(self) -> str:
        return self.name


def parse_level(text: str) -> Level:
    """Parse "0.6", "60%" or "2:4" into a Level; bad strings raise UserError."""
    t = text.strip()
    if ":" in t:
        a, _, b = t.partition(":")
        try:
            n, m = int(a), int(b)
        except ValueError:
            raise UserError(f"malformed level {text!r}: an N:M level is two integers like 2:4") from None
        if not (0 < n < m) or m > 64:
            raise UserError(f"malformed level {text!r}: N:M needs 0 < N < M <= 64 (e.g. 2:4 for sparse tensor cores)")
        return Level(sparsity=round(1 - n / m, 6), n=n, m=m)
    try:
        s = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise UserError(f"malformed level {text!r}: use a sparsity like 0.5 or 50%, or N:M like 2:4") from None
    if not math.isfinite(s) or not (0.0 <= s <= MAX_SPARSITY):
        raise UserError(f"level {text!r} is out of range: unstructured sparsity must be in [0, {MAX_SPARSITY}]")
    return Level(sparsity=round(s, 6))


def parse_levels(text: str) -> list[Level]:
    """Parse a comma list "0.3,0.5,2:4" into sorted unique levels (unstructured first, then N:M)."""
    items = [p for p in text.split(",") if p.strip()]
    if not items:
        raise UserError("no levels given: pass e.g. --levels 0.3,0.5,0.7,2:4")
    return sort_levels({parse_level(p) for p in items})


def sort_levels(levels) -> list[Level]:
    """Unique levels in serving order: unstructured by sparsity, then N:M by M."""
    return sorted(set(levels), key=lambda lv: (lv.is_nm, lv.sparsity, lv.m))
