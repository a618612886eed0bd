"""GPU checks of the device side, in one run on a machine with an NVIDIA GPU (no TensorRT needed):

1. what 2:4 buys per linear layer: every prunable linear of SmolLM2-135M and of Llama-3-8B
   (random weights of their shapes, pruned 2:4 along the input dimension) as PyTorch semi-structured
   sparse (cuSPARSELt, and CUTLASS) against the same weights dense, fp16, at prefill (1 x 512 and
   4 x 512 tokens) and decode (1 and 4 tokens) shapes;
2. ``device.cuda``: the libcudart-through-ctypes device memory that TensorRT engines run on (no
   torch on the device): round trips in every dtype, block reuse, the GPU's name and compute
   capability, and the host-to-device bandwidth it reaches;
3. the elastic bundle on ONNX Runtime's CUDA provider, where that provider is installed: a
   SmolLM2-shaped model (random weights, a one-step EPTS run), exported dynamic and baked in fp16;
   load, level switch, prefill of 512 tokens and decode of 64, elastic against baked, and whether
   a switched session computes the new level.

    python -m benchmarks.gpu_check --out gpu.json          # prints the tables, writes the numbers

Each part reports what it could not run and why, instead of failing the others.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import traceback
from pathlib import Path

import numpy as np

SHAPES = {  # model -> [(linear, in_features, out_features)]
    "SmolLM2-135M": [("q_proj", 576, 576), ("k_proj/v_proj", 576, 192), ("o_proj", 576, 576),
                     ("gate_proj/up_proj", 576, 1536), ("down_proj", 1536, 576)],
    "Llama-3-8B": [("q_proj", 4096, 4096), ("k_proj/v_proj", 4096, 1024), ("o_proj", 4096, 4096),
                   ("gate_proj/up_proj", 4096, 14336), ("down_proj", 14336, 4096)],
}
TOKENS = {"decode 1": 1, "decode 4": 4, "prefill 1x512": 512, "prefill 4x512": 2048}


def _prune_24(w):
    """Keep the 2 largest-magnitude weights of every 4 along the input dimension (rows of W, out x in)."""
    import torch

    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // 4, 4)
    idx = g.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return (g * mask).reshape(out_f, in_f)


def _time(fn, iters: int = 200, warmup: int = 20) -> float:
    """Median microseconds of ``fn`` over ``iters`` runs, each timed with CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return float(np.median(times))


def _kernel_us(fn, iters: int = 50) -> float:
    """Microseconds of GPU kernel time per call of ``fn`` (torch.profiler's device time, summed over
    every kernel the call launches): what the math costs, apart from the host work of a call."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in prof.key_averages())
    return total / iters


def semi_structured() -> dict:
    import torch
    import torch.nn.functional as F
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    torch.manual_seed(0)
    rows, notes = [], []
    for model, linears in SHAPES.items():
        for name, in_f, out_f in linears:
            w = _prune_24(torch.randn(out_f, in_f, device="cuda", dtype=torch.float16))
            sparse = {}
            for backend, force_cutlass in (("cusparselt", False), ("cutlass", True)):
                try:
                    SparseSemiStructuredTensor._FORCE_CUTLASS = force_cutlass
                    sparse[backend] = to_sparse_semi_structured(w)
                except Exception as e:  # a backend missing from this build or GPU
                    notes.append(f"{backend}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            for shape, tokens in TOKENS.items():
                x = torch.randn(tokens, in_f, device="cuda", dtype=torch.float16)
                dense_us = _time(lambda: F.linear(x, w))
                dense_k = _kernel_us(lambda: F.linear(x, w))
                row = {"model": model, "linear": name, "in": in_f, "out": out_f, "shape": shape, "tokens": tokens,
                       "dense_us": round(dense_us, 2), "dense_kernel_us": round(dense_k, 2)}
                ref = F.linear(x, w).float()
                for backend, ws in sparse.items():
                    try:
                        got = F.linear(x, ws).float()
                        err = float(((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item())
                        us = _time(lambda: F.linear(x, ws))
                        row[f"{backend}_us"], row[f"{backend}_speedup"] = round(us, 2), round(dense_us / us, 3)
                        k = _kernel_us(lambda: F.linear(x, ws))
                        row[f"{backend}_kernel_us"], row[f"{backend}_kernel_speedup"] = round(k, 2), round(dense_k / k, 3)
                        row[f"{backend}_max_rel_err"] = round(err, 5)
                    except Exception as e:
                        row[f"{backend}_error"] = f"{type(e).__name__}: {str(e)[:400]}"
                rows.append(row)
    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    return {"rows": rows, "notes": sorted(set(notes))}


def cuda_module() -> dict:
    from epts_export.device.cuda import CudaRuntime, DeviceBuffers

    rt = CudaRuntime.load()
    buf = DeviceBuffers(rt, device=0)
    out = {"libcudart": rt.path, "runtime": rt.version(), "devices": rt.device_count(), "name": rt.name(0),
           "compute_capability": rt.capability(0), "device_name": buf.device_name()}
    ok = {}
    for dtype, host in (("float16", np.float16), ("float32", np.float32), ("int64", np.int64), ("int32", np.int32),
                        ("int8", np.int8), ("bool", np.bool_)):
        a = (np.arange(4096).reshape(64, 64) % 97 - 40).astype(host)
        ok[dtype] = bool(np.array_equal(buf.to_host(buf.to_device(a, dtype)), a))
    bf = np.array([1.0, 1.00390625, 1.005859375, -3.14159, 3.0e38], np.float32)
    ok["bfloat16"] = buf.to_host(buf.to_device(bf, "bfloat16")).tolist()[:4] == [1.0, 1.0, 1.0078125, -3.140625]
    ok["zeros"] = bool((buf.to_host(buf.zeros((1000,), "float32")) == 0).all())
    x = buf.empty((256, 256), "float16")
    ptr = x.ptr
    del x
    ok["reuse"] = buf.empty((512, 128), "float16").ptr == ptr
    big = np.ones(64 << 20, np.uint8)  # 64 MiB
    t0 = time.perf_counter()
    for _ in range(10):
        d = buf.to_device(big, "uint8")
    out["h2d_gb_s"] = round(10 * big.nbytes / (time.perf_counter() - t0) / 1e9, 2)
    del d
    buf.close()
    out["round_trips"] = ok
    out["passed"] = all(ok.values())
    return out


def _tokenizer(vocab: int):
    """A word-level tokenizer of ``vocab`` tokens (no hub here): the timing does not depend on it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tk = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _ort_cuda_bundle(work: Path, rehearse: bool = False) -> dict:
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers and not rehearse:
        return {"skipped": f"onnxruntime {ort.__version__} here has no CUDA provider (providers: {', '.join(providers)})"}
    import subprocess
    import sys

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3)  # SmolLM2-135M's
    if rehearse:  # the same steps on a tiny model and ONNX Runtime's CPU provider: a dry run of this script
        shape = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)
    cfg = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(work / "model")
    _tokenizer(cfg.vocab_size).save_pretrained(work / "model")
    cli = [sys.executable, "-m", "epts_export"]
    steps = [[*cli, "optimize", str(work / "model"), "--out", str(work / "art"), "--preset", "quick", "--calib", "random",
              "--nsamples", "2", "--seqlen", "32", "--steps", "1", "--device", "cpu" if rehearse else "cuda", "--quiet"],
             [*cli, "export", str(work / "art"), "--out", str(work / "dyn"), "--mode", "dynamic", "--dtype", "fp16", "--quiet"],
             [*cli, "export", str(work / "art"), "--out", str(work / "baked"), "--mode", "baked", "--dtype", "fp16",
              "--levels", "0.5,0.7", "--quiet"]]
    timings = {}
    for argv in steps:
        t0 = time.perf_counter()
        res = subprocess.run(argv, capture_output=True, text=True)
        timings[" ".join(argv[3:4] + argv[argv.index("--mode") + 1:argv.index("--mode") + 2] if "--mode" in argv else argv[3:4])] = \
            round(time.perf_counter() - t0, 1)
        if res.returncode:
            return {"error": f"{' '.join(argv[3:5])}: {res.stderr[-400:]}", "timings": timings}
    from epts_export.device.ort import ElasticDecoder, OrtDecoder, positions

    levels = json.loads((work / "dyn" / "levels.json").read_text())["levels"]
    ids = np.random.default_rng(0).integers(100, cfg.vocab_size - 1, (1, 512))
    mask = np.ones_like(ids)

    def run(dec, n_new: int = 64) -> dict:
        t0 = time.perf_counter()
        logits, past = dec.step(ids, mask, positions(mask, 0), dec.empty_past(1))
        prefill = time.perf_counter() - t0
        tok, m = np.array([[int(logits[0, -1].argmax())]]), mask
        t0 = time.perf_counter()
        for _ in range(n_new):
            m = np.ones((1, m.shape[1] + 1), np.int64)
            lg, past = dec.step(tok, m, np.array([[m.shape[1] - 1]]), past)
            tok = np.array([[int(lg[0, -1].argmax())]])
        return {"prefill_s": round(prefill, 4), "decode_tok_s": round(n_new / (time.perf_counter() - t0), 1),
                "last_logits": logits[0, -1]}

    cuda = ["CPUExecutionProvider"] if rehearse else ["CUDAExecutionProvider", "CPUExecutionProvider"]
    out = {"timings": timings, "providers": providers, "levels": levels}
    for level in ("0.5", "0.7"):
        t0 = time.perf_counter()
        baked = OrtDecoder(work / "baked" / f"level-{level}" / "model.onnx", providers=cuda)
        load = time.perf_counter() - t0
        run(baked, 4)  # warm
        out[f"baked {level}"] = {"load_s": round(load, 2), **{k: v for k, v in run(baked).items() if k != "last_logits"}}
    t0 = time.perf_counter()
    try:
        el = ElasticDecoder(work / "dyn", levels.index("0.5"), providers=cuda)
    except Exception as e:
        out["elastic"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        return out
    out["elastic load_s"] = round(time.perf_counter() - t0, 2)
    run(el, 4)
    out["elastic 0.5"] = {k: v for k, v in run(el).items() if k != "last_logits"}
    switch = el.set_level(levels.index("0.7"))
    got = run(el)
    fresh = ElasticDecoder(work / "dyn", levels.index("0.7"), providers=cuda)
    want = run(fresh, 1)["last_logits"]
    out["elastic 0.7 after switch"] = {"switch_s": round(switch, 4), **{k: v for k, v in got.items() if k != "last_logits"},
                                       "max_abs_vs_fresh_session": float(np.abs(got["last_logits"] - want).max())}
    return out


def ort_cuda_bundle(work: Path, rehearse: bool = False) -> dict:
    try:
        return _ort_cuda_bundle(work, rehearse)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-1500:]}


def table(rows: list[dict]) -> str:
    """Per linear and shape: kernel time (profiler) dense and 2:4, and per call through torch (events)."""
    lines = ["| model | linear (in -> out) | tokens | dense kernel us | 2:4 cuSPARSELt kernel us (x) | CUTLASS kernel us (x) "
             "| dense call us | cuSPARSELt call us (x) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        def cell(b, kind="_kernel"):
            key = b + kind
            return f"{r[key + '_us']:.1f} ({r[key + '_speedup']:.2f}x)" if key + "_us" in r else "error" if b + "_error" in r else "-"
        lines.append(f"| {r['model']} | {r['linear']} ({r['in']} -> {r['out']}) | {r['shape']} | {r['dense_kernel_us']:.1f} | "
                     f"{cell('cusparselt')} | {cell('cutlass')} | {r['dense_us']:.1f} | {cell('cusparselt', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/epts-gpu-check"))
    ap.add_argument("--skip", action="append", default=[], choices=["semi", "cuda", "ort"])
    ap.add_argument("--rehearse", action="store_true", help="part 3 only, on a tiny model and the CPU: a dry run")
    args = ap.parse_args(argv)
    import torch

    if args.rehearse:
        print(json.dumps(ort_cuda_bundle(args.work, rehearse=True), indent=1, default=str))
        return 0
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
              "python": platform.python_version()}
    print(f"GPU {report['gpu']}, torch {report['torch']} (CUDA {report['cuda']})", flush=True)
    parts = {"cuda": ("device.cuda (libcudart via ctypes)", cuda_module), "semi": ("2:4 semi-structured", semi_structured),
             "ort": ("elastic bundle on ONNX Runtime CUDA", lambda: ort_cuda_bundle(args.work))}
    for key, (title, fn) in parts.items():
        if key in args.skip:
            continue
        t0 = time.perf_counter()
        try:
            report[key] = fn()
        except Exception as e:
            report[key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-1500:]}
        report[key + "_s"] = round(time.perf_counter() - t0, 1)
        print(f"== {title} ({report[key + '_s']} s)", flush=True)
        if key == "semi" and "rows" in report[key]:
            print(table(report[key]["rows"]))
            print("\n".join(report[key]["notes"]))
        else:
            print(json.dumps(report[key], indent=1, default=str)[:3000])
        args.out.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
