"""The one definition of "the model at level L". Eval, materialize, export and validate all go through it.

For an EPTS artifact, each prunable linear of block i at level L is

    W_eff = rule.mask(order) * (W + scale * B[:, rule] @ A[rule, :]),  rule = level_rule(groups, L, low_flag[i], alloc, i)

(``core.rule``: the adapter groups of the hierarchy, none for a group-0 level in a block whose
low-group check failed). For a baseline artifact the stored pruned model *is* its one level.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..core.config import TrainConfig
from ..core.hilora import merged_weight
from ..core.levels import Group, Level
from ..core.rule import LevelRule, level_rule
from ..errors import UserError
from ..fsutil import ManifestFormat, check_destination, file_hashes, staged_dir, write_json
from ..models.families import family_for, iter_prunable, measured_sparsity
from ..progress import Progress
from .folder import ELASTIC_FILE, Artifact, tensor_key

MATERIALIZED = ManifestFormat("epts-materialized", 1, "materialized level", "create one with `epts-export materialize`")


class ElasticWeights:
    """The contents of ``elastic.safetensors``: per prunable linear (block i, name) its importance
    order and stacked adapters, per block the low-group flag, and the settings they were trained
    with (groups, LoRA rank, scale)."""

    def __init__(self, artifact: Artifact):
        from safetensors.torch import load_file

        self.tensors = load_file(artifact.path / ELASTIC_FILE)
        self.groups: list[Group] = artifact.groups
        self.low_flags: list[bool] = [bool(f) for f in self.tensors["low_group_lora"].tolist()]
        self.allocation = artifact.allocation
        train = TrainConfig.from_dict(artifact.manifest["settings"])
        self.lora_rank, self.scale = train.rank, train.scale

    def order(self, block: int, name: str) -> torch.Tensor:
        """(out, in) int16/int32 importance order, 0 = most important."""
        return self.tensors[tensor_key(block, name, "order")]

    def lora(self, block: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B (out, G*r), A (G*r, in)) of every group, stacked."""
        return self.tensors[tensor_key(block, name, "lora_B")], self.tensors[tensor_key(block, name, "lora_A")]

    def rule(self, block: int, level: Level) -> LevelRule:
        return level_rule(self.groups, level, self.low_flags[block], self.allocation, block)


class ElasticModel:
    """An artifact's model, loaded once, re-materialized in place at any servable level."""

    def __init__(self, artifact: Artifact, dtype: torch.dtype = torch.float32):
        from ..models.hf import load_model

        self.artifact = artifact
        self.model, self.tokenizer = load_model(artifact.model_dir, dtype)
        self.family = family_for(self.model)
        self.level: Level | None = None if artifact.is_elastic else artifact.levels[0]
        self.elastic: ElasticWeights | None = None
        if artifact.is_elastic:
            self.elastic = ElasticWeights(artifact)
            self.dense = {(i, n): lin.weight.detach().clone() for i, n, lin in iter_prunable(self.model, self.family)}

    @torch.no_grad()
    def at(self, level: Level | None, groups_override: list[int] | None = None):
        """The model with level ``level`` merged into its weights (None = the dense model).

        Returns the same nn.Module object each time; weights are rewritten in place.
        ``groups_override`` replaces the adapter groups the hierarchy would pick (ablations only;
        the low-group rule still applies).
        """
        art = self.artifact
        if not art.is_elastic:
            if level is None:
                raise UserError(f"a {art.method} artifact holds only its pruned model; its dense reference is the source model")
            if level != self.level:
                art.check_level(level)
            return self.model
        if level is not None:
            art.check_level(level)
        ew = self.elastic
        for i, n, lin in iter_prunable(self.model, self.family):
            w = self.dense[(i, n)]
            if level is None:
                lin.weight.copy_(w)
                continue
            rule = ew.rule(i, level)
            if groups_override is not None and rule.groups:
                rule = dataclasses.replace(rule, groups=tuple(sorted(groups_override)))
            B, A = ew.lora(i, n)
            merged = merged_weight(w.float(), rule.mask(ew.order(i, n)), B, A, list(rule.groups), ew.lora_rank, ew.scale)
            lin.weight.copy_(merged.to(w.dtype))
        self.level = level
        return self.model


def materialize(artifact: Artifact | str | Path, level: Level, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) at ``level``: an ordinary sparse model of the original architecture."""
    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
    em = ElasticModel(art, dtype)
    return em.at(level), em.tokenizer


def materialize_to_folder(artifact: str | Path, level: Level, out: str | Path, overwrite: bool = False,
                          progress: Progress | None = None) -> Path:
    """Write level ``level`` as a Hugging Face folder (``from_pretrained`` loads it as is) with a
    manifest.json naming the source artifact, the level and the sha256 of every file."""
    from ..models.hf import save_model, save_tokenizer

    out = Path(out)
    check_destination(out, overwrite=overwrite, inputs=[artifact])
    art = Artifact.open(artifact)
    art.check_level(level)
    progress = progress or Progress(enabled=False)
    with staged_dir(out, overwrite=overwrite) as tmp:
        with progress.status(f"materializing level {level.name} of {art.path}"):
            model, tok = materialize(art, level)
        with progress.status(f"writing {out}"):
            save_model(model, tmp)
            save_tokenizer(tok, tmp, input_names=["input_ids", "attention_mask"])  # LLaMA/OPT take no token_type_ids
        write_json(tmp / "manifest.json", {
            **MATERIALIZED.header(), "level": level.name,
            "measured_sparsity": round(measured_sparsity(model), 6),
            "source_artifact": {"path": str(art.path), "manifest_sha256": art.manifest_sha256, "method": art.method},
            "files": file_hashes(tmp),
        })
    return out
