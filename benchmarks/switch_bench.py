"""Decode speed after a level switch, as a user gets it through `epts-export run` (``Runner``):
a baked export against a dynamic export served packed (the default) and in place (--fast-switch).

    epts-export export runs/smol --out bench-out/onnx/dynamic-fp32 --mode dynamic
    epts-export export runs/smol --out bench-out/onnx/baked-fp32 --mode baked --levels 0.5,0.7,2:4
    python -m benchmarks.switch_bench --baked bench-out/onnx/baked-fp32 --dynamic bench-out/onnx/dynamic-fp32 \\
        --json benchmarks/results/switch_smollm2-135m.json

Every run is a fresh process (its peak resident memory is its own), greedy from one prompt, the
cases in turns within each round (so that the machine's drift hits them alike), best of
--repeats rounds per number. Runs: each --single level alone; the --switch pair one after the
other from one load (the second level is the one that was switched to); and the same pair with
--short new tokens, where packing must not cost time. Per generation: the time until it could
start ("ready": the load, or the switch plus any packed session), its prefill and its decode
tokens/s (every token after the first).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, sys
from epts_export.device.runner import Runner
from epts_export.device.levels import parse_level
path, levels, tokens, threads, fast, prompt = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1", sys.argv[6]
runner = Runner(path, "ort", threads, fast_switch=fast)
out = [runner.generate(parse_level(lv), prompt, tokens) for lv in levels]
print(json.dumps([{k: v for k, v in r.items() if k not in ("tokens", "text")} | {"tokens": r["tokens"]} for r in out]))
"""

CASES = (("baked", "baked", False), ("packed", "dynamic", False), ("in place", "dynamic", True))

# --background: the design this replaced, for comparison: after the switch the packed session
# loads in a thread while the generation decodes in place, and the generation takes it at the
# first step after it is ready
BACKGROUND = """
import json, sys, threading, time
from epts_export.device.ort import ElasticDecoder, greedy
from epts_export.device.runner import TextTokenizer
folder, first, second, tokens, threads, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
ids = TextTokenizer(__import__("pathlib").Path(folder)).encode(prompt)
dec = ElasticDecoder(folder, first, threads=threads, pack="never")
greedy(dec.step, dec.empty_past(1), ids, tokens)
t0 = time.perf_counter()
dec.set_level(second)
worker = threading.Thread(target=dec._load_packed)
worker.start()
taken = []
def step(*a):
    if not taken and not worker.is_alive():
        dec._use(dec._packed[1]); taken.append(time.perf_counter())
    return dec.step(*a)
stamps = []
start = time.perf_counter()
greedy(step, dec.empty_past(1), ids, tokens, lambda t: stamps.append(time.perf_counter()))
worker.join()
print(json.dumps({"full_speed_after_s": round(taken[0] - t0, 3) if taken else None, "prefill_s": round(stamps[0] - start, 3),
                  "decode_tok_s": round((len(stamps) - 1) / (stamps[-1] - stamps[0]), 2), "whole_s": round(stamps[-1] - t0, 3)}))
"""


def run(path: str, levels: list[str], tokens: int, threads: int, fast: bool, prompt: str) -> list[dict]:
    res = subprocess.run([sys.executable, "-c", CHILD, path, ",".join(levels), str(tokens), str(threads),
                          "1" if fast else "0", prompt], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{path} {levels}: {res.stderr.strip().splitlines()[-1]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def best(rows: list[dict], key: str, high: bool) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return (max if high else min)(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baked", required=True)
    ap.add_argument("--dynamic", required=True)
    ap.add_argument("--single", default="0.5,2:4", help="levels run alone")
    ap.add_argument("--switch", default="0.5,0.7", help="two levels run one after the other from one load")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--short", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", default="The history of England")
    ap.add_argument("--json")
    ap.add_argument("--background", action="store_true", help="also the second level of --switch with its packed "
                    "session loaded in a background thread (the design this replaced)")
    args = ap.parse_args(argv)
    paths = {"baked": args.baked, "dynamic": args.dynamic}
    runs = [(f"{lv} alone", [lv], args.tokens) for lv in args.single.split(",")]
    pair = args.switch.split(",")
    runs += [(f"{pair[0]} then {pair[1]}", pair, args.tokens), (f"{pair[0]} then {pair[1]}, {args.short} tokens", pair, args.short)]
    results: dict = {name: {case: [] for case, _, _ in CASES} for name, _, _ in runs}
    for round_ in range(args.repeats):
        for name, levels, tokens in runs:
            for case, kind, fast in CASES:
                results[name][case].append(run(paths[kind], levels, tokens, args.threads, fast, args.prompt))
                print(f"round {round_ + 1}: {name}, {case}: " + "; ".join(
                    f"{r['level']} ready {r['ready_s']} s, {r['decode_tok_s']} tok/s" for r in results[name][case][-1]),
                    file=sys.stderr, flush=True)
    table = []
    for name, levels, tokens in runs:
        k = len(levels) - 1  # the level served last: after the switch in a pair
        row = {"run": name, "level": levels[k], "new_tokens": tokens}
        same = {case: {tuple(r[k]["tokens"]) for r in rs} for case, rs in results[name].items()}
        row["same_tokens"] = len(set().union(*same.values())) == 1
        for case, rs in results[name].items():
            gens = [r[k] for r in rs]
            row[case] = {"decode_tok_s": best(gens, "decode_tok_s", True), "prefill_s": best(gens, "prefill_s", False),
                         "ready_s": best(gens, "ready_s", False), "switch_s": best(gens, "switch_s", False),
                         "pack_s": best(gens, "pack_s", False), "session": gens[0].get("session"),
                         "total_s": min(sum(g["ready_s"] + g["prefill_s"] + (len(g["tokens"]) - 1) / g["decode_tok_s"]
                                            for g in r) for r in rs),
                         "peak_rss_mb": best([r[-1] for r in rs], "peak_rss_mb", False)}
        table.append(row)
    print(f"\n| run | level served | baked tok/s | packed tok/s (x baked) | in place tok/s (x baked) | prefill s: baked / "
          f"packed / in place | ready s: baked / packed (switch + pack) / in place | whole run s: baked / packed / in place "
          f"| peak MiB: baked / packed / in place | same tokens |")
    print("|---|---|---:|---:|---:|---|---|---|---|---|")
    for row in table:
        b, p, i = row["baked"], row["packed"], row["in place"]
        pack = f" ({1e3 * p['switch_s']:.0f} ms + {p['pack_s']:.2f})" if p["switch_s"] == p["switch_s"] and p["pack_s"] == p["pack_s"] else ""
        print(f"| {row['run']} | {row['level']} | {b['decode_tok_s']:.1f} | {p['decode_tok_s']:.1f} "
              f"({p['decode_tok_s'] / b['decode_tok_s']:.2f}) {p['session']} | {i['decode_tok_s']:.1f} "
              f"({i['decode_tok_s'] / b['decode_tok_s']:.2f}) | {b['prefill_s']:.3f} / {p['prefill_s']:.3f} / {i['prefill_s']:.3f} "
              f"| {b['ready_s']:.2f} / {p['ready_s']:.2f}{pack} / {i['ready_s']:.2f} | {b['total_s']:.2f} / {p['total_s']:.2f} / "
              f"{i['total_s']:.2f} | {b['peak_rss_mb']:.0f} / {p['peak_rss_mb']:.0f} / {i['peak_rss_mb']:.0f} | "
              f"{'yes' if row['same_tokens'] else 'NO'} |")
    background = []
    if args.background:
        from epts_export.device.ort import ElasticDecoder

        names = ElasticDecoder(args.dynamic, 0).levels
        for _ in range(args.repeats):
            res = subprocess.run([sys.executable, "-c", BACKGROUND, args.dynamic, str(names.index(pair[0])),
                                  str(names.index(pair[1])), str(args.tokens), str(args.threads), args.prompt],
                                 capture_output=True, text=True, check=True)
            background.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"\nbackground load, {pair[1]} after {pair[0]}, {args.tokens} tokens: " + "; ".join(
            f"full speed after {b['full_speed_after_s']} s, {b['decode_tok_s']} tok/s, whole {b['whole_s']} s" for b in background))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": vars(args), "table": table, "runs": results, "background": background}, fh, indent=1)
    return 0 if all(row["same_tokens"] for row in table) else 1


if __name__ == "__main__":
    sys.exit(main())
