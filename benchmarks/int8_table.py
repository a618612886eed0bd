"""INT8 (W8A8) per level: what it costs in perplexity, what smoothing buys, bytes on disk and ONNX
Runtime CPU speed against fp32. Prints the markdown tables of BENCHMARKS.md.

    python -m benchmarks.int8_table --artifact runs/smol --work bench-out/int8 \\
        --json benchmarks/results/int8_smollm2-135m.json

Quality: the artifact at each level in float32, then quantized as `export --dtype int8` quantizes
it (the same calibration windows, ranges and smoothing: ``quant.recipe``) with SmoothQuant's alpha
at the default (0.85) and at each --alphas value (0 = no smoothing; "A,B": A for the pairs a norm
feeds, B for the MLP pair), evaluated by the fake-quantized
reference `validate` checks the int8 graph against (``quant.fake``), on both corpora.

Size and speed (--speed): `export --mode baked` in fp32 and in int8 into --work (reused when
present); per level the bytes of the level's folder graph, and ONNX Runtime's CPU provider on a
128-token prefill and single-token decode steps, fp32 and int8 in turns
(``onnx_bench.paired``), medians over --rounds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from epts_export.artifact.evaluate import load_eval_data, perplexity
from epts_export.artifact.folder import Artifact
from epts_export.artifact.materialize import ElasticModel
from epts_export.core.levels import parse_levels
from epts_export.device.interface import level_dirname
from epts_export.progress import Progress
from epts_export.quant.calibrate import int8_calibration
from epts_export.quant.fake import fake_quantized
from epts_export.quant.recipe import DEFAULT_ALPHA, build_recipe, input_amax, parse_smooth

from . import docutils_docs, shakespeare
from .onnx_bench import folder_bytes, paired

CORPORA = {"shakespeare": shakespeare.benchmark_texts, "docutils": docutils_docs.benchmark_texts}


def quality(art: Artifact, levels, corpora: list[str], alphas: list[str], seqlen: int, windows: int,
            progress: Progress) -> dict:
    em = ElasticModel(art)
    data = {c: load_eval_data(str(CORPORA[c]()["eval"]), em.tokenizer, seqlen, windows).ids for c in corpora}
    calib = int8_calibration(em)
    rows = []
    for lv in levels:
        model = em.at(lv)
        row = {"level": lv.name, "float": {}, "int8": {}}
        with progress.status(f"{lv.name}: ranges"):
            stats = input_amax(model, em.family, calib.samples)
        for c, ids in data.items():
            with progress.status(f"{lv.name}: float on {c}"):
                row["float"][c] = round(perplexity(model, ids, batch=4), 3)
        for alpha in alphas:
            recipe = build_recipe(model, em.family, stats, alpha)
            with fake_quantized(model, em.family, recipe, restore_prunable=lambda: em.at(lv)):
                for c, ids in data.items():
                    with progress.status(f"{lv.name}: int8 alpha {alpha} on {c}"):
                        row["int8"].setdefault(alpha, {})[c] = round(perplexity(model, ids, batch=4), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"calibration": calib.record, "seqlen": seqlen, "windows": {c: len(v) for c, v in data.items()}, "rows": rows}


def _export(art: Path, out: Path, dtype: str, levels, progress: Progress) -> Path:
    from epts_export.onnx.export import ExportSpec, export

    if not (out / "manifest.json").exists():
        export(ExportSpec(artifact=art, out=out, levels=levels, dtype=dtype, overwrite=out.exists()), progress)
    return out


def speed(art: Path, work: Path, levels, rounds: int, decode: int, progress: Progress) -> list[dict]:
    from epts_export.device.ort import OrtDecoder

    fp32 = _export(art, work / "baked-fp32", "fp32", levels, progress)
    int8 = _export(art, work / "baked-int8", "int8", levels, progress)
    rows = []
    for lv in levels:
        d = level_dirname(lv)
        graphs = {"fp32": fp32 / d / "model.onnx", "int8": int8 / d / "model.onnx"}
        decs = {k: OrtDecoder(g) for k, g in graphs.items()}
        with progress.status(f"{lv.name}: timing fp32 and int8"):
            lat = paired(decs, 128, decode, rounds)
        rows.append({"level": lv.name, **{k: {"mb": round(folder_bytes(g) / 1e6, 1), **lat[k]} for k, g in graphs.items()}})
        print(json.dumps(rows[-1]), flush=True)
        del decs
    return rows


def markdown(result: dict) -> str:
    out = []
    q = result.get("quality")
    if q:
        alphas = list(q["rows"][0]["int8"])
        default = str(result["alpha"])
        for c in q["windows"]:
            out += [f"**{c}** ({q['windows'][c]} x {q['seqlen']} tokens; int8 ranges from {q['calibration']['source']} "
                    f"calibration, {q['calibration']['nsamples']} x {q['calibration']['seqlen']})", "",
                    "| level | float32 | int8 (alpha " + default + ") | cost | "
                    + " | ".join(f"alpha {a}" for a in alphas if a != default) + " |",
                    "|---|---|---|---|" + "---|" * (len(alphas) - 1)]
            for r in q["rows"]:
                f, i = r["float"][c], r["int8"][default][c]
                rest = " | ".join(f"{r['int8'][a][c]:.2f} ({r['int8'][a][c] / f - 1:+.1%})" for a in alphas if a != default)
                out.append(f"| {r['level']} | {f:.2f} | {i:.2f} | {i / f - 1:+.1%} | {rest} |")
            out.append("")
    s = result.get("speed")
    if s:
        out += ["| level | fp32 MB | int8 MB | fp32 prefill ms | int8 prefill ms | fp32 decode tok/s | int8 decode tok/s |",
                "|---|---|---|---|---|---|---|"]
        for r in s:
            a, b = r["fp32"], r["int8"]
            out.append(f"| {r['level']} | {a['mb']:.1f} | {b['mb']:.1f} ({b['mb'] / a['mb']:.2f}x) | {a['prefill_ms']:.1f} | "
                       f"{b['prefill_ms']:.1f} ({a['prefill_ms'] / b['prefill_ms']:.2f}x) | {a['decode_tok_s']:.1f} | "
                       f"{b['decode_tok_s']:.1f} ({b['decode_tok_s'] / a['decode_tok_s']:.2f}x) |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, help="an EPTS (or one-level) artifact")
    ap.add_argument("--work", type=Path, default=Path("bench-out/int8"))
    ap.add_argument("--levels", default=None, help="default: the artifact's levels")
    ap.add_argument("--corpus", default="shakespeare,docutils")
    ap.add_argument("--alphas", default="0;0.5;0.85,0.9", help="smoothing strengths (--smooth values) to compare with the "
                    "default, separated by ';'")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--speed", action="store_true", help="also export fp32 and int8 and time them in ONNX Runtime")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--markdown", type=Path, help="print the tables of an earlier --json and exit")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    if args.artifact is None:
        ap.error("--artifact is required")
    torch.set_num_threads(2)
    art = Artifact.open(args.artifact)
    levels = parse_levels(args.levels) if args.levels else art.levels
    progress = Progress()
    default = ",".join(dict.fromkeys(f"{a:g}" for a in DEFAULT_ALPHA))  # "0.85" when both pairs share it
    alphas = [default] + [a for a in args.alphas.split(";") if a and parse_smooth(a) != DEFAULT_ALPHA]
    t0 = time.time()
    result = {"artifact": str(args.artifact), "alpha": default, "levels": [lv.name for lv in levels]}
    if not args.no_quality:
        result["quality"] = quality(art, levels, args.corpus.split(","), alphas, args.seqlen, args.max_windows, progress)
    if args.speed:
        result["speed"] = speed(args.artifact, args.work, levels, args.rounds, args.decode, progress)
    result["elapsed_s"] = round(time.time() - t0, 1)
    args.work.mkdir(parents=True, exist_ok=True)
    for path in filter(None, (args.work / "results.json", args.json)):
        path.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
