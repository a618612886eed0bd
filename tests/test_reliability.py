"""Issue 26's sweep, the cases that a table row cannot hold: concurrent writers, signals, a full
disk, unbounded text, torchrun without peers, a tampered build cache, terminal markup in the
prompt, code dropped beside the bundle's scripts, and baked level records that share a folder.
(The one-command cases are rows of tests/test_bad_inputs.py.)"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from epts_export.cli import app
from epts_export.core.levels import parse_levels
from epts_export.deploy.pipeline import BuildSpec, build
from epts_export.errors import UserError

runner = CliRunner()
REPO = Path(__file__).parents[1]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def bundle(tiny_artifacts, tmp_path_factory) -> Path:
    return build(BuildSpec(source=str(tiny_artifacts["llama"]), target="rtx", out=tmp_path_factory.mktemp("rel") / "dist",
                           levels=parse_levels("0.5,2:4")))


def test_a_second_writer_into_a_live_partial_is_refused_and_leaves_the_first_alone(tiny_artifacts, tmp_path):
    """materialize/export into an --out that a live run is writing (its <out>.partial locked): one
    line, the partial untouched; once the lock is gone the partial is a killed run's and replaced."""
    out = tmp_path / "m"
    partial = tmp_path / "m.partial"
    partial.mkdir()
    (partial / "theirs").write_text("x")
    fd = os.open(partial, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        for args in (["materialize", tiny_artifacts["llama"], "--level", "0.5", "--out", out],
                     ["export", tiny_artifacts["llama"], "--out", out, "--levels", "0.5"]):
            r = cli(*args)
            assert r.exit_code == 1 and "another epts-export is writing" in " ".join(r.output.split()), r.output
            assert (partial / "theirs").is_file() and not out.exists()
    finally:
        os.close(fd)
    r = cli("materialize", tiny_artifacts["llama"], "--level", "0.5", "--out", out)
    assert r.exit_code == 0 and (out / "config.json").is_file() and not partial.exists(), r.output


def test_resume_while_the_first_run_is_alive_is_refused(tiny_dirs, text_file, tmp_path):
    out = tmp_path / "art"
    partial = tmp_path / "art.partial"
    (partial / "ckpt").mkdir(parents=True)
    fd = os.open(partial, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        r = cli("optimize", tiny_dirs["llama"], "--out", out, "--calib", text_file, "--nsamples", 2, "--seqlen", 16,
                "--levels", "0.5", "--resume", "-q")
        assert r.exit_code == 1 and "another epts-export is writing" in " ".join(r.output.split()), r.output
        r = cli("optimize", tiny_dirs["llama"], "--out", out, "--calib", text_file, "--nsamples", 2, "--seqlen", 16,
                "--levels", "0.5", "-q")  # without --resume: the live run is said as such too
        assert r.exit_code == 1 and "another epts-export is writing" in " ".join(r.output.split()), r.output
    finally:
        os.close(fd)
    assert (partial / "ckpt").is_dir()


def test_an_output_that_appears_while_writing_is_not_replaced(tmp_path):
    from epts_export.fsutil import staged_dir

    final = tmp_path / "o"
    with pytest.raises(UserError, match="appeared while this run wrote it"):
        with staged_dir(final) as tmp:
            (tmp / "mine").write_text("x")
            final.mkdir()
            (final / "theirs").write_text("y")
    assert (final / "theirs").is_file() and not (tmp_path / "o.partial").exists()


def test_bundle_scripts_import_no_stdlib_module_dropped_beside_them(bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    marker = tmp_path / "imported"
    for name in ("hashlib.py", "json.py", "pathlib.py", "argparse.py"):
        (b / name).write_text(f"open({str(marker)!r}, 'a').write('{name} ')\n")
    r = subprocess.run([sys.executable, str(b / "run.py"), "--level", "0.5", "--prompt", "w1", "--max-new-tokens", "2"],
                       capture_output=True, text=True, cwd=b, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, str(b / "build_engines.py")], capture_output=True, text=True, cwd=b, timeout=300)
    assert r.returncode == 1, r.stderr
    assert not marker.exists(), marker.read_text()


def test_the_prompt_and_the_text_are_printed_as_they_are(bundle):
    for prompt in ("[bold]w1[/bold] [red]w2", "w1 [/]"):
        r = cli("run", bundle, "--level", "0.5", "--prompt", prompt, "--max-new-tokens", 2)
        assert r.exit_code == 0, r.output
        assert prompt in r.output


def test_a_full_disk_is_one_line(tiny_artifacts, tmp_path, monkeypatch):
    import epts_export.onnx.export as onnx_export

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x" / "model.onnx"))

    monkeypatch.setattr(onnx_export, "export", full)
    r = cli("export", tiny_artifacts["llama"], "--out", tmp_path / "x", "--levels", "0.5")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "no space left on the device" in " ".join(r.output.split()), r.output


def test_text_past_the_bound_is_refused_before_it_is_read(tiny_artifacts, text_file, monkeypatch):
    import epts_export.text as text

    monkeypatch.setattr(text, "MAX_TEXT_BYTES", 1000)
    r = cli("eval", tiny_artifacts["llama"], "--data", text_file, "--seqlen", 32)
    assert r.exit_code == 1 and "at most 0 MiB of text is read" in " ".join(r.output.split()), r.output


def test_torchrun_without_its_peers_waits_a_bounded_time(monkeypatch):
    import epts_export.pruning.distributed as distributed

    monkeypatch.setattr(distributed, "JOIN_TIMEOUT", timedelta(seconds=2))
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561"}.items():
        monkeypatch.setenv(k, v)
    t = time.time()
    with pytest.raises(UserError, match="the other ranks did not join"):
        with distributed.init_distributed("cpu"):
            pass
    assert time.time() - t < 60
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(UserError, match="the rank must be 0 .. 1"):
        distributed.world_from_env()
    monkeypatch.delenv("RANK")
    with pytest.raises(UserError, match="RANK is not set"):
        distributed.world_from_env()


def test_a_tampered_cached_export_is_validated_again(tiny_artifacts, tmp_path):
    """The cached parity result belongs to the export files it checked: an export changed and
    re-hashed since (or a cached report that is garbage) is validated again, never shipped with
    the old pass."""
    out = tmp_path / "dist"
    spec = dict(source=str(tiny_artifacts["llama"]), target="rtx", out=out, levels=parse_levels("0.5"))
    build(BuildSpec(**spec))
    onnx_dir = next((out / ".stages").glob("onnx-*"))
    m = json.loads((onnx_dir / "manifest.json").read_text())
    (onnx_dir / "generation_config.json").write_text('{"eos_token_id": 2}\n')  # changed, and the manifest re-hashed
    m["files"]["generation_config.json"] = hashlib.sha256(b'{"eos_token_id": 2}\n').hexdigest()
    (onnx_dir / "manifest.json").write_text(json.dumps(m))
    report = next((out / ".stages").glob("parity-*.json"))
    old = json.loads(report.read_text())["export_files_sha256"]
    build(BuildSpec(**spec, overwrite=True))
    assert json.loads(report.read_text())["export_files_sha256"] != old  # validated again
    report.write_text("garbage{")
    build(BuildSpec(**spec, overwrite=True))
    assert json.loads(report.read_text())["passed"] is True


def _wait_for(pred, timeout=120):
    end = time.time() + timeout
    while not pred():
        assert time.time() < end
        time.sleep(0.05)


def test_an_interrupted_or_bad_extraction_removes_the_tar_copy_at_once(bundle, tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM while a .tar.gz is extracted, or an archive whose manifest is refused:
    the temporary copy goes before the exception leaves Bundle.open, not whenever it is collected."""
    import tarfile
    import tempfile

    from epts_export.device import bundle as bundle_mod

    tar = tmp_path / "b.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(bundle, arcname="rtx-ada")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    real = bundle_mod.safe_extract

    def interrupted(src, dest):
        real(src, dest)
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_mod, "safe_extract", interrupted)
    with pytest.raises(KeyboardInterrupt) as caught:  # held: its traceback keeps Bundle.open's frame alive
        bundle_mod.Bundle.open(tar)
    assert not list(tmpdir.iterdir()) and caught.value is not None
    monkeypatch.setattr(bundle_mod, "safe_extract", real)
    monkeypatch.setattr(bundle_mod, "check_levels", lambda *a: (_ for _ in ()).throw(UserError("bad levels")))
    with pytest.raises(UserError, match="bad levels") as caught:
        bundle_mod.Bundle.open(tar)
    assert not list(tmpdir.iterdir()) and caught.value is not None


def test_sigterm_cleans_up_the_tar_copy_and_the_partial_folder(bundle, tiny_artifacts, tmp_path):
    """SIGTERM unwinds like Ctrl-C: `run` of a .tar.gz removes its extracted copy, `export`
    its <out>.partial; both exit 143 with one line."""
    import tarfile

    tar = tmp_path / "b.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(bundle, arcname="rtx-ada")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "epts_export", "run", str(tar), "--level", "0.5", "--prompt", "w1",
           "--max-new-tokens", "200"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: any(tmpdir.glob("epts-bundle-*/rtx-ada/model/decoder.onnx")) or p.poll() is not None)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    if p.returncode != 0:  # the signal came while it ran (a fast machine may have finished first)
        assert p.returncode == 143 and "terminated" in out, out
    assert not list(tmpdir.glob("epts-bundle-*")), list(tmpdir.iterdir())  # (other libraries may leave their own)
    x = tmp_path / "x"
    cmd = [sys.executable, "-m", "epts_export", "export", str(tiny_artifacts["llama"]), "--out", str(x),
           "--levels", "0.3,0.5,0.7,2:4"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: (tmp_path / "x.partial").exists() or p.poll() is not None)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    if p.returncode != 0:
        assert p.returncode == 143 and "terminated" in out, out
        assert not (tmp_path / "x.partial").exists() and not x.exists()


def test_baked_level_records_need_their_own_folder_and_graph():
    from epts_export.device.bundle import check_levels

    files = {f"level-{n}/{f}": "0" * 64 for n in ("0.5", "0.7") for f in ("model.onnx", "tokenizer.json", "config.json")}
    target = {"name": "rtx-ada", "compute_capability": "8.9"}
    ok = {"layout": "baked", "target": target, "files": files,
          "levels": [{"name": "0.5", "dir": "level-0.5"}, {"name": "0.7", "dir": "level-0.7"}]}
    check_levels(ok, "m")
    same = {**ok, "levels": [{"name": "0.5", "dir": "level-0.7"}, {"name": "0.7", "dir": "level-0.7"}]}
    with pytest.raises(UserError, match="is another level's too"):
        check_levels(same, "m")
    no_graph = {**ok, "files": {k: v for k, v in files.items() if k != "level-0.5/model.onnx"}}
    with pytest.raises(UserError, match="does not list level-0.5/model.onnx"):
        check_levels(no_graph, "m")


@pytest.mark.parametrize("where", ["boundary", "after"])
def test_an_interrupt_that_passed_through_pyrun_string_still_exits_143(tmp_path, where):
    """CPython flags a KeyboardInterrupt that left code run by PyRun_String (as extensions' pybind11
    exec does) and then makes `python -m` exit by SIGINT (-2), even once the interruption was
    handled; the CLI must still exit with the status it printed the line for."""
    (tmp_path / "kbi_cli.py").write_text(f'''
import ctypes
import typer
from epts_export import cli
from epts_export.boundary import boundary

run = ctypes.pythonapi.PyRun_String
run.restype, run.argtypes = ctypes.py_object, [ctypes.c_char_p, ctypes.c_int, ctypes.py_object, ctypes.py_object]

def pyrun_interrupted():
    # the handler raises inside the code PyRun_String runs
    run(b"import os, signal; os.kill(os.getpid(), signal.SIGTERM)", 257, {{}}, {{}})

app = typer.Typer()

@app.command()
@boundary
def command():
    pyrun_interrupted()

cli.app = app if "{where}" == "boundary" else pyrun_interrupted
cli.main()
''')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    p = subprocess.run([sys.executable, "-m", "kbi_cli"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 143, (p.returncode, p.stdout, p.stderr)
    assert "terminated (SIGTERM)" in p.stdout + p.stderr or where == "after"
