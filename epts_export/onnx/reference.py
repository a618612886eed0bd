"""The PyTorch reference decoder: the graph's interface (``device.ort``'s ``step``/``empty_past``)
over the same ``DecoderWithPast`` wrapper that export traces, so that parity and the ONNX Runtime
and TensorRT decoders are driven by one greedy loop."""

from __future__ import annotations

import numpy as np

from ..device.interface import KVLayout
from .trace import DecoderWithPast


class TorchDecoder:
    """The PyTorch reference: the same DecoderWithPast wrapper that export traces, in float32."""

    def __init__(self, model):
        self.module = DecoderWithPast(model).eval()
        geo = KVLayout.from_config(model.config)
        self.kv_heads, self.head_dim, self.layers = geo.kv_heads, geo.head_dim, geo.layers
        self.dtype = next(model.parameters()).dtype

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in range(2 * self.layers)]

    def step(self, input_ids, attention_mask, position_ids, past):
        import torch

        t = [torch.from_numpy(np.ascontiguousarray(x)).long() for x in (input_ids, attention_mask, position_ids)]
        kv = [torch.from_numpy(np.ascontiguousarray(p)).to(self.dtype) for p in past]
        with torch.no_grad():
            logits, *presents = self.module(*t, *kv)
        return logits.float().numpy(), [p.float().numpy() for p in presents]
