"""benchmarks/peers.py's table, and the worker's independence from this package (it runs in
llm-compressor's venv, where epts_export is not installed)."""

from __future__ import annotations

import ast
from pathlib import Path

from benchmarks.peers import markdown


def test_peer_table_marks_failed_and_missing_runs():
    result = {"rows": {"dense": {"ppl": {"dense": 42.0}},
                       "sparsegpt": {"ppl": {"0.5": 61.0, "2:4": 80.5}, "time_s": {"0.5": 60.0, "2:4": 60.0}, "errors": {}},
                       "wanda@owl": {"ppl": {"0.5": 70.0}, "time_s": {"0.5": 30.0}, "errors": {"2:4": "ValueError: x"}}},
              "not_available": {"alps": "not in the release"}}
    text = markdown(result)
    assert "| sparsegpt | 2.0 min | 61.00 | 80.50 |" in text
    assert "| wanda@owl | 0.5 min | 70.00 | failed |" in text
    assert "| alps | - | n/a | n/a |" in text and "alps: not in the release" in text


def test_peer_worker_imports_nothing_of_ours():
    tree = ast.parse((Path(__file__).parents[1] / "peer_worker.py").read_text())
    names = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    names |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(n.startswith(("epts_export", "benchmarks", ".")) or n == "" for n in names), names
