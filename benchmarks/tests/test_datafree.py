"""benchmarks/datafree.py: the variants it builds and the table it prints."""

from __future__ import annotations

import pytest

from benchmarks.datafree import markdown, variant_spec
from epts_export.core.levels import parse_levels


def test_variants_change_only_the_calibration_and_the_allocation(tmp_path):
    levels = parse_levels("0.5,2:4")
    base = variant_spec("self", "smollm2-135m", levels, tmp_path)
    pydoc = variant_spec("pydoc+err", "smollm2-135m", levels, tmp_path)
    assert base["calib"].source == "self" and base["allocation"] == "uniform"
    assert pydoc["allocation"] == "error" and pydoc["calib"].source == str(tmp_path / "pydoc.txt")
    assert "The \"assert\" statement" in (tmp_path / "pydoc.txt").read_text()
    assert pydoc["train"] == base["train"] and pydoc["calib"].nsamples == base["calib"].nsamples
    assert base["train"].msfm == "pass"
    fast = variant_spec("self+err+mtrain", "smollm2-135m", levels, tmp_path)
    assert fast["train"].msfm == "train" and fast["allocation"] == "error" and fast["calib"] == base["calib"]
    for bad in ("self+owl", "self+err+err", "mtrain"):
        with pytest.raises(SystemExit, match="unknown variant"):
            variant_spec(bad, "smollm2-135m", levels, tmp_path)


def test_table_gives_each_variant_its_ratio_to_the_reference():
    result = {"levels": ["0.5", "2:4"],
              "references": {"shakespeare": {"ppl": {"0.5": 50.0, "2:4": 80.0}, "time_s": 600.0}},
              "variants": {"self": {"time_s": 360.0, "ppl": {"shakespeare": {"0.5": 60.0, "2:4": 80.0}}}}}
    text = markdown(result)
    assert "| text from shakespeare (reference) | 10.0 min | 50.00 | 80.00 |" in text
    assert "| self | 6.0 min | 60.00 (1.20x) | 80.00 (1.00x) |" in text
