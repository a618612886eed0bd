"""The cost levers of EPTS training: the closed-form start, bf16 passes, residual groups, the
step budget and the low-group check on a subset (benchmarks/block_levers.py measures them)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from conftest import tiny_llama, tiny_opt
from epts_export.core.closed_form import closed_form_adapters, group_points, output_error
from epts_export.core.stats import dampened
from epts_export.core.hilora import merged_weight
from epts_export.core.levels import build_groups, parse_levels
from epts_export.core.masks import importance_order, obs_scores, wanda_scores
from epts_export.core.rule import level_rule
from epts_export.models.families import family_for, get_blocks, prunable_linears
from epts_export.pruning.blockloop import block_output, capture_block_inputs
from epts_export.core.config import TrainConfig
from epts_export.pruning.epts import BlockMerger, cost_per_block, frozen_groups, lr_factor, optimize_block

LEVELS = parse_levels("0.3,0.5,0.7,2:4")


def _layer(out_f=48, in_f=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with a few strong channels, as in LLM activations
    X = torch.randn(tokens, in_f, generator=g) @ (torch.eye(in_f) + 0.3 * torch.randn(in_f, in_f, generator=g))
    X[:, :3] *= 8
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    H = X.t() @ X / tokens
    return W, H, importance_order(wanda_scores(W, torch.diagonal(H)))


def test_group_points_cover_each_range():
    groups = build_groups(parse_levels("0.7,2:4"))
    pts = [[round(lv.sparsity, 4) for lv in group_points(g)] for g in groups]
    assert pts[0] == [0.1, 0.3]  # [0, 0.4]: 2 strata, capped
    assert pts[1] == [0.425]  # a 0.05 group: its midpoint
    wide = build_groups(parse_levels("0.7"), width=0.1)
    assert [round(lv.sparsity, 4) for lv in group_points(wide[1])] == [0.45]  # a 0.1 group: its midpoint
    assert group_points(groups[-1])[0].is_nm
    # group 0 over its top 0.2 only: [0.15, 0.35], 2 strata; the other groups keep their ranges
    low = build_groups(parse_levels("0.7"), width=0.1, low_top=0.35)
    assert [g.name for g in low] == ["[0,0.35]", "[0.35,0.45]", "[0.45,0.55]", "[0.55,0.65]", "[0.65,0.7]"]
    span = build_groups(parse_levels("0.7"), width=0.1, low_top=0.35, low_span=0.2)
    assert [g.name for g in span] == ["[0.15,0.35]"] + [g.name for g in low[1:]]
    assert [round(lv.sparsity, 4) for lv in group_points(span[0])] == [0.2, 0.3]
    assert build_groups(parse_levels("0.7"), low_span=0.5)[0].name == "[0,0.4]"  # a span past 0 is all of it


def test_closed_form_cuts_every_levels_output_error_and_keeps_the_mask():
    W, H, order = _layer()
    groups = build_groups(parse_levels("0.7,2:4"))
    B, A = closed_form_adapters(W, H, order, groups, rank=4, scale=1.0)
    assert B.shape == (48, 4 * len(groups)) and A.shape == (4 * len(groups), 64)
    for lv in LEVELS:
        rule = level_rule(groups, lv)
        M = rule.mask(order)
        bare = output_error(W, H, merged_weight(W, M, None, None, [], 4, 1.0))
        fixed = merged_weight(W, M, B, A, list(rule.groups), 4, 1.0)
        assert output_error(W, H, fixed) < 0.95 * bare, lv.name
        assert torch.equal(fixed == 0, ~M) or bool((fixed[~M] == 0).all())  # pruned stay exactly zero


def test_psd_solve_clips_what_rounding_made_negative():
    from epts_export.core.closed_form import RIDGE, _psd_solve

    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))
    evals = torch.tensor([1.0, 0.5, 1e-3, -3.7e-3])  # the last: rounding's, should be >= 0; ridge 3.76e-3
    lhs = (q @ torch.diag(evals) @ q.t()).unsqueeze(0)
    rhs = q[:, 3].unsqueeze(0)  # all in the bad direction
    b = _psd_solve(lhs, rhs)
    ridge = RIDGE * evals.clamp_min(0).mean()
    assert torch.allclose(b[0], q[:, 3] / ridge, rtol=1e-3)  # 1 / (0 + ridge), not 1 / (-1e-3 + ridge)
    plain = torch.linalg.solve(lhs[0] + ridge * torch.eye(4), rhs[0])
    assert plain.norm() > 5 * b.norm()  # the plain ridge solve: 1 / (ridge - 3.7e-3), 60x


def test_closed_form_guard_keeps_a_bad_solution_out(monkeypatch):
    """A group whose solved B would raise its points' error starts from B = 0: here every solve is
    made wrong on purpose, and no level may end up worse than the bare mask."""
    import epts_export.core.closed_form as cf

    monkeypatch.setattr(cf, "_psd_solve", lambda lhs, rhs: 1e3 * torch.ones_like(rhs))
    W, H, order = _layer(seed=2)
    groups = build_groups(parse_levels("0.7,2:4"), width=0.1)
    B, A = closed_form_adapters(W, H, order, groups, rank=4, scale=1.0)
    assert B.abs().max() == 0
    assert torch.isfinite(A).all() and A.abs().max() > 0  # A keeps the top directions, as a start for training


def test_closed_form_scale_is_carried_by_B():
    W, H, order = _layer(seed=1)
    groups = build_groups(parse_levels("0.5"))
    B1, A1 = closed_form_adapters(W, H, order, groups, rank=2, scale=1.0)
    B2, A2 = closed_form_adapters(W, H, order, groups, rank=2, scale=2.0)
    assert torch.allclose(A1, A2) and torch.allclose(B1, 2 * B2, rtol=1e-4, atol=1e-7)


def test_residual_merge_freezes_the_inherited_groups():
    W = torch.randn(6, 8)
    B = torch.randn(6, 4, requires_grad=True)
    A = torch.randn(4, 8, requires_grad=True)
    M = torch.ones(6, 8)
    full = merged_weight(W, M, B, A, [0, 1], 2, 1.0)
    res = merged_weight(W, M, B, A, [0, 1], 2, 1.0, frozenset({0}))
    assert torch.allclose(full, res)  # the same weight ...
    res.sum().backward()
    assert bool((B.grad[:, :2] == 0).all()) and bool((B.grad[:, 2:] != 0).any())  # ... only group 1 learns


def test_frozen_groups_per_config():
    groups = build_groups(LEVELS, 0.1, 0.35, 0.1)
    rule = level_rule(groups, parse_levels("0.5")[0])
    assert rule.groups == (0, 1, 2)
    assert frozen_groups(TrainConfig(), rule, 2) == frozenset()  # the reference: every inherited group learns
    assert frozen_groups(TrainConfig(residual=True), rule, 2) == {0, 1}
    assert frozen_groups(TrainConfig(own_low=True), rule, 2) == {0}
    assert frozen_groups(TrainConfig(own_low=True), level_rule(groups, parse_levels("0.3")[0]), 0) == frozenset()


def test_own_low_keeps_group_0_out_of_the_higher_groups_passes(monkeypatch):
    """The training passes of the groups above 0 merge group 0's adapters frozen; group 0's own
    pass trains them (the low-group check and MSFM merge without gradients either way)."""
    block, lins, inps = _setup(tiny_llama)
    cfg = TrainConfig(rank=2, epochs=1, lr=3e-3, init="lsq", group_width=0.1, low_top=0.35, low_span=0.1, own_low=True)
    groups = cfg.groups(LEVELS)
    seen = []
    call = BlockMerger.__call__
    monkeypatch.setattr(BlockMerger, "__call__", lambda self, rule, frozen=frozenset(): seen.append((rule.groups, frozen))
                        or call(self, rule, frozen))
    optimize_block(block, lins, inps.hidden, inps.hidden, inps.kwargs, groups, cfg, seed=0)
    first_step = seen[:len(groups)]  # one training pass per group, in order
    assert [g[0] for g, _ in first_step] == [0] * len(groups)
    assert [f for _, f in first_step] == [frozenset()] + [frozenset({0})] * (len(groups) - 1)


def _setup(builder, n=4, t=32):
    model = builder()
    fam = family_for(model)
    torch.manual_seed(0)
    inps = capture_block_inputs(model, fam, torch.randint(4, 200, (n, t)))
    block = get_blocks(model, fam)[0]
    return block, prunable_linears(block, fam), inps


def _err(block, lins, inps, res, groups, cfg, level):
    merge = BlockMerger({n: lin.weight.detach().float() for n, lin in lins.items()}, res.order, res.lora_B,
                        res.lora_A, cfg.rank, cfg.scale)
    rule = level_rule(groups, level, res.low_group_lora)
    return sum(F.mse_loss(block_output(functional_call(block, merge(rule), (x,), inps.kwargs)), t).item()
               for x, t in zip(inps.hidden, res.dense_out))


@pytest.mark.parametrize("builder", [tiny_llama, tiny_opt])
def test_closed_form_start_alone_beats_the_bare_mask(builder):
    block, lins, inps = _setup(builder)
    groups = build_groups(parse_levels("0.7"))
    cfg = TrainConfig(rank=4, epochs=1, lr=1e-30, init="lsq")  # no training: the start as it is
    res = optimize_block(block, lins, inps.hidden, inps.hidden, inps.kwargs, groups, cfg, seed=0)
    bare = dataclasses.replace(cfg, init="zero")
    res0 = optimize_block(block, lins, inps.hidden, inps.hidden, inps.kwargs, groups, bare, seed=0)
    lv = parse_levels("0.7")[0]
    assert _err(block, lins, inps, res, groups, cfg, lv) < 0.97 * _err(block, lins, inps, res0, groups, bare, lv)


def test_bf16_training_runs_and_learns():
    block, lins, inps = _setup(tiny_llama)
    groups = build_groups(parse_levels("0.7"))
    cfg = TrainConfig(rank=4, epochs=8, lr=1e-2, precision="bf16")
    res = optimize_block(block, lins, inps.hidden, inps.hidden, inps.kwargs, groups, cfg, seed=0)
    assert all(v.dtype == torch.float32 for v in res.lora_B.values())  # masters stay float32
    assert all(x.dtype == torch.float32 for x in res.sparse_out)
    bare = {n: torch.zeros_like(b) for n, b in res.lora_B.items()}
    lv = parse_levels("0.7")[0]
    assert _err(block, lins, inps, res, groups, cfg, lv) < 0.8 * _err(block, lins, inps, dataclasses.replace(res, lora_B=bare),
                                                                       groups, cfg, lv)


def test_steps_budget_and_check_subset():
    block, lins, inps = _setup(tiny_opt, n=6)
    groups = build_groups(parse_levels("0.5"))
    done = []
    cfg = TrainConfig(rank=2, epochs=1, steps=3, check_windows=2)
    optimize_block(block, lins, inps.hidden, inps.hidden, inps.kwargs, groups, cfg, seed=0, advance=done.append)
    G = len(groups)
    assert sum(done) == cost_per_block(6, 3, G, 2) == 6 * (1 + G) + 3 * G * 3 + 2 * 2
    # 9 steps over 6 windows: a second epoch, cut short
    done.clear()
    cfg = TrainConfig(rank=2, epochs=1, steps=9)
    optimize_block(block, lins, inps.hidden, inps.hidden, inps.kwargs, groups, cfg, seed=0, advance=done.append)
    assert sum(done) == cost_per_block(6, 9, G)


def test_config_round_trip_and_refusals():
    cfg = TrainConfig(rank=4, epochs=2, lr=1e-3, precision="bf16", init="lsq", residual=True, check_windows=8, steps=5,
                      own_low=True, group_width=0.1, warmup=3, low_top=0.35, low_span=0.2, importance="obs")
    assert TrainConfig.from_dict(dataclasses.asdict(cfg)) == cfg
    old = {"rank": 8, "epochs": 1, "lr": 0.01, "scale": 1.0, "mix_weights": None}  # an artifact from before the levers
    assert TrainConfig.from_dict(old) == TrainConfig(rank=8, epochs=1, lr=0.01)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="init"):
        TrainConfig(init="svd")
    with pytest.raises(ValueError, match="group-width"):
        TrainConfig(group_width=0)
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(warmup=-1)
    with pytest.raises(ValueError, match="low-top"):
        TrainConfig(low_top=0)
    with pytest.raises(ValueError, match="low-span"):
        TrainConfig(low_span=-0.1)
    with pytest.raises(ValueError, match="importance"):
        TrainConfig(importance="hessian")


def test_obs_scores_see_what_a_correlated_channel_can_absorb():
    """Uncorrelated inputs: the OBS score is Wanda's (H^-1 is diagonal). Channel 1 a near copy of
    channel 0: removing either costs little (the other takes its place), so OBS ranks both below an
    independent channel of the same energy, where Wanda ties all three."""
    W = torch.ones(2, 3)
    h = torch.tensor([4.0, 1.0, 9.0])
    assert torch.allclose(obs_scores(W * torch.tensor([1.0, 3.0, 2.0]), torch.diag(h)),
                          wanda_scores(W * torch.tensor([1.0, 3.0, 2.0]), h), rtol=1e-5)
    g = torch.Generator().manual_seed(0)
    x0, x2 = torch.randn(4096, generator=g), torch.randn(4096, generator=g)
    X = torch.stack([x0, x0 + 0.05 * torch.randn(4096, generator=g), x2], 1)
    X[:, 1] *= x0.norm() / X[:, 1].norm()  # the same energy in every channel: Wanda cannot tell them apart
    H = X.t() @ X / X.shape[0]
    wanda = wanda_scores(W, torch.diagonal(H))
    assert torch.allclose(wanda, wanda[:, :1].expand_as(wanda), rtol=0.05)
    obs = obs_scores(W, dampened(H))
    assert (obs[:, 2] > 3 * obs[:, 0]).all() and (obs[:, 2] > 3 * obs[:, 1]).all()
    assert (importance_order(obs)[:, 2] == 0).all()


def test_obs_importance_is_the_order_the_block_trains_and_stores():
    block, lins, inps = _setup(tiny_llama, n=4)
    groups = build_groups(LEVELS)
    grams = {n: 0 for n in lins}
    counts = {n: 0 for n in lins}

    def hook(name):
        def fn(_m, inp, _o):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            grams[name] = grams[name] + x.t() @ x
            counts[name] += x.shape[0]
        return fn

    handles = [lin.register_forward_hook(hook(n)) for n, lin in lins.items()]
    with torch.no_grad():
        for x in inps.hidden:
            block(x, **inps.kwargs)
    for h in handles:
        h.remove()
    cfg = TrainConfig(rank=2, epochs=1, importance="obs")
    res = optimize_block(block, lins, inps.hidden, inps.hidden, inps.kwargs, groups, cfg, seed=0)
    wanda = optimize_block(block, lins, inps.hidden, inps.hidden, inps.kwargs, groups,
                           dataclasses.replace(cfg, importance="wanda"), seed=0)
    for n, lin in lins.items():
        want = importance_order(obs_scores(lin.weight.detach().float(), dampened(grams[n] / counts[n])))
        assert torch.equal(res.order[n], want), n
    assert any(not torch.equal(res.order[n], wanda.order[n]) for n in lins)


def test_low_span_fits_group_0_over_its_top(monkeypatch):
    """Training draws (and the MSFM draws after them) of group 0 fall in [hi - span, hi]; the
    other groups keep their ranges; a level below group 0 is served by the mask alone."""
    import epts_export.pruning.epts as epts

    block, lins, inps = _setup(tiny_opt, n=4)
    cfg = TrainConfig(rank=2, epochs=1, low_top=0.35, low_span=0.2, group_width=0.1)
    groups = cfg.groups(parse_levels("0.55"))
    seen = []

    def draws(lo, hi, count, gen):
        seen.append((lo, hi))
        return real(lo, hi, count, gen)

    real = epts.stratified_draws
    monkeypatch.setattr(epts, "stratified_draws", draws)
    rules = []
    real_rule = epts.level_rule
    monkeypatch.setattr(epts, "level_rule", lambda g, lv, *a: rules.append(lv) or real_rule(g, lv, *a))
    optimize_block(block, lins, inps.hidden, inps.hidden, inps.kwargs, groups, cfg, seed=0)
    assert seen == [(0.15, 0.35), (0.35, 0.45), (0.45, 0.55)]
    group0 = [lv.sparsity for lv in rules if lv.sparsity <= 0.35]
    assert group0 and min(group0) >= 0.15  # no group-0 pass (training, check, MSFM) below its fit range
    assert level_rule(groups, parse_levels("0.1")[0]).groups == ()  # below group 0: the mask alone
    assert level_rule(groups, parse_levels("0.15")[0]).groups == (0,)
    assert level_rule(groups, parse_levels("0.4")[0]).groups == (0, 1)
    assert level_rule(groups, parse_levels("0.1")[0], False).groups == ()


def test_lr_warmup_then_cosine():
    import math

    assert lr_factor(0, 32) == 1.0 and lr_factor(32, 32) == 0.0  # the reference: cosine from 1 to 0
    ramp = [lr_factor(t, 32, 4) for t in range(6)]
    assert ramp[0] == pytest.approx(0.2 * lr_factor(0, 32)) and ramp[3] == pytest.approx(0.8 * lr_factor(3, 32))
    assert all(a < b for a, b in zip(ramp[:4], ramp[1:5]))  # rises through the warm-up
    assert ramp[4] == pytest.approx(lr_factor(4, 32)) and ramp[5] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 32)))


@pytest.mark.parametrize("keep_low", [True, False])
def test_msfm_from_training_mixes_the_last_epochs_outputs(monkeypatch, keep_low):
    """msfm = "train": the next block's sparse input is the MSFM mix of the outputs the last epoch
    computed, at that epoch's draws (with lr ~0 the adapters do not move, so passes at those draws
    after training give the same outputs); group 0 is passed again without adapters where the
    low-group check takes them away; the progress counts no MSFM pass."""
    import epts_export.pruning.epts as E

    block, lins, inps = _setup(tiny_llama, n=4)
    groups = build_groups(LEVELS)
    draws = {}

    class Recording(E.TrainingMix):
        def add(self, j, group, s, y, device):
            draws[j, group] = s
            super().add(j, group, s, y, device)

    monkeypatch.setattr(E, "TrainingMix", Recording)
    if not keep_low:
        monkeypatch.setattr(E, "low_group_check", lambda *a: (False, {}))
    cfg = TrainConfig(rank=2, epochs=2, lr=1e-30, msfm="train")
    done = []
    res = optimize_block(block, lins, inps.hidden, inps.hidden, inps.kwargs, groups, cfg, seed=0, advance=done.append)
    checked = 0 if keep_low else 2 * 4  # the stand-in check passes no window
    assert sum(done) == cost_per_block(4, 8, len(groups), msfm_pass=False) - checked
    merge = BlockMerger({n: lin.weight.detach().float() for n, lin in lins.items()}, res.order, res.lora_B, res.lora_A,
                        cfg.rank, cfg.scale)
    for j, (x, got) in enumerate(zip(inps.hidden, res.sparse_out)):
        outs = [block_output(functional_call(block, merge(level_rule(groups, E.group_level(g, draws[j, g.index]), keep_low)),
                                             (x,), inps.kwargs)) for g in groups]
        want = sum(w * y for w, y in zip(E.mix_weights(groups), outs))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the draws are those of the last epoch: a second run with the reference's MSFM pass differs
    ref = optimize_block(block, lins, inps.hidden, inps.hidden, inps.kwargs, groups,
                         dataclasses.replace(cfg, msfm="pass"), seed=0)
    assert not torch.allclose(ref.sparse_out[0], res.sparse_out[0])
    torch.testing.assert_close(ref.dense_out[0], res.dense_out[0])


def test_msfm_from_training_needs_an_epoch_that_passes_every_window():
    assert TrainConfig(epochs=1, msfm="train").mixes_in_training(32)
    assert not TrainConfig(epochs=1, steps=40, msfm="train").mixes_in_training(32)  # the 2nd epoch stops at 8 of 32
    assert TrainConfig(epochs=1, steps=64, msfm="train").mixes_in_training(32)
    assert not TrainConfig(epochs=1).mixes_in_training(32)
    with pytest.raises(ValueError, match="msfm must be one of pass, train"):
        TrainConfig(msfm="during")
    assert TrainConfig.from_dict({**dataclasses.asdict(TrainConfig(msfm="train"))}).msfm == "train"
    assert TrainConfig.from_dict({k: v for k, v in dataclasses.asdict(TrainConfig()).items() if k != "msfm"}).msfm == "pass"
