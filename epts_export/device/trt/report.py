"""What the engines of a bundle bought on this device: ``engines/report.json`` and its table.

Per engine: the layers eligible for sparse tactics and the layers that picked them (the engine
inspector's layer information and the build log, ``sparsity.sparse_report``), and the latency of
a prefill (batch 1 x 512 tokens) and of a decode step (batch 1, one token on a 512-token cache),
inputs resident on the device. Per level: the check against ONNX Runtime that serving it passed
(``TrtDecoder.check_level``) and, for the levels of a refit engine, the time of the refit that
switched to it. Per N:M engine, a verdict against the engine of the nearest unstructured level
(dense kernels: TensorRT has none for unstructured sparsity), e.g.

    2:4: prefill 1.21x, decode 1.01x the dense engine (level 0.5) on Orin (sm_87, cuda:0) with TensorRT 10.3.0

TensorRT picks a sparse kernel only where it is faster, and published measurements of 2:4 on LLMs
range from no gain at decode batch 1 to about 1.3x at prefill: the report says which it is here.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..files import write_json
from ..levels import parse_level
from .spec import REPORT_FILE, EngineSpec, unique_specs

PREFILL_TOKENS, DECODE_CACHE = 512, 512
NOTHING_BELOW = 1.05  # a speed-up under 5% is within what two timing runs differ by: "buys nothing"


def fitted_shapes(spec: EngineSpec) -> dict[str, tuple[int, int]]:
    """{"prefill": (new tokens, 0), "decode": (1, cached tokens)}: 512 each, or the most the engine's
    profiles take (a model with a shorter context gets shorter ones)."""
    empty = [p for p in spec.profiles if p.past[0] == 0]
    cached = [p for p in spec.profiles if p.seq[0] <= 1 <= p.seq[2]]
    if not empty or not cached:
        raise UserError(f"the engine for {spec.label} has no profile for a prefill from an empty cache and one for one new token")
    seq = min(PREFILL_TOKENS, max(p.seq[2] for p in empty))
    past = min(DECODE_CACHE, max(p.past[2] for p in cached))
    return {"prefill": (seq, 0), "decode": (1, past)}


def nearest_dense(level: str, dense: list[str]) -> str | None:
    """The unstructured level closest in sparsity to the N:M ``level`` (the less sparse on a tie)."""
    target = parse_level(level).sparsity
    return min(dense, key=lambda d: (abs(parse_level(d).sparsity - target), parse_level(d).sparsity), default=None)


def verdict(level: str, dense_level: str | None, ratios: dict[str, float] | None, where: str) -> str:
    """The one line on what N:M ``level`` bought: its speed-up (dense time / sparse time) at prefill
    and decode against the engine of ``dense_level``."""
    if dense_level is None or not ratios:
        return f"{level}: no dense engine in this bundle to compare with (ship an unstructured level too) on {where}"
    p, d = ratios["prefill"], ratios["decode"]
    if max(p, d) < NOTHING_BELOW:
        return f"{level} buys nothing on {where}: prefill {p:.2f}x, decode {d:.2f}x the dense engine (level {dense_level})"
    return f"{level}: prefill {p:.2f}x, decode {d:.2f}x the dense engine (level {dense_level}) on {where}"


def measure_engines(bundle: Path, specs: list[EngineSpec], open_engine: Callable, builds: dict[str, dict] | None = None,
                    log: Callable[[str], None] = print, repeats: int = 20) -> dict:
    """Open each engine of ``specs`` with ``open_engine(spec, level)`` (a ``TrtDecoder`` serving
    ``level``, checked), time its prefill and decode, switch a refit engine through its levels
    (refit time and check of each), and write ``<bundle>/engines/report.json``. ``builds``: engine
    file name -> what ``build_engine`` returned (its sparse report). A level that drifts is recorded
    as refused. Returns the report."""
    builds = builds or {}
    engines, levels, gpu, version = [], {}, None, None
    for spec in unique_specs(specs):
        entry = {"engine": Path(spec.engine).name, "levels": list(spec.levels), "weights": spec.weights,
                 "sparse": bool(spec.sparse), "precision": spec.precision,
                 "sparsity": _sparsity(spec, builds.get(Path(spec.engine).name))}
        try:
            dec = open_engine(spec, spec.build_level)
        except UserError as e:  # the engine does not load here, or its build level drifts: none of its levels is served
            entry["error"] = str(e)
            levels.update({lv: {"engine": entry["engine"], "served": False, "why": str(e)} for lv in spec.levels})
            engines.append(entry)
            continue
        gpu, version = dec.buffers.device_name(), dec.version
        shapes = fitted_shapes(spec)
        entry["latency_ms"] = {k: round(1e3 * dec.latency(1, s, past, repeats=repeats), 4) for k, (s, past) in shapes.items()}
        entry["shapes"] = {k: {"batch": 1, "seq": s, "past": past} for k, (s, past) in shapes.items()}
        log(f"{entry['engine']}: prefill {entry['latency_ms']['prefill']:.3f} ms, decode {entry['latency_ms']['decode']:.3f} ms")
        levels[spec.build_level] = {"engine": entry["engine"], "served": True, "refit_s": 0.0,
                                    "check": dec.checked.get(spec.build_level)}
        for lv in spec.levels:
            if lv == spec.build_level:
                continue
            try:
                switch = dec.set_level(lv)
                levels[lv] = {"engine": entry["engine"], "served": True, "refit_s": switch["refit_s"], "check": switch["check"]}
            except UserError as e:
                levels[lv] = {"engine": entry["engine"], "served": False, "why": str(e)}
        engines.append(entry)
        del dec
        gc.collect()  # one engine in device memory at a time (Jetson memory is shared with the CPU)
    where = f"{gpu or 'this GPU'}" + (f" with TensorRT {version}" if version else "")
    report = {"gpu": gpu, "tensorrt": version, "engines": engines, "levels": levels, "verdicts": _verdicts(engines, where),
              "refused": sorted(lv for lv, r in levels.items() if not r["served"]), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(Path(bundle) / REPORT_FILE, report)
    return report


def _sparsity(spec: EngineSpec, build: dict | None) -> dict:
    """The engine's sparse-layer report: from its build, else from its layer information file."""
    from .sparsity import sparse_report

    if build and build.get("sparse_report"):
        r = build["sparse_report"]
    else:
        path = Path(spec.layer_info)
        try:
            text = path.read_text(encoding="utf-8") if path.is_file() else ""
        except (OSError, UnicodeDecodeError):
            text = ""
        log_path = Path(str(spec.engine) + ".log")
        lines = log_path.read_text(errors="replace").splitlines() if log_path.is_file() else []
        r = sparse_report(text, lines)
    out = {"eligible": len(r["eligible"]), "picked": len(r["picked"]), "picked_layers": list(r["picked"]), "source": r["source"]}
    if spec.precision == "int8":  # did the sparse tactics survive Q/DQ
        out.update(int8=len(r.get("int8", [])), picked_int8=len(r.get("picked_int8", [])))
    return out


def _verdicts(engines: list[dict], where: str) -> list[str]:
    timed = [e for e in engines if "latency_ms" in e]
    dense = {lv: e for e in timed if not e["sparse"] for lv in e["levels"] if not parse_level(lv).is_nm}
    out = []
    for e in timed:
        for lv in e["levels"]:
            if not parse_level(lv).is_nm:
                continue
            ref = nearest_dense(lv, list(dense))
            ratios = None
            if ref is not None:
                d, s = dense[ref]["latency_ms"], e["latency_ms"]
                ratios = {k: d[k] / s[k] for k in ("prefill", "decode") if s[k] > 0}
                e.setdefault("speedup", {})[lv] = {"against": ref, **{k: round(v, 3) for k, v in ratios.items()}}
            out.append(verdict(lv, ref, ratios, where))
    for e in engines:  # where Q/DQ can cost the sparse tactics, say whether they survived
        if e.get("precision") == "int8" and e["sparse"]:
            sp = e["sparsity"]
            out.append(f"{', '.join(e['levels'])}: sparse INT8 tactics for {sp.get('picked_int8', 0)} of {sp['eligible']} "
                       f"eligible layers ({sp['picked']} sparse, {sp.get('int8', 0)} in INT8)"
                       + ("" if sp.get("picked_int8") else ": Q/DQ cost the sparse tactics (or the inspector could not tell)"))
    return out


def table(report: dict) -> list[str]:
    """The report as lines: one per engine, one per level, then the verdicts."""
    lines = [f"{'engine':<28} {'levels':<24} {'sparse layers':>14} {'prefill ms':>11} {'decode ms':>10}"]
    for e in report["engines"]:
        sp = e["sparsity"]
        lat = e.get("latency_ms") or {}
        layers = f"{sp['picked']}/{sp['eligible']}"
        lines.append(f"{e['engine']:<28} {', '.join(e['levels']):<24} {layers:>14} "
                     f"{lat.get('prefill', float('nan')):>11.3f} {lat.get('decode', float('nan')):>10.3f}")
    for lv, r in report["levels"].items():
        if r["served"]:
            c = r.get("check") or {}
            lines.append(f"  level {lv}: refit {r['refit_s']:.3f} s, check vs ONNX Runtime passed "
                         f"(logits off by {c.get('logits_max_abs', float('nan')):.3g}, tolerance {c.get('logits_atol', float('nan')):g})")
        else:
            lines.append(f"  level {lv}: REFUSED: {r['why']}")
    lines += report["verdicts"]
    return lines
