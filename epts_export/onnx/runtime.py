"""Run an exported decoder step by step, in ONNX Runtime or as its PyTorch reference, with one
greedy loop for both so that parity compares the graphs and nothing else.

numpy and onnxruntime only at import (torch only inside ``TorchDecoder``): a copy of this module
runs in the bundle's standalone runner, on devices without torch."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import UserError

# step(input_ids, attention_mask, position_ids, past) -> (logits (B, S, V) float32, presents [2 * layers])
StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]], tuple[np.ndarray, list[np.ndarray]]]


class OrtDecoder:
    """An ONNX Runtime session over one exported graph. ``level`` is the ``sparsity_level`` fed to
    a dynamic graph (ignored by a baked one)."""

    def __init__(self, path: str | Path, level: int | None = None, threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",), profile_prefix: str | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if profile_prefix:  # ORT's per-node profile; session.end_profiling() returns its file
            opts.enable_profiling = True
            opts.profile_file_prefix = profile_prefix
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
            raise UserError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:300]}") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]
        first = self.inputs[self.past_names[0]]
        self.past_dtype = np.float16 if first.type == "tensor(float16)" else np.float32
        self.kv_heads, self.head_dim = first.shape[1], first.shape[3]
        self.dynamic = "sparsity_level" in self.inputs
        self.level = level
        if self.dynamic and level is None:
            raise UserError(f"{path} is a dynamic-mode graph: pass the level index to run")

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), self.past_dtype) for _ in self.past_names]

    def step(self, input_ids, attention_mask, position_ids, past):
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                 "position_ids": position_ids.astype(np.int64)}
        feeds.update({n: p.astype(self.past_dtype, copy=False) for n, p in zip(self.past_names, past)})
        if self.dynamic:
            feeds["sparsity_level"] = np.array(self.level, dtype=np.int64)
        outs = self.session.run(None, feeds)
        return outs[0], list(outs[1:])


class TorchDecoder:
    """The PyTorch reference: the same DecoderWithPast wrapper that export traces, in float32."""

    def __init__(self, model):
        from ..interface import KVLayout
        from .trace import DecoderWithPast

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


def positions(attention_mask: np.ndarray, past_len: int) -> np.ndarray:
    """position_ids for the new tokens from a (left-padded) attention mask: cumsum - 1, pads at 1
    (optimum's rule for LLaMA; OPT adds its own offset inside the model)."""
    pos = np.cumsum(attention_mask, axis=1) - 1
    pos = np.where(attention_mask == 0, 1, pos)
    return pos[:, past_len:]


def greedy(step: StepFn, empty_past: list[np.ndarray], prompt: Sequence[int], new_tokens: int,
           on_token: Callable[[int], None] | None = None, stop: int | None = None) -> list[int]:
    """Greedy decoding of up to ``new_tokens`` tokens for one prompt with a KV cache: one
    prefill step, then one step per token; ends early after the token ``stop`` (e.g. EOS)."""
    ids = np.array([list(prompt)], dtype=np.int64)
    mask = np.ones_like(ids)
    past = empty_past
    out: list[int] = []
    feed = ids
    for _ in range(new_tokens):
        past_len = mask.shape[1] - feed.shape[1]
        logits, past = step(feed, mask, positions(mask, past_len), past)
        tok = int(np.argmax(logits[0, -1]))
        out.append(tok)
        if on_token:
            on_token(tok)
        if stop is not None and tok == stop:
            break
        feed = np.array([[tok]], dtype=np.int64)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
    return out
