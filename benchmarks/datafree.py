"""The data-free ablation (issue 25): what the `default` preset (no `--calib`) gets lever by lever,
against EPTS calibrated on text from the deployment domain, on both corpora.

Every variant is the `default` preset's training (32 x 256 calibration tokens) with its calibration
source and allocation as named, one artifact evaluated on both corpora (32 x 512 evaluation windows
each):

    self          tokens sampled from the model (temperature 1, the preset's), uniform allocation
    self+err      the same calibration, `--allocation error` (core/allocation.py)
    self+err+mtrain  and MSFM from the training passes (`--msfm train`); without +mtrain a
                  variant has the reference's MSFM pass whatever the preset says
    random        uniform random token ids (the floor; not in the default list)
    pydoc         a general text no user has to bring: the Python Language Reference's topics,
                  ``pydoc_data.topics`` (PSF License), which every CPython ships; written to
                  <work>/pydoc.txt and passed as --calib. Technical English: it is closer to
                  Docutils' documentation than to Shakespeare, which the table shows
    pydoc+err     both

The reference per corpus is a text-calibrated EPTS run of ``ppl_table`` (32 x 512 calibration from
that corpus, the levers of BENCHMARKS.md "EPTS cost and quality"): row --reference of
benchmarks/results/ppl_<corpus>_32x512.json or alloc_<corpus>_32x512.json. The table gives each
variant's perplexity and its ratio to that reference (the goal: within 1.05x at every level).

    python -m benchmarks.datafree                       # every variant
    python -m benchmarks.datafree --variants self,pydoc

Artifacts land in --work (reused when present, as in ppl_table); results in <work>/results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from epts_export.artifact.evaluate import load_eval_data, perplexity
from epts_export.artifact.folder import Artifact
from epts_export.artifact.materialize import ElasticModel
from epts_export.core.levels import parse_levels
from epts_export.models.families import measured_sparsity
from epts_export.progress import Progress
from epts_export.pruning.optimize import OptimizeSpec

from .ppl_table import CORPORA, run_optimize

RESULTS = Path(__file__).parent / "results"
REFERENCE = "epts, calib text, lr 3e-3, bf16+lsq+check8+g10+r16+low35+span20+err"  # with the default's allocation
VARIANTS = ("self", "self+err", "pydoc", "pydoc+err")  # and random, the floor: --variants random


def pydoc_text(work: Path) -> Path:
    """The Python Language Reference's topics (``pydoc_data.topics``, in every CPython), sorted by
    name, one blank line between topics, as a calibration file."""
    from pydoc_data.topics import topics

    path = work / "pydoc.txt"
    text = "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def variant_spec(name: str, model: str, levels, work: Path) -> dict:
    """The OptimizeSpec fields of one variant: the default preset, its calibration source and
    allocation (uniform, or error with +err) as the name says."""
    source, *levers = name.split("+")
    if source not in ("self", "random", "pydoc") or not set(levers) <= {"err", "mtrain"} or len(set(levers)) < len(levers):
        raise SystemExit(f"unknown variant {name!r} (known: {', '.join(VARIANTS)}, each with +mtrain)")
    spec = OptimizeSpec.from_preset(model, Path("."), levels, "default")
    calib = str(pydoc_text(work)) if source == "pydoc" else source
    spec = dataclasses.replace(spec, calib=dataclasses.replace(spec.calib, source=calib),
                               allocation="error" if "err" in levers else "uniform",
                               train=dataclasses.replace(spec.train, msfm="train" if "mtrain" in levers else "pass"))
    kw = vars(spec).copy()
    kw.pop("out"), kw.pop("resume")
    return kw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--levels", default="0.3,0.4,0.5,0.6,0.7,2:4")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--reference", default=REFERENCE, help="the row of benchmarks/results/{ppl,alloc}_<corpus>_32x512.json compared with")
    ap.add_argument("--work", type=Path, default=Path("bench-out/datafree"))
    args = ap.parse_args()
    levels = parse_levels(args.levels)
    args.work.mkdir(parents=True, exist_ok=True)
    progress = Progress(enabled=True)
    refs = {}
    for corpus in CORPORA:
        files = [RESULTS / f"{kind}_{corpus}_32x512.json" for kind in ("ppl", "alloc")]
        rows = {k: v for f in files if f.exists() for k, v in json.loads(f.read_text())["rows"].items()}
        if args.reference not in rows:
            raise SystemExit(f"no row {args.reference!r} in {' or '.join(str(f) for f in files)}")
        refs[corpus] = rows[args.reference]
    texts = {c: CORPORA[c]() for c in CORPORA}
    result = {"model": args.model, "levels": [lv.name for lv in levels], "reference": args.reference,
              "references": {c: {"ppl": r["ppl"], "time_s": r["time_s"]} for c, r in refs.items()}, "variants": {}}
    before = args.work / "results.json"  # the variants an earlier invocation measured against this reference
    if before.exists() and json.loads(before.read_text()).get("reference") == args.reference:
        result["variants"] = json.loads(before.read_text())["variants"]
    evals = {}
    for name in args.variants.split(","):
        path, secs = run_optimize(args.work, f"default-{name}", variant_spec(name, args.model, levels, args.work), progress)
        em = ElasticModel(Artifact.open(path))
        row = {"time_s": secs, "calib": em.artifact.manifest.get("calibration", {}).get("source"), "ppl": {}, "sparsity": {}}
        for corpus, texts_c in texts.items():
            if corpus not in evals:
                evals[corpus] = load_eval_data(str(texts_c["eval"]), em.tokenizer, 512, 32)
            store = path.with_name(path.name + f".{corpus}.ppl.json")
            cache = json.loads(store.read_text()) if store.exists() else {}
            for lv in levels:
                if lv.name not in cache:
                    cache[lv.name] = round(perplexity(em.at(lv), evals[corpus].ids), 3)
                    store.write_text(json.dumps(cache, indent=1) + "\n")
                row["ppl"].setdefault(corpus, {})[lv.name] = cache[lv.name]
                print(f"{name:10s} {corpus:12s} {lv.name:>4s} ppl {cache[lv.name]:.3f}", flush=True)
        row["sparsity"] = {lv.name: round(measured_sparsity(em.at(lv)), 4) for lv in levels}
        result["variants"][name] = row
        del em
    (args.work / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(markdown(result))
    print(f"\nwrote {args.work / 'results.json'}")


def markdown(result: dict) -> str:
    """Per corpus: the reference row, then each variant's perplexity and its ratio to the reference."""
    names = result["levels"]
    lines = []
    for corpus, ref in result["references"].items():
        lines += [f"\n{corpus}:\n", "| calibration | time | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names),
                  f"| text from {corpus} (reference) | {ref['time_s'] / 60:.1f} min | "
                  + " | ".join(f"{ref['ppl'][n]:.2f}" for n in names) + " |"]
        for name, row in result["variants"].items():
            ppl = row["ppl"][corpus]
            cells = [f"{ppl[n]:.2f} ({ppl[n] / ref['ppl'][n]:.2f}x)" for n in names]
            lines.append(f"| {name} | {row['time_s'] / 60:.1f} min | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
