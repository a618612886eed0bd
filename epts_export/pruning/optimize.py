"""The optimize stage: model + calibration + spec -> artifact folder (EPTS or a one-level baseline).

The walk over blocks exists once per method shape: capture block-0 inputs, then for each block
move it to the device, do the method's work, carry the next inputs forward. EPTS checkpoints after
every block into ``<out>.partial/ckpt`` so ``resume=True`` continues where an interrupted run
stopped and produces the same artifact as an uninterrupted run.

Under ``torchrun`` the same walk runs data-parallel (``distributed.py``): each rank holds its share
of the windows and their streams, the collectives make every rank's block result the same, and
rank 0 alone writes the block checkpoints, the state and the artifact; each rank writes its own
streams. Before anything heavy is loaded, ``plan_optimize`` estimates the memory per rank
(``preflight.py``) and refuses a run that cannot fit.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..artifact.folder import ARTIFACT, ELASTIC_FILE, METHODS, MODEL_DIR, library_versions
from ..core.allocation import Allocation, UNIFORM, parse_allocation
from ..core.levels import GROUP_WIDTH, LOW_GROUP_TOP, Group, Level
from ..errors import UserError
from ..fsutil import check_destination, file_hashes, partial_path, sha256_bytes, staged_dir, write_json
from ..models.families import Family, family_for, get_blocks, iter_prunable, measured_sparsity, prunable_linears
from ..progress import Progress
from .allocate import allocate, error_windows
from .baselines import prune_block_calibrated, prune_magnitude
from .blockloop import capture_block_inputs, to_device
from .calibration import CalibSpec, build_calibration
from .checkpoint import (block_tensors, drop_worker_files, load_streams, merge_block_files, read_state, save_streams,
                         save_tensors, streams_file)
from .distributed import LOCAL, Dist, SharedError, init_distributed, rank_from_env, world_from_env
from ..core.config import TrainConfig, bf16_fast
from .epts import Diverged, cost_per_block, optimize_block, steps_per_epoch
from .preflight import GIB, STREAMS, ModelShape, Plan, RunShape, measure_device_available, measure_host_available, plan
from .presets import check_calibration, load_preset, preset_for

if TYPE_CHECKING:  # pragma: no cover
    from ..models.resolve import ResolvedModel


@dataclass
class OptimizeSpec:
    model: str
    out: Path
    levels: list[Level]
    method: str = "epts"
    calib: CalibSpec = field(default_factory=CalibSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "cpu"
    resume: bool = False
    overwrite: bool = False
    threads: int | None = None
    streams: str = "auto"  # where the calibration streams live on a GPU run: auto | device | cpu
    host_memory_gib: float | None = None  # host memory per machine the run may use (default: MemAvailable)
    device_memory_gib: float | None = None  # device memory per rank (default: the device's free memory)
    resolved: "ResolvedModel | None" = None  # ``model`` resolved already (build's hand-over; one process only)
    preset: str | None = None  # the preset the settings came from (recorded; from_preset sets it)
    allocation: str = "uniform"  # layer-wise allocation: uniform | owl[:LAMBDA[,M]] | error[:LAMBDA] (core.allocation)

    @classmethod
    def from_preset(cls, model: str, out: Path, levels: list[Level], preset: str | None = "default", *,
                    calib: str | None = None, nsamples: int | None = None, seqlen: int | None = None,
                    epochs: int | None = None, rank: int | None = None, lr: float | None = None, seed: int = 0,
                    batch: int | None = None, precision: str | None = None, init: str | None = None,
                    steps: int | None = None, group_width: float | None = None, warmup: int | None = None,
                    low_top: float | None = None, low_span: float | None = None, allocation: str | None = None,
                    **rest) -> "OptimizeSpec":
        """The spec of a preset (calibration/<preset>.toml; None: ``text`` when ``calib`` names
        text, else ``default``), with any setting given here winning over the preset's. ``rest``:
        method, device, resume, overwrite, threads, streams, host_memory_gib, device_memory_gib,
        resolved."""
        preset = preset_for(preset, calib)
        p = load_preset(preset)
        check_calibration(preset, p, calib)

        def pick(value, key):
            return value if value is not None else p[key]

        return cls(model=model, out=Path(out), levels=levels, preset=preset,
                   calib=CalibSpec(source=pick(calib, "calib"), nsamples=pick(nsamples, "nsamples"),
                                   seqlen=pick(seqlen, "seqlen"), seed=seed),
                   train=_train_config(rank=pick(rank, "rank"), epochs=pick(epochs, "epochs"), lr=pick(lr, "lr"),
                                       batch=batch if batch is not None else p.get("batch", 1),
                                       precision=resolve_precision(precision or p.get("precision", "fp32"),
                                                                   rest.get("device", "cpu")),
                                       init=init or p.get("init", "zero"),
                                       steps=steps if steps is not None else p.get("steps", 0),
                                       check_windows=p.get("check_windows", 0), residual=p.get("residual", False),
                                       warmup=warmup if warmup is not None else p.get("warmup", 0),
                                       group_width=group_width if group_width is not None
                                       else p.get("group_width", GROUP_WIDTH),
                                       low_top=low_top if low_top is not None else p.get("low_top", LOW_GROUP_TOP),
                                       low_span=low_span if low_span is not None else p.get("low_span", 0.0)),
                   allocation=allocation or ("uniform" if rest.get("method") == "magnitude"  # it has no data to score
                                             else p.get("allocation", "uniform")), **rest)


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """fp32 | bf16 as given; auto: bf16 where it is fast (a CUDA device, a CPU with AVX512-BF16 or
    AMX), else fp32. On other CPUs bf16 matmuls are emulated and slower than fp32."""
    if precision != "auto":
        return precision
    return "bf16" if bf16_fast(device) else "fp32"


def _train_config(**kw) -> TrainConfig:
    try:
        return TrainConfig(**kw)
    except ValueError as e:
        raise UserError(f"--{str(e)}") from None


MAX_STEPS = 1_000_000  # optimizer steps per block (and epochs, warm-up): more is a typo, not a plan


def _check_spec(spec: OptimizeSpec) -> None:
    if spec.method not in METHODS:
        raise UserError(f"unknown method {spec.method!r}: choose one of {', '.join(METHODS)}")
    if parse_allocation(spec.allocation)[0] != "uniform" and spec.method == "magnitude":
        raise UserError(f"--allocation {spec.allocation} scores blocks on calibration data; --method magnitude has none "
                        "(use uniform)")
    if spec.method != "epts" and len(spec.levels) != 1:
        raise UserError(f"--method {spec.method} prunes to one level per run; got {len(spec.levels)} levels")
    if spec.train.epochs < 1 or spec.train.rank < 1 or spec.train.batch < 1:
        raise UserError("--epochs, --rank and --batch must be >= 1")
    if spec.train.steps < 0 or spec.train.check_windows < 0:
        raise UserError("--steps must be >= 1 (or 0: epochs x windows / batch), check_windows >= 0")
    for flag, value, most in (("--steps", spec.train.steps, MAX_STEPS), ("--epochs", spec.train.epochs, MAX_STEPS),
                              ("--warmup", spec.train.warmup, MAX_STEPS), ("--rank", spec.train.rank, 4096),
                              ("--nsamples", spec.calib.nsamples, 1_000_000), ("--seqlen", spec.calib.seqlen, 1_048_576)):
        if value > most:
            raise UserError(f"{flag} must be at most {most:,}, got {value:,}")
    if spec.train.steps and spec.train.warmup > spec.train.steps:
        raise UserError(f"--warmup ({spec.train.warmup}) must not exceed --steps ({spec.train.steps})")
    if not 0 <= spec.calib.seed < 2**63:
        raise UserError(f"--seed must be between 0 and 2**63 - 1, got {spec.calib.seed}")
    if spec.threads is not None:
        from ..device.runner import check_threads

        check_threads(spec.threads)
    if not (math.isfinite(spec.train.lr) and spec.train.lr > 0):
        raise UserError(f"--lr must be a positive number, got {spec.train.lr}")
    if not math.isfinite(spec.train.scale):
        raise UserError(f"the LoRA scale must be a finite number, got {spec.train.scale}")
    if spec.calib.nsamples < 1 or spec.calib.seqlen < 2:
        raise UserError("--nsamples must be >= 1 and --seqlen >= 2")
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {spec.device}: no CUDA device is available here; use --device cpu")
    if spec.device != "cpu" and not spec.device.startswith("cuda"):
        raise UserError(f"--device must be cpu or cuda[:N], got {spec.device!r}")
    if spec.streams not in STREAMS:
        raise UserError(f"--streams must be one of {', '.join(STREAMS)}, got {spec.streams!r}")
    if spec.streams == "device" and spec.device == "cpu":
        raise UserError("--streams device keeps the streams on the GPU: it needs --device cuda")
    for flag, v in (("--host-memory", spec.host_memory_gib), ("--device-memory", spec.device_memory_gib)):
        if v is not None and not (math.isfinite(v) and 0 < v <= 2**20):
            raise UserError(f"{flag} must be a positive number of GiB (at most 2**20, a PiB), got {v:g}")


def _check_parallel(spec: OptimizeSpec, world: int) -> None:
    """What a run over ``world`` processes needs beyond a single-process one."""
    if world == 1:
        return
    if spec.method == "epts" and spec.train.batch % world:
        raise UserError(f"--batch {spec.train.batch} does not split over {world} processes: pass --batch {world} "
                        f"(or another multiple of {world}) here and to the one-process run it must match")
    if spec.method != "magnitude" and spec.calib.nsamples < world:
        raise UserError(f"--nsamples {spec.calib.nsamples} gives some of the {world} processes no window: "
                        f"use at least {world} windows or fewer processes")


def _check_nm(model, fam, levels: list[Level]) -> None:
    for lv in levels:
        if lv.is_nm:
            for i, n, lin in iter_prunable(model, fam):
                if lin.in_features % lv.m:
                    raise UserError(f"level {lv.name} needs in_features divisible by {lv.m}; block {i} {n} has {lin.in_features}")


@dataclass
class _Run:
    """What one optimize run works on, once loaded."""

    model: torch.nn.Module
    tokenizer: object
    fam: Family
    source: dict  # the resolved model's source record
    groups: list[Group]
    calib: object | None  # Calibration (None for magnitude pruning)
    settings: dict
    fingerprint: str  # checkpoints of a resumed run must come from the same inputs
    alloc: Allocation = UNIFORM  # the layer-wise allocation (computed on the dense model before the walk)


def optimize(spec: OptimizeSpec, progress: Progress | None = None, on_block_done: Callable[[int], None] | None = None) -> Path:
    """Run ``spec.method`` and write the artifact folder at ``spec.out``; returns its path.

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this; it returns on every rank once rank 0
    has written the artifact. ``on_block_done(i)`` is called after block i is checkpointed (tests
    use it to interrupt).
    """
    try:
        _check_spec(spec)
        _check_parallel(spec, world_from_env())
    except UserError as e:
        if rank_from_env() != 0:  # the same flags, the same error on rank 0
            raise SharedError(str(e), e.exit_code) from None
        raise
    with init_distributed(spec.device) as (dist, device):
        if not dist.is_main:
            progress = None  # one progress display: rank 0's
        return _optimize(spec, dist, device, progress or Progress(enabled=False), on_block_done)


def plan_optimize(spec: OptimizeSpec, progress: Progress | None = None) -> Plan:
    """The memory pre-flight of ``spec`` alone (``--dry-run``): resolves the model (its config and
    weight headers; no weights are loaded) and returns the estimate per rank for the launch in the
    environment (torchrun's WORLD_SIZE / LOCAL_WORLD_SIZE, or one process). UserError, with the
    numbers and what to change, when the run cannot fit. ``optimize`` runs the same check first."""
    progress = progress or Progress(enabled=False)
    _check_spec(spec)
    world = world_from_env()
    _check_parallel(spec, world)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return _plan(spec, _resolve(spec, progress, LOCAL), LOCAL, spec.device, world, local_world)


def _resolve(spec: OptimizeSpec, progress: Progress, dist: Dist):
    """The resolved model: rank 0 resolves it first (a download or a conversion happens once); a
    rank that sees rank 0's folder takes it as is (hashing 140 GB once is enough), a rank on
    another machine resolves its own copy, which must have rank 0's sha256."""
    from ..models import resolve_model

    if spec.resolved is not None and dist.world == 1:
        return spec.resolved
    first = dist.on_main(lambda: resolve_model(spec.model, progress=progress.enabled))

    def mine():
        if dist.is_main or Path(first.path).is_dir():
            return first
        r = resolve_model(spec.model, progress=False)
        if r.source.get("sha256") != first.source.get("sha256"):
            raise UserError(f"the model {spec.model} on this machine ({r.path}) is not rank 0's (sha256 "
                            f"{str(r.source.get('sha256'))[:12]} vs {str(first.source.get('sha256'))[:12]}): "
                            "give every machine the same weights")
        return r

    return dist.agree(mine)


def _plan(spec: OptimizeSpec, resolved, dist: Dist, device: str, world: int, local_world: int) -> Plan:
    def check() -> Plan:
        shape = ModelShape.from_config(resolved.config, resolved.params)
        groups = spec.train.groups(spec.levels) if spec.method == "epts" else []
        run = RunShape(method=spec.method, nsamples=spec.calib.nsamples, seqlen=spec.calib.seqlen, groups=len(groups),
                       rank=spec.train.rank, nm_levels=sum(1 for lv in spec.levels if lv.is_nm), world=world,
                       local_world=local_world, device="cuda" if device.startswith("cuda") else "cpu",
                       streams=spec.streams)
        host = spec.host_memory_gib * GIB if spec.host_memory_gib else measure_host_available()
        dev = spec.device_memory_gib * GIB if spec.device_memory_gib else measure_device_available(device)
        p = plan(shape, run, int(host) if host else None, int(dev) if dev else None)
        if not p.fits:
            raise UserError(p.refusal())
        return p

    return dist.agree(check)  # each rank measures its own machine and device; rank 0 prints the first refusal


def _optimize(spec: OptimizeSpec, dist: Dist, device: str, progress: Progress, on_block_done) -> Path:
    out = Path(spec.out)
    epts = spec.method == "epts"
    if spec.threads:
        torch.set_num_threads(spec.threads)
    t0 = time.time()
    local = [spec.model] if Path(spec.model).expanduser().exists() else []
    dist.on_main(lambda: check_destination(out, overwrite=spec.overwrite, inputs=local))
    resolved = _resolve(spec, progress, dist)
    estimate = _plan(spec, resolved, dist, device, dist.world, dist.local_world)
    progress.note(estimate.summary() + (f"; {dist.world} processes ({dist.backend})" if dist.world > 1 else ""))
    try:
        with contextlib.ExitStack() as stack:
            # rank 0 owns <out>.partial (the lock on a resumable run, the final rename); the other
            # ranks write their streams into <out>.partial/ckpt of their own machine
            tmp = dist.on_main(lambda: stack.enter_context(
                staged_dir(out, overwrite=spec.overwrite, resumable=epts, resume=spec.resume)))
            if not dist.is_main and epts:
                tmp = partial_path(out)
                (tmp / "ckpt").mkdir(parents=True, exist_ok=True)
            run = _load(spec, resolved, progress, dist)
            run.alloc = _allocate(run, spec, progress, dist, device)
            metrics: list[dict] = []
            if epts:
                metrics = _run_epts(run, spec, tmp / "ckpt", progress, on_block_done, dist, device, estimate)
            elif spec.method == "magnitude":
                if dist.is_main:  # no data, nothing to share: rank 0 prunes, the others wait
                    with torch.no_grad():
                        for block in get_blocks(run.model, run.fam):
                            prune_magnitude(prunable_linears(block, run.fam), spec.levels[0])
            else:
                _run_baseline(run, spec, progress, dist, device, estimate)
            if dist.is_main:
                with progress.status("writing artifact"):
                    _write_artifact(tmp, run, spec, metrics, time.time() - t0, estimate, dist)
            elif epts:
                drop_worker_files(tmp, dist)
    except Diverged:
        if dist.is_main:  # its checkpoints were trained at the same lr: nothing worth resuming
            shutil.rmtree(partial_path(out), ignore_errors=True)
        raise
    except KeyboardInterrupt:
        if epts:
            raise UserError(f"interrupted; the finished blocks are checkpointed in {out}.partial: "
                            "re-run with --resume to continue", exit_code=130) from None
        raise UserError("interrupted; nothing was written", exit_code=130) from None
    dist.barrier()  # every rank returns once the artifact exists
    return out


def _load(spec: OptimizeSpec, resolved, progress: Progress, dist: Dist = LOCAL) -> _Run:
    """Load the resolved model, check the levels against it, build the calibration set (on rank 0,
    shared with the others, so every rank calibrates on the same windows)."""
    from ..artifact.evaluate import check_context
    from ..models import load_model

    with progress.status(f"loading model {spec.model}"):
        model, tok = dist.agree(lambda: load_model(resolved.path))

    def checks() -> Family:
        fam = family_for(model)
        _check_nm(model, fam, spec.levels)
        check_context(spec.calib.seqlen, model.config)
        return fam

    fam = dist.agree(checks)
    calib = None
    if spec.method != "magnitude":
        with progress.status(f"building calibration set from {spec.calib.source}"):
            calib = dist.on_main(lambda: build_calibration(spec.calib, tok, model, model_key=resolved.source.get("sha256")))
    settings = {"method": spec.method, "levels": [lv.name for lv in spec.levels], **asdict(spec.train),
                "allocation": spec.allocation,
                "nsamples": spec.calib.nsamples, "seqlen": spec.calib.seqlen, "seed": spec.calib.seed, "device": spec.device,
                **({"preset": spec.preset} if spec.preset else {})}
    fingerprint = sha256_bytes(json.dumps({"model": resolved.source.get("sha256"), "calib": calib.record if calib else None,
                                           "settings": {k: v for k, v in settings.items() if k not in ("device", "preset")}},
                                          sort_keys=True).encode())
    groups = spec.train.groups(spec.levels) if spec.method == "epts" else []
    return _Run(model, tok, fam, resolved.source, groups, calib, settings, fingerprint)


def _allocate(run: _Run, spec: OptimizeSpec, progress: Progress, dist: Dist, device: str) -> Allocation:
    """The run's layer-wise allocation: uniform, or scored on the dense model over this rank's
    calibration windows (every rank's statistics combined, so every rank gets the same offsets)."""
    method, lam, m = parse_allocation(spec.allocation)
    if method == "uniform":
        return UNIFORM
    samples = run.calib.samples[dist.owned(len(run.calib.samples))]
    nblocks = len(get_blocks(run.model, run.fam))
    passes = (len(samples) + (error_windows(len(samples), dist) if method == "error" else 0)) * nblocks
    with progress.task(f"{method} allocation: scoring blocks", total=passes) as advance:
        alloc = allocate(method, lam, m, run.model, run.fam, samples, device, advance, dist)
    progress.note(f"allocation: {alloc.describe()}")
    return alloc


def _write_artifact(tmp: Path, run: _Run, spec: OptimizeSpec, metrics: list[dict], elapsed: float,
                    estimate: Plan | None = None, dist: Dist = LOCAL) -> None:
    """model/, elastic.safetensors (EPTS) and manifest.json into the staged folder."""
    from ..models.hf import save_model, save_tokenizer

    model, fam = run.model, run.fam
    model_dir = tmp / MODEL_DIR
    if model_dir.exists():
        shutil.rmtree(model_dir)
    save_model(model, model_dir)
    save_tokenizer(run.tokenizer, model_dir)
    nblocks = len(get_blocks(model, fam))
    if spec.method == "epts":
        merge_block_files(tmp / "ckpt", tmp / ELASTIC_FILE, nblocks)
    shutil.rmtree(tmp / "ckpt", ignore_errors=True)
    manifest = {
        **ARTIFACT.header(),
        "method": spec.method,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {**run.source, "architecture": type(model).__name__, "model_type": model.config.model_type,
                  "family": fam.name, "num_blocks": nblocks, "prunable": list(fam.prunable)},
        "levels": [lv.name for lv in spec.levels],
        "groups": [g.to_dict() for g in run.groups],
        "settings": run.settings,
        "calibration": run.calib.record if run.calib else None,
        "allocation": run.alloc.to_dict(),
        "versions": library_versions(),
        "elapsed_s": round(elapsed, 1),
        "block_metrics": metrics,
        "parallel": {"world_size": dist.world, "backend": dist.backend},
    }
    if estimate is not None:
        manifest["memory_estimate"] = estimate.to_dict()
    if spec.method != "epts":
        manifest["measured_sparsity"] = round(measured_sparsity(model), 6)
    manifest["files"] = file_hashes(tmp)
    write_json(tmp / "manifest.json", manifest)


def _streams_device(device: str, estimate: Plan) -> str:
    return device if estimate.streams_on == "device" else "cpu"


def _run_baseline(run: _Run, spec: OptimizeSpec, progress: Progress, dist: Dist = LOCAL, device: str = "cpu",
                  estimate: Plan | None = None) -> None:
    blocks = get_blocks(run.model, run.fam)
    samples = run.calib.samples[dist.owned(len(run.calib.samples))]  # this rank's windows
    streams_dev = _streams_device(device, estimate) if estimate else "cpu"
    inps = capture_block_inputs(run.model, run.fam, samples)
    kwargs_dev = to_device(inps.kwargs, device)
    hidden = [h.to(streams_dev) for h in inps.hidden]
    with progress.task(f"{spec.method} {spec.levels[0].name}", total=2 * len(samples) * len(blocks)) as advance:
        for i, block in enumerate(blocks):
            block.to(device)
            level = spec.levels[0]
            level = level if level.is_nm else Level(sparsity=run.alloc.sparsity(i, level.sparsity))
            hidden = prune_block_calibrated(spec.method, block, prunable_linears(block, run.fam), hidden, kwargs_dev,
                                            level, device, advance, dist=dist, streams_device=streams_dev)
            block.to("cpu")


def _resume_state(run: _Run, ckpt: Path, dist: Dist = LOCAL, nblocks: int | None = None) -> tuple[int, list[dict], list, list, dict]:
    """(first block to do, metrics so far, dense stream, sparse stream, block kwargs) for this rank's
    windows: from the checkpoint of an interrupted run with the same fingerprint and world size,
    or a fresh start."""
    samples = run.calib.samples
    ids = dist.owned(len(samples))
    state = dist.on_main(lambda: read_state(run.fingerprint, ckpt, dist))
    if state is None:
        inps = capture_block_inputs(run.model, run.fam, samples[ids])
        return 0, [], inps.hidden, [h.clone() for h in inps.hidden], inps.kwargs
    done = int(state["done"])
    kwargs = capture_block_inputs(run.model, run.fam, samples[:1]).kwargs
    if nblocks is not None and done >= nblocks:  # every block is done: only the artifact is left to write
        return done, state["metrics"], [], [], kwargs
    dense, sparse = dist.agree(lambda: load_streams(streams_file(ckpt, dist), done, len(ids)))
    return done, state["metrics"], dense, sparse, kwargs


def _trained_windows(train: TrainConfig, nwindows: int, owned: int) -> int:
    """Window passes of this rank's training in one block, for the progress bar: every epoch passes
    each of its ``owned`` windows once; --steps may stop the last epoch early (counted pro rata)."""
    return round(owned * train.total_steps(nwindows) / steps_per_epoch(nwindows, train.batch))


def _run_epts(run: _Run, spec: OptimizeSpec, ckpt: Path, progress: Progress, on_block_done, dist: Dist = LOCAL,
              device: str = "cpu", estimate: Plan | None = None) -> list[dict]:
    blocks = get_blocks(run.model, run.fam)
    nblocks = len(blocks)
    nwindows = len(run.calib.samples)
    ckpt.mkdir(parents=True, exist_ok=True)
    start, metrics, dense, sparse, kwargs = _resume_state(run, ckpt, dist, nblocks)
    streams_dev = _streams_device(device, estimate) if estimate else "cpu"
    dense, sparse = [h.to(streams_dev) for h in dense], [h.to(streams_dev) for h in sparse]
    kwargs_dev = to_device(kwargs, device)
    owned, cw = dist.owned(nwindows), spec.train.check_windows
    trained = _trained_windows(spec.train, nwindows, len(owned))
    per_block = cost_per_block(len(owned), trained, len(run.groups), sum(1 for j in owned if not cw or j < cw),
                               not spec.train.mixes_in_training(nwindows))
    with progress.task("EPTS", total=per_block * nblocks, completed=per_block * start) as advance:
        for i in range(start, nblocks):
            progress.describe(f"EPTS block {i + 1}/{nblocks}")
            block = blocks[i].to(device)
            res = optimize_block(block, prunable_linears(block, run.fam), dense, sparse, kwargs_dev, run.groups, spec.train,
                                 seed=spec.calib.seed * 1_000_003 + i, device=device, advance=advance, dist=dist,
                                 nwindows=nwindows, streams_device=streams_dev, alloc=run.alloc, index=i)
            blocks[i].to("cpu")
            dense, sparse = res.dense_out, res.sparse_out
            if dist.is_main:
                save_tensors(block_tensors(i, res), ckpt / f"block_{i:04d}.safetensors")
            save_streams(streams_file(ckpt, dist), dense, sparse, done=i + 1)
            metrics.append({"block": i, "low_group_lora": res.low_group_lora, **res.metrics})
            dist.barrier()  # every rank's streams are on disk before the state says block i is done
            if dist.is_main:
                write_json(ckpt / "state.json", {"fingerprint": run.fingerprint, "done": i + 1, "world_size": dist.world,
                                                 "metrics": metrics})
            if on_block_done:
                on_block_done(i)
    return metrics


