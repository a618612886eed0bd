"""device/ort.py's ElasticDecoder serving a level packed or in place: the same tokens as a baked
graph either way, the choice ("auto") by the length of the generation and the sessions open, at
most one packed session alive, and what `run` and run.py print of it."""

from __future__ import annotations

import gc
import weakref

import pytest
from typer.testing import CliRunner

from epts_export.cli import app
from epts_export.core.levels import parse_level
from epts_export.device.errors import UserError
from epts_export.device.ort import (PACK_AFTER_TOKENS, PACK_AFTER_TOKENS_IN_PLACE_OPEN, ElasticDecoder, OrtDecoder,
                                    greedy)
from epts_export.device.runner import Runner, describe
from epts_export.onnx.reader import OnnxExport

PROMPT = [5, 9, 13, 17, 21]


def _tokens(dec, n=12):
    return greedy(dec.step, dec.empty_past(1), PROMPT, n)


@pytest.mark.parametrize("fam", ["llama", "opt"])
def test_packed_and_in_place_generate_the_baked_tokens_across_switches(exports, fam):
    dyn, baked = OnnxExport.open(exports(fam, "dynamic")), OnnxExport.open(exports(fam))
    packed = ElasticDecoder(dyn.path, level=0, pack="always")
    in_place = ElasticDecoder(dyn.path, level=0, pack="never")
    for lv in (parse_level("0.7"), parse_level("2:4"), parse_level("0.3")):
        idx = dyn.level_index(lv)
        packed.set_level(idx)
        in_place.set_level(idx)
        want = _tokens(OrtDecoder(baked.graph_path(lv)))
        assert _tokens(packed) == want and packed.packed, lv
        assert _tokens(in_place) == want and not in_place.packed, lv


def test_auto_packs_a_long_generation_and_serves_a_short_one_in_place(exports):
    dyn = OnnxExport.open(exports("llama", "dynamic"))
    dec = ElasticDecoder(dyn.path, level=0, pack="auto")
    assert dec.session is None  # nothing loaded until a generation says how long it is
    assert dec.prepare(PACK_AFTER_TOKENS) == "packed" and dec.pack_s > 0
    assert dec.prepare(1) == "packed"  # the current level's packed session is there: kept
    dec.set_level(2)
    assert dec.prepare(PACK_AFTER_TOKENS - 1) == "in place"  # short: an in-place session is loaded once
    dec.set_level(3)
    # with an in-place session open, packing must save more: a prompt counts a token per 64
    assert dec.prepare(PACK_AFTER_TOKENS_IN_PLACE_OPEN - 1) == "in place"
    assert dec.prepare(PACK_AFTER_TOKENS_IN_PLACE_OPEN - 2, prompt_tokens=128) == "packed"
    never = ElasticDecoder(dyn.path, level=0, pack="never")
    assert never.prepare(10_000) == "in place"
    with pytest.raises(UserError, match="unknown pack mode 'fast'"):
        ElasticDecoder(dyn.path, level=0, pack="fast")


def test_a_switch_releases_the_packed_session_of_the_old_level(exports):
    """At most one packed copy of the weights: the old level's session is gone (not only
    unreferenced by the decoder: its input descriptions held it too) before the next is loaded."""
    dyn = OnnxExport.open(exports("llama", "dynamic"))
    dec = ElasticDecoder(dyn.path, level=0, pack="always")
    dec.prepare(1)
    old = weakref.ref(dec.session)
    dec.set_level(1)
    gc.collect()
    assert old() is None and dec.session is None and not dec.packed
    assert _tokens(dec) and dec.packed  # a step loads the new level's


def test_run_reports_the_session_the_switch_and_the_memory(exports):
    dyn = exports("llama", "dynamic")
    runner = Runner(dyn, threads=1)
    first = runner.generate(parse_level("0.5"), "w1 w2 w3", PACK_AFTER_TOKENS)
    second = runner.generate(parse_level("0.7"), "w1 w2 w3", PACK_AFTER_TOKENS)
    third = runner.generate(parse_level("0.5"), "w1 w2 w3", 4)
    assert (first["session"], second["session"], third["session"]) == ("packed", "packed", "in place")
    assert first["pack_s"] is None and second["pack_s"] > 0 and third["pack_s"] is None
    assert second["ready_s"] >= second["switch_s"] + second["pack_s"] - 1e-3
    assert first["peak_rss_mb"] > 10
    assert "+ packed session" in describe(second) and "(in place)" in describe(third)
    assert "peak memory" in describe(first)
    fast = Runner(dyn, threads=1, fast_switch=True)
    assert [fast.generate(parse_level(lv), "w1 w2 w3", PACK_AFTER_TOKENS)["session"] for lv in ("0.5", "0.7")] == \
        ["in place", "in place"]
    assert fast.generate(parse_level("0.7"), "w1 w2 w3", 6)["tokens"] == \
        Runner(dyn, threads=1).generate(parse_level("0.7"), "w1 w2 w3", 6)["tokens"]
    r = CliRunner().invoke(app, ["run", str(dyn), "--level", "0.5,0.7", "--prompt", "w1 w2", "--max-new-tokens", "3",
                                 "--fast-switch"])
    assert r.exit_code == 0 and r.output.count("(in place)") == 2, r.output
