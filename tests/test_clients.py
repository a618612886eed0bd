"""Artifacts read correctly in the clients users have: transformers 4.x and 5.x, ONNX Runtime GenAI,
another user's account, and a device with neither torch nor transformers (the bundle's run.py)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import BUILDERS, build_tokenizer
from epts_export.cli import app
from epts_export.core.levels import parse_level, parse_levels
from epts_export.deploy.pipeline import BuildSpec, build
from epts_export.device.runner import generate
from epts_export.onnx.export import ExportSpec, export
from epts_export.device.ort import OrtDecoder, greedy, positions

FIXTURE = Path(__file__).parent / "data" / "written-by-transformers5"
runner = CliRunner()


@pytest.fixture(scope="module")
def arts(tiny_artifacts):
    return tiny_artifacts


# --------------------------------------------------------------------------------------------
# transformers 4.x reads what transformers 5 wrote


def _rope_model(config) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_a_config_written_by_transformers5_reads_the_same_here():
    """tests/data/written-by-transformers5/config.json was written by epts_export.models.hf.save_config
    under transformers 5.24 for a LLaMA with rope_theta 100000 (SmolLM2's). transformers 5 writes it
    only in rope_parameters; 4.57 then fell back to 10000 and generated other tokens, silently."""
    from transformers import AutoConfig, LlamaConfig

    written = json.loads((FIXTURE / "config.json").read_text())
    assert written["transformers_version"].startswith("5.") and written["rope_parameters"]["rope_theta"] == 100000.0
    loaded = AutoConfig.from_pretrained(FIXTURE)
    native = LlamaConfig(**{k: v for k, v in written.items() if k not in ("rope_parameters", "rope_scaling",
                                                                          "transformers_version", "model_type")})
    a, b = _rope_model(loaded), _rope_model(native)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.model.rotary_emb.inv_freq, b.model.rotary_emb.inv_freq)
    theta_10k = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    assert not torch.allclose(a.model.rotary_emb.inv_freq, theta_10k)  # 100000, not the 4.x default
    ids = torch.tensor([[5, 9, 17, 33, 65, 129, 7, 3]])
    ga = a.generate(input_ids=ids, max_new_tokens=24, do_sample=False, pad_token_id=2)
    gb = b.generate(input_ids=ids, max_new_tokens=24, do_sample=False, pad_token_id=2)
    assert ga.tolist() == gb.tolist()


def test_materialized_folder_for_every_reader(arts, tmp_path):
    """materialize: top-level rope_theta next to rope_parameters, and a tokenizer whose output
    model.generate(**tok(...)) accepts (no token_type_ids) in transformers 4.57 and 5.x."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = runner.invoke(app, ["materialize", str(arts["llama"]), "--level", "0.5", "--out", str(tmp_path / "m"), "-q"])
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    want = getattr(model.config, "rope_theta", None) or model.config.rope_parameters["rope_theta"]
    assert config["rope_theta"] == want
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    enc = tok("w1 w2 w3", return_tensors="pt")
    assert set(enc) == {"input_ids", "attention_mask"}
    assert model.generate(**enc, max_new_tokens=3, do_sample=False).shape[1] == enc["input_ids"].shape[1] + 3


def test_every_written_file_is_readable_by_another_user(arts, tmp_path):
    """onnx writes model.onnx_data 0600; a bundle copied to a device for another user must stay readable."""
    old = os.umask(0o022)
    try:
        out = export(ExportSpec(artifact=arts["opt"], out=tmp_path / "x", levels=parse_levels("0.5"), external_data="always"))
    finally:
        os.umask(old)
    data = out / "level-0.5" / "model.onnx_data"
    assert data.is_file()
    for p in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))


# --------------------------------------------------------------------------------------------
# ONNX Runtime GenAI


def _genai_run(folder: Path, ids: list[int], new: int, level_index: int | None = None):
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new, do_sample=False)
    gen = og.Generator(model, params)
    if level_index is not None:
        gen.set_model_input("sparsity_level", np.array(level_index, dtype=np.int64))
    gen.append_tokens(np.array([ids], dtype=np.int32))
    first = np.asarray(gen.get_output("logits")).reshape(1, len(ids), -1)
    tokens = []
    while not gen.is_done() and len(tokens) < new:
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return first, tokens


@pytest.mark.parametrize("fam", list(BUILDERS))
@pytest.mark.parametrize("level", ["0.5", "2:4"])
def test_genai_runs_every_level_like_our_runtime(exports, fam, level):
    lv = parse_level(level)
    ids = build_tokenizer()("w1 w2 w3 w4 w5 w6")["input_ids"]
    for key, index in (("baked", None), ("dynamic", [parse_level("0.5"), parse_level("2:4")].index(lv))):
        folder = exports(fam, key, levels="0.5,2:4") / ("level-" + lv.name.replace(":", "of") if index is None else "")
        conf = json.loads((folder / "genai_config.json").read_text())
        assert conf["search"]["past_present_share_buffer"] is False and conf["model"]["type"] == "llama"
        logits, tokens = _genai_run(folder, ids, 12, index)
        dec = OrtDecoder(folder / "model.onnx", level=index)
        x = np.array([ids])
        mask = np.ones_like(x)
        ref, _ = dec.step(x, mask, positions(mask, 0), dec.empty_past(1))
        assert np.allclose(logits, ref, atol=1e-4), key
        want = greedy(dec.step, dec.empty_past(1), ids, 12, stop=2)
        assert tokens == want[:len(tokens)] and len(tokens) == len(want), key


# --------------------------------------------------------------------------------------------
# the bundle's standalone runner, without torch and transformers


@pytest.fixture(scope="module")
def bundle(arts, tmp_path_factory):
    """An elastic Jetson bundle (the default): one copy of the weights for 0.3, 0.5 and 2:4."""
    out = tmp_path_factory.mktemp("client-dist")
    return build(BuildSpec(source=str(arts["llama"]), target="jetson", out=out, levels=parse_levels("0.3,0.5,2:4")))


@pytest.fixture(scope="module")
def baked_bundle(arts, tmp_path_factory):
    out = tmp_path_factory.mktemp("client-dist-baked")
    return build(BuildSpec(source=str(arts["llama"]), target="jetson", out=out, levels=parse_levels("0.5,2:4"), layout="baked"))


def test_baked_bundle_genai_config_runs_on_cuda(baked_bundle):
    m = json.loads((baked_bundle / "manifest.json").read_text())
    assert m["layout"] == "baked"
    for rec in m["levels"]:
        conf = json.loads((baked_bundle / rec["dir"] / "genai_config.json").read_text())
        assert conf["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]
        assert f"{rec['dir']}/genai_config.json" in m["files"]


def _bare_python() -> str:
    bare = os.environ.get("EPTS_BARE_PYTHON")
    if not bare:
        pytest.skip("EPTS_BARE_PYTHON is not set: .ci/run points it at a venv with only numpy, tokenizers, onnxruntime")
    return bare


def test_standalone_runner_needs_neither_torch_nor_transformers(bundle, tmp_path):
    bare = _bare_python()
    probe = subprocess.run([bare, "-c", "import torch"], capture_output=True, text=True)
    assert probe.returncode != 0, "the bare interpreter must not have torch"
    probe = subprocess.run([bare, "-c", "import transformers"], capture_output=True, text=True)
    assert probe.returncode != 0, "the bare interpreter must not have transformers"
    moved = tmp_path / "device" / "bundle"
    shutil.copytree(bundle, moved)  # the bundle runs from wherever it was copied to
    r = subprocess.run([bare, str(moved / "run.py"), "--level", "0.3,0.5,2:4", "--prompt", "w1 w2 w3", "--max-new-tokens", "8"],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 3 and "load" in lines[0] and all("switch" in x for x in lines[1:]), r.stderr  # one load, two switches
    for level, line, text in zip(("0.3", "0.5", "2:4"), lines, r.stdout.split("\n")):
        ours = generate(bundle, parse_level(level), "w1 w2 w3", 8)
        assert text == ours["text"] and f"tokens {ours['tokens']}" in line and "onnxruntime" in line, (level, r.stderr)
    assert not list(moved.rglob("__pycache__"))  # nothing unhashed appears in the bundle
    # the copy holds every module run.py can reach, the TensorRT path's too
    code = (f"import sys; sys.path[0] = {str(moved / '_epts')!r}; "
            "import epts_export.device.trt.runtime, epts_export.device.trt.cli, epts_export.device.runner")
    r = subprocess.run([bare, "-B", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_standalone_runner_checks_hashes_before_loading(baked_bundle, tmp_path):
    bare = os.environ.get("EPTS_BARE_PYTHON") or sys.executable
    b = tmp_path / "b"
    shutil.copytree(baked_bundle, b)
    with open(b / "level-0.5" / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    r = subprocess.run([bare, str(b / "run.py"), "--level", "0.5", "--prompt", "w1"], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 3 and "level-0.5/model.onnx does not match its sha256" in r.stderr, r.stderr
    r = subprocess.run([bare, str(b / "run.py"), "--level", "2:4", "--prompt", "w1", "--max-new-tokens", "2"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # the other level's files are intact
    r = subprocess.run([bare, str(b / "run.py"), "--level", "0.9", "--prompt", "w1"], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 1 and "not in bundle" in r.stderr and "Traceback" not in r.stderr


def test_run_refuses_a_prompt_past_the_context_and_caps_new_tokens(bundle):
    with pytest.raises(Exception, match="context is 256"):
        generate(bundle, parse_level("0.3"), " ".join(f"w{i % 50}" for i in range(400)), 4)
    notes = []
    r = generate(bundle, parse_level("0.3"), "w1 w2", 10_000, on_note=notes.append)
    assert notes and "capped at" in notes[0] and r["prompt_tokens"] + len(r["tokens"]) <= 256
    r = runner.invoke(app, ["run", str(bundle), "--level", "0.3,2:4", "--prompt", "w1 w2", "--max-new-tokens", "3"])
    assert r.exit_code == 0 and r.output.count("tokens/s") == 2, r.output
    r = runner.invoke(app, ["run", str(bundle), "--level", "0.7", "--prompt", "Hello"])
    assert r.exit_code == 1 and "Hello" not in r.output  # nothing printed before the inputs are checked


# --------------------------------------------------------------------------------------------
# the README's example: a dynamic export served with onnxruntime and numpy alone


def _readme_example(marker: str) -> str:
    """The ```python block that follows ``marker`` in README.md, dedented."""
    import textwrap

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start = readme.index("```python", readme.index(marker)) + len("```python")
    return textwrap.dedent(readme[start:readme.index("```", start)])


def test_readme_plain_onnxruntime_example_switches_levels(exports, tmp_path, monkeypatch):
    from epts_export.device.ort import ElasticDecoder

    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "smol-dyn").symlink_to(exports("llama", "dynamic", levels="0.5,2:4"))
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(_readme_example("Serving a dynamic export with nothing but onnxruntime and numpy"), "README.md", "exec"), ns)
    ids = np.array([[1, 2, 3]])
    mask = np.ones_like(ids)
    for level, index in (("logits_05", 0), ("logits_24", 1)):
        dec = ElasticDecoder(exports("llama", "dynamic", levels="0.5,2:4"), level=index)
        want, _ = dec.step(ids, mask, positions(mask, 0), dec.empty_past(1))
        assert np.abs(ns[level] - want).max() < 1e-5, level
    assert np.abs(ns["logits_05"] - ns["logits_24"]).max() > 1e-3  # the switch changed the weights


def test_jetpack5_python_runs_a_baked_bundle_and_says_what_an_elastic_one_needs(bundle, baked_bundle, tmp_path):
    """JetPack 5's Python 3.8 with the onnxruntime it can have (1.19, the last for 3.8): run.py runs a
    baked bundle; an elastic bundle's weight builder needs onnxruntime 1.21 (uint8 arithmetic), which
    run.py says in one line instead of failing inside ONNX Runtime."""
    py38 = os.environ.get("EPTS_BARE38_PYTHON")
    if not py38:
        pytest.skip("EPTS_BARE38_PYTHON is not set: .ci/run makes a Python 3.8 venv with numpy, tokenizers, onnxruntime 1.19")
    ours = generate(baked_bundle, parse_level("2:4"), "w1 w2 w3", 6)
    r = subprocess.run([py38, str(baked_bundle / "run.py"), "--level", "2:4", "--prompt", "w1 w2 w3", "--max-new-tokens", "6"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and f"tokens {ours['tokens']}" in r.stderr, r.stderr
    r = subprocess.run([py38, str(bundle / "run.py"), "--level", "0.3", "--prompt", "w1"], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 1 and "needs onnxruntime 1.21 or later" in r.stderr and "--layout baked" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
