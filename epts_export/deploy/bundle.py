"""On the device: open a bundle (folder or .tar.gz), verify it, and generate text from it.

Exit codes: 1 bad input (not a bundle, unsafe tar), 3 a file is missing or altered,
4 engines built for another GPU or TensorRT version than the one running here.
"""

from __future__ import annotations

import json
import re
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import UserError
from ..fsutil import HashError, ManifestFormat, hash_errors, read_manifest
from ..core.levels import Level, parse_level

EXIT_INTEGRITY = 3
BUNDLE = ManifestFormat("epts-bundle", 1, "bundle", "create one with `epts-export build`")
EXIT_DEVICE = 4


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract a .tar.gz bundle into ``dest`` after checking every member: no absolute paths,
    no '..', no links or device files (a bundle holds plain files and folders only).
    Returns the bundle folder inside ``dest``."""
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"{archive} is not a readable tar archive ({e})") from None
    with tar:
        members = tar.getmembers()
        for m in members:
            p = PurePosixPath(m.name)
            if p.is_absolute() or m.name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", m.name):
                raise UserError(f"unsafe tar {archive}: member {m.name!r} has an absolute path; refusing to extract")
            if ".." in p.parts:
                raise UserError(f"unsafe tar {archive}: member {m.name!r} climbs out of the folder ('..'); refusing to extract")
            if m.issym() or m.islnk():
                raise UserError(f"unsafe tar {archive}: member {m.name!r} is a link ({m.linkname!r}); bundles hold plain files only")
            if not (m.isfile() or m.isdir()):
                raise UserError(f"unsafe tar {archive}: member {m.name!r} is not a plain file or folder")
        tar.extractall(dest, filter="data")  # the checks above, plus the stdlib's own
    manifests = sorted(dest.rglob("manifest.json"), key=lambda p: len(p.parts))
    if not manifests:
        raise UserError(f"{archive} holds no manifest.json: not an epts-export bundle")
    return manifests[0].parent


@dataclass
class Bundle:
    path: Path
    manifest: dict
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> "Bundle":
        p = Path(path)
        if not p.exists():
            raise UserError(f"bundle not found: {p}")
        tmp = None
        if p.is_file():
            tmp = tempfile.TemporaryDirectory(prefix="epts-bundle-")
            p = safe_extract(p, Path(tmp.name))
        manifest = read_manifest(p, BUNDLE, EXIT_INTEGRITY)
        return cls(p, manifest, tmp)

    @property
    def levels(self) -> list[Level]:
        return [parse_level(r["name"]) for r in self.manifest["levels"]]

    def level_record(self, level: Level) -> dict:
        for r in self.manifest["levels"]:
            if parse_level(r["name"]) == level:
                return r
        have = ", ".join(r["name"] for r in self.manifest["levels"])
        raise UserError(f"level {level.name} is not in bundle {self.path} (it has {have})")

    def engine_for(self, level: Level) -> tuple[Path | None, dict]:
        """(engine path, its build record) for a level: built by `build` (in the manifest, hashed)
        or on the device by build_engines.py/.sh (engines.json path; record from its .build.json
        when build_engines.py wrote one). (None, {}) when there is no engine file."""
        rec = self.level_record(level)
        if rec.get("engine"):
            return self.path / rec["engine"]["engine"], {**rec["engine"], "compute_capability":
                                                         self.manifest["target"]["compute_capability"], "origin": "build"}
        specs = self.path / "engines.json"
        if specs.is_file():
            for e in json.loads(specs.read_text()).get("engines", []):
                if parse_level(e["level"]) == level and (self.path / e["engine"]).is_file():
                    engine = self.path / e["engine"]
                    from ..trt.builder import build_record_path

                    rp = build_record_path(engine)
                    record = json.loads(rp.read_text()) if rp.is_file() else {}
                    return engine, {**record, "origin": "device"}
        return None, {}

    def level_errors(self, level: Level) -> list[HashError]:
        """Missing or altered files among the level's own files (graph, configs, tokenizer, engine)."""
        return hash_errors(self.path, self.level_record(level).get("files", {}))

    def integrity_errors(self) -> list[HashError]:
        return hash_errors(self.path, self.manifest.get("files", {}))


def verify(path: str | Path) -> dict:
    """Check every hash; when the bundle holds engines, check that this machine's TensorRT and
    GPU are the ones they were built for. Returns a report; raises UserError with exit code 3 or 4."""
    from ..trt.builder import tensorrt_status

    b = Bundle.open(path)
    errors = b.integrity_errors()
    if errors:
        raise UserError(f"bundle {b.path} failed verification: " + "; ".join(map(str, errors[:5])) +
                        (f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""), EXIT_INTEGRITY)
    report = {"bundle": str(b.path), "files": len(b.manifest.get("files", {})), "hashes": "ok",
              "target": b.manifest["target"]["name"]}
    engines = {lv.name: b.engine_for(lv) for lv in b.levels}
    engines = {k: v for k, v in engines.items() if v[0] is not None}
    if not engines:
        report["engines"] = "none in the bundle: build them on the device with build_engines.sh or build_engines.py"
        return report
    ok, why = tensorrt_status()
    if not ok:
        report["engines"] = f"{len(engines)} present, not checked here: {why}"
        return report
    import tensorrt as trt
    from ..trt.builder import compute_capability

    cc = compute_capability() or "unknown"
    unknown = []
    for name, (path, record) in engines.items():
        if not record.get("tensorrt"):
            unknown.append(name)  # built by trtexec: no record of its TensorRT
            continue
        if record["tensorrt"] != trt.__version__:
            raise UserError(f"the level {name} engine in {b.path} was built with TensorRT {record['tensorrt']}, this machine "
                            f"runs {trt.__version__}: rebuild it here with build_engines.sh", EXIT_DEVICE)
        want_cc = record.get("compute_capability")
        if want_cc and want_cc != cc:
            raise UserError(f"the level {name} engine in {b.path} is for compute capability {want_cc}, this GPU is {cc}: "
                            "rebuild it here with build_engines.sh", EXIT_DEVICE)
    report["engines"] = f"{len(engines) - len(unknown)} engine(s) match TensorRT {trt.__version__} on sm_{cc.replace('.', '')}" + \
        (f"; {', '.join(unknown)} built by trtexec without a record (run build_engines.py to record them)" if unknown else "")
    return report
