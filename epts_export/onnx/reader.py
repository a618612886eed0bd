"""Reading an ONNX export folder back: its manifest, levels, graphs and source artifact."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..artifact.folder import Artifact
from ..core.levels import Level, parse_level
from ..errors import UserError
from ..fsutil import MANIFEST, HashError, hash_errors, read_manifest, verify_hashes, write_json
from ..device.interface import DECODER_GRAPH, EXPORT, GRAPH_FILE, WEIGHTS_GRAPH, level_dirname  # noqa: F401



@dataclass
class OnnxExport:
    path: Path
    manifest: dict
    integrity_errors: list[HashError] = field(default_factory=list)
    verified: bool = False  # its files match the manifest's hashes (checked, or just written by this process)

    @classmethod
    def open(cls, path: str | Path, verify: str = "raise") -> "OnnxExport":
        """Read an export folder. ``verify``: 'raise' (UserError on a bad hash), 'collect' (keep
        the failures in ``integrity_errors``, for validate), 'skip', or 'written' (this process
        has just written it and hashed every file doing so: nothing to check)."""
        p = Path(path)
        manifest = read_manifest(p, EXPORT)
        exp = cls(p, manifest)
        exp._check()
        if verify == "raise":
            verify_hashes(p, manifest.get("files", {}), "export")
        elif verify == "collect":
            exp.integrity_errors = hash_errors(p, manifest.get("files", {}))
        exp.verified = verify != "skip"
        return exp

    def _check(self) -> None:
        where = self.path / MANIFEST
        try:
            levels = self.levels
            dirs = [r.get("dir", "") for r in self.manifest["levels"]]
            outputs = self.manifest["io"]["outputs"]
        except (UserError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{where}: malformed levels or io ({e}); the export is corrupted") from None
        if self.mode not in ("baked", "dynamic") or self.dtype not in ("fp32", "fp16", "int8") or not levels \
                or (self.dtype == "int8" and self.mode != "baked"):
            raise UserError(f"{where}: mode {self.mode!r}, dtype {self.dtype!r}, {len(levels)} levels; the export is corrupted")
        if not isinstance(outputs, list) or any(Path(d).is_absolute() or ".." in Path(d).parts for d in dirs):
            raise UserError(f"{where}: malformed io or level folders; the export is corrupted")

    @property
    def mode(self) -> str:
        return self.manifest["mode"]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def levels(self) -> list[Level]:
        return [parse_level(r["name"]) for r in self.manifest["levels"]]

    def level_record(self, level: Level) -> dict:
        return next(r for r in self.manifest["levels"] if parse_level(r["name"]) == level)

    def graph_path(self, level: Level) -> Path:
        if self.mode == "dynamic":
            return self.path / GRAPH_FILE
        return self.path / level_dirname(level) / GRAPH_FILE

    @property
    def has_parts(self) -> bool:
        """A dynamic export with weights.onnx and decoder.onnx (the fast level switch)."""
        return self.mode == "dynamic" and {WEIGHTS_GRAPH, DECODER_GRAPH} <= set(self.manifest.get("files", {}))

    def level_index(self, level: Level) -> int | None:
        """The ``sparsity_level`` value of ``level`` in dynamic mode (None in baked mode)."""
        if self.mode != "dynamic":
            return None
        return self.levels.index(level)

    def source_artifact(self, override: "str | Path | Artifact | None" = None) -> Artifact:
        """The artifact this export was made from (``override``: where it is now, or the opened
        artifact itself); UserError when it is missing or is another artifact."""
        if isinstance(override, Artifact):
            art, src = override, override.path
        else:
            src = Path(override) if override else Path(self.manifest["source_artifact"]["path"])
            if not src.exists():
                raise UserError(f"the source artifact {src} of export {self.path} is not there; pass --artifact PATH")
            art = Artifact.open(src)
        want = self.manifest["source_artifact"]["manifest_sha256"]
        if art.manifest_sha256 != want:
            raise UserError(f"artifact {src} is not the one export {self.path} was made from (manifest sha256 differs)")
        return art

    def record_parity(self, parity: dict) -> None:
        """Store the parity result in the manifest (written atomically)."""
        self.manifest["parity"] = parity
        write_json(self.path / MANIFEST, self.manifest)
