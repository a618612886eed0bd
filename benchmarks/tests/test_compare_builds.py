"""benchmarks/compare_builds.py: what it ignores (times, stage fingerprints) and what it does not."""

from __future__ import annotations

import json

from benchmarks.compare_builds import main


def _tree(root, created: str, value: float, stage: str):
    (root / f".stages/onnx-{stage}").mkdir(parents=True)
    (root / f".stages/onnx-{stage}/manifest.json").write_text(json.dumps({"created": created, "levels": [value]}))
    (root / "notes.txt").write_text("same")


def test_times_and_stage_names_are_ignored_values_are_not(tmp_path, capsys):
    _tree(tmp_path / "a", "2026-01-01", 0.5, "0" * 16)
    _tree(tmp_path / "b", "2026-12-04", 0.5, "1" * 16)
    _tree(tmp_path / "c", "2026-12-04", 0.7, "1" * 16)
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert main([str(tmp_path / "a"), str(tmp_path / "c")]) == 1
    assert "differs: .stages/onnx-KEY/manifest.json" in capsys.readouterr().out
    (tmp_path / "c" / "extra").write_text("x")
    assert main([str(tmp_path / "b"), str(tmp_path / "c")]) == 1
