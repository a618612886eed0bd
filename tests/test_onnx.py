"""ONNX export and validate on tiny LLaMA and OPT artifacts: both modes, KV-cache parity,
sparsity in the initializers, fp16, the NaN contract, tampering, and bad input."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from epts_export.onnx import dynamic, graph as onnx_graph
from epts_export.cli import app
from epts_export.errors import UserError
from epts_export.fsutil import sha256_file
from epts_export.core.levels import parse_level, parse_levels
from epts_export.artifact.materialize import ElasticModel
from epts_export.device.interface import io_names, level_dirname
from epts_export.onnx.export import ExportSpec, export
from epts_export.onnx.reader import OnnxExport
from epts_export.device.ort import ElasticDecoder, OrtDecoder, greedy, positions
from epts_export.onnx.reference import TorchDecoder
from epts_export.pruning.optimize import optimize
from epts_export.onnx.parity import validate, write_junit
from conftest import spec_for

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def arts(tiny_artifacts):
    return tiny_artifacts


def _step_outputs(dec, ids, mask, past_len=0, past=None):
    return dec.step(ids, mask, positions(mask, past_len), past if past is not None else dec.empty_past(len(ids)))


# ------------------------------------------------------------------------------- baked


@pytest.mark.parametrize("fam", ["llama", "opt"])
def test_baked_layout_names_and_manifest(exports, arts, fam):
    out = exports(fam)
    m = json.loads((out / "manifest.json").read_text())
    assert m["mode"] == "baked" and m["dtype"] == "fp32" and m["opset"] == 17
    assert [r["name"] for r in m["levels"]] == ["0.3", "0.5", "0.7", "2:4"]
    assert m["source_artifact"]["manifest_sha256"] == sha256_file(arts[fam] / "manifest.json")
    assert m["parity"] is None
    for r in m["levels"]:
        folder = out / r["dir"]
        for f in ("model.onnx", "config.json", "generation_config.json", "tokenizer.json"):
            assert (folder / f).is_file(), f
            assert m["files"][f"{r['dir']}/{f}"] == sha256_file(folder / f)
    assert (out / "level-2of4").is_dir()  # no ':' in paths
    g = onnx.load(str(out / "level-0.5" / "model.onnx"))
    layers = 2
    names_in, names_out = io_names(layers, dynamic=False)
    assert [i.name for i in g.graph.input] == names_in
    assert [o.name for o in g.graph.output] == names_out
    assert g.opset_import[0].version == 17
    assert not [n for n in g.graph.node if n.op_type in ("If", "Loop")], "one plain graph, no If-merged decoder"
    meta = onnx_graph.metadata(g)
    assert json.loads(meta["epts.levels"]) == ["0.5"] and meta["epts.mode"] == "baked"
    embed = [t for t in g.graph.initializer if 256 in t.dims]  # vocab 256
    config = json.loads((out / "level-0.5" / "config.json").read_text())
    assert config.get("tie_word_embeddings", True)  # both tiny models tie lm_head (LLaMA's config asks, OPT by default)
    assert len(embed) == 1, "a tied lm_head must not store a second, transposed embedding"
    assert not list(out.parent.glob("*.partial"))


@pytest.mark.parametrize("fam", ["llama", "opt"])
def test_ort_matches_torch_with_kv_cache(exports, arts, fam):
    out = exports(fam)
    exp = OnnxExport.open(out)
    em = ElasticModel(exp.source_artifact())
    lv = parse_level("0.5")
    ref, got = TorchDecoder(em.at(lv)), OrtDecoder(exp.graph_path(lv))
    rng = np.random.default_rng(1)
    ids, mask = rng.integers(4, 200, (1, 7)), np.ones((1, 7), np.int64)  # not the export's dummy shape
    (rl, rp), (gl, _) = _step_outputs(ref, ids, mask), _step_outputs(got, ids, mask)
    assert np.abs(rl - gl).max() < 1e-4
    step, mask2 = rng.integers(4, 200, (1, 1)), np.ones((1, 8), np.int64)  # decode with a non-empty past
    (rl2, rp2), (gl2, gp2) = _step_outputs(ref, step, mask2, 7, rp), _step_outputs(got, step, mask2, 7, rp)
    assert np.abs(rl2 - gl2).max() < 1e-4
    assert all(np.abs(a - b).max() < 1e-4 for a, b in zip(rp2, gp2))
    assert rp2[0].shape[2] == 8
    assert greedy(ref.step, ref.empty_past(1), [5, 6, 7], 12) == greedy(got.step, got.empty_past(1), [5, 6, 7], 12)


@pytest.mark.parametrize("fam", ["llama", "opt"])
def test_sparsity_survives_in_initializers(exports, arts, fam):
    out = exports(fam)
    exp = OnnxExport.open(out)
    em = ElasticModel(exp.source_artifact())
    weights = exp.manifest["weights"]
    assert len(weights) == 2 * (7 if fam == "llama" else 6)
    for lv in exp.levels:
        model = em.at(lv)
        g = onnx.load(str(exp.graph_path(lv)))
        inits = {t.name: numpy_helper.to_array(t) for t in g.graph.initializer}
        zeros = total = 0
        for name, module in weights.items():
            w_t = inits[name]
            torch_w = model.get_submodule(module).weight.detach().numpy()
            assert w_t.shape == torch_w.T.shape  # (in, out): the reduction axis is axis 0
            np.testing.assert_array_equal(w_t == 0, torch_w.T == 0)
            zeros, total = zeros + (w_t == 0).sum(), total + w_t.size
            if lv.is_nm:
                k, n = w_t.shape
                assert ((w_t != 0).reshape(k // 4, 4, n).sum(axis=1) <= 2).all(), name
        rec = next(r for r in exp.manifest["levels"] if r["name"] == lv.name)
        assert rec["measured_sparsity"] == pytest.approx(zeros / total, abs=1e-6)
        assert rec["measured_sparsity"] >= lv.sparsity - 0.01
        assert onnx_graph.check_sparsity(g, weights, lv)["ok"]


def _graph_with_weight(w_t: np.ndarray, through: str | None = None) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w_t.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w_t.shape[1]])
    nodes, wname = [], "w.weight_t"
    if through == "Mul":
        nodes.append(helper.make_node("Mul", [wname, "one"], ["w_scaled"]))
        nodes.append(helper.make_node("MatMul", ["x", "w_scaled"], ["y"]))
    else:
        nodes.append(helper.make_node("MatMul", ["x", wname], ["y"]))
    inits = [numpy_helper.from_array(w_t.astype(np.float32), wname), numpy_helper.from_array(np.array(1, np.float32), "one")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits))


def test_check_sparsity_catches_wrong_axis_and_hidden_weights():
    rng = np.random.default_rng(0)
    lv = parse_level("2:4")
    w = rng.standard_normal((8, 6))  # (in, out)
    along_k = w.copy()
    along_k.reshape(2, 4, 6)[:, 2:, :] = 0  # 2 of every 4 along axis 0: right
    along_n = w.copy()
    along_n[:, [1, 2, 4, 5]] = 0  # zeros along axis 1 only: wrong axis for TensorRT
    weights = {"w.weight_t": "w"}
    assert onnx_graph.check_sparsity(_graph_with_weight(along_k), weights, lv)["ok"]
    bad = onnx_graph.check_sparsity(_graph_with_weight(along_n), weights, lv)
    assert not bad["ok"] and "along axis 0" in bad["failures"][0]
    hidden = onnx_graph.check_sparsity(_graph_with_weight(along_k, through="Mul"), weights, lv)
    assert not hidden["ok"] and "Mul[0]" in hidden["failures"][0]
    expected = {"w.weight_t": np.zeros((8, 6), bool)}
    assert "differ from the materialized zero pattern" in onnx_graph.check_sparsity(
        _graph_with_weight(along_k), weights, lv, expected)["failures"][0]


# ------------------------------------------------------------------------------- dynamic


@pytest.mark.parametrize("fam", ["llama", "opt"])
def test_dynamic_graph_switches_levels_like_baked(exports, fam):
    dyn, baked = OnnxExport.open(exports(fam, "dynamic")), OnnxExport.open(exports(fam))
    g = onnx.load(str(dyn.path / "model.onnx"))
    assert [i.name for i in g.graph.input] == io_names(2, dynamic=True)[0]
    assert json.loads(onnx_graph.metadata(g)["epts.levels"]) == [r["name"] for r in dyn.manifest["levels"]]
    rng = np.random.default_rng(2)
    ids, mask = rng.integers(4, 200, (2, 5)), np.ones((2, 5), np.int64)
    logits = {}
    for i, lv in enumerate(dyn.levels):
        assert dyn.level_index(lv) == i
        d = _step_outputs(OrtDecoder(dyn.graph_path(lv), level=i), ids, mask)
        b = _step_outputs(OrtDecoder(baked.graph_path(lv)), ids, mask)
        assert np.abs(d[0] - b[0]).max() < 1e-4, lv
        assert all(np.abs(x - y).max() < 1e-4 for x, y in zip(d[1], b[1]))
        logits[lv.name] = d[0]
    assert np.abs(logits["0.3"] - logits["0.7"]).max() > 1e-3  # the input really switches weights


def test_dynamic_serves_below_a_low_span_group_0_with_the_mask_alone(tiny_dirs, text_file, tmp_path):
    """An artifact whose group 0 is fit over [0.15, 0.35] (--low-top 0.35 --low-span 0.2): the
    dynamic graph's tables follow the same rule as PyTorch, so 0.1 is the mask alone in both."""
    import dataclasses

    from epts_export.core.config import TrainConfig
    spec = dataclasses.replace(spec_for(tiny_dirs["llama"], tmp_path / "a", text_file, levels="0.5"),
                               train=TrainConfig(rank=2, epochs=1, lr=1e-2, init="lsq", group_width=0.1,
                                                 low_top=0.35, low_span=0.2))
    art = optimize(spec)
    exp = OnnxExport.open(export(ExportSpec(artifact=art, out=tmp_path / "d", mode="dynamic",
                                            levels=parse_levels("0.1,0.3,0.5"))))
    em = ElasticModel(exp.source_artifact())
    assert [(g.lo, g.hi) for g in em.artifact.groups] == [(0.15, 0.35), (0.35, 0.45), (0.45, 0.5)]
    ids, mask = np.random.default_rng(3).integers(4, 200, (1, 6)), np.ones((1, 6), np.int64)
    got = {}
    for i, lv in enumerate(exp.levels):
        got[lv.name] = _step_outputs(OrtDecoder(exp.graph_path(lv), level=i), ids, mask)[0]
        ref = _step_outputs(TorchDecoder(em.at(lv)), ids, mask)[0]
        assert np.abs(ref - got[lv.name]).max() < 1e-4, lv
    blocks = range(len(em.elastic.low_flags))
    assert all(em.elastic.rule(b, parse_level("0.1")).groups == () for b in blocks)  # the mask alone
    assert all(em.elastic.rule(b, parse_level("0.3")).groups == ((0,) if em.elastic.low_flags[b] else ())
               for b in blocks)
    r = em.elastic.lora_rank
    assert any(em.elastic.lora(b, n)[0][:, :r].abs().max() > 0 for (b, n) in em.dense)  # group 0 has adapters to leave out


def test_code_packing_by_hand():
    """2-bit slots, 4 per byte along axis 0: byte row c holds rows c, c+2, c+4, c+6; the graph's
    (p << (8 - 2j - 2)) puts slot j in the top bits, where ">= t << 6" tests "slot >= t"."""
    import torch

    code = torch.tensor([[0], [1], [2], [3], [3], [2], [1], [0]], dtype=torch.uint8)  # (K=8, N=1)
    packed = dynamic._pack(code, 2)
    assert packed.shape == (2, 1)
    assert packed[0, 0] == 0 | 2 << 2 | 3 << 4 | 1 << 6
    assert packed[1, 0] == 1 | 3 << 2 | 2 << 4 | 0 << 6
    tops = np.concatenate([(packed.astype(np.uint16) << (8 - 2 * j - 2)) & 0xFF for j in range(4)]).ravel()  # uint8 shift
    for t in range(4):
        np.testing.assert_array_equal(tops >= (t << 6), code.numpy().ravel() >= t)
    assert dynamic._slot_width(3, {64, 128}) == 4 and dynamic._slot_width(1, {12}) == 2


def test_int8_adapter_rows_by_hand():
    """fp16 exports store adapter rows as int8 times one float16 scale per 32 consecutive entries
    (max |group| / 127): the error is at most half a step of the entry's own group, so an outlier
    coarsens only its group; a zero group stays zero."""
    rows = np.zeros((2, 64), np.float32)
    rows[0, :32] = np.linspace(-0.01, 0.01, 32)
    rows[0, 32:] = np.linspace(-1.27, 1.27, 32)  # an outlier group
    q, scale = dynamic._int8_rows({"w": rows})
    assert q["w"].dtype == np.int8 and scale["w"].dtype == np.float16 and scale["w"].shape == (2, 2, 1)
    assert abs(float(scale["w"][0, 0, 0]) - 0.01 / 127) < 1e-7 and abs(float(scale["w"][0, 1, 0]) - 0.01) < 1e-5
    assert q["w"][0, 0] == -127 and q["w"][0, 63] == 127
    back = (q["w"].astype(np.float32).reshape(2, 2, 32) * scale["w"].astype(np.float32)).reshape(2, 64)
    assert np.abs(back[0, :32] - rows[0, :32]).max() <= float(scale["w"][0, 0, 0]) / 2 + 1e-9  # fine despite the outlier
    assert (back[1] == 0).all()
    assert dynamic._group(576) == 32 and dynamic._group(48) == 16 and dynamic._group(7) == 1


def test_dynamic_out_of_range_level_gives_nan(exports):
    path = exports("llama", "dynamic") / "model.onnx"
    ids = np.array([[5, 6, 7]])
    mask = np.ones_like(ids)
    for bad in (-1, 4, 99):
        logits, presents = _step_outputs(OrtDecoder(path, level=bad, allow_out_of_range=True), ids, mask)
        assert np.isnan(logits).all() and all(np.isnan(p).all() for p in presents), bad
        with pytest.raises(UserError, match=rf"sparsity_level {bad} is outside the level table .*\(0=0.3, 1=0.5, 2=0.7, 3=2:4\)"):
            OrtDecoder(path, level=bad)  # the runtime refuses it before running
        with pytest.raises(UserError, match="outside the level table"):
            ElasticDecoder(path.parent, level=bad)


def test_dynamic_stores_dense_weights_once(exports, arts, tmp_path):
    """Dense weights once, plus codes whose size grows with log2(levels): bucket bits for the
    unstructured levels (rounded up to 1, 2, 4 or 8) and one bit per N:M level."""
    few = export(ExportSpec(artifact=arts["llama"], out=tmp_path / "few", mode="dynamic", levels=parse_levels("0.7,2:4")))
    many = export(ExportSpec(artifact=arts["llama"], out=tmp_path / "many", mode="dynamic",
                             levels=parse_levels("0.1,0.3,0.5,0.6,0.65,0.7,2:4")))
    # 1 unstructured level -> 1 bucket bit, + 1 N:M bit: one 2-bit field; 6 unstructured levels -> 3 bits,
    # + 1 N:M bit: one 4-bit field (two fields would take 4 + 1)
    for out, bits in ((few, 2), (many, 4)):
        m = json.loads((out / "manifest.json").read_text())
        g = onnx.load(str(out / "model.onnx"))
        arrays = {t.name: numpy_helper.to_array(t) for t in g.graph.initializer}
        numel = sum(arrays[w + ".dense"].size for w in m["weights"])
        codes = sum(a.nbytes for n, a in arrays.items() if n.endswith((".code", ".bucket", ".nm")))
        assert codes == numel * bits // 8
        floats = sum(a.nbytes for n, a in arrays.items() if a.dtype == np.float32 and ".lora_" not in n)
        assert floats <= m["dense_initializer_bytes"] + 64 * len(m["weights"])  # the dense weights once, plus scalars
    assert validate(few)["passed"] and validate(many)["passed"]


def test_dynamic_needs_an_elastic_artifact(tiny_dirs, text_file, tmp_path):
    art = optimize(spec_for(tiny_dirs["llama"], tmp_path / "wanda", text_file, method="wanda", levels="0.5"))
    with pytest.raises(UserError, match="dynamic mode needs an EPTS artifact"):
        export(ExportSpec(artifact=art, out=tmp_path / "x", mode="dynamic"))
    out = export(ExportSpec(artifact=art, out=tmp_path / "baked"))  # a baseline's one level exports baked
    assert validate(out)["passed"]


# ------------------------------------------------------------------------------- dynamic: the level switch


def _prefill(dec, ids):
    mask = np.ones_like(ids)
    return dec.step(ids, mask, positions(mask, 0), dec.empty_past(len(ids)))


@pytest.mark.parametrize("fam", ["llama", "opt"])
def test_elastic_decoder_switches_in_place_like_baked(exports, fam):
    """One ElasticDecoder visits every level in turn (and back): after each set_level its outputs
    are the baked graph's at that level, and a generation equals a fresh session's."""
    dyn, baked = OnnxExport.open(exports(fam, "dynamic")), OnnxExport.open(exports(fam))
    ids = np.random.default_rng(5).integers(4, 200, (2, 6))
    dec = ElasticDecoder(dyn.path, level=3)
    assert dec.levels == ["0.3", "0.5", "0.7", "2:4"] and not dec.dynamic
    buffers = {n: v.data_ptr() for n, v in dec.buffers.items()}
    for lv in [*dyn.levels, dyn.levels[0]]:
        seconds = dec.set_level(dyn.level_index(lv))
        assert 0 < seconds < 30
        got, want = _prefill(dec, ids), _prefill(OrtDecoder(baked.graph_path(lv)), ids)
        assert np.abs(got[0] - want[0]).max() < 1e-4, lv
        assert all(np.abs(x - y).max() < 1e-4 for x, y in zip(got[1], want[1]))
    assert {n: v.data_ptr() for n, v in dec.buffers.items()} == buffers  # rebuilt in place, not reallocated
    dec.set_level(2)
    fresh = ElasticDecoder(dyn.path, level=2)
    prompt = [5, 9, 13, 17]
    assert greedy(dec.step, dec.empty_past(1), prompt, 12) == greedy(fresh.step, fresh.empty_past(1), prompt, 12)


def test_prepacked_weights_would_hide_the_switch(exports):
    """Why ElasticDecoder turns ONNX Runtime's pre-packing off: with it on, the decoder packs its
    weights into its own buffers at load, and rewriting ours changes nothing, silently. If this
    starts failing, ORT changed how it holds user initializers: re-check ElasticDecoder."""
    import onnxruntime as ort

    folder = exports("llama", "dynamic")
    builder = ort.InferenceSession(str(folder / "weights.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in builder.get_outputs()]
    at = {i: builder.run(None, {"sparsity_level": np.array(i, np.int64)}) for i in (0, 2)}
    ids = np.array([[5, 6, 7, 8]])

    def logits_after_rewrite(prepack: bool) -> tuple[np.ndarray, np.ndarray]:
        arrays = [a.copy() for a in at[0]]
        opts = ort.SessionOptions()
        if not prepack:
            opts.add_session_config_entry("session.disable_prepacking", "1")
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        for n, v in zip(names, values):
            opts.add_initializer(n, v)
        dec = OrtDecoder.__new__(OrtDecoder)
        dec._attach(ort.InferenceSession(str(folder / "decoder.onnx"), opts, providers=["CPUExecutionProvider"]))
        dec.dynamic = False
        before = _prefill(dec, ids)[0]
        for v, a in zip(values, at[2]):
            v.update_inplace(a)
        return before, _prefill(dec, ids)[0]

    want = _prefill(OrtDecoder(folder / "model.onnx", level=2), ids)[0]
    before, after = logits_after_rewrite(prepack=False)
    assert np.abs(after - want).max() < 1e-4 and np.abs(before - want).max() > 1e-3
    before, after = logits_after_rewrite(prepack=True)
    assert np.array_equal(before, after)  # the rewrite never reached the packed copy


def test_decoder_alone_does_not_load(exports, tmp_path):
    """decoder.onnx holds no prunable weights (they point at slots of the empty decoder.weights): a
    client that loads it without supplying them fails instead of running something else. Every
    tensor of the decoder lies in a file at the offset the manifest's table gives (what the device
    reads without an ONNX parser), and with one level's weights written into decoder.weights
    (build_engines.py bake) it runs as that level's plain graph: what TensorRT builds from."""
    from epts_export.device.trt.spec import TensorRef, WeightSource
    from epts_export.device.trt.weights import LevelWeights

    src = exports("opt", "dynamic")
    folder = tmp_path / "exp"
    shutil.copytree(src, folder)
    assert (folder / "decoder.weights").stat().st_size == 0
    with pytest.raises(UserError, match="ONNX Runtime cannot load .*decoder.onnx"):
        OrtDecoder(folder / "decoder.onnx")
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert {"model.onnx", "model.onnx_data", "weights.onnx", "decoder.onnx", "levels.json"} <= set(files)
    refs = {}
    for name in ("model.onnx", "weights.onnx", "decoder.onnx"):  # every tensor of 1 KB and more lies in model.onnx_data
        g = onnx.load(str(folder / name), load_external_data=False)
        for t in g.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                where = {e.key: e.value for e in t.external_data}
                refs.setdefault(t.name, set()).add((where["location"], where.get("offset")))
            else:
                assert len(t.raw_data) < 1024, (name, t.name)
    by_file = {loc for places in refs.values() for loc, _ in places}
    assert by_file == {"model.onnx_data", "decoder.weights"}
    assert all(len(places) == 1 for name, places in refs.items() if not name.endswith(".weight_t"))  # shared, not copied
    table = json.loads((folder / "manifest.json").read_text())["engine_graph"]
    decoder = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
    assert {t.name for t in decoder.graph.initializer} == set(table["tensors"])
    assert all(t.data_location == TensorProto.EXTERNAL for t in decoder.graph.initializer)
    source = WeightSource(folder / "decoder.onnx", folder / "decoder.weights", folder, {"0.3": 0, "0.5": 1, "0.7": 2, "2:4": 3},
                          {n: TensorRef(t["file"], t["offset"], t["length"], t["dtype"], tuple(t["shape"]))
                           for n, t in table["tensors"].items()})
    lw = LevelWeights(source)
    full = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
    for t in full.graph.initializer:  # the bytes the table points at are the tensor's (model.onnx_data, appended small ones)
        if t.name not in source.prunable:
            from onnx import external_data_helper, numpy_helper
            external_data_helper.load_external_data_for_tensor(t, str(folder))
            assert np.array_equal(numpy_helper.to_array(t), lw.tensor(t.name)), t.name
    ids = np.array([[5, 6, 7, 8]])
    mask = np.ones_like(ids)
    for level in ("0.5", "2:4"):
        lw.bake(level)
        plain = OrtDecoder(folder / "decoder.onnx")
        ref = ElasticDecoder(folder, level=source.levels[level])
        got = plain.step(ids, mask, positions(mask, 0), plain.empty_past(1))[0]
        want = ref.step(ids, mask, positions(mask, 0), ref.empty_past(1))[0]
        assert np.array_equal(got, want), level
    lw.clean()
    assert (folder / "decoder.weights").stat().st_size == 0


def test_level_table_survives_tools_that_drop_metadata(exports, tmp_path):
    """Polygraphy's sanitize and onnx-graphsurgeon drop metadata_props: levels.json answers then;
    with neither, an index cannot be checked and is refused."""
    src = exports("llama", "dynamic")
    folder = tmp_path / "stripped"
    shutil.copytree(src, folder)
    for name in ("model.onnx", "weights.onnx", "decoder.onnx"):
        g = onnx.load(str(folder / name), load_external_data=False)
        del g.metadata_props[:]
        (folder / name).write_bytes(g.SerializeToString())
    assert ElasticDecoder(folder, level=3).levels == ["0.3", "0.5", "0.7", "2:4"]
    assert OrtDecoder(folder / "model.onnx", level=1).levels == ["0.3", "0.5", "0.7", "2:4"]
    with pytest.raises(UserError, match="outside the level table"):
        ElasticDecoder(folder, level=4)
    (folder / "levels.json").unlink()
    with pytest.raises(UserError, match="has no level table"):
        ElasticDecoder(folder, level=0)
    (folder / "levels.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        OrtDecoder(folder / "model.onnx", level=0)


def test_validate_fails_when_the_switch_does_not_reach_the_weights(exports, monkeypatch):
    """The switch checks can fail: a set_level that does not rebuild the weights is caught (exit 3)."""
    from epts_export.device import ort as runtime

    def stale(self, level):
        self.level = level
        return 0.0

    monkeypatch.setattr(runtime.ElasticDecoder, "set_level", stale)
    report = validate(exports("llama", "dynamic"))
    assert not report["passed"]
    assert any("switched/" in f for f in report["failures"])
    assert all(e["checks"]["prefill"]["passed"] for e in report["levels"])  # model.onnx itself is fine


def test_a_dynamic_export_without_the_parts_still_runs_and_validates(exports, tmp_path):
    """A dynamic export from before the split (model.onnx only): run drives the whole graph, and
    validate checks it without the switch checks."""
    from epts_export.device.runner import Runner

    old = tmp_path / "old"
    shutil.copytree(exports("opt", "dynamic"), old)
    m = json.loads((old / "manifest.json").read_text())
    for name in ("weights.onnx", "decoder.onnx", "levels.json", "decoder.weights"):
        (old / name).unlink()
        del m["files"][name]
    (old / "manifest.json").write_text(json.dumps(m))
    runner = Runner(old)
    assert [runner.generate(parse_level(x), "w1 w2", 4)["tokens"] for x in ("0.5", "2:4")] == \
        [Runner(exports("opt", "dynamic")).generate(parse_level(x), "w1 w2", 4)["tokens"] for x in ("0.5", "2:4")]
    report = validate(old)
    assert report["passed"], report["failures"]
    assert all("switch" not in e["checks"] for e in report["levels"])
    with pytest.raises(UserError, match="weights.onnx is missing"):
        ElasticDecoder(old, level=0)


def test_run_generates_from_export_folders_and_switches_in_place(exports, tmp_path):
    dyn, baked = exports("llama", "dynamic"), exports("llama")
    r = cli("run", dyn, "--level", "0.3", "--level", "0.7,2:4", "--prompt", "w1 w2 w3", "--max-new-tokens", "5")
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("level ")]
    assert len(lines) == 3 and "load " in lines[0] and all(" switch " in ln and " ms (in place)," in ln for ln in lines[1:])
    from epts_export.device.runner import Runner

    runner = Runner(dyn)
    switched = [runner.generate(parse_level(x), "w1 w2 w3", 6)["tokens"] for x in ("0.3", "0.7", "2:4")]
    for x, tokens in zip(("0.3", "0.7", "2:4"), switched):
        assert Runner(baked).generate(parse_level(x), "w1 w2 w3", 6)["tokens"] == tokens, x
    r = cli("run", baked, "--level", "0.5,2:4", "--prompt", "w1", "--max-new-tokens", "3")
    assert r.exit_code == 0 and r.output.count("load ") == 2, r.output
    for args, code, msg in (
        (["--level", "0.6"], 1, "level 0.6 is not in export"),
        (["--level", "0.5", "--runtime", "trt"], 1, "has no TensorRT engines"),
    ):
        r = cli("run", dyn, *args, "--prompt", "w1")
        assert r.exit_code == code and msg in r.output, r.output
    bad = tmp_path / "bad"
    shutil.copytree(dyn, bad)
    (bad / "decoder.onnx").write_bytes(b"not a graph")
    r = cli("run", bad, "--level", "0.5", "--prompt", "w1")
    assert r.exit_code == 3 and "failed verification for level 0.5" in r.output and "decoder.onnx" in r.output, r.output


# ------------------------------------------------------------------------------- fp16


@pytest.mark.parametrize("fam", ["llama", "opt"])
def test_fp16_weights_with_fp32_norms_softmax_logits(exports, fam):
    out = exports(fam, "baked", "fp16")
    g = onnx.load(str(out / "level-2of4" / "model.onnx"))
    inits = {t.name: t for t in g.graph.initializer}
    weights = json.loads((out / "manifest.json").read_text())["weights"]
    assert all(inits[w].data_type == TensorProto.FLOAT16 for w in weights)
    assert g.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT  # logits
    assert g.graph.input[3].type.tensor_type.elem_type == TensorProto.FLOAT16  # past key
    inferred = onnx.shape_inference.infer_shapes(g)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    types.update({t.name: t.data_type for t in g.graph.initializer})
    sensitive = [n for n in g.graph.node if n.op_type in ("Softmax", "LayerNormalization", "ReduceMean", "Sqrt")]
    assert sensitive
    for n in sensitive:
        assert types.get(n.input[0]) == TensorProto.FLOAT, f"{n.op_type} {n.name} runs in {types.get(n.input[0])}"
    report = validate(out)
    assert report["passed"], report["failures"]
    assert report["tolerances"]["logits"]["atol"] > 1e-3  # compared to the fp32 reference with fp16 tolerances


def test_fp16_dynamic_validates(exports):
    report = validate(exports("opt", "dynamic", "fp16"))
    assert report["passed"], report["failures"]


# ------------------------------------------------------------------------------- validate


def test_validate_passes_and_records_parity(exports, tmp_path):
    out = exports("llama", "dynamic")
    r = cli("validate", out, "--report", tmp_path / "p.json", "--junit", tmp_path / "p.xml", "--quiet")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "p.json").read_text())
    assert rep["passed"] and rep["out_of_range"]["passed"]
    lv = rep["levels"][0]
    assert set(lv["checks"]) == {"integrity", "prefill", "decode", "generate", "switched/prefill", "switched/decode",
                                 "switched/generate", "switch", "switched/sparsity"}
    assert [e["checks"]["switched/sparsity"]["measured"] > 0.25 for e in rep["levels"]] == [True] * len(rep["levels"])
    assert all(e["checks"]["switch"]["fresh"] == e["checks"]["switch"]["switched"] for e in rep["levels"])
    assert rep["out_of_range"]["all_nan"] == {"-1": True, "4": True, "weights.onnx -1": True, "weights.onnx 4": True}
    assert lv["checks"]["decode"]["shape"] == {"batch": 3, "seq": 1, "past": 9}
    assert lv["checks"]["generate"]["match"] and len(lv["checks"]["generate"]["onnx"]) == 32
    logits = lv["checks"]["prefill"]["outputs"]["logits"]
    assert {"max_abs", "max_rel", "required_atol", "atol", "rtol", "passed"} <= set(logits)
    suite = ET.parse(tmp_path / "p.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) == 4 * 9 + 1 and suite.get("failures") == "0"  # + switched/{4 checks}, switch
    assert json.loads((out / "manifest.json").read_text())["parity"]["passed"] is True


def test_compare_reports_the_tolerance_that_would_pass():
    from epts_export.device.compare import Tol, compare_arrays as _compare

    ref = np.array([[[1.0, -2.0, 4.0, 0.0]]])  # (B, S, V)
    got = ref + np.array([[[0.1, 0.0, 0.3, 0.0]]])
    r = _compare(got, ref, Tol(0.25, 0.01), valid=np.ones((1, 1), bool))
    assert r["max_abs"] == pytest.approx(0.3) and r["mean_abs"] == pytest.approx(0.1)
    assert r["required_atol"] == pytest.approx(0.3 - 0.01 * 4.0)  # the worst element net of rtol * |ref|
    assert not r["passed"]
    assert _compare(got, ref, Tol(0.26, 0.01), np.ones((1, 1), bool))["passed"]
    assert not _compare(got, ref, Tol(0.26, 0.01, mean_atol=0.05), np.ones((1, 1), bool))["passed"]
    nan = _compare(got * np.nan, ref, Tol(1e9, 1.0), np.ones((1, 1), bool))
    assert not nan["passed"] and nan["max_abs"] == float("inf")


def _perturb_one_weight(folder, name):
    path = folder / "model.onnx"
    g = onnx.load(str(path))
    t = next(t for t in g.graph.initializer if t.name == name)
    arr = numpy_helper.to_array(t).copy()
    i = np.flatnonzero(arr)[0]
    arr.flat[i] += 5.0 * max(1.0, abs(arr.flat[i]))
    t.CopyFrom(numpy_helper.from_array(arr, name))
    onnx.save(g, str(path))


def test_validate_catches_a_perturbed_weight_by_hash_and_by_parity(exports, tmp_path):
    src = exports("llama")
    out = tmp_path / "tampered"
    shutil.copytree(src, out)
    _perturb_one_weight(out / "level-0.5", "model.layers.1.mlp.down_proj.weight_t")
    r = cli("validate", out, "--junit", tmp_path / "j.xml", "--quiet")
    assert r.exit_code == 3, r.output
    assert "level-0.5/model.onnx does not match its sha256" in r.output.replace("\n", "")
    rep = validate(out)
    bad = {e["level"]: e for e in rep["levels"] if not e["passed"]}
    assert set(bad) == {"0.5"}  # every level checked, only the tampered one fails
    assert not bad["0.5"]["checks"]["integrity"]["passed"] and not bad["0.5"]["checks"]["prefill"]["passed"]
    # now also forge the manifest hash: parity alone must catch it
    m = json.loads((out / "manifest.json").read_text())
    m["files"]["level-0.5/model.onnx"] = sha256_file(out / "level-0.5" / "model.onnx")
    (out / "manifest.json").write_text(json.dumps(m))
    rep = validate(out)
    assert not rep["passed"] and rep["integrity"]["passed"]
    checks = next(e for e in rep["levels"] if e["level"] == "0.5")["checks"]
    assert not checks["prefill"]["passed"] and not checks["decode"]["passed"]
    assert checks["prefill"]["outputs"]["logits"]["required_atol"] > 1e-3
    write_junit(rep, tmp_path / "j2.xml")
    suite = ET.parse(tmp_path / "j2.xml").getroot().find("testsuite")
    failed = [tc.get("name") for tc in suite.iter("testcase") if tc.find("failure") is not None]
    assert "prefill" in failed and int(suite.get("failures")) == len(failed)


def test_validate_reports_a_truncated_graph(exports, tmp_path):
    out = tmp_path / "trunc"
    shutil.copytree(exports("opt"), out)
    p = out / "level-2of4" / "model.onnx"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    r = cli("validate", out, "--quiet")
    assert r.exit_code == 3, r.output
    text = r.output.replace("\n", "")
    assert "level-2of4/model.onnx does not match its sha256" in text and "cannot load" in text


def test_export_replaces_a_partial_left_by_a_killed_run(arts, tmp_path):
    stale = tmp_path / "e.partial" / "level-2of4"
    stale.mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"half a graph")
    out = export(ExportSpec(artifact=arts["llama"], out=tmp_path / "e", levels=parse_levels("2:4")))
    assert validate(out)["passed"] and not (tmp_path / "e.partial").exists()


def test_external_data_above_the_limit(arts, tmp_path):
    out = export(ExportSpec(artifact=arts["opt"], out=tmp_path / "ext", levels=parse_levels("2:4"), external_data="always"))
    folder = out / level_dirname(parse_level("2:4"))
    assert (folder / "model.onnx_data").stat().st_size > (folder / "model.onnx").stat().st_size
    assert "level-2of4/model.onnx_data" in json.loads((out / "manifest.json").read_text())["files"]
    assert validate(out)["passed"]


# ------------------------------------------------------------------------------- CLI and bad input


def test_cli_export_and_bad_input(arts, tmp_path):
    out = tmp_path / "cli"
    r = cli("export", arts["llama"], "--out", out, "--mode", "baked", "--levels", "0.5,2:4", "--quiet")
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.output.replace("\n", "")
    assert sorted(p.name for p in out.iterdir()) == ["level-0.5", "level-2of4", "manifest.json", "report.html"]
    r = cli("export", arts["llama"], "--out", out, "--quiet")
    assert r.exit_code == 1 and "already exists" in r.output
    for args, msg in [(["--levels", "0.8"], "above the trained range"),
                      (["--levels", "4:8"], "was not trained"),
                      (["--mode", "merged"], "unknown --mode"),
                      (["--dtype", "int4"], "unknown --dtype")]:
        bad = tmp_path / "bad"
        r = cli("export", arts["llama"], "--out", bad, *args, "--quiet")
        assert r.exit_code == 1, (args, r.output)
        assert msg in r.output.replace("\n", " "), (args, r.output)
        assert r.output.count("error:") == 1
        assert not bad.exists() and not (tmp_path / "bad.partial").exists()
    r = cli("validate", arts["llama"], "--quiet")  # an artifact, not an export
    assert r.exit_code == 1 and "is not an epts-export ONNX export" in r.output and "epts-export export" in r.output
    r = cli("validate", tmp_path / "nope", "--quiet")
    assert r.exit_code == 1 and "export not found" in r.output
    r = cli("validate", out, "--levels", "0.7", "--quiet")
    assert r.exit_code == 1 and "not in export" in r.output
    moved = tmp_path / "moved-export"
    shutil.copytree(out, moved)
    m = json.loads((moved / "manifest.json").read_text())
    m["source_artifact"]["path"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(m))
    r = cli("validate", moved, "--quiet")
    assert r.exit_code == 1 and "pass --artifact" in r.output.replace("\n", " ")
    r = cli("validate", moved, "--artifact", arts["opt"], "--quiet")
    assert r.exit_code == 1 and "is not the one export" in r.output.replace("\n", " ")
    r = cli("validate", moved, "--artifact", arts["llama"], "--levels", "2:4", "--quiet")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("fam", ["llama", "opt"])
def test_ort_model_for_causal_lm_loads_a_baked_level(exports, fam):
    """optimum's ORTModelForCausalLM loads a level folder with no extra code and generates the
    same tokens as our greedy loop (optimum-onnx needs transformers 4.57: CI's second leg)."""
    ortm = pytest.importorskip("optimum.onnxruntime")
    # optimum-onnx 0.1 imports transformers internals lazily that transformers 5 removed: an
    # optimum left installed next to transformers 5 cannot load anything, ours or optimum's own
    pytest.importorskip("optimum.exporters.onnx.convert", reason="this optimum does not import with this transformers")
    from transformers import AutoTokenizer

    folder = exports(fam) / "level-2of4"
    model = ortm.ORTModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok("w1 w2 w3 w4", return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=10, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
    dec = OrtDecoder(folder / "model.onnx")
    assert gen == greedy(dec.step, dec.empty_past(1), enc["input_ids"][0].tolist(), 10)
