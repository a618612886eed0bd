"""The one staged folder, the one atomic writer, the one manifest reader and structured hash errors."""

from __future__ import annotations

import json
import os

import pytest

from epts_export.errors import UserError
from epts_export.fsutil import (ManifestFormat, atomic_path, file_hashes, hash_errors, partial_path, read_manifest,
                                staged_dir, write_json)

FMT = ManifestFormat("epts-test", 2, "test folder", "create one with `make`")


def test_staged_dir_appears_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("killed")
    assert not out.exists() and not partial_path(out).exists()
    with staged_dir(out) as tmp:
        (tmp / "whole").write_text("x")
    assert (out / "whole").is_file() and not partial_path(out).exists()
    with pytest.raises(UserError, match="already exists"):
        with staged_dir(out):
            pass
    with staged_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["new"]


def test_resumable_partial_is_kept_and_refused_without_resume(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(out, resumable=True) as tmp:
            (tmp / "block_0").write_text("done")
            raise KeyboardInterrupt
    assert (partial_path(out) / "block_0").is_file()
    with pytest.raises(UserError, match="pass --resume"):
        with staged_dir(out, resumable=True):
            pass
    with staged_dir(out, resumable=True, resume=True) as tmp:
        assert (tmp / "block_0").read_text() == "done"
    assert (out / "block_0").is_file()
    # a run that fails before writing anything leaves nothing that would block a clean rerun
    with pytest.raises(ValueError):
        with staged_dir(tmp_path / "other", resumable=True):
            raise ValueError("bad --lr")
    assert not partial_path(tmp_path / "other").exists()


def test_private_staging_first_finisher_wins(tmp_path):
    dest = tmp_path / "cache" / "model"
    with staged_dir(dest, private=True) as a:
        (a / "who").write_text("a")
        with staged_dir(dest, private=True) as b:  # a concurrent writer finishes first
            (b / "who").write_text("b")
    assert (dest / "who").read_text() == "b"
    assert [p.name for p in dest.parent.iterdir()] == ["model"]  # no temporary folder is left


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "f.json"
    write_json(target, {"a": 1})
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise OSError("disk full")
    assert json.loads(target.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["f.json"]


@pytest.mark.parametrize("version, says", [(3, "newer than the version 2"), (1, "not the version 2"),
                                           ("2", "not the version 2"), (None, "not the version 2")])
def test_manifest_reader_checks_the_schema_version(tmp_path, version, says):
    write_json(tmp_path / "manifest.json", {"format": "epts-test", "schema_version": version})
    with pytest.raises(UserError, match=says):
        read_manifest(tmp_path, FMT)


def test_manifest_reader_bad_files(tmp_path):
    with pytest.raises(UserError, match="test folder not found"):
        read_manifest(tmp_path / "nope", FMT)
    with pytest.raises(UserError, match="no manifest.json.*make"):
        read_manifest(tmp_path, FMT)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not an epts-export test folder"):
        read_manifest(tmp_path, FMT)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON") as e:
        read_manifest(tmp_path, FMT, corrupt_exit=3)
    assert e.value.exit_code == 3
    write_json(tmp_path / "manifest.json", {**FMT.header(), "x": 1, "files": {}})
    assert read_manifest(tmp_path, FMT)["x"] == 1


def test_hash_errors_say_which_folder_they_belong_to(tmp_path):
    for rel in ("level-0.5/model.onnx", "level-0.55/model.onnx", "model.onnx", "level-0.5/a b/c.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    files = file_hashes(tmp_path)
    for rel in files:
        (tmp_path / rel).write_text("tampered")
    (tmp_path / "level-0.55" / "model.onnx").unlink()
    errors = {e.path: e for e in hash_errors(tmp_path, files)}
    assert errors["level-0.55/model.onnx"].missing and not errors["model.onnx"].missing
    assert {p for p, e in errors.items() if e.under("level-0.5")} == {"level-0.5/model.onnx", "level-0.5/a b/c.json"}
    assert {p for p, e in errors.items() if e.under("")} == {"model.onnx"}
    assert str(errors["level-0.5/a b/c.json"]) == "file level-0.5/a b/c.json does not match its sha256 in manifest.json (altered or truncated)"
