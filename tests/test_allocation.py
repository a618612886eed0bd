"""Layer-wise allocation (core/allocation.py): per-block sparsities that keep the masks nested, the
mean at the level, and every consumer of the level rule (materialize, baselines, the dynamic
tables, the baked sparsity check, the bundle) serving the same per-block masks."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from conftest import spec_for
from epts_export.core.allocation import RAMP, UNIFORM, Allocation, score_offsets, outlier_fraction, parse_allocation
from epts_export.core.levels import Level, parse_level
from epts_export.errors import UserError


def _random_allocation(nblocks: int, seed: int) -> Allocation:
    rng = random.Random(seed)
    ratios = [rng.random() for _ in range(nblocks)]
    return Allocation("owl", score_offsets(ratios, [1] * nblocks, 0.125), RAMP, 0.125, 5.0)


@pytest.mark.parametrize("seed", range(5))
def test_block_sparsities_rise_with_the_level_and_average_to_it(seed):
    alloc = _random_allocation(12, seed)
    grid = [i / 200 for i in range(200)]
    for b in range(12):
        per = [alloc.sparsity(b, s) for s in grid]
        assert all(0.0 <= x < 1.0 for x in per)
        assert all(hi >= lo - 1e-12 for lo, hi in zip(per, per[1:])), f"block {b} is not monotone"
    for s in grid:
        assert math.isclose(sum(alloc.sparsity(b, s) for b in range(12)) / 12, s, abs_tol=1e-12)
    assert alloc.sparsity(3, 0.0) == 0.0
    assert max(abs(alloc.sparsity(b, 0.5) - 0.5) for b in range(12)) == pytest.approx(max(abs(d) for d in alloc.offsets))


def test_score_offsets_follow_the_outliers_and_weigh_parameters():
    off = score_offsets([0.01, 0.05, 0.03], [1, 1, 1], 0.08)
    assert off[1] < off[2] < off[0]  # more outliers, less pruning
    assert max(off) - min(off) == pytest.approx(0.16)
    assert sum(off) == pytest.approx(0.0, abs=1e-12)
    weighted = score_offsets([0.01, 0.05], [3, 1], 0.08)
    assert 3 * weighted[0] + weighted[1] == pytest.approx(0.0, abs=1e-12)
    assert score_offsets([0.02, 0.02], [1, 1], 0.08) == (0.0, 0.0)


def test_outlier_fraction_counts_scores_above_m_times_the_mean():
    scores = [torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 41.0])]  # mean 5
    assert outlier_fraction(scores, 5.0) == pytest.approx(0.1)
    assert outlier_fraction(scores, 9.0) == 0.0


@pytest.mark.parametrize("text,expect", [("uniform", ("uniform", 0.0, 0.0)), ("owl", ("owl", 0.08, 5.0)),
                                         ("owl:0.1", ("owl", 0.1, 5.0)), (" OWL:0.05,7 ", ("owl", 0.05, 7.0)),
                                         ("error", ("error", 0.08, 0.0)), ("error:0.04", ("error", 0.04, 0.0))])
def test_parse_allocation(text, expect):
    assert parse_allocation(text) == expect


@pytest.mark.parametrize("text", ["owls", "uniform:1", "owl:x", "owl:0", "owl:0.2", "owl:0.1,0", "owl:0.1,5,3", "owl:nan",
                                  "error:0.1,5", "error:-1"])
def test_parse_allocation_refuses(text):
    with pytest.raises(UserError):
        parse_allocation(text)


@pytest.mark.parametrize("record", [{"method": "owl", "offsets": [0.3, -0.3]}, {"method": "owl", "offsets": [float("nan"), 0]},
                                    {"method": "x", "offsets": []}, {"method": "owl", "ramp": 0.9, "offsets": [0.1, -0.1]},
                                    {"method": "owl", "offsets": [0.1, -0.1, 0.0]}])
def test_allocation_records_that_would_break_nesting_are_refused(record):
    with pytest.raises(ValueError):
        Allocation.from_dict(record, nblocks=2)


def test_allocation_record_round_trips():
    alloc = _random_allocation(4, 0)
    back = Allocation.from_dict(json.loads(json.dumps(alloc.to_dict())), 4)
    assert back.offsets == pytest.approx(alloc.offsets) and back.method == "owl" and back.lam == 0.125
    assert Allocation.from_dict(None) is UNIFORM and UNIFORM.sparsity(0, 0.42) == 0.42


@pytest.fixture(scope="module")
def owl_artifact(tiny_dirs, text_file, tmp_path_factory):
    from epts_export.pruning.optimize import optimize

    return optimize(spec_for(tiny_dirs["llama"], tmp_path_factory.mktemp("owl") / "art", text_file, allocation="owl:0.1"))


def _zero_fractions(model, family):
    from epts_export.models.families import iter_prunable

    per: dict[int, list[float]] = {}
    for i, _n, lin in iter_prunable(model, family):
        per.setdefault(i, []).append(float((lin.weight == 0).float().mean()))
    return {i: sum(v) / len(v) for i, v in per.items()}


def test_epts_artifact_serves_the_allocation_with_nested_masks(owl_artifact):
    from epts_export.artifact.folder import Artifact
    from epts_export.artifact.materialize import ElasticModel
    from epts_export.models.families import iter_prunable, measured_sparsity

    art = Artifact.open(owl_artifact)
    alloc = art.allocation
    assert art.manifest["allocation"]["method"] == "owl" and art.manifest["settings"]["allocation"] == "owl:0.1"
    assert not alloc.uniform and len(alloc.offsets) == 2 and max(alloc.offsets) == pytest.approx(0.1)
    em = ElasticModel(art)
    prev = None
    for s in (0.1, 0.3, 0.35, 0.5, 0.62, 0.7):
        model = em.at(Level(sparsity=s))
        zeros = {(i, n): (lin.weight == 0).clone() for i, n, lin in iter_prunable(model, em.family)}
        for i, frac in _zero_fractions(model, em.family).items():
            assert frac == pytest.approx(alloc.sparsity(i, s), abs=0.5 / 64 + 1e-6), (s, i)  # one row's rounding
        assert measured_sparsity(model) == pytest.approx(s, abs=0.5 / 64)
        if prev is not None:  # a weight pruned at a lower level stays pruned
            assert all(bool((prev[k] & ~zeros[k]).sum() == 0) for k in zeros), s
        prev = zeros
    nm = em.at(parse_level("2:4"))
    assert _zero_fractions(nm, em.family) == {0: pytest.approx(0.5, abs=1e-3), 1: pytest.approx(0.5, abs=1e-3)}


@pytest.mark.parametrize("allocation", ["owl", "error"])
def test_sparsegpt_baseline_prunes_each_block_to_its_share(tiny_dirs, text_file, tmp_path, allocation):
    from epts_export.artifact.folder import Artifact
    from epts_export.artifact.materialize import ElasticModel
    from epts_export.pruning.optimize import optimize

    art = Artifact.open(optimize(spec_for(tiny_dirs["opt"], tmp_path / "sg", text_file, method="sparsegpt", levels="0.6",
                                          allocation=allocation)))
    assert art.allocation.method == allocation
    em = ElasticModel(art)
    fractions = _zero_fractions(em.at(Level(sparsity=0.6)), em.family)
    assert {i: round(f, 2) for i, f in fractions.items()} == {i: round(art.allocation.sparsity(i, 0.6), 2) for i in (0, 1)}
    if allocation == "owl":  # the random tiny model's loss barely moves when one block is pruned: error may say uniform
        assert fractions[0] != pytest.approx(fractions[1], abs=0.05)


@pytest.mark.parametrize("mode", ["dynamic", "baked"])
def test_exports_of_an_allocated_artifact_validate(owl_artifact, tmp_path, mode):
    """The dynamic tables build the per-block masks, and the baked sparsity check reads each
    block's own level (a check against the global level would fail the less pruned block)."""
    from epts_export.core.levels import parse_levels
    from epts_export.onnx.export import ExportSpec, export
    from epts_export.onnx.parity import validate

    exp = export(ExportSpec(artifact=owl_artifact, out=tmp_path / mode, mode=mode, levels=parse_levels("0.3,0.5,0.7,2:4")))
    report = validate(exp)
    assert report["passed"], json.dumps(report, default=str)[:2000]
    if mode == "baked":
        sp = {e["level"]: e["checks"]["sparsity"]["measured_sparsity"] for e in report["levels"]}
        assert sp["0.5"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_error_scores_run_the_model_from_the_pruned_block_on(tiny_dirs, family):
    """The loss that scores block i runs from block i's dense input on (the blocks before it are
    dense either way): it equals the whole model's loss with block i pruned, and with nothing
    pruned and nothing left to run, the dense model's (head_logits is the family's own head)."""
    from epts_export.models import load_model
    from epts_export.models.families import family_for, get_blocks, prunable_linears
    from epts_export.pruning.allocate import _nll
    from epts_export.pruning.blockloop import capture_block_inputs, run_block

    model, _ = load_model(tiny_dirs[family])
    fam = family_for(model)
    ids = torch.randint(4, 250, (3, 24), generator=torch.Generator().manual_seed(0))

    def whole() -> float:
        with torch.no_grad():
            return sum(float(torch.nn.functional.cross_entropy(model(input_ids=r[None]).logits[0, :-1], r[1:],
                                                               reduction="sum")) for r in ids)

    blocks = get_blocks(model, fam)
    inps = capture_block_inputs(model, fam, ids)
    entry1 = run_block(blocks[0], inps.hidden, inps.kwargs, "cpu")
    last = run_block(blocks[1], entry1, inps.kwargs, "cpu")
    dense = whole()
    assert _nll(model, fam, blocks, 2, last, ids, inps.kwargs, "cpu") == pytest.approx(dense, rel=2e-4)  # bf16 autocast
    with torch.no_grad():
        for lin in prunable_linears(blocks[1], fam).values():
            lin.weight.mul_(torch.rand(lin.weight.shape, generator=torch.Generator().manual_seed(1)) > 0.9)
    pruned = whole()
    assert abs(pruned - dense) > 4e-4 * dense  # twice the tolerance: the check below tells the two apart
    assert _nll(model, fam, blocks, 1, entry1, ids, inps.kwargs, "cpu") == pytest.approx(pruned, rel=2e-4)


def test_error_allocation_prunes_the_blocks_that_cost_least_more(monkeypatch, tiny_dirs):
    """Scores are the log loss increase per block: the block whose pruning costs more is pruned less."""
    from epts_export.models import load_model
    from epts_export.models.families import family_for
    from epts_export.pruning import allocate

    model, _ = load_model(tiny_dirs["llama"])
    fam = family_for(model)
    ids = torch.randint(4, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = iter([100.0, 100.5, 104.0])  # dense, block 0 pruned, block 1 pruned
    monkeypatch.setattr(allocate, "_nll", lambda *a, **k: next(losses))
    alloc = allocate.allocate("error", 0.08, 0.0, model, fam, ids)
    assert alloc.offsets == pytest.approx((0.08, -0.08)) and alloc.method == "error"


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8, 9])
@pytest.mark.parametrize("total", [3, 8, 32])
def test_error_score_windows_are_one_process_s_under_any_world_size(world, total):
    from epts_export.pruning.allocate import ERROR_WINDOWS, error_windows
    from epts_export.pruning.distributed import Dist

    chosen = []
    for rank in range(world):
        dist = Dist(rank=rank, world=world)
        owned = dist.owned(total)
        chosen += owned[:error_windows(len(owned), dist)]
    assert sorted(chosen) == list(range(min(total, ERROR_WINDOWS)))


def test_the_default_preset_allocates_by_error_except_for_magnitude(tmp_path):
    """The `default` preset's allocation is `error` (BENCHMARKS.md, "The data-free default");
    magnitude pruning has no data to score blocks on, so it stays uniform unless asked."""
    from epts_export.pruning.optimize import OptimizeSpec

    levels = [parse_level("0.5")]
    assert OptimizeSpec.from_preset("m", tmp_path, levels, "default").allocation == "error"
    assert OptimizeSpec.from_preset("m", tmp_path, levels, "default", method="sparsegpt").allocation == "error"
    assert OptimizeSpec.from_preset("m", tmp_path, levels, "default", method="magnitude").allocation == "uniform"
    assert OptimizeSpec.from_preset("m", tmp_path, levels, "default", allocation="uniform").allocation == "uniform"
    assert OptimizeSpec.from_preset("m", tmp_path, levels, "quick").allocation == "uniform"


def test_text_calibration_picks_the_text_preset_unless_one_is_named(tmp_path):
    """--calib naming text and no --preset: the `text` preset (group 0 fit over [0.15, 0.35], 32 x
    512 tokens; BENCHMARKS.md); the data-free sources and no --calib keep `default`; a named preset
    wins; `text` without text to calibrate on is refused."""
    from epts_export.pruning.optimize import OptimizeSpec

    levels = [parse_level("0.5")]
    text = OptimizeSpec.from_preset("m", tmp_path, levels, None, calib="notes.txt")
    assert text.preset == "text" and (text.train.low_top, text.train.low_span, text.calib.seqlen) == (0.35, 0.2, 512)
    assert text.allocation == "error" and text.calib.source == "notes.txt"
    for calib in (None, "self", "random"):
        spec = OptimizeSpec.from_preset("m", tmp_path, levels, None, calib=calib)
        assert spec.preset == "default" and spec.train.low_top == 0.4 and spec.calib.seqlen == 256
    named = OptimizeSpec.from_preset("m", tmp_path, levels, "default", calib="notes.txt")
    assert named.preset == "default" and named.train.low_top == 0.4
    with pytest.raises(UserError, match="preset text calibrates on your own text"):
        OptimizeSpec.from_preset("m", tmp_path, levels, "text")
