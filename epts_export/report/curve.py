"""The quality curve of an elastic artifact: perplexity at sparsities sampled across its whole
range (the trained levels among them, marked), its N:M levels as points, the dense model as the
reference, and other artifacts of the same model (one-level baselines, another EPTS run) on the
same windows."""

from __future__ import annotations

from pathlib import Path

from ..artifact.folder import Artifact
from ..core.levels import Level
from ..errors import UserError
from ..progress import Progress

CURVE_FORMAT = "epts-curve"
CURVE_STEP_BUILD = 0.1  # build --eval-data: the curve every 0.1 (eval --plot defaults to every 0.05)


def curve_levels(art: Artifact, step: float = 0.05) -> list[Level]:
    """What to evaluate: for an EPTS artifact every ``step`` from ``step`` to the top of its range
    plus its trained levels, then its N:M levels; for a one-level artifact its level."""
    check_step(step)
    if not art.is_elastic:
        return list(art.levels)
    top = max((g.hi for g in art.groups if not g.is_nm), default=0.0)
    grid = {round(k * step, 4) for k in range(1, int(top / step + 1e-9) + 1)}
    grid |= {lv.sparsity for lv in art.levels if not lv.is_nm}
    return [Level(sparsity=s) for s in sorted(grid)] + [lv for lv in art.levels if lv.is_nm]


def check_step(step: float) -> None:
    """A curve samples at most 100 points per artifact: 0.01 <= step <= 0.5."""
    if not (step == step and 0.01 <= step <= 0.5):
        raise UserError(f"--step must be between 0.01 and 0.5 (a point every 1% to every 50% of sparsity), got {step:g}")


def label_of(art: Artifact) -> str:
    """How a curve names an artifact: its method, and its folder's name."""
    return f"{art.method.upper() if art.method == 'epts' else art.method} ({art.path.name})"


def evaluate_curve(art: Artifact, data: str, seqlen: int, *, compare: list[Artifact] = (), step: float = 0.05,
                   max_windows: int | None = None, levels: list[Level] | None = None, model=None,
                   progress: Progress | None = None) -> dict:
    """The curve of ``art`` (``levels``, default ``curve_levels``) and of every ``compare`` artifact,
    each on the same windows of ``data``; JSON-able: the dense perplexity (``art``'s model) and one
    series per artifact with its points (level, nominal and measured sparsity, perplexity, whether
    it was trained, whether it is N:M)."""
    from ..artifact.evaluate import evaluate

    source = art.manifest.get("model", {}).get("sha256")
    for other in compare:
        if other.manifest.get("model", {}).get("sha256") != source:
            raise UserError(f"--compare {other.path} was made from another model than {art.path} (its model sha256 "
                            "differs): a curve compares artifacts of one model, on the same windows")
    series, dense, record = [], None, None
    for k, a in enumerate([art, *compare]):
        todo = (levels if levels is not None else curve_levels(a, step)) if k == 0 else curve_levels(a, step)
        ev = evaluate(a, data, seqlen, todo, progress, max_windows, model=model if k == 0 else None, dense=k == 0)
        if record is not None and ev["data"] != record:
            raise UserError(f"{a.path} tokenizes the evaluation text into other windows than {art.path}: "
                            "compare artifacts of one model")
        record = ev["data"]
        rows = ev["results"]
        if k == 0:
            dense, rows = rows[0]["ppl"], rows[1:]
        trained = {lv.name for lv in a.levels}
        series.append({"label": label_of(a), "method": a.method, "path": str(a.path), "points": [
            {"level": r["level"], "sparsity": _nominal(r["level"]), "measured_sparsity": r["sparsity"], "ppl": r["ppl"],
             "trained": r["level"] in trained, "nm": ":" in r["level"]} for r in rows]})
    return {"format": CURVE_FORMAT, "data": record, "seqlen": seqlen, "dense": dense, "series": series}


def _nominal(name: str) -> float:
    from ..core.levels import parse_level

    return parse_level(name).sparsity


PLOT_SUFFIXES = (".png", ".svg", ".html")


def check_plot_path(path) -> None:
    """Before any work: UserError for a --plot path of another kind or that cannot be written."""
    from ..fsutil import check_output_file

    if Path(path).suffix.lower() not in PLOT_SUFFIXES:
        raise UserError(f"--plot {path}: give a .png, .svg or .html file (the suffix picks the format)")
    check_output_file(Path(path), "--plot")


def open_artifact(path, flag: str) -> Artifact:
    if not (Path(path) / "manifest.json").is_file():
        raise UserError(f"{flag} {path} is not an artifact folder: a curve is drawn for artifacts (optimize's output)")
    return Artifact.open(path)


def write_plot(curve: dict, path) -> Path:
    """The curve as ``path``'s format: a PNG or SVG image, or an HTML page with the table."""
    from ..fsutil import write_bytes
    from .pages import curve_page
    from .plot import draw

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".html":
        write_bytes(path, curve_page(curve).encode("utf-8"))
    else:
        write_bytes(path, draw(curve, suffix[1:]))
    return path
