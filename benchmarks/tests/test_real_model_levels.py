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
