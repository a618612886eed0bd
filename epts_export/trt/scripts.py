"""The host side of TensorRT engine building: what a bundle needs to build its engines on the device.

``write_build_script`` writes, into a bundle, ``engines.json`` (the engine specs, paths relative to
the bundle: which engine serves which levels, and whether their weights are baked into it or refit
from each level's graph), ``build_engines.sh`` (one trtexec command per engine, ``trtexec_command``),
``build_engines.py`` (TensorRT's Python API through ``epts_export.trt.builder``) and ``_epts/``, a
minimal copy of the epts_export package holding the device-side builder and the standard-library
modules it imports, so that ``build_engines.py`` runs on a Jetson without epts-export. Nothing here
runs TensorRT; the device side is ``epts_export.trt.builder``.

Facts this code relies on (sources in the notes of the project, shared/docs/tensorrt-notes.md):

* trtexec builds several optimization profiles in one engine with ``--profile=N`` followed by that
  profile's ``--minShapes/--optShapes/--maxShapes`` (shapes given outside a ``--profile`` are then
  an error, so every profile gets its own ``--profile=N``). Older trtexec releases without
  ``--profile`` cannot express two profiles: ``build_engines.sh`` checks ``trtexec --help`` and
  points to ``build_engines.py`` (Python API, any TensorRT >= 8.5) instead.
* trtexec's ``--sparsity=force`` overwrites weights and is never used.
* ``--refit`` makes every weight refittable (trtexec cannot mark single weights, as the Python
  builder's REFIT_INDIVIDUAL does): the engine that serves several unstructured levels.
* trtexec's ``--memPoolSize`` knows ``workspace``, ``dlaSRAM``, ``dlaLocalDRAM``, ``dlaGlobalDRAM``
  and ``tacticSharedMem`` (an unknown pool name is an error); it has no tactic-DRAM pool, so
  ``tactic_dram_mb`` is applied by the Python builder only.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from ..errors import UserError
from ..fsutil import vendor_package, write_json, write_text
from ..interface import ENGINES_JSON
from .builder import ENGINES_FORMAT, ENGINES_VERSION, EngineSpec, context_note, profile_shapes

JETPACK_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"
VENDOR_DIR = "_epts"  # the package copy inside a bundle: <bundle>/_epts/epts_export/...

# the installed package whose files are copied; the device-side builder imports only these
VENDORED_FILES = ("__init__.py", "errors.py", "fsutil.py", "interface.py", "trt/builder.py", "trt/sparse.py")


# --------------------------------------------------------------------------------------------
# paths and specs


def _relative(p: Path, root: Path) -> str:
    """``p`` (absolute, or relative to the current folder) as a posix path relative to ``root``."""
    p, root = Path(p), Path(root)
    try:
        return p.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise UserError(f"{p} is outside the bundle {root}: engine files must live inside it so the bundle can move") from None


def spec_to_dict(spec: EngineSpec, root: Path) -> dict:
    """The ``engines.json`` entry of ``spec`` (format version 2, JSON-ready, read back by
    ``builder.spec_from_dict``), its paths relative to ``root`` (the bundle folder). UserError for a
    path outside ``root``."""
    d = {
        "levels": list(spec.levels), "weights": spec.weights, "sparse": bool(spec.sparse), "precision": spec.precision,
        "onnx": _relative(spec.onnx, root), "engine": _relative(spec.engine, root),
    }
    if spec.refit:
        d["refit_from"] = {lv: _relative(p, root) for lv, p in spec.refit_from.items()}
        d["refit_weights"] = None if spec.refit_weights is None else list(spec.refit_weights)
    d.update({
        "timing_cache": _relative(spec.timing_cache, root), "layer_info": _relative(spec.layer_info, root),
        "profiles": [{"name": p.name, **p.to_dict()} for p in spec.profiles],
        "kv": {"layers": spec.kv.layers, "kv_heads": spec.kv.kv_heads, "head_dim": spec.kv.head_dim},
        "workspace_mb": int(spec.workspace_mb),
        "tactic_dram_mb": None if spec.tactic_dram_mb is None else int(spec.tactic_dram_mb),
        "context": spec.context,
    })
    if spec.note:
        d["note"] = spec.note
    return d


def unique_specs(specs) -> list[EngineSpec]:
    """``specs`` (a list, or a level -> spec dict's values) with each engine once, in order: one
    refit spec serves several levels."""
    out, seen = [], set()
    for s in specs:
        key = Path(s.engine).resolve()
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


# --------------------------------------------------------------------------------------------
# trtexec


def _shape_str(dims) -> str:
    return "x".join(str(int(d)) for d in dims)


def _shapes_arg(rows, which: int) -> str:
    return ",".join(f"{row[0]}:{_shape_str(row[which])}" for row in rows)


def _path_arg(p: Path, root: Path | None) -> str:
    if root is None:
        return str(p)
    return _relative(p, root)


def trtexec_command(spec: EngineSpec, root: Path | None = None, trtexec: str = "trtexec") -> list[str]:
    """The trtexec argv that builds ``spec`` (paths relative to ``root`` when given).

    One command builds all profiles: ``--profile=N`` then that profile's min/opt/max shapes, for
    each profile in order (a single profile needs no ``--profile``). ``--stronglyTyped`` (TensorRT
    >= 10) takes precision from the ONNX dtypes, so no ``--fp16``. ``--sparsity=enable`` only for
    sparse specs (never ``force``: it overwrites the weights). ``--memPoolSize`` sizes are MiB with an
    explicit ``M``; trtexec has no tactic-DRAM pool, so ``tactic_dram_mb`` is left to the Python
    builder. ``--refit`` for a spec serving several levels (every weight refittable).
    ``--skipInference`` stops after the build (layer info is still exported).
    """
    shapes = profile_shapes(spec)
    argv = [trtexec, f"--onnx={_path_arg(spec.onnx, root)}", f"--saveEngine={_path_arg(spec.engine, root)}",
            "--stronglyTyped"]
    many = len(shapes) > 1
    for index, rows in enumerate(shapes.values()):
        if many:
            argv.append(f"--profile={index}")
        argv += [f"--minShapes={_shapes_arg(rows, 1)}", f"--optShapes={_shapes_arg(rows, 2)}",
                 f"--maxShapes={_shapes_arg(rows, 3)}"]
    if spec.sparse:
        argv.append("--sparsity=enable")
    if spec.refit:
        argv.append("--refit")
    argv += [f"--memPoolSize=workspace:{int(spec.workspace_mb)}M",
             f"--timingCacheFile={_path_arg(spec.timing_cache, root)}",
             "--profilingVerbosity=detailed",
             f"--exportLayerInfo={_path_arg(spec.layer_info, root)}",
             "--skipInference"]
    return argv


# --------------------------------------------------------------------------------------------
# the build scripts


def _sh(arg: str) -> str:
    return shlex.quote(arg)


_SH_HEADER = """#!/usr/bin/env bash
# Build the TensorRT engines of this bundle with trtexec (generated by epts-export).
#
# Engines are tied to the GPU, the TensorRT version and (on Jetson) the JetPack release that
# built them, and there is no cross-building for Jetson: engines for a Jetson MUST be built on
# the device itself. Copy the whole bundle there and run:  bash build_engines.sh
# Paths are relative to this folder, so the bundle can be moved.
# Without a recent trtexec (one with --profile), run  python3 build_engines.py  instead
# (TensorRT's Python API; it also applies the tactic-DRAM cap that trtexec cannot set, and makes
# only the weights that differ between levels refittable where trtexec's --refit makes them all).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

TRTEXEC="${TRTEXEC:-}"
if [ -z "$TRTEXEC" ]; then
  if command -v trtexec >/dev/null 2>&1; then
    TRTEXEC="$(command -v trtexec)"
  elif [ -x __JETPACK__ ]; then
    TRTEXEC=__JETPACK__
  else
    echo "trtexec not found. On Jetson it ships with JetPack as __JETPACK__" >&2
    echo "(sudo apt install tensorrt); elsewhere it is in NVIDIA's TensorRT tar/deb packages" >&2
    echo "or the NGC TensorRT container. Or set TRTEXEC=/path/to/trtexec, or run: python3 build_engines.py" >&2
    exit 1
  fi
fi
help_text="$("$TRTEXEC" --help 2>&1 || true)"
if ! grep -Eq -- '--profile([= ]|$)' <<<"$help_text" || ! grep -q -- '--stronglyTyped' <<<"$help_text"; then
  echo "$TRTEXEC lacks --profile/--stronglyTyped (TensorRT 10+), needed for the prefill, decode and continue profiles." >&2
  echo "Run  python3 build_engines.py  instead (TensorRT's Python API)." >&2
  exit 1
fi
"""

_PY_SCRIPT = '''#!/usr/bin/env python3
"""Build the TensorRT engines of this bundle with TensorRT's Python API (generated by epts-export).

Engines are tied to the GPU, the TensorRT version and the JetPack release that built them; Jetson
engines must be built on the device itself. Reads engines.json next to this file.

    python3 build_engines.py                 # every engine
    python3 build_engines.py --level 2:4     # the engine that serves level 2:4

Uses epts_export.trt.builder when epts-export is installed, else the copy shipped in this bundle
(_epts/epts_export), which needs only TensorRT's Python bindings (JetPack: python3-libnvinfer).
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# never import from this folder (a script's folder comes first on sys.path): only the copy in
# _epts/, hashed in manifest.json, belongs to this bundle
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def _builder():
    try:
        from epts_export.trt import builder
        builder.main  # noqa: B018 - an epts-export without it falls back to the copy
        return builder
    except (ImportError, AttributeError):
        pass
    # forget whatever older epts_export the attempt above imported, then load the bundle's copy
    for name in [n for n in sys.modules if n == "epts_export" or n.startswith("epts_export.")]:
        del sys.modules[name]
    sys.path.insert(0, str(HERE / "_epts"))
    sys.dont_write_bytecode = True  # no __pycache__ among the bundle's hashed files
    from epts_export.trt import builder
    return builder


if __name__ == "__main__":
    sys.exit(_builder().main(["build", str(HERE), *sys.argv[1:]]))
'''


def _engine_commands(s: EngineSpec, out_dir: Path, trtexec_var: str) -> list[str]:
    """The build_engines.sh lines that build one engine with trtexec and keep its log."""
    argv = trtexec_command(s, root=out_dir, trtexec="trtexec")
    engine_rel = _relative(s.engine, out_dir)
    log_rel = engine_rel + ".log"
    dirs = sorted({os.path.dirname(_relative(p, out_dir)) or "." for p in (s.engine, s.layer_info, s.timing_cache)})
    if s.sparse:
        kind = "sparse weights, sparse tactics enabled"
    elif s.refit:
        kind = f"dense, refittable: built with {s.levels[0]}'s weights, the others are refit from their graphs at run time"
    else:
        kind = "dense"
    parts = [f"\necho {_sh(f'== {s.label}: {kind} -> {engine_rel}')}\n",
             "mkdir -p " + " ".join(_sh(d) for d in dirs) + "\n"]
    if s.tactic_dram_mb is not None:
        parts.append(f"# tactic_dram_mb={s.tactic_dram_mb}: trtexec has no such pool; build_engines.py applies it\n")
    if s.refit and s.refit_weights:
        parts.append(f"# --refit makes every weight refittable; build_engines.py marks only the {len(s.refit_weights)} "
                     f"that differ between the levels (REFIT_INDIVIDUAL), which leaves TensorRT more to fold\n")
    cmd = " \\\n  ".join([f'"{trtexec_var}"'] + [_sh(a) for a in argv[1:]])
    parts.append(f"{cmd} \\\n  2>&1 | tee {_sh(log_rel)}\n")
    if s.sparse:
        parts.append(f"grep -F '(Sparsity)' {_sh(log_rel)} || echo "
                     f"{_sh('  no (Sparsity) lines in the log: no layer was eligible for sparse math')}\n")
    return parts


def vendor_builder(out_dir: Path) -> Path:
    """Copy the device-side builder with the modules it imports into ``<out_dir>/_epts/epts_export``
    (``trt/__init__.py`` written empty, so nothing else is pulled in). Returns the ``_epts`` folder,
    the one to put first on sys.path."""
    return vendor_package(Path(out_dir) / VENDOR_DIR, VENDORED_FILES)


def write_build_script(specs: list[EngineSpec], out_dir: Path, *, trtexec_var: str = "$TRTEXEC") -> tuple[Path, Path]:
    """Write ``build_engines.sh`` (trtexec, one command per engine), ``build_engines.py`` (Python API),
    ``engines.json`` (the specs, each engine once, paths relative to ``out_dir``) and ``_epts/``
    (the device-side builder for devices without epts-export, see vendor_builder) into ``out_dir``.
    Returns (sh path, py path). Every path in the specs must lie inside ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = unique_specs(specs)
    doc = {"format": ENGINES_FORMAT, "version": ENGINES_VERSION,
           "engines": [spec_to_dict(s, out_dir) for s in specs]}
    write_json(out_dir / ENGINES_JSON, doc)

    parts = [_SH_HEADER.replace("__JETPACK__", JETPACK_TRTEXEC)]
    notes = sorted({n for n in (context_note(s) for s in specs) if n})
    parts += [f"echo {_sh(n)}\n" for n in notes]
    for s in specs:
        parts += _engine_commands(s, out_dir, trtexec_var)
    parts.append('\necho "engines built; layer info (HasSparseWeights, TacticName) is in the *.layers.json files"\n')
    sh = out_dir / "build_engines.sh"
    write_text(sh, "".join(parts))
    py = out_dir / "build_engines.py"
    write_text(py, _PY_SCRIPT)
    vendor_builder(out_dir)
    for p in (sh, py):
        p.chmod(p.stat().st_mode | 0o111)
    return sh, py
