"""The one definition of "the model at level L". Eval, materialize and export all go through it.

For an EPTS artifact, level L uses the adapter groups ``levels.active_groups(groups, L)`` (group-0
adapters dropped in blocks whose low-group check failed, for levels inside group 0), the mask
``masks.level_mask(order, L)``, and ``hilora.merged_weight``. For a baseline artifact the
stored pruned model *is* its one level.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from .folder import ELASTIC_FILE, Artifact, tensor_key
from ..errors import UserError
from ..fsutil import ManifestFormat, file_hashes, sha256_file, staged_dir, write_json
from ..models.families import family_for, iter_prunable
from ..core.hilora import merged_weight
from ..core.levels import Level, active_groups, unstructured_group
from ..core.masks import level_mask
from ..models.source import save_tokenizer

MATERIALIZED = ManifestFormat("epts-materialized", 1, "materialized level", "create one with `epts-export materialize`")


def load_hf_model(path: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a plain Hugging Face folder, eval mode, on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load a model from {path}: {str(e).splitlines()[0]}") from None
    model.eval()
    return model, tok


class ElasticModel:
    """An artifact's model, loaded once, re-materialized in place at any servable level."""

    def __init__(self, artifact: Artifact, dtype: torch.dtype = torch.float32):
        self.artifact = artifact
        self.model, self.tokenizer = load_hf_model(artifact.model_dir, dtype)
        self.family = family_for(self.model)
        self.level: Level | None = None if artifact.is_elastic else artifact.levels[0]
        if artifact.is_elastic:
            self.tensors = load_file(artifact.path / ELASTIC_FILE)
            self.dense = {(i, n): lin.weight.detach().clone() for i, n, lin in iter_prunable(self.model, self.family)}
            self.low_flags = self.tensors["low_group_lora"].tolist()
            s = artifact.manifest["settings"]
            self.rank, self.scale = int(s["rank"]), float(s["scale"])

    @torch.no_grad()
    def at(self, level: Level | None, groups_override: list[int] | None = None):
        """The model with level ``level`` merged into its weights (None = the dense model).

        Returns the same nn.Module object each time; weights are rewritten in place.
        ``groups_override`` replaces the adapter groups the hierarchy would pick (ablations only).
        """
        art = self.artifact
        if not art.is_elastic:
            if level is not None and level != self.level:
                art.check_level(level)
            if level is None:
                raise UserError(f"a {art.method} artifact holds only its pruned model; its dense reference is the source model")
            return self.model
        if level is not None:
            art.check_level(level)
        groups = art.groups
        active = active_groups(groups, level) if level is not None else []
        if groups_override is not None:
            active = sorted(groups_override)
        in_low_group = level is not None and not level.is_nm and unstructured_group(groups, level.sparsity) == 0
        for i, n, lin in iter_prunable(self.model, self.family):
            w = self.dense[(i, n)]
            if level is None:
                lin.weight.copy_(w)
                continue
            use = [] if (in_low_group and not self.low_flags[i]) else active
            order = self.tensors[tensor_key(i, n, "order")]
            B = self.tensors[tensor_key(i, n, "lora_B")]
            A = self.tensors[tensor_key(i, n, "lora_A")]
            lin.weight.copy_(merged_weight(w.float(), level_mask(order, level), B, A, use, self.rank, self.scale).to(w.dtype))
        self.level = level
        return self.model


def materialize(artifact: Artifact | str | Path, level: Level, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) at ``level``: an ordinary sparse model of the original architecture."""
    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
    em = ElasticModel(art, dtype)
    return em.at(level), em.tokenizer


def materialize_to_folder(artifact: str | Path, level: Level, out: str | Path, overwrite: bool = False) -> Path:
    """Write level ``level`` as a Hugging Face folder (``from_pretrained`` loads it as is) with a
    manifest.json naming the source artifact, the level and the sha256 of every file."""
    from ..models.families import measured_sparsity

    art = Artifact.open(artifact)
    art.check_level(level)
    out = Path(out)
    with staged_dir(out, overwrite=overwrite) as tmp:
        model, tok = materialize(art, level)
        model.save_pretrained(tmp)
        save_tokenizer(tok, tmp)
        write_json(tmp / "manifest.json", {
            **MATERIALIZED.header(), "level": level.name,
            "measured_sparsity": round(measured_sparsity(model), 6),
            "source_artifact": {"path": str(art.path), "manifest_sha256": sha256_file(art.path / "manifest.json"), "method": art.method},
            "files": file_hashes(tmp),
        })
    return out
