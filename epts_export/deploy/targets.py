"""Device target profiles: strict TOML files, one per device, in the top-level ``targets/`` folder.

A target says what TensorRT engines are built for: the GPU (compute capability, memory), the
software it must match (TensorRT, CUDA, JetPack), how much memory the model may use, and the
TensorRT optimization profiles (ranges of batch, new tokens and cached tokens) for prefill (an
empty cache), decode (one new token) and continue (several new tokens on a cache: a second chat
turn, a chunked prompt). Files are checked strictly when loaded: a misspelled key or a profile
that cannot fit the context is a one-line error naming the file and the field, not a surprise at
engine-build time.
The schema is documented in ``targets/README.md``.

Lookup order: the built-in folder (``targets_dir()``), then the folder named by the environment
variable ``EPTS_TARGETS_DIR``, whose files add targets or replace built-in ones of the same name.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.levels import Level, parse_level, sort_levels
from ..errors import UserError, one_line
from ..device.interface import PRECISIONS, ShapeRange

ENV_DIR = "EPTS_TARGETS_DIR"

KINDS = ("jetson", "desktop", "datacenter")
PROFILE_NAMES = ("prefill", "decode", "continue")  # the engines' profile order: TrtDecoder takes the first that fits
EXPORT_PRECISIONS = ("fp16", "fp32")  # what onnx.export writes (DTYPES)
AXES = ShapeRange.AXES

# Every top-level key of a target file; all are required except these.
FIELDS = (
    "name", "description", "kind", "aliases", "compute_capability", "tensorrt", "cuda", "jetpack",
    "memory_gb", "memory_budget_gb", "unified_memory", "precision", "max_batch", "max_context",
    "workspace_mb", "tactic_dram_mb", "sparse_levels", "default_levels", "build_on_device", "int8", "profiles",
)
OPTIONAL_FIELDS = ("tactic_dram_mb", "jetpack", "int8")  # jetpack: required for kind = "jetson" (checked below)
# INT8 engines (build --dtype int8) are built weakly typed with the FP16 and INT8 flags: TensorRT
# 8.6-10.x (11 builds strongly typed only), on INT8 tensor cores (compute capability 7.2 and later).
INT8_MAX_TRT, INT8_MIN_CC = (11, 0), (7, 2)

# Names and aliases are typed on command lines: keep them lowercase slugs.
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_MAJOR_MINOR_RE = re.compile(r"^(\d+)\.(\d+)$")
_JETPACK_RE = re.compile(r"^\d+\.\d+(\.\d+)?$")
_TRT_SPEC_RE = re.compile(r"^(>=)?(\d+)\.(\d+)$")
# An installed TensorRT reports e.g. "10.3.0.30" or "10.13.3.9.post1": only major.minor matter.
_TRT_VERSION_RE = re.compile(r"^\s*(\d+)(?:\.(\d+))?")

# Sparse tensor cores (2:4 SPARSE_WEIGHTS engines) arrived with Ampere, compute capability 8.0.
SPARSE_MIN_CC = (8, 0)


@dataclass(frozen=True)
class Target:
    """A validated device profile; build one with ``load_target_file`` or ``resolve_target``.

    Fields mirror the TOML keys (lists become tuples); ``path`` is the absolute path of the file
    it came from. See ``targets/README.md`` for what each field means.
    """

    name: str
    description: str
    kind: str
    aliases: tuple[str, ...]
    compute_capability: str
    tensorrt: str
    cuda: str
    jetpack: str | None
    memory_gb: float
    memory_budget_gb: float
    unified_memory: bool
    precision: str
    max_batch: int
    max_context: int
    workspace_mb: int
    tactic_dram_mb: int | None
    sparse_levels: tuple[str, ...]
    default_levels: tuple[str, ...]
    build_on_device: bool
    int8: bool  # the device takes INT8 (W8A8) engines: build --dtype int8
    # hash=False keeps Target hashable (a dict is not); profiles still take part in ==.
    profiles: dict[str, ShapeRange] = field(hash=False)
    path: Path

    def to_dict(self) -> dict[str, Any]:
        """The profile as a JSON-serializable dict with the TOML file's keys, for manifests.

        Optional fields that are unset (``jetpack`` off Jetson, ``tactic_dram_mb``, ``int8`` false) are left out,
        so the dict is itself a valid target file. ``path`` is left out too: a manifest should
        not depend on where the package happens to be installed.
        """
        out: dict[str, Any] = {}
        for key in FIELDS:
            value = getattr(self, key)
            if value is None or (key == "int8" and not value):
                continue
            if key == "profiles":
                value = {name: prof.to_dict() for name, prof in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[key] = value
        return out

    def tensorrt_matches(self, version: str) -> bool:
        """Whether an installed TensorRT ``version`` (e.g. "10.3.0.30") satisfies this target.

        A "X.Y" spec needs exactly major.minor X.Y (what the JetPack ships); ">=X.Y" needs at
        least X.Y. Versions compare numerically, so 10.13 > 10.3. An unparseable ``version``
        raises UserError.
        """
        m = _TRT_VERSION_RE.match(version)
        if not m:
            raise UserError(f"unrecognized TensorRT version {version!r}: expected major.minor[.patch], like 10.3.0.30")
        have = (int(m.group(1)), int(m.group(2) or 0))
        spec = _TRT_SPEC_RE.match(self.tensorrt)
        assert spec, "validated when the target was loaded"
        want = (int(spec.group(2)), int(spec.group(3)))
        return have >= want if spec.group(1) else have == want

    @property
    def levels(self) -> list[Level]:
        """The levels to build when the user names none, parsed and in serving order."""
        return sort_levels(parse_level(s) for s in self.default_levels)

    @property
    def sparse(self) -> frozenset[Level]:
        """The N:M levels this device's sparse tensor cores run (SPARSE_WEIGHTS engines)."""
        return frozenset(parse_level(s) for s in self.sparse_levels)


# --- where profiles live --------------------------------------------------------------------


def targets_dir() -> Path:
    """The folder of built-in target files (it may be missing in a broken install).

    Returns the package's bundled copy when one exists (wheel installs), else the repository's
    top-level ``targets/`` folder next to the package (source checkouts and editable installs).
    """
    here = Path(__file__).resolve().parents[1]  # the epts_export package
    # Packaging: wheels and sdists get targets/ as package data, which pyproject.toml declares
    # like calibration/ -> epts_export.recipes: package-dir "epts_export.target_profiles" =
    # "targets", with package-data ["*.toml", "*.md"]. (The name epts_export.targets is taken by
    # this module.) A wheel installs it as epts_export/target_profiles/. Checking that path first
    # keeps a wheel from picking up an unrelated top-level "targets" folder in site-packages.
    bundled = here / "target_profiles"
    if bundled.is_dir():
        return bundled
    return here.parent / "targets"


def target_dirs() -> list[Path]:
    """The folders searched for target files, lowest precedence first.

    That is ``targets_dir()`` (when it exists), then ``$EPTS_TARGETS_DIR`` when set; the latter
    must be an existing folder, else UserError.
    """
    dirs = [targets_dir()] if targets_dir().is_dir() else []
    extra = os.environ.get(ENV_DIR, "").strip()
    if extra:
        p = Path(extra).expanduser()
        if not p.is_dir():
            raise UserError(f"{ENV_DIR}={extra} is not a folder: point it at a folder of target .toml files or unset it")
        # Pointing the override at the built-in folder itself must not load every file twice.
        if not any(p.resolve() == d.resolve() for d in dirs):
            dirs.append(p)
    return dirs


def all_targets() -> dict[str, Target]:
    """Every known target by name, sorted by name; files in ``$EPTS_TARGETS_DIR`` replace built-ins.

    Raises UserError for an invalid file, an alias declared twice or equal to a target's name,
    or when no target file is found at all.
    """
    found: dict[str, Target] = {}
    for folder in target_dirs():
        # Within one folder names are unique: every file's name must equal its stem.
        for f in sorted(folder.glob("*.toml")):
            t = load_target_file(f)
            found[t.name] = t  # a later folder's file replaces an earlier one of the same name
    if not found:
        looked = ", ".join(str(d) for d in target_dirs()) or str(targets_dir())
        raise UserError(f"no target profiles found (looked in {looked}): reinstall epts-export or set {ENV_DIR}")
    owner: dict[str, Target] = {}
    for name in sorted(found):
        t = found[name]
        for alias in t.aliases:
            if alias in found:
                raise UserError(
                    f"{_display(t.path)}: alias '{alias}' is the name of target '{alias}' "
                    f"({_display(found[alias].path)}): remove or rename the alias"
                )
            if alias in owner:
                raise UserError(
                    f"alias '{alias}' is declared by both {_display(owner[alias].path)} and "
                    f"{_display(t.path)}: keep it in one file"
                )
            owner[alias] = t
    return dict(sorted(found.items()))


def resolve_target(name_or_alias_or_path: str) -> Target:
    """The target for a name ("jetson-orin"), an alias ("orin") or a path to a .toml file.

    Names and aliases are matched case-insensitively and win over a file of the same name in
    the current folder; an argument ending in ".toml" or containing a path separator is loaded
    as a file. Unknown names raise UserError listing the known targets and aliases.
    """
    spec = name_or_alias_or_path.strip()
    looks_like_path = spec.endswith(".toml") or "/" in spec or os.sep in spec
    if looks_like_path and Path(spec).expanduser().is_file():
        # Loaded on its own: a broken built-in file must not stop a user's own profile.
        return load_target_file(Path(spec).expanduser())
    targets = all_targets()
    key = spec.lower()
    if key in targets:
        return targets[key]
    aliases = {a: t for t in targets.values() for a in t.aliases}
    if key in aliases:
        return aliases[key]
    known = ", ".join(targets)
    alias_list = ", ".join(f"{a} -> {aliases[a].name}" for a in sorted(aliases)) or "none"
    if looks_like_path:
        raise UserError(f"target file '{spec}' not found: pass an existing .toml file or a known target ({known})")
    raise UserError(
        f"unknown target '{spec}': known targets are {known} (aliases: {alias_list}); "
        "or pass the path of a .toml target file"
    )


# --- loading and validation -----------------------------------------------------------------


def load_target_file(path: str | os.PathLike[str]) -> Target:
    """Parse and validate one target file; returns the Target.

    Any problem (unreadable file, invalid TOML, missing, unknown or ill-typed field, inconsistent
    values) raises UserError with one line naming the file and the field.
    """
    p = Path(path)
    shown = _display(p)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{shown}: target file not found: check the path") from None
    except OSError as e:
        raise UserError(f"{shown}: cannot read target file ({e.strerror or e}): check the path and permissions") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{shown}: not UTF-8 text: save the target file as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        msg = one_line(e)
        raise UserError(f"{shown}: invalid TOML: {msg}") from None
    return _Checker(p, shown).target(data)


def _display(path: Path) -> str:
    """``path`` relative to the current folder when it lies inside it (targets/foo.toml), else as given."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def _show(value: Any) -> str:
    """A value as it would look in TOML/JSON ("one", [1, 2], true), for error messages."""
    return json.dumps(value, default=str)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # TOML true is not 1


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


class _Checker:
    """Validates the parsed TOML of one file; every failure is a UserError naming file and field."""

    def __init__(self, path: Path, shown: str):
        self.path = path
        self.shown = shown

    def fail(self, key: str, problem: str, value: Any = ..., advice: str = "") -> UserError:
        """The error for field ``key``: what is wrong, the offending value when given, then what to do."""
        got = "" if value is ... else f" (got {_show(value)})"
        return UserError(f"{self.shown}: field '{key}' {problem}{got}" + (f": {advice}" if advice else ""))

    def keys(self, table: dict, allowed: tuple[str, ...], optional: tuple[str, ...], prefix: str) -> None:
        """Unknown keys first (a typo explains the "missing" key that follows), then missing ones."""
        for key in table:
            if key not in allowed:
                raise UserError(
                    f"{self.shown}: unknown field '{prefix}{key}' (allowed: {', '.join(allowed)}): "
                    "fix the spelling or remove it"
                )
        for key in allowed:
            if key not in table and key not in optional:
                raise UserError(f"{self.shown}: missing field '{prefix}{key}' (see targets/README.md for the schema)")

    def string(self, data: dict, key: str, pattern: re.Pattern | None = None, what: str = "a non-empty string") -> str:
        value = data[key]
        if not isinstance(value, str) or not value.strip() or (pattern and not pattern.match(value)):
            raise self.fail(key, f"must be {what}", value)
        return value

    def choice(self, data: dict, key: str, options: tuple[str, ...]) -> str:
        value = data[key]
        if value not in options:
            raise self.fail(key, "must be one of " + " | ".join(f'"{o}"' for o in options), value)
        return value

    def integer(self, data: dict, key: str, minimum: int) -> int:
        value = data[key]
        if not _is_int(value) or value < minimum:
            raise self.fail(key, f"must be an integer >= {minimum}", value)
        return value

    def number(self, data: dict, key: str) -> float:
        value = data[key]
        if not _is_number(value) or value <= 0:
            raise self.fail(key, "must be a number > 0", value)
        return float(value)

    def boolean(self, data: dict, key: str) -> bool:
        value = data[key]
        if not isinstance(value, bool):
            raise self.fail(key, "must be true or false", value)
        return value

    def string_list(self, data: dict, key: str, what: str) -> tuple[str, ...]:
        value = data[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, f"must be a list of {what}", value)
        return tuple(value)

    def levels(self, data: dict, key: str, nm_only: bool) -> tuple[str, ...]:
        """A list of level strings; each must parse, none may repeat, N:M only when ``nm_only``."""
        what = 'N:M level strings like "2:4"' if nm_only else 'level strings like "0.5" or "2:4"'
        items = self.string_list(data, key, what)
        seen = set()
        for item in items:
            try:
                level = parse_level(item)
            except UserError as e:
                raise self.fail(key, f"has a bad level {_show(item)}: {e}") from None
            if nm_only and not level.is_nm:
                raise self.fail(
                    key, 'may only hold N:M levels like "2:4" (SPARSE_WEIGHTS needs structured sparsity)', list(items)
                )
            if level in seen:
                raise self.fail(key, f"lists level {_show(item)} twice", list(items))
            seen.add(level)
        return items

    def triple(self, table: dict, key: str) -> tuple[int, int, int]:
        value = table[key.rsplit(".", 1)[1]]
        if not (isinstance(value, list) and len(value) == 3 and all(_is_int(v) and v >= 0 for v in value)):
            raise self.fail(key, "must be [min, opt, max], three integers >= 0", value)
        if not value[0] <= value[1] <= value[2]:
            raise self.fail(key, "must have min <= opt <= max", value)
        return (value[0], value[1], value[2])

    def profile(self, table: Any, name: str, max_batch: int, max_context: int) -> ShapeRange:
        """One optimization profile, checked against the target's batch and context limits."""
        key = f"profiles.{name}"
        if not isinstance(table, dict):
            raise self.fail(key, "must be a table with batch, seq and past", table)
        self.keys(table, AXES, (), prefix=f"{key}.")
        batch, seq, past = (self.triple(table, f"{key}.{axis}") for axis in AXES)
        if batch[0] < 1:
            raise self.fail(f"{key}.batch", "must have min >= 1", list(batch))
        if seq[0] < 1:
            raise self.fail(f"{key}.seq", "must have min >= 1", list(seq))
        # prefill and decode accept an empty cache (the first call of every generation has none);
        # continue serves calls on a cache, the one case the other two cannot take
        if name == "continue":
            if past[0] < 1:
                raise self.fail(f"{key}.past", "must have min >= 1 (an empty cache is prefill's)", list(past))
            if seq[2] < 2:
                raise self.fail(f"{key}.seq", "must have max >= 2 (one new token on a cache is decode's)", list(seq))
        elif past[0] != 0:
            raise self.fail(f"{key}.past", "must have min 0", list(past))
        if batch[2] > max_batch:
            raise self.fail(f"{key}.batch", f"must have max <= max_batch ({max_batch})", list(batch))
        if name == "decode" and seq != (1, 1, 1):
            raise self.fail(f"{key}.seq", "must be [1, 1, 1] (decode adds one token per call)", list(seq))
        if seq[2] + past[2] > max_context:
            raise self.fail(
                key, f"must fit max_context {max_context}: seq max {seq[2]} + past max {past[2]} = {seq[2] + past[2]}"
            )
        return ShapeRange(name, batch=batch, seq=seq, past=past)

    def target(self, data: dict) -> Target:
        """The whole file: field types first, then the rules that tie fields together."""
        self.keys(data, FIELDS, OPTIONAL_FIELDS, prefix="")

        name = self.string(data, "name", _NAME_RE, "a lowercase name like \"jetson-orin\"")
        if name != self.path.stem:
            raise self.fail("name", f'must equal the file name stem "{self.path.stem}"', name, "rename one of them")
        description = self.string(data, "description")
        kind = self.choice(data, "kind", KINDS)
        aliases = self.string_list(data, "aliases", "lowercase names")
        for alias in aliases:
            if not _NAME_RE.match(alias):
                raise self.fail("aliases", 'must hold lowercase names like "orin"', list(aliases))
            if alias == name:
                raise self.fail("aliases", f"must not repeat the target's own name '{name}'", list(aliases))
        if len(set(aliases)) != len(aliases):
            raise self.fail("aliases", "must not list an alias twice", list(aliases))

        cc = self.string(data, "compute_capability", _MAJOR_MINOR_RE, 'a "major.minor" string like "8.7"')
        tensorrt = self.string(data, "tensorrt", _TRT_SPEC_RE, 'a version like "10.3" (exactly) or ">=10.0" (at least)')
        cuda = self.string(data, "cuda", _MAJOR_MINOR_RE, 'a "major.minor" string like "12.6"')
        jetpack = None
        if kind == "jetson":
            if "jetpack" not in data:
                raise UserError(f'{self.shown}: missing field \'jetpack\' (required when kind = "jetson")')
            jetpack = self.string(data, "jetpack", _JETPACK_RE, 'a version string like "6.2"')
        elif "jetpack" in data:
            raise self.fail("jetpack", f'is only allowed when kind = "jetson", not "{kind}"', data["jetpack"], "remove it")

        memory_gb = self.number(data, "memory_gb")
        budget_gb = self.number(data, "memory_budget_gb")
        if budget_gb > memory_gb:
            raise self.fail("memory_budget_gb", f"must be <= memory_gb ({memory_gb})", data["memory_budget_gb"])
        unified = self.boolean(data, "unified_memory")
        if unified != (kind == "jetson"):
            want = "true" if kind == "jetson" else "false"
            raise self.fail(
                "unified_memory", f'must be {want} for kind = "{kind}" (only Jetson memory is unified)', unified
            )
        precision = self.choice(data, "precision", PRECISIONS)
        if precision not in EXPORT_PRECISIONS:  # refused here, not as an unknown --dtype deep inside build
            raise self.fail("precision", f"{precision} is not supported yet: export, parity and engines run "
                            + " or ".join(EXPORT_PRECISIONS), precision, 'use precision = "fp16"')
        max_batch = self.integer(data, "max_batch", 1)
        max_context = self.integer(data, "max_context", 2)  # one past token plus one new one
        workspace_mb = self.integer(data, "workspace_mb", 1)
        # The workspace is part of what the budget covers (weights + KV cache + workspace).
        if workspace_mb > budget_gb * 1024:
            raise self.fail(
                "workspace_mb", f"must fit in memory_budget_gb ({budget_gb:g} GB = {budget_gb * 1024:g} MB)", workspace_mb
            )
        tactic_dram_mb = None
        if "tactic_dram_mb" in data:
            tactic_dram_mb = self.integer(data, "tactic_dram_mb", 1)
            if tactic_dram_mb > memory_gb * 1024:
                raise self.fail("tactic_dram_mb", f"must fit in memory_gb ({memory_gb:g} GB)", tactic_dram_mb)

        sparse_levels = self.levels(data, "sparse_levels", nm_only=True)
        major, minor = (int(x) for x in cc.split("."))
        if sparse_levels and (major, minor) < SPARSE_MIN_CC:
            raise self.fail(
                "sparse_levels", f"must be empty for compute capability {cc} (sparse tensor cores need 8.0 or newer)",
                list(sparse_levels),
            )
        default_levels = self.levels(data, "default_levels", nm_only=False)
        if not default_levels:
            raise self.fail("default_levels", 'must list at least one level, like ["0.5", "2:4"]', [])
        build_on_device = self.boolean(data, "build_on_device")
        if kind == "jetson" and not build_on_device:
            raise self.fail(
                "build_on_device", 'must be true for kind = "jetson" (Jetson engines are built on the device)', False
            )

        if int8 := (self.boolean(data, "int8") if "int8" in data else False):
            spec = _TRT_SPEC_RE.match(tensorrt)
            if spec.group(1) or (int(spec.group(2)), int(spec.group(3))) >= INT8_MAX_TRT:
                raise self.fail("int8", f"needs a pinned TensorRT below 11 (INT8 engines are built weakly typed), not {tensorrt!r}", True)
            if (major, minor) < INT8_MIN_CC:
                raise self.fail("int8", f"needs INT8 tensor cores (compute capability 7.2 or newer), not {cc}", True)

        profiles_raw = data["profiles"]
        if not isinstance(profiles_raw, dict):
            raise self.fail("profiles", "must be a table with [profiles.prefill], [profiles.decode] and [profiles.continue]",
                            profiles_raw)
        self.keys(profiles_raw, PROFILE_NAMES, (), prefix="profiles.")
        profiles = {n: self.profile(profiles_raw[n], n, max_batch, max_context) for n in PROFILE_NAMES}

        return Target(
            name=name, description=description, kind=kind, aliases=aliases, compute_capability=cc,
            tensorrt=tensorrt, cuda=cuda, jetpack=jetpack, memory_gb=memory_gb, memory_budget_gb=budget_gb,
            unified_memory=unified, precision=precision, max_batch=max_batch, max_context=max_context,
            workspace_mb=workspace_mb, tactic_dram_mb=tactic_dram_mb, sparse_levels=sparse_levels,
            default_levels=default_levels, build_on_device=build_on_device, int8=int8, profiles=profiles,
            path=self.path.resolve(),
        )
