"""Lever names shared by the benchmarks: a variant is TrainConfig overrides joined by '+'.

    bf16 | fp32      precision of the student passes
    lsq | zero       closed-form least-squares start | B = 0
    residual         group k's loss trains group k's adapters only
    e<N>             N epochs                 s<N>      N optimizer steps per block
    r<N>             adapter rank N per group check<N>  low-group check on the first N windows
    g<NN>            groups above [0, .4] NN/100 wide (g5: the reference's 0.05, g10: 0.1)
    w<N>             N steps of linear lr warm-up
    lr<K>            lr 1e-K (lr3 = 1e-3); lr<A>e<K>: A x 1e-K (lr3e3 = 3e-3); lr0: no training

e.g. ``bf16+lsq+lr3+check8+g10+r16``; ``base`` is the config as given.
"""

from __future__ import annotations

import dataclasses
import re

from epts_export.pruning.epts import TrainConfig

FLAGS = {"bf16": {"precision": "bf16"}, "fp32": {"precision": "fp32"}, "lsq": {"init": "lsq"}, "zero": {"init": "zero"},
         "residual": {"residual": True}, "lr0": {"lr": 1e-30}}
NUMBERED = [(re.compile(r"e(\d+)"), lambda m: {"epochs": int(m[1])}),
            (re.compile(r"s(\d+)"), lambda m: {"steps": int(m[1])}),
            (re.compile(r"r(\d+)"), lambda m: {"rank": int(m[1])}),
            (re.compile(r"check(\d+)"), lambda m: {"check_windows": int(m[1])}),
            (re.compile(r"w(\d+)"), lambda m: {"warmup": int(m[1])}),
            (re.compile(r"g(\d+)"), lambda m: {"group_width": int(m[1]) / 100}),
            (re.compile(r"lr(\d+)e(\d+)"), lambda m: {"lr": int(m[1]) * 10.0 ** -int(m[2])}),
            (re.compile(r"lr(\d+)"), lambda m: {"lr": 10.0 ** -int(m[1])})]


def lever_overrides(name: str) -> dict:
    """The TrainConfig fields a variant name sets; SystemExit naming the bad token."""
    over: dict = {}
    for tok in [] if name in ("", "base") else name.split("+"):
        if tok in FLAGS:
            over.update(FLAGS[tok])
            continue
        for pattern, fields in NUMBERED:
            m = pattern.fullmatch(tok)
            if m:
                over.update(fields(m))
                break
        else:
            raise SystemExit(f"unknown lever {tok!r} in variant {name!r} (see benchmarks/levers.py)")
    return over


def variant_config(name: str, base: TrainConfig) -> TrainConfig:
    return dataclasses.replace(base, **lever_overrides(name))
