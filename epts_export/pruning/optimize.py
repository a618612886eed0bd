"""The optimize stage: model + calibration + spec -> artifact folder (EPTS or a one-level baseline).

The walk over blocks exists once (``_walk``): capture block-0 inputs, then for each block move it
to the device, do the method's work, carry the next inputs forward. EPTS checkpoints after every
block into ``<out>.partial/ckpt`` so ``resume=True`` continues where an interrupted run stopped
and produces the same artifact as an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..artifact.folder import ARTIFACT, ELASTIC_FILE, MODEL_DIR, library_versions, tensor_key
from .baselines import METHODS, prune_block_calibrated, prune_magnitude
from .blockloop import capture_block_inputs, to_device
from .calibration import CalibSpec, build_calibration
from .epts import TrainConfig, cost_per_block, optimize_block
from ..errors import UserError
from ..models.families import family_for, get_blocks, iter_prunable, measured_sparsity, prunable_linears
from ..fsutil import file_hashes, partial_path, sha256_bytes, write_json
from ..core.levels import Level, build_groups
from ..models.source import save_tokenizer
from ..progress import Progress


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


def _check_spec(spec: OptimizeSpec) -> None:
    if spec.method not in METHODS:
        raise UserError(f"unknown method {spec.method!r}: choose one of {', '.join(METHODS)}")
    if spec.method != "epts" and len(spec.levels) != 1:
        raise UserError(f"--method {spec.method} prunes to one level per run; got {len(spec.levels)} levels")
    if spec.train.epochs < 1 or spec.train.rank < 1:
        raise UserError("--epochs and --rank must be >= 1")
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


def optimize(spec: OptimizeSpec, progress: Progress | None = None, on_block_done: Callable[[int], None] | None = None) -> Path:
    """Run ``spec.method`` and write the artifact folder at ``spec.out``; returns its path.

    ``on_block_done(i)`` is called after block i is checkpointed (tests use it to interrupt).
    """
    from ..models.source import load_model, resolve_model

    _check_spec(spec)
    progress = progress or Progress(enabled=False)
    out = Path(spec.out)
    tmp = partial_path(out)
    if out.exists() and not spec.overwrite:
        raise UserError(f"output {out} already exists: choose another --out or pass --overwrite")
    if tmp.exists() and not spec.resume:
        raise UserError(f"{tmp} holds an interrupted run: pass --resume to continue it, or delete it to start over")
    if spec.threads:
        torch.set_num_threads(spec.threads)

    t0 = time.time()
    with progress.status(f"loading model {spec.model}"):
        resolved = resolve_model(spec.model, progress=progress.enabled)
        model, tok = load_model(resolved)
    fam = family_for(model)
    _check_nm(model, fam, spec.levels)
    levels = spec.levels
    groups = build_groups(levels) if spec.method == "epts" else []

    calib = None
    if spec.method != "magnitude":
        with progress.status(f"building calibration set from {spec.calib.source}"):
            calib = build_calibration(spec.calib, tok, model, model_key=resolved.source.get("sha256"))

    settings = {"method": spec.method, "levels": [lv.name for lv in levels], **asdict(spec.train),
                "nsamples": spec.calib.nsamples, "seqlen": spec.calib.seqlen, "seed": spec.calib.seed, "device": spec.device}
    fingerprint = sha256_bytes(json.dumps({"model": resolved.source.get("sha256"), "calib": calib.record if calib else None,
                                           "settings": {k: v for k, v in settings.items() if k != "device"}}, sort_keys=True).encode())
    tmp.mkdir(parents=True, exist_ok=True)
    ckpt = tmp / "ckpt"
    metrics: list[dict] = []
    try:
        if spec.method == "epts":
            metrics = _run_epts(model, fam, calib.samples, groups, spec, ckpt, fingerprint, progress, on_block_done)
        elif spec.method == "magnitude":
            with torch.no_grad():
                for block in get_blocks(model, fam):
                    prune_magnitude(prunable_linears(block, fam), levels[0])
        else:
            _run_baseline(model, fam, calib.samples, spec, progress)

        with progress.status("writing artifact"):
            model_dir = tmp / MODEL_DIR
            if model_dir.exists():
                shutil.rmtree(model_dir)
            model.save_pretrained(model_dir)
            save_tokenizer(tok, model_dir)
            if spec.method == "epts":
                _merge_block_files(ckpt, tmp / ELASTIC_FILE, len(get_blocks(model, fam)))
            shutil.rmtree(ckpt, ignore_errors=True)
            manifest = {
                **ARTIFACT.header(),
                "method": spec.method,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "model": {**resolved.source, "architecture": type(model).__name__, "model_type": model.config.model_type,
                          "family": fam.name, "num_blocks": len(get_blocks(model, fam)), "prunable": list(fam.prunable)},
                "levels": [lv.name for lv in levels],
                "groups": [g.to_dict() for g in groups],
                "settings": settings,
                "calibration": calib.record if calib else None,
                "versions": library_versions(),
                "elapsed_s": round(time.time() - t0, 1),
                "block_metrics": metrics,
            }
            if spec.method != "epts":
                manifest["measured_sparsity"] = round(measured_sparsity(model), 6)
            manifest["files"] = file_hashes(tmp)
            write_json(tmp / "manifest.json", manifest)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except KeyboardInterrupt:
        if spec.method == "epts":
            raise UserError(f"interrupted; the finished blocks are checkpointed in {tmp}: re-run with --resume to continue", exit_code=130) from None
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError("interrupted; nothing was written", exit_code=130) from None
    except BaseException:
        if spec.method != "epts":
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _run_baseline(model, fam, samples, spec: OptimizeSpec, progress: Progress) -> None:
    blocks = get_blocks(model, fam)
    inps = capture_block_inputs(model, fam, samples)
    kwargs_dev = to_device(inps.kwargs, spec.device)
    hidden = inps.hidden
    with progress.task(f"{spec.method} {spec.levels[0].name}", total=2 * len(samples) * len(blocks)) as advance:
        for block in blocks:
            block.to(spec.device)
            hidden = prune_block_calibrated(spec.method, block, prunable_linears(block, fam), hidden, kwargs_dev,
                                            spec.levels[0], spec.device, advance)
            block.to("cpu")


def _run_epts(model, fam, samples, groups, spec: OptimizeSpec, ckpt: Path, fingerprint: str,
              progress: Progress, on_block_done) -> list[dict]:
    blocks = get_blocks(model, fam)
    nblocks = len(blocks)
    ckpt.mkdir(parents=True, exist_ok=True)
    state_file = ckpt / "state.json"
    start, metrics = 0, []
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if state.get("fingerprint") != fingerprint:
            raise UserError(f"{ckpt.parent} was started with a different model, calibration or settings; "
                            "delete it or re-run with the original arguments")
        start, metrics = int(state["done"]), state["metrics"]
        streams = load_file(ckpt / "streams.safetensors")
        dense = list(streams["dense"].unbind(0))
        sparse = list(streams["sparse"].unbind(0))
        kwargs = capture_block_inputs(model, fam, samples[:1]).kwargs
    else:
        inps = capture_block_inputs(model, fam, samples)
        kwargs = inps.kwargs
        dense = inps.hidden
        sparse = [h.clone() for h in inps.hidden]
    kwargs_dev = to_device(kwargs, spec.device)

    per_block = cost_per_block(len(samples), spec.train.epochs, len(groups))
    with progress.task("EPTS", total=per_block * nblocks, completed=per_block * start) as advance:
        for i in range(start, nblocks):
            progress.describe(f"EPTS block {i + 1}/{nblocks}")
            block = blocks[i].to(spec.device)
            res = optimize_block(block, prunable_linears(block, fam), dense, sparse, kwargs_dev, groups, spec.train,
                                 seed=spec.calib.seed * 1_000_003 + i, device=spec.device, advance=advance)
            blocks[i].to("cpu")
            dense, sparse = res.dense_out, res.sparse_out
            tensors = {}
            for n in res.ranks:
                tensors[tensor_key(i, n, "order")] = res.ranks[n].contiguous()
                tensors[tensor_key(i, n, "lora_A")] = res.lora_A[n].contiguous()
                tensors[tensor_key(i, n, "lora_B")] = res.lora_B[n].contiguous()
            tensors[f"blocks.{i}.low_group_lora"] = torch.tensor([res.low_group_lora])
            _save_atomic(tensors, ckpt / f"block_{i:04d}.safetensors")
            _save_atomic({"dense": torch.stack(dense), "sparse": torch.stack(sparse)}, ckpt / "streams.safetensors")
            metrics.append({"block": i, "low_group_lora": res.low_group_lora, **res.metrics})
            write_json(state_file, {"fingerprint": fingerprint, "done": i + 1, "metrics": metrics})
            if on_block_done:
                on_block_done(i)
    return metrics


def _save_atomic(tensors: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def _merge_block_files(ckpt: Path, dest: Path, nblocks: int) -> None:
    tensors, flags = {}, []
    for i in range(nblocks):
        part = load_file(ckpt / f"block_{i:04d}.safetensors")
        flags.append(bool(part.pop(f"blocks.{i}.low_group_lora").item()))
        tensors.update(part)
    tensors["low_group_lora"] = torch.tensor(flags)
    save_file(tensors, str(dest), metadata={"format": ARTIFACT.format, "schema_version": str(ARTIFACT.schema_version)})
