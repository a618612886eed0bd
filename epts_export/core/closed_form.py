"""A closed-form start for a block's MS-HiLoRA adapters: least squares in the layer's input metric.

For one linear layer W (out, in) with calibration inputs X and H = X^T X / n, a level with mask M
and the adapters of the groups below g already set (D_prev = scale * sum B_k A_k) leaves the output
error (E - scale * M * (B_g A_g)) X, with E = W - M * (W + D_prev): the pruned weights, minus what
the lower groups already put back. Group g's adapters minimize its energy,

    sum over the group's points s of || (E_s - scale * M_s * (B_g A_g)) X ||_F^2,

the same objective as SparseGPT's update (which approximates its full-rank, per-row solution),
restricted to rank r:

- A_g: the top-r right singular vectors of sum_s M_s * (E_s H), the loss's descent direction at
  B_g = 0 (so the rows span where a correction pays most, in the metric of H);
- B_g: for that A_g, the exact per-row least squares. Row i keeps only its own columns of A_g
  (A_g * M_s[i]), so each row solves its own r x r normal equations
  (sum_s (A*M_s[i]) H (A*M_s[i])^T) b_i = sum_s A (M_s[i] * (H e_s[i]^T)).

The per-row systems are summed from bf16 products; on an ill-conditioned H (o_proj of SmolLM2's
block 0 on self-generated text: condition 2.7e6) rounding can make them indefinite, and a plain
solve then returned entries of 4e4 that multiplied the layer's error 1e5-fold. So each system is
solved on its eigenvalues clipped at zero plus the ridge, and a group whose solution does not
lower the output error summed over its points starts from B = 0 (the reference's start) instead.

Groups are solved in index order, each on top of the groups it inherits, at the midpoints of equal
strata of its range (group 0, [0, 0.4], at 0.1 and 0.3, or [0.15, 0.35] at 0.2 and 0.3; a 0.1- or
0.05-wide group at its midpoint; an N:M group at its pattern), the sparsities training draws from. Training then starts
from these adapters instead of B = 0. Cost per layer and solve: one (out*r, in) x (in, in) product
and an (out, in) SVD of rank r, against a block's forward passes over every calibration token.
"""

from __future__ import annotations

import math

import torch

from .hilora import merged_weight
from .levels import Group, Level
from .rule import level_rule
from .stats import dampened

POINT_WIDTH = 0.1  # one least-squares point per 0.1 of a group's range: a 0.1 group has 1 (as good as 2, BENCHMARKS.md)
MAX_POINTS = 2  # block 5 of SmolLM2, rank 16: 2 points fit group 0 as well as 4 at half the cost (BENCHMARKS.md)
RIDGE = 1e-2  # relative to the mean diagonal of each row's normal equations: a solution robust to the mask
A_ROW_NORM = math.sqrt(1 / 3)  # the expected row norm of init_lora's A: in * bound^2 / 3 with bound = 1/sqrt(in)


def group_points(group: Group) -> list[Level]:
    """The sparsities group ``group``'s adapters are solved at: the midpoints of
    ceil(width / POINT_WIDTH) (at most MAX_POINTS) equal strata; an N:M group's own pattern."""
    if group.is_nm:
        return [Level(sparsity=group.lo, n=group.n, m=group.m)]
    n = max(1, min(MAX_POINTS, math.ceil((group.hi - group.lo) / POINT_WIDTH - 1e-9)))
    return [Level(sparsity=group.lo + (group.hi - group.lo) * (k + 0.5) / n) for k in range(n)]


@torch.no_grad()
def closed_form_adapters(weight: torch.Tensor, H: torch.Tensor, order: torch.Tensor, groups: list[Group],
                         rank: int, scale: float, rule=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (out, G*r), A (G*r, in)) for one linear layer, group by group (module docstring).
    ``rule``: level -> LevelRule of this layer's block (default: ``level_rule(groups, level)``, uniform).

    weight: (out, in); H: (in, in) input second moment X^T X / n (dampened here); order: the layer's
    importance order. A's rows have init_lora's expected norm; B carries the correction's scale.
    """
    rule_of = rule or (lambda lv: level_rule(groups, lv))
    W = weight.float()
    out_f, in_f = W.shape
    G, r = len(groups), rank
    Hd = dampened(H)
    B = torch.zeros(out_f, G * r, dtype=torch.float32, device=W.device)
    A = torch.zeros(G * r, in_f, dtype=torch.float32, device=W.device)
    Hb = Hd.to(torch.bfloat16)
    gen = torch.Generator(device=W.device).manual_seed(0)
    for g in groups:
        masks, grads, errs = [], [], []
        for lv in group_points(g):
            rule = rule_of(lv)
            prev = [k for k in rule.groups if k != g.index]
            M = rule.mask(order).to(torch.float32)
            E = W - merged_weight(W, M, B, A, prev, r, scale)  # (out, in): what the level loses
            EH = (E.to(torch.bfloat16) @ Hb).float()
            masks.append(M)
            errs.append(float((E * EH).sum()))  # tr(E H E^T): the point's output error before group g
            grads.append(M * EH)  # (out, in): minus half the loss's gradient in D at D = 0
        k = min(r, min(out_f, in_f))
        V = _top_right_singular(sum(grads), k, gen)  # (k, in), orthonormal rows
        lhs = torch.zeros(out_f, k, k, dtype=torch.float32, device=W.device)
        rhs = torch.zeros(out_f, k, dtype=torch.float32, device=W.device)
        Vb = V.to(torch.bfloat16)
        for M, GE in zip(masks, grads):
            # row i's own columns of A: (out, k, in), built in bf16 (a 0/1 mask times a bf16 value is
            # exact); the normal equations' big product in bf16 (fp32 accumulation), 7x the fp32
            # speed on CPUs with AVX512-BF16, for a start value
            AM = Vb.unsqueeze(0) * M.to(torch.bfloat16).unsqueeze(1)
            T = (AM.reshape(-1, in_f) @ Hb).view(out_f, k, in_f)  # (out, k, in)
            lhs += torch.bmm(T, AM.transpose(1, 2)).float()  # (out, k, k)
            rhs += GE @ V.t()  # (out, k)
        b = _psd_solve(lhs, rhs)  # (out, k)
        # the guard: bf16 normal equations of an ill-conditioned H can still miss; a group whose
        # solution does not lower the output error summed over its points (the objective it
        # minimizes) starts from B = 0 instead
        # (E - D) H (E - D)^T with D = scale * M * (b V), zero where M is: <D, E H> = <D, M * E H>
        delta = [scale * M * (b @ V) for M in masks]  # (out, in) each: the correction at each point
        after = [e0 - 2 * float((D * GE).sum()) + float((D * (D.to(torch.bfloat16) @ Hb).float()).sum())
                 for e0, GE, D in zip(errs, grads, delta)]
        if not sum(after) < sum(errs):
            b = torch.zeros_like(b)
        # A's rows get the norm of init_lora's kaiming rows (sqrt(1/3)), so that Adam's steps of
        # about lr per entry move A and B as much, relative to their size, as they do from B = 0
        B[:, g.index * r: g.index * r + k] = b / (scale * A_ROW_NORM)
        A[g.index * r: g.index * r + k] = V * A_ROW_NORM
    return B, A


def _psd_solve(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Per row, (lhs_i + ridge_i I)^-1 rhs_i for batched (out, k, k) normal equations that should be
    positive semi-definite but, summed from bf16 products, may not be: eigenvalues below zero are
    clipped to zero before the ridge (RIDGE x the row's mean eigenvalue) is added, so that no row
    can divide by a near-zero eigenvalue that rounding made."""
    evals, evecs = torch.linalg.eigh(0.5 * (lhs + lhs.transpose(1, 2)))  # (out, k), (out, k, k)
    ridge = RIDGE * evals.clamp_min(0).mean(dim=1, keepdim=True).clamp_min(1e-30)
    inv = 1.0 / (evals.clamp_min(0) + ridge)
    return torch.einsum("oij,oj,okj,ok->oi", evecs, inv, evecs, rhs)


def _top_right_singular(G: torch.Tensor, k: int, gen: torch.Generator, oversample: int = 8, iters: int = 2) -> torch.Tensor:
    """The top-k right singular vectors of G (out, in) as rows (k, in), by a randomized range finder
    (Halko et al.) with ``iters`` power iterations: a few (out, in) x (in, k + oversample) products
    instead of a full SVD. Seeded: the same G gives the same vectors."""
    q = min(k + oversample, *G.shape)
    Y = G.t() @ (G @ torch.randn(G.shape[1], q, generator=gen, device=G.device, dtype=G.dtype))  # (in, q)
    for _ in range(iters):
        Y, _ = torch.linalg.qr(Y)
        Y = G.t() @ (G @ Y)
    Q, _ = torch.linalg.qr(Y)  # (in, q): spans G's top right singular space
    _, _, Vh = torch.linalg.svd(G @ Q, full_matrices=False)  # (out, q) -> Vh (q, q)
    return (Vh[:k] @ Q.t()).contiguous()  # (k, in)


def output_error(weight: torch.Tensor, H: torch.Tensor, W_eff: torch.Tensor) -> float:
    """tr((W - W_eff) H (W - W_eff)^T): the squared output error of W_eff over the inputs of H."""
    D = weight.float() - W_eff.float()
    return float(((D @ H.float()) * D).sum())
