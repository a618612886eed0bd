"""Lever names shared by the benchmarks: a variant is TrainConfig overrides joined by '+'.

    bf16 | fp32      precision of the student passes
    lsq | zero       closed-form least-squares start | B = 0
    residual         group k's loss trains group k's adapters only
    own0             group 0's adapters learn from group 0's loss only
    obs | wanda      the importance order: second-order |W| / sqrt([H^-1]_jj) | Wanda's |W| sqrt(E x^2)
    e<N>             N epochs                 s<N>      N optimizer steps per block
    r<N>             adapter rank N per group check<N>  low-group check on the first N windows
    g<NN>            groups above [0, .4] NN/100 wide (g5: the reference's 0.05, g10: 0.1)
    low<NN>          group 0 ends at NN/100 (low35: [0, .35], then the g<NN> groups from there)
    span<NN>         group 0 is fit over its top NN/100 only (span20 with low35: [.15, .35])
    w<N>             N steps of linear lr warm-up
    mtrain           MSFM mixes the last epoch's training outputs (no MSFM pass of its own)
    mixeq            MSFM mixes the groups' outputs with equal weights (default: twice the weight
                     for groups from 0.55 up, the reference's)
    mixlow<NN>       MSFM gives group 0's output NN/100 of the mix, the other groups equal shares
    lr<K>            lr 1e-K (lr3 = 1e-3); lr<A>e<K>: A x 1e-K (lr3e3 = 3e-3); lr0: no training
    owl | owl<NN>    OWL's layer-wise allocation (lambda 0.08, or NN/100); err | err<NN>: the
                     pruning-error allocation. Not TrainConfig fields: ``split_allocation`` takes
                     them out for the optimize spec

e.g. ``bf16+lsq+lr3+check8+g10+r16``; ``base`` is the config as given.
"""

from __future__ import annotations

import dataclasses
import re

from epts_export.core.levels import DEFAULT_LEVELS, Level, parse_levels
from epts_export.core.config import TrainConfig

FLAGS = {"bf16": {"precision": "bf16"}, "fp32": {"precision": "fp32"}, "lsq": {"init": "lsq"}, "zero": {"init": "zero"},
         "residual": {"residual": True}, "own0": {"own_low": True}, "lr0": {"lr": 1e-30}, "obs": {"importance": "obs"},
         "wanda": {"importance": "wanda"}, "mixeq": {"mix_weights": "equal"}, "mtrain": {"msfm": "train"}}
NUMBERED = [(re.compile(r"e(\d+)"), lambda m: {"epochs": int(m[1])}),
            (re.compile(r"s(\d+)"), lambda m: {"steps": int(m[1])}),
            (re.compile(r"r(\d+)"), lambda m: {"rank": int(m[1])}),
            (re.compile(r"check(\d+)"), lambda m: {"check_windows": int(m[1])}),
            (re.compile(r"w(\d+)"), lambda m: {"warmup": int(m[1])}),
            (re.compile(r"g(\d+)"), lambda m: {"group_width": int(m[1]) / 100}),
            (re.compile(r"low(\d+)"), lambda m: {"low_top": int(m[1]) / 100}),
            (re.compile(r"span(\d+)"), lambda m: {"low_span": int(m[1]) / 100}),
            (re.compile(r"mixlow(\d+)"), lambda m: {"mix_low": int(m[1]) / 100}),
            (re.compile(r"lr(\d+)e(\d+)"), lambda m: {"lr": int(m[1]) * 10.0 ** -int(m[2])}),
            (re.compile(r"lr(\d+)"), lambda m: {"lr": 10.0 ** -int(m[1])})]


ALLOCATION = re.compile(r"(owl|err)(\d+)?")


def split_allocation(name: str) -> tuple[str, str]:
    """(the variant without its allocation token, the --allocation it asks for: uniform when none)."""
    rest, alloc = [], "uniform"
    for tok in [] if name in ("", "base") else name.split("+"):
        m = ALLOCATION.fullmatch(tok)
        if m:
            name = "owl" if m[1] == "owl" else "error"
            alloc = f"{name}:{int(m[2]) / 100:g}" if m[2] else name
        else:
            rest.append(tok)
    return "+".join(rest), alloc


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


def variant_config(name: str, base: TrainConfig, levels: list[Level] | None = None) -> TrainConfig:
    """``base`` with the variant's overrides; ``levels`` (default: optimize's) size ``mixeq``'s weights."""
    over = lever_overrides(name)
    equal = over.pop("mix_weights", None) == "equal"
    cfg = dataclasses.replace(base, **over)
    if equal:
        G = len(cfg.groups(levels if levels is not None else parse_levels(DEFAULT_LEVELS)))
        cfg = dataclasses.replace(cfg, mix_weights=(1.0 / G,) * G)
    return cfg
