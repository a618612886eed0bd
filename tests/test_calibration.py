import pytest
import torch

from conftest import build_tokenizer, tiny_llama
from epts_export.pruning.calibration import CalibSpec, build_calibration
from epts_export.text import window_samples
from epts_export.errors import UserError


def test_windows_are_distinct_non_overlapping_and_seeded():
    ids = torch.arange(1000)
    a = window_samples(ids, nsamples=5, seqlen=100, seed=3, what="t")
    assert a.shape == (5, 100)
    assert torch.equal(a, window_samples(ids, 5, 100, 3, "t"))
    assert not torch.equal(a, window_samples(ids, 5, 100, 4, "t"))
    starts = sorted(int(r[0]) for r in a)
    assert all(b - s >= 100 for s, b in zip(starts, starts[1:]))  # no token used twice
    assert all(torch.equal(r, torch.arange(int(r[0]), int(r[0]) + 100)) for r in a)  # contiguous text


def test_too_short_is_an_error_not_a_shortfall():
    with pytest.raises(UserError, match="too short"):
        window_samples(torch.arange(999), 10, 100, 0, "t")


def test_file_and_folder_sources(tmp_path, text_file):
    tok = build_tokenizer()
    c = build_calibration(CalibSpec(str(text_file), nsamples=4, seqlen=16, seed=0), tok)
    assert c.samples.shape == (4, 16)
    assert c.record["kind"] == "file" and c.record["tokens"] > 1000 and len(c.record["sha256"]) == 64
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(text_file.read_text())
    (folder / "skip.bin").write_bytes(b"\x00\x01")
    c2 = build_calibration(CalibSpec(str(folder), nsamples=4, seqlen=16, seed=0), tok)
    assert c2.record["kind"] == "folder" and torch.equal(c.samples, c2.samples)
    with pytest.raises(UserError, match="no text files"):
        build_calibration(CalibSpec(str(_empty(tmp_path)), nsamples=1, seqlen=4), tok)


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_self_source_is_seeded_and_cached(monkeypatch):
    model, tok = tiny_llama(), build_tokenizer()
    spec = CalibSpec("self", nsamples=3, seqlen=12, seed=5)
    a = build_calibration(spec, tok, model, model_key="abc" * 8)
    assert a.samples.shape == (3, 12) and a.record["kind"] == "self"
    import epts_export.pruning.calibration as cal

    monkeypatch.setattr(cal, "self_samples", lambda *a, **k: pytest.fail("should come from the cache"))
    b = build_calibration(spec, tok, model, model_key="abc" * 8)
    assert torch.equal(a.samples, b.samples) and a.record == b.record


def test_random_source():
    model, tok = tiny_llama(), build_tokenizer()
    c = build_calibration(CalibSpec("random", nsamples=2, seqlen=8, seed=1), tok, model)
    assert c.samples.shape == (2, 8) and int(c.samples.max()) < model.config.vocab_size


def test_hf_source_without_datasets_or_network_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="datasets|could not load"):
        build_calibration(CalibSpec("hf:wikitext2", nsamples=1, seqlen=4), build_tokenizer())
