"""ONNX export benchmark: file sizes, level switch and ONNX Runtime CPU latency of the three
forms of one artifact, in one run. Prints the markdown tables of BENCHMARKS.md.

    epts-export export runs/smol --out bench-out/onnx/baked-fp32 --mode baked
    epts-export export runs/smol --out bench-out/onnx/dynamic-fp32 --mode dynamic
    epts-export export runs/smol --out bench-out/onnx/baked-fp16 --mode baked --dtype fp16
    epts-export export runs/smol --out bench-out/onnx/dynamic-fp16 --mode dynamic --dtype fp16
    python -m benchmarks.onnx_bench --baked bench-out/onnx/baked-fp32 --dynamic bench-out/onnx/dynamic-fp32 \
        --baked-fp16 bench-out/onnx/baked-fp16 --dynamic-fp16 bench-out/onnx/dynamic-fp16 \
        --json benchmarks/results/onnx_smollm2-135m.json

The forms, per level of the baked export:
- baked: the level's own graph (``level-<L>/model.onnx``); "load s" is opening it, which is
  what switching level costs with baked graphs;
- whole graph: the dynamic export's ``model.onnx`` with ``sparsity_level`` as an input, which
  builds every weight on every call (what dynamic mode was before the split);
- switch: ``weights.onnx`` + ``decoder.onnx`` through ``ElasticDecoder``, opened once; "switch
  ms" is ``set_level`` into the level (median of 3, each from another level), then the latency
  at that level in place, and the largest |logit| difference from the baked graph on the prefill;
  "repacked": a second ElasticDecoder(pack="always") switched to the level, with the packed
  session it then loads ("repacked after s": that load).

Latency: batch 1, a 128-token prefill from an empty past, then --decode single-token steps on
top of it, repeated for --repeats rounds; decoders that are compared run in turns within each
round (``paired``), so that the machine's drift hits them alike; medians over the rounds. The
whole graph runs on its own (3 prefills, then the decode steps). With --dense (an
optimum-cli export of the dense model) sizes are relative to it, else to a baked level (the
same bytes: a baked level is the dense graph with zeros in it).
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
from epts_export.device.ort import ElasticDecoder, OrtDecoder, positions


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


def prefill_logits(dec, n: int = 64) -> np.ndarray:
    ids = np.random.default_rng(1).integers(10, 1000, (1, n))
    mask = np.ones_like(ids)
    return dec.step(ids, mask, positions(mask, 0), dec.empty_past(1))[0]


def export_mb(folder: Path, names) -> float:
    return sum((folder / n).stat().st_size for n in names if (folder / n).exists()) / 1e6


def paired(decs: dict, prefill: int, decode: int, rounds: int) -> dict[str, dict]:
    """Latency of several decoders measured in turns (round r runs each once, in alternating
    order), so that the machine's drift hits them alike: per round a prefill from an empty past,
    then ``decode`` steps on top of it. Medians over all rounds."""
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 1000, (1, prefill))
    mask = np.ones_like(ids)
    steps = rng.integers(10, 1000, (decode, 1, 1))
    times = {n: ([], []) for n in decs}
    for d in decs.values():  # warm-up
        d.step(ids, mask, positions(mask, 0), d.empty_past(1))
    for r in range(rounds):
        for n in (list(decs) if r % 2 == 0 else list(reversed(decs))):
            d, (pre, dec) = decs[n], times[n]
            t = time.perf_counter()
            _, past = d.step(ids, mask, positions(mask, 0), d.empty_past(1))
            pre.append(time.perf_counter() - t)
            m = mask
            for i in range(decode):
                m = np.concatenate([m, np.ones((1, 1), np.int64)], axis=1)
                t = time.perf_counter()
                _, past = d.step(steps[i], m, positions(m, prefill + i), past)
                dec.append(time.perf_counter() - t)
    out = {}
    for n, (pre, dec) in times.items():
        ms = statistics.median(dec) * 1e3
        out[n] = {"prefill_ms": round(statistics.median(pre) * 1e3, 2), "decode_ms": round(ms, 2),
                  "decode_tok_s": round(1e3 / ms, 1)}
    return out


def compare_forms(baked_dir: Path, dyn_dir: Path, args, label: str) -> list[dict]:
    """One row per level: baked and switch form measured in turns, the whole graph after them."""
    baked, dyn = OnnxExport.open(baked_dir, verify="skip"), OnnxExport.open(dyn_dir, verify="skip")
    t = time.perf_counter()
    sw = ElasticDecoder(dyn.path, level=len(dyn.levels) - 1)
    open_s = time.perf_counter() - t
    print(f"{label}: ElasticDecoder opened in {open_s:.2f} s ({sw.optimization})", flush=True)
    packed = ElasticDecoder(dyn.path, level=len(dyn.levels) - 1, pack="always")
    rows = []
    for lv in baked.levels:
        idx, other = dyn.level_index(lv), (dyn.level_index(lv) + 1) % len(dyn.levels)
        t = time.perf_counter()
        bdec = OrtDecoder(baked.graph_path(lv))
        row = {"dtype": label, "level": lv.name, "baked_load_s": round(time.perf_counter() - t, 2)}
        switches = []
        for _ in range(3):
            sw.set_level(other)
            switches.append(sw.set_level(idx))
        row["switch_ms"] = round(statistics.median(switches) * 1e3, 1)
        row["max_abs_vs_baked"] = float(np.abs(prefill_logits(sw) - prefill_logits(bdec)).max())
        packed.set_level(idx)
        packed.prepare(args.decode)
        row["repack_s"] = round(packed.pack_s, 2)
        lat = paired({"baked": bdec, "switch": sw, "packed": packed}, args.prefill, args.decode, args.repeats)
        assert packed.packed, "the packed session was not taken"
        row["baked"], row["switch"], row["packed"] = lat["baked"], lat["switch"], lat["packed"]
        del bdec
        if not args.skip_whole:
            row["whole"] = {**latency(OrtDecoder(dyn.path / "model.onnx", level=idx), args.prefill, args.decode, 3),
                            **weight_build_share(dyn.path / "model.onnx", idx, args.prefill, 8)}
        rows.append(row)
        print(row, flush=True)
    return [{"open_s": round(open_s, 2), "optimization": sw.optimization}] + rows


class _WeightsAsInputs:
    """The rejected alternative: decoder.onnx with its prunable weights as graph inputs, bound once
    per step through IOBinding (no copy), so that a switch is one weight build too."""

    def __init__(self, folder: Path, level: int):
        import onnx
        import onnxruntime as ort

        builder = ort.InferenceSession(str(folder / "weights.onnx"), providers=["CPUExecutionProvider"])
        names = [o.name for o in builder.get_outputs()]
        self.weights = {n: ort.OrtValue.ortvalue_from_numpy(w)
                        for n, w in zip(names, builder.run(None, {"sparsity_level": np.array(level, np.int64)}))}
        g = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
        dims = {t.name: (t.data_type, list(t.dims)) for t in g.graph.initializer if t.name in self.weights}
        kept = [t for t in g.graph.initializer if t.name not in self.weights]
        del g.graph.initializer[:]
        g.graph.initializer.extend(kept)
        g.graph.input.extend(onnx.helper.make_tensor_value_info(n, *dims[n]) for n in names)
        # beside model.onnx_data (ORT refuses external data outside the graph's folder, links too)
        graph = folder / f".bench-weights-as-inputs-{os.getpid()}.onnx"
        graph.write_bytes(g.SerializeToString())
        try:
            self.session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        finally:
            graph.unlink()
        self.inner = OrtDecoder.__new__(OrtDecoder)
        self.inner._attach(self.session)

    def empty_past(self, batch):
        return self.inner.empty_past(batch)

    def step(self, input_ids, attention_mask, position_ids, past):
        b = self.session.io_binding()
        for n, v in (("input_ids", input_ids), ("attention_mask", attention_mask), ("position_ids", position_ids)):
            b.bind_cpu_input(n, np.ascontiguousarray(v, dtype=np.int64))
        for n, pv in zip(self.inner.past_names, past):
            b.bind_cpu_input(n, np.ascontiguousarray(pv, dtype=self.inner.past_dtype))
        for n, w in self.weights.items():
            b.bind_ortvalue_input(n, w)
        for o in self.inner.output_names:
            b.bind_output(o)
        self.session.run_with_iobinding(b)
        outs = b.copy_outputs_to_cpu()
        return outs[0], list(outs[1:])


def alternatives(baked_dir: Path, dyn_dir: Path, args) -> dict:
    """The designs at the first level, measured in turns: the baked graph, a new decoder session
    per switch (ORT's add_initializer overrides, pre-packing on as usual), the weights as graph
    inputs, and ElasticDecoder (pre-packing off)."""
    import onnxruntime as ort

    baked, dyn = OnnxExport.open(baked_dir, verify="skip"), OnnxExport.open(dyn_dir, verify="skip")
    lv = baked.levels[0]
    level = dyn.level_index(lv)
    folder = dyn.path
    builder = ort.InferenceSession(str(folder / "weights.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in builder.get_outputs()]
    t = time.perf_counter()
    values = [ort.OrtValue.ortvalue_from_numpy(w) for w in builder.run(None, {"sparsity_level": np.array(level, np.int64)})]
    opts = ort.SessionOptions()
    for n, v in zip(names, values):
        opts.add_initializer(n, v)
    session = ort.InferenceSession(str(folder / "decoder.onnx"), opts, providers=["CPUExecutionProvider"])
    new_session_s = time.perf_counter() - t
    per_level = OrtDecoder.__new__(OrtDecoder)
    per_level._attach(session)
    per_level.dynamic = False
    decs = {"baked": OrtDecoder(baked.graph_path(lv)), "new_session": per_level,
            "weights_as_inputs": _WeightsAsInputs(folder, level), "switch": ElasticDecoder(folder, level=level)}
    out = paired(decs, args.prefill, args.decode, args.repeats)
    out["new_session"]["switch_s"] = round(new_session_s, 2)
    out["level"] = lv.name
    return out


def print_latency(rows: list[dict], prefill: int) -> None:
    head = rows[0]
    print(f"\nswitch form opened once in {head['open_s']:.2f} s (graph optimization {head['optimization']})\n")
    print(f"| level | baked: load s | prefill {prefill} ms | decode ms | whole graph: prefill ms | decode ms | "
          f"switch ms | in place: prefill ms (x baked) | decode ms (x baked) | repacked after s | "
          f"repacked: prefill ms (x baked) | decode ms (x baked) | max abs logit diff vs baked |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows[1:]:
        b, s, k = r["baked"], r["switch"], r["packed"]
        whole = (f"{r['whole']['prefill_ms']:.1f} | {r['whole']['decode_ms']:.1f}" if "whole" in r else " | ")
        print(f"| {r['level']} | {r['baked_load_s']:.2f} | {b['prefill_ms']:.1f} | {b['decode_ms']:.2f} | {whole} | "
              f"{r['switch_ms']:.0f} | {s['prefill_ms']:.1f} ({s['prefill_ms'] / b['prefill_ms']:.2f}) | "
              f"{s['decode_ms']:.2f} ({s['decode_ms'] / b['decode_ms']:.2f}) | {r['repack_s']} | "
              f"{k['prefill_ms']:.1f} ({k['prefill_ms'] / b['prefill_ms']:.2f}) | "
              f"{k['decode_ms']:.2f} ({k['decode_ms'] / b['decode_ms']:.2f}) | {r['max_abs_vs_baked']:.2e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baked", type=Path, required=True, help="baked fp32 export (the levels to measure)")
    ap.add_argument("--dynamic", type=Path, required=True, help="dynamic fp32 export of the same artifact")
    ap.add_argument("--baked-fp16", type=Path)
    ap.add_argument("--dynamic-fp16", type=Path)
    ap.add_argument("--dense", type=Path, help="optimum-cli export of the dense model (folder with model.onnx)")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=16, help="decode steps per round")
    ap.add_argument("--repeats", type=int, default=6, help="rounds (each runs every decoder once)")
    ap.add_argument("--skip-whole", action="store_true", help="do not measure the whole graph (slow)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    # sizes: everything a user downloads for the form (graphs, tensors, level table; not configs/tokenizer)
    dyn_files = ("model.onnx", "model.onnx_data", "weights.onnx", "decoder.onnx", "levels.json")
    sizes = []
    for dtype, baked_dir, dyn_dir in (("fp32", args.baked, args.dynamic), ("fp16", args.baked_fp16, args.dynamic_fp16)):
        if baked_dir is None or dyn_dir is None:
            continue
        baked, dyn = OnnxExport.open(baked_dir, verify="skip"), OnnxExport.open(dyn_dir, verify="skip")
        g = baked.graph_path(baked.levels[0])
        level_mb = folder_bytes(g) / 1e6
        dense_mb = folder_bytes(args.dense / "model.onnx") / 1e6 if (args.dense and dtype == "fp32") else level_mb
        mb = export_mb(dyn.path, dyn_files)
        sizes.append({"dtype": dtype, "levels": [lv.name for lv in dyn.levels], "baked_level_mb": round(level_mb, 1),
                      "dense_mb": round(dense_mb, 1), "dynamic_mb": round(mb, 1), "ratio": round(mb / dense_mb, 3),
                      "baked_all_levels_mb": round(level_mb * len(baked.levels), 1),
                      "code_fields": dyn.manifest.get("code_fields")})
        print(sizes[-1], flush=True)
    results = {"fp32": compare_forms(args.baked, args.dynamic, args, "fp32")}
    alt = alternatives(args.baked, args.dynamic, args)
    print(alt, flush=True)
    if args.baked_fp16 and args.dynamic_fp16:
        results["fp16"] = compare_forms(args.baked_fp16, args.dynamic_fp16, args, "fp16")

    print("\n| dtype | levels | dense MB | dynamic export MB | x dense | baked, all levels MB | code fields |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in sizes:
        fields = ", ".join(f"{f['name']} {f['bits']} bits" for f in r["code_fields"] or [])
        print(f"| {r['dtype']} | {', '.join(r['levels'])} | {r['dense_mb']:.1f} | {r['dynamic_mb']:.1f} | {r['ratio']:.3f} | "
              f"{r['baked_all_levels_mb']:.1f} | {fields} |")
    for dtype, rows in results.items():
        print(f"\n{dtype}:")
        print_latency(rows, args.prefill)
    first = results["fp32"][1]
    print(f"\nthe designs at level {alt['level']} (fp32, measured in turns):\n")
    print(f"| design | level switch | prefill {args.prefill} ms | decode ms/token |")
    print("|---|---:|---:|---:|")
    print(f"| baked graphs: open the level's graph | {first['baked_load_s']:.2f} s | {alt['baked']['prefill_ms']:.1f} | "
          f"{alt['baked']['decode_ms']:.2f} |")
    if "whole" in first:
        print(f"| whole graph, level as input | 0 | {first['whole']['prefill_ms']:.1f} | {first['whole']['decode_ms']:.2f} |")
    n = alt["new_session"]
    print(f"| build + a new decoder session (add_initializer, pre-packing on) | {n['switch_s']:.2f} s | "
          f"{n['prefill_ms']:.1f} | {n['decode_ms']:.2f} |")
    w = alt["weights_as_inputs"]
    print(f"| build + weights as graph inputs (IOBinding) | one build | {w['prefill_ms']:.1f} | {w['decode_ms']:.2f} |")
    print(f"| build into the decoder's own buffers (ElasticDecoder) | {first['switch_ms']:.0f} ms | "
          f"{alt['switch']['prefill_ms']:.1f} | {alt['switch']['decode_ms']:.2f} |")
    print(f"| the same, pack=\"always\": a packed session loaded after the build ({first['repack_s']} s) | {first['switch_ms']:.0f} ms | "
          f"{first['packed']['prefill_ms']:.1f} | {first['packed']['decode_ms']:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"prefill_tokens": args.prefill, "decode_steps": args.decode, "repeats": args.repeats,
                                         "sizes": sizes, "latency": results, "alternatives": alt}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
