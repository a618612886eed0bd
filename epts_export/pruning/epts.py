"""EPTS for one transformer block: importance, MS-HiLoRA training, low-group check, MSFM mixing.

``optimize_block`` is the whole method for one block (epts-method.md, steps 1-7). The walk over
blocks, checkpoints and artifacts live in ``optimize.py``; the masks and the merge are pure
functions in ``masks.py`` and ``hilora.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..core.hilora import init_lora, merged_weight
from ..core.levels import Group, Level
from ..core.masks import importance_order, wanda_scores
from ..core.rule import LevelRule, level_rule
from .blockloop import block_output

LOW_CHECK_SPARSITY = 0.3  # where the low-group check compares with / without group-0 adapters


@dataclass(frozen=True)
class TrainConfig:
    rank: int = 8
    epochs: int = 2
    lr: float = 1e-3
    scale: float = 1.0  # LoRA scale (alpha / r)
    mix_weights: tuple[float, ...] | None = None  # MSFM weight per group; None = derived (mix_weights())

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The config an artifact's ``settings`` recorded (written with ``dataclasses.asdict``);
        other settings (levels, calibration sizes) are ignored."""
        mix = d.get("mix_weights")
        return cls(rank=int(d["rank"]), epochs=int(d["epochs"]), lr=float(d["lr"]), scale=float(d["scale"]),
                   mix_weights=tuple(float(w) for w in mix) if mix else None)


@dataclass
class BlockResult:
    order: dict[str, torch.Tensor]  # linear name -> (out, in) int16/int32 importance order, 0 = most important
    lora_B: dict[str, torch.Tensor]  # linear name -> (out, G*r)
    lora_A: dict[str, torch.Tensor]  # linear name -> (G*r, in)
    low_group_lora: bool  # False: levels in group 0 are served without adapters in this block
    dense_out: list[torch.Tensor]  # next block's dense-stream inputs (CPU)
    sparse_out: list[torch.Tensor]  # next block's sparse-stream inputs, MSFM-mixed (CPU)
    metrics: dict = field(default_factory=dict)


def mix_weights(groups: list[Group]) -> list[float]:
    """MSFM weights, normalized: the reference gives 0.1 to groups below 55% and 0.2 above,
    i.e. twice the say to the high-sparsity outputs that perturb the next block the most."""
    raw = [0.2 if g.lo >= 0.55 - 1e-9 else 0.1 for g in groups]
    total = sum(raw)
    return [w / total for w in raw]


def stratified_draws(lo: float, hi: float, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` sparsities in [lo, hi]: one uniform draw in each of ``count`` equal strata, in a
    random order, so that over all steps the group's range is covered evenly."""
    perm = torch.randperm(count, generator=gen).double()
    u = torch.rand(count, generator=gen, dtype=torch.float64)
    return lo + (hi - lo) * (perm + u) / count


def group_level(group: Group, s: float) -> Level:
    return Level(sparsity=group.lo, n=group.n, m=group.m) if group.is_nm else Level(sparsity=float(s))


def cost_per_block(nsamples: int, epochs: int, ngroups: int) -> int:
    """Work of one block in forward-pass equivalents (backward ~ 2 forwards): stats/teacher pass,
    training steps, low-group check, MSFM pass. Drives an honest progress ETA."""
    return nsamples * (1 + epochs * 3 * ngroups + 2 + ngroups)


def msfm_mix(outputs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """MSFM: the weighted sum of one block's outputs at one sparsity per group, (1, T, C)."""
    assert len(outputs) == len(weights), f"{len(outputs)} outputs for {len(weights)} weights"
    acc = weights[0] * outputs[0]
    for w, y in zip(weights[1:], outputs[1:]):
        acc = acc + w * y
    return acc


class BlockMerger:
    """Builds the parameter overrides {"<linear>.weight": W_eff} of a block for one LevelRule.

    N:M masks do not depend on a draw, so they are computed once per level and kept."""

    def __init__(self, weights: dict[str, torch.Tensor], order: dict[str, torch.Tensor], B: dict, A: dict,
                 lora_rank: int, scale: float):
        self.weights, self.order, self.B, self.A, self.lora_rank, self.scale = weights, order, B, A, lora_rank, scale
        self._nm_masks: dict[tuple[str, Level], torch.Tensor] = {}

    def mask(self, name: str, rule: LevelRule) -> torch.Tensor:
        if not rule.level.is_nm:
            return rule.mask(self.order[name])
        key = (name, rule.level)
        if key not in self._nm_masks:
            self._nm_masks[key] = rule.mask(self.order[name])
        return self._nm_masks[key]

    def __call__(self, rule: LevelRule) -> dict[str, torch.Tensor]:
        return {
            f"{n}.weight": merged_weight(w, self.mask(n, rule), self.B[n], self.A[n], list(rule.groups),
                                         self.lora_rank, self.scale)
            for n, w in self.weights.items()
        }


def optimize_block(
    block: nn.Module,
    linears: dict[str, nn.Linear],
    dense_in: list[torch.Tensor],
    sparse_in: list[torch.Tensor],
    kwargs: dict,
    groups: list[Group],
    cfg: TrainConfig,
    seed: int,
    device: torch.device | str = "cpu",
    advance: Callable[[int], None] = lambda n: None,
) -> BlockResult:
    """Run EPTS on one block that already sits on ``device`` (inputs are on the CPU).

    dense_in / sparse_in: N tensors (1, T, C), the teacher and student streams entering the block.
    ``seed`` seeds every random draw of this block, so a resumed run repeats it exactly.
    ``advance(n)`` reports n forward-equivalents of progress.
    """
    gen = torch.Generator().manual_seed(seed)
    G, r = len(groups), cfg.rank
    N = len(dense_in)
    for p in block.parameters():
        p.requires_grad_(False)
    block.eval()

    # 1. Dense pass: Wanda statistics (sum of x^2 per input channel) and teacher outputs.
    sq_sum = {n: torch.zeros(lin.in_features, dtype=torch.float64, device=device) for n, lin in linears.items()}
    tokens = {n: 0 for n in linears}

    def hook(name):
        def fn(_mod, inp, _out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()  # (tokens, in)
            sq_sum[name] += x.pow(2).sum(0).double()
            tokens[name] += x.shape[0]
        return fn

    handles = [lin.register_forward_hook(hook(n)) for n, lin in linears.items()]
    teacher = []
    with torch.no_grad():
        for x in dense_in:
            teacher.append(block_output(block(x.to(device), **kwargs)).float())
            advance(1)
    for h in handles:
        h.remove()
    weights = {n: lin.weight.detach().float() for n, lin in linears.items()}
    order = {n: importance_order(wanda_scores(weights[n], (sq_sum[n] / max(tokens[n], 1)).float())) for n in linears}

    # 2. MS-HiLoRA training.
    B, A = {}, {}
    for n, lin in linears.items():
        b, a = init_lora(lin.out_features, lin.in_features, G, r, gen)
        B[n] = b.to(device).requires_grad_(True)
        A[n] = a.to(device).requires_grad_(True)
    merge = BlockMerger(weights, order, B, A, r, cfg.scale)
    params = [t for n in linears for t in (B[n], A[n])]
    steps = cfg.epochs * N
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    draws = [stratified_draws(g.lo, g.hi, steps, gen) for g in groups]
    last_epoch = torch.zeros(G, dtype=torch.float64)
    step = 0
    for epoch in range(cfg.epochs):
        last_epoch.zero_()
        for j in torch.randperm(N, generator=gen).tolist():
            x, t = sparse_in[j].to(device), teacher[j]
            y0 = None
            for g in groups:
                rule = level_rule(groups, group_level(g, float(draws[g.index][step])))
                y = block_output(functional_call(block, merge(rule), (x,), kwargs))
                if g.index == 0:
                    loss = F.mse_loss(y, t)
                    y0 = y.detach()
                else:  # higher groups: match the teacher and the group-0 student equally
                    loss = 0.5 * F.mse_loss(y, t) + 0.5 * F.mse_loss(y, y0)
                loss.backward()  # per group: same gradient as the sum, a fraction of the memory
                last_epoch[g.index] += loss.item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            advance(3 * G)
    last_epoch /= N

    B = {n: b.detach() for n, b in B.items()}
    A = {n: a.detach() for n, a in A.items()}
    merge = BlockMerger(weights, order, B, A, r, cfg.scale)

    with torch.no_grad():
        # 3. Low-group check: do group-0 adapters help at s = 0.3?
        g0 = groups[0]
        low = Level(sparsity=min(LOW_CHECK_SPARSITY, g0.hi))
        err_with = err_without = 0.0
        with_w, without_w = merge(level_rule(groups, low, True)), merge(level_rule(groups, low, False))
        for x, t in zip(sparse_in, teacher):
            xd = x.to(device)
            err_with += F.mse_loss(block_output(functional_call(block, with_w, (xd,), kwargs)), t).item()
            err_without += F.mse_loss(block_output(functional_call(block, without_w, (xd,), kwargs)), t).item()
            advance(2)
        low_group_lora = err_with <= err_without

        # 4. MSFM: the next block's sparse input mixes this block's outputs, one draw per group.
        wts = list(cfg.mix_weights) if cfg.mix_weights else mix_weights(groups)
        assert len(wts) == G, f"{len(wts)} mix weights for {G} groups"
        mixed = []
        for x in sparse_in:
            xd = x.to(device)
            outs = []
            for g in groups:
                s = float(g.lo + (g.hi - g.lo) * torch.rand((), generator=gen, dtype=torch.float64))
                rule = level_rule(groups, group_level(g, s), low_group_lora)
                outs.append(block_output(functional_call(block, merge(rule), (xd,), kwargs)))
            mixed.append(msfm_mix(outs, wts).float().cpu())
            advance(G)

    return BlockResult(
        order={n: v.cpu() for n, v in order.items()},
        lora_B={n: v.cpu() for n, v in B.items()},
        lora_A={n: v.cpu() for n, v in A.items()},
        low_group_lora=bool(low_group_lora),
        dense_out=[t.cpu() for t in teacher],
        sparse_out=mixed,
        metrics={
            "final_epoch_loss": [round(float(v), 8) for v in last_epoch],
            "low_check": {"sparsity": low.sparsity, "with_lora": err_with / N, "without_lora": err_without / N},
        },
    )
