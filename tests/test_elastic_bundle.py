"""The elastic bundle: one copy of the weights for every level, switched in place on the device.

A tiny LLaMA big enough that graph protobufs do not dominate its bytes (hidden 128, vocabulary
2048: an LLM's embeddings are a large share of it), optimized for the six default levels.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import build_tokenizer, synthetic_text
from epts_export.core.levels import DEFAULT_LEVELS, parse_level, parse_levels
from epts_export.deploy.pipeline import BuildSpec, build
from epts_export.deploy.targets import targets_dir
from epts_export.device.ort import OrtDecoder, greedy
from epts_export.onnx.export import ExportSpec, export
from epts_export.pruning.calibration import CalibSpec
from epts_export.core.config import TrainConfig
from epts_export.pruning.optimize import OptimizeSpec, optimize

ONNX = (".onnx", ".onnx_data")


def onnx_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name.endswith(ONNX))


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("elastic")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                      pad_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).eval().save_pretrained(root / "model")
    build_tokenizer().save_pretrained(root / "model")
    (root / "calib.txt").write_text(synthetic_text(6000, seed=1))
    spec = OptimizeSpec(model=str(root / "model"), out=root / "art", levels=parse_levels(DEFAULT_LEVELS),
                        calib=CalibSpec(source=str(root / "calib.txt"), nsamples=4, seqlen=32, seed=0),
                        train=TrainConfig(rank=2, epochs=1, group_width=0.1))
    return optimize(spec)


def _target(tmp_path: Path, precision: str) -> Path:
    """The Jetson AGX Orin profile in another precision (a path target, as users pass their own)."""
    text = (targets_dir() / "jetson-orin.toml").read_text()
    out = tmp_path / f"orin-{precision}.toml"
    out.write_text(text.replace('precision = "fp16"', f'precision = "{precision}"')
                   .replace('name = "jetson-orin"', f'name = "orin-{precision}"').replace("aliases = [", "aliases = [] # ["))
    return out


def test_six_levels_in_at_most_1_3x_one_baked_level(art, tmp_path):
    """`build` writes one copy of the weights for 0.3-0.7 and 2:4 (the weight builder, the decoder and
    their tensors): at most 1.3x the ONNX bytes of ONE baked level of the same precision (fp16 here,
    as Jetson targets ship), where the baked layout holds six copies."""
    levels = parse_levels(DEFAULT_LEVELS)
    bundle = build(BuildSpec(source=str(art), target="jetson", out=tmp_path / "dist", levels=levels))
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["layout"] == "elastic" and m["onnx_bytes"]["total"] == onnx_bytes(bundle)
    baked = export(ExportSpec(artifact=art, out=tmp_path / "baked", mode="baked", levels=[parse_level("0.5")], dtype="fp16"))
    one = onnx_bytes(baked)
    ratio = m["onnx_bytes"]["total"] / one
    print(f"six levels {m['onnx_bytes']['total']} bytes, one baked level {one}: {ratio:.3f}x")
    assert ratio <= 1.3, f"{m['onnx_bytes']['total']} bytes for six levels, {one} for one baked level: {ratio:.3f}x"
    measured = [r["measured_sparsity"] for r in m["levels"]]
    assert [round(x, 2) for x in measured] == [0.3, 0.4, 0.5, 0.6, 0.7, 0.5]  # the built weights' zeros, per level


def test_run_py_switches_levels_from_one_load_with_the_baked_tokens(art, tmp_path):
    """run.py in an interpreter with only numpy, tokenizers and onnxruntime serves 0.3, 0.7 and 2:4
    from one load, switching in place (the switch time printed), and each level generates exactly
    the tokens of that level's baked export (fp32); a tampered weight builder or decoder is refused
    (exit 3) before anything loads."""
    bare = os.environ.get("EPTS_BARE_PYTHON")
    if not bare:
        pytest.skip("EPTS_BARE_PYTHON is not set: .ci/run points it at a venv with only numpy, tokenizers, onnxruntime")
    bundle = build(BuildSpec(source=str(art), target=str(_target(tmp_path, "fp32")), out=tmp_path / "dist",
                             levels=parse_levels(DEFAULT_LEVELS)))
    device = tmp_path / "device"
    shutil.copytree(bundle, device)
    prompt = "w1 w2 w3 w4 w5"
    res = subprocess.run([bare, str(device / "run.py"), "--level", "0.3,0.7,2:4", "--prompt", prompt, "--max-new-tokens",
                          "12"], capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert res.returncode == 0, res.stderr
    lines = res.stderr.strip().splitlines()
    assert "load" in lines[0] and "switch" in lines[1] and "switch" in lines[2], res.stderr
    baked = export(ExportSpec(artifact=art, out=tmp_path / "baked", mode="baked", levels=parse_levels("0.3,0.7,2:4")))
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(device / "model")(prompt)["input_ids"]
    wants = {}
    for line, (level, folder) in zip(lines, (("0.3", "level-0.3"), ("0.7", "level-0.7"), ("2:4", "level-2of4"))):
        dec = OrtDecoder(baked / folder / "model.onnx")
        want = greedy(dec.step, dec.empty_past(1), ids, 12, stop=2)
        assert f"level {level} on onnxruntime" in line and line.endswith(f"tokens {want}"), (level, line, want)
        wants[level] = want
    # a long generation gets a packed session (the default), or stays in place with --fast-switch:
    # the same tokens either way
    for flags, session in (([], "(packed)"), (["--fast-switch"], "(in place)")):
        res = subprocess.run([bare, str(device / "run.py"), "--level", "0.3,0.7", "--prompt", prompt, "--max-new-tokens",
                              "64", *flags], capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
        assert res.returncode == 0, res.stderr
        second = res.stderr.strip().splitlines()[1]
        assert session in second and "switch" in second, second
        assert second.split("tokens [")[1].startswith(str(wants["0.7"])[1:-1]), (second, wants["0.7"])
    for rel in ("model/weights.onnx", "model/decoder.onnx"):
        b = tmp_path / rel.replace("/", "-")
        shutil.copytree(bundle, b)
        with open(b / rel, "r+b") as f:
            f.seek(64)
            f.write(b"\0\0\0\0")
        res = subprocess.run([bare, str(b / "run.py"), "--level", "0.5", "--prompt", "w1"], capture_output=True, text=True)
        assert res.returncode == 3 and f"{rel} does not match its sha256" in res.stderr and "Traceback" not in res.stderr


def test_device_commands_refuse_bad_input_in_one_line(art, tmp_path):
    """build_engines.py bake/clean and run.py on an elastic bundle, as a careless user types them:
    a level the bundle lacks, a bake of a baked-layout bundle, a second clean; one line, no traceback."""
    bare = os.environ.get("EPTS_BARE_PYTHON")
    if not bare:
        pytest.skip("EPTS_BARE_PYTHON is not set: .ci/run points it at a venv with only numpy, tokenizers, onnxruntime")
    bundle = build(BuildSpec(source=str(art), target="jetson", out=tmp_path / "dist", levels=parse_levels("0.5,2:4")))

    def run(script, *argv):
        return subprocess.run([bare, str(bundle / script), *argv], capture_output=True, text=True, cwd=tmp_path)

    res = run("build_engines.py", "bake", "0.9")
    assert res.returncode == 1 and res.stderr.strip() == "error: level 0.9 is not in the weight builder's table (0.5, 2:4)"
    res = run("build_engines.py", "bake", "2:4")
    assert res.returncode == 0 and (bundle / "model" / "decoder.weights").stat().st_size > 0
    assert subprocess.run([bare, "-c", "import onnxruntime as o, sys; o.InferenceSession(sys.argv[1])",
                           str(bundle / "model" / "decoder.onnx")], capture_output=True).returncode == 0  # a plain graph now
    for _ in range(2):
        assert run("build_engines.py", "clean").returncode == 0
    assert (bundle / "model" / "decoder.weights").stat().st_size == 0
    res = run("run.py", "--level", "0.9", "--prompt", "w1")
    assert res.returncode == 1 and "level 0.9 is not in bundle" in res.stderr and "Traceback" not in res.stderr
    baked = build(BuildSpec(source=str(art), target="jetson", out=tmp_path / "baked", levels=parse_levels("0.5"),
                            layout="baked"))
    res = subprocess.run([bare, str(baked / "build_engines.py"), "bake", "0.5"], capture_output=True, text=True)
    assert res.returncode == 1 and "holds one graph per level: there are no weights to bake" in res.stderr
