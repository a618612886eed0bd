"""``genai_config.json``: what ONNX Runtime GenAI (``onnxruntime-genai``) needs to run an exported
level, written beside every graph (export folders and bundles).

    import onnxruntime_genai as og
    model = og.Model("onnx/smol/level-0.5")          # reads genai_config.json + tokenizer.json
    tokenizer = og.Tokenizer(model)

Constraints of our graphs, checked against onnxruntime-genai 0.18 on CPU:
- ``past_present_share_buffer`` must be false: each step's ``present.*`` has past + new tokens
  (GenAI's shared buffer needs graphs that write into a max-length cache in place);
- the model ``type`` must be one GenAI knows; ``llama`` drives every decoder with our interface
  (OPT included: GenAI's own ``opt`` type is rejected by 0.18), since the graph, not the type,
  holds the architecture;
- a dynamic graph takes its level with ``generator.set_model_input("sparsity_level", ...)``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..fsutil import write_text
from ..device.interface import GRAPH_FILE, KVLayout, io_names

GENAI_CONFIG = "genai_config.json"
PROVIDERS = ("cpu", "cuda")


def genai_config(config, provider: str = "cpu", graph: str = GRAPH_FILE) -> dict:
    """The genai_config.json of one exported decoder of a Hugging Face ``config``; ``provider``
    "cuda" adds CUDA provider options (GPU targets and Jetson), "cpu" runs on ONNX Runtime's CPU."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider {provider!r}: one of {', '.join(PROVIDERS)}")
    kv = KVLayout.from_config(config)
    eos = config.eos_token_id
    context = int(getattr(config, "max_position_embeddings", 2048))
    _, outputs = io_names(kv.layers)
    return {
        "model": {
            "type": "llama",
            "bos_token_id": config.bos_token_id if config.bos_token_id is not None else eos,
            "eos_token_id": eos,
            "pad_token_id": config.pad_token_id if config.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos),
            "vocab_size": config.vocab_size,
            "context_length": context,
            "decoder": {
                "filename": graph,
                "session_options": {"log_id": "onnxruntime-genai",
                                    "provider_options": [{"cuda": {}}] if provider == "cuda" else []},
                "head_size": kv.head_dim,
                "hidden_size": config.hidden_size,
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": kv.layers,
                "num_key_value_heads": kv.kv_heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": outputs[0], "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context,
                   "min_length": 0, "temperature": 1.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0,
                   "length_penalty": 1.0, "no_repeat_ngram_size": 0, "early_stopping": True, "diversity_penalty": 0.0,
                   "past_present_share_buffer": False},
    }


def write_genai_config(config, folder: Path, provider: str = "cpu") -> Path:
    path = Path(folder) / GENAI_CONFIG
    write_text(path, json.dumps(genai_config(config, provider), indent=2) + "\n")
    return path
