"""The elastic artifact: a folder that holds everything needed to serve any trained level.

    <artifact>/
      manifest.json          schema version, model source, levels, groups, settings, calibration,
                             layer-wise allocation (per-block offsets; core.allocation), library
                             versions, per-block metrics, sha256 of every other file
      model/                 a plain Hugging Face folder: the frozen dense model (EPTS) or the
                             pruned model (one-level baselines), with its tokenizer
      elastic.safetensors    EPTS only, per prunable linear "blocks.<i>.<name>.<field>":
                               order   (out, in) int16/int32   importance rank, 0 = most important
                               lora_A  (G*r, in) float32       stacked group adapters
                               lora_B  (out, G*r) float32
                             and "low_group_lora" (num_blocks,) bool

Opening an artifact checks its schema version and the sha256 of every file.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..fsutil import MANIFEST, ManifestFormat, read_manifest, sha256_file, verify_hashes
from ..core.allocation import Allocation
from ..core.config import TrainConfig
from ..core.levels import Group, Level, parse_level
from ..core.rule import active_groups

ARTIFACT = ManifestFormat("epts-elastic", 1, "artifact", "create one with `epts-export optimize`",
                          "re-run optimize with this version or install the epts-export that wrote it",
                          fields=(("method", str), ("levels", list), ("groups", list), ("settings", dict), ("model", dict)))
METHODS = ("epts", "magnitude", "wanda", "sparsegpt")
ELASTIC_FILE = "elastic.safetensors"
MODEL_DIR = "model"


def library_versions() -> dict[str, str]:
    import safetensors
    import torch
    import transformers

    from .. import __version__

    return {"epts_export": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def tensor_key(block: int, name: str, field: str) -> str:
    return f"blocks.{block}.{name}.{field}"


@dataclass
class Artifact:
    path: Path
    manifest: dict

    @functools.cached_property
    def manifest_sha256(self) -> str:
        """The sha256 of manifest.json (what an export or a bundle names its source by); hashed
        once per opened artifact."""
        return sha256_file(self.path / MANIFEST)

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> "Artifact":
        """Read and (by default) hash-check an artifact folder; UserError on anything wrong."""
        p = Path(path)
        manifest = read_manifest(p, ARTIFACT)
        art = cls(p, manifest)
        art._check()
        if verify:
            verify_hashes(p, manifest["files"], "artifact")
        return art

    def _check(self) -> None:
        """What the rest of the code relies on: a known method, levels that parse, groups and
        training settings for EPTS, one level for a baseline."""
        where = f"{self.path / 'manifest.json'}"

        def bad(why: str) -> UserError:
            return UserError(f"{where}: {why}; the artifact is corrupted or was not written by epts-export")

        if self.method not in METHODS:
            raise bad(f"unknown method {self.method!r}")
        try:
            levels = self.levels
            groups = self.groups
        except (UserError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise bad(f"malformed levels or groups ({e})") from None
        if not levels:
            raise bad("it lists no levels")
        try:
            self.allocation
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise bad(f"malformed allocation ({e})") from None
        if self.is_elastic:
            if not any(not g.is_nm for g in groups):
                raise bad("an EPTS artifact needs its sparsity groups")
            try:
                TrainConfig.from_dict(self.manifest["settings"])
            except (KeyError, TypeError, ValueError) as e:
                raise bad(f"settings lack the training configuration ({type(e).__name__}: {e})") from None
        elif len(levels) != 1:
            raise bad(f"a {self.method} artifact holds exactly one level, it lists {len(levels)}")

    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def is_elastic(self) -> bool:
        return self.method == "epts"

    @property
    def levels(self) -> list[Level]:
        return [parse_level(s) for s in self.manifest["levels"]]

    @property
    def groups(self) -> list[Group]:
        return [Group.from_dict(d) for d in self.manifest.get("groups", [])]

    @functools.cached_property
    def allocation(self) -> Allocation:
        """The layer-wise allocation the artifact was pruned with (uniform when it has none)."""
        return Allocation.from_dict(self.manifest.get("allocation"), self.manifest.get("model", {}).get("num_blocks"))

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL_DIR

    def check_level(self, level: Level) -> None:
        """UserError unless this artifact can serve ``level``."""
        if self.is_elastic:
            active_groups(self.groups, level)
            return
        if level not in self.levels:
            raise UserError(
                f"this {self.method} artifact serves only level {self.manifest['levels'][0]}; "
                f"{level.name} needs its own run (only EPTS artifacts are elastic)"
            )

    def describe_range(self) -> str:
        if not self.is_elastic:
            return ", ".join(self.manifest["levels"])
        top = max((g.hi for g in self.groups if not g.is_nm), default=0.0)
        nm = [g.name for g in self.groups if g.is_nm]
        return f"any sparsity in [0, {top:g}]" + (f" and {', '.join(nm)}" if nm else "")
