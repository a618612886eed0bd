"""TensorRT's real Python bindings without TensorRT's libraries: the tests' and CI's one way to get them.

    python3 tests/trt_bindings.py --prepare            # every version below; prints what it did and how long
    python3 tests/trt_bindings.py --prepare 10.3.0     # one version
    python3 tests/trt_bindings.py --exec 10.3.0 SCRIPT [ARGS...]   # run SCRIPT with that version importable

PyPI has NVIDIA's bindings as small wheels (module ``tensorrt_bindings``); the libraries they link
(libnvinfer, libnvonnxparser, libnvinfer_plugin, and for 8.6 libnvparsers) come from NVIDIA's own
index and need a GPU driver. The binding module imports only a handful of C entry points from them
(the ``create*_INTERNAL`` factories, the plugin registries, the parser version, and for 8.6 four
UFF/Caffe C++ symbols). So for each version this script

1. downloads the wheel (``pip download --no-deps``) and unpacks it,
2. lists the symbols ``tensorrt.so`` needs that this process cannot resolve (``nm -D
   --undefined-only``), and builds, with gcc, one stub library per TensorRT library it links
   (named by its soname), each defining its share of those symbols as functions returning 0/NULL,
3. loads the stubs with ``ctypes.CDLL(..., RTLD_GLOBAL)`` and imports the real module in a fresh
   interpreter, which dumps the module's API surface (``surface.json``: classes, their members
   and pybind11 signatures, enums and their values).

Everything lands in ``$EPTS_TRT_BINDINGS_CACHE`` or ``${XDG_CACHE_HOME:-~/.cache}/epts-export-trt-bindings``,
one folder per version, made whole or not at all; later runs reuse it. With the stubs, importing
works and every constructor that needs the libraries raises ``TypeError: pybind11::init(): factory
function returned nullptr`` -- what the real module does on a machine where TensorRT cannot start.
Different versions cannot share one process (same module name, same sonames): import each in its
own interpreter (``--exec``, ``run_python``).

Standard library only: it runs before the test dependencies are installed and under ``python -I -S``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

MODULE = "tensorrt_bindings"
# version -> the pip requirement of its wheel: JetPack 5 era, JetPack 6 (Orin), the newest
VERSIONS = {
    "8.6.1": "tensorrt-bindings==8.6.1",
    "10.3.0": "tensorrt-cu12-bindings==10.3.0",
    "11.4.0.106": "tensorrt-cu12-bindings==11.4.0.106",
}
CACHE_ENV = "EPTS_TRT_BINDINGS_CACHE"
FORMAT = 1  # bump when the cache layout or the surface format changes: old folders are rebuilt
TOOLS = ("gcc", "nm", "readelf")


class Unavailable(Exception):
    """The bindings cannot be prepared here for a reason outside the project: no compiler or
    binutils, or no package registry. Tests skip with this message; anything else is a failure."""


def cache_root() -> Path:
    """Where prepared versions live (one folder each)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "epts-export-trt-bindings"


def version_dir(version: str) -> Path:
    """The cache folder of one version (named with the cache format, so a new layout starts afresh)."""
    return cache_root() / f"{version}-v{FORMAT}"


def _check_version(version: str) -> None:
    if version not in VERSIONS:
        raise ValueError(f"unknown TensorRT bindings version {version!r}: choose from {', '.join(VERSIONS)}")


def is_prepared(version: str) -> bool:
    """Whether ``version`` was prepared whole (ready.json is written last)."""
    return (version_dir(version) / "ready.json").is_file()


# --------------------------------------------------------------------------------------------
# preparing one version


def _run(argv: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        tail = " | ".join((res.stderr or res.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"{what} failed (exit {res.returncode}): {tail}")
    return res


def _download(version: str, dest: Path) -> Path:
    """The wheel of ``version`` from the package registry pip is configured with."""
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
            "-q", "-d", str(dest), VERSIONS[version]]
    res = subprocess.run(argv, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if res.returncode != 0 or not wheels:
        last = ((res.stderr or res.stdout).strip().splitlines() or ["no output"])[-1]
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        raise Unavailable(f"pip could not download {VERSIONS[version]} (no package registry here, or no wheel for "
                          f"Python {py}?): {last}")
    return wheels[0]


def _undefined_entry_points(so: Path) -> list[str]:
    """Symbols ``so`` imports that this interpreter cannot resolve: TensorRT's C entry points
    (Python's and the C/C++ runtime's own symbols resolve; versioned ones are libc's or libstdc++'s)."""
    out = _run(["nm", "-D", "--undefined-only", str(so)], f"nm on {so.name}").stdout
    here = ctypes.CDLL(None)
    names = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 2 or parts[-2] != "U" or "@" in parts[-1]:
            continue  # weak (w) symbols may stay undefined; name@VERSION belongs to a system library
        if not hasattr(here, parts[-1]):
            names.append(parts[-1])
    return sorted(set(names))


def _needed_tensorrt_libraries(so: Path) -> list[str]:
    """The sonames of TensorRT's libraries that ``so`` links (libnvinfer.so.10, ...)."""
    out = _run(["readelf", "-d", str(so)], f"readelf on {so.name}").stdout
    return [m for m in re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out) if m.startswith("libnv")]


def _owner(symbol: str, libraries: list[str]) -> str:
    """The library of ``libraries`` that defines ``symbol`` in a real TensorRT install (any one
    would do for loading; this keeps each stub's contents recognisable)."""
    def lib(prefix: str) -> str | None:
        return next((x for x in libraries if x.startswith(prefix + ".so")), None)

    if "OnnxParser" in symbol:
        choice = lib("libnvonnxparser")
    elif symbol == "initLibNvInferPlugins":
        choice = lib("libnvinfer_plugin")
    elif "nvuffparser" in symbol or "nvcaffeparser" in symbol:
        choice = lib("libnvparsers")
    else:
        choice = lib("libnvinfer")
    return choice or libraries[0]


def _build_stubs(so: Path, out: Path) -> list[Path]:
    """One stub shared library per TensorRT library ``so`` links, defining the entry points it
    needs as functions returning 0 (NULL pointers, 0, false). Returns them in load order."""
    libraries = _needed_tensorrt_libraries(so)
    if not libraries:
        raise RuntimeError(f"{so} links no TensorRT library: not the bindings this script knows")
    symbols = _undefined_entry_points(so)
    by_lib: dict[str, list[str]] = {lib: [] for lib in libraries}
    for s in symbols:
        by_lib[_owner(s, libraries)].append(s)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for lib, names in by_lib.items():
        src = out / (lib.split(".so")[0] + "_stub.c")
        # C accepts mangled C++ names as identifiers, so the four 8.6 parser symbols need no C++
        body = "".join(f"void *{n}(void) {{ return 0; }}\n" for n in names)
        src.write_text(f"/* stub {lib} for {so.name}: TensorRT entry points returning NULL/0 */\n{body}")
        dest = out / lib
        _run(["gcc", "-shared", "-fPIC", "-O0", "-o", str(dest), f"-Wl,-soname,{lib}", str(src)], f"gcc for {lib}")
        paths.append(dest)
    return paths


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (two test runs preparing the same version wait for each other)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def prepare(version: str, log=print) -> Path:
    """Download, stub and dump ``version`` into its cache folder (nothing to do when it is there).
    Returns the folder. Unavailable when gcc/binutils or the package registry are missing;
    RuntimeError when the stubs do not make the module import (a failure, not a skip)."""
    _check_version(version)
    final = version_dir(version)
    if is_prepared(version):
        return final
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise Unavailable(f"{', '.join(missing)} not found: the TensorRT binding stubs need gcc and binutils")
    with _locked(cache_root() / f".{version}.lock"):
        if is_prepared(version):
            return final
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"{version}-", dir=final.parent) as tmp_name:
            tmp = Path(tmp_name) / "v"
            wheel = _download(version, Path(tmp_name) / "wheel")
            with zipfile.ZipFile(wheel) as z:
                z.extractall(tmp / "site")
            so = next((tmp / "site" / MODULE).glob("tensorrt*.so"))
            stubs = _build_stubs(so, tmp / "stubs")
            info = {"format": FORMAT, "version": version, "requirement": VERSIONS[version], "wheel": wheel.name,
                    "stubs": [p.name for p in stubs], "symbols": _undefined_entry_points(so)}
            (tmp / "info.json").write_text(json.dumps(info, indent=2))
            res = subprocess.run([sys.executable, "-I", "-S", "-B", str(Path(__file__).resolve()), "--dump", str(tmp)],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"the stubbed {MODULE} {version} does not import: {res.stderr.strip()[-2000:]}")
            (tmp / "surface.json").write_text(res.stdout)
            (tmp / "ready.json").write_text(json.dumps({**info, "prepare_s": round(time.perf_counter() - t0, 2)}))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        log(f"prepared {MODULE} {version} in {final} ({time.perf_counter() - t0:.1f} s)")
    return final


def surface(version: str) -> dict:
    """The API surface of the real ``version`` (see dump_surface), preparing it when needed."""
    return json.loads((prepare(version, log=lambda m: None) / "surface.json").read_text())


# --------------------------------------------------------------------------------------------
# importing a prepared version (in a process of its own)


def activate(folder: Path):
    """Load the stubs of a prepared folder and import the real module from it; returns the module.
    Call once per interpreter: another version cannot be imported after it."""
    folder = Path(folder)
    info = json.loads((folder / "info.json").read_text())
    for name in info["stubs"]:
        ctypes.CDLL(str(folder / "stubs" / name), mode=ctypes.RTLD_GLOBAL)
    sys.path.insert(0, str(folder / "site"))
    import importlib

    return importlib.import_module(MODULE)


def run_python(version: str, argv: list[str], isolated: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run ``python -I -S -B <this file> --exec VERSION ARGV...``: with ``isolated`` no site-packages,
    so the real bindings and what ARGV puts on sys.path are all there is; without it the installed
    packages (numpy, ...) are importable too. ``kw`` goes to subprocess.run."""
    prepare(version, log=lambda m: None)
    flags = ["-I", "-S", "-B"] if isolated else ["-B"]
    cmd = [sys.executable, *flags, str(Path(__file__).resolve()), "--exec", version, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# --------------------------------------------------------------------------------------------
# the API surface


SIG_RE = re.compile(r"^(?:\d+\. )?(\w*)\((.*)\)(?:\s*->\s*(.+?))?\s*$")
_OPEN, _CLOSE = "([{<", ")]}>"


def split_top(text: str, sep: str = ",") -> list[str]:
    """Split at ``sep`` outside brackets and quotes ("a: Dict[str, int], b" -> two parts)."""
    parts, depth, quote, cur = [], 0, "", []
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in _OPEN:
            depth += 1
        elif ch in _CLOSE and not (ch == ">" and text[i - 1:i] == "-"):
            depth = max(depth - 1, 0)
        elif ch == sep and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


def parse_params(params: str) -> list[dict]:
    """pybind11 parameters -> [{"name", "type", "default": bool, "kind"}]; kind is "positional"
    (pybind11's unnamed ``argN``, before ``/``), "any", "keyword" (after ``*``), "varargs" or "varkw"."""
    out, keyword_only = [], False
    for raw in split_top(params):
        if raw == "/":
            for p in out:
                p["kind"] = "positional" if p["kind"] == "any" else p["kind"]
            continue
        if raw == "*":
            keyword_only = True
            continue
        if raw.startswith("**"):
            out.append({"name": raw[2:].split(":")[0].strip(), "type": "", "default": False, "kind": "varkw"})
            continue
        if raw.startswith("*"):
            out.append({"name": raw[1:].split(":")[0].strip(), "type": "", "default": False, "kind": "varargs"})
            keyword_only = True
            continue
        name, colon, rest = _partition_top(raw, ":")
        if colon:
            typ, eq, _ = _partition_top(rest, "=")
        else:
            name, eq, _ = _partition_top(raw, "=")
            typ = ""
        name = name.strip()
        kind = "keyword" if keyword_only else ("positional" if re.fullmatch(r"arg\d+", name) else "any")
        out.append({"name": name, "type": typ.strip(), "default": bool(eq), "kind": kind})
    return out


def _partition_top(text: str, sep: str) -> tuple[str, str, str]:
    parts = split_top(text, sep)
    if len(parts) <= 1:
        return text, "", ""
    return parts[0], sep, sep.join(parts[1:])


def parse_signatures(doc: str | None, name: str | None = None) -> list[dict]:
    """Every pybind11 signature of ``name`` in a docstring: [{"text", "params" (without self),
    "returns"}]; ``name`` "" for a property getter's "(self: X) -> T", None for any name."""
    sigs = []
    for line in (doc or "").splitlines():
        m = SIG_RE.match(line.strip())
        if not m or m.group(2) in ("*args, **kwargs",) or (name is not None and m.group(1) != name):
            continue
        params = parse_params(m.group(2))
        if params and params[0]["name"] == "self":
            params = params[1:]
        sigs.append({"text": line.strip(), "params": params, "returns": (m.group(3) or "").strip()})
    return sigs


def _is_enum(obj) -> bool:
    return isinstance(obj, type) and isinstance(getattr(obj, "__members__", None), dict)


KEPT_DUNDERS = {"__init__", "__call__", "__len__", "__getitem__", "__setitem__", "__iter__", "__enter__", "__exit__",
                "__int__", "__index__", "__eq__", "__hash__", "__buffer__"}


def _member(cls, name: str) -> dict:
    """One class member's surface entry."""
    raw = None
    for klass in cls.__mro__:
        if name in vars(klass):
            raw = vars(klass)[name]
            break
    if isinstance(raw, property):
        sigs = parse_signatures(getattr(raw.fget, "__doc__", None), "")
        return {"kind": "property", "writable": raw.fset is not None,
                "type": sigs[0]["returns"] if sigs else ""}
    if isinstance(raw, staticmethod):
        raw = raw.__func__
    value = getattr(cls, name)
    if _is_enum(value):
        return {"kind": "enum"}
    if callable(value):
        return {"kind": "method", "signatures": parse_signatures(getattr(value, "__doc__", None), name)}
    return {"kind": "value", "type": type(value).__name__}


def dump_surface(module) -> dict:
    """{"version", "module", "attributes": name -> kind, "classes": name -> {"bases", "members"},
    "enums": name -> {member: int}, "functions": name -> [signatures]} for a real bindings module;
    nested types (``ILogger.Severity``) are named with a dot."""
    out = {"version": module.__version__, "module": module.__name__, "attributes": {}, "classes": {}, "enums": {},
           "functions": {}}

    def visit(qual: str, cls) -> None:
        if _is_enum(cls):
            out["enums"][qual] = {k: int(v) for k, v in cls.__members__.items()}
        members = {}
        for name in dir(cls):
            if name.startswith("_") and name not in KEPT_DUNDERS:
                continue  # object's dunders and pybind11's internals (_pybind11_conduit_v1_)
            try:
                members[name] = _member(cls, name)
            except Exception as e:  # a property that cannot be read on the class: record the name
                members[name] = {"kind": "unknown", "error": type(e).__name__}
            value = getattr(cls, name, None)
            if isinstance(value, type) and name not in ("__class__",) and value.__qualname__.endswith(name):
                if f"{qual}.{name}" not in out["classes"]:
                    visit(f"{qual}.{name}", value)
        out["classes"][qual] = {"bases": [b.__name__ for b in cls.__bases__], "enum": _is_enum(cls), "members": members}

    for name in dir(module):
        if name.startswith("_") and name != "__version__":
            continue
        obj = getattr(module, name)
        if isinstance(obj, type):
            out["attributes"][name] = "enum" if _is_enum(obj) else "class"
            visit(name, obj)
        elif callable(obj):
            out["attributes"][name] = "function"
            out["functions"][name] = parse_signatures(getattr(obj, "__doc__", None), name)
        else:
            out["attributes"][name] = "value"
    return out


# --------------------------------------------------------------------------------------------
# command line


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Prepare TensorRT's real Python bindings with stub libraries.")
    ap.add_argument("--prepare", nargs="*", metavar="VERSION", help=f"prepare these versions (default: {', '.join(VERSIONS)})")
    ap.add_argument("--dump", metavar="FOLDER", help=argparse.SUPPRESS)  # internal: print a folder's surface
    ap.add_argument("--exec", nargs=argparse.REMAINDER, metavar="VERSION SCRIPT", dest="exec_args",
                    help="run SCRIPT [ARGS] (or -c CODE [ARGS]) with VERSION importable as tensorrt_bindings")
    args = ap.parse_args(argv)
    if args.dump:
        print(json.dumps(dump_surface(activate(Path(args.dump))), indent=1, sort_keys=True))
        return 0
    if args.exec_args:
        version, *rest = args.exec_args
        activate(version_dir(version))
        # -I ignores PYTHONPATH: EPTS_EXEC_PATH puts what a device would have too (numpy, onnxruntime) after the rest
        sys.path.extend(p for p in os.environ.get("EPTS_EXEC_PATH", "").split(os.pathsep) if p)
        if rest[:1] == ["-c"]:
            sys.argv = ["-c", *rest[2:]]
            exec(compile(rest[1], "<string>", "exec"), {"__name__": "__main__"})
            return 0
        import runpy

        sys.argv = rest
        sys.path.insert(0, str(Path(rest[0]).resolve().parent))
        runpy.run_path(rest[0], run_name="__main__")
        return 0
    if args.prepare is not None:
        failed = 0
        t0 = time.perf_counter()
        for version in args.prepare or VERSIONS:
            try:
                if is_prepared(version):
                    print(f"{MODULE} {version}: ready in {version_dir(version)}")
                else:
                    prepare(version)
            except Unavailable as e:
                print(f"{MODULE} {version}: not prepared: {e}", file=sys.stderr)
                failed = 1
        print(f"done in {time.perf_counter() - t0:.1f} s")
        return failed
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(_main())
