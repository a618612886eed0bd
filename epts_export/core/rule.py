"""The one rule from a level to weights: which adapter groups a block merges, and which mask.

Training (``pruning.epts``), ``ElasticModel.at`` (eval, materialize, export, validate) and the
dynamic-mode tables (``onnx.dynamic``) all ask ``level_rule``, so that they cannot disagree:

    W_eff(level) = mask(order, level) * (W + scale * sum_{g in rule.groups} B_g A_g)

- an unstructured level uses the hierarchy prefix 0..k, k the group whose range holds it;
- an N:M level inherits the unstructured prefix up to the group holding its density and adds its
  own group (2:4 -> [0,.4] [.4,.45] [.45,.5] + the 2:4 group);
- the low-group rule: in a block whose low-group check found that group-0 adapters do not help
  (``low_group_lora`` False), levels inside group 0 are served with no adapters at all;
- below group 0's range: a group 0 trained over [0.15, 0.35] only (``--low-span``) serves a
  sparsity under 0.15 with the mask alone (its adapters were fit for more pruning: SmolLM2 at 0.1
  on Docutils, 18.47 with them against 18.18 without, dense 18.00);
- a layer-wise allocation (``core.allocation``) moves only the mask: block l prunes an
  unstructured level s to its own s_l(s), rising with s so the masks stay nested; the adapter
  groups are those of the global level s, the same in every block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import UserError
from .allocation import UNIFORM, Allocation
from .levels import Group, Level, unstructured_group

if TYPE_CHECKING:  # reading an artifact or export asks the rule, and needs no torch for that
    import torch


def active_groups(groups: list[Group], level: Level) -> list[int]:
    """Adapter groups of the hierarchy at ``level`` (before the low-group rule); UserError when
    the groups cannot serve it (above the trained range, an untrained N:M pattern)."""
    if level.is_nm:
        own = [g.index for g in groups if g.is_nm and (g.n, g.m) == (level.n, level.m)]
        if not own:
            trained = ", ".join(g.name for g in groups if g.is_nm) or "none"
            raise UserError(f"level {level.name} was not trained (N:M levels in this artifact: {trained})")
        k = unstructured_group(groups, min(level.sparsity, max(g.hi for g in groups if not g.is_nm)))
        return list(range(k + 1)) + own
    return list(range(unstructured_group(groups, level.sparsity) + 1))


@dataclass(frozen=True)
class LevelRule:
    """How one block serves one level: the adapter groups to merge and the mask to apply."""

    level: Level
    groups: tuple[int, ...]  # sorted adapter group indices; () = no adapters
    sparsity: float | None = None  # the block's own unstructured sparsity (an allocation's); None: the level's

    @property
    def block_level(self) -> Level:
        """The level this block's mask is cut at."""
        return self.level if self.sparsity is None or self.level.is_nm else Level(sparsity=self.sparsity)

    def mask(self, order: torch.Tensor) -> torch.Tensor:
        """bool (out, in) keep-mask of this level from a linear's importance order (out, in)."""
        from .masks import level_mask

        return level_mask(order, self.block_level)

    def rank_rows(self, rank: int, slot: dict[int, int] | None = None) -> list[int]:
        """Rows of the stacked adapters (group g owns rows [g*rank, (g+1)*rank)) this rule merges.
        ``slot`` maps a group to its position in a compacted stack (dynamic-mode tables)."""
        return [(slot[g] if slot else g) * rank + j for g in self.groups for j in range(rank)]


def level_rule(groups: list[Group], level: Level, low_group_lora: bool = True, alloc: Allocation = UNIFORM,
               block: int = 0) -> LevelRule:
    """The rule for ``level`` in block ``block`` whose low-group flag is ``low_group_lora``, under
    the layer-wise allocation ``alloc``."""
    active = active_groups(groups, level)
    below = level.sparsity < groups[0].lo - 1e-9  # under a group 0 that does not start at 0
    if not level.is_nm and active == [0] and (below or not low_group_lora):
        active = []
    own = None if alloc.uniform or level.is_nm else alloc.sparsity(block, level.sparsity)
    return LevelRule(level, tuple(active), own)
