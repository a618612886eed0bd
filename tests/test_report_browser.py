"""A bundle's report.html as a person sees it: rendered by a real headless browser (Debian's
chromium; .ci/run installs it), at a desktop width and a phone's. The screenshot is not blank,
every image (the perplexity curve) loaded, and the page fits a phone's width (wide tables scroll
inside their box). Skips, saying why, where no chromium is installed."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from typer.testing import CliRunner

from epts_export.cli import app

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium here: apt-get install chromium (.ci/run does)")
PROBE = """<script>
addEventListener("load", () => {
  const imgs = [...document.images];
  document.body.dataset.images = imgs.map(i => i.complete && i.naturalWidth > 100 ? "ok" : "broken").join(",");
  document.body.dataset.fits = String(document.documentElement.scrollWidth <= innerWidth);
});
</script>"""


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", "--virtual-time-budget=3000", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report(tiny_artifacts, eval_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("browser") / "dist"
    r = CliRunner().invoke(app, ["build", str(tiny_artifacts["llama"]), "--target", "jetson", "--levels", "0.3,0.5,2:4",
                                 "--out", str(out), "--eval-data", str(eval_file), "-q"])
    assert r.exit_code == 0, r.output
    return out / "jetson-orin" / "report.html"


def test_the_report_renders_with_its_curve_on_a_desktop_and_a_phone(report, tmp_path):
    shot = tmp_path / "shot.png"
    res = chromium("--window-size=1100,1800", f"--screenshot={shot}", report.as_uri())
    assert shot.is_file(), res.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    ink = (pixels < 0.9).any(axis=2)  # not white
    assert ink.mean() > 0.02 and pixels.std() > 0.05, "the screenshot is blank"
    assert (np.abs(np.diff(pixels, axis=0)) > 0.1).any(axis=2).sum() > 5000  # text and lines, not a flat fill
    probed = tmp_path / "probed.html"  # the report plus a script that reports what the browser loaded
    probed.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    for width in (1100, 390):  # a desktop, a phone
        dom = chromium(f"--window-size={width},900", "--dump-dom", probed.as_uri()).stdout
        assert 'data-images="ok"' in dom, (width, dom[-500:])
        assert 'data-fits="true"' in dom, width
