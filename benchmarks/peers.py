"""The peers, side by side: llm-compressor's SparseGPT, Wanda, OWL-SparseGPT and OWL-Wanda on our
calibration windows, evaluated by our perplexity on our evaluation windows.

llm-compressor pins its own transformers and would pull its own torch, so it lives in a venv of its
own (never this one). Create it once (about 2 minutes; the constraint keeps the CPU torch):

    python3 -m venv /tmp/llmc
    echo 'torch==2.13.0' > /tmp/llmc-constraints.txt
    /tmp/llmc/bin/pip install -c /tmp/llmc-constraints.txt 'llmcompressor==0.14.0.1' safetensors

Then (our venv):

    python -m benchmarks.peers --peer-python /tmp/llmc/bin/python --corpus shakespeare \
        --runs sparsegpt,wanda,sparsegpt@owl,wanda@owl --levels 0.3,0.4,0.5,0.6,0.7,2:4

Windows: built once by our calibration code (the corpus' calibration text, --nsamples x --seqlen,
seed 0: the windows `ppl_table` calibrates on), written to <work>/windows.safetensors and handed to
every run; each run reports the sha256 of the windows it saw, which must match. Each run writes a
plain Hugging Face folder (benchmarks/peer_worker.py); we check that its non-prunable tensors equal
the dense model's and that its prunable linears' sparsity is the level, then evaluate it. A run
that fails is a row saying why, not a crash. OWL: M 5, lambda 0.08 (the paper's), with the
workaround peer_worker.py describes. ALPS is not in llm-compressor 0.14.0.1 (its pull requests
were closed unmerged); the table says so.

Results: <work>/results.json and a Markdown table; runs already in <work> are reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from epts_export.artifact.evaluate import load_eval_data, perplexity
from epts_export.core.levels import parse_levels
from epts_export.models import load_model, resolve_model
from epts_export.models.families import family_for, iter_prunable, measured_sparsity
from epts_export.pruning.calibration import CalibSpec, build_calibration

from .ppl_table import CORPORA

OWL = "5,0.08"
NOT_AVAILABLE = {"alps": "not in llm-compressor 0.14.0.1 (PRs #867 and #874 closed unmerged); only its authors' reference code has it, not run here"}


def windows_file(work: Path, corpus_calib: Path, tok, nsamples: int, seqlen: int) -> Path:
    from safetensors.torch import save_file

    calib = build_calibration(CalibSpec(source=str(corpus_calib), nsamples=nsamples, seqlen=seqlen, seed=0), tok)
    path = work / "windows.safetensors"
    if not path.exists():
        save_file({"input_ids": calib.samples.contiguous()}, str(path))
    return path


def check_folder(out: Path, dense) -> dict:
    """Load a peer's folder and compare it with the dense model: the tensors outside the prunable
    linears must be bit-identical, and the prunable ones as sparse as the level."""
    model, _ = load_model(out)
    fam = family_for(model)
    prunable = {f"{fam.blocks}.{i}.{n}.weight" for i, n, _ in iter_prunable(model, fam)}
    d_state, p_state = dense.state_dict(), model.state_dict()
    changed = [k for k in d_state if k not in prunable and not torch.equal(d_state[k], p_state[k])]
    return {"model": model, "sparsity": round(measured_sparsity(model), 4), "other_tensors_changed": changed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-python", type=Path, required=True, help="python of llm-compressor's own venv")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default="shakespeare", choices=sorted(CORPORA))
    ap.add_argument("--runs", default="sparsegpt,wanda,sparsegpt@owl,wanda@owl")
    ap.add_argument("--levels", default="0.3,0.4,0.5,0.6,0.7,2:4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--work", type=Path, default=None, help="default bench-out/peers/<corpus>-<nsamples>x<seqlen>")
    args = ap.parse_args()
    work = args.work or Path("bench-out/peers") / f"{args.corpus}-{args.nsamples}x{args.seqlen}"
    work.mkdir(parents=True, exist_ok=True)
    texts = CORPORA[args.corpus]()
    resolved = resolve_model(args.model, progress=False)
    dense, tok = load_model(resolved.path)
    windows = windows_file(work, texts["calib"], tok, args.nsamples, args.seqlen)
    ev = load_eval_data(str(texts["eval"]), tok, args.eval_seqlen, args.eval_windows or None)
    results_path = work / "results.json"
    result = json.loads(results_path.read_text()) if results_path.exists() else {"rows": {}}
    result.update(model=args.model, corpus=args.corpus, calibration=f"{args.nsamples} x {args.seqlen} tokens",
                  eval=ev.record | {"seqlen": args.eval_seqlen}, not_available=NOT_AVAILABLE)
    result["rows"].setdefault("dense", {"ppl": {"dense": round(perplexity(dense, ev.ids), 3)}})
    sha = None
    for run in args.runs.split(","):
        method, _, alloc = run.partition("@")
        row = result["rows"].setdefault(run, {"ppl": {}, "time_s": {}, "sparsity": {}, "errors": {}})
        for lv in parse_levels(args.levels):
            if lv.name in row["ppl"]:
                continue
            out = work / f"{method}{'-owl' if alloc else ''}-{lv.name.replace(':', 'of')}"
            if not (out / "peer.json").exists():
                cmd = [str(args.peer_python), str(Path(__file__).with_name("peer_worker.py")), "--model", str(resolved.path),
                       "--windows", str(windows), "--method", method, "--level", lv.name, "--out", str(out)]
                if alloc:
                    cmd += ["--owl", OWL]
                t0 = time.time()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    last = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
                    row["errors"][lv.name] = last[0][:300]
                    print(f"{run:16s} {lv.name:>5s} FAILED after {time.time() - t0:.0f} s: {last[0][:200]}", flush=True)
                    results_path.write_text(json.dumps(result, indent=2) + "\n")
                    continue
            peer = json.loads((out / "peer.json").read_text())
            sha = sha or peer["windows_sha256"]
            assert peer["windows_sha256"] == sha, f"{out} saw other windows than the other runs"
            chk = check_folder(out, dense)
            assert not chk["other_tensors_changed"], f"{out}: tensors outside the prunable linears changed: {chk['other_tensors_changed'][:3]}"
            row["ppl"][lv.name] = round(perplexity(chk["model"], ev.ids), 3)
            row["time_s"][lv.name] = peer["seconds"]
            row["sparsity"][lv.name] = chk["sparsity"]
            print(f"{run:16s} {lv.name:>5s} ppl {row['ppl'][lv.name]:.3f} sparsity {chk['sparsity']:.4f} "
                  f"({peer['seconds']:.0f} s)", flush=True)
            results_path.write_text(json.dumps(result | {"windows_sha256": sha}, indent=2) + "\n")
    print()
    print(markdown(result))
    print(f"\nwrote {results_path}")


def markdown(result: dict) -> str:
    levels = sorted({n for r in result["rows"].values() for n in r.get("ppl", {}) if n != "dense"},
                    key=lambda n: (":" in n, n))
    lines = ["| llm-compressor run | time | " + " | ".join(levels) + " |", "|---|---:|" + "---:|" * len(levels)]
    for label, row in result["rows"].items():
        if label == "dense":
            continue
        cells = [f"{row['ppl'][n]:.2f}" if n in row["ppl"] else ("failed" if n in row.get("errors", {}) else "-") for n in levels]
        lines.append(f"| {label} | {sum(row['time_s'].values()) / 60:.1f} min | " + " | ".join(cells) + " |")
    for name, why in result.get("not_available", {}).items():
        lines.append(f"| {name} | - | " + " | ".join("n/a" for _ in levels) + f" |\n\n{name}: {why}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
