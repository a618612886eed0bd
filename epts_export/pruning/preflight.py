"""Memory pre-flight for optimize: will this run fit, per rank, before anything heavy is loaded?

From the model's config.json (shapes), its safetensors headers (parameter count) and the run's
settings (calibration N x T, groups, LoRA rank, world size) this module estimates, per rank:

  host memory    the model (optimize holds it in float32 on the CPU) and the streams kept there;
                 every process on a machine holds its own copy, so the machine needs
                 processes-per-machine times that
  device memory  one block's working set: weights, importance order, merged weights and masks,
                 adapters with their gradients and Adam moments, the tensors autograd keeps for
                 the backward pass of one window; plus the streams when they stay on the device

Everything is float32 (4 bytes), as optimize computes. Weights, adapters and streams are exact
sizes; the backward tensors are a per-token tally of what autograd keeps for one block
(``activation_floats``), an estimate. ``plan`` is a pure function of these numbers; ``measure_*``
read what this machine has.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

F32 = 4
GIB = 1024**3
# A Python process with torch, transformers and epts_export imported: 387 MiB peak RSS measured
# (torch 2.13 CPU, transformers 5.24), rounded up for the allocator and the process group.
RUNTIME = 512 * 1024**2
STREAMS = ("auto", "device", "cpu")


def fmt_bytes(n: float) -> str:
    """1.23 GiB / 45.6 MiB / 7.8 KiB: the unit that keeps the number readable."""
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class ModelShape:
    """What the pre-flight needs to know about a model: read from config.json, no weights."""

    model_type: str
    num_blocks: int
    hidden: int
    intermediate: int
    heads: int
    head_dim: int
    kv_heads: int
    linears: tuple[tuple[str, int, int], ...]  # a block's prunable linears: (name, out, in)
    block_other: int  # a block's other parameters (norms, biases)
    params: int  # the whole model's parameters (weight headers when known, else counted from the config)
    gated_mlp: bool  # LLaMA's gate * up keeps two more intermediate tensors per token than OPT's fc1 -> relu

    @property
    def prunable(self) -> int:
        return sum(o * i for _, o, i in self.linears)

    @property
    def block_params(self) -> int:
        return self.prunable + self.block_other

    @property
    def largest_linear(self) -> int:
        return max(o * i for _, o, i in self.linears)

    def adapter_params(self, groups: int, rank: int) -> int:
        """B (out, G*r) and A (G*r, in) of every prunable linear of one block."""
        return groups * rank * sum(o + i for _, o, i in self.linears)

    @classmethod
    def from_config(cls, cfg: dict, params: int | None = None) -> "ModelShape":
        """From a config.json dict of any supported model type (its family sizes the block).
        ``params``: the count from the weight headers; without it the parameters are counted from
        the config. UserError for an unsupported model type or a config that lacks a size."""
        from ..models.families import family_for

        model_type = str(cfg.get("model_type", "?"))
        fam = family_for(model_type)
        try:
            L = int(cfg["num_hidden_layers"])
            s = fam.sizes(cfg)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise UserError(f"the model's config.json lacks a usable size ({type(e).__name__}: {e}): "
                            "it needs hidden_size, num_hidden_layers, num_attention_heads, vocab_size and the MLP size") from None
        linears = tuple((name, o, i) for name, (o, i) in zip(fam.prunable, s.linears, strict=True))
        counted = s.outside + L * (s.other + sum(o * i for o, i in s.linears))
        return cls(model_type=model_type, num_blocks=L, hidden=s.hidden, intermediate=s.intermediate, heads=s.heads,
                   head_dim=s.head_dim, kv_heads=s.kv_heads, linears=linears, block_other=s.other,
                   params=int(params) if params else counted, gated_mlp=fam.gated_mlp)


@dataclass(frozen=True)
class RunShape:
    """The settings of one optimize run that decide its memory."""

    method: str  # epts | wanda | sparsegpt | magnitude
    nsamples: int
    seqlen: int
    groups: int = 0  # EPTS sparsity groups
    rank: int = 8  # LoRA rank per group
    nm_levels: int = 0  # N:M levels (their masks are cached on the device)
    world: int = 1  # processes (ranks)
    local_world: int = 1  # processes on one machine
    device: str = "cpu"  # cpu | cuda
    streams: str = "auto"  # auto | device | cpu: where the calibration streams live between blocks
    attention: str = "sdpa"  # eager keeps (heads, T, T) probabilities for the backward pass


def activation_floats(m: ModelShape, seqlen: int, probabilities: bool) -> int:
    """Floats per token that autograd keeps for the backward pass of one block on one window.

    LLaMA: the block input, each norm's input-scaled copy and output (6 C), q after rotary, the
    attention output and its contiguous copy (3 q), k and v (2 kv), gate, silu(gate), up and their
    product (4 I); OPT's fc1 -> relu keeps 2 I. The loss adds the output, the group-0 output, the
    teacher and two temporaries (5 C). ``probabilities``: the (heads, T, T) scores and weights of
    the math attention path (eager, or SDPA on the CPU with a mask) are kept too.
    """
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    per_token = 6 * m.hidden + 3 * q + 2 * kv + (4 if m.gated_mlp else 2) * m.intermediate + 5 * m.hidden
    if probabilities:
        per_token += 2 * m.heads * seqlen
    return per_token


def stream_count(method: str, on_device: bool) -> tuple[int, int]:
    """(streams on the device, streams on the host) at a block's peak. EPTS holds four: the dense and
    sparse inputs, the teacher outputs (the next dense stream) and the mixed outputs (the next sparse
    stream); a baseline holds its inputs and outputs. Streams kept on the device are captured on the
    host first (EPTS: the dense inputs and their sparse copy)."""
    if method == "magnitude":
        return 0, 0
    k = 4 if method == "epts" else 2
    return (k, k // 2) if on_device else (0, k)


def block_working_set(m: ModelShape, run: RunShape) -> dict[str, int]:
    """Bytes on the device for one block, by part (no streams)."""
    T = run.seqlen
    probabilities = run.attention == "eager" or run.device == "cpu"
    window = 2 * T * m.hidden * F32  # one window's input and teacher, moved in
    parts = {"block weights": m.block_params * F32}
    if run.method == "epts":
        order = sum(o * i * (2 if i <= 32767 else 4) for _, o, i in m.linears)  # int16 / int32
        adapters = m.adapter_params(run.groups, run.rank)
        parts["importance order"] = order
        # W_eff (float32) + its mask (bool) per weight, the addmm temporary of the largest linear,
        # the cached N:M masks
        parts["merged weights and masks"] = 5 * m.prunable + F32 * m.largest_linear + run.nm_levels * m.prunable
        # parameters, gradients, Adam's two moments (+ the flat all-reduce buffer with several ranks)
        parts["adapters, gradients, Adam"] = (4 + (run.world > 1)) * F32 * adapters
        # the kept tensors of one window, the gradient of the largest merged weight and its masked copy
        parts[f"backward of one {T}-token window"] = (F32 * T * activation_floats(m, T, probabilities)
                                                      + 2 * F32 * m.largest_linear + window
                                                      + (F32 * T * T if probabilities else 0))
    elif run.method == "sparsegpt":
        largest_in = max(i for _, _, i in m.linears)
        parts["Hessians"] = F32 * sum(i * i for _, _, i in m.linears)
        # the pruning of the largest linear: H and its two Cholesky factors, W and its working copy
        parts["pruning one linear"] = 3 * F32 * largest_in**2 + 2 * F32 * m.largest_linear
        parts[f"forward of one {T}-token window"] = F32 * T * (4 * m.hidden + 2 * m.intermediate) + window
    elif run.method == "wanda":
        parts["mask of one linear"] = m.largest_linear
        parts[f"forward of one {T}-token window"] = F32 * T * (4 * m.hidden + 2 * m.intermediate) + window
    else:  # magnitude: thresholds over one weight at a time, on the CPU
        parts = {"one weight's |W|": F32 * m.largest_linear}
    return parts


@dataclass
class Plan:
    """The estimate for one rank, where the streams go, and whether it fits."""

    model: ModelShape
    run: RunShape
    windows_per_rank: int
    streams_on: str  # "device" | "cpu"
    host: dict[str, int]  # bytes per process on the host, by part
    device: dict[str, int]  # bytes per rank on the device, by part (empty for --device cpu)
    host_available: int | None  # per machine; None when unknown
    device_available: int | None  # per device; None when unknown or --device cpu
    hints: list[str] = field(default_factory=list)

    @property
    def host_per_rank(self) -> int:
        return sum(self.host.values())

    @property
    def host_per_machine(self) -> int:
        return self.run.local_world * self.host_per_rank

    @property
    def device_per_rank(self) -> int:
        return sum(self.device.values())

    @property
    def device_fits(self) -> bool:
        return self.device_available is None or self.device_per_rank <= self.device_available

    @property
    def host_fits(self) -> bool:
        return self.host_available is None or self.host_per_machine <= self.host_available

    @property
    def fits(self) -> bool:
        return self.device_fits and self.host_fits

    def summary(self) -> str:
        """One line for the run's output."""
        r = self.run
        text = f"memory per rank: host {fmt_bytes(self.host_per_rank)}"
        if r.local_world > 1:
            text += f" ({r.local_world} per machine: {fmt_bytes(self.host_per_machine)})"
        if r.device != "cpu":
            text += f", device {fmt_bytes(self.device_per_rank)}"
        if r.method != "magnitude":
            where = "on the GPU" if self.streams_on == "device" else "on the CPU"
            text += f"; streams {where} ({self.windows_per_rank} windows x {r.seqlen} tokens per rank)"
        return text

    def to_dict(self) -> dict:
        """What the manifest records."""
        return {"world_size": self.run.world, "processes_per_machine": self.run.local_world,
                "windows_per_rank": self.windows_per_rank, "streams_on": self.streams_on,
                "host_bytes_per_rank": self.host, "device_bytes_per_rank": self.device,
                "host_available_bytes": self.host_available, "device_available_bytes": self.device_available}

    def refusal(self) -> str:
        """The one-line reason this run cannot fit, with the numbers and what to change."""
        r = self.run
        parts = []
        if not self.device_fits:
            parts.append(f"device memory per rank {fmt_bytes(self.device_per_rank)} ({_list(self.device)}) "
                         f"but the device has {fmt_bytes(self.device_available)} free")
        if not self.host_fits:
            procs = f"{r.local_world} processes x {fmt_bytes(self.host_per_rank)} = " if r.local_world > 1 else ""
            parts.append(f"host memory {procs}{fmt_bytes(self.host_per_machine)} per machine ({_list(self.host)}) "
                         f"but {fmt_bytes(self.host_available)} is available")
        fix = ("change one of: " + "; ".join(self.hints)) if self.hints else \
            "no smaller setting fits: use a machine with more memory or a smaller model"
        return f"optimize does not fit: {' and '.join(parts)}; {fix}"


def _list(parts: dict[str, int]) -> str:
    return " + ".join(f"{k} {fmt_bytes(v)}" for k, v in parts.items() if v)


def plan(m: ModelShape, run: RunShape, host_available: int | None = None, device_available: int | None = None,
         hints: bool = True) -> Plan:
    """The memory of ``run`` on ``m`` per rank, where its streams go, and (when it does not fit and
    ``hints``) the settings that would fit. Pure: every number comes from the arguments.

    Streams ``auto`` (GPU runs): on the device when the block's working set and the streams fit
    in ``device_available`` together, else on the CPU.
    """
    if run.streams not in STREAMS:
        raise UserError(f"--streams must be one of {', '.join(STREAMS)}, got {run.streams!r}")
    n = -(-run.nsamples // run.world)  # rank 0 holds the most windows
    stream = n * run.seqlen * m.hidden * F32
    work = block_working_set(m, run)
    model = {"runtime (torch, transformers)": RUNTIME, "model (float32)": m.params * F32}
    if run.device == "cpu":
        on_device = False
    elif run.streams == "auto":
        dev_k, _ = stream_count(run.method, True)
        on_device = device_available is not None and sum(work.values()) + dev_k * stream <= device_available
    else:
        on_device = run.streams == "device"
    dev_k, host_k = stream_count(run.method, on_device)
    label = f"streams ({n} windows x {run.seqlen} tokens)"
    if run.device == "cpu":
        host = {**model, label: host_k * stream, **{f"block: {k}": v for k, v in work.items()}}
        device: dict[str, int] = {}
        device_available = None
    else:
        host = {**model, label: host_k * stream}
        device = {**work, label: dev_k * stream}
    p = Plan(m, run, n, "device" if on_device else "cpu", host, device, host_available, device_available)
    if hints and not p.fits:
        p.hints = _hints(m, run, host_available, device_available, p)
    return p


def _largest(lo: int, hi: int, fits) -> int | None:
    """The largest v in [lo, hi] with fits(v), for a fits that holds below some threshold."""
    if hi < lo or not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _hints(m: ModelShape, run: RunShape, host_av, dev_av, p: Plan) -> list[str]:
    """Each single change of setting that makes the run fit, with the value that does."""

    def fits(**change) -> bool:
        return plan(m, dataclasses.replace(run, **change), host_av, dev_av, hints=False).fits

    out = []
    if run.method != "magnitude":
        n = _largest(run.world, run.nsamples - 1, lambda v: fits(nsamples=v))
        if n is not None:
            out.append(f"fewer windows (--nsamples {n})")
        t = _largest(2, run.seqlen - 1, lambda v: fits(seqlen=v))
        if t is not None:
            out.append(f"shorter windows (--seqlen {t})")
        # more ranks on more machines (the same processes per machine): fewer windows per rank
        w = next((w for w in range(run.world + 1, min(run.nsamples, 4096) + 1) if fits(world=w)), None)
        if w is not None:
            out.append(f"more ranks ({w}, on more machines: torchrun --nnodes)")
    if not p.host_fits and run.local_world > 1:
        lw = _largest(1, run.local_world - 1, lambda v: fits(local_world=v))
        if lw is not None:
            out.append(f"fewer processes per machine (--nproc-per-node {lw}, with more machines)")
    if run.device != "cpu" and run.method != "magnitude":
        other = "cpu" if p.streams_on == "device" else "device"
        if fits(streams=other):
            out.append(f"streams on the {'CPU' if other == 'cpu' else 'GPU'} (--streams {other})")
    return out


def measure_host_available() -> int | None:
    """MemAvailable of this machine (Linux), in bytes; None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def measure_device_available(device: str) -> int | None:
    """Free memory of a CUDA device, in bytes; None for the CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    return int(free)
