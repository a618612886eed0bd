"""Every command through Typer's CliRunner: what users see and the exit codes."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from epts_export.cli import app
from epts_export.core.levels import parse_levels

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def cli_artifact(tiny_dirs, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "art"
    r = run("optimize", tiny_dirs["llama"], "--out", out, "--levels", "0.3,0.6,2:4", "--calib", text_file,
            "--nsamples", 4, "--seqlen", 32, "--epochs", 1, "--rank", 2, "--quiet")
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.output.replace("\n", "")
    return out


def test_optimize_prints_summary(cli_artifact):
    r = run("info", cli_artifact)
    assert r.exit_code == 0, r.output
    assert "any sparsity in [0, 0.6] and 2:4" in r.output
    assert "wrote" not in r.output  # info writes nothing


def test_eval_json(cli_artifact, eval_file, tmp_path):
    out = tmp_path / "ppl.json"
    r = run("eval", cli_artifact, "--data", eval_file, "--seqlen", 32, "--levels", "0.5,2:4", "--json", out, "--quiet")
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert [x["level"] for x in report["results"]] == ["dense", "0.5", "2:4"]
    assert set(report) == {"results", "data", "seqlen"} and report["seqlen"] == 32
    assert set(report["results"][0]) == {"level", "sparsity", "ppl"}


def test_eval_plain_model(tiny_dirs, eval_file):
    r = run("eval", tiny_dirs["opt"], "--data", eval_file, "--seqlen", 32, "--quiet")
    assert r.exit_code == 0, r.output
    assert "dense" in r.output


def test_materialize(cli_artifact, tmp_path):
    r = run("materialize", cli_artifact, "--level", "2:4", "--out", tmp_path / "m")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m" / "model.safetensors").exists()


@pytest.mark.parametrize("args, message", [
    (["optimize", "no/such/dir/", "--out", "{tmp}/o"], "model path not found"),
    (["optimize", "{llama}", "--out", "{tmp}/o", "--levels", "0.95"], "out of range"),
    (["optimize", "{llama}", "--out", "{tmp}/o", "--levels", "abc"], "malformed level"),
    (["optimize", "{llama}", "--out", "{tmp}/o", "--levels", "3:2"], "malformed level"),
    (["optimize", "{llama}", "--out", "{tmp}/o", "--calib", "{calib}", "--nsamples", "1000", "--seqlen", "64"], "too short"),
    (["optimize", "{llama}", "--out", "{tmp}/o", "--calib", "{tmp}/missing.txt", "--seqlen", "64"], "calibration source not found"),
    (["optimize", "{llama}", "--out", "{tmp}/o", "--preset", "nope"], "unknown preset"),
    (["optimize", "{llama}", "--out", "{tmp}/o", "--preset", "text"], "preset text calibrates on your own text: pass --calib"),
    (["optimize", "{llama}", "--out", "{tmp}/o", "--calib", "{calib}"], "--seqlen 512 is longer than the model's context of 256"),
    (["optimize", "{llama}", "--out", "{tmp}/o", "--method", "obs"], "unknown method"),
    (["optimize", "{llama}", "--out", "{tmp}/o", "--group-width", "1e-9"], "--group-width must be in [0.01, 1]"),
    (["optimize", "{llama}", "--out", "{tmp}/o", "--precision", "fp8"], "--precision must be one of"),
    (["optimize", "{llama}", "--out", "{tmp}/o", "--low-top", "0"], "--low-top must be in (0, 1]"),
    (["optimize", "{llama}", "--out", "{tmp}/o", "--low-top", "nan"], "--low-top must be in (0, 1]"),
    (["optimize", "{llama}", "--out", "{tmp}/o", "--low-span", "1.5"], "--low-span must be in [0, 1]"),
    (["eval", "{art}", "--data", "{calib}", "--levels", "0.9"], "above the trained range"),
    (["eval", "{art}", "--data", "{calib}", "--levels", "4:8"], "not trained"),
    (["materialize", "{tmp}/nothing", "--level", "0.5", "--out", "{tmp}/m"], "artifact not found"),
    (["materialize", "{llama}", "--level", "0.5", "--out", "{tmp}/m"], "not an epts-export artifact"),
])
def test_bad_input_is_one_line_exit_1(args, message, tiny_dirs, text_file, cli_artifact, tmp_path):
    fill = {"tmp": tmp_path, "llama": tiny_dirs["llama"], "calib": text_file, "art": cli_artifact}
    r = run(*[a.format(**fill) for a in args])
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], r.output
    assert r.output.count("error:") == 1
    assert "Traceback" not in r.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


def test_optimize_levers_reach_the_artifact(tiny_dirs, text_file, tmp_path):
    out = tmp_path / "levers"
    r = run("optimize", tiny_dirs["llama"], "--out", out, "--levels", "0.3,0.7,2:4", "--calib", text_file,
            "--nsamples", 4, "--seqlen", 32, "--rank", 2, "--group-width", 0.1, "--init", "lsq", "--precision", "bf16",
            "--steps", 2, "--low-top", 0.35, "--low-span", 0.2, "--quiet")
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    s = manifest["settings"]
    assert (s["group_width"], s["init"], s["precision"], s["steps"]) == (0.1, "lsq", "bf16", 2)
    assert (s["low_top"], s["low_span"]) == (0.35, 0.2)
    r = run("info", out)
    assert r.exit_code == 0 and "any sparsity in [0, 0.7] and 2:4" in r.output, r.output
    from epts_export.artifact.folder import Artifact
    from epts_export.core.config import TrainConfig
    assert [g.hi for g in Artifact.open(out).groups] == [0.35, 0.45, 0.55, 0.65, 0.7, 0.5]  # 5 rungs + the 2:4 group
    cfg = TrainConfig.from_dict(s)  # what a reader of the artifact gets back
    assert (cfg.low_top, cfg.low_span, cfg.groups(parse_levels("0.7"))[0].hi) == (0.35, 0.2, 0.35)


def test_existing_output_needs_overwrite(cli_artifact, tiny_dirs):
    r = run("optimize", tiny_dirs["llama"], "--out", cli_artifact, "--quiet")
    assert r.exit_code == 1 and "already exists" in r.output


def test_debug_variable_shows_the_traceback(tmp_path, monkeypatch):
    from epts_export.errors import UserError

    monkeypatch.setenv("EPTS_DEBUG", "1")
    r = run("materialize", tmp_path / "nothing", "--level", "0.5", "--out", tmp_path / "m")
    assert isinstance(r.exception, UserError)


def test_version_lists_libraries():
    r = run("version")
    assert r.exit_code == 0 and '"epts_export"' in r.output and '"torch"' in r.output


def test_help_lists_every_command():
    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert names == {"optimize", "eval", "materialize", "info", "export", "validate", "targets", "build", "verify",
                     "run", "version"}
    r = run("--help")
    assert r.exit_code == 0
    for cmd in names:
        assert cmd in r.output, cmd
        sub = run(cmd, "--help")
        assert sub.exit_code == 0 and "Usage" in sub.output, cmd


def test_targets_lists_every_profile():
    from epts_export.deploy.targets import all_targets

    r = run("targets")
    assert r.exit_code == 0, r.output
    assert all(name in r.output for name in all_targets())  # the name column does not wrap
    assert "2:4*" in r.output and "8.7" in r.output  # sparse levels are marked; compute capabilities shown


def test_optimize_and_build_say_what_domain_text_would_buy_when_calibrated_without_text(tiny_dirs, text_file, tmp_path):
    """No --calib (the model's own text): the end of optimize and build says so and what text from
    the user's domain bought in BENCHMARKS.md; with text calibration nothing is said."""
    from epts_export.pruning.presets import DOMAIN_TEXT_GAIN

    base = ["--nsamples", "2", "--seqlen", "16", "--levels", "0.5", "-q"]
    r = runner.invoke(app, ["optimize", str(tiny_dirs["llama"]), "--out", str(tmp_path / "self"), "--calib", "self", *base])
    out = " ".join(r.output.split())
    assert r.exit_code == 0 and "calibrated on text the model sampled itself" in out, r.output
    assert f"{DOMAIN_TEXT_GAIN['0.7'][1]:.2f}x at 0.7" in out and "--calib FILE" in out
    r = runner.invoke(app, ["build", str(tmp_path / "self"), "--target", "rtx", "--out", str(tmp_path / "d"), "--levels", "0.5", "-q"])
    assert r.exit_code == 0 and "calibrated on text the model sampled itself" in " ".join(r.output.split()), r.output
    assert "sampled itself" in (tmp_path / "d" / "rtx-ada" / "report.html").read_text()
    r = runner.invoke(app, ["optimize", str(tiny_dirs["llama"]), "--out", str(tmp_path / "text"), "--calib", str(text_file), *base])
    assert r.exit_code == 0 and "calibrated on" not in r.output, r.output
