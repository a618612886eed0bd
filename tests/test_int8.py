"""INT8 (W8A8) exports: the arithmetic by hand, smoothing as an identity, the Q/DQ graph that ONNX
Runtime runs on integer kernels, and `validate` against the fake-quantized reference."""

from __future__ import annotations

import collections
import json
import shutil
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from conftest import BUILDERS
from epts_export.cli import app
from epts_export.core.levels import parse_levels
from epts_export.models.families import family_for, iter_prunable
from epts_export.onnx.export import ExportSpec, export
from epts_export.onnx.parity import validate
from epts_export.quant.fake import fake_quantized
from epts_export.quant.math import act_scale, fake_quantize_act, quantize_weight, smoothing_factors
from epts_export.quant.recipe import Int8Recipe, build_recipe, input_amax, smoothed

runner = CliRunner()


def test_weight_quantization_by_hand():
    w_t = torch.tensor([[0.0, 2.0], [1.27, -1.0], [-0.005, 0.0], [0.0, 0.0]])  # (in 4, out 2)
    q, s = quantize_weight(w_t)
    assert torch.allclose(s, torch.tensor([0.01, 2.0 / 127]))
    assert q[:, 0].tolist() == [0, 127, 0, 0]  # -0.5 steps rounds half to even: 0
    assert q[:, 1].tolist() == [127, -64, 0, 0]
    assert quantize_weight(torch.zeros(3, 2))[1].tolist() == [1.0, 1.0]  # an all-zero column: scale 1, all zeros


def test_weight_quantization_keeps_every_zero_and_2of4():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g)
    w.view(16, 4, 32)[:, :2] = 0  # 2:4 along the reduction axis (axis 0 of w_t)
    q, _ = quantize_weight(w)
    assert bool((q[w == 0] == 0).all())
    assert int((q.view(16, 4, 32) != 0).sum(dim=1).max()) <= 2


def test_activation_fake_quant_matches_onnx_quantize_linear():
    x = np.array([-300.0, -1.5, -0.5, 0.5, 1.5, 2.5, 0.26, 126.7, 500.0], np.float32)
    s = 1.0
    ref = fake_quantize_act(torch.from_numpy(x), s).numpy()
    assert ref.tolist() == [-128.0, -2.0, -0.0, 0.0, 2.0, 2.0, 0.0, 127.0, 127.0]  # saturates, half to even
    node = onnx.helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [9])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT8, [9])],
                                   [onnx.numpy_helper.from_array(np.array(s, np.float32), "s"),
                                    onnx.numpy_helper.from_array(np.array(0, np.int8), "z")])
    sess = ort.InferenceSession(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]).SerializeToString())
    assert sess.run(None, {"x": x})[0].astype(np.float32).tolist() == ref.tolist()
    assert act_scale(254.0) == 2.0 and act_scale(0.0) == 1.0


def test_parse_smooth():
    from epts_export.errors import UserError
    from epts_export.quant.recipe import parse_smooth

    assert parse_smooth("0.8") == (0.8, 0.8) and parse_smooth("0.85,0.9") == (0.85, 0.9) and parse_smooth(0) == (0.0, 0.0)
    for bad in ("1", "0.5,1.2", "a", "0.1,0.2,0.3", -0.1):
        with pytest.raises(UserError, match="out of range"):
            parse_smooth(bad)


def test_smoothing_factors_by_hand():
    s = smoothing_factors(torch.tensor([4.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 2.0]), 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5, 1.0]))  # sqrt(a/w); a channel that never fires keeps 1


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_smoothing_is_an_identity_and_is_undone(family):
    model = BUILDERS[family]()
    fam = family_for(model)
    x = torch.randint(4, 250, (2, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model(input_ids=x).logits
    stats = input_amax(model, fam, x)
    recipe = build_recipe(model, fam, stats, 0.85)
    assert recipe.smooth and all((s > 0).all() for s in recipe.smooth.values())
    with smoothed(model, fam, recipe.smooth):
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed, "smoothing changed nothing"
        assert torch.allclose(model(input_ids=x).logits, ref, atol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_smoothing_factors_of_another_model_are_refused():
    from epts_export.errors import UserError

    model = BUILDERS["llama"]()
    fam = family_for(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="belongs to another model"):
        with smoothed(model, fam, {"model.layers.0.input_layernorm": torch.ones(3)}):
            pass
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_recipe_scales_of_shared_inputs_stay_apart():
    model = BUILDERS["llama"]()
    fam = family_for(model)
    recipe = build_recipe(model, fam, input_amax(model, fam, torch.randint(4, 250, (2, 16))), 0.5)
    q, k, v = (recipe.act_scale[f"model.layers.0.self_attn.{n}_proj"] for n in "qkv")
    assert q < k < v and np.float32(k) == np.nextafter(np.float32(q), np.float32(1)) and (v - q) / q < 1e-6


def _op_counts(path) -> collections.Counter:
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(path.with_name("optimized.onnx"))
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    counts = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    path.with_name("optimized.onnx").unlink()
    return counts


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_int8_export_validates_and_runs_integer_kernels(exports, tiny_artifacts, family, tmp_path):
    out = exports(family, dtype="int8")
    m = json.loads((out / "manifest.json").read_text())
    assert m["dtype"] == "int8" and m["int8"]["alpha"] == [0.85, 0.85] and m["int8"]["calibration"]["source"]
    for r in m["levels"]:
        assert r["int8"]["weights"] == r["int8"]["activations"] == len(m["weights"])
        assert f"{r['dir']}/quant.json" in m["files"] and f"{r['dir']}/quant.safetensors" in m["files"]
    graph_path = out / "level-2of4" / "model.onnx"
    g = onnx.load(str(graph_path))
    inits = {t.name: t for t in g.graph.initializer}
    for w in m["weights"]:  # every prunable weight is int8 on disk, none in float
        assert w not in inits and inits[w + "_quantized"].data_type == onnx.TensorProto.INT8
    counts = _op_counts(shutil.copy(graph_path, tmp_path / "model.onnx") and tmp_path / "model.onnx")
    # ONNX Runtime fuses every prunable MatMul of LLaMA into its integer kernel; OPT's fc1/fc2 are
    # 2-D MatMul + Add, which it turns into Gemm first and then runs as DQ + float Gemm
    fused = len(m["weights"]) if family == "llama" else 4 * 2
    assert counts["MatMulIntegerToFloat"] == fused
    rep = validate(out)
    assert rep["passed"], rep["failures"]
    for e in rep["levels"]:
        assert {"sparsity", "prefill", "decode", "generate"} <= set(e["checks"])
        d = e["distance_from_float"]
        assert d["mean_abs"] > 0 and 0 <= d["top1_agreement"] <= 1  # int8 is not the float model
    assert "logits vs the float level" in (out / "report.html").read_text()


def test_validate_catches_an_int8_graph_that_computes_something_else(exports, tmp_path):
    src = exports("llama", dtype="int8", levels="0.5")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    meta = json.loads((bad / "level-0.5" / "quant.json").read_text())
    meta["act_scale"] = {k: v * 3 for k, v in meta["act_scale"].items()}  # the reference no longer matches the graph
    (bad / "level-0.5" / "quant.json").write_text(json.dumps(meta))
    rep = validate(bad)
    assert not rep["passed"]
    assert any("integrity" in f for f in rep["failures"])  # the recipe is hashed in the manifest
    # and the graph no longer quantizes as its (changed) reference: the exact check says where
    assert any("/ int8: " in f and "activation scale" in f for f in rep["failures"]), rep["failures"]


def test_validate_reports_a_recipe_that_lacks_a_layer(exports, tmp_path):
    src = exports("llama", dtype="int8", levels="0.5")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    meta = json.loads((bad / "level-0.5" / "quant.json").read_text())
    for k in ("act_scale", "act_amax"):
        meta[k].pop("model.layers.1.mlp.down_proj")
    (bad / "level-0.5" / "quant.json").write_text(json.dumps(meta))
    rep = validate(bad)  # a report, not a crash
    assert not rep["passed"]
    assert any("/ reference: the int8 recipe has no activation scale for model.layers.1.mlp.down_proj" in f
               for f in rep["failures"]), rep["failures"]


def test_validate_catches_a_flipped_int8_zero(exports, tmp_path):
    from onnx import numpy_helper

    src = exports("llama", dtype="int8", levels="2:4")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    path = bad / "level-2of4" / "model.onnx"
    g = onnx.load(str(path))
    t = next(t for t in g.graph.initializer if t.name.endswith("up_proj.weight_t_quantized"))
    arr = numpy_helper.to_array(t).copy()
    arr.reshape(-1, 4, arr.shape[1])[0, :, 0] = 5  # a 2:4 group with four non-zeros
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    onnx.save(g, str(path))
    rep = validate(bad)
    sp = rep["levels"][0]["checks"]["sparsity"]
    assert not sp["passed"] and any("groups along axis 0" in f for f in sp["failures"])


def test_fake_quantized_restores_the_model(tiny_artifacts):
    from epts_export.artifact.folder import Artifact
    from epts_export.artifact.materialize import ElasticModel

    em = ElasticModel(Artifact.open(tiny_artifacts["opt"]))
    lv = parse_levels("0.5")[0]
    model = em.at(lv)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(4, 250, (2, 16))
    recipe = build_recipe(model, em.family, input_amax(model, em.family, x), 0.85)
    n = sum(1 for _ in iter_prunable(model, em.family))
    with fake_quantized(model, em.family, recipe, restore_prunable=lambda: em.at(lv)) as linears:
        assert len(linears) == n
        assert all(type(m).__name__ == "FakeQuantLinear" for m in linears.values())
    assert all(type(lin).__name__ == "Linear" for _, _, lin in iter_prunable(model, em.family))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_recipe_round_trip_and_bad_recipes(tmp_path):
    from epts_export.errors import UserError

    r = Int8Recipe((0.85, 0.9), {"model.layers.0.input_layernorm": torch.tensor([1.0, 2.0])}, {"a": 2.54}, {"a": 0.02}, {"source": "self"})
    r.save(tmp_path)
    back = Int8Recipe.load(tmp_path)
    assert back.alpha == (0.85, 0.9) and back.act_scale == {"a": 0.02} and torch.equal(back.smooth["model.layers.0.input_layernorm"], r.smooth["model.layers.0.input_layernorm"])
    meta = json.loads((tmp_path / "quant.json").read_text())
    meta["act_scale"]["a"] = -1
    (tmp_path / "quant.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="not positive finite"):
        Int8Recipe.load(tmp_path)
    (tmp_path / "quant.json").unlink()
    with pytest.raises(UserError, match="not an int8 level"):
        Int8Recipe.load(tmp_path)


def test_cli_export_int8_prints_the_distance_from_float(tiny_artifacts, tmp_path):
    out = tmp_path / "i8"
    r = runner.invoke(app, ["export", str(tiny_artifacts["llama"]), "--out", str(out), "--dtype", "int8", "--levels", "0.5",
                            "--smooth", "0", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "manifest.json").read_text())["int8"]["alpha"] == [0.0, 0.0]
    r = runner.invoke(app, ["validate", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert "int8 level 0.5 vs its float model" in r.output and "parity passed for 1 level" in r.output


def test_export_spec_refuses_what_int8_cannot_do(tiny_artifacts, tmp_path):
    from epts_export.errors import UserError

    with pytest.raises(UserError, match="int8 exports are baked"):
        export(ExportSpec(artifact=tiny_artifacts["llama"], out=tmp_path / "x", mode="dynamic", dtype="int8"))
    assert not (tmp_path / "x").exists()


# --- targets, build and engines ---------------------------------------------------------------


def test_orin_targets_take_int8_others_do_not(tmp_path):
    from epts_export.deploy.targets import all_targets, load_target_file

    takes = sorted(n for n, t in all_targets().items() if t.int8)
    assert takes == ["jetson-orin", "jetson-orin-nano", "jetson-orin-nx"]
    assert all_targets()["jetson-orin"].to_dict()["int8"] is True and "int8" not in all_targets()["hopper"].to_dict()
    from epts_export.errors import UserError

    text = all_targets()["hopper"].path.read_text().replace('build_on_device = false', 'build_on_device = false\nint8 = true')
    bad = tmp_path / "hopper.toml"
    bad.write_text(text)
    with pytest.raises(UserError, match="field 'int8' needs a pinned TensorRT below 11"):
        load_target_file(bad)


def test_trtexec_command_for_int8_is_weakly_typed_with_int8_and_sparsity(tmp_path):
    import dataclasses
    import types

    from epts_export.deploy.engines import engine_specs, trtexec_command
    from epts_export.deploy.targets import resolve_target

    target = dataclasses.replace(resolve_target("jetson"), precision="int8")
    config = types.SimpleNamespace(num_attention_heads=4, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2,
                                   head_dim=16, max_position_embeddings=256)
    specs = engine_specs(tmp_path, target, parse_levels("0.5,2:4"), config)
    sparse, dense = trtexec_command(specs[parse_levels("2:4")[0]]), trtexec_command(specs[parse_levels("0.5")[0]])
    assert "--int8" in sparse and "--fp16" in sparse and "--sparsity=enable" in sparse and "--stronglyTyped" not in sparse
    assert "--int8" in dense and "--sparsity=enable" not in dense


def test_sparse_report_says_which_sparse_layers_run_int8():
    from epts_export.device.trt.sparsity import sparse_report

    layers = {"Layers": [
        {"Name": "up", "HasSparseWeights": 1, "TacticName": "sm87_xmma_gemm_i8i8_i8i32_f32_tn_n_sparse_tilesize64x64",
         "Inputs": [{"Format/Datatype": "Int8 NC/32HW32"}]},
        {"Name": "down", "HasSparseWeights": 1, "TacticName": "sm87_xmma_gemm_f16f16_f16f32_f32_tn_n_sparse",
         "Inputs": [{"Format/Datatype": "Row major linear FP16"}]},
        {"Name": "q", "HasSparseWeights": 1, "TacticName": "sm87_xmma_gemm_i8i8_i8i32_f32_tn_n_tilesize64x64"}]}
    r = sparse_report(json.dumps(layers), [])
    assert r["picked"] == ["up", "down"] and r["int8"] == ["up", "q"] and r["picked_int8"] == ["up"]


def test_build_int8_for_jetson(tiny_artifacts, tmp_path):
    from epts_export.deploy.pipeline import BuildSpec, build
    from epts_export.errors import UserError

    art = tiny_artifacts["llama"]
    with pytest.raises(UserError, match="does not take INT8 engines"):
        build(BuildSpec(source=str(art), target="rtx", out=tmp_path / "x", dtype="int8"))
    with pytest.raises(UserError, match="ships baked levels"):
        build(BuildSpec(source=str(art), target="jetson", out=tmp_path / "x", dtype="int8", layout="elastic"))
    with pytest.raises(UserError, match="--dtype takes int8"):
        build(BuildSpec(source=str(art), target="jetson", out=tmp_path / "x", dtype="fp32"))
    r = runner.invoke(app, ["build", str(art), "--target", "jetson", "--dtype", "int8", "--levels", "0.5,2:4",
                            "--out", str(tmp_path / "dist"), "-q"])
    assert r.exit_code == 0, r.output
    b = tmp_path / "dist" / "jetson-orin"
    m = json.loads((b / "manifest.json").read_text())
    assert m["layout"] == "baked" and m["target"]["precision"] == "int8"
    assert all(r["parity"]["passed"] for r in m["levels"])
    for lv in ("level-0.5", "level-2of4"):
        assert (b / lv / "quant.json").is_file() and f"{lv}/quant.json" in m["files"]
    script = (b / "build_engines.sh").read_text()
    assert script.count("--int8") == 2 and script.count("--sparsity=enable") == 1 and "[ 0 = 1 ]" in script
    assert subprocess.run(["bash", "-n", str(b / "build_engines.sh")]).returncode == 0
    doc = json.loads((b / "engines.json").read_text())
    assert {e["precision"] for e in doc["engines"]} == {"int8"}
