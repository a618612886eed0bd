"""Which engines a bundle needs (``deploy.engines.engine_specs``): one refit engine for the
unstructured levels of an elastic bundle, a sparse one per N:M level, profiles cut to the model."""

from __future__ import annotations

import types

from epts_export.device.trt import spec as tspec
from trt_runtime_fakes import HEADS, HEAD_DIM, LAYERS


def test_engine_specs_share_one_refit_engine_and_cap_the_context(tmp_path):
    """deploy.engines.engine_specs for the Jetson and levels 0.3, 0.5, 0.7, 2:4 of a 2048-token model:
    an elastic bundle gets one refit spec for the three unstructured levels (its prunable weights
    named, built with 0.3's) and a sparse spec for 2:4, both from the weight builder's graph; a
    baked-layout bundle one engine per level from its own graph; every profile cut to 2048 tokens."""
    from epts_export.core.levels import parse_levels
    from epts_export.deploy.engines import engine_specs
    from epts_export.deploy.targets import resolve_target

    target = resolve_target("jetson")
    levels = parse_levels("0.3,0.5,0.7,2:4")
    config = types.SimpleNamespace(num_attention_heads=4, hidden_size=64, num_hidden_layers=LAYERS,
                                   num_key_value_heads=HEADS, head_dim=HEAD_DIM, max_position_embeddings=2048)
    model = tmp_path / "model"
    source = tspec.WeightSource(model / "decoder.onnx", model / "decoder.weights", model,
                                {"0.3": 0, "0.5": 1, "0.7": 2, "2:4": 3},
                                {"w.up": tspec.TensorRef("decoder.weights", 0, 32, "float16", (4, 4)),
                                 "w.down": tspec.TensorRef("decoder.weights", 64, 32, "float16", (4, 4)),
                                 "w.norm": tspec.TensorRef("model.onnx_data", 0, 8, "float16", (4,))})
    specs = engine_specs(tmp_path, target, levels, config, source)
    shared = specs[levels[0]]
    assert specs[levels[1]] is shared and specs[levels[2]] is shared and specs[levels[3]] is not shared
    assert shared.levels == ["0.3", "0.5", "0.7"] and shared.refit and shared.refit_weights == ["w.up", "w.down"]
    assert shared.onnx == model / "decoder.onnx" and shared.engine.name == "unstructured.engine"
    assert shared.build_level == "0.3" and not shared.sparse and shared.source is source
    sparse = specs[levels[3]]
    assert sparse.levels == ["2:4"] and sparse.sparse and not sparse.refit and sparse.engine.name == "level-2of4.engine"
    assert sparse.onnx == model / "decoder.onnx" and sparse.build_level == "2:4" and sparse.source is source
    assert shared.context == {"max_tokens": 2048, "target_max_context": 4096, "model_max_positions": 2048, "capped": True}
    assert [p.name for p in shared.profiles] == ["prefill", "decode", "continue"]
    assert all(p.seq[2] + p.past[2] <= 2048 for p in shared.profiles) and shared.profiles[1].past[2] == 2047
    baked = engine_specs(tmp_path, target, levels, config)
    assert [s.levels for s in baked.values()] == [["0.3"], ["0.5"], ["0.7"], ["2:4"]]
    assert baked[levels[1]].onnx == tmp_path / "level-0.5" / "model.onnx" and not any(s.refit for s in baked.values())
    config.max_position_embeddings = 8192  # a longer model than the target: the target's 4096 stand
    one = engine_specs(tmp_path, target, levels[:1], config, source)[levels[0]]
    assert one.context["capped"] is False and one.profiles == list(target.profiles.values()) and not one.refit
