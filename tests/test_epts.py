"""EPTS pieces on one tiny block: sampling, the mixer, the hierarchy in training, the low-group flag."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from conftest import tiny_llama, tiny_opt
from epts_export.pruning.blockloop import block_output, capture_block_inputs
from epts_export.core.rule import LevelRule, level_rule
from epts_export.core.config import TrainConfig
from epts_export.pruning.distributed import LOCAL
from epts_export.pruning.epts import (BlockMerger, group_level, minibatches, mix_weights, optimize_block,
                                     steps_per_epoch, stratified_draws)
from epts_export.models.families import family_for, get_blocks, prunable_linears
from epts_export.core.levels import Level, build_groups, parse_level, parse_levels


def test_stratified_draws_cover_every_stratum_once():
    g = torch.Generator().manual_seed(0)
    s = stratified_draws(0.4, 0.45, 50, g)
    assert s.min() >= 0.4 and s.max() <= 0.45
    strata = ((s - 0.4) / 0.05 * 50).floor().long().clamp(max=49)
    assert sorted(strata.tolist()) == list(range(50))


def test_reference_mix_weights():
    groups = build_groups(parse_levels("0.7"))
    w = mix_weights(groups)
    assert w == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2])  # the reference weights sum to 1 already
    low = mix_weights(groups, 0.4)  # mix_low: group 0's share, the rest split equally
    assert low == pytest.approx([0.4] + [0.1] * 6) and sum(low) == pytest.approx(1.0)
    assert TrainConfig.from_dict({**dataclasses.asdict(TrainConfig(mix_low=0.4))}).mix_low == 0.4
    with pytest.raises(ValueError, match="mix_low must be in"):
        TrainConfig(mix_low=1.0)


@pytest.mark.parametrize("keep_low", [True, False])
def test_msfm_pass_is_the_weighted_mix_of_each_windows_draws(keep_low):
    """Step 4 merges each group's adapters once and masks that sum per draw: the same bits as
    merging every window's weights on their own and mixing its outputs w_0 y_0 + w_1 y_1 + ..."""
    from epts_export.core.rule import level_rule
    from epts_export.pruning.epts import BlockRun, msfm_stream

    block, lins, inps = _block_setup(tiny_llama)
    groups = build_groups(parse_levels("0.3,0.5,2:4"), 0.1, 0.35, 0.1)
    cfg = TrainConfig(rank=2, epochs=1, lr=1e-2)
    res = optimize_block(block, lins, inps.hidden, inps.hidden, inps.kwargs, groups, cfg, seed=0)
    n = len(inps.hidden)
    run = BlockRun(block, lins, inps.kwargs, groups, cfg, "cpu", lambda k: None, LOCAL, n, list(range(n)), "cpu")
    merge = BlockMerger({k: lin.weight.detach().float() for k, lin in lins.items()}, res.order, res.lora_B, res.lora_A,
                        cfg.rank, cfg.scale)
    with torch.no_grad():
        got = msfm_stream(run, merge, inps.hidden, keep_low, torch.Generator().manual_seed(7))
        gen = torch.Generator().manual_seed(7)
        draws = [[float(g.lo + (g.hi - g.lo) * torch.rand((), generator=gen, dtype=torch.float64)) for g in groups]
                 for _ in range(n)]
        wts = mix_weights(groups)
        for x, y, d in zip(inps.hidden, got, draws):
            outs = [run.forward(merge(level_rule(groups, group_level(g, s), keep_low)), x) for g, s in zip(groups, d)]
            want = wts[0] * outs[0]
            for w, o in zip(wts[1:], outs[1:]):
                want = want + w * o
            assert torch.equal(y, want)


def test_training_groups_follow_the_hierarchy():
    groups = build_groups(parse_levels("0.5,2:4"))  # [0,.4] [.4,.45] [.45,.5] + 2:4
    trained = [list(level_rule(groups, group_level(g, g.hi)).groups) for g in groups]  # what a draw in g trains
    assert trained == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]


def _block_setup(builder, n=3, t=16):
    model = builder()
    fam = family_for(model)
    torch.manual_seed(0)
    samples = torch.randint(4, 200, (n, t))
    inps = capture_block_inputs(model, fam, samples)
    block = get_blocks(model, fam)[0]
    return block, prunable_linears(block, fam), inps


@pytest.mark.parametrize("builder", [tiny_llama, tiny_opt])
def test_mixer_output_is_the_block_at_the_weighted_levels(builder):
    """With all MSFM weight on the 2:4 group (no random draw there), the next sparse input must be
    exactly the block's output at 2:4 with groups 0..k + its own."""
    block, lins, inps = _block_setup(builder)
    groups = build_groups(parse_levels("0.5,2:4"))
    onehot = tuple(1.0 if g.is_nm else 0.0 for g in groups)
    res = optimize_block(block, lins, inps.hidden, inps.hidden, inps.kwargs, groups,
                         TrainConfig(rank=2, epochs=1, mix_weights=onehot), seed=0)
    weights = {n: lin.weight.detach().float() for n, lin in lins.items()}
    merge = BlockMerger(weights, res.order, res.lora_B, res.lora_A, 2, 1.0)
    params = merge(LevelRule(parse_level("2:4"), (0, 1, 2, 3)))
    for x, mixed in zip(inps.hidden, res.sparse_out):
        y = block_output(functional_call(block, params, (x,), inps.kwargs))
        assert torch.allclose(mixed, y, atol=1e-6)
    for x, d in zip(inps.hidden, res.dense_out):  # the dense stream advances with the dense block
        assert torch.allclose(d, block_output(block(x, **inps.kwargs)), atol=1e-6)


def test_training_reduces_reconstruction_error():
    block, lins, inps = _block_setup(tiny_llama, n=4, t=32)
    groups = build_groups(parse_levels("0.7"))
    res = optimize_block(block, lins, inps.hidden, inps.hidden, inps.kwargs, groups, TrainConfig(rank=4, epochs=8, lr=1e-2), seed=0)
    weights = {n: lin.weight.detach().float() for n, lin in lins.items()}
    merge = BlockMerger(weights, res.order, res.lora_B, res.lora_A, 4, 1.0)
    lv = Level(0.7)

    def err(active):
        p = merge(LevelRule(lv, tuple(active)))
        return sum(F.mse_loss(block_output(functional_call(block, p, (x,), inps.kwargs)), t).item()
                   for x, t in zip(inps.hidden, res.dense_out))

    assert err(list(range(7))) < 0.8 * err([])  # adapters must cut the 70% error noticeably


def test_the_low_group_check_keeps_group_0_adapters_only_where_they_help():
    """Step 3 of the block: group 0's adapters are kept when they lower the block's error at 0.3,
    dropped when they raise it. The same trained block flips when its group-0 adapters are spoiled
    (x100), and optimize_block records what the check measured."""
    from epts_export.pruning.epts import BlockRun, low_group_check

    block, lins, inps = _block_setup(tiny_llama)
    groups = build_groups(parse_levels("0.5"))
    cfg = TrainConfig(rank=2, epochs=3, lr=1e-2)
    res = optimize_block(block, lins, inps.hidden, inps.hidden, inps.kwargs, groups, cfg, seed=0)
    lc = res.metrics["low_check"]
    assert lc["sparsity"] == 0.3 and res.low_group_lora == (lc["with_lora"] <= lc["without_lora"])
    run = BlockRun(block, lins, inps.kwargs, groups, cfg, "cpu", lambda n: None, LOCAL, len(inps.hidden),
                   list(range(len(inps.hidden))), "cpu")
    weights = {n: lin.weight.detach().float() for n, lin in lins.items()}
    with torch.no_grad():
        teacher = [block_output(block(x, **inps.kwargs)).float() for x in inps.hidden]
    r = cfg.rank

    def check(scale_group0: float) -> tuple[bool, dict]:
        B = {n: b.clone() for n, b in res.lora_B.items()}
        for b in B.values():
            b[:, :r] *= scale_group0  # group 0's columns of B (out, G*r)
        return low_group_check(run, BlockMerger(weights, res.order, B, res.lora_A, r, cfg.scale), inps.hidden, teacher)

    kept, measured = check(1.0)
    spoiled, worse = check(100.0)
    assert worse["without_lora"] == pytest.approx(measured["without_lora"])  # the mask alone is the same
    assert worse["with_lora"] > worse["without_lora"] and spoiled is False  # adapters that hurt are dropped
    assert kept == (measured["with_lora"] <= measured["without_lora"])
    zero, same = check(0.0)  # no group-0 correction at all: the same error, and the tie keeps them
    assert same["with_lora"] == pytest.approx(same["without_lora"]) and zero is True


def test_same_seed_same_block_result():
    block, lins, inps = _block_setup(tiny_opt)
    groups = build_groups(parse_levels("0.5,2:4"))
    a = optimize_block(block, lins, inps.hidden, inps.hidden, inps.kwargs, groups, TrainConfig(rank=2, epochs=1), seed=7)
    b = optimize_block(block, lins, inps.hidden, inps.hidden, inps.kwargs, groups, TrainConfig(rank=2, epochs=1), seed=7)
    assert all(torch.equal(a.lora_A[n], b.lora_A[n]) and torch.equal(a.lora_B[n], b.lora_B[n]) for n in a.lora_A)
    assert all(torch.equal(x, y) for x, y in zip(a.sparse_out, b.sparse_out))


def test_batch_one_schedule_is_one_shuffle_of_all_windows():
    """--batch 1 (the default) draws exactly what the batch-1 loop always drew: one randperm."""
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert minibatches(7, 1, a) == [[j] for j in torch.randperm(7, generator=b).tolist()]
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))  # the same draws follow


@pytest.mark.parametrize("n, batch, world", [(5, 2, 2), (8, 4, 2), (9, 4, 4), (3, 8, 2)])
def test_minibatches_cover_each_window_once_and_split_evenly(n, batch, world):
    steps = minibatches(n, batch, torch.Generator().manual_seed(0))
    assert sorted(j for s in steps for j in s) == list(range(n))
    assert len(steps) == steps_per_epoch(n, batch) and all(len(s) <= batch for s in steps)
    for s in steps[:n // batch]:  # every full step: batch / world windows on each rank (window j on rank j % world)
        assert sorted(j % world for j in s) == sorted(list(range(world)) * (batch // world))


def test_batch_of_two_is_one_step_on_both_windows():
    """--batch 2 on 2 windows takes one step on both windows' losses: the adapters do not depend
    on which window comes first (to float rounding). --batch 1 takes two steps, whose order does."""
    block, lins, inps = _block_setup(tiny_llama, n=2)
    groups = build_groups(parse_levels("0.5"))
    rev = inps.hidden[::-1]

    def run(hidden, batch):
        return optimize_block(block, lins, hidden, hidden, inps.kwargs, groups, TrainConfig(rank=2, epochs=1, lr=1e-2,
                                                                                             batch=batch), seed=0)

    n = "mlp.down_proj"
    two, two_rev = run(inps.hidden, 2), run(rev, 2)
    assert torch.allclose(two.lora_A[n], two_rev.lora_A[n], atol=1e-6)
    assert torch.allclose(two.lora_B[n], two_rev.lora_B[n], atol=1e-6)
    one, one_rev = run(inps.hidden, 1), run(rev, 1)
    assert not torch.allclose(one.lora_B[n], one_rev.lora_B[n], atol=1e-4)
