"""The sparse-layer report (``device.trt.sparsity``) on written and real layer information and build logs."""

from __future__ import annotations

import json


from epts_export.device.trt import cli, sparsity
from trt_fakes import (DETAILED, LOG, REPO)


def test_sparse_report_inspector_and_log():
    r = sparsity.sparse_report(json.dumps(DETAILED), LOG)
    assert r["source"] == "inspector+log" and r["layers"] == 4
    assert r["picked"] == ["fc_b", "/model/layers.0/mlp/up_proj/MatMul"]
    assert r["eligible"] == ["fc_a", "fc_b", "/model/layers.0/mlp/up_proj/MatMul", "/model/layers.0/mlp/down_proj/MatMul"]
    assert "/model/layers.0/self_attn/q_proj/MatMul" not in r["eligible"]  # HasSparseWeights 0
    assert set(r) == {"eligible", "picked", "int8", "picked_int8", "layers", "myelin", "source"}

def test_sparse_report_inspector_only_and_renamed_keys():
    renamed = {"layers": [  # a later TensorRT with other key names and JSON booleans
        {"LayerName": "gemm1", "Type": "Gemm", "Weights": {"Count": 4096, "Sparse": True}, "Tactic": "sm87_sparse_gemm"},
        {"LayerName": "gemm2", "SparseWeights": "true", "Tactic": "sm87_gemm"},
        {"LayerName": "gemm3", "SparseWeights": False, "Tactic": "sm87_gemm"},
    ]}
    r = sparsity.sparse_report(json.dumps(renamed), [])
    assert r == {"eligible": ["gemm1", "gemm2"], "picked": ["gemm1"], "int8": [], "picked_int8": [], "layers": 3, "myelin": 0,
                 "source": "inspector"}

def test_sparse_report_names_only_and_log_only():
    names_only = json.dumps({"Layers": ["a + b", "c"], "Bindings": ["x"]})  # LAYER_NAMES_ONLY verbosity
    r = sparsity.sparse_report(names_only, LOG[1:2])
    assert r == {"eligible": ["fc_a", "fc_b", "/model/layers.0/mlp/up_proj/MatMul"], "picked": [], "int8": [],
                 "picked_int8": [], "layers": 2, "myelin": 0, "source": "inspector+log"}
    assert sparsity.sparse_report("", LOG)["source"] == "log"
    assert sparsity.sparse_report("not json {", [])["source"] == "none"
    empty = sparsity.sparse_report("", ["(Sparsity) Layers eligible for sparse math: ",
                                  "(Sparsity) TRT inference plan picked sparse implementation for layers:"])
    assert empty == {"eligible": [], "picked": [], "int8": [], "picked_int8": [], "layers": 0, "myelin": 0, "source": "log"}

REAL = REPO / "tests" / "data" / "trt_layer_info"  # real layer information, trimmed (SOURCES.md says from where)

def _fragment(name: str, layer: str) -> dict:
    """The body of one layer of TensorRT 10.1's output (the #4020 fragments): its complete top-level
    key lines, verbatim, under the layer name the fragment's header gives (the paste lost the Name line)."""
    text = (REAL / "trt10.1-resnet18-int8-sparsity-force.fragments.txt").read_text()
    block = text.split(f"----- fragment {name}:", 1)[1].split("\n----- fragment", 1)[0].split("\n", 1)[1]
    block = block.split("\n},{", 1)[0]  # the first layer of the fragment
    keep = [ln for ln in block.splitlines() if ln.startswith('  "') and not ln.startswith('   ')
            and ln.rstrip().endswith(",") and ln.count('"') % 2 == 0]
    return {"Name": layer, **json.loads("{" + "\n".join(keep).rstrip(",") + "}")}

def test_sparse_report_on_real_layer_information():
    """The report on TensorRT's own files: 8.x and 8.6 layer info (no sparse weights there; 8.6
    compiles the transformer into one opaque Myelin layer), TensorRT 10.1 layers of a
    --sparsity=force ResNet (2:4 weights with a dense tactic: eligible, not picked; a sparse
    ``..._sparse_...`` tactic: picked), and the log lines of 8.x and of 10.14 and later."""
    r = sparsity.sparse_report((REAL / "trt8.6-controlnet-fp16-myelin.json").read_text(), [])
    assert r == {"eligible": [], "picked": [], "int8": [], "picked_int8": [], "layers": 14, "myelin": 1, "source": "inspector"}
    r = sparsity.sparse_report((REAL / "trt8.x-trex-mobilenet-qat-int8.json").read_text(), [])
    assert r["layers"] == 10 and r["eligible"] == [] and r["source"] == "inspector"
    assert len(r["int8"]) == 7 and r["int8"][1].startswith("features.0.0.weight + QuantizeLinear_8")  # "... Int8 format"
    assert sparsity.sparse_report((REAL / "trt10.1-resnet18-int8-sparsity-force.json").read_text(), [])["layers"] == 2
    dense, sparse_layer = _fragment("C", "resnetv15_stage3_conv0"), _fragment("D", "resnetv15_stage3_conv4")
    assert dense["HasSparseWeights"] == 1 and "_sparse_" not in dense["TacticName"]
    assert sparse_layer["HasSparseWeights"] == 1 and "_sparse_" in sparse_layer["TacticName"]
    r = sparsity.sparse_report(json.dumps({"Layers": [dense, sparse_layer]}), [])
    assert r["eligible"] == [dense["Name"], sparse_layer["Name"]] and r["picked"] == [sparse_layer["Name"]]
    assert r["picked_int8"] == [sparse_layer["Name"]]  # a sparse INT8 tactic: ..._sparse_int8int8_...
    log_10 = ["[V] (Sparsity) Found 2 layer(s) eligible to use sparse tactics: node_conv2d + node_relu, node_linear",
              "[V] (Sparsity) Chose 1 layer(s) using sparse tactics: node_linear",
              "[V]  (foreignNode) (Sparsity) Found 1 layer(s) eligible to use sparse tactics: node_mlp"]
    r = sparsity.sparse_report("", log_10)
    assert r["eligible"] == ["node_conv2d + node_relu", "node_linear", "node_mlp"] and r["picked"] == ["node_linear"]
    chose_none = sparsity.sparse_report("", ["[V] (Sparsity) Chose 0 layer(s) using sparse tactics:"])
    assert chose_none["picked"] == [] and chose_none["source"] == "log"

def test_report_cli(tmp_path, capsys):
    info = tmp_path / "layers.json"
    info.write_text(json.dumps(DETAILED))
    log = tmp_path / "build.log"
    log.write_text("\n".join(LOG))
    assert cli.main(["sparsity", str(info), "--log", str(log)]) == 0
    assert json.loads(capsys.readouterr().out)["picked"] == ["fc_b", "/model/layers.0/mlp/up_proj/MatMul"]
