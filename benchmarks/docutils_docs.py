"""A second benchmark text, of another kind: technical writing, Docutils' own documentation.

The source distribution ``docutils-0.23.tar.gz`` on PyPI (public domain / BSD) ships the project's
documentation as reStructuredText under ``docutils-0.23/docs/``. We download that sdist once
(``pip download --no-deps --no-binary :all:``), check its sha256, extract only the ``.rst`` files of
the documentation into the cache, and write two plain-text files:

* ``calib.txt`` -- the user guide, the how-tos, the developer notes and the API notes
  (``docs/{user,howto,dev,api}``: 793k characters), the calibration domain;
* ``eval.txt``  -- the reStructuredText and doctree reference manual (``docs/ref``: 474k
  characters), held out: no evaluation file is in the calibration set.

The text is the markup as written (technical prose with reST directives, literal blocks and
tables, what a documentation assistant sees), with ``\\r\\n`` turned into ``\\n``, trailing spaces
removed and runs of blank lines cut to one. Files are joined in sorted path order, separated by
one blank line, so the two files have the same bytes on every run.

Run ``python -m benchmarks.docutils_docs`` to build the files and print their paths, sizes and hashes.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path, PurePosixPath

from epts_export.fsutil import sha256_file

from .pkgdata import cache_root, fetch_package, member_path, write_if_changed

PACKAGE = "docutils"
VERSION = "0.23"
SDIST = f"{PACKAGE}-{VERSION}.tar.gz"
# sha256 of the sdist as published on PyPI; a different file is refused.
SDIST_SHA256 = "746f5060322511280a1e50eb76846ed6bf2342984b2ac04dc42caa1a8d78799e"
DOCS_PREFIX = f"{PACKAGE}-{VERSION}/docs/"
CALIB_DIRS: tuple[str, ...] = ("user", "howto", "dev", "api")
EVAL_DIRS: tuple[str, ...] = ("ref",)
assert not set(CALIB_DIRS) & set(EVAL_DIRS), "calibration and evaluation folders must be disjoint"


def _extract_docs(sdist: Path, out: Path) -> int:
    count = 0
    with tarfile.open(sdist, "r:gz") as tf:
        for info in tf.getmembers():
            member_path(info.name, SDIST)
            if not info.isfile() or not info.name.startswith(DOCS_PREFIX) or not info.name.endswith(".rst"):
                continue
            dest = out.joinpath(*PurePosixPath(info.name[len(DOCS_PREFIX):]).parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tf.extractfile(info).read())
            count += 1
    return count


def fetch_docs(cache: Path | None = None) -> Path:
    """Folder ``<cache>/data/docutils-0.23/`` holding the ``docs/`` tree's ``.rst`` files; downloads
    it once."""
    return fetch_package(cache, PACKAGE, VERSION, SDIST, SDIST_SHA256, _extract_docs, sdist=True)


def doc_text(rst: str) -> str:
    """One file's text: ``\\n`` line ends, no trailing spaces, at most one blank line in a row, one
    final newline (or empty)."""
    lines = [ln.rstrip() for ln in rst.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
    return text + "\n" if text else ""


def _write_split(docs: Path, dirs: tuple[str, ...], dest: Path) -> Path:
    files = sorted(p for d in dirs for p in (docs / d).rglob("*.rst"))
    if not files:
        raise RuntimeError(f"no .rst files under {', '.join(dirs)} in {docs}")
    return write_if_changed(dest, "\n".join(doc_text(p.read_text(encoding="utf-8")) for p in files).encode("utf-8"))


def benchmark_texts(cache: Path | None = None, out: Path | None = None) -> dict[str, Path]:
    """Write ``calib.txt`` (CALIB_DIRS) and ``eval.txt`` (EVAL_DIRS); return their paths.
    Default ``out`` is ``<cache>/data/docutils-docs/``."""
    docs = fetch_docs(cache)
    out = Path(out) if out is not None else cache_root(cache) / "data" / "docutils-docs"
    out.mkdir(parents=True, exist_ok=True)
    return {"calib": _write_split(docs, CALIB_DIRS, out / "calib.txt"),
            "eval": _write_split(docs, EVAL_DIRS, out / "eval.txt")}


def main() -> None:
    for split, path in benchmark_texts().items():
        text = path.read_text(encoding="utf-8")
        print(f"{split}\t{path}\tchars={len(text)}\tsha256={sha256_file(path)}")


if __name__ == "__main__":
    main()
