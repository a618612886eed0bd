"""Tiny random LLaMA and OPT models, a tokenizer trained in-process, synthetic text, the shared
artifacts and exports of the tiny models, and the TensorRT fixtures (``api``, ``install``).

Everything is built here in seconds; no hub, no downloads. Sizes keep every prunable
in_features divisible by 4 (2:4 levels) and small enough for CPU tests.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch

import trt_api
import trt_bindings
from trt_fakes import PROBED, surface_or_skip

VOCAB_WORDS = [f"w{i}" for i in range(200)]


def synthetic_text(n_words: int, seed: int = 0) -> str:
    """Text with some structure (a Markov chain over 200 words) so models have something to learn."""
    rng = random.Random(seed)
    nxt = {w: rng.sample(VOCAB_WORDS, 5) for w in VOCAB_WORDS}
    w, out = VOCAB_WORDS[0], []
    for i in range(n_words):
        out.append(w)
        w = rng.choice(nxt[w])
        if i % 17 == 16:
            out.append(".\n")
    return " ".join(out)


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, ".": 3}
    for w in VOCAB_WORDS:
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                      pad_token_id=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=256, word_embed_proj_dim=64, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return OPTForCausalLM(cfg).eval()


def tiny_of_type(model_type: str):
    """A tiny random model of any LLaMA-family model type (same shapes as tiny_llama)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                               bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
                               sliding_window=None, use_sliding_window=False)
    return AutoModelForCausalLM.from_config(cfg).eval()


BUILDERS = {"llama": tiny_llama, "opt": tiny_opt}
# every other supported model type (families.py) gets a tiny model of its own in test_pipeline.py
OTHER_TYPES = ("mistral", "qwen2", "qwen3")


def save_tiny(family: str, dest: Path) -> Path:
    model = BUILDERS[family]()
    model.save_pretrained(dest)
    build_tokenizer().save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {fam: save_tiny(fam, root / fam) for fam in BUILDERS}


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "calib.txt"
    p.write_text(synthetic_text(6000, seed=1))
    return p


@pytest.fixture(scope="session")
def eval_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "eval.txt"
    p.write_text(synthetic_text(3000, seed=2))
    return p


LEVELS = "0.3,0.5,0.7,2:4"  # what the shared tiny artifacts are trained for


def spec_for(model_dir, out, calib, method="epts", levels=LEVELS, **kw):
    """An optimize spec for a tiny model: 4 x 32 tokens of ``calib``, rank 2, one epoch (seconds)."""
    from epts_export.core.config import TrainConfig
    from epts_export.core.levels import parse_levels
    from epts_export.pruning.calibration import CalibSpec
    from epts_export.pruning.optimize import OptimizeSpec

    return OptimizeSpec(model=str(model_dir), out=out, levels=parse_levels(levels), method=method,
                        calib=CalibSpec(source=str(calib), nsamples=4, seqlen=32, seed=0),
                        train=TrainConfig(rank=2, epochs=1), **kw)


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_dirs, text_file, tmp_path_factory) -> dict[str, Path]:
    """family -> an EPTS artifact of the tiny model for LEVELS, shared by every test (read only:
    copy one to change it)."""
    from epts_export.pruning.optimize import optimize

    root = tmp_path_factory.mktemp("artifacts")
    return {fam: optimize(spec_for(d, root / fam, text_file)) for fam, d in tiny_dirs.items()}


@pytest.fixture(scope="session")
def exports(tiny_artifacts, tmp_path_factory):
    """exports(family, mode="baked", dtype="fp32", levels=LEVELS) -> an export folder of the shared
    artifact, made on first use and shared by every test (read only)."""
    from epts_export.core.levels import parse_levels
    from epts_export.onnx.export import ExportSpec, export

    root = tmp_path_factory.mktemp("exports")
    cache: dict = {}

    def get(fam, mode="baked", dtype="fp32", levels=LEVELS):
        key = (fam, mode, dtype, levels)
        if key not in cache:
            name = f"{fam}-{mode}-{dtype}-{levels.replace(',', '_').replace(':', 'of')}"
            cache[key] = export(ExportSpec(artifact=tiny_artifacts[fam], out=root / name, mode=mode,
                                           levels=parse_levels(levels), dtype=dtype))
        return cache[key]

    return get


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's cache from tests."""
    monkeypatch.setenv("EPTS_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------------------------
# TensorRT: the real API of each version (tests/trt_bindings.py), a fake held to it (tests/trt_api.py)


@pytest.fixture(params=list(trt_bindings.VERSIONS))
def api(request) -> trt_api.Api:
    """The real API of one TensorRT version (a fresh record of misses and violations per test)."""
    return trt_api.Api(surface_or_skip(request.param))


@pytest.fixture
def install(api, monkeypatch):
    """install(fake) puts ``fake``, checked against ``api``, in sys.modules as ``tensorrt`` and
    returns ``fake`` (its records); after the test, no violation and no unexpected missing name."""
    def put(fake):
        monkeypatch.setitem(sys.modules, "tensorrt", trt_api.checked(api, fake))
        monkeypatch.setitem(sys.modules, "tensorrt_bindings", None)
        return fake

    yield put
    api.assert_clean(PROBED)


@pytest.fixture
def replaces(monkeypatch):
    """Record os.replace calls (src, dst) while keeping their effect."""
    calls = []
    real = os.replace

    def spy(src, dst):
        calls.append((Path(src), Path(dst)))
        return real(src, dst)

    from epts_export.device import files

    monkeypatch.setattr(files.os, "replace", spy)
    return calls
