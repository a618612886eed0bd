"""benchmarks.int8_table: the committed results render as BENCHMARKS.md's tables."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.int8_table import markdown

RESULTS = Path(__file__).resolve().parents[1] / "results" / "int8_smollm2-135m.json"


def test_committed_results_render_and_match_benchmarks_md():
    result = json.loads(RESULTS.read_text())
    md = markdown(result)
    assert md.count("| level | float32 | int8 (alpha 0.85) | cost |") == 2 and "| 2:4 |" in md
    row = next(r for r in result["quality"]["rows"] if r["level"] == "0.5")
    cost = row["int8"]["0.85"]["shakespeare"] / row["float"]["shakespeare"] - 1
    assert f"| 0.5 | {row['float']['shakespeare']:.2f} | {row['int8']['0.85']['shakespeare']:.2f} | {cost:+.1%} |" in md
    assert "| level | fp32 MB | int8 MB |" in md and len(result["speed"]) == 6
    bench = (Path(__file__).resolve().parents[2] / "BENCHMARKS.md").read_text()
    assert all(line in bench for line in md.splitlines() if line.startswith("| "))  # BENCHMARKS.md shows these numbers
