"""optimize -> eval -> materialize through the Python API on tiny LLaMA and OPT models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import BUILDERS, OTHER_TYPES, spec_for, tiny_of_type
from epts_export.artifact.folder import ELASTIC_FILE, Artifact
from epts_export.pruning.calibration import CalibSpec
from epts_export.core.config import TrainConfig
from epts_export.errors import UserError
from epts_export.artifact.evaluate import evaluate
from epts_export.models.families import FAMILIES, family_for, iter_prunable, measured_sparsity, supported_types
from epts_export.core.levels import parse_level, parse_levels
from epts_export.core.masks import is_nm_sparse
from epts_export.artifact.materialize import ElasticModel, materialize, materialize_to_folder
from epts_export.pruning.optimize import OptimizeSpec, optimize

@pytest.fixture(scope="module")
def artifacts(tiny_artifacts):
    return tiny_artifacts


def test_every_supported_model_type_has_a_test_model():
    """Keyed on config.model_type, as optimum does: a listed type without a tiny model fails here."""
    assert set(supported_types()) == set(BUILDERS) | set(OTHER_TYPES), "a supported model type has no tiny model"
    assert {f.name for f in FAMILIES} <= set(BUILDERS)


@pytest.mark.parametrize("model_type", OTHER_TYPES)
def test_other_model_types_optimize_materialize_export_and_validate(model_type, text_file, tmp_path):
    from conftest import build_tokenizer
    from epts_export.onnx.export import ExportSpec, export
    from epts_export.onnx.parity import validate

    model = tiny_of_type(model_type)
    assert model.config.model_type == model_type
    model.save_pretrained(tmp_path / "model")
    build_tokenizer().save_pretrained(tmp_path / "model")
    spec = OptimizeSpec(model=str(tmp_path / "model"), out=tmp_path / "art", levels=parse_levels("0.5,2:4"),
                        calib=CalibSpec(source=str(text_file), nsamples=2, seqlen=16), train=TrainConfig(rank=2, epochs=1))
    art = optimize(spec)
    m = ElasticModel(Artifact.open(art)).at(parse_level("0.5"))
    assert abs(measured_sparsity(m) - 0.5) < 0.01
    export(ExportSpec(artifact=art, out=tmp_path / "onnx", levels=parse_levels("0.5,2:4")))
    report = validate(tmp_path / "onnx")
    assert report["passed"], report["failures"]


@pytest.mark.parametrize("fam", list(BUILDERS))
def test_artifact_manifest_and_files(artifacts, fam):
    art = Artifact.open(artifacts[fam])
    m = art.manifest
    assert m["method"] == "epts" and m["model"]["family"] == fam
    assert m["levels"] == ["0.3", "0.5", "0.7", "2:4"]
    assert len(art.groups) == 8  # 7 unstructured (reference grouping to 0.7) + 2:4
    assert m["calibration"]["nsamples"] == 4 and len(m["calibration"]["sha256"]) == 64
    assert set(m["files"]) >= {ELASTIC_FILE, "model/config.json", "model/model.safetensors"}
    t = load_file(artifacts[fam] / ELASTIC_FILE)
    assert t["low_group_lora"].shape == (2,)
    assert t["blocks.0.self_attn.q_proj.order"].dtype == torch.int16


@pytest.mark.parametrize("fam", list(BUILDERS))
def test_materialized_levels_have_exact_masks(artifacts, fam):
    em = ElasticModel(Artifact.open(artifacts[fam]))
    order = load_file(artifacts[fam] / ELASTIC_FILE)
    for name in ["0.3", "0.55", "0.7"]:  # 0.55 was never listed: the whole range is servable
        model = em.at(parse_level(name))
        for i, n, lin in iter_prunable(model, em.family):
            keep = order[f"blocks.{i}.{n}.order"] < int((1 - float(name)) * lin.in_features + 0.5)
            assert torch.equal(lin.weight != 0, keep), f"{name} {i} {n}"
    model = em.at(parse_level("2:4"))
    assert all(is_nm_sparse(lin.weight, 2, 4) for _, _, lin in iter_prunable(model, em.family))
    assert measured_sparsity(model) == pytest.approx(0.5)
    dense = em.at(None)
    assert measured_sparsity(dense) < 0.01


def test_adapters_change_the_weights(artifacts):
    """The merged weights are not the plain masked dense weights: the adapters learned something."""
    em = ElasticModel(Artifact.open(artifacts["llama"]))
    dense = {k: v.clone() for k, v in em.dense.items()}
    model = em.at(parse_level("0.7"))
    diffs = [((lin.weight - dense[(i, n)] * (lin.weight != 0)).abs().max().item()) for i, n, lin in iter_prunable(model, em.family)]
    assert max(diffs) > 0


def test_eval_reports_dense_and_levels(artifacts, eval_file):
    report = evaluate(artifacts["llama"], str(eval_file), seqlen=32, levels=parse_levels("0.5,2:4"))
    assert [r["level"] for r in report["results"]] == ["dense", "0.5", "2:4"]
    assert report["results"][1]["sparsity"] == pytest.approx(0.5)
    assert all(r["ppl"] > 1 for r in report["results"])
    assert report["data"]["tokens"] > 0 and len(report["data"]["sha256"]) == 64 and report["seqlen"] == 32


def test_eval_matches_a_manual_perplexity(artifacts, eval_file):
    """eval's number is exp(mean NLL) over non-overlapping windows; recompute it by hand."""
    model, tok = materialize(artifacts["opt"], parse_level("0.5"))
    ids = tok(eval_file.read_text(), add_special_tokens=False)["input_ids"]
    n = len(ids) // 32
    x = torch.tensor(ids[: n * 32]).view(n, 32)
    with torch.no_grad():
        logits = model(input_ids=x).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    report = evaluate(artifacts["opt"], str(eval_file), seqlen=32, levels=parse_levels("0.5"))
    assert report["results"][1]["ppl"] == pytest.approx(float(torch.exp(nll)), rel=1e-4)


def test_materialize_writes_a_plain_hf_folder(artifacts, tmp_path):
    out = materialize_to_folder(artifacts["llama"], parse_level("0.6"), tmp_path / "m60")
    model = AutoModelForCausalLM.from_pretrained(out)  # no extra code needed
    assert measured_sparsity(model) == pytest.approx(0.6, abs=0.01)
    assert json.loads((out / "manifest.json").read_text())["level"] == "0.6"
    assert not (tmp_path / "m60.partial").exists()


def test_level_above_trained_range_is_refused(artifacts, tmp_path):
    with pytest.raises(UserError, match="above the trained range"):
        materialize_to_folder(artifacts["llama"], parse_level("0.8"), tmp_path / "m80")
    assert not (tmp_path / "m80").exists() and not (tmp_path / "m80.partial").exists()


def test_tampered_and_truncated_files_are_named(artifacts, tmp_path):
    import shutil

    for victim, action in [("elastic.safetensors", "truncate"), ("model/config.json", "alter")]:
        copy = tmp_path / f"copy-{action}"
        shutil.copytree(artifacts["llama"], copy)
        p = copy / victim
        if action == "truncate":
            p.write_bytes(p.read_bytes()[:100])
        else:
            p.write_text(p.read_text().replace("64", "65", 1))
        with pytest.raises(UserError, match=victim):
            Artifact.open(copy)


def test_schema_version_mismatch(artifacts, tmp_path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(artifacts["llama"], copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="schema version 99"):
        Artifact.open(copy)


def test_resume_gives_the_same_artifact(tiny_dirs, text_file, tmp_path):
    full = optimize(spec_for(tiny_dirs["llama"], tmp_path / "full", text_file))

    class Boom(KeyboardInterrupt):
        pass

    def interrupt(i):
        if i == 0:
            raise Boom

    out = tmp_path / "resumed"
    with pytest.raises(UserError, match="--resume") as e:
        optimize(spec_for(tiny_dirs["llama"], out, text_file), on_block_done=interrupt)
    assert e.value.exit_code == 130
    assert not out.exists() and (tmp_path / "resumed.partial" / "ckpt" / "block_0000.safetensors").exists()
    with pytest.raises(UserError, match="interrupted run"):  # refuses to silently start over
        optimize(spec_for(tiny_dirs["llama"], out, text_file))
    optimize(spec_for(tiny_dirs["llama"], out, text_file, resume=True))
    a, b = load_file(full / ELASTIC_FILE), load_file(out / ELASTIC_FILE)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not (tmp_path / "resumed.partial").exists()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("level", ["0.5", "2:4"])
def test_baselines_share_the_artifact_and_eval_path(tiny_dirs, text_file, eval_file, tmp_path, method, level):
    out = optimize(spec_for(tiny_dirs["opt"], tmp_path / method, text_file, method=method, levels=level))
    art = Artifact.open(out)
    assert art.method == method and not art.is_elastic
    model, _ = materialize(art, parse_level(level))
    assert measured_sparsity(model) == pytest.approx(0.5, abs=0.01)
    if level == "2:4":
        assert all(is_nm_sparse(lin.weight, 2, 4) for _, _, lin in iter_prunable(model, family_for(model)))
    report = evaluate(out, str(eval_file), seqlen=32)
    assert [r["level"] for r in report["results"]] == ["dense", level]
    with pytest.raises(UserError, match="only level"):
        art.check_level(parse_level("0.6"))


def test_baseline_takes_one_level(tiny_dirs, text_file, tmp_path):
    with pytest.raises(UserError, match="one level per run"):
        optimize(spec_for(tiny_dirs["opt"], tmp_path / "x", text_file, method="wanda", levels="0.5,0.6"))


def test_unsupported_architecture(tmp_path, text_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import build_tokenizer

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256)).save_pretrained(tmp_path / "gpt2")
    build_tokenizer().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError, match="supported model types are .*llama.*opt"):
        optimize(spec_for(tmp_path / "gpt2", tmp_path / "out", text_file))
    assert not (tmp_path / "out.partial").exists()


def test_low_group_flag_drops_group0_adapters_only_in_group0(artifacts):
    em = ElasticModel(Artifact.open(artifacts["llama"]))
    em.elastic.low_flags = [False, True]  # block 0 failed its low-group check, block 1 passed
    model = em.at(parse_level("0.3"))
    for i, n, lin in iter_prunable(model, em.family):
        masked_dense = em.dense[(i, n)] * (lin.weight != 0)
        assert torch.equal(lin.weight, masked_dense) == (i == 0), (i, n)
    model = em.at(parse_level("0.6"))  # higher groups keep every adapter, group 0's included
    assert not any(torch.equal(lin.weight, em.dense[(i, n)] * (lin.weight != 0)) for i, n, lin in iter_prunable(model, em.family))
