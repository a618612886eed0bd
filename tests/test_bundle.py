"""`build`, `verify` and `run` on a tiny LLaMA artifact, without TensorRT or a GPU."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
from typer.testing import CliRunner

from epts_export.deploy.pipeline import BuildSpec, build
from epts_export.cli import app
from epts_export.device.bundle import Bundle, verify
from epts_export.device.runner import generate
from epts_export.errors import UserError
from epts_export.fsutil import sha256_bytes
from epts_export.core.levels import parse_level, parse_levels
from epts_export.device.ort import OrtDecoder, greedy
from epts_export.pruning.optimize import optimize
from epts_export.deploy.targets import targets_dir
from conftest import spec_for

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def art(tiny_dirs, text_file, tmp_path_factory):
    return optimize(spec_for(tiny_dirs["llama"], tmp_path_factory.mktemp("bundle-art") / "art", text_file))


@pytest.fixture(scope="module")
def dist(art, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    build(BuildSpec(source=str(art), target="rtx", out=out, levels=parse_levels("0.5,2:4")))
    return out


@pytest.fixture(scope="module")
def baked_dist(art, tmp_path_factory):
    out = tmp_path_factory.mktemp("baked-dist")
    build(BuildSpec(source=str(art), target="rtx", out=out, levels=parse_levels("0.5,2:4"), layout="baked"))
    return out


@pytest.fixture(scope="module")
def jetson_dist(art, tmp_path_factory):
    """A Jetson bundle with three unstructured levels and 2:4 (engines are built on the device)."""
    out = tmp_path_factory.mktemp("jetson-dist")
    build(BuildSpec(source=str(art), target="jetson", out=out, levels=parse_levels("0.3,0.5,0.7,2:4")))
    return out


def test_jetson_bundle_shares_one_refit_engine(jetson_dist):
    """Levels 0.3, 0.5, 0.7 and 2:4 for the Jetson, elastic: one refittable engine for the
    unstructured three (TensorRT has no unstructured-sparse kernels), its own SPARSE_WEIGHTS engine
    for 2:4, both built from the weight builder's decoder graph; the scripts build exactly those
    two, and every profile fits the model's 256 positions."""
    bundle = jetson_dist / "jetson-orin"
    doc = json.loads((bundle / "engines.json").read_text())
    assert doc["version"] == 3 and len(doc["engines"]) == 2
    assert doc["source"]["graph"] == "model/decoder.onnx" and doc["source"]["weights_file"] == "model/decoder.weights"
    assert doc["source"]["levels"] == {"0.3": 0, "0.5": 1, "0.7": 2, "2:4": 3}
    refit, sparse = doc["engines"]
    assert refit["levels"] == ["0.3", "0.5", "0.7"] and refit["weights"] == "refit" and refit["sparse"] is False
    assert refit["onnx"] == "model/decoder.onnx" and refit["engine"] == "engines/unstructured.engine"
    assert refit["build_level"] == "0.3"
    # only the pruned linears differ between levels: those are the weights to refit (REFIT_INDIVIDUAL)
    assert refit["refit_weights"] and all(w.endswith(".weight_t") for w in refit["refit_weights"])
    assert len(refit["refit_weights"]) == 2 * 7  # 2 blocks x (q, k, v, o, gate, up, down)
    assert all(doc["source"]["tensors"][w]["file"] == "decoder.weights" for w in refit["refit_weights"])
    others = {n: t for n, t in doc["source"]["tensors"].items() if n not in refit["refit_weights"]}
    assert others and all(t["file"] == "model.onnx_data" for t in others.values())  # every other tensor, read by offset
    assert sparse["levels"] == ["2:4"] and sparse["weights"] == "baked" and sparse["sparse"] is True
    assert sparse["onnx"] == "model/decoder.onnx" and sparse["build_level"] == "2:4"
    for e in doc["engines"]:
        assert [p["name"] for p in e["profiles"]] == ["prefill", "decode", "continue"]
        assert all(p["seq"][2] + p["past"][2] <= 256 for p in e["profiles"]) and e["context"]["capped"]
        assert e["tactic_dram_mb"] == 2048  # Jetson: capped in build_engines.py
    script = (bundle / "build_engines.sh").read_text()
    assert script.count("--saveEngine=") == 2
    blocks = {b.split(": ", 1)[0]: b for b in script.split("\necho '== ")[1:]}
    assert set(blocks) == {"levels 0.3, 0.5, 0.7", "level 2:4"}
    assert "--refit" in blocks["levels 0.3, 0.5, 0.7"] and "--sparsity" not in blocks["levels 0.3, 0.5, 0.7"]
    assert "--sparsity=enable" in blocks["level 2:4"] and "--refit" not in blocks["level 2:4"]
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["layout"] == "elastic" and m["model"] == {"dir": "model", "dtype": "fp16"}
    assert [(r["name"], r["index"], r["dir"]) for r in m["levels"]] == [("0.3", 0, "model"), ("0.5", 1, "model"),
                                                                        ("0.7", 2, "model"), ("2:4", 3, "model")]
    engines = {r["name"]: r["trt_engine"] for r in m["levels"]}
    assert {k: (v["engine"], v["weights"], v["build_level"]) for k, v in engines.items()} == {
        "0.3": ("engines/unstructured.engine", "refit", "0.3"), "0.5": ("engines/unstructured.engine", "refit", "0.3"),
        "0.7": ("engines/unstructured.engine", "refit", "0.3"), "2:4": ("engines/level-2of4.engine", "baked", "2:4")}
    assert m["files"]["model/decoder.weights"] == sha256_bytes(b"")  # shipped empty: decoder.onnx alone does not load
    assert "model/model.onnx" not in m["files"] and not any(f.startswith("level-") for f in m["files"])
    assert m["engines"]["built"] is False and "on the device" in m["engines"]["reason"]
    report = verify(bundle)
    assert report["plan"] == ("2 engine(s) for 4 level(s): unstructured.engine (0.3, 0.5, 0.7: refit), "
                              "level-2of4.engine (2:4: sparse)")
    r = cli("build", jetson_dist / "jetson-orin", "--target", "jetson", "--out", jetson_dist, "--quiet")
    assert r.exit_code != 0  # a bundle is not an artifact (the stages above are reused by other tests)


def _rehash(bundle, rel: str) -> None:
    """Record the new sha256 of ``rel`` in the bundle manifest (a tampering that keeps the hashes right)."""
    from epts_export.fsutil import sha256_file

    m = json.loads((bundle / "manifest.json").read_text())
    m["files"][rel] = sha256_file(bundle / rel)
    (bundle / "manifest.json").write_text(json.dumps(m))


def test_verify_checks_the_engine_plan(jetson_dist, tmp_path):
    """Every level has exactly one engine spec with the index manifest.json gives it, and the graph
    engines are built from is in the bundle and hashed: verify exits 3 otherwise, even when the
    hashes themselves are right."""
    b = tmp_path / "b"
    for edit, want in ((lambda d: d["engines"][0].update(levels=["0.3", "0.5"]), "level 0.7 is served by 0 engine specs"),
                       (lambda d: d["source"]["levels"].update({"0.5": 2, "0.7": 1}), "other indices than manifest.json")):
        shutil.rmtree(b, ignore_errors=True)
        shutil.copytree(jetson_dist / "jetson-orin", b)
        doc = json.loads((b / "engines.json").read_text())
        edit(doc)
        (b / "engines.json").write_text(json.dumps(doc))
        _rehash(b, "engines.json")
        r = cli("verify", b)
        assert r.exit_code == 3 and want in " ".join(r.output.split()), r.output
    shutil.rmtree(b)
    shutil.copytree(jetson_dist / "jetson-orin", b)
    m = json.loads((b / "manifest.json").read_text())
    del m["files"]["model/decoder.onnx"]  # not hashed, so not checked: refused
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="model/decoder.onnx"):
        verify(b)


def test_build_writes_a_complete_bundle_for_on_device_engines(dist, baked_dist):
    """The baked layout (--layout baked): one plain ONNX folder per level, one engine per level from
    its own graph (no refit engine: each level's weights are in its graph)."""
    bundle = baked_dist / "rtx-ada"  # the alias rtx resolves to rtx-ada
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["format"] == "epts-bundle" and m["target"]["name"] == "rtx-ada" and m["layout"] == "baked"
    assert m["target"]["compute_capability"] == "8.9" and m["target"]["precision"] == "fp16"
    assert [r["name"] for r in m["levels"]] == ["0.5", "2:4"]
    assert [r["sparse_weights"] for r in m["levels"]] == [False, True]
    assert all(r["parity"]["passed"] for r in m["levels"])
    assert m["engines"]["built"] is False and m["engines"]["reason"]
    assert m["memory_estimate"]["fits"]
    per_level = Bundle.open(bundle).level_files(parse_level("2:4"))
    assert "level-2of4/model.onnx" in per_level and per_level["level-2of4/model.onnx"] == m["files"]["level-2of4/model.onnx"]
    assert not any(f.startswith("level-0.5/") for f in per_level)
    for f in ("build_engines.sh", "build_engines.py", "run.py", "engines.json", "parity.json",
              "level-0.5/model.onnx", "level-2of4/model.onnx", "level-2of4/tokenizer.json"):
        assert f in m["files"], f
    script = (bundle / "build_engines.sh").read_text()
    assert subprocess.run(["bash", "-n", str(bundle / "build_engines.sh")]).returncode == 0
    blocks = {b.split(": ", 1)[0]: b for b in script.split("\necho '== ")[1:]}
    assert set(blocks) == {"level 0.5", "level 2:4"}  # one unstructured level: no refit engine
    assert "--onnx=level-2of4/model.onnx" in blocks["level 2:4"] and "--sparsity=enable" in blocks["level 2:4"]
    assert "--onnx=level-0.5/model.onnx" in blocks["level 0.5"] and "--sparsity" not in blocks["level 0.5"]
    assert "--sparsity=force" not in script and not any("--refit" in b for b in blocks.values())
    assert str(dist) not in script  # relative paths: the bundle can move
    assert not (dist / "rtx-ada.partial").exists()
    # which engine serves each level, built or not; profiles cut to the tiny model's 256 positions
    assert [r["trt_engine"] for r in m["levels"]] == [
        {"engine": "engines/level-0.5.engine", "layer_info": "engines/level-0.5.layers.json", "levels": ["0.5"],
         "build_level": "0.5", "weights": "baked", "sparse": False},
        {"engine": "engines/level-2of4.engine", "layer_info": "engines/level-2of4.layers.json", "levels": ["2:4"],
         "build_level": "2:4", "weights": "baked", "sparse": True}]
    assert m["engines"]["context"] == {"max_tokens": 256, "target_max_context": 4096, "model_max_positions": 256,
                                       "capped": True}
    doc = json.loads((bundle / "engines.json").read_text())
    assert doc["version"] == 3 and all(e["context"] == m["engines"]["context"] for e in doc["engines"])
    profiles = {p["name"]: p for p in doc["engines"][0]["profiles"]}
    assert list(profiles) == ["prefill", "decode", "continue"]
    assert profiles["prefill"]["seq"][2] == 256 and profiles["decode"]["past"][2] == 255
    assert all(p["seq"][2] + p["past"][2] <= 256 for p in profiles.values())


def test_second_build_reuses_the_stages(dist, art):
    stages = sorted(p.name for p in (dist / ".stages").iterdir())
    r = cli("build", art, "--target", "rtx-ada", "--out", dist, "--levels", "0.5,2:4", "--overwrite")
    assert r.exit_code == 0, r.output
    assert "reusing ONNX export" in r.output and "reusing the parity result" in r.output
    assert sorted(p.name for p in (dist / ".stages").iterdir()) == stages
    assert "engines not built here" in r.output and "build_engines.sh" in r.output


def test_require_engines_exits_2_and_writes_nothing(art, tmp_path):
    r = cli("build", art, "--target", "jetson", "--out", tmp_path, "--levels", "2:4", "--require-engines", "--quiet")
    assert r.exit_code == 2, r.output
    assert "engines were not built" in r.output
    assert not (tmp_path / "jetson-orin").exists() and not (tmp_path / "jetson-orin.partial").exists()


def test_build_bad_input(art, tmp_path):
    r = cli("build", art, "--target", "tpu-v5", "--out", tmp_path, "--quiet")
    assert r.exit_code == 1 and "unknown target 'tpu-v5'" in r.output and "jetson-orin" in r.output
    r = cli("build", art, "--target", "rtx-ada", "--out", tmp_path, "--levels", "4:8", "--quiet")
    assert r.exit_code == 1 and "cannot accelerate 4:8" in r.output.replace("\n", " ")
    small = tmp_path / "rtx-ada.toml"
    text = (targets_dir() / "rtx-ada.toml").read_text()
    text = re.sub(r"(?m)^memory_budget_gb\s*=.*$", "memory_budget_gb = 0.01", text)
    small.write_text(re.sub(r"(?m)^workspace_mb\s*=.*$", "workspace_mb = 8", text))  # 8 MiB + a 4 MiB KV cache > 10 MiB
    r = cli("build", art, "--target", small, "--out", tmp_path / "d", "--levels", "0.5", "--quiet")
    assert r.exit_code == 1, r.output
    msg = r.output.replace("\n", " ")
    assert "budget is 0.01 GiB" in msg and "KV cache" in msg and "max_context" in msg
    assert not (tmp_path / "d" / "rtx-ada").exists()


def test_verify_folder_and_tarball(dist, tmp_path):
    bundle = dist / "rtx-ada"
    r = cli("verify", bundle)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "hashes ok" in text and "build them on the device" in text
    tgz = tmp_path / "b.tar.gz"
    with tarfile.open(tgz, "w:gz") as t:
        t.add(bundle, arcname="rtx-ada")
    assert verify(tgz)["hashes"] == "ok"


def test_verify_catches_altered_and_missing_files(dist, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(dist / "rtx-ada", b)
    g = b / "model" / "weights.onnx"
    g.write_bytes(g.read_bytes()[:-10])
    r = cli("verify", b)
    assert r.exit_code == 3 and "model/weights.onnx does not match" in r.output.replace("\n", "")
    (b / "build_engines.sh").unlink()
    with pytest.raises(UserError, match="build_engines.sh is missing"):
        verify(b)


def _tar_with(tmp_path, name, member: tarfile.TarInfo, data: bytes = b"x"):
    p = tmp_path / name
    with tarfile.open(p, "w:gz") as t:
        info = tarfile.TarInfo("b/manifest.json")
        info.size = 2
        t.addfile(info, io.BytesIO(b"{}"))
        t.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return p


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_unsafe_tarballs_are_refused(tmp_path, kind):
    if kind == "dotdot":
        m = tarfile.TarInfo("b/../../evil.txt")
        m.size = 1
    elif kind == "absolute":
        m = tarfile.TarInfo("/tmp/evil.txt")
        m.size = 1
    elif kind == "symlink":
        m = tarfile.TarInfo("b/link")
        m.type, m.linkname = tarfile.SYMTYPE, "/etc/passwd"
    else:
        m = tarfile.TarInfo("b/hard")
        m.type, m.linkname = tarfile.LNKTYPE, "../../etc/passwd"
    tgz = _tar_with(tmp_path, f"{kind}.tar.gz", m)
    r = cli("verify", tgz)
    assert r.exit_code == 1, r.output
    assert "unsafe tar" in r.output
    assert not (tmp_path.parent / "evil.txt").exists()


def test_run_generates_from_a_bundle(dist, baked_dist):
    """run on the elastic bundle: each level from one load, the same tokens as that level's own
    graph in the baked bundle (fp16 here: the elastic weights are built from int8 adapters, and on
    this tiny model no step is a near-tie)."""
    bundle = dist / "rtx-ada"
    r = cli("run", bundle, "--level", "2:4", "--prompt", "w1 w2 w3", "--max-new-tokens", 6)
    assert r.exit_code == 0, r.output
    assert "tokens/s" in r.output and "onnxruntime" in r.output
    out = generate(bundle, parse_level("2:4"), "w1 w2 w3", 6)
    assert Bundle.open(bundle).levels == parse_levels("0.5,2:4")
    from transformers import AutoTokenizer

    for level, folder in (("2:4", "level-2of4"), ("0.5", "level-0.5")):
        dec = OrtDecoder(baked_dist / "rtx-ada" / folder / "model.onnx")
        prompt = AutoTokenizer.from_pretrained(bundle / "model")("w1 w2 w3")["input_ids"]
        want = greedy(dec.step, dec.empty_past(1), prompt, 6, stop=2)
        assert generate(bundle, parse_level(level), "w1 w2 w3", 6)["tokens"] == want, level
    r = cli("run", bundle, "--level", "0.7", "--prompt", "w1")
    assert r.exit_code == 1 and "not in bundle" in r.output
    r = cli("run", bundle, "--level", "2:4", "--prompt", "w1", "--runtime", "trt")
    assert r.exit_code == 1 and "has no engine" in r.output and "--runtime ort" in r.output
    assert 0 < out["load_s"] < 120 and 0 < out["prefill_s"] < 120  # measured, in seconds


def test_build_from_a_model_optimizes_once(tiny_dirs, tmp_path):
    r = cli("build", tiny_dirs["llama"], "--target", "rtx-ampere", "--out", tmp_path, "--levels", "0.5,2:4",
            "--preset", "quick", "--quiet")
    assert r.exit_code == 0, r.output
    arts = [p for p in (tmp_path / ".stages").iterdir() if p.name.startswith("artifact-")]
    assert len(arts) == 1 and (tmp_path / "rtx-ampere" / "manifest.json").is_file()
    r = cli("build", tiny_dirs["llama"], "--target", "hopper", "--out", tmp_path, "--levels", "0.5,2:4", "--preset", "quick")
    assert r.exit_code == 0, r.output
    assert "reusing artifact" in r.output  # a second target reuses the optimized artifact
    assert json.loads((tmp_path / "hopper" / "manifest.json").read_text())["target"]["compute_capability"] == "9.0"
    r = cli("build", tiny_dirs["llama"], "--target", "jetson-orin-nano", "--out", tmp_path, "--levels", "0.3,0.7",
            "--preset", "quick")
    assert r.exit_code == 0, r.output  # other levels, same artifact: optimize's whole range was trained
    assert "reusing artifact" in r.output
    assert len([p for p in (tmp_path / ".stages").iterdir() if p.name.startswith("artifact-")]) == 1
    small = tmp_path / "tiny-budget.toml"
    text = (targets_dir() / "rtx-ada.toml").read_text().replace('name = "rtx-ada"', 'name = "tiny-budget"')
    text = re.sub(r"(?m)^aliases\s*=.*$", "aliases = []", text)
    text = re.sub(r"(?m)^memory_budget_gb\s*=.*$", "memory_budget_gb = 0.01", text)
    small.write_text(re.sub(r"(?m)^workspace_mb\s*=.*$", "workspace_mb = 8", text))
    r = cli("build", tiny_dirs["opt"], "--target", small, "--out", tmp_path / "m", "--preset", "quick", "--quiet")
    assert r.exit_code == 1 and "budget is 0.01 GiB" in " ".join(r.output.split())
    assert not any(p.name.startswith("artifact-") for p in (tmp_path / "m" / ".stages").iterdir())  # refused before optimizing


def test_build_records_perplexity_when_given_text(art, eval_file, tmp_path):
    r = cli("build", art, "--target", "rtx-ada", "--out", tmp_path, "--levels", "0.5,2:4", "--eval-data", eval_file, "--quiet")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "rtx-ada" / "manifest.json").read_text())
    p = {r["name"]: r["perplexity"] for r in m["levels"]}
    # windows of the tiny model's whole context (256), not the default 512 it cannot attend over
    assert all(v and v["value"] > 1 and v["seqlen"] == 256 for v in p.values())
    assert p["0.5"]["dense"] < p["0.5"]["value"] * 10


def fake_device(monkeypatch, version: str = "10.3.0.30", cc: str = "8.9") -> None:
    """A machine whose TensorRT is ``version`` (a stand-in module) on a GPU of compute capability ``cc``."""
    import sys
    import types

    from epts_export.device.trt import probe

    monkeypatch.setattr(probe, "tensorrt_status", lambda: (True, "fake"))
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))
    monkeypatch.setattr(probe, "compute_capability", lambda: cc)


def test_verify_refuses_engines_for_another_device(dist, tmp_path, monkeypatch):
    """An engine is tied to its TensorRT version and GPU: verify exits 4 on a mismatch."""
    b = tmp_path / "b"
    shutil.copytree(dist / "rtx-ada", b)
    m = json.loads((b / "manifest.json").read_text())
    m["levels"][1]["engine"] = {"engine": "engines/level-2of4.engine", "tensorrt": "10.3.0.30"}
    (b / "manifest.json").write_text(json.dumps(m))
    fake_device(monkeypatch, "10.13.0.35")
    r = cli("verify", b)
    assert r.exit_code == 4 and "built with TensorRT 10.3.0.30" in " ".join(r.output.split())
    fake_device(monkeypatch, "10.3.0.30", "8.7")
    r = cli("verify", b)
    assert r.exit_code == 4 and "compute capability 8.9" in " ".join(r.output.split())
    fake_device(monkeypatch, "10.3.0.30", "8.9")
    r = cli("verify", b)
    assert r.exit_code == 0 and "match TensorRT 10.3.0.30" in " ".join(r.output.split())


class FakeTrtDecoder:
    """TensorRT faked: the 'engine' runs on ONNX Runtime at the level it serves, through the weight
    builder the real decoder refits from (``weights.reference``); set_level switches it, as a
    refit loads the level's weights, and records the switch."""

    switches: list[str] = []
    version = "10.99.0"

    class buffers:  # noqa: N801 - the DeviceBuffers interface the report reads
        @staticmethod
        def device_name():
            return "Fake GPU (sm_89, cuda:0)"

    def __init__(self, path, level=None, weights=None, **kw):
        self.engine_path, self.weights, self.level, self.checked = path, weights, None, {}
        self.load_switch = self.set_level(level) if level else None

    def set_level(self, level):
        if level == self.level:  # as the real one: the loaded level is not switched again
            return {"level": level, "switched": False, "refit_s": 0.0, "weights": 0, "check": self.checked[level]}
        FakeTrtDecoder.switches.append(level)
        self.d, self.level = self.weights.reference(level), level
        self.checked[level] = {"passed": True, "logits_max_abs": 0.0, "logits_atol": 10.0}
        return {"level": level, "switched": True, "refit_s": 0.01, "weights": 12, "check": self.checked[level]}

    def latency(self, batch, seq, past, repeats=20, warmup=3):
        return 0.002 if seq > 1 else 0.001

    def empty_past(self, batch):
        return self.d.empty_past(batch)

    def step(self, *a):
        return self.d.step(*a)


def fake_build(spec, log=print, levels=None):
    if spec.source is not None:
        levels.bake(spec.build_level)  # the build level's weights beside the graph, as the real builder does
    spec.engine.write_bytes(b"plan")
    spec.layer_info.write_text("{}")
    return {"engine": str(spec.engine), "bytes": 4, "build_s": 0.0, "tensorrt": "10.99.0", "levels": list(spec.levels),
            "build_level": spec.build_level, "weights": spec.weights, "refittable": "individual" if spec.refit else None,
            "sparse_report": {"eligible": [], "picked": [], "layers": 0, "myelin": 0, "source": "fake"}}


def test_build_with_engines_runs_tensorrt_parity(art, jetson_dist, monkeypatch):
    """The engine path of build, with TensorRT faked (FakeTrtDecoder). Checks the wiring: one refit
    engine built once for the unstructured levels (with the weight builder's 0.3 weights written
    for it, emptied after) and switched to each in TensorRT parity (a decoder left on the build
    level's weights fails parity for the others), engines recorded with bundle-relative paths and
    hashed, the latency report written, and a failing engine fails the build (exit 3)."""
    import epts_export.device.trt.builder as trt_builder
    import epts_export.device.trt.probe as probe
    import epts_export.device.trt.runtime as trt_runtime

    built = []
    monkeypatch.setattr(probe, "tensorrt_status", lambda: (True, "fake TensorRT"))
    monkeypatch.setattr(trt_builder, "build_engine",
                        lambda spec, log=print, levels=None: built.append(spec.engine.name) or fake_build(spec, log, levels))
    monkeypatch.setattr(trt_runtime, "TrtDecoder", FakeTrtDecoder)
    FakeTrtDecoder.switches = []
    out = jetson_dist  # its stages: the export and its parity are reused
    r = cli("build", art, "--target", "rtx-ada", "--out", out, "--levels", "0.3,0.5,0.7,2:4", "--quiet")
    assert r.exit_code == 0, r.output
    assert built == ["unstructured.engine", "level-2of4.engine"]
    assert FakeTrtDecoder.switches[:4] == ["0.3", "0.5", "0.7", "2:4"]  # parity: one engine at a time, switched
    b = out / "rtx-ada"
    m = json.loads((b / "manifest.json").read_text())
    assert m["engines"]["built"] is True and m["files"]["model/decoder.weights"] == sha256_bytes(b"")  # emptied again
    for rec in m["levels"]:
        want = "engines/level-2of4.engine" if rec["name"] == "2:4" else "engines/unstructured.engine"
        assert rec["engine"]["engine"] == want and (b / want).is_file()
        assert rec["engine"]["weights"] == ("baked" if rec["name"] == "2:4" else "refit")
        assert rec["parity"]["tensorrt"]["passed"] and rec["engine"]["engine"] in m["files"]
    report = json.loads((b / "parity-tensorrt.json").read_text())
    assert report["passed"] and [e.get("refit_s") for e in report["levels"]] == [0.0, 0.01, 0.01, 0.0]  # opened at 0.3, 2:4
    lat = json.loads((b / "engines" / "report.json").read_text())
    assert "engines/report.json" in m["files"] and lat["refused"] == [] and lat["gpu"] == "Fake GPU (sm_89, cuda:0)"
    assert lat["verdicts"] == ["2:4 buys nothing on Fake GPU (sm_89, cuda:0) with TensorRT 10.99.0: prefill 1.00x, "
                               "decode 1.00x the dense engine (level 0.5)"]
    fake_device(monkeypatch, "10.99.0", "8.9")
    assert verify(b)["engines"] == "2 engine(s) match TensorRT 10.99.0 on sm_89"

    class Stuck(FakeTrtDecoder):  # a refit engine that ignores the switch: 0.5 and 0.7 run 0.3's weights
        def set_level(self, level):
            if self.level is None or level == self.level:
                return super().set_level(level)
            return {"level": level, "switched": True, "refit_s": 0.0, "weights": 0, "check": {"passed": True}}

    monkeypatch.setattr(trt_runtime, "TrtDecoder", Stuck)
    r = cli("build", art, "--target", "rtx-ada", "--out", out, "--levels", "0.3,0.5,0.7,2:4", "--quiet", "--overwrite")
    assert r.exit_code == 3 and "level 0.7 / tensorrt" in " ".join(r.output.split())  # 0.3 vs 0.7: too far apart

    class Broken(FakeTrtDecoder):  # an engine whose logits drift
        def step(self, *a):
            logits, past = self.d.step(*a)
            return logits + 3.0 * np.sign(logits), past

    monkeypatch.setattr(trt_runtime, "TrtDecoder", Broken)
    r = cli("build", art, "--target", "rtx-ada", "--out", out / "b", "--levels", "2:4", "--quiet")
    assert r.exit_code == 3 and "TensorRT parity failed" in r.output
    assert not (out / "b" / "rtx-ada").exists()


def test_engines_built_on_the_device_are_found_by_verify_and_run(dist, tmp_path, monkeypatch):
    """build_engines.py writes engines/<level>.engine and a .build.json beside it; verify checks
    them against this machine and run picks them up (TensorRT faked: the 'engine' runs on ORT at
    its level, through the bundle's weight builder)."""
    import epts_export.device.trt.runtime as trt_runtime

    b = tmp_path / "jetson"
    shutil.copytree(dist / "rtx-ada", b)
    (b / "engines").mkdir()
    (b / "engines" / "level-2of4.engine").write_bytes(b"plan")
    (b / "engines" / "level-2of4.build.json").write_text(json.dumps({"tensorrt": "10.3.0.30", "compute_capability": "8.7"}))
    fake_device(monkeypatch, "10.3.0.30", "8.7")
    monkeypatch.setattr(trt_runtime, "TrtDecoder", FakeTrtDecoder)
    r = cli("verify", b)
    assert r.exit_code == 0 and "1 engine(s) match TensorRT 10.3.0.30 on sm_87" in " ".join(r.output.split())
    r = cli("run", b, "--level", "2:4", "--prompt", "w1 w2", "--max-new-tokens", 3)
    assert r.exit_code == 0 and "on tensorrt" in r.output
    r = cli("run", b, "--level", "0.5", "--prompt", "w1 w2", "--max-new-tokens", 3)  # no engine for 0.5: ORT
    assert r.exit_code == 0 and "on onnxruntime" in r.output
    (b / "engines" / "level-2of4.build.json").write_text("{ not json")  # a garbage record: no version known, no crash
    r = cli("verify", b)
    assert r.exit_code == 0 and "built by trtexec without a record" in " ".join(r.output.split())
    (b / "engines" / "level-2of4.build.json").write_text(json.dumps({"tensorrt": "10.3.0.30", "compute_capability": "8.7"}))
    fake_device(monkeypatch, "10.3.0.30", "9.0")
    r = cli("verify", b)
    assert r.exit_code == 4 and "compute capability 8.7" in " ".join(r.output.split())


def test_a_refit_engine_built_on_the_device_serves_its_levels(jetson_dist, tmp_path, monkeypatch):
    """build_engines.py on the Jetson writes one engine for 0.3, 0.5, 0.7: engine_for gives it to each
    of them (built with 0.3's weights, the others refit from the weight builder), verify checks it
    once, and run keeps it open and switches it from level to level."""
    import epts_export.device.trt.runtime as trt_runtime

    b = tmp_path / "jetson"
    shutil.copytree(jetson_dist / "jetson-orin", b)
    (b / "engines").mkdir()
    (b / "engines" / "unstructured.engine").write_bytes(b"plan")
    (b / "engines" / "unstructured.build.json").write_text(json.dumps(
        {"tensorrt": "10.3.0.30", "compute_capability": "8.7", "levels": ["0.3", "0.5", "0.7"], "weights": "refit"}))
    bundle = Bundle.open(b)
    for lv in ("0.3", "0.5", "0.7"):
        engine, record = bundle.engine_for(parse_level(lv))
        assert engine == b / "engines" / "unstructured.engine" and record["origin"] == "device"
        assert record["weights"] == "refit" and record["build_level"] == "0.3"
        assert record["levels"] == ["0.3", "0.5", "0.7"] and record["tensorrt"] == "10.3.0.30"
    assert bundle.engine_for(parse_level("2:4")) == (None, {})  # not built yet
    fake_device(monkeypatch, "10.3.0.30", "8.7")
    assert verify(b)["engines"] == "1 engine(s) match TensorRT 10.3.0.30 on sm_87"
    monkeypatch.setattr(trt_runtime, "TrtDecoder", FakeTrtDecoder)
    FakeTrtDecoder.switches = []
    r = cli("run", b, "--level", "0.3,0.7", "--prompt", "w1 w2", "--max-new-tokens", 3)
    assert r.exit_code == 0 and r.output.count("on tensorrt") == 2 and "switch" in r.output, r.output
    assert FakeTrtDecoder.switches == ["0.3", "0.7"]  # opened at 0.3, then switched: one engine
    fake_device(monkeypatch, "10.13.0.35", "8.7")
    with pytest.raises(UserError, match=r"the engine for level\(s\) 0.3, 0.5, 0.7 .* built with TensorRT 10.3.0.30"):
        verify(b)


def test_a_model_folder_edited_in_place_is_optimized_again(tiny_dirs, tmp_path):
    """The artifact stage is keyed by the resolved model's weights, not by the string naming it."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["llama"], model)
    args = ("--target", "hopper", "--out", tmp_path / "dist", "--levels", "0.5", "--preset", "quick", "--quiet")
    assert cli("build", model, *args).exit_code == 0
    weights = next(model.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("mlp.up_proj.weight"))
    tensors[name] = tensors[name] * 2  # same folder, same name, other weights
    save_file(tensors, str(weights), metadata={"format": "pt"})
    r = cli("build", model, *args, "--overwrite")
    assert r.exit_code == 0, r.output
    arts = [p for p in (tmp_path / "dist" / ".stages").iterdir() if p.name.startswith("artifact-")]
    assert len(arts) == 2  # a stale artifact of the old weights would have been reused
    shas = {json.loads((a / "manifest.json").read_text())["model"]["sha256"] for a in arts}
    assert len(shas) == 2
