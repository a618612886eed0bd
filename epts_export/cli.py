"""The `epts-export` command line. Commands build a spec and call one library function.

Errors: a UserError prints one line `error: ...` and exits with its code (1 for bad input);
set EPTS_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .boundary import boundary as _boundary
from .device.errors import exit_interrupted, install_sigterm, interrupted, interrupted_line
from .errors import UserError
from .fsutil import check_output_file
from .core.levels import DEFAULT_LEVELS
from .progress import Progress, console
from .tables import export_table, parity_table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Optimize a causal LM once with EPTS and serve every sparsity level from it.")

DEFAULT_MODEL = "smollm2-135m"


@app.callback()
def _setup() -> None:
    """Our own progress bars replace transformers' per-file ones."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _levels(text: str | None, flag: str = "--levels"):
    """Levels from a comma list; None stays None (the command's default), an empty list is an error."""
    from .core.levels import parse_levels

    if text is None:
        return None
    if not [p for p in text.split(",") if p.strip()]:
        raise UserError(f"{flag} is empty: pass levels like 0.5,2:4" + (", or leave it out" if flag == "--levels" else ""))
    return parse_levels(text)


@app.command()
@_boundary
def optimize(
    model: str = typer.Argument(DEFAULT_MODEL, help="HF folder, hub id, .gguf file, or the built-in 'smollm2-135m'."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact folder to create."),
    levels: str = typer.Option(DEFAULT_LEVELS, help="Levels: sparsities and N:M patterns, e.g. 0.5,0.7,2:4. "
                               "EPTS serves every sparsity up to the highest one."),
    method: str = typer.Option("epts", help="epts | magnitude | wanda | sparsegpt (the baselines prune one level)."),
    preset: Optional[str] = typer.Option(None, help="Settings preset from calibration/*.toml (default, text, quick, paper; "
                                         "default: text when --calib names text, else default)."),
    calib: Optional[str] = typer.Option(None, help="Calibration: text file, folder, hf:NAME[:CONFIG[:SPLIT]], 'self' (sampled from the model) or 'random'."),
    nsamples: Optional[int] = typer.Option(None, help="Calibration windows."),
    seqlen: Optional[int] = typer.Option(None, help="Tokens per calibration window."),
    epochs: Optional[int] = typer.Option(None, help="Passes over the calibration set per block."),
    rank: Optional[int] = typer.Option(None, help="LoRA rank per sparsity group."),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate (cosine-decayed to 0)."),
    precision: Optional[str] = typer.Option(None, help="fp32 | bf16 | auto: the student passes' precision "
                                            "(auto: bf16 on a CUDA GPU or a CPU with AVX512-BF16/AMX, else fp32)."),
    init: Optional[str] = typer.Option(None, help="zero (B = 0, the reference) | lsq (adapters start from the "
                                       "closed-form least-squares solution)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps per block (default: --epochs x windows / --batch)."),
    warmup: Optional[int] = typer.Option(None, help="Optimizer steps of linear lr warm-up per block (default 0)."),
    group_width: Optional[float] = typer.Option(None, help="Width of the sparsity groups above group 0, each with "
                                                "its own adapters (0.05: the reference's 7 groups up to 0.7; 0.1: 4)."),
    low_top: Optional[float] = typer.Option(None, help="Where group 0, the one set of adapters for the lowest "
                                            "sparsities, ends (the reference: 0.4; the text preset: 0.35)."),
    low_span: Optional[float] = typer.Option(None, help="Fit group 0 over its top LOW_SPAN only, e.g. 0.2: "
                                             "[0.15, 0.35] (0: all of it, the reference)."),
    allocation: Optional[str] = typer.Option(None, help="Per-block sparsity: uniform, owl[:LAMBDA[,M]] (OWL's outlier ratios) "
                                             "or error[:LAMBDA] (each block's pruning error); masks stay nested, the mean is the level."),
    seed: int = typer.Option(0, help="Seed for calibration sampling and every random draw."),
    device: str = typer.Option("cpu", help="cpu or cuda[:N]; one block at a time moves to the device "
                               "(under torchrun: cuda, each rank on cuda:LOCAL_RANK)."),
    batch: Optional[int] = typer.Option(None, help="Calibration windows per optimizer step (default 1); under "
                                        "torchrun a multiple of the world size. The same --batch gives the same "
                                        "artifact on any number of processes."),
    streams: str = typer.Option("auto", help="Where a GPU run keeps the calibration streams between blocks: auto "
                                "(on the GPU when they fit), device, cpu."),
    host_memory: Optional[float] = typer.Option(None, help="GiB of host memory per machine the run may use "
                                                "(default: what the OS reports available)."),
    device_memory: Optional[float] = typer.Option(None, help="GiB of device memory per rank the run may use "
                                                  "(default: the device's free memory)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the memory estimate per rank and exit: 0 when "
                                 "the run fits, 1 (with what to change) when it does not."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch."),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its last finished block "
                                "(with the same number of processes)."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Optimize MODEL with EPTS (or a baseline) into an elastic artifact.

    On several GPUs or machines: torchrun --nproc-per-node N -m epts_export optimize ... --batch N
    """
    from .pruning.distributed import SharedError, rank_from_env, world_from_env
    from .pruning.optimize import OptimizeSpec, optimize as run, plan_optimize

    world_from_env()  # torchrun's environment, checked on every rank (each says what is wrong with its own)
    rank_id = rank_from_env()
    main_rank = rank_id == 0  # under torchrun only rank 0 prints
    spec = None
    try:
        spec = OptimizeSpec.from_preset(model, out, _levels(levels), preset, calib=calib, nsamples=nsamples,
                                        seqlen=seqlen, epochs=epochs, rank=rank, lr=lr, seed=seed, batch=batch,
                                        precision=precision, init=init, steps=steps, group_width=group_width, warmup=warmup,
                                        low_top=low_top, low_span=low_span, allocation=allocation,
                                        method=method, device=device, resume=resume, overwrite=overwrite,
                                        threads=threads, streams=streams, host_memory_gib=host_memory,
                                        device_memory_gib=device_memory)
        if dry_run:
            if main_rank:  # under torchrun rank 0 plans for the launch (every rank would print the same)
                _summary_plan(plan_optimize(spec, Progress(enabled=not quiet)))
            return
        path = run(spec, progress=Progress(enabled=not quiet))
    except UserError as e:
        if main_rank:
            raise
        if e.exit_code == 130:  # Ctrl-C reaches every rank; rank 0 says where the checkpoints are
            raise typer.Exit(130) from None
        if spec is None or isinstance(e, SharedError):
            # rank 0 raises the same error (the same flags, or a shared one): it prints it and fails the job
            raise typer.Exit(0) from None
        raise UserError(f"rank {rank_id}: {e}", e.exit_code) from None
    if main_rank:
        from .artifact.folder import Artifact

        art = Artifact.open(path, verify=False)  # hashed as optimize wrote it
        _summary_artifact(art)
        _calibration_note(art.manifest.get("calibration"))
        console.print(f"wrote {path}")


def _calibration_note(record) -> None:
    from .pruning.presets import calibration_note

    note = calibration_note(record)
    if note:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)


def _summary_plan(estimate) -> None:
    from .pruning.preflight import fmt_bytes

    r = estimate.run
    t = Table(title=f"memory per rank: {r.method}, {r.nsamples} x {r.seqlen} tokens, {r.world} process(es), "
                    f"--device {r.device}", show_header=False)
    for where, parts in (("host", estimate.host), ("device", estimate.device)):
        for k, v in parts.items():
            t.add_row(where, k, fmt_bytes(v))
    t.add_row("host", "per rank" + (f" x {r.local_world} per machine" if r.local_world > 1 else ""),
              fmt_bytes(estimate.host_per_machine))
    if estimate.host_available is not None:
        t.add_row("host", "available", fmt_bytes(estimate.host_available))
    if r.device != "cpu":
        t.add_row("device", "per rank", fmt_bytes(estimate.device_per_rank))
        if estimate.device_available is not None:
            t.add_row("device", "available", fmt_bytes(estimate.device_available))
    if r.method != "magnitude":
        t.add_row("streams", "on the GPU" if estimate.streams_on == "device" else "on the CPU",
                  f"{estimate.windows_per_rank} windows per rank")
    console.print(t)
    console.print("fits", highlight=False)


def _summary_artifact(art) -> None:
    path = art.path
    m = art.manifest
    t = Table(title=f"artifact {path}", show_header=False)
    t.add_row("method", m["method"])
    t.add_row("model", f"{m['model'].get('spec')} ({m['model'].get('architecture', '?')}, {m['model'].get('num_blocks', '?')} blocks)")
    t.add_row("serves", art.describe_range())
    c = m.get("calibration")
    if isinstance(c, dict):
        t.add_row("calibration", f"{c.get('source')}: {c.get('nsamples')} x {c.get('seqlen')} tokens (seed {c.get('seed')})")
    t.add_row("allocation", art.allocation.describe())
    if isinstance(m.get("settings"), dict) and m["settings"].get("preset"):
        t.add_row("preset", str(m["settings"]["preset"]))
    if isinstance(m.get("block_metrics"), list):
        off = [b.get("block") for b in m["block_metrics"] if isinstance(b, dict) and not b.get("low_group_lora", True)]
        t.add_row("low group without LoRA", ", ".join(map(str, off)) or "none")
    if isinstance(m.get("parallel"), dict) and m["parallel"].get("world_size", 1) > 1:
        t.add_row("processes", f"{m['parallel']['world_size']} ({m['parallel'].get('backend')})")
    est = m.get("memory_estimate")
    if isinstance(est, dict) and m["method"] != "magnitude":
        t.add_row("streams", f"on the {'GPU' if est.get('streams_on') == 'device' else 'CPU'}")
    if isinstance(m.get("elapsed_s"), (int, float)):
        t.add_row("time", f"{m['elapsed_s']:.0f} s")
    console.print(t)


@app.command("eval")
@_boundary
def eval_cmd(
    target: Path = typer.Argument(..., help="An artifact folder, or a plain model (folder, .gguf, built-in name)."),
    data: str = typer.Option(..., help="Evaluation text: file, folder or hf:NAME[:CONFIG[:SPLIT]]."),
    seqlen: int = typer.Option(512, help="Window length in tokens."),
    levels: Optional[str] = typer.Option(None, help="Levels to evaluate (default: every trained level)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
    max_windows: Optional[int] = typer.Option(None, help="Use at most this many windows (quick checks)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw perplexity against sparsity: a .png or .svg image, or "
                                        "an .html page with the table. The artifact is evaluated every --step across "
                                        "its range (trained levels marked, N:M levels as points)."),
    compare: list[Path] = typer.Option([], "--compare", help="Another artifact of the same model, on the same curve and "
                                       "windows (repeatable): a one-level baseline (optimize --method sparsegpt) or another run."),
    step: float = typer.Option(0.05, help="With --plot or --compare: the sparsity step of the curve."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Perplexity at each level, with the dense model as the reference row; --plot draws the curve."""
    from .artifact.evaluate import evaluate
    from .fsutil import write_json

    if seqlen < 2:
        raise UserError("--seqlen must be >= 2")
    if json_out:
        check_output_file(json_out, "--json")
    if plot or compare:
        return _eval_curve(target, data, seqlen, _levels(levels), max_windows, plot, compare, step, json_out, quiet)
    report = evaluate(target, data, seqlen, _levels(levels), Progress(enabled=not quiet), max_windows)
    t = Table(title=f"perplexity, {report['data']['windows']} x {seqlen} tokens of {data}")
    for col in ("level", "sparsity", "ppl"):
        t.add_column(col, justify="right")
    for r in report["results"]:
        t.add_row(r["level"], f"{r['sparsity']:.3f}", f"{r['ppl']:.3f}")
    console.print(t)
    if json_out:
        write_json(json_out, report)
        console.print(f"wrote {json_out}")


def _eval_curve(target, data, seqlen, levels, max_windows, plot, compare, step, json_out, quiet) -> None:
    from .fsutil import write_json
    from .report.curve import check_plot_path, check_step, evaluate_curve, open_artifact, write_plot
    from .report.pages import CURVE_HEADERS, curve_rows

    check_step(step)
    if plot:
        check_plot_path(plot)
    art = open_artifact(target, "eval")
    others = [open_artifact(c, "--compare") for c in compare]
    curve = evaluate_curve(art, data, seqlen, compare=others, step=step, max_windows=max_windows, levels=levels,
                           progress=Progress(enabled=not quiet))
    t = Table(title=f"perplexity, {curve['data']['windows']} x {seqlen} tokens of {data}")
    for col in CURVE_HEADERS:
        t.add_column(col, justify="right")
    for row in curve_rows(curve):
        t.add_row(*row)
    console.print(t)
    for path in ([write_plot(curve, plot)] if plot else []):
        console.print(f"wrote {path}")
    if json_out:
        write_json(json_out, curve)
        console.print(f"wrote {json_out}")


@app.command()
@_boundary
def materialize(
    artifact: Path = typer.Argument(..., help="Artifact folder."),
    level: str = typer.Option(..., help="Level to materialize, e.g. 0.6 or 2:4."),
    out: Path = typer.Option(..., "--out", "-o", help="Hugging Face folder to create."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
):
    """Write one level as a plain Hugging Face model folder."""
    from .artifact.materialize import materialize_to_folder

    chosen = _levels(level, "--level")
    if len(chosen) != 1:
        raise UserError(f"materialize writes one level per folder, got {len(chosen)} ({level}): run it once per level")
    path = materialize_to_folder(artifact, chosen[0], out, overwrite=overwrite, progress=Progress(enabled=not quiet))
    console.print(f"wrote {path}")


@app.command()
@_boundary
def info(artifact: Path = typer.Argument(..., help="Artifact folder.")):
    """Verify an artifact's hashes and summarize it."""
    from .artifact.folder import Artifact

    _summary_artifact(Artifact.open(artifact))


@app.command("export")
@_boundary
def export_cmd(
    artifact: Path = typer.Argument(..., help="Artifact folder (from optimize)."),
    out: Path = typer.Option(..., "--out", "-o", help="Export folder to create."),
    mode: str = typer.Option("baked", help="baked: one graph per level (weights as initializers, what TensorRT needs "
                             "for sparse tactics); dynamic: one graph with a `sparsity_level` input."),
    levels: Optional[str] = typer.Option(None, help="Levels to export (default: every trained level)."),
    dtype: str = typer.Option("fp32", help="fp32, fp16 (norms, softmax and logits stay fp32), or int8 (W8A8 Q/DQ, baked)."),
    calib: Optional[str] = typer.Option(None, help="int8: text for the activation ranges (default: the artifact's calibration)."),
    smooth: Optional[str] = typer.Option(None, help="int8: SmoothQuant alpha, or alpha for norm pairs,MLP pair; 0 = off "
                                         "(default 0.85: BENCHMARKS.md)."),
    opset: int = typer.Option(17, help="ONNX opset (17 parses on TensorRT 8.5 and later)."),
    external_data: str = typer.Option("auto", help="Weights in model.onnx_data: auto (above 2 GB), always, never."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Export an artifact to ONNX with KV cache (optimum's text-generation-with-past interface)."""
    from .onnx.export import ExportSpec, export

    spec = ExportSpec(artifact=artifact, out=out, mode=mode, levels=_levels(levels), dtype=dtype,
                      opset=opset, overwrite=overwrite, external_data=external_data, calib=calib, smooth=smooth)
    path = export(spec, Progress(enabled=not quiet))
    m = json.loads((path / "manifest.json").read_text())
    console.print(export_table(path, m))
    if m["mode"] == "dynamic":
        console.print("level switch in one session: weights.onnx + decoder.onnx (`epts-export run` or "
                      "epts_export.device.ort.ElasticDecoder; levels.json holds the table)", highlight=False)
    console.print(f"wrote {path} (report: {path / 'report.html'})")


@app.command()
@_boundary
def validate(
    export_dir: Path = typer.Argument(..., help="Export folder (from export)."),
    levels: Optional[str] = typer.Option(None, help="Levels to check (default: every exported level)."),
    artifact: Optional[Path] = typer.Option(None, help="Source artifact, if it moved since export."),
    report: Optional[Path] = typer.Option(None, help="Write the full report as JSON here."),
    junit: Optional[Path] = typer.Option(None, help="Write JUnit XML here (one test case per level and check)."),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime intra-op threads."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """ONNX Runtime vs PyTorch parity for every level; exit 3 if any check fails."""
    from .onnx.parity import validate as run, write_junit, write_report

    for path, flag in ((report, "--report"), (junit, "--junit")):
        if path:
            check_output_file(path, flag)
    from .device.runner import check_threads

    check_threads(threads)
    rep = run(export_dir, _levels(levels), artifact, Progress(enabled=not quiet), threads)
    for line in parity_table(rep, export_dir):
        console.print(line, highlight=False)
    console.print(f"wrote {Path(rep['export']) / 'report.html'}")
    for path, writer in ((report, write_report), (junit, write_junit)):
        if path:
            writer(rep, path)
            console.print(f"wrote {path}")
    if not rep["passed"]:
        for f in rep["failures"]:
            console.print(f"[red]FAIL[/] {escape(f)}", highlight=False, soft_wrap=True)
        console.print(f"[red]error:[/] parity failed: {len(rep['failures'])} check(s) failed", highlight=False)
        raise typer.Exit(3)
    console.print(f"parity passed for {len(rep['levels'])} level(s)")


@app.command()
@_boundary
def targets():
    """List the device profiles (targets/*.toml) and their aliases."""
    from .deploy.targets import all_targets

    t = Table(title="device targets (targets/*.toml); * = sparse weights; JP = JetPack; GB = budget/total")
    t.add_column("name", no_wrap=True)
    for col in ("cc", "TRT", "JP", "GB", "batch x ctx", "levels", "aliases"):
        t.add_column(col, overflow="fold")  # wrap inside the cell: nothing is cut on an 80-column terminal
    for tg in all_targets().values():
        lv = " ".join(f"{x}*" if x in tg.sparse_levels else x for x in tg.default_levels)
        t.add_row(tg.name, tg.compute_capability, tg.tensorrt, tg.jetpack or "-", f"{tg.memory_budget_gb:g}/{tg.memory_gb:g}",
                  f"{tg.max_batch}x{tg.max_context}", lv, " ".join(tg.aliases) or "-")
    console.print(t)


@app.command()
@_boundary
def build(
    source: str = typer.Argument(DEFAULT_MODEL, help="An artifact folder, or a model to optimize first (default: smollm2-135m)."),
    target: str = typer.Option(..., "--target", "-t", help="Device profile name, alias (jetson, rtx, hopper) or .toml path."),
    out: Path = typer.Option(Path("dist"), "--out", "-o", help="The bundle goes to OUT/<target>; stages are cached in OUT/.stages."),
    levels: Optional[str] = typer.Option(None, help="Levels to ship (default: the target's default levels)."),
    preset: str = typer.Option("default", help="optimize preset when SOURCE is a model."),
    require_engines: bool = typer.Option(False, help="Exit 2 unless TensorRT engines were built here."),
    eval_data: Optional[str] = typer.Option(None, help="Text (file, folder, hf:NAME) for a perplexity per level in the manifest."),
    layout: Optional[str] = typer.Option(None, help="elastic (default): one copy of the weights for every level, switched in "
                                         "place on the device; baked: one plain ONNX folder per level (GenAI, optimum; int8)."),
    dtype: Optional[str] = typer.Option(None, help="The target's precision (default), or int8 (W8A8, 2:4 on sparse INT8 "
                                        "tensor cores) where its profile sets int8 = true."),
    overwrite: bool = typer.Option(False, help="Replace an existing bundle."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Whole pipeline for one target: optimize (or reuse), export, validate, engines, bundle."""
    from .deploy.pipeline import BuildSpec, build as run

    path = run(BuildSpec(source=source, target=target, out=out, levels=_levels(levels), preset=preset, layout=layout, dtype=dtype,
                         require_engines=require_engines, overwrite=overwrite, eval_data=eval_data), Progress(enabled=not quiet))
    m = json.loads((path / "manifest.json").read_text())
    size = m["onnx_bytes"]["total"] / 2**20
    t = Table(title=f"bundle {path} for {m['target']['name']} ({m['target']['description']}): {m['layout']}, "
                    f"{len(m['levels'])} levels in {size:.1f} MiB of ONNX")
    for col in ("level", "pattern", "sparse weights", "ppl", "parity", "engine"):
        t.add_column(col)
    for r in m["levels"]:
        t.add_row(r["name"], r["pattern"], "yes" if r["sparse_weights"] else "no",
                  f"{r['perplexity']['value']:.2f}" if r.get("perplexity") else "-", "pass" if r["parity"]["passed"] else "FAIL",
                  "built" if r.get("engine") else "on device")
    console.print(t)
    if not m["engines"]["built"]:
        console.print(f"[yellow]engines not built here:[/] {escape(m['engines']['reason'])}. "
                      f"On the device: bash {path}/build_engines.sh (or python build_engines.py)", highlight=False, soft_wrap=True)
    _calibration_note((m.get("source") or {}).get("calibration"))
    console.print(f"wrote {path} (report: {path / 'report.html'})")


@app.command()
@_boundary
def verify(bundle: Path = typer.Argument(..., help="Bundle folder or .tar.gz.")):
    """Check a bundle's hashes, and that its engines match this GPU and TensorRT."""
    from .device.bundle import verify as run

    report = run(bundle)
    console.print(f"bundle {report['bundle']} for {report['target']} ({report['layout']}): {report['files']} files, hashes ok")
    if report.get("plan"):
        console.print(f"engine plan: {escape(report['plan'])}", highlight=False)
    console.print(f"engines: {escape(report['engines'])}", highlight=False)


@app.command("run")
@_boundary
def run_cmd(
    source: Path = typer.Argument(..., help="Bundle (folder or .tar.gz) or ONNX export folder."),
    level: list[str] = typer.Option(..., help="Level(s) to run, one after the other from one load: 0.5, 2:4, "
                                    "0.5,0.7, or --level 0.5 --level 0.7. A dynamic export switches level in place."),
    prompt: str = typer.Option(..., help="Prompt text."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate (greedy; capped at the model's context)."),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime intra-op threads."),
    runtime: str = typer.Option("auto", help="auto (the level's TensorRT engine when it can run here, else ONNX Runtime), trt or ort."),
    fast_switch: bool = typer.Option(False, "--fast-switch", help="Serve every level of an elastic model in place: a "
                                     "switch is one weight build (the fastest; 0.2 s on SmolLM2) but decoding is about "
                                     "0.8x a baked graph's. By default a generation long enough to pay for it gets a "
                                     "packed session (about a graph load) and decodes at a baked graph's speed."),
):
    """Generate text from a bundle or an export, streaming tokens (KV cache); the level's files are hash-checked first."""
    from .device.runner import Runner, check_prompt, describe, run_levels

    levels = run_levels(level)  # in the order given
    check_prompt(prompt)
    runner = Runner(source, runtime, threads, fast_switch=fast_switch)
    runner.check_levels(levels)
    out = Console(highlight=False, markup=False, emoji=False)  # the prompt and the text as they are
    for lv in levels:
        started = []

        def show(text: str) -> None:
            if not started:  # the prompt only once the inputs passed their checks
                out.print(prompt, end="", soft_wrap=True)
                started.append(True)
            out.print(text, end="", soft_wrap=True)

        r = runner.generate(lv, prompt, max_new_tokens, on_text=show,
                            on_note=lambda s: console.print(f"[yellow]note:[/] {escape(s)}", highlight=False))
        out.print()
        console.print(describe(r), highlight=False)


@app.command()
def version():
    """Print the versions of epts-export and its main libraries."""
    from .artifact.folder import library_versions

    console.print_json(json.dumps(library_versions()))


def main() -> None:
    install_sigterm()
    try:
        app()
    except KeyboardInterrupt:  # one that arrives after the command's boundary, on the way out
        exit_interrupted(interrupted_line()[1])
    except SystemExit as e:
        if interrupted() and isinstance(e.code, int):
            exit_interrupted(e.code)
        raise


if __name__ == "__main__":
    main()
