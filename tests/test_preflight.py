"""The memory pre-flight of optimize: shapes from configs, numbers you can check by hand, the
streams decision, and a refusal that names the numbers and what to change."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import BUILDERS, tiny_llama, tiny_of_type
from epts_export.cli import app
from epts_export.errors import UserError
from epts_export.models.families import family_for, get_blocks, supported_types
from epts_export.pruning.preflight import GIB, RUNTIME, ModelShape, RunShape, activation_floats, fmt_bytes, plan

runner = CliRunner()
MIB = 1024**2
HUB = Path(__file__).parent / "data" / "hub_configs"  # published config.json values (SOURCES.md there)


def hub_config(repo: str) -> dict:
    return json.loads((HUB / f"{repo}.json").read_text())


def _tiny(model_type: str, **extra):
    if model_type in BUILDERS and not extra:
        return BUILDERS[model_type]()
    from transformers import AutoConfig, AutoModelForCausalLM

    base = tiny_of_type(model_type).config.to_dict()
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**base, **extra}))


CASES = [(t, {}) for t in supported_types()] + [
    ("llama", {"attention_bias": True, "mlp_bias": True}), ("llama", {"tie_word_embeddings": False}),
    ("qwen2", {"tie_word_embeddings": False}), ("opt", {"enable_bias": False, "word_embed_proj_dim": 32}),
]


@pytest.mark.parametrize("model_type, extra", CASES, ids=[f"{t}-{'-'.join(e) or 'plain'}" for t, e in CASES])
def test_config_shape_counts_the_real_parameters(model_type, extra):
    """Every supported model type: counted from config.json alone, the parameters are the model's
    own, whole and per block, and the prunable linears have the model's shapes."""
    model = _tiny(model_type, **extra)
    shape = ModelShape.from_config(model.config.to_dict())
    block = get_blocks(model, family_for(model))[0]
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.block_params == sum(p.numel() for p in block.parameters())
    assert shape.linears == tuple((n, *block.get_submodule(n).weight.shape) for n in family_for(model).prunable)


def test_public_configs_give_the_published_sizes():
    """Llama-3-8B has 8,030,261,248 parameters and Llama-2-70B 68,976,648,192 (their model cards'
    8B / 70B, exactly as the safetensors index files add up)."""
    assert ModelShape.from_config(hub_config("meta-llama--Meta-Llama-3-8B")).params == 8_030_261_248
    assert ModelShape.from_config(hub_config("meta-llama--Llama-2-70b-hf")).params == 68_976_648_192
    opt = ModelShape.from_config(hub_config("facebook--opt-66b"))
    assert 65.5e9 < opt.params < 66.5e9 and opt.num_blocks == 64


def test_unsupported_config_is_one_line():
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'"):
        ModelShape.from_config({"model_type": "gpt2", "hidden_size": 8})
    with pytest.raises(UserError, match="lacks a usable size"):
        ModelShape.from_config({"model_type": "llama", "hidden_size": 8})


def _tiny_llama_shape() -> ModelShape:
    return ModelShape.from_config(tiny_llama().config.to_dict())


def test_streams_and_model_by_hand():
    """hidden 64, 5 windows of 32 tokens over 2 ranks: rank 0 holds 3 windows, one stream is
    3 * 32 * 64 * 4 bytes = 24 KiB, EPTS keeps four on the CPU; the model is 90,432 float32s."""
    m = _tiny_llama_shape()
    p = plan(m, RunShape("epts", nsamples=5, seqlen=32, groups=8, rank=2, world=2, local_world=2))
    assert p.windows_per_rank == 3
    assert p.host["streams (3 windows x 32 tokens)"] == 4 * 3 * 32 * 64 * 4 == 96 * 1024
    assert p.host["model (float32)"] == 90_432 * 4
    assert p.host["runtime (torch, transformers)"] == RUNTIME
    assert p.host_per_machine == 2 * p.host_per_rank  # each process holds its own model
    assert p.device == {} and p.streams_on == "cpu"
    # adapters: 8 groups x rank 2 x sum(out + in) over q, k, v, o (64+64, 32+64, 32+64, 64+64), gate, up, down
    # (128+64 each): 448 + 576 = 1024, x 16 ranks = 16,384 params; x 4 tensors (param, grad, Adam m, v)
    # x 4 bytes, + the flat all-reduce buffer with 2 ranks
    assert m.adapter_params(8, 2) == 16 * 1024
    assert p.host["block: adapters, gradients, Adam"] == 5 * 4 * 16 * 1024
    # a baseline holds two streams (in, out), magnitude none
    assert plan(m, RunShape("wanda", 5, 32, world=2)).host["streams (3 windows x 32 tokens)"] == 2 * 24 * 1024
    assert plan(m, RunShape("magnitude", 5, 32)).host["streams (5 windows x 32 tokens)"] == 0


def test_activation_tally_by_hand():
    """Tiny LLaMA: C 64, q 64, kv 32, I 128: 6C + 3q + 2kv + 4I + 5C = 384+192+64+512+320 floats per
    token, plus 2 * heads * T for the attention probabilities when they are kept."""
    m = _tiny_llama_shape()
    assert activation_floats(m, 32, False) == 1472
    assert activation_floats(m, 32, True) == 1472 + 2 * 4 * 32


def test_streams_go_to_the_gpu_only_when_they_fit():
    m = _tiny_llama_shape()
    run = RunShape("epts", nsamples=8, seqlen=32, groups=8, rank=2, device="cuda")
    stream = 8 * 32 * 64 * 4
    work = sum(plan(m, dataclasses.replace(run, streams="cpu"), None, 10 * GIB).device.values())
    assert plan(m, run, None, work + 4 * stream).streams_on == "device"
    p = plan(m, run, None, work + 4 * stream - 1)
    assert p.streams_on == "cpu" and p.fits
    assert p.host["streams (8 windows x 32 tokens)"] == 4 * stream  # they moved to the host
    assert plan(m, run, None, None).streams_on == "cpu"  # unknown device memory: the safe side
    # forced placements are kept even when they do not fit, and then refused
    forced = plan(m, dataclasses.replace(run, streams="device"), None, work)
    assert forced.streams_on == "device" and not forced.fits
    assert "streams on the CPU (--streams cpu)" in forced.refusal()


def test_refusal_names_the_numbers_and_what_fits():
    """Host memory for 32 of the 64 windows: the refusal gives both totals and --nsamples 32."""
    m = _tiny_llama_shape()
    run = RunShape("epts", nsamples=64, seqlen=32, groups=8, rank=2)
    per_window = 4 * 32 * 64 * 4  # four streams
    full = plan(m, run).host_per_machine
    available = full - 32 * per_window
    p = plan(m, run, host_available=available)
    assert not p.fits
    msg = p.refusal()
    assert msg.startswith(f"optimize does not fit: host memory {fmt_bytes(full)} per machine")
    assert f"but {fmt_bytes(available)} is available" in msg
    assert "streams (64 windows x 32 tokens) 2.00 MiB" in msg  # 4 streams x 64 x 32 x 64 x 4 bytes
    assert "fewer windows (--nsamples 32)" in msg
    seqlen = int(msg.split("--seqlen ")[1].split(")")[0])  # the largest seqlen that fits, and no larger
    assert plan(m, dataclasses.replace(run, seqlen=seqlen), available).fits
    assert not plan(m, dataclasses.replace(run, seqlen=seqlen + 1), available).fits
    # the fewest ranks that fit: 2 would hold 32 windows each, but a second rank adds the flat
    # all-reduce buffer of the adapters' gradients (64 KiB here), so it takes 3
    ranks = int(msg.split("more ranks (")[1].split(",")[0])
    assert ranks == 3 and plan(m, dataclasses.replace(run, world=3), available).fits
    assert not plan(m, dataclasses.replace(run, world=2), available).fits
    # the weights alone do not fit: nothing to change but the machine
    assert "no smaller setting fits" in plan(m, run, host_available=RUNTIME).refusal()


def test_more_processes_per_machine_multiply_the_model():
    m = ModelShape.from_config(hub_config("meta-llama--Llama-2-70b-hf"))
    run = RunShape("epts", nsamples=128, seqlen=2048, groups=8, rank=8, world=8, local_world=8, device="cuda")
    p = plan(m, run, host_available=1024 * GIB, device_available=80 * GIB)
    assert p.host["model (float32)"] == 68_976_648_192 * 4  # 257 GiB, on each of the 8 processes
    assert not p.fits and not p.host_fits and p.device_fits
    assert "fewer processes per machine (--nproc-per-node 3, with more machines)" in p.refusal()


def test_cli_refuses_a_run_that_cannot_fit(tiny_dirs, text_file, tmp_path):
    out = tmp_path / "art"
    r = runner.invoke(app, ["optimize", str(tiny_dirs["llama"]), "--out", str(out), "--calib", str(text_file),
                            "--nsamples", "4", "--seqlen", "32", "--host-memory", "0.01", "-q"])
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    text = " ".join(r.output.split())
    assert text.startswith("error: optimize does not fit: host memory") and "but 10.24 MiB is available" in text
    assert "runtime (torch, transformers) 512.00 MiB" in text
    assert "Traceback" not in r.output and len(lines) <= 3  # one line, wrapped by the terminal width
    assert not out.exists() and not (tmp_path / "art.partial").exists()


def test_cli_dry_run_prints_the_estimate_and_writes_nothing(tiny_dirs, tmp_path):
    out = tmp_path / "art"
    r = runner.invoke(app, ["optimize", str(tiny_dirs["llama"]), "--out", str(out), "--nsamples", "4",
                            "--seqlen", "32", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "model (float32)" in r.output and "353.25 KiB" in r.output  # 90,432 x 4 bytes
    assert "on the CPU" in r.output and r.output.rstrip().endswith("fits")
    assert not out.exists() and not (tmp_path / "art.partial").exists()


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"], "no CUDA device is available here; use --device cpu"),
    (["--streams", "device"], "--streams device keeps the streams on the GPU: it needs --device cuda"),
    (["--streams", "disk"], "--streams must be one of auto, device, cpu"),
    (["--batch", "0"], "--epochs, --rank and --batch must be >= 1"),
    (["--host-memory", "-1"], "--host-memory must be a positive number of GiB"),
])
def test_bad_scale_flags_are_one_line(args, message, tiny_dirs, tmp_path):
    r = runner.invoke(app, ["optimize", str(tiny_dirs["llama"]), "--out", str(tmp_path / "a"), *args])
    assert r.exit_code == 1 and message in " ".join(r.output.split()), r.output
    assert "Traceback" not in r.output
