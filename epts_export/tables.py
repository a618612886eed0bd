"""The tables that `export` and `validate` print (rich renderables: the CLI prints them)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table


def export_table(path: Path, m: dict) -> Table:
    """One row per exported level: its graph, measured sparsity and size on disk."""
    t = Table(title=f"ONNX export {path} ({m['mode']}, {m['dtype']}, opset {m['opset']})")
    for col in ("level", "graph", "measured sparsity", "MB"):
        t.add_column(col, justify="right")
    for r in m["levels"]:
        rel = f"{r['dir']}/model.onnx" if "dir" in r else f"model.onnx (sparsity_level={r['index']})"
        size = sum((path / f).stat().st_size for f in m["files"] if f.startswith(rel.split("/")[0] + "/model.onnx") or
                   ("dir" not in r and f.startswith("model.onnx")))
        sp = f"{r['measured_sparsity']:.3f}" if "measured_sparsity" in r else "at run time"
        t.add_row(r["name"], rel, sp, f"{size / 1e6:.1f}")
    return t


def parity_table(rep: dict, export_dir: Path) -> list:
    """The parity table of a `validate` report, then (int8) one line per level with its distance
    from the float level."""
    t = Table(title=f"parity {export_dir} ({rep['mode']}, {rep['dtype']})")
    for col in ("level", "check", "worst output", "max abs err", "atol needed", "top-1", "result"):
        t.add_column(col, justify="right")
    for e in rep["levels"]:
        for name, c in e["checks"].items():
            worst = c.get("outputs", {}).get(c.get("worst_output"), {})
            t.add_row(e["level"], name, c.get("worst_output", ""),
                      f"{worst['max_abs']:.2e}" if worst.get("max_abs") is not None else "",
                      f"{worst['required_atol']:.2e}" if worst.get("required_atol") is not None else "",
                      f"{c['top1_agreement']:.3f}" if "top1_agreement" in c else ("tokens match" if c.get("match") else ""),
                      "[green]pass[/]" if c.get("passed") else "[red]FAIL[/]")
    if "out_of_range" in rep:
        t.add_row("-", "out_of_range", "", "", "", "all NaN" if rep["out_of_range"]["passed"] else "",
                  "[green]pass[/]" if rep["out_of_range"]["passed"] else "[red]FAIL[/]")
    lines: list = [t]
    for e in rep["levels"]:
        d = e.get("distance_from_float")
        if d:
            lines.append(f"{rep['dtype']} level {e['level']} vs its float model on the prompt: mean |logit diff| "
                         f"{d['mean_abs']:.3f}, max {d['max_abs']:.2f}, top-1 agreement {d['top1_agreement']:.3f}")
    return lines
