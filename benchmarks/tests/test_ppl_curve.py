"""benchmarks/ppl_table.py's curves: a results.json becomes the curve ``eval --plot`` draws (EPTS
rows as lines with their trained levels marked, baselines as one point per run, 2:4 apart), and
--replot redraws the committed results into a PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.ppl_table import curve_of

RESULTS = Path(__file__).resolve().parents[1] / "results"


def test_a_results_file_becomes_a_curve_with_trained_levels_and_baselines():
    result = json.loads((RESULTS / "ppl_shakespeare_32x512.json").read_text())
    curve = curve_of(result)
    assert curve["dense"] == result["rows"]["dense"]["ppl"]["dense"]
    assert [s["label"] for s in curve["series"]] == [k for k in result["rows"] if k != "dense"]
    epts = next(s for s in curve["series"] if s["method"] == "epts")
    trained = {p["level"] for p in epts["points"] if p["trained"]}
    assert trained == {"0.3", "0.4", "0.5", "0.6", "0.7", "2:4"}  # 0.35 ... 0.65: between, not trained
    assert {p["level"] for p in epts["points"] if p["nm"]} == {"2:4"}
    sgpt = next(s for s in curve["series"] if s["method"] == "sparsegpt")
    assert all(p["trained"] for p in sgpt["points"]) and len(sgpt["points"]) == 6
    point = next(p for p in sgpt["points"] if p["level"] == "0.6")
    assert (point["sparsity"], point["ppl"]) == (0.6, result["rows"]["sparsegpt"]["ppl"]["0.6"])
    assert curve["data"]["source"].startswith("shakespeare")


def test_replot_writes_a_png_beside_the_results(tmp_path):
    src = tmp_path / "r.json"
    src.write_text((RESULTS / "ppl_docutils_32x512.json").read_text())
    done = subprocess.run([sys.executable, "-m", "benchmarks.ppl_table", "--replot", str(src)], capture_output=True,
                          text=True, cwd=RESULTS.parents[1], timeout=300)
    assert done.returncode == 0, done.stderr
    png = tmp_path / "r.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert f"wrote {png}" in done.stdout
