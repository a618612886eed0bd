"""One llm-compressor one-shot run, inside llm-compressor's own venv (see benchmarks/peers.py,
which builds the calibration windows, starts this script and evaluates what it writes).

Imports only what that venv has (torch, transformers, datasets, safetensors, llmcompressor), never
epts_export. Writes OUT/ as a plain Hugging Face folder: the dense folder's config and tokenizer
files and a model.safetensors with the dense file's tensor names (zeros in place), so that any
transformers loads it without compressed-tensors. Prints one JSON line: the wall time of the
one-shot call, the sha256 of the windows it saw and, for OWL, the per-layer sparsities.

    <llmc venv>/bin/python benchmarks/peer_worker.py --model DENSE_DIR --windows W.safetensors \
        --method sparsegpt --level 0.5 [--owl 5,0.08] --out OUT

OWL in llmcompressor 0.14.0.1 does not run as shipped (../shared/docs/llm-compressor-notes.md):
its statistics pass fires lifecycle events before the session is initialized, and its per-layer
sparsities come back as a dict that neither target form accepts. ``--owl`` applies the workaround
those notes describe: the statistics pass runs the same forward loop without the events, the
targets are the decoder layers, and the dict goes on as a list in target order. llm-compressor's
OWL arithmetic (its scores, M, lambda, ratios) is untouched.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import time
from pathlib import Path

import torch

OWL_SPARSITIES: dict = {}  # what llm-compressor's OWL chose per decoder layer (its modifiers are pydantic models)
COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
        "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


def _owl_workaround() -> None:
    import llmcompressor.pipelines.basic as basic
    from llmcompressor.modifiers.pruning.sparsegpt import sgpt_base
    from llmcompressor.utils.helpers import calibration_forward_context

    def run_calibration(model, dataloader):  # the BasicPipeline's loop, without LifecycleCallbacks
        with calibration_forward_context(model), torch.no_grad():
            for batch in dataloader:
                model(**{k: v.to(next(model.parameters()).device) for k, v in batch.items()})

    basic.run_calibration = run_calibration
    infer = sgpt_base.SparsityModifierBase._infer_owl_layer_sparsity

    def as_list(self, model, layers, dataloader):
        per_layer = infer(self, model, layers, dataloader)
        OWL_SPARSITIES.update(per_layer)
        return [per_layer[name] for name in layers]

    sgpt_base.SparsityModifierBase._infer_owl_layer_sparsity = as_list


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--windows", type=Path, required=True)
    ap.add_argument("--method", choices=("sparsegpt", "wanda"), required=True)
    ap.add_argument("--level", required=True, help="0.5 or 2:4")
    ap.add_argument("--owl", default=None, help="M,LAMBDA (the OWL paper: 5,0.08)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    ids = load_file(str(args.windows))["input_ids"]  # (N, T) int64, built by benchmarks/peers.py
    windows_sha = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    nm = ":" in args.level
    kw = dict(sparsity=0.5 if nm else float(args.level), mask_structure=args.level if nm else "0:0",
              targets=["Linear"], ignore=["re:.*lm_head"])
    if args.owl:
        m, lam = (float(x) for x in args.owl.split(","))
        _owl_workaround()
        kw.update(sparsity_profile="owl", owl_m=int(m), owl_lmbda=lam, targets=[r"re:model\.layers\.\d+$"])
    modifier = (SparseGPTModifier if args.method == "sparsegpt" else WandaPruningModifier)(**kw)
    t0 = time.time()
    oneshot(model=model, dataset=ds, recipe=modifier, num_calibration_samples=len(ids), max_seq_length=ids.shape[1],
            shuffle_calibration_samples=False, pipeline="sequential")
    seconds = time.time() - t0

    dense_file = args.model / "model.safetensors"
    with safe_open(str(dense_file), "pt") as f:
        names = list(f.keys())
    state = model.state_dict()
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: state[n].detach().contiguous().clone() for n in names}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    for name in COPY:
        if (args.model / name).exists():
            shutil.copy2(args.model / name, tmp / name)
    owl = OWL_SPARSITIES
    record = {"method": args.method, "level": args.level, "owl": args.owl, "seconds": round(seconds, 1),
              "windows_sha256": windows_sha, "windows": list(ids.shape),
              **({"owl_sparsities": {k: round(float(v), 5) for k, v in owl.items()}} if owl else {})}
    (tmp / "peer.json").write_text(json.dumps(record, indent=1) + "\n")
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(args.out)
    tmp.rename(args.out)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
