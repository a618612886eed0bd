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

from ..core.allocation import UNIFORM, Allocation
from ..core.closed_form import closed_form_adapters
from ..core.config import TrainConfig, steps_per_epoch
from ..errors import UserError
from ..core.hilora import init_lora, merged_weight
from ..core.levels import Group, Level
from ..core.masks import importance_order, obs_scores, wanda_scores
from ..core.rule import LevelRule, level_rule
from ..core.stats import InputGram, RowScalars, dampened
from .blockloop import block_output
from .distributed import LOCAL, Dist

LOW_CHECK_SPARSITY = 0.3  # where the low-group check compares with / without group-0 adapters
@dataclass
class BlockResult:
    order: dict[str, torch.Tensor]  # linear name -> (out, in) int16/int32 importance order, 0 = most important
    lora_B: dict[str, torch.Tensor]  # linear name -> (out, G*r)
    lora_A: dict[str, torch.Tensor]  # linear name -> (G*r, in)
    low_group_lora: bool  # False: levels in group 0 are served without adapters in this block
    dense_out: list[torch.Tensor]  # next block's dense-stream inputs (on the streams' device)
    sparse_out: list[torch.Tensor]  # next block's sparse-stream inputs, MSFM-mixed (on the streams' device)
    metrics: dict = field(default_factory=dict)


def mix_weights(groups: list[Group], low: float = 0.0) -> list[float]:
    """MSFM weights, normalized: the reference gives 0.1 to groups below 55% and 0.2 above,
    i.e. twice the say to the high-sparsity outputs that perturb the next block the most.
    ``low`` > 0: group 0 gets that share, every other group an equal part of the rest."""
    if low > 0 and len(groups) > 1:
        return [low] + [(1.0 - low) / (len(groups) - 1)] * (len(groups) - 1)
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


def minibatches(nwindows: int, batch: int, gen: torch.Generator) -> list[list[int]]:
    """One epoch's optimizer steps, each a list of window ids.

    Windows are dealt into ``batch`` classes (window j into class j % batch); each class is shuffled
    on its own, and step i takes the i-th window of every class that still has one. With batch 1
    this is one ``randperm`` of all windows (the reference's shuffled batch-1 loop). The schedule
    depends on the window count, the batch and the generator, never on the world size; when the
    batch is a multiple of the world size, class c lies wholly on rank c % world (window j is on
    rank j % world), so every step has batch / world windows on each rank.
    """
    classes = [list(range(c, nwindows, batch)) for c in range(min(batch, nwindows))]
    perms = [torch.randperm(len(members), generator=gen).tolist() for members in classes]
    return [[members[p[i]] for members, p in zip(classes, perms) if i < len(members)]
            for i in range(len(classes[0]))]


def lr_factor(step: int, steps: int, warmup: int = 0) -> float:
    """The learning rate of ``step`` (0-based) as a fraction of lr: cosine decay from 1 at step 0 to
    0 at ``steps``, times a linear warm-up (step + 1) / (warmup + 1) over the first ``warmup`` steps.
    Adam's first steps move every entry by about lr whatever the gradient; a warm-up makes them
    smaller (BENCHMARKS.md measures it; the presets do not use it)."""
    cos = 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    return cos * min(1.0, (step + 1) / (warmup + 1)) if warmup else cos


def cost_per_block(nsamples: int, trained: int, ngroups: int, checked: int | None = None, msfm_pass: bool = True) -> int:
    """Work of one block in forward-pass equivalents (backward ~ 2 forwards): stats/teacher pass,
    training (``trained`` window passes), low-group check (over ``checked`` windows; None = all),
    MSFM pass (none when MSFM takes the training outputs). Drives an honest progress ETA."""
    mixing = nsamples * ngroups if msfm_pass else 0
    return nsamples + mixing + 3 * ngroups * trained + 2 * (nsamples if checked is None else checked)


class BlockMerger:
    """Builds the parameter overrides {"<linear>.weight": W_eff} of a block for one LevelRule.

    Masks are float 0/1 in the weights' dtype (``merged_weight`` multiplies: training only needs
    the values). N:M masks do not depend on a draw, so they are computed once per level and kept."""

    def __init__(self, weights: dict[str, torch.Tensor], order: dict[str, torch.Tensor], B: dict, A: dict,
                 lora_rank: int, scale: float):
        self.weights, self.order, self.B, self.A, self.lora_rank, self.scale = weights, order, B, A, lora_rank, scale
        self._nm_masks: dict[tuple[str, Level], torch.Tensor] = {}

    def mask(self, name: str, rule: LevelRule) -> torch.Tensor:
        dtype = self.weights[name].dtype
        if not rule.level.is_nm:
            return rule.mask(self.order[name]).to(dtype)
        key = (name, rule.level)
        if key not in self._nm_masks:
            self._nm_masks[key] = rule.mask(self.order[name]).to(dtype)
        return self._nm_masks[key]

    def summed(self, rule: LevelRule) -> dict[str, torch.Tensor]:
        """W + scale * B A of the rule's groups per linear, unmasked: what every draw with the same
        groups shares (``masked`` cuts one draw from it; the same values as ``__call__``)."""
        return {n: merged_weight(w, None, self.B[n], self.A[n], list(rule.groups), self.lora_rank, self.scale)
                for n, w in self.weights.items()}

    def masked(self, summed: dict[str, torch.Tensor], rule: LevelRule) -> dict[str, torch.Tensor]:
        return {f"{n}.weight": w * self.mask(n, rule) for n, w in summed.items()}

    def __call__(self, rule: LevelRule, frozen: frozenset[int] = frozenset()) -> dict[str, torch.Tensor]:
        """``frozen``: the active groups merged detached (their adapters get no gradient)."""
        return {
            f"{n}.weight": merged_weight(w, self.mask(n, rule), self.B[n], self.A[n], list(rule.groups),
                                         self.lora_rank, self.scale, frozen)
            for n, w in self.weights.items()
        }


@dataclass
class BlockRun:
    """One block's EPTS run: what every step reads (the block on ``device``, its prunable linears,
    the call arguments, the hierarchy, the config) and this rank's share of the windows."""

    block: nn.Module
    linears: dict[str, nn.Linear]
    kwargs: dict
    groups: list[Group]
    cfg: TrainConfig
    device: torch.device | str
    advance: Callable[[int], None]
    dist: Dist
    nwindows: int  # every rank's windows
    ids: list[int]  # this rank's: global window ids
    streams_device: torch.device | str
    alloc: Allocation = UNIFORM  # the layer-wise allocation: this block's masks sit at alloc.sparsity(index, s)
    index: int = 0  # the block's index in the model

    def rule(self, level: Level, low_group_lora: bool = True) -> LevelRule:
        return level_rule(self.groups, level, low_group_lora, self.alloc, self.index)

    def forward(self, weights: dict, x: torch.Tensor) -> torch.Tensor:
        """The block's output for input ``x`` with ``weights`` in place of its prunable linears',
        under the student's precision (float32 out)."""
        with self.cfg.autocast(self.device):
            return block_output(functional_call(self.block, weights, (x,), self.kwargs)).float()


def dense_pass(run: BlockRun, dense_in: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, RowScalars],
                                                                      dict[str, InputGram]]:
    """Step 1: the teacher's outputs for this rank's windows, and per linear its input statistics
    over every rank: row scalars (Wanda) and, for the closed-form start or the OBS order, the input
    Gram matrix (X^T X once per distinct input: q, k and v read the same tensor)."""
    need_gram = run.cfg.init == "lsq" or run.cfg.importance == "obs"
    rows = {n: RowScalars(lin.in_features, run.device) for n, lin in run.linears.items()}
    gram = {n: InputGram(lin.in_features, run.device) for n, lin in run.linears.items()} if need_gram else {}
    # this window's inputs: (data_ptr, shape) -> (the input, x^T x); holding the input keeps its
    # memory from being reused by a later input of the same shape (o_proj's) within the window
    seen: dict = {}

    def hook(name):
        def fn(_mod, inp, _out):
            x = inp[0].detach()
            rows[name].add(x)
            if need_gram:
                key = (x.data_ptr(), tuple(x.shape))
                if key not in seen:
                    flat = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
                    seen[key] = (x, flat.t() @ flat)  # (in, in)
                gram[name].add(seen[key][1], x.reshape(-1, x.shape[-1]).shape[0])
        return fn

    handles = [lin.register_forward_hook(hook(n)) for n, lin in run.linears.items()]
    teacher = []
    with torch.no_grad():
        for x in dense_in:
            teacher.append(block_output(run.block(x.to(run.device), **run.kwargs)).float().to(run.streams_device))
            seen.clear()
            run.advance(1)
    for h in handles:
        h.remove()
    for acc in (*rows.values(), *gram.values()):  # every rank's sums and counts
        acc.combine(run.dist.all_reduce_)
    return teacher, rows, gram


def importance(run: BlockRun, weights: dict[str, torch.Tensor], rows: dict[str, RowScalars],
               gram: dict[str, InputGram]) -> dict[str, torch.Tensor]:
    """Step 1b: each linear's nested importance order, Wanda's or the second-order one."""
    if run.cfg.importance == "obs":
        return {n: importance_order(obs_scores(weights[n], dampened(gram[n].mean()))) for n in run.linears}
    return {n: importance_order(wanda_scores(weights[n], rows[n].mean())) for n in run.linears}


def start_adapters(run: BlockRun, weights: dict[str, torch.Tensor], gram: dict[str, InputGram],
                   order: dict[str, torch.Tensor], gen: torch.Generator) -> tuple[dict, dict]:
    """Step 2a: (B, A) per linear, trainable on ``device``: B = 0 and a random A, or the closed-form
    least-squares adapters (the random draw is made either way: the generator's state is the same)."""
    B, A = {}, {}
    G, r = len(run.groups), run.cfg.rank
    for n, lin in run.linears.items():
        b, a = init_lora(lin.out_features, lin.in_features, G, r, gen)
        if run.cfg.init == "lsq":
            b, a = closed_form_adapters(weights[n], gram[n].mean(), order[n], run.groups, r, run.cfg.scale, run.rule)
        B[n] = b.to(run.device).requires_grad_(True)
        A[n] = a.to(run.device).requires_grad_(True)
    return B, A


class Diverged(UserError):
    """Training produced a non-finite loss or adapter: no artifact, and no checkpoint to resume."""


class TrainingMix:
    """MSFM from the training passes (``msfm = "train"``): each window's outputs in the last epoch,
    one per group at that step's draw. Group 0's output and draw are kept apart (the low-group
    check may serve group 0 without adapters: then it is passed again), the others are summed with
    their MSFM weights as they come."""

    def __init__(self, weights: list[float]):
        self.weights = weights
        self.low: dict[int, tuple[float, torch.Tensor]] = {}  # window -> (group 0's draw, its output)
        self.rest: dict[int, torch.Tensor] = {}  # window -> the weighted sum of the other groups' outputs

    def clear(self) -> None:
        self.low.clear()
        self.rest.clear()

    def add(self, j: int, group: int, s: float, y: torch.Tensor, device) -> None:
        y = y.detach().to(device)
        if group == 0:
            self.low[j] = (s, y)
        else:
            self.rest[j] = self.rest.get(j, 0.0) + self.weights[group] * y


def frozen_groups(cfg: TrainConfig, rule: LevelRule, trained: int) -> frozenset[int]:
    """The groups whose adapters group ``trained``'s loss leaves alone: every inherited one
    (``residual``), group 0 for the groups above it (``own_low``), or none (the reference)."""
    if cfg.residual:
        return frozenset(rule.groups) - {trained}
    return frozenset({0}) if cfg.own_low and trained > 0 else frozenset()


def train_adapters(run: BlockRun, merge: "BlockMerger", params: list[torch.Tensor], sparse_in: list[torch.Tensor],
                   teacher: list[torch.Tensor], gen: torch.Generator, mix: TrainingMix | None = None) -> torch.Tensor:
    """Step 2b: MS-HiLoRA training. Each step draws a sparsity per group (stratified over the
    steps) and trains every group on it, the higher groups against the teacher and the group-0
    student equally. Returns each group's mean loss over the last epoch (every rank's windows);
    ``mix`` collects the last epoch's outputs for MSFM."""
    cfg, groups, N = run.cfg, run.groups, run.nwindows
    local = {j: k for k, j in enumerate(run.ids)}  # global window id -> index in this rank's lists
    steps = cfg.total_steps(N)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, steps, cfg.warmup))
    draws = [stratified_draws(g.lo, g.hi, steps, gen) for g in groups]
    last_epoch = torch.zeros(len(groups), dtype=torch.float64)
    step = 0
    seen_last = 0  # windows trained in the last epoch (all of them unless --steps cut it short)
    for _epoch in range(-(-steps // steps_per_epoch(N, cfg.batch))):
        last_epoch.zero_()
        seen_last = 0
        if mix is not None:
            mix.clear()
        for batch in minibatches(N, cfg.batch, gen):
            if step == steps:
                break
            seen_last += len(batch)
            # the step's loss is the mean over its windows, wherever they are: each rank adds the
            # gradients of its own windows, the all-reduce adds the ranks
            weight = 1.0 / len(batch)
            for j in batch:
                if j not in local:
                    continue
                x, t = sparse_in[local[j]].to(run.device), teacher[local[j]].to(run.device)
                y0 = None
                for g in groups:
                    s = float(draws[g.index][step])
                    rule = run.rule(group_level(g, s))
                    y = run.forward(merge(rule, frozen_groups(cfg, rule, g.index)), x)
                    if mix is not None:
                        mix.add(j, g.index, s, y, run.streams_device)
                    if g.index == 0:
                        loss = F.mse_loss(y, t)
                        y0 = y.detach()
                    else:  # higher groups: match the teacher and the group-0 student equally
                        loss = 0.5 * F.mse_loss(y, t) + 0.5 * F.mse_loss(y, y0)
                    # per group: same gradient as the sum, a fraction of the memory
                    (loss if len(batch) == 1 else loss * weight).backward()
                    last_epoch[g.index] += loss.item()
                run.advance(3 * len(groups))
            if run.dist.world > 1:
                _all_reduce_grads(params, run.dist)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
    losses = torch.tensor(run.dist.sum_floats(last_epoch.tolist()), dtype=torch.float64) / max(seen_last, 1)
    if not torch.isfinite(losses).all() or not all(bool(torch.isfinite(p).all()) for p in params):  # same on every rank
        raise Diverged(f"training diverged (the loss or the adapters are not finite) at lr {cfg.lr:g}: lower --lr "
                       "and run again; nothing was written")
    return losses


@torch.no_grad()
def low_group_check(run: BlockRun, merge: "BlockMerger", sparse_in: list[torch.Tensor],
                    teacher: list[torch.Tensor]) -> tuple[bool, dict]:
    """Step 3: do group 0's adapters help at s = 0.3 (the top of group 0 when it ends below)? The
    block's output error against the teacher with and without them, over the first
    ``check_windows`` windows (all when 0). Returns (keep them, the measured errors)."""
    cfg, groups = run.cfg, run.groups
    low = Level(sparsity=min(LOW_CHECK_SPARSITY, groups[0].hi))
    err_with = err_without = 0.0
    with_w, without_w = merge(run.rule(low, True)), merge(run.rule(low, False))
    for j, x, t in zip(run.ids, sparse_in, teacher):
        if cfg.check_windows and j >= cfg.check_windows:
            continue
        xd, td = x.to(run.device), t.to(run.device)
        y_with, y_without = run.forward(with_w, xd), run.forward(without_w, xd)
        err_with += F.mse_loss(y_with, td).item()
        err_without += F.mse_loss(y_without, td).item()
        run.advance(2)
    err_with, err_without = run.dist.sum_floats([err_with, err_without])
    checked = min(run.nwindows, cfg.check_windows) if cfg.check_windows else run.nwindows
    return err_with <= err_without, {"sparsity": low.sparsity, "with_lora": err_with / checked,
                                     "without_lora": err_without / checked}


def msfm_weights(run: BlockRun) -> list[float]:
    wts = list(run.cfg.mix_weights) if run.cfg.mix_weights else mix_weights(run.groups, run.cfg.mix_low)
    assert len(wts) == len(run.groups), f"{len(wts)} mix weights for {len(run.groups)} groups"
    return wts


@torch.no_grad()
def msfm_from_training(run: BlockRun, merge: "BlockMerger", sparse_in: list[torch.Tensor], low_group_lora: bool,
                       mix: TrainingMix) -> list[torch.Tensor]:
    """Step 4, MSFM from the last epoch's training outputs (``msfm = "train"``); group 0's passed
    again, at its training draw, where the low-group check took its adapters away."""
    mixed = []
    for j, x in zip(run.ids, sparse_in):
        s, y0 = mix.low[j]
        if not low_group_lora:
            y0 = run.forward(merge(run.rule(group_level(run.groups[0], s), False)), x.to(run.device)).to(run.streams_device)
        mixed.append(mix.weights[0] * y0 + mix.rest.get(j, 0.0))
    return mixed


@torch.no_grad()
def msfm_stream(run: BlockRun, merge: "BlockMerger", sparse_in: list[torch.Tensor], low_group_lora: bool,
                gen: torch.Generator) -> list[torch.Tensor]:
    """Step 4, MSFM: the next block's sparse input mixes this block's outputs at one sparsity drawn
    per group (every rank draws for every window, in window order, so the generator agrees). Group
    by group: the adapters' sum is merged once per group, each window's draw only masks it."""
    groups = run.groups
    wts = msfm_weights(run)
    mix_draws = [[float(g.lo + (g.hi - g.lo) * torch.rand((), generator=gen, dtype=torch.float64)) for g in groups]
                 for _ in range(run.nwindows)]
    mixed: list[torch.Tensor] = []
    for g, w in zip(groups, wts):
        sums: dict[tuple, dict] = {}  # the active groups -> their sum (one entry but at a range's very edge)
        for k, (j, x) in enumerate(zip(run.ids, sparse_in)):
            rule = run.rule(group_level(g, mix_draws[j][g.index]), low_group_lora)
            if rule.groups not in sums:
                sums[rule.groups] = merge.summed(rule)
            y = w * run.forward(merge.masked(sums[rule.groups], rule), x.to(run.device)).to(run.streams_device)
            if g.index == 0:
                mixed.append(y)
            else:  # w_0 y_0 + w_1 y_1 + ..., summed in group order
                mixed[k] = mixed[k] + y
            run.advance(1)
    return mixed


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
    *,
    dist: Dist = LOCAL,
    nwindows: int | None = None,
    streams_device: torch.device | str = "cpu",
    alloc: Allocation = UNIFORM,
    index: int = 0,
) -> BlockResult:
    """Run EPTS on one block that already sits on ``device``: its steps in order (epts-method.md).

    dense_in / sparse_in: tensors (1, T, C), the teacher and student streams entering the block,
    for this rank's windows (global ids ``dist.owned(nwindows)``; all ``nwindows`` of them in a
    single process). They may live on the CPU or on ``device``; the next block's streams are
    returned on ``streams_device``. ``alloc`` and ``index``: the layer-wise allocation and this
    block's place in it (the masks of level s are cut at ``alloc.sparsity(index, s)``). ``seed`` seeds every random draw of this block (the same on
    every rank), so a resumed or distributed run repeats it exactly.
    ``advance(n)`` reports n forward-equivalents of this rank's progress.
    """
    gen = torch.Generator().manual_seed(seed)
    N = len(dense_in) if nwindows is None else nwindows
    ids = dist.owned(N)
    assert len(ids) == len(dense_in) == len(sparse_in), f"rank {dist.rank} holds {len(dense_in)} windows, owns {len(ids)}"
    for p in block.parameters():
        p.requires_grad_(False)
    block.eval()
    run = BlockRun(block, linears, kwargs, groups, cfg, device, advance, dist, N, ids, streams_device, alloc, index)

    teacher, rows, gram = dense_pass(run, dense_in)
    weights = {n: lin.weight.detach().float() for n, lin in linears.items()}
    order = importance(run, weights, rows, gram)
    B, A = start_adapters(run, weights, gram, order, gen)
    gram.clear()
    # the student's merged weights in the dtype its matmuls run in: under bf16 autocast a float32
    # merge would be cast to bf16 at every linear call anyway, so merging in bf16 computes the
    # same weights with half the memory traffic and no casts
    student_w = {n: w.to(torch.bfloat16) for n, w in weights.items()} if cfg.precision == "bf16" else weights
    params = [t for n in linears for t in (B[n], A[n])]
    mix = TrainingMix(msfm_weights(run)) if cfg.mixes_in_training(N) else None
    last_epoch = train_adapters(run, BlockMerger(student_w, order, B, A, cfg.rank, cfg.scale), params, sparse_in, teacher,
                                gen, mix)
    B = {n: b.detach() for n, b in B.items()}
    A = {n: a.detach() for n, a in A.items()}
    dist.broadcast_(*B.values(), *A.values())  # identical already; rank 0's copy rules out any drift
    merge = BlockMerger(student_w, order, B, A, cfg.rank, cfg.scale)
    low_group_lora, low_check = low_group_check(run, merge, sparse_in, teacher)
    if mix is not None:
        mixed = msfm_from_training(run, merge, sparse_in, low_group_lora, mix)
    else:
        mixed = msfm_stream(run, merge, sparse_in, low_group_lora, gen)
    return BlockResult(
        order={n: v.cpu() for n, v in order.items()},
        lora_B={n: v.cpu() for n, v in B.items()},
        lora_A={n: v.cpu() for n, v in A.items()},
        low_group_lora=bool(low_group_lora),
        dense_out=teacher,
        sparse_out=mixed,
        metrics={"final_epoch_loss": [round(float(v), 8) for v in last_epoch], "low_check": low_check},
    )


def _all_reduce_grads(params: list[torch.Tensor], dist: Dist) -> None:
    """Sum the adapters' gradients over the ranks in one flat all-reduce. A rank with no window in
    this step (the last, short step of an epoch) contributes zeros."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce_(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset: offset + n].view_as(p).clone()
        offset += n
