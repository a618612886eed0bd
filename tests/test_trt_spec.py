"""Engine specs and engines.json (``device.trt.spec``): profile shapes, the JSON round trip, the
plan's problems, paths that must stay inside the bundle, versions that are refused."""

from __future__ import annotations

import json
import shutil

import pytest

from epts_export.device.trt import spec as tspec
from epts_export.errors import UserError
from trt_fakes import (INPUTS, PREFILL, make_refit_spec, make_sparse_spec, make_spec, write_onnx)


def test_profile_shapes_small_layout(tmp_path):
    shapes = tspec.profile_shapes(make_spec(tmp_path))
    assert list(shapes) == ["prefill", "decode"]
    prefill = {row[0]: row[1:] for row in shapes["prefill"]}
    decode = {row[0]: row[1:] for row in shapes["decode"]}
    assert list(prefill) == INPUTS  # graph order, every input
    assert prefill["input_ids"] == ((1, 1), (1, 64), (2, 128))
    assert prefill["position_ids"] == prefill["input_ids"]
    assert prefill["attention_mask"] == ((1, 1), (1, 64), (2, 128))  # past 0 + seq
    assert prefill["past_key_values.1.value"] == ((1, 2, 0, 16), (1, 2, 0, 16), (2, 2, 0, 16))
    assert decode["input_ids"] == ((1, 1), (1, 1), (2, 1))
    assert decode["attention_mask"] == ((1, 1), (1, 65), (2, 128))  # past + seq
    assert decode["past_key_values.0.key"] == ((1, 2, 0, 16), (1, 2, 64, 16), (2, 2, 127, 16))  # past min 0

@pytest.mark.parametrize("profile", [
    tspec.ShapeRange("p", (1, 1, 1), (0, 1, 1), (0, 0, 0)),  # seq min 0
    tspec.ShapeRange("p", (1, 1, 1), (1, 1, 1), (-1, 0, 0)),  # past < 0
    tspec.ShapeRange("p", (2, 1, 4), (1, 1, 1), (0, 0, 0)),  # min > opt
    tspec.ShapeRange("p", (1, 1), (1, 1, 1), (0, 0, 0)),  # not a triple
])
def test_profile_shapes_rejects_bad_ranges(tmp_path, profile):
    with pytest.raises(UserError):
        tspec.profile_shapes(make_spec(tmp_path, profiles=[profile]))

def test_profile_names_must_be_unique(tmp_path):
    with pytest.raises(UserError, match="twice"):
        tspec.profile_shapes(make_spec(tmp_path, profiles=[PREFILL, PREFILL]))

def test_spec_json_roundtrip(tmp_path):
    """engines.json holds the weight source once and every engine's spec, paths relative to the
    bundle: it reads back equal, and in a moved bundle every path follows."""
    refit = make_refit_spec(tmp_path)
    specs = [refit, make_sparse_spec(tmp_path, refit.source)]
    tspec.write_engines(tmp_path, specs, refit.source)
    doc = json.loads((tmp_path / tspec.ENGINES_JSON).read_text())
    assert doc["version"] == 3 and doc["source"]["graph"] == "model/decoder.onnx" and doc["report"] == "engines/report.json"
    assert doc["source"]["weights_file"] == "model/decoder.weights" and doc["source"]["levels"]["2:4"] == 3
    assert [(e["levels"], e["weights"], e["build_level"]) for e in doc["engines"]] == [
        (["0.3", "0.5", "0.7"], "refit", "0.3"), (["2:4"], "baked", "2:4")]
    assert str(tmp_path) not in json.dumps(doc)
    back, source = tspec.load_engines(tmp_path)
    assert back == specs and source == refit.source and source.prunable == ["w.up", "w.down"]
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path, moved, ignore=shutil.ignore_patterns("elsewhere"))
    specs2, source2 = tspec.load_engines(moved)
    assert specs2[0].engine == moved / "engines" / "unstructured.engine" and source2.graph == moved / "model" / "decoder.onnx"
    for spec in (make_spec(tmp_path), make_spec(tmp_path, "0.5", sparse=False, precision="bf16", tactic_dram_mb=None)):
        d = tspec.spec_to_dict(spec, tmp_path)  # a baked-layout bundle: each level's own graph, no source
        assert d["onnx"] == f"level-{spec.levels[0].replace(':', 'of')}/model.onnx" and d["weights"] == "baked"
        assert tspec.spec_from_dict(json.loads(json.dumps(d)), tmp_path) == spec
    d = tspec.spec_to_dict(refit, tmp_path)
    for broken, source in (({**d, "weights": "baked"}, refit.source),  # a baked engine serves one level
                           ({**d, "build_level": "0.9"}, refit.source),  # built with a level it does not serve
                           (d, None),  # a refit engine without the weight builder
                           ({**d, "levels": ["0.3", "0.6"]}, refit.source)):  # a level the builder's table lacks
        with pytest.raises(UserError, match="malformed"):
            tspec.spec_from_dict(broken, tmp_path, source)

def test_older_or_newer_engines_json_is_refused(tmp_path):
    """Version 2 refit each level from its own baked graph (one copy per level): rebuild; a newer one: update."""
    spec = make_spec(tmp_path)
    for version, hint in ((2, "rebuild the bundle"), (4, "update epts-export"), ("abc", "rebuild the bundle")):
        (tmp_path / tspec.ENGINES_JSON).write_text(json.dumps({"format": tspec.ENGINES_FORMAT, "version": version,
                                                               "engines": [tspec.spec_to_dict(spec, tmp_path)]}))
        with pytest.raises(UserError, match=f"has version .*{hint}"):
            tspec.load_specs(tmp_path)

def test_plan_problems(tmp_path):
    refit = make_refit_spec(tmp_path)
    sparse_spec = make_sparse_spec(tmp_path, refit.source)
    write_onnx(refit)
    assert tspec.plan_problems([refit, sparse_spec], ["0.3", "0.5", "0.7", "2:4"]) == []
    assert tspec.spec_for_level([refit, sparse_spec], "0.5") is refit and tspec.spec_for_level([refit], "0.9") is None
    problems = tspec.plan_problems([refit, sparse_spec, make_spec(tmp_path, "0.5", sparse=False)], ["0.3", "0.5", "0.7"])
    assert any("level 0.5 is served by 2 engine specs" in p for p in problems)
    assert any("lists level 2:4, which the bundle does not hold" in p for p in problems)
    assert any("level-0.5/model.onnx that engines are built from is missing" in p for p in problems)
    refit.onnx.unlink()
    assert tspec.plan_problems([refit]) == [f"the graph {refit.onnx} that engines are built from is missing"]

def test_spec_paths_must_stay_inside_the_bundle(tmp_path):
    spec = make_spec(tmp_path / "bundle")
    spec.timing_cache = tmp_path / "outside.cache"
    with pytest.raises(UserError, match="outside the bundle"):
        tspec.spec_to_dict(spec, tmp_path / "bundle")
    d = tspec.spec_to_dict(make_spec(tmp_path), tmp_path)
    d["engine"] = "../escape.engine"
    with pytest.raises(UserError, match="inside the bundle"):
        tspec.spec_from_dict(d, tmp_path)
    with pytest.raises(UserError, match="malformed"):
        tspec.spec_from_dict({"level": "2:4"}, tmp_path)
    refit = make_refit_spec(tmp_path)
    tspec.write_engines(tmp_path, [refit], refit.source)
    doc = json.loads((tmp_path / tspec.ENGINES_JSON).read_text())
    for key, value, match in (("weights_file", "/etc/decoder.weights", "inside the bundle"),
                              ("weights_file", "engines/decoder.weights", "beside source.graph"),
                              ("tensors", {"w.norm": {"file": "../../etc/passwd", "offset": 0, "length": 8, "dtype": "uint8",
                                                      "shape": [8]}}, "not in a file beside the graph"),
                              ("tensors", {"w.norm": {"file": "model.onnx_data", "offset": -8, "length": 8, "dtype": "uint8",
                                                      "shape": [8]}}, "negative offset")):
        bad = json.loads(json.dumps(doc))
        bad["source"][key] = value
        (tmp_path / tspec.ENGINES_JSON).write_text(json.dumps(bad))
        with pytest.raises(UserError, match=match):
            tspec.load_engines(tmp_path)
