"""The benchmark corpora in use on the real default model (SmolLM2-135M). Slow: run with `pytest -m slow`."""

from __future__ import annotations

import pytest

from benchmarks.shakespeare import benchmark_texts
from epts_export.artifact.folder import Artifact
from epts_export.artifact.materialize import ElasticModel
from epts_export.core.levels import parse_level, parse_levels
from epts_export.pruning.optimize import OptimizeSpec, optimize

pytestmark = pytest.mark.slow


def test_real_model_default_preset_serves_levels_between_the_trained_ones(tmp_path):
    """The `default` preset's training (its levers, smaller calibration to keep this minutes):
    perplexity on held-out Shakespeare rises with sparsity through every level between the
    trained ones, across group boundaries (0.4 -> 0.45 adds a group) included."""
    import os

    from epts_export.artifact.evaluate import load_eval_data, perplexity

    os.environ.pop("EPTS_CACHE", None)
    out = optimize(OptimizeSpec.from_preset("smollm2-135m", tmp_path / "smol", parse_levels("0.3,0.4,0.5,0.6,0.7,2:4"),
                                            "default", nsamples=16, seqlen=128))
    em = ElasticModel(Artifact.open(out))
    assert em.artifact.manifest["settings"]["group_width"] == 0.1
    ev = load_eval_data(str(benchmark_texts()["eval"]), em.tokenizer, 256, 8)
    levels = [round(0.3 + 0.05 * k, 2) for k in range(9)]  # 0.3, 0.35, ..., 0.7
    ppl = [perplexity(em.at(parse_level(str(s))), ev.ids) for s in levels]
    dense = perplexity(em.at(None), ev.ids)
    assert dense < ppl[0], (dense, ppl)
    assert all(a < b for a, b in zip(ppl, ppl[1:])), dict(zip(levels, ppl))


def test_real_model_allocation_levels_are_exact_and_monotone(tmp_path_factory):
    """The error allocation on SmolLM2: the blocks' sparsities differ, every level's measured sparsity is
    the level to 0.001, each block's masks nest, and perplexity rises with the level, between the
    trained levels too."""
    import os

    from epts_export.artifact.evaluate import load_eval_data, perplexity
    from epts_export.core.config import TrainConfig
    from epts_export.models.families import iter_prunable, measured_sparsity
    from epts_export.pruning.calibration import CalibSpec

    os.environ.pop("EPTS_CACHE", None)
    out = tmp_path_factory.mktemp("real-alloc") / "smol"
    art = Artifact.open(optimize(OptimizeSpec(model="smollm2-135m", out=out, levels=parse_levels("0.3,0.5,0.7"),
                                              calib=CalibSpec("self", nsamples=8, seqlen=128), allocation="error",
                                              train=TrainConfig(rank=4, epochs=1))))
    offsets = art.allocation.offsets
    assert len(offsets) == 30 and max(offsets) - min(offsets) > 0.1 and art.allocation.method == "error"
    em = ElasticModel(art)
    ev = load_eval_data(str(benchmark_texts()["eval"]), em.tokenizer, 256, 4)
    ppl, prev = [], None
    for s in (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7):
        model = em.at(parse_level(str(s)))
        assert measured_sparsity(model) == pytest.approx(s, abs=1e-3)
        zeros = {(i, n): lin.weight == 0 for i, n, lin in iter_prunable(model, em.family)}
        if prev is not None:
            assert all(not bool((prev[k] & ~zeros[k]).any()) for k in zeros), s
        prev = zeros
        ppl.append(perplexity(model, ev.ids))
    assert all(a < b for a, b in zip(ppl, ppl[1:])), ppl
