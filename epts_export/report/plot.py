"""Drawing the quality curve with matplotlib (Agg: no display needed): perplexity against
sparsity, one line per elastic artifact across its range with its trained levels marked, N:M
levels and one-level baselines as points, the dense model as a dashed line; a log scale when the
perplexities span more than a factor of 3."""

from __future__ import annotations

import io

FORMATS = ("png", "svg")
MARKERS = "osD^v<>p*h"


def draw(curve: dict, fmt: str = "png", title: str | None = None) -> bytes:
    """The curve (``curve.evaluate_curve``'s dict) as PNG or SVG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    if fmt not in FORMATS:
        raise ValueError(f"unknown plot format {fmt!r}")
    many = len(curve["series"]) > 3
    wide = max((len(s["label"]) for s in curve["series"]), default=0) > 36  # long labels: one legend column
    entries = len(curve["series"]) + 3
    fig = Figure(figsize=(7.5, 4.6 + (0.2 * (entries if wide else (entries + 1) // 2) if many else 0)), dpi=110,
                 layout="constrained")
    ax = fig.add_subplot()
    ppls = [p["ppl"] for s in curve["series"] for p in s["points"]] + ([curve["dense"]] if curve.get("dense") else [])
    finite = [v for v in ppls if v == v and v not in (float("inf"),)]
    any_nm = False
    for k, s in enumerate(curve["series"]):
        color = f"C{k % 10}"
        line = sorted((p for p in s["points"] if not p["nm"]), key=lambda p: p["sparsity"])
        xs, ys = [p["sparsity"] for p in line], [p["ppl"] for p in line]
        if len(line) > 1 and s.get("method") not in (None, "epts"):  # one-level runs, one per level: joined, dotted
            ax.plot(xs, ys, ":", marker=MARKERS[(k % 9) + 1], color=color, lw=1.4, ms=6,
                    label=f"{s['label']}, one run per level")
        elif len(line) > 1:  # an elastic artifact: its curve, the trained levels marked on it
            ax.plot(xs, ys, "-", marker=MARKERS[0], markevery=[i for i, p in enumerate(line) if p["trained"]],
                    color=color, lw=1.6, ms=6, label=s["label"])
        else:  # a one-level artifact: a point
            ax.plot(xs, ys, MARKERS[(k % 9) + 1], color=color, ms=8, ls="none", label=s["label"])
        for p in (p for p in s["points"] if p["nm"]):
            any_nm = True
            ax.plot([p["sparsity"]], [p["ppl"]], "*", color=color, ms=12, ls="none",
                    label=None if line else f"{s['label']}: {p['level']}")
            if not many:
                ax.annotate(p["level"], (p["sparsity"], p["ppl"]), textcoords="offset points", xytext=(6, 4),
                            fontsize=8, color=color)
    if curve.get("dense"):
        ax.axhline(curve["dense"], color="0.4", ls="--", lw=1, label=f"dense ({curve['dense']:.2f})")
    if finite and max(finite) / max(min(finite), 1e-9) > 3:
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

        ax.set_yscale("log")  # plain numbers on the ticks (60, 100, 200), not 6 x 10^1
        span = max(finite) / max(min(finite), 1e-9)
        ax.yaxis.set_major_locator(LogLocator(subs=tuple(range(1, 10)) if span < 10 else (1.0, 2.0, 5.0), numticks=30))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("sparsity (fraction of prunable weights that are zero)")
    ax.set_ylabel("perplexity (lower is better)")
    data = curve.get("data") or {}
    ax.set_title(title or f"perplexity on {data.get('windows', '?')} x {curve.get('seqlen', '?')} tokens of "
                 f"{_short(str(data.get('source', '?')))}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if any_nm:  # one legend entry for every series' N:M points
        ax.plot([], [], "*", color="0.35", ms=10, ls="none", label="N:M level (2:4), same colour as its series")
    if any(p["trained"] for s in curve["series"] if s.get("method") == "epts" for p in s["points"] if not p["nm"]):
        ax.plot([], [], MARKERS[0], color="0.35", ms=6, ls="none", label="trained level (others: between them)")
    if many:
        fig.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="outside lower center", ncols=1 if wide else 2)
    else:
        ax.legend(fontsize=8, loc="upper left")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
    return buf.getvalue()


def _short(text: str, width: int = 50) -> str:
    from pathlib import PurePath

    text = PurePath(text).name or text  # the file's name: its folder is in the report's table
    return text if len(text) <= width else "..." + text[-(width - 3):]
