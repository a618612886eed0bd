"""Where the time of one EPTS block goes: torch.profiler over ``optimize_block`` on one block of
SmolLM2-135M with the default preset's settings (32 x 256 tokens, 1 epoch, rank 8, the default
levels' 8 groups). Prints the wall time, the seconds of each of ``optimize_block``'s steps (from
the run outside the profiler) and the top operators by self CPU time, markdown tables.

    python -m benchmarks.profile_block                 # block 1 (block 0 sees only the embeddings)
    python -m benchmarks.profile_block --block 5 --top 25 --json benchmarks/results/profile_block.json

Calibration is random tokens: the cost of a block does not depend on what the text says.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from epts_export.core.levels import DEFAULT_LEVELS, parse_levels
from epts_export.models.families import family_for, get_blocks, prunable_linears
from epts_export.models.hf import load_model
from epts_export.models.resolve import resolve_model
from epts_export.pruning.blockloop import capture_block_inputs, run_block
from epts_export.core.config import TrainConfig
from epts_export.pruning import epts
from epts_export.pruning.epts import optimize_block

from .levers import variant_config


STEPS = ("dense_pass", "importance", "start_adapters", "train_adapters", "low_group_check", "msfm_stream",
         "msfm_from_training")  # optimize_block's steps (pruning/epts.py), in order


@contextlib.contextmanager
def step_timer():
    """Wall seconds of each of optimize_block's steps while the context is open (name -> s)."""
    spent: dict[str, float] = {}
    saved = {name: getattr(epts, name) for name in STEPS}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    for name, fn in saved.items():
        setattr(epts, name, timed(name, fn))
    try:
        yield spent
    finally:
        for name, fn in saved.items():
            setattr(epts, name, fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--block", type=int, default=1)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--variant", default="base", help="TrainConfig levers joined by '+' (benchmarks/levers.py), e.g. bf16+lsq+g10")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    torch.manual_seed(0)
    model, _tok = load_model(resolve_model(args.model).path)
    fam = family_for(model)
    samples = torch.randint(10, model.config.vocab_size - 1, (args.nsamples, args.seqlen))
    inputs = capture_block_inputs(model, fam, samples)
    blocks = get_blocks(model, fam)
    hidden = inputs.hidden
    for i in range(args.block):  # the dense stream up to the profiled block
        hidden = run_block(blocks[i], hidden, inputs.kwargs, "cpu")
    cfg = variant_config(args.variant, TrainConfig(rank=8, epochs=1, lr=1e-2))
    groups = cfg.groups(parse_levels(DEFAULT_LEVELS))
    block = blocks[args.block]
    run = lambda: optimize_block(block, prunable_linears(block, fam), list(hidden), list(hidden), inputs.kwargs,  # noqa: E731
                                 groups, cfg, seed=args.block)
    with step_timer() as steps:
        t = time.perf_counter()
        run()
        plain_s = time.perf_counter() - t
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        run()
        profiled_s = time.perf_counter() - t
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    print(f"\nblock {args.block}: {plain_s:.1f} s ({profiled_s:.1f} s under the profiler), "
          f"{args.nsamples} x {args.seqlen} tokens, {len(groups)} groups, {args.variant}\n")
    print("| step | s |\n|---|---:|\n" + "\n".join(f"| `{name}` | {sec:.2f} |" for name, sec in steps.items()) + "\n")
    print("| operator | self CPU s | share | calls |")
    print("|---|---:|---:|---:|")
    out = []
    for e in rows:
        share = e.self_cpu_time_total / total
        print(f"| `{e.key}` | {e.self_cpu_time_total / 1e6:.2f} | {100 * share:.1f}% | {e.count} |")
        out.append({"op": e.key, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 3), "share": round(share, 4), "calls": e.count})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"block": args.block, "wall_s": round(plain_s, 2), "profiled_s": round(profiled_s, 2),
                                         "nsamples": args.nsamples, "seqlen": args.seqlen, "variant": args.variant,
                                         "steps_s": {k: round(v, 2) for k, v in steps.items()}, "top": out}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
