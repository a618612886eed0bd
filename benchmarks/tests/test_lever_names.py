"""benchmarks/levers.py: the lever names of the benchmark tables."""

from __future__ import annotations

import pytest

from benchmarks.levers import split_allocation, variant_config
from epts_export.core.config import TrainConfig
from epts_export.core.levels import parse_levels


def test_benchmark_variant_names():
    """benchmarks/levers.py's names set the fields they say; mixeq's and mixlow's weights match the groups."""
    levels = parse_levels("0.3,0.5,0.7,2:4")
    cfg = variant_config("bf16+lsq+g10+r16+low35+span20+obs+mixeq+lr3e3", TrainConfig(), levels)
    assert (cfg.precision, cfg.init, cfg.group_width, cfg.rank, cfg.low_top, cfg.low_span, cfg.importance, cfg.lr) == \
        ("bf16", "lsq", 0.1, 16, 0.35, 0.2, "obs", pytest.approx(3e-3))
    G = len(cfg.groups(levels))
    assert G == 6 and cfg.mix_weights == (1 / G,) * G
    low = variant_config("g10+low35+span20+mixlow40+own0", TrainConfig(), levels)
    assert low.mix_low == 0.4 and low.mix_weights is None and low.own_low
    assert variant_config("base", TrainConfig()) == TrainConfig()
    with pytest.raises(SystemExit, match="unknown lever 'x9'"):
        variant_config("bf16+x9", TrainConfig())


def test_allocation_tokens_leave_the_training_config():
    assert split_allocation("bf16+owl+r16") == ("bf16+r16", "owl")
    assert split_allocation("owl4+lsq") == ("lsq", "owl:0.04")
    assert split_allocation("err8") == ("", "error:0.08")
    assert split_allocation("base") == ("", "uniform") and split_allocation("lsq") == ("lsq", "uniform")
