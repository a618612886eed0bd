"""report/: the perplexity curve (`eval --plot`, `--compare`), and the self-contained HTML reports
of an export (`export`, `validate`) and a bundle (`build`). What they say is checked here; how a
browser shows them in tests/test_report_browser.py."""

from __future__ import annotations

import base64
import json
import re
import shutil
import xml.etree.ElementTree as ET

import pytest
from typer.testing import CliRunner

from conftest import spec_for
from epts_export.artifact.folder import Artifact
from epts_export.cli import app
from epts_export.core.levels import parse_levels
from epts_export.errors import UserError
from epts_export.report.curve import curve_levels, evaluate_curve
from epts_export.report.pages import level_bytes

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def self_contained(text: str) -> None:
    """One file: no script, nothing fetched (every src and href inline), a viewport for phones."""
    assert "<script" not in text.lower()
    assert not re.findall(r'(?:src|href)="(?!data:|#)', text), re.findall(r'(?:src|href)="[^"]*"', text)[:3]
    assert "url(" not in text and "@import" not in text
    assert '<meta name="viewport"' in text


def images(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


@pytest.fixture(scope="module")
def baseline(tiny_dirs, text_file, tmp_path_factory):
    """A one-level SparseGPT artifact of the same tiny LLaMA as tiny_artifacts["llama"]."""
    from epts_export.pruning.optimize import optimize

    return optimize(spec_for(tiny_dirs["llama"], tmp_path_factory.mktemp("sgpt") / "sgpt", text_file,
                             method="sparsegpt", levels="0.5"))


def test_the_curve_samples_the_whole_range_and_keeps_the_trained_levels(tiny_artifacts, baseline):
    art = Artifact.open(tiny_artifacts["llama"])
    names = [lv.name for lv in curve_levels(art, 0.1)]
    assert names == ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "2:4"]
    assert [lv.name for lv in curve_levels(art, 0.25)] == ["0.25", "0.3", "0.5", "0.7", "2:4"]  # trained ones kept
    assert [lv.name for lv in curve_levels(Artifact.open(baseline), 0.1)] == ["0.5"]
    for bad in (0, 1e-9, 0.6, float("nan")):  # 1e-9 would be 7e8 levels: refused, not a hang
        with pytest.raises(UserError, match="--step must be between 0.01 and 0.5"):
            curve_levels(art, bad)


def test_compared_artifacts_are_evaluated_on_the_same_windows(tiny_artifacts, baseline, eval_file):
    art, base = Artifact.open(tiny_artifacts["llama"]), Artifact.open(baseline)
    curve = evaluate_curve(art, str(eval_file), 32, compare=[base], step=0.2, max_windows=3)
    epts, sgpt = curve["series"]
    assert [p["level"] for p in epts["points"]] == ["0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "2:4"]
    assert [p["trained"] for p in epts["points"]] == [False, True, False, True, False, True, True]
    assert [(p["level"], p["nm"]) for p in sgpt["points"]] == [("0.5", False)] and curve["dense"] > 1
    # the same numbers as eval itself computes on those windows
    from epts_export.artifact.evaluate import evaluate

    alone = evaluate(base, str(eval_file), 32, parse_levels("0.5"), max_windows=3, dense=False)
    assert sgpt["points"][0]["ppl"] == pytest.approx(alone["results"][0]["ppl"])
    with pytest.raises(UserError, match="made from another model"):
        evaluate_curve(art, str(eval_file), 32, compare=[Artifact.open(tiny_artifacts["opt"])], max_windows=2)


@pytest.mark.parametrize("suffix", [".png", ".svg", ".html"])
def test_eval_plot_writes_the_curve_in_the_format_its_suffix_names(tiny_artifacts, baseline, eval_file, tmp_path, suffix):
    out = tmp_path / f"curve{suffix}"
    r = cli("eval", tiny_artifacts["llama"], "--data", eval_file, "--seqlen", 32, "--max-windows", 2, "--plot", out,
            "--compare", baseline, "--step", 0.2, "--json", tmp_path / "c.json", "-q")
    assert r.exit_code == 0, r.output
    assert f"wrote{out}" in "".join(r.output.split()) and "sparsegpt (sgpt)" in r.output
    data = out.read_bytes()
    if suffix == ".png":
        assert data.startswith(PNG) and len(data) > 10_000
    elif suffix == ".svg":
        assert ET.fromstring(data).tag.endswith("svg") and b"perplexity" in data
    else:
        text = data.decode()
        self_contained(text)
        assert images(text)[0].startswith(PNG) and "sparsegpt (sgpt)" in text and "trained" in text
    curve = json.loads((tmp_path / "c.json").read_text())
    assert curve["format"] == "epts-curve" and len(curve["series"]) == 2
    assert not list(tmp_path.glob("*.tmp*"))


def test_eval_plot_bad_inputs_are_one_line_before_any_work(tiny_artifacts, tiny_dirs, eval_file, tmp_path):
    base = ["eval", tiny_artifacts["llama"], "--data", eval_file, "--seqlen", 32, "--max-windows", 2]
    (tmp_path / "a-file").write_text("x")
    for args, msg in (([*base, "--plot", tmp_path / "c.jpg"], "give a .png, .svg or .html file"),
                      ([*base, "--plot", tmp_path], "give a .png, .svg or .html file"),
                      ([*base, "--plot", tmp_path / "a-file" / "c.png"], "--plot"),
                      (["eval", tiny_dirs["llama"], "--data", eval_file, "--plot", tmp_path / "c.png"],
                       "is not an artifact folder"),
                      ([*base, "--compare", tmp_path / "missing"], "--compare"),
                      ([*base, "--compare", tiny_artifacts["opt"]], "made from another model"),
                      ([*base, "--plot", tmp_path / "c.png", "--step", "1e-9"], "--step must be between 0.01 and 0.5")):
        r = cli(*args)
        assert r.exit_code == 1 and "Traceback" not in r.output, (args, r.output)
        assert msg in " ".join(r.output.split()), (msg, r.output)
    assert not list(tmp_path.glob("c.*"))


def test_an_export_carries_its_report_and_validate_adds_the_parity(tiny_artifacts, tmp_path):
    out = tmp_path / "exp"
    assert cli("export", tiny_artifacts["llama"], "--out", out, "--levels", "0.5,2:4", "-q").exit_code == 0
    text = (out / "report.html").read_text()
    self_contained(text)
    assert "Not validated yet" in text and "2:4" in text
    assert "report.html" not in json.loads((out / "manifest.json").read_text())["files"]  # validate rewrites it
    r = cli("validate", out, "-q")
    assert r.exit_code == 0 and f"wrote{out / 'report.html'}" in "".join(r.output.split())
    text = (out / "report.html").read_text()
    assert "Not validated yet" not in text and text.count('class="pass">pass') >= 3 and "tokens matched" in text


def test_a_bundle_carries_a_listed_report_with_levels_bytes_parity_curve_and_stages(tiny_artifacts, eval_file, tmp_path):
    out = tmp_path / "dist"
    r = cli("build", tiny_artifacts["llama"], "--target", "rtx-ada", "--levels", "0.5,2:4", "--out", out,
            "--eval-data", eval_file)
    assert r.exit_code == 0, r.output
    bundle = out / "rtx-ada"
    assert f"report:{bundle / 'report.html'}" in "".join(r.output.split())  # (the terminal wraps long paths)
    m = json.loads((bundle / "manifest.json").read_text())
    assert "report.html" in m["files"] and m["file_sizes"]["report.html"] == (bundle / "report.html").stat().st_size
    assert [s["name"] for s in m["stages"]] == ["optimize", "export", "parity", "perplexity"]
    assert m["stages"][0]["reused"] is True  # an artifact was given
    text = (bundle / "report.html").read_text()
    self_contained(text)
    (curve,) = images(text)
    assert curve.startswith(PNG)
    for word in ("rtx-ada", "0.5", "2:4", "shared by every level", "Perplexity against sparsity", "Time per stage",
                 "Not built here"):
        assert word in text, word
    shared, own = level_bytes(m)
    assert own == {"0.5": 0, "2:4": 0} and shared == sum(m["file_sizes"].values())  # elastic: all shared
    assert cli("verify", bundle).exit_code == 0
    tampered = tmp_path / "t"
    shutil.copytree(bundle, tampered)
    (tampered / "report.html").write_text(text.replace("rtx-ada", "hopper"))
    assert cli("verify", tampered).exit_code == 3
    # the second build reuses every stage and says so
    r = cli("build", tiny_artifacts["llama"], "--target", "hopper", "--levels", "0.5,2:4", "--out", out,
            "--eval-data", eval_file)
    stages = json.loads((out / "hopper" / "manifest.json").read_text())["stages"]
    assert r.exit_code == 0 and all(s["reused"] for s in stages), stages


def test_baked_bundle_bytes_are_per_level(tiny_artifacts, tmp_path):
    out = tmp_path / "dist"
    assert cli("build", tiny_artifacts["llama"], "--target", "rtx-ada", "--levels", "0.5,2:4", "--out", out,
               "--layout", "baked", "-q").exit_code == 0
    m = json.loads((out / "rtx-ada" / "manifest.json").read_text())
    shared, own = level_bytes(m)
    assert own["0.5"] > 100_000 and own["2:4"] > 100_000 and shared < own["0.5"]
    text = (out / "rtx-ada" / "report.html").read_text()
    assert "Perplexity against sparsity" not in text  # no --eval-data, no curve
