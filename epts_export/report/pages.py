"""The reports people open: the quality curve (``eval --plot x.html``), an ONNX export's report
(``export``, rewritten by ``validate`` with its parity) and a bundle's (``build``). Each is one
self-contained HTML file (``html``); the numbers are the manifests' and the parity reports'."""

from __future__ import annotations

from pathlib import Path

from .html import esc, image, page, table, verdict


def curve_rows(curve: dict) -> list[list[str]]:
    """One row per point: artifact, level, measured sparsity, perplexity, x dense, trained."""
    dense = curve.get("dense")
    rows = [["dense model", "-", "0.000", f"{dense:.3f}", "1.00", ""]] if dense else []
    for s in curve["series"]:
        for k, p in enumerate(s["points"]):
            rows.append([s["label"] if k == 0 else "", p["level"], f"{p['measured_sparsity']:.3f}", f"{p['ppl']:.3f}",
                         f"{p['ppl'] / dense:.2f}" if dense else "-", "trained" if p["trained"] else ""])
    return rows


CURVE_HEADERS = ["artifact", "level", "measured sparsity", "perplexity", "x dense", ""]


def curve_section(curve: dict) -> str:
    from .plot import draw

    return (image(draw(curve, "png"), "perplexity against sparsity") +
            f"<p class=\"meta\">{esc(curve['data'].get('windows'))} windows of {esc(curve['seqlen'])} tokens of "
            f"{esc(curve['data'].get('source'))} (sha256 {esc(str(curve['data'].get('sha256'))[:12])})</p>" +
            table(CURVE_HEADERS, curve_rows(curve)))


def curve_page(curve: dict) -> str:
    names = ", ".join(s["label"] for s in curve["series"])
    return page("Perplexity against sparsity", [("Curve", curve_section(curve))], meta=names)


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def parity_summary(entry: dict) -> tuple[str, str, str]:
    """(largest error against its tolerance, top-1 agreement, tokens matched) of one level's checks."""
    worst, worst_text = -1.0, "-"
    agree, tokens = [], []
    for name, check in entry.get("checks", {}).items():
        for out, o in (check.get("outputs") or {}).items():
            tol = o.get("atol")
            need = o.get("required_atol", o.get("max_abs"))
            if tol and need is not None and need / tol > worst:
                worst = need / tol
                worst_text = f"{name} {out}: {o.get('max_abs', 0):.2g} (uses {100 * need / tol:.2g}% of atol {tol:g})"
        if "top1_agreement" in check:
            agree.append(check["top1_agreement"])
        if "reference" in check and "match" in check:
            ref = check.get("reference") or []
            div = check.get("first_divergence")
            tokens.append((len(ref) if div is None else div, len(ref)))
    fewest = min(tokens, key=lambda t: t[0] / max(t[1], 1)) if tokens else None
    return worst_text, (f"{min(agree):.3f}" if agree else "-"), (f"{fewest[0]}/{fewest[1]}" if fewest else "-")


def parity_section(report: dict | None) -> str:
    if not report:
        return "<p>Not validated yet: run <code>epts-export validate</code>.</p>"
    rows = []
    quantized = any("distance_from_float" in e for e in report.get("levels", []))
    for e in report.get("levels", []):
        worst, agree, tokens = parity_summary(e)
        d = e.get("distance_from_float")
        rows.append([e["level"], verdict(e.get("passed")), worst, agree, tokens]
                    + ([f"mean {d['mean_abs']:.3f}, top-1 {d['top1_agreement']:.3f}" if d else "-"] if quantized else []))
    text = (f"<p>{verdict(report.get('passed'))} against the PyTorch reference ({esc(report.get('dtype'))}; "
            f"tolerances per output, failures: {esc(len(report.get('failures', [])))})</p>")
    columns = ["level", "parity", "largest error", "top-1 agreement", "tokens matched"]
    return text + table(columns + (["logits vs the float level"] if quantized else []), rows, raw_columns=(1,))


def export_page(manifest: dict, report: dict | None) -> str:
    """An export folder's report: its levels, bytes and parity."""
    files = manifest.get("files", {})
    rows = [[r["name"], r.get("pattern", "-"), f"{r['measured_sparsity']:.3f}" if r.get("measured_sparsity") is not None
             else "at run time", r.get("dir", "shared")] for r in manifest.get("levels", [])]
    src = manifest.get("source_artifact", {})
    sections = [("Levels", table(["level", "pattern", "measured sparsity", "folder"], rows)),
                ("Parity", parity_section(report)),
                ("Files", f"<p>{len(files)} files; the artifact: {esc(src.get('path'))} "
                          f"(manifest sha256 {esc(str(src.get('manifest_sha256'))[:12])})</p>")]
    return page(f"ONNX export ({manifest.get('mode')}, {manifest.get('dtype')}, opset {manifest.get('opset')})", sections,
                meta=f"{len(manifest.get('levels', []))} levels of {src.get('model') or src.get('path')}")


def level_bytes(manifest: dict) -> tuple[int, dict[str, int]]:
    """(bytes every level shares, level name -> bytes only it uses) of a bundle, from file_sizes."""
    sizes = manifest.get("file_sizes", {})
    dirs = {r["name"]: r.get("dir") for r in manifest.get("levels", [])}
    users: dict[str, list[str]] = {}
    for name, d in dirs.items():
        users.setdefault(d, []).append(name)
    own = {name: 0 for name in dirs}
    shared = 0
    for rel, n in sizes.items():
        top = next((d for d in users if d and (rel == d or rel.startswith(d + "/"))), None)
        if top is not None and len(users[top]) == 1:
            own[users[top][0]] += n
        else:
            shared += n
    return shared, own


def bundle_page(manifest: dict, parity: dict | None, curve: dict | None = None, engines: dict | None = None) -> str:
    """A bundle's report: the target, each level (measured sparsity, bytes, parity, perplexity),
    the curve when the build evaluated one, what each stage took, and the engines when built."""
    t = manifest.get("target", {})
    shared, own = level_bytes(manifest)
    by_level = {e["level"]: e for e in (parity or {}).get("levels", [])}
    rows = []
    for r in manifest.get("levels", []):
        worst, agree, tokens = parity_summary(by_level.get(r["name"], {}))
        ppl = (r.get("perplexity") or {}).get("value")
        rows.append([r["name"], r.get("pattern"), f"{r['measured_sparsity']:.3f}" if r.get("measured_sparsity") is not None
                     else "-", _bytes(own.get(r["name"])), verdict(r.get("parity", {}).get("passed")), worst, tokens,
                     f"{ppl:.2f}" if ppl else "-", _engine_cell(r)])
    sections = [("Target", table(["name", "kind", "compute capability", "TensorRT", "memory budget", "precision"],
                                 [[t.get("name"), t.get("kind"), t.get("compute_capability"), t.get("tensorrt"),
                                   f"{t.get('memory_budget_gb')} GB", t.get("precision")]])),
                ("Levels", f"<p>{_bytes(shared)} shared by every level"
                           f"{' (one copy of the weights: the elastic model)' if manifest.get('layout') == 'elastic' else ''}"
                           f"; the per-level column is what only that level uses.</p>" +
                 table(["level", "pattern", "measured sparsity", "own bytes", "parity", "largest error", "tokens matched",
                        "perplexity", "engine"], rows, raw_columns=(4,)))]
    if curve:
        sections.append(("Perplexity against sparsity", curve_section(curve)))
    calib = (manifest.get("source") or {}).get("calibration")
    if isinstance(calib, dict):
        from ..pruning.presets import calibration_note

        note = calibration_note(calib)
        sections.append(("Calibration", f"<p>{esc(calib.get('source'))}: {esc(calib.get('nsamples'))} x "
                                        f"{esc(calib.get('seqlen'))} tokens (seed {esc(calib.get('seed'))}).</p>" +
                         (f"<p class=\"meta\">{esc(note)}</p>" if note else "")))
    alloc = (manifest.get("source") or {}).get("allocation")
    if isinstance(alloc, dict) and any(alloc.get("offsets") or []):
        from ..core.allocation import Allocation

        try:
            text = Allocation.from_dict(alloc).describe()
        except (KeyError, TypeError, ValueError):
            text = "unreadable record"
        sections.append(("Layer-wise allocation", f"<p>{esc(text)}; the measured sparsity of each level is its mean.</p>"))
    stages = manifest.get("stages") or []
    if stages:
        sections.append(("Time per stage", table(["stage", "seconds", ""], [
            [s["name"], f"{s['seconds']:.1f}", "reused" if s.get("reused") else ""] for s in stages])))
    sections.append(("Engines", _engines_section(manifest, engines)))
    return page(f"Bundle for {t.get('name')}: {len(rows)} levels", sections,
                meta=f"{manifest.get('layout')} layout, {t.get('description', '')}")


def _engine_cell(record: dict) -> str:
    planned = (record.get("trt_engine") or {}).get("engine")
    if not planned:
        return "-"
    return f"{planned} (built)" if record.get("engine") else f"{planned} (built on the device)"


def _engines_section(manifest: dict, engines: dict | None) -> str:
    """The engine report (``device/trt/report.measure_engines``): per engine its sparse layers and
    latencies, per level its refit and check, and the verdicts on what 2:4 bought."""
    e = manifest.get("engines", {})
    if not engines:
        how = e.get("how")
        return (f"<p>Not built here: {esc(e.get('reason') or 'no TensorRT on the build machine')}.</p>" +
                (f"<p>To build them: {esc(how)}.</p>" if how else ""))
    rows = []
    for x in engines.get("engines", []):
        sp, lat = x.get("sparsity") or {}, x.get("latency_ms") or {}
        rows.append([x.get("engine"), ", ".join(x.get("levels", [])), f"{sp.get('picked', '-')}/{sp.get('eligible', '-')}",
                     f"{lat['prefill']:.3f}" if "prefill" in lat else "-", f"{lat['decode']:.3f}" if "decode" in lat else "-"])
    levels = [[lv, verdict(r.get("served")), f"{r['refit_s']:.3f}" if r.get("refit_s") is not None else "-",
               r.get("why", "")] for lv, r in (engines.get("levels") or {}).items()]
    verdicts = "".join(f"<li>{esc(v)}</li>" for v in engines.get("verdicts", []))
    return (f"<p>{esc(engines.get('gpu'))}, TensorRT {esc(engines.get('tensorrt'))}</p>" +
            table(["engine", "levels", "sparse layers picked/eligible", "prefill ms", "decode ms"], rows) +
            table(["level", "served", "refit s", ""], levels, raw_columns=(1,)) + (f"<ul>{verdicts}</ul>" if verdicts else ""))


def write_report(path: Path, text: str) -> Path:
    from .html import write_page

    return write_page(path, text)
