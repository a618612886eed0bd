"""benchmarks/profile_block.py: the seconds of each of optimize_block's steps."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.profile_block import STEPS, step_timer
from epts_export.core.config import TrainConfig
from epts_export.core.levels import build_groups, parse_levels
from epts_export.models.families import family_for, get_blocks, prunable_linears
from epts_export.pruning import epts
from epts_export.pruning.blockloop import capture_block_inputs
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.mark.parametrize("msfm", ["pass", "train"])
def test_step_timer_times_each_step_and_puts_the_steps_back(msfm):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    fam = family_for(model)
    inps = capture_block_inputs(model, fam, torch.randint(4, 200, (3, 16)))
    block = get_blocks(model, fam)[0]
    cfg = dataclasses.replace(TrainConfig(rank=2, epochs=1), msfm=msfm)
    before = {name: getattr(epts, name) for name in STEPS}
    with step_timer() as spent:
        epts.optimize_block(block, prunable_linears(block, fam), inps.hidden, inps.hidden, inps.kwargs,
                            build_groups(parse_levels("0.5")), cfg, seed=0)
    mixing = "msfm_stream" if msfm == "pass" else "msfm_from_training"
    assert set(spent) == set(STEPS) - ({"msfm_stream", "msfm_from_training"} - {mixing})
    assert all(s > 0 for s in spent.values())
    assert {name: getattr(epts, name) for name in STEPS} == before
