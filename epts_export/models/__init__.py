"""The causal LMs epts-export works on: finding them, converting them, loading them.

- ``families.py``: model families, i.e. where the transformer blocks are and which linears are prunable;
- ``resolve.py``: a model name (folder, ``.gguf`` file, builtin name, hub id) -> a local Hugging Face
  folder, with the cache of converted folders (:func:`resolve_model`, :func:`cache_dir`);
- ``gguf.py``: a GGUF file -> a verified plain float32 Hugging Face folder;
- ``hf.py``: loading such a folder (:func:`load_model`) and saving tokenizers (:func:`save_tokenizer`).

The names re-exported here import neither torch nor transformers until they are called.
"""

from .hf import load_model, save_tokenizer
from .resolve import cache_dir, resolve_model

__all__ = ["cache_dir", "load_model", "resolve_model", "save_tokenizer"]
