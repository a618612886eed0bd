"""Memory per rank and estimated wall time of EPTS at the sizes users run, on paper.

    python -m benchmarks.scale_table [--gpu-tflops 25] [--json out.json]

Memory: ``epts_export.pruning.preflight.plan`` (the check optimize runs before it loads anything)
on the config values below, for 128 x 2048 calibration tokens (the `paper` preset: 10 epochs,
rank 8) and the default levels (0.3-0.7 and 2:4: 8 groups), on 1, 2 and 8 GPUs of one machine
(8 x H100 80 GB, 2 TiB of host memory, as in a DGX H100).

Time: an extrapolation, not a measurement. The work of one block is counted in FLOPs
(``epts_block_flops``); the measured SmolLM2-135M CPU run gives this code's achieved rate, and a
GPU run is assumed to sustain ``--gpu-tflops`` (float32 matmuls without TF32, which is what
optimize computes; an H100 SXM's FP32 peak is 67 TFLOP/s). Data-parallel ranks split the windows
evenly; each optimizer step adds one all-reduce of the adapters' gradients at an assumed 100 GB/s
bus bandwidth and 50 us latency. Loading the model, capturing the inputs and writing the artifact
are not counted.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from epts_export.core.levels import DEFAULT_LEVELS, build_groups, parse_levels
from epts_export.pruning.preflight import GIB, ModelShape, RunShape, fmt_bytes, plan

# The config.json values that decide memory and FLOPs, as published on the Hugging Face Hub
# (tests/data/hub_configs/SOURCES.md): the row name -> the file.
HUB_CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "data" / "hub_configs"
CONFIGS = {name: json.loads((HUB_CONFIGS / f"{repo}.json").read_text()) for name, repo in (
    ("Llama-3-8B", "meta-llama--Meta-Llama-3-8B"), ("Llama-2-70B", "meta-llama--Llama-2-70b-hf"),
    ("OPT-66B", "facebook--opt-66b"))}
SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
           "tie_word_embeddings": True}  # the cached smollm2-135m folder's config.json

# BENCHMARKS.md, perplexity table, row "EPTS (random tokens, 1e-3)" (benchmarks/results/
# ppl_smollm2-135m.json: time_s 616.1): the EPTS run that had the 2 cores to itself and sampled no
# calibration text. The time includes loading the model and writing the artifact (a few seconds).
MEASURED = {"model": "SmolLM2-135M", "seconds": 616.1, "nsamples": 32, "seqlen": 256, "epochs": 1, "rank": 8,
            "levels": DEFAULT_LEVELS, "threads": 2}

PAPER = {"nsamples": 128, "seqlen": 2048, "epochs": 10, "rank": 8}  # calibration/paper.toml
GPU_MEMORY = 79 * GIB  # an H100 80 GB's free memory after the CUDA context
HOST_MEMORY = 2048 * GIB  # a DGX H100's 2 TiB
BUS_BYTES_PER_S = 100e9
ALLREDUCE_LATENCY_S = 50e-6


def epts_block_flops(m: ModelShape, nsamples: int, seqlen: int, epochs: int, groups: int, rank: int) -> float:
    """FLOPs of one EPTS block (epts.optimize_block). Per window of T tokens one forward costs
    T * (2 * prunable weights + 2 * T * attention width) (the linears, and QK^T and PV under a
    causal mask); a backward costs two forwards. Per window: the dense pass, per epoch and group a
    forward and a backward, the low-group check (2 forwards), MSFM (one forward per group). Each
    training step and MSFM window also merges W + B A for every group k (2 * weights * r * (k+1)
    FLOPs, x3 with its backward)."""
    attn = m.heads * m.head_dim
    forward = seqlen * (2 * m.prunable + 2 * seqlen * attn)
    merges = m.prunable * rank * groups * (groups + 1)  # sum over k of 2 * P * r * (k + 1)
    per_window = forward * (1 + 3 * epochs * groups + 2 + groups) + merges * (3 * epochs + 1)
    return nsamples * per_window


def achieved_cpu_flops() -> float:
    """FLOP/s of the measured SmolLM2 run (its FLOPs over its wall time)."""
    m = ModelShape.from_config(SMOLLM2)
    groups = len(build_groups(parse_levels(MEASURED["levels"])))
    total = m.num_blocks * epts_block_flops(m, MEASURED["nsamples"], MEASURED["seqlen"], MEASURED["epochs"], groups,
                                            MEASURED["rank"])
    return total / MEASURED["seconds"]


def row(name: str, cfg: dict, gpus: int, gpu_flops: float) -> dict:
    m = ModelShape.from_config(cfg)
    groups = len(build_groups(parse_levels(DEFAULT_LEVELS)))
    nm = sum(1 for lv in parse_levels(DEFAULT_LEVELS) if lv.is_nm)
    run = RunShape("epts", nsamples=PAPER["nsamples"], seqlen=PAPER["seqlen"], groups=groups, rank=PAPER["rank"],
                   nm_levels=nm, world=gpus, local_world=gpus, device="cuda")
    p = plan(m, run, HOST_MEMORY, GPU_MEMORY)
    block = epts_block_flops(m, PAPER["nsamples"], PAPER["seqlen"], PAPER["epochs"], groups, PAPER["rank"])
    compute = m.num_blocks * block / gpus / gpu_flops
    batch = gpus  # the smallest --batch a world of `gpus` takes
    steps = PAPER["epochs"] * math.ceil(PAPER["nsamples"] / batch)
    grad_bytes = 4 * m.adapter_params(groups, PAPER["rank"])
    comm = 0.0 if gpus == 1 else m.num_blocks * steps * (
        ALLREDUCE_LATENCY_S + 2 * (gpus - 1) / gpus * grad_bytes / BUS_BYTES_PER_S)
    return {"model": name, "params": m.params, "gpus": gpus, "batch": batch, "steps_per_block": steps,
            "host_per_rank": p.host_per_rank, "host_per_machine": p.host_per_machine,
            "device_per_rank": p.device_per_rank, "streams_on": p.streams_on, "fits": p.fits,
            "why_not": "" if p.fits else ("host" if not p.host_fits else "device"),
            "flops": m.num_blocks * block, "cpu_equivalent_s": m.num_blocks * block / achieved_cpu_flops(),
            "compute_s": compute, "allreduce_s": comm, "time_s": compute + comm}


def _hours(s: float) -> str:
    return f"{s / 3600:.1f} h" if s < 100 * 3600 else f"{s / 86400:.1f} d"


def table(gpu_tflops: float) -> tuple[str, list[dict]]:
    rows = [row(name, cfg, g, gpu_tflops * 1e12) for name, cfg in CONFIGS.items() for g in (1, 2, 8)]
    cpu = achieved_cpu_flops()
    lines = [
        f"Measured: {MEASURED['model']} EPTS on 2 CPU cores, {MEASURED['nsamples']} x {MEASURED['seqlen']} tokens, "
        f"{MEASURED['epochs']} epoch, 8 groups, {MEASURED['seconds']} s for 30 blocks = "
        f"{MEASURED['seconds'] / 30 / (MEASURED['nsamples'] * MEASURED['seqlen']) * 1e3:.2f} ms per block-token, "
        f"{cpu / 1e9:.0f} GFLOP/s achieved. Assumed GPU rate: {gpu_tflops:g} TFLOP/s sustained.",
        "",
        "| model | params | GPUs | --batch | steps/block | host per GPU | host per machine | GPU memory per GPU "
        "| streams | fits 80 GB GPU, 2 TiB host | EPTS TFLOP | est. time (GPU) | CPU time at the measured rate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        fits = "yes" if r["fits"] else f"no ({r['why_not']})"
        lines.append(
            f"| {r['model']} | {r['params'] / 1e9:.2f} B | {r['gpus']} | {r['batch']} | {r['steps_per_block']} "
            f"| {fmt_bytes(r['host_per_rank'])} | {fmt_bytes(r['host_per_machine'])} | {fmt_bytes(r['device_per_rank'])} "
            f"| {'GPU' if r['streams_on'] == 'device' else 'CPU'} | {fits} | {r['flops'] / 1e12:,.0f} "
            f"| {_hours(r['time_s'])} | {r['cpu_equivalent_s'] / 86400 / 365:.1f} years |")
    return "\n".join(lines), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-tflops", type=float, default=25.0, help="sustained float32 TFLOP/s assumed per GPU")
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args()
    if not (args.gpu_tflops > 0 and math.isfinite(args.gpu_tflops)):
        raise SystemExit("error: --gpu-tflops must be a positive number")
    text, rows = table(args.gpu_tflops)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"measured": MEASURED, "assumed_gpu_tflops": args.gpu_tflops, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
