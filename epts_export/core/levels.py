"""Sparsity levels ("0.5", "2:4"), the sparsity groups of the hierarchy, and which adapters a level uses.

A *level* is what a user asks for: an unstructured sparsity in [0, 1) or an N:M pattern.
A *group* is one rung of the MS-HiLoRA hierarchy: a sparsity range with its own LoRA ranks.
Unstructured groups tile [0, max level]; an N:M level gets a group of its own that sits on top
of the unstructured groups covering its density (``core.rule`` says which groups a level uses).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..device.levels import MAX_SPARSITY, Level, parse_level, parse_levels, sort_levels  # noqa: F401
from ..errors import UserError

# Reference grouping (epts-method.md): one wide low group, then 5-point steps.
LOW_GROUP_TOP = 0.40
GROUP_WIDTH = 0.05
DEFAULT_LEVELS = "0.3,0.4,0.5,0.6,0.7,2:4"  # what optimize trains by default: the paper's range plus 2:4


@dataclass(frozen=True)
class Group:
    """One rung of the hierarchy: unstructured range (lo, hi], or the N:M pattern it serves."""

    index: int
    lo: float
    hi: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"[{self.lo:g},{self.hi:g}]"

    def to_dict(self) -> dict:
        return {"index": self.index, "lo": self.lo, "hi": self.hi, "n": self.n, "m": self.m}

    @classmethod
    def from_dict(cls, d: dict) -> "Group":
        return cls(index=int(d["index"]), lo=float(d["lo"]), hi=float(d["hi"]), n=int(d.get("n", 0)), m=int(d.get("m", 0)))


def build_groups(levels: list[Level], width: float = GROUP_WIDTH, low_top: float = LOW_GROUP_TOP,
                 low_span: float = 0.0) -> list[Group]:
    """Groups for a set of levels: unstructured groups tile [0, max], then one group per N:M level.

    With a top level of 0.7 this gives the reference's 7 groups
    [0,.4] [.4,.45] ... [.65,.7]; ``width`` 0.1 gives [0,.4] [.4,.5] [.5,.6] [.6,.7]. A top level
    that is not on the ``width`` grid gets a last, narrower group ending exactly at it, so the
    elastic range ends where the user asked. ``low_top``: where group 0 ends (the reference: 0.4);
    0.35 with width 0.1 gives [0,.35] [.35,.45] [.45,.55] [.55,.65] [.65,.7]. ``low_span`` > 0:
    group 0 is trained over its top ``low_span`` only, [low_top - low_span, low_top] (0.2: [.15,.35]),
    where the levels users serve start (0.3), instead of spending one set of adapters on all of
    [0, low_top]; sparsities below it are served by the mask alone (``core.rule``).
    """
    if not 0 < width <= 1:
        raise UserError(f"group width must be in (0, 1], got {width:g}")
    if not 0 < low_top <= 1:
        raise UserError(f"low group top must be in (0, 1], got {low_top:g}")
    if not 0 <= low_span <= 1:
        raise UserError(f"low group span must be in [0, 1], got {low_span:g}")
    top = max((lv.sparsity for lv in levels if not lv.is_nm), default=0.0)
    nm_levels = [lv for lv in levels if lv.is_nm]
    edges = [0.0]
    if top > 0:
        edges.append(min(low_top, top))
        while edges[-1] < top - 1e-9:
            edges.append(min(round(edges[-1] + width, 6), top))
    if len(edges) == 1:  # only N:M levels (or 0): still a base group for the dense end
        edges.append(0.0)
    if low_span > 0 and len(edges) > 1 and edges[1] > 0:
        edges[0] = max(0.0, round(edges[1] - low_span, 6))
    groups = [Group(i, edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
    for lv in nm_levels:
        groups.append(Group(len(groups), lv.sparsity, lv.sparsity, lv.n, lv.m))
    return groups


def unstructured_group(groups: list[Group], sparsity: float) -> int:
    """Index of the unstructured group whose range holds ``sparsity`` (lo, hi]; 0 for s <= group 0's top
    (below group 0's lo as well: ``core.rule`` serves those with the mask alone)."""
    ugroups = [g for g in groups if not g.is_nm]
    for g in ugroups:
        if sparsity <= g.hi + 1e-9:
            return g.index
    raise UserError(
        f"sparsity {sparsity:g} is above the trained range (max {ugroups[-1].hi:g}); "
        "re-run optimize with a higher top level"
    )
