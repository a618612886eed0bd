"""The optimize stage: model + calibration + spec -> artifact folder (EPTS or a one-level baseline).

The walk over blocks exists once per method shape: capture block-0 inputs, then for each block
move it to the device, do the method's work, carry the next inputs forward. EPTS checkpoints after
every block into ``<out>.partial/ckpt`` so ``resume=True`` continues where an interrupted run
stopped and produces the same artifact as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..artifact.folder import ARTIFACT, ELASTIC_FILE, METHODS, MODEL_DIR, library_versions, tensor_key
from ..core.levels import Group, Level, build_groups
from ..errors import UserError
from ..fsutil import atomic_path, check_destination, file_hashes, sha256_bytes, staged_dir, write_json
from ..models.families import Family, family_for, get_blocks, iter_prunable, measured_sparsity, prunable_linears
from ..progress import Progress
from .baselines import prune_block_calibrated, prune_magnitude
from .blockloop import capture_block_inputs, to_device
from .calibration import CalibSpec, build_calibration
from .epts import BlockResult, TrainConfig, cost_per_block, optimize_block
from .presets import load_preset


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

    @classmethod
    def from_preset(cls, model: str, out: Path, levels: list[Level], preset: str = "default", *,
                    calib: str | None = None, nsamples: int | None = None, seqlen: int | None = None,
                    epochs: int | None = None, rank: int | None = None, lr: float | None = None, seed: int = 0,
                    **rest) -> "OptimizeSpec":
        """The spec of a preset (calibration/<preset>.toml), with any setting given here winning
        over the preset's. ``rest``: method, device, resume, overwrite, threads."""
        p = load_preset(preset)

        def pick(value, key):
            return value if value is not None else p[key]

        return cls(model=model, out=Path(out), levels=levels,
                   calib=CalibSpec(source=pick(calib, "calib"), nsamples=pick(nsamples, "nsamples"),
                                   seqlen=pick(seqlen, "seqlen"), seed=seed),
                   train=TrainConfig(rank=pick(rank, "rank"), epochs=pick(epochs, "epochs"), lr=pick(lr, "lr")),
                   **rest)


def _check_spec(spec: OptimizeSpec) -> None:
    if spec.method not in METHODS:
        raise UserError(f"unknown method {spec.method!r}: choose one of {', '.join(METHODS)}")
    if spec.method != "epts" and len(spec.levels) != 1:
        raise UserError(f"--method {spec.method} prunes to one level per run; got {len(spec.levels)} levels")
    if spec.train.epochs < 1 or spec.train.rank < 1:
        raise UserError("--epochs and --rank must be >= 1")
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


def optimize(spec: OptimizeSpec, progress: Progress | None = None, on_block_done: Callable[[int], None] | None = None) -> Path:
    """Run ``spec.method`` and write the artifact folder at ``spec.out``; returns its path.

    ``on_block_done(i)`` is called after block i is checkpointed (tests use it to interrupt).
    """
    _check_spec(spec)
    progress = progress or Progress(enabled=False)
    out = Path(spec.out)
    epts = spec.method == "epts"
    if spec.threads:
        torch.set_num_threads(spec.threads)
    t0 = time.time()
    local = [spec.model] if Path(spec.model).expanduser().exists() else []
    check_destination(out, overwrite=spec.overwrite, inputs=local)
    try:
        with staged_dir(out, overwrite=spec.overwrite, resumable=epts, resume=spec.resume) as tmp:
            run = _load(spec, progress)
            metrics: list[dict] = []
            if epts:
                metrics = _run_epts(run, spec, tmp / "ckpt", progress, on_block_done)
            elif spec.method == "magnitude":
                with torch.no_grad():
                    for block in get_blocks(run.model, run.fam):
                        prune_magnitude(prunable_linears(block, run.fam), spec.levels[0])
            else:
                _run_baseline(run, spec, progress)
            with progress.status("writing artifact"):
                _write_artifact(tmp, run, spec, metrics, time.time() - t0)
    except KeyboardInterrupt:
        if epts:
            raise UserError(f"interrupted; the finished blocks are checkpointed in {out}.partial: "
                            "re-run with --resume to continue", exit_code=130) from None
        raise UserError("interrupted; nothing was written", exit_code=130) from None
    return out


def _load(spec: OptimizeSpec, progress: Progress) -> _Run:
    """Resolve and load the model, check the levels against it, build the calibration set."""
    from ..artifact.evaluate import check_context
    from ..models import load_model, resolve_model

    with progress.status(f"loading model {spec.model}"):
        resolved = resolve_model(spec.model, progress=progress.enabled)
        model, tok = load_model(resolved)
    fam = family_for(model)
    _check_nm(model, fam, spec.levels)
    check_context(spec.calib.seqlen, model.config)
    calib = None
    if spec.method != "magnitude":
        with progress.status(f"building calibration set from {spec.calib.source}"):
            calib = build_calibration(spec.calib, tok, model, model_key=resolved.source.get("sha256"))
    settings = {"method": spec.method, "levels": [lv.name for lv in spec.levels], **asdict(spec.train),
                "nsamples": spec.calib.nsamples, "seqlen": spec.calib.seqlen, "seed": spec.calib.seed, "device": spec.device}
    fingerprint = sha256_bytes(json.dumps({"model": resolved.source.get("sha256"), "calib": calib.record if calib else None,
                                           "settings": {k: v for k, v in settings.items() if k != "device"}},
                                          sort_keys=True).encode())
    groups = build_groups(spec.levels) if spec.method == "epts" else []
    return _Run(model, tok, fam, resolved.source, groups, calib, settings, fingerprint)


def _write_artifact(tmp: Path, run: _Run, spec: OptimizeSpec, metrics: list[dict], elapsed: float) -> None:
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
        _merge_block_files(tmp / "ckpt", tmp / ELASTIC_FILE, nblocks)
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
        "versions": library_versions(),
        "elapsed_s": round(elapsed, 1),
        "block_metrics": metrics,
    }
    if spec.method != "epts":
        manifest["measured_sparsity"] = round(measured_sparsity(model), 6)
    manifest["files"] = file_hashes(tmp)
    write_json(tmp / "manifest.json", manifest)


def _run_baseline(run: _Run, spec: OptimizeSpec, progress: Progress) -> None:
    blocks = get_blocks(run.model, run.fam)
    samples = run.calib.samples
    inps = capture_block_inputs(run.model, run.fam, samples)
    kwargs_dev = to_device(inps.kwargs, spec.device)
    hidden = inps.hidden
    with progress.task(f"{spec.method} {spec.levels[0].name}", total=2 * len(samples) * len(blocks)) as advance:
        for block in blocks:
            block.to(spec.device)
            hidden = prune_block_calibrated(spec.method, block, prunable_linears(block, run.fam), hidden, kwargs_dev,
                                            spec.levels[0], spec.device, advance)
            block.to("cpu")


def _resume_state(run: _Run, ckpt: Path) -> tuple[int, list[dict], list, list, dict]:
    """(first block to do, metrics so far, dense stream, sparse stream, block kwargs): from the
    checkpoint of an interrupted run with the same fingerprint, or a fresh start."""
    samples = run.calib.samples
    state_file = ckpt / "state.json"
    if not state_file.exists():
        inps = capture_block_inputs(run.model, run.fam, samples)
        return 0, [], inps.hidden, [h.clone() for h in inps.hidden], inps.kwargs
    try:
        state = json.loads(state_file.read_text())
    except (ValueError, OSError) as e:
        raise UserError(f"{state_file} is corrupted ({e}): delete {ckpt.parent} to start over") from None
    if not isinstance(state, dict) or state.get("fingerprint") != run.fingerprint:
        raise UserError(f"{ckpt.parent} was started with a different model, calibration or settings; "
                        "delete it or re-run with the original arguments")
    streams = _load_checkpoint(ckpt / "streams.safetensors")
    kwargs = capture_block_inputs(run.model, run.fam, samples[:1]).kwargs
    return (int(state["done"]), state["metrics"], list(streams["dense"].unbind(0)), list(streams["sparse"].unbind(0)),
            kwargs)


def _run_epts(run: _Run, spec: OptimizeSpec, ckpt: Path, progress: Progress, on_block_done) -> list[dict]:
    blocks = get_blocks(run.model, run.fam)
    nblocks = len(blocks)
    ckpt.mkdir(parents=True, exist_ok=True)
    start, metrics, dense, sparse, kwargs = _resume_state(run, ckpt)
    kwargs_dev = to_device(kwargs, spec.device)
    per_block = cost_per_block(len(run.calib.samples), spec.train.epochs, len(run.groups))
    with progress.task("EPTS", total=per_block * nblocks, completed=per_block * start) as advance:
        for i in range(start, nblocks):
            progress.describe(f"EPTS block {i + 1}/{nblocks}")
            block = blocks[i].to(spec.device)
            res = optimize_block(block, prunable_linears(block, run.fam), dense, sparse, kwargs_dev, run.groups, spec.train,
                                 seed=spec.calib.seed * 1_000_003 + i, device=spec.device, advance=advance)
            blocks[i].to("cpu")
            dense, sparse = res.dense_out, res.sparse_out
            _save_tensors(_block_tensors(i, res), ckpt / f"block_{i:04d}.safetensors")
            _save_tensors({"dense": torch.stack(dense), "sparse": torch.stack(sparse)}, ckpt / "streams.safetensors")
            metrics.append({"block": i, "low_group_lora": res.low_group_lora, **res.metrics})
            write_json(ckpt / "state.json", {"fingerprint": run.fingerprint, "done": i + 1, "metrics": metrics})
            if on_block_done:
                on_block_done(i)
    return metrics


def _block_tensors(i: int, res: BlockResult) -> dict[str, torch.Tensor]:
    tensors = {}
    for n in res.order:
        tensors[tensor_key(i, n, "order")] = res.order[n].contiguous()
        tensors[tensor_key(i, n, "lora_A")] = res.lora_A[n].contiguous()
        tensors[tensor_key(i, n, "lora_B")] = res.lora_B[n].contiguous()
    tensors[f"blocks.{i}.low_group_lora"] = torch.tensor([res.low_group_lora])
    return tensors


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file of an interrupted run; UserError when it is missing or truncated."""
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: the file cannot be trusted either way
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:120]}): "
                        f"delete {path.parent.parent} to start over") from None


def _save_tensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _merge_block_files(ckpt: Path, dest: Path, nblocks: int) -> None:
    tensors, flags = {}, []
    for i in range(nblocks):
        part = _load_checkpoint(ckpt / f"block_{i:04d}.safetensors")
        flags.append(bool(part.pop(f"blocks.{i}.low_group_lora").item()))
        tensors.update(part)
    tensors["low_group_lora"] = torch.tensor(flags)
    _save_tensors(tensors, dest, {"format": ARTIFACT.format, "schema_version": str(ARTIFACT.schema_version)})
