"""ONNX export benchmark: export time, file sizes and ONNX Runtime CPU latency, baked vs dynamic
vs the dense model exported by optimum-cli. Prints a markdown table (the one in BENCHMARKS.md).

    # the dense reference, in an environment with the optimum extra (it needs transformers 4.57)
    optimum-cli export onnx --model runs/smol/model --task text-generation-with-past bench-out/onnx/optimum-dense
    # ours
    epts-export export runs/smol --out bench-out/onnx/baked --mode baked   --levels 0.3,0.5,0.7,2:4
    epts-export export runs/smol --out bench-out/onnx/dyn   --mode dynamic --levels 0.3,0.5,0.7,2:4
    python -m benchmarks.onnx_bench --baked bench-out/onnx/baked --dynamic bench-out/onnx/dyn \\
        --dense bench-out/onnx/optimum-dense --json benchmarks/results/onnx_smollm2-135m.json

Latency: batch 1, a 128-token prefill from an empty past, then per-token decode steps on top of
it; median of --repeats runs after a warm-up. In dynamic mode an ORT profile of decode steps
splits the time into building the level's weights and the decoder itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from epts_export.onnx.reader import OnnxExport
from epts_export.onnx.runtime import OrtDecoder, positions


def folder_bytes(graph: Path) -> int:
    data = graph.with_name(graph.name + "_data")
    return graph.stat().st_size + (data.stat().st_size if data.exists() else 0)


def latency(dec: OrtDecoder, prefill: int, decode: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 1000, (1, prefill))
    mask = np.ones_like(ids)
    pos = positions(mask, 0)
    dec.step(ids, mask, pos, dec.empty_past(1))  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        _, past = dec.step(ids, mask, pos, dec.empty_past(1))
        times.append(time.perf_counter() - t)
    prefill_ms = statistics.median(times) * 1e3
    steps = []
    m = mask
    for i in range(decode):
        tok = rng.integers(10, 1000, (1, 1))
        m = np.concatenate([m, np.ones((1, 1), np.int64)], axis=1)
        t = time.perf_counter()
        _, past = dec.step(tok, m, positions(m, prefill + i), past)
        steps.append(time.perf_counter() - t)
    decode_ms = statistics.median(steps[1:]) * 1e3
    return {"prefill_ms": round(prefill_ms, 2), "decode_ms": round(decode_ms, 2), "decode_tok_s": round(1e3 / decode_ms, 1)}


def weight_build_share(graph: Path, level: int, prefill: int, steps: int) -> dict:
    """Profile decode steps of a dynamic graph: time in the weight-building subgraphs vs the rest."""
    dec = OrtDecoder(graph, level=level, profile_prefix=os.path.join(tempfile.mkdtemp(prefix="epts-prof-"), "p"))
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 1000, (1, prefill))
    mask = np.ones_like(ids)
    _, past = dec.step(ids, mask, positions(mask, 0), dec.empty_past(1))
    m = mask
    for i in range(steps):
        m = np.concatenate([m, np.ones((1, 1), np.int64)], axis=1)
        _, past = dec.step(rng.integers(10, 1000, (1, 1)), m, positions(m, prefill + i), past)
    events = json.loads(Path(dec.session.end_profiling()).read_text())
    build = other = 0
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        node = e["name"][: -len("_kernel_time")]
        if node.startswith("epts/") or ".weight_t" in node:
            build += e["dur"]
        else:
            other += e["dur"]
    return {"weight_build_share": round(build / max(build + other, 1), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baked", type=Path, required=True)
    ap.add_argument("--dynamic", type=Path)
    ap.add_argument("--dense", type=Path, help="optimum-cli export of the dense model (folder with model.onnx)")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=33)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    rows = []
    if args.dense:
        g = args.dense / "model.onnx"
        rows.append({"variant": "dense (optimum-cli)", "level": "dense", "mb": folder_bytes(g) / 1e6, "export_s": None,
                     **latency(OrtDecoder(g), args.prefill, args.decode, args.repeats)})
        print(rows[-1], flush=True)
    baked = OnnxExport.open(args.baked, verify="skip")
    for lv in baked.levels:
        g = baked.graph_path(lv)
        rows.append({"variant": "baked", "level": lv.name, "mb": folder_bytes(g) / 1e6,
                     "export_s": baked.manifest["export_seconds"][lv.name],
                     **latency(OrtDecoder(g), args.prefill, args.decode, args.repeats)})
        print(rows[-1], flush=True)
    if args.dynamic:
        dyn = OnnxExport.open(args.dynamic, verify="skip")
        for lv in dyn.levels:
            g = dyn.graph_path(lv)
            idx = dyn.level_index(lv)
            rows.append({"variant": "dynamic", "level": lv.name, "mb": folder_bytes(g) / 1e6,
                         "export_s": dyn.manifest["export_seconds"]["all"],
                         **latency(OrtDecoder(g, level=idx), args.prefill, args.decode, args.repeats),
                         **weight_build_share(g, idx, args.prefill, 8)})
            print(rows[-1], flush=True)

    # sizes relative to the dense optimum export, or (without one) to a baked level: same bytes
    base_mb, base = (rows[0]["mb"], "x dense") if args.dense else (next(r["mb"] for r in rows if r["variant"] == "baked"), "x baked")
    print(f"\n| variant | level | file MB | {base} | export s | prefill {args.prefill} ms | decode ms/token | decode tok/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['mb'] / base_mb:.3f}"
        exp = f"{r['export_s']:.1f}" if r["export_s"] is not None else ""
        extra = f" ({100 * r['weight_build_share']:.0f}% building weights)" if "weight_build_share" in r else ""
        print(f"| {r['variant']} | {r['level']} | {r['mb']:.1f} | {ratio} | {exp} | {r['prefill_ms']:.1f} | "
              f"{r['decode_ms']:.2f}{extra} | {r['decode_tok_s']:.1f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"prefill_tokens": args.prefill, "decode_steps": args.decode,
                                         "repeats": args.repeats, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
