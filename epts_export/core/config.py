"""The training config of one EPTS run (``TrainConfig``): plain, validated, recorded in every
artifact's settings and read back from them. No torch at import: reading an artifact reads it."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

from .levels import GROUP_WIDTH, LOW_GROUP_TOP, Group, Level, build_groups

PRECISIONS = ("fp32", "bf16")
INITS = ("zero", "lsq")
IMPORTANCES = ("wanda", "obs")
MSFM_SOURCES = ("pass", "train")


@functools.lru_cache(maxsize=None)
def bf16_fast(device: str = "cpu") -> bool:
    """Whether bf16 matmuls are native on ``device``: a CUDA device, a CPU with AVX512-BF16 or AMX
    (elsewhere they are emulated and slower than fp32). Cached: the error score asks at every pass."""
    if str(device).startswith("cuda"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def steps_per_epoch(nwindows: int, batch: int) -> int:
    return -(-nwindows // batch)


@dataclass(frozen=True)
class TrainConfig:
    rank: int = 8
    epochs: int = 2
    lr: float = 1e-3
    scale: float = 1.0  # LoRA scale (alpha / r)
    mix_weights: tuple[float, ...] | None = None  # MSFM weight per group; None = derived (mix_weights())
    # > 0: MSFM gives group 0's output this share, the other groups equal ones (unless mix_weights):
    # 0.4 trades 0.65-0.7 and Docutils' 2:4 for 0.3-0.5 (BENCHMARKS.md, "The low levels in whole
    # runs"), so a benchmark lever (``mixlow40``), not in a preset
    mix_low: float = 0.0
    batch: int = 1  # windows per optimizer step (the reference: 1); the loss is their mean
    # The cost levers (BENCHMARKS.md, "EPTS cost"); the defaults are the reference's behaviour.
    precision: str = "fp32"  # "bf16": the student passes (training, low-group check, MSFM) under bf16 autocast
    init: str = "zero"  # "lsq": adapters start from the closed-form least-squares solution (core/closed_form.py)
    residual: bool = False  # True: group k's loss trains group k's adapters only; the groups it inherits are frozen in its pass
    own_low: bool = False  # True: group 0's adapters learn from group 0's loss only (the higher groups' passes merge them frozen)
    check_windows: int = 0  # windows of the low-group check (the first ones); 0 = all
    steps: int = 0  # optimizer steps per block; 0 = epochs x steps per epoch (else the epochs run until this many)
    group_width: float = GROUP_WIDTH  # width of the unstructured groups above group 0 (core.levels.build_groups)
    warmup: int = 0  # optimizer steps of linear lr warm-up before the cosine decay (0 = none, the reference)
    low_top: float = LOW_GROUP_TOP  # where group 0 ends (core.levels.build_groups)
    low_span: float = 0.0  # group 0 is [low_top - low_span, low_top] (core.levels.build_groups); 0: [0, low_top], the reference
    importance: str = "wanda"  # the nested order: "wanda" |W| sqrt(E x^2), or "obs" |W| / sqrt([H^-1]_jj) (core.masks)
    # where MSFM's outputs come from: "pass", a pass with the trained adapters after training (the
    # reference); "train", the last epoch's training passes (each window's draw per group, the
    # adapters of its step): 13% less time per block for 0-16% higher perplexity (BENCHMARKS.md,
    # "The time goal"), so a benchmark lever (``mtrain``), not on the CLI
    msfm: str = "pass"

    def total_steps(self, nwindows: int) -> int:
        return self.steps or self.epochs * steps_per_epoch(nwindows, self.batch)

    def mixes_in_training(self, nwindows: int) -> bool:
        """Whether MSFM takes the training passes' outputs: asked for, and the last epoch passes
        every window (--steps may stop it early; then MSFM has its pass)."""
        return self.msfm == "train" and self.total_steps(nwindows) % steps_per_epoch(nwindows, self.batch) == 0

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not 0.01 <= self.group_width <= 1:  # at most 100 groups
            raise ValueError(f"group-width must be in [0.01, 1], got {self.group_width:g}")
        if not 0 < self.low_top <= 1:
            raise ValueError(f"low-top must be in (0, 1], got {self.low_top:g}")
        if not 0 <= self.low_span <= 1:
            raise ValueError(f"low-span must be in [0, 1] (0: all of group 0), got {self.low_span:g}")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}")
        if not 0 <= self.mix_low < 1:
            raise ValueError(f"mix_low must be in [0, 1), got {self.mix_low:g}")
        if self.msfm not in MSFM_SOURCES:
            raise ValueError(f"msfm must be one of {', '.join(MSFM_SOURCES)}, got {self.msfm!r}")

    def groups(self, levels: list[Level]) -> list[Group]:
        """The hierarchy this config trains for ``levels``."""
        return build_groups(levels, self.group_width, self.low_top, self.low_span)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The config an artifact's ``settings`` recorded (written with ``dataclasses.asdict``);
        other settings (levels, calibration sizes) are ignored. Artifacts written before a field
        existed get its default, which is what they ran."""
        mix = d.get("mix_weights")
        return cls(rank=int(d["rank"]), epochs=int(d["epochs"]), lr=float(d["lr"]), scale=float(d["scale"]),
                   mix_weights=tuple(float(w) for w in mix) if mix else None, batch=int(d.get("batch", 1)),
                   precision=str(d.get("precision", "fp32")), init=str(d.get("init", "zero")),
                   mix_low=float(d.get("mix_low", 0.0)),
                   residual=bool(d.get("residual", False)), own_low=bool(d.get("own_low", False)),
                   check_windows=int(d.get("check_windows", 0)),
                   steps=int(d.get("steps", 0)), group_width=float(d.get("group_width", GROUP_WIDTH)),
                   warmup=int(d.get("warmup", 0)), low_top=float(d.get("low_top", LOW_GROUP_TOP)),
                   low_span=float(d.get("low_span", 0.0)), importance=str(d.get("importance", "wanda")),
                   msfm=str(d.get("msfm", "pass")))

    def autocast(self, device):
        """The context of the student passes: bf16 autocast, or nothing (``device``: torch.device or str)."""
        if self.precision == "bf16":
            import torch

            return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
        return contextlib.nullcontext()
