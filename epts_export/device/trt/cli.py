"""The command line of a bundle's ``build_engines.py`` (and ``build_engines.sh``'s helper steps):

    build_engines.py [build] [--level L]... [--no-report]   build the engines, then measure them
    build_engines.py report                                  measure engines built before (trtexec too)
    build_engines.py bake LEVEL                              write LEVEL's weights beside trt.onnx (for trtexec)
    build_engines.py clean                                   remove them again
    build_engines.py sparsity [LAYERS.json] [--log LOG]      which layers got sparse kernels
    build_engines.py status                                  is TensorRT usable here?

Exit codes: 0; 1 bad input or TensorRT/GPU missing; 3 a level drifts from ONNX Runtime (refused).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import EXIT_INTEGRITY, UserError
from ..files import write_json
from ..interface import ENGINES_JSON
from .builder import build_engine
from .probe import compute_capability, import_trt, tensorrt_status
from .report import measure_engines, table
from .spec import EngineSpec, WeightSource, build_record_path, load_engines, plan_problems, unique_specs


def _print_build(spec: EngineSpec, result: dict) -> None:
    r = result["sparse_report"]
    print(f"{spec.label}: {result['engine']} ({result['bytes'] / 2**20:.1f} MiB, {result['build_s']:.1f} s, "
          f"TensorRT {result['tensorrt']})")
    if spec.refit:
        print(f"  weights: {spec.build_level}'s in the plan; the others are refit at run time from the weight builder")
    print(f"  sparse: {len(r['picked'])} layer(s) picked a sparse kernel of {len(r['eligible'])} eligible, "
          f"{r['layers']} engine layers (source: {r['source']})")
    for name in r["picked"]:
        print(f"    sparse kernel: {name}")


def _select(bundle: Path, specs: list[EngineSpec], levels: list[str] | None) -> list[EngineSpec]:
    served = [lv for s in specs for lv in s.levels]
    if levels:
        unknown = set(levels) - set(served)
        if unknown:
            raise UserError(f"no engine for level(s) {', '.join(sorted(unknown))} in {bundle / ENGINES_JSON}: "
                            f"choose from {', '.join(served)}")
        specs = [s for s in specs if set(s.levels) & set(levels)]
    problems = plan_problems(specs)
    if problems:
        raise UserError(f"{bundle / ENGINES_JSON}: " + "; ".join(problems) + ": copy the whole bundle, or regenerate it")
    return specs


def _record(spec: EngineSpec, result: dict) -> None:
    """What verify and run check on the device: the TensorRT and GPU this engine is for."""
    write_json(build_record_path(spec.engine), {**result, "engine": Path(spec.engine).name,
                                                "compute_capability": compute_capability()})


def _weights(source: WeightSource | None):
    from .weights import LevelWeights

    return LevelWeights(source) if source is not None else None


def _report(bundle: Path, specs: list[EngineSpec], source: WeightSource | None, shared, builds: dict) -> int:
    """Measure the engines, write engines/report.json, print its table; 3 when a level was refused."""
    from .runtime import TrtDecoder
    from .weights import default_levels

    def open_engine(spec: EngineSpec, level: str):
        return TrtDecoder(spec.engine, level=level, weights=shared if source is not None else default_levels(spec, None))

    report = measure_engines(bundle, specs, open_engine, builds)
    print("\n".join(table(report)))
    print(f"wrote {bundle / 'engines' / 'report.json'}")
    if report["refused"]:
        print(f"error: level(s) {', '.join(report['refused'])} refused: their TensorRT outputs do not match ONNX Runtime "
              f"(see the report); run them with --runtime ort", file=sys.stderr)
        return EXIT_INTEGRITY
    return 0


def build(bundle: Path, levels: list[str] | None = None, report: bool = True) -> int:
    """Build the engines of ``bundle`` (those serving ``levels`` when given), each with its build
    record, then (``report``) measure them."""
    specs, source = load_engines(bundle)
    specs = _select(bundle, specs, levels)
    ok, why = tensorrt_status()
    if not ok:
        raise UserError(f"cannot build engines here: {why}")
    print(why)
    shared, builds = _weights(source), {}
    try:
        for s in unique_specs(specs):
            result = build_engine(s, levels=shared)
            _print_build(s, result)
            _record(s, result)
            builds[Path(s.engine).name] = result
    finally:
        if shared is not None:
            shared.clean()
    return _report(bundle, specs, source, shared, builds) if report else 0


def measure(bundle: Path) -> int:
    """Measure the engines already built (by build_engines.sh's trtexec too: those get a build record)."""
    specs, source = load_engines(bundle)
    ok, why = tensorrt_status()
    if not ok:
        raise UserError(f"cannot run engines here: {why}")
    present = [s for s in unique_specs(specs) if Path(s.engine).is_file()]
    if not present:
        raise UserError(f"no engine of {bundle / ENGINES_JSON} is built: run build_engines.sh or build_engines.py first")
    trt_version = str(getattr(import_trt(), "__version__", "?"))
    for s in present:
        if not build_record_path(s.engine).is_file():
            _record(s, {"engine": str(s.engine), "tensorrt": trt_version, "levels": list(s.levels),
                        "build_level": s.build_level, "weights": s.weights, "built_by": "trtexec"})
    return _report(bundle, present, source, _weights(source), {})


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="build_engines.py", description="Build, check and measure the TensorRT engines of "
                                 "this bundle on this device (engines are tied to the GPU and TensorRT that built them).")
    ap.add_argument("--bundle", type=Path, default=None, help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command")
    b = sub.add_parser("build", help="build every engine listed in engines.json, then measure them (the default)")
    b.add_argument("--level", action="append", default=None,
                   help="only the engine serving this level (repeatable; one refit engine serves several levels)")
    b.add_argument("--no-report", action="store_true", help="skip the checks and the latency report")
    sub.add_parser("report", help="check and time the engines already built, write engines/report.json")
    k = sub.add_parser("bake", help="write a level's weights beside trt.onnx, the graph trtexec builds from")
    k.add_argument("level")
    sub.add_parser("clean", help="remove the weights bake wrote")
    r = sub.add_parser("sparsity", help="sparse layers from an inspector JSON and/or a build log")
    r.add_argument("layer_info", type=Path, nargs="?")
    r.add_argument("--log", type=Path, default=None, help="a trtexec or TensorRT build log")
    sub.add_parser("status", help="is TensorRT usable here?")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one command (``argv`` holds ``--bundle DIR`` and the command; build by default). Returns
    the exit code: 0, or a UserError's (printed as ``error: ...`` on stderr)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "status":
            ok, why = tensorrt_status()
            print(why)
            return 0 if ok else 1
        if args.command == "sparsity":
            from .sparsity import sparse_report

            text = args.layer_info.read_text(errors="replace") if args.layer_info else ""
            lines = args.log.read_text(errors="replace").splitlines() if args.log else []
            print(json.dumps(sparse_report(text, lines), indent=2))
            return 0
        if args.bundle is None:
            raise UserError(f"{args.command or 'build'} needs the bundle folder (build_engines.py passes its own)")
        if args.command in ("bake", "clean"):
            _, source = load_engines(args.bundle)
            if source is None:
                raise UserError(f"{args.bundle} holds one graph per level: there are no weights to {args.command}")
            weights = _weights(source)
            if args.command == "clean":
                weights.clean()
                return 0
            print(weights.bake(args.level))
            return 0
        if args.command == "report":
            return measure(args.bundle)
        return build(args.bundle, getattr(args, "level", None), report=not getattr(args, "no_report", False))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
