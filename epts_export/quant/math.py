"""The INT8 arithmetic, in pure functions: one definition shared by the ONNX graph (``quant.qdq``)
and the PyTorch reference (``quant.fake``), so that the two quantize the same numbers alike.

- Weights: symmetric, per output channel, int8 in [-127, 127], zero point 0. A zero weight is an
  exact zero of its int8 tensor, so a pruned (or 2:4) pattern survives; a kept weight below half
  a step becomes a zero too (the int8 pattern has at least the float pattern's zeros).
- Activations: symmetric, per tensor, zero point 0 (what TensorRT's explicit quantization takes),
  the scale from the largest magnitude seen on the calibration set; values saturate to
  [-128, 127] as ONNX's QuantizeLinear does, and round half to even as it does.
- Smoothing (SmoothQuant): per input channel j of the linears that read one tensor,
  s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); X/s feeds W*s, the same product, with the
  activation's outlier channels moved into the weights.
"""

from __future__ import annotations

import torch

QMAX_WEIGHT = 127
QMIN_ACT, QMAX_ACT = -128, 127


def weight_scales(w_t: torch.Tensor) -> torch.Tensor:
    """Per output channel scales of ``w_t`` (in, out), float32 (out,); an all-zero column gets 1."""
    amax = w_t.float().abs().amax(dim=0)
    return torch.where(amax > 0, amax / QMAX_WEIGHT, torch.ones_like(amax))


def quantize_weight(w_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 (in, out), float32 scales (out,)) of a transposed weight ``w_t`` (in, out)."""
    scale = weight_scales(w_t)
    q = torch.round(w_t.float() / scale).clamp(-QMAX_WEIGHT, QMAX_WEIGHT).to(torch.int8)
    return q, scale


def act_scale(amax: float) -> float:
    """The per-tensor scale for activations whose largest magnitude is ``amax``."""
    return float(amax) / QMAX_ACT if amax > 0 else 1.0


def fake_quantize_act(x: torch.Tensor, scale: float) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear of ``x`` at ``scale`` (zero point 0), in float32."""
    s = torch.tensor(scale, dtype=torch.float32)
    return torch.clamp(torch.round(x.float() / s), QMIN_ACT, QMAX_ACT) * s


def smoothing_factors(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-channel factors s (C,) from max|X_j| and max|W_j| (both (C,)); s = 1 where
    either is zero (a channel that never fires or whose weights are all pruned)."""
    a, w = act_amax.float(), weight_amax.float()
    s = a.clamp(min=1e-8).pow(alpha) / w.clamp(min=1e-8).pow(1 - alpha)
    return torch.where((a > 0) & (w > 0), s.clamp(min=1e-5, max=1e5), torch.ones_like(s))
