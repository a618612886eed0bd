"""What the engines bought (``device.trt.report``): latency per engine, refit and check per level,
the verdict of each N:M engine against the nearest dense one, report.json and its table."""

from __future__ import annotations

import json

from epts_export.device.interface import KVLayout, ShapeRange
from epts_export.device.trt import spec as tspec
from trt_runtime_fakes import HEADS, HEAD_DIM, LAYERS, TimedEngine


def test_the_report_times_each_engine_and_says_what_2_4_bought(tmp_path):
    """measure_engines: prefill (1 x 512) and decode (1 token on a 512-token cache) per engine, cut to
    what the profiles take; the refit engine switched through its levels (refit time, check); the
    2:4 engine against the engine of the nearest unstructured level; report.json and its table; a
    level that drifts is refused, not served."""
    from epts_export.device.trt.report import REPORT_FILE, fitted_shapes, measure_engines, nearest_dense, table, verdict

    ranges = [ShapeRange("prefill", (1, 1, 1), (1, 128, 2048), (0, 0, 0)), ShapeRange("decode", (1, 1, 1), (1, 1, 1),
                                                                                       (0, 512, 2047))]
    common = dict(precision="fp16", profiles=ranges, kv=KVLayout(LAYERS, HEADS, HEAD_DIM), workspace_mb=64,
                  tactic_dram_mb=None, timing_cache=tmp_path / "engines" / "t.cache")
    dense = tspec.EngineSpec(onnx=tmp_path / "model" / "decoder.onnx", engine=tmp_path / "engines" / "unstructured.engine",
                             levels=["0.3", "0.5", "0.7"], sparse=False, layer_info=tmp_path / "engines" / "u.layers.json",
                             refit=True, **common)
    sparse = tspec.EngineSpec(onnx=tmp_path / "model" / "decoder.onnx", engine=tmp_path / "engines" / "level-2of4.engine",
                              levels=["2:4"], sparse=True, layer_info=tmp_path / "engines" / "s.layers.json", **common)
    assert fitted_shapes(dense) == {"prefill": (512, 0), "decode": (1, 512)}
    short = tspec.EngineSpec(**{**dense.__dict__, "profiles": [ShapeRange("p", (1, 1, 1), (1, 8, 256), (0, 0, 0)),
                                                               ShapeRange("d", (1, 1, 1), (1, 1, 1), (0, 8, 255))]})
    assert fitted_shapes(short) == {"prefill": (256, 0), "decode": (1, 255)}  # a 256-token model
    assert nearest_dense("2:4", ["0.3", "0.5", "0.7"]) == "0.5" and nearest_dense("2:4", ["0.4", "0.6"]) == "0.4"
    opened = {}

    def open_engine(spec, level):
        times = {"prefill": 0.012, "decode": 0.004} if not spec.sparse else {"prefill": 0.010, "decode": 0.004}
        opened[spec.engine.name] = TimedEngine(spec, level, times, drifts={"0.7"})
        return opened[spec.engine.name]

    builds = {"level-2of4.engine": {"sparse_report": {"eligible": ["a", "b", "c"], "picked": ["b"], "layers": 9,
                                                      "myelin": 0, "source": "inspector+log"}}}
    report = measure_engines(tmp_path, [dense, dense, sparse], open_engine, builds, log=lambda m: None)
    assert opened["unstructured.engine"].calls == [(1, 512, 0), (1, 1, 512)]
    e_dense, e_sparse = report["engines"]
    assert e_dense["latency_ms"] == {"prefill": 12.0, "decode": 4.0} and e_sparse["latency_ms"] == {"prefill": 10.0, "decode": 4.0}
    assert e_sparse["sparsity"] == {"eligible": 3, "picked": 1, "picked_layers": ["b"], "source": "inspector+log"}
    assert e_dense["sparsity"]["source"] == "none"  # no layer file was written for it here
    assert e_sparse["speedup"] == {"2:4": {"against": "0.5", "prefill": 1.2, "decode": 1.0}}
    assert report["verdicts"] == ["2:4: prefill 1.20x, decode 1.00x the dense engine (level 0.5) on Orin (sm_87, cuda:0) "
                                  "with TensorRT 10.3.0.30"]
    assert report["levels"]["0.3"]["refit_s"] == 0.0 and report["levels"]["0.5"]["refit_s"] == 0.25
    assert report["refused"] == ["0.7"] and not report["levels"]["0.7"]["served"]
    assert json.loads((tmp_path / REPORT_FILE).read_text())["verdicts"] == report["verdicts"]
    lines = table(report)
    assert lines[1].split()[:2] == ["unstructured.engine", "0.3,"] and "1/3" in lines[2]
    assert any(line.startswith("  level 0.7: REFUSED: TensorRT level 0.7 drifts") for line in lines)
    assert any("level 0.5: refit 0.250 s, check vs ONNX Runtime passed" in line for line in lines)
    assert verdict("2:4", "0.5", {"prefill": 1.02, "decode": 0.98}, "Orin") == (
        "2:4 buys nothing on Orin: prefill 1.02x, decode 0.98x the dense engine (level 0.5)")
    assert "no dense engine in this bundle" in verdict("2:4", None, None, "Orin")
