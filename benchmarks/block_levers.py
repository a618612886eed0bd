"""One EPTS block under each cost lever: wall time and held-out reconstruction error per level.

A fast proxy for the perplexity ablation (benchmarks/ppl_table.py runs the whole model): one block
of SmolLM2-135M, trained on calibration windows of a benchmark corpus (both streams dense), then
evaluated on held-out windows of the same corpus: the MSE of the block's output at each level
against the dense block, relative to Wanda's mask alone (no adapters). Lower is better; 1.0 = the
adapters do nothing (on Wanda's order; a variant with another importance order, e.g. ``obs``, is
measured against the same Wanda reference, so its rows show what the order and the adapters do together).

    python -m benchmarks.block_levers                                  # every variant below
    python -m benchmarks.block_levers --variants base,bf16 --block 10 --json out.json

A variant is TrainConfig overrides joined by '+' (benchmarks/levers.py), e.g. ``bf16+lsq+lr3+g10``.
The variant ``sparsegpt`` is the target: SparseGPT run on the block at each trained level (six
one-level runs), its held-out MSE relative to Wanda's mask at that level (the mask EPTS starts from).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

from epts_export.core.levels import DEFAULT_LEVELS, parse_levels
from epts_export.core.rule import level_rule
from epts_export.models.families import family_for, get_blocks, prunable_linears
from epts_export.models.hf import load_model
from epts_export.models.resolve import resolve_model
from epts_export.pruning.baselines import prune_block_calibrated
from epts_export.pruning.blockloop import block_output, capture_block_inputs, run_block
from epts_export.text import tokenize_text
from epts_export.core.config import TrainConfig
from epts_export.pruning.epts import BlockMerger, optimize_block

from . import docutils_docs, shakespeare
from .levers import variant_config

CORPORA = {"shakespeare": shakespeare.benchmark_texts, "docutils": docutils_docs.benchmark_texts}
EVAL_LEVELS = "0.3,0.35,0.4,0.45,0.5,0.55,0.6,0.65,0.7,2:4"
def windows(path: Path, tok, n: int, seqlen: int, offset: int = 0) -> torch.Tensor:
    ids = tokenize_text(tok, path.read_text(encoding="utf-8"))
    step = (ids.numel() - seqlen) // max(n, 1)
    return torch.stack([ids[offset + i * step: offset + i * step + seqlen] for i in range(n)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default="shakespeare", choices=sorted(CORPORA))
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--variants", default="base,bf16,bf16+residual,bf16+lr3,bf16+lsq+lr0,bf16+lsq,bf16+lsq+lr3,bf16+lsq+lr3+check8,bf16+lsq+lr3+s16")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    torch.manual_seed(0)
    model, tok = load_model(resolve_model(args.model).path)
    fam = family_for(model)
    texts = CORPORA[args.corpus]()
    calib = windows(texts["calib"], tok, args.nsamples, args.seqlen)
    held = windows(texts["eval"], tok, args.eval_windows, args.seqlen)
    blocks = get_blocks(model, fam)
    streams = {}
    for name, ids in (("calib", calib), ("held", held)):
        inputs = capture_block_inputs(model, fam, ids)
        hidden = inputs.hidden
        for i in range(args.block):
            hidden = run_block(blocks[i], hidden, inputs.kwargs, "cpu")
        streams[name], kwargs = list(hidden), inputs.kwargs
    block = blocks[args.block]
    linears = prunable_linears(block, fam)
    levels = parse_levels(EVAL_LEVELS)
    with torch.no_grad():
        teacher = [block_output(block(x, **kwargs)).float() for x in streams["held"]]
    base = TrainConfig(rank=8, epochs=1, lr=args.lr)
    rows = []

    def held_error(blk) -> float:
        with torch.no_grad():
            return sum(F.mse_loss(block_output(blk(x, **kwargs)).float(), t).item() for x, t in zip(streams["held"], teacher))

    wanda_err: dict[str, float] = {}

    def wanda_error(lv) -> float:
        """The held-out error of Wanda's mask alone at ``lv``: every row's denominator."""
        if lv.name not in wanda_err:
            blk = copy.deepcopy(block)
            prune_block_calibrated("wanda", blk, prunable_linears(blk, fam), streams["calib"], kwargs, lv, "cpu")
            wanda_err[lv.name] = held_error(blk)
        return wanda_err[lv.name]

    for name in args.variants.split(","):
        if name == "sparsegpt":
            t = time.perf_counter()
            rel = {}
            for lv in parse_levels(DEFAULT_LEVELS):
                blk = copy.deepcopy(block)
                prune_block_calibrated("sparsegpt", blk, prunable_linears(blk, fam), streams["calib"], kwargs, lv, "cpu")
                rel[lv.name] = round(held_error(blk) / wanda_error(lv), 4)
            secs = time.perf_counter() - t
            rows.append({"variant": name, "seconds": round(secs, 2), "relative_mse": rel})
            print(f"{name:28s} {secs:6.1f} s  " + " ".join(f"{k} {v:.3f}" for k, v in rel.items()), flush=True)
            continue
        cfg = variant_config(name, base)
        groups = cfg.groups(parse_levels(DEFAULT_LEVELS))
        t = time.perf_counter()
        res = optimize_block(block, linears, streams["calib"], streams["calib"], kwargs, groups, cfg, seed=args.block)
        secs = time.perf_counter() - t
        weights = {n: lin.weight.detach().float() for n, lin in linears.items()}
        merge = BlockMerger(weights, res.order, res.lora_B, res.lora_A, cfg.rank, cfg.scale)
        rel = {}
        with torch.no_grad():
            for lv in levels:
                rule = level_rule(groups, lv, res.low_group_lora)
                err = sum(F.mse_loss(block_output(functional_call(block, merge(rule), (x,), kwargs)).float(), t).item()
                          for x, t in zip(streams["held"], teacher))
                rel[lv.name] = round(err / wanda_error(lv), 4)
        rows.append({"variant": name, "config": dataclasses.asdict(cfg), "seconds": round(secs, 2), "relative_mse": rel,
                     "low_group_lora": res.low_group_lora})
        print(f"{name:28s} {secs:6.1f} s  " + " ".join(f"{k} {v:.3f}" for k, v in rel.items()), flush=True)
    print(f"\nblock {args.block}, {args.corpus}, {args.nsamples} x {args.seqlen} calibration tokens, lr {args.lr:g}; "
          "held-out MSE relative to Wanda's mask alone\n")
    print("| variant | time s | " + " | ".join(lv.name for lv in levels) + " |")
    print("|---|---:|" + "---:|" * len(levels))
    for r in rows:
        print(f"| {r['variant']} | {r['seconds']:.1f} | " + " | ".join(f"{r['relative_mse'][lv.name]:.3f}" if lv.name in r['relative_mse'] else "-" for lv in levels) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"block": args.block, "corpus": args.corpus, "nsamples": args.nsamples,
                                         "seqlen": args.seqlen, "lr": args.lr, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
