"""Comparing a decoder's outputs with a reference's: the tolerances per dtype and the checks that
`validate`, TensorRT parity and the device's refit check all apply (numpy only: it ships in bundles).

Element-wise outputs pass when |got - ref| <= atol + rtol * |ref| (numpy.allclose), with an
optional bound on the mean error; a result also gives the smallest atol that would have passed
at that rtol, as Polygraphy does. A top-1 disagreement fails only where the reference's own margin
between the two tokens exceeds the logits atol (else it is a tie the dtype cannot resolve).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class Tol:
    atol: float  # element-wise: |got - ref| <= atol + rtol * |ref| everywhere
    rtol: float
    mean_atol: float | None = None  # and, if set, mean |got - ref| <= mean_atol

    def to_dict(self) -> dict:
        return {"atol": self.atol, "rtol": self.rtol, **({"mean_atol": self.mean_atol} if self.mean_atol is not None else {})}


# fp32: set from a float64 reference. On SmolLM2-135M at 0.7, one prefill position carries
# massive activations: PyTorch fp32 is 6.2e-3 off float64 there and ONNX Runtime 3.5e-3, so
# fp32 implementations legitimately differ by ~1e-2 on such logits (~1e-4 elsewhere).
# fp16: float16 weights and activations against the float32 reference (ORT's CPU provider runs
# fp16 graphs through inserted casts, TensorRT in fp16 tensor cores; both round the same weights).
TOLERANCES = {
    "fp32": {"logits": Tol(2e-2, 1e-3), "present": Tol(1e-3, 1e-3)},
    "fp16": {"logits": Tol(5.0, 0.02, mean_atol=0.25), "present": Tol(1.0, 0.02, mean_atol=0.05)},
    "int8": {"logits": Tol(16.0, 0.02, mean_atol=1.2), "present": Tol(15.0, 0.02, mean_atol=0.2)},
}
# int8: the graph against the fake-quantized reference with the same scales (``quant.fake``). The
# two agree exactly until one activation lies within float32 noise of a rounding boundary and
# rounds the other way: one step of that tensor's scale, and where the scale is large (a
# massive-activation channel) every later position of the sequence moves. On SmolLM2-135M (six
# levels, alpha 0.85) prefills stay exact up to such a flip and then differ by up to 8.1 in a logit
# (mean 0.60) and 7.2 in a present (mean 0.085); decodes mostly by 0 (worst 2.2, mean 0.22); the
# bounds are twice the worst. They catch NaNs and gross errors, not a wrong scale: that is the
# exact ``int8`` check (``quant.qdq.check_quantized``: the int8 weights, weight and activation
# scales and the Q/DQ placement equal the reference's), with the top-1 and token rules as for fp16.
# fp16 element-wise maxima are heavy-tailed: the residual stream at a massive-activation
# position runs in the thousands, where float16's spacing is 1-2. On SmolLM2-135M (4 levels,
# baked and dynamic) the worst prefill logit is 2.5 off the float32 reference and the worst
# present 0.62, while the mean errors are at most 0.067 and 0.011; hence loose maxima plus mean
# bounds. The gate that matters there is top-1 (no disagreement beyond a tie) and the tokens.


def compare_arrays(got: np.ndarray, ref: np.ndarray, tol: Tol, valid: np.ndarray | None) -> dict:
    """Element-wise comparison over the valid positions. valid: bool (batch, seq) for logits, or
    (batch, seq) over the key positions for presents."""
    g, r = got.astype(np.float64), ref.astype(np.float64)
    if valid is not None:  # logits (B, S, V): mask (B, S); present (B, H, T, D): mask (B, T)
        sel = valid[:, :, None] if g.ndim == 3 else valid[:, None, :, None]
        sel = np.broadcast_to(sel, g.shape)
        g, r = g[sel], r[sel]
    if g.shape != r.shape:
        return {"max_abs": None, "max_rel": None, "required_atol": None, **tol.to_dict(), "passed": False,
                "error": f"shape {got.shape} vs reference {ref.shape}"}
    if g.size == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "required_atol": 0.0, **tol.to_dict(), "passed": True}
    diff = np.abs(g - r)
    finite = bool(np.isfinite(g).all())
    max_abs = float(diff.max()) if finite else float("inf")
    max_rel = float((diff / np.maximum(np.abs(r), 1e-12)).max()) if finite else float("inf")
    required = float(max(0.0, (diff - tol.rtol * np.abs(r)).max())) if finite else float("inf")
    mean_abs = float(diff.mean()) if finite else float("inf")
    passed = finite and required <= tol.atol and (tol.mean_atol is None or mean_abs <= tol.mean_atol)
    return {"max_abs": max_abs, "max_rel": max_rel, "mean_abs": mean_abs, "required_atol": required, **tol.to_dict(),
            "passed": passed}


def top1(got_logits: np.ndarray, ref_logits: np.ndarray, valid: np.ndarray, atol: float) -> dict:
    g, r = got_logits[valid], ref_logits[valid]  # (N, V)
    ga, ra = g.argmax(-1), r.argmax(-1)
    agree = ga == ra
    rows = np.arange(len(r))
    margin = r[rows, ra] - r[rows, ga]  # how much the reference prefers its token
    hard = int((~agree & (margin > atol)).sum())
    return {"top1_agreement": float(agree.mean()) if len(agree) else 1.0, "positions": int(len(agree)),
            "top1_failures": hard}


def step_check(ref_out, got_out, tols, valid_q: np.ndarray, valid_k: np.ndarray, output_names) -> dict:
    outputs = {}
    (rl, rp), (gl, gp) = ref_out, got_out
    outputs[output_names[0]] = compare_arrays(gl, rl, tols["logits"], valid_q)
    for n, g, r in zip(output_names[1:], gp, rp):
        outputs[n] = compare_arrays(g, r, tols["present"], valid_k)
    top = top1(gl, rl, valid_q, tols["logits"].atol)
    passed = all(o["passed"] for o in outputs.values()) and top["top1_failures"] == 0
    worst = max(outputs.items(), key=lambda kv: (kv[1]["required_atol"] if kv[1]["required_atol"] is not None else np.inf)
                / max(kv[1]["atol"], 1e-12))
    return {"passed": passed, **top, "worst_output": worst[0], "outputs": outputs}


def between_runtimes(dtype: str) -> dict[str, Tol]:
    """Tolerances for two runtimes compared with each other (TensorRT against ONNX Runtime on the
    device), each within ``TOLERANCES[dtype]`` of the float32 reference: twice each bound, since
    |a - b| <= |a - ref| + |ref - b|."""
    return {k: replace(t, atol=2 * t.atol, rtol=2 * t.rtol, mean_atol=None if t.mean_atol is None else 2 * t.mean_atol)
            for k, t in TOLERANCES[dtype].items()}
