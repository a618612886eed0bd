"""Self-contained HTML: one file with its style inline and its images as data URIs; no script, no
font or stylesheet fetched from anywhere (devices and CI have no network), readable on a phone
(the viewport is set, wide tables scroll inside their box)."""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path

REPORT_FILE = "report.html"
STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 960px;
       padding: 12px; color: #1c1c1c; background: #fff; }
h1 { font-size: 1.35em; margin: 0.4em 0; } h2 { font-size: 1.1em; margin: 1.4em 0 0.4em; border-bottom: 1px solid #ddd; }
.meta { color: #555; font-size: 0.9em; }
.scroll { overflow-x: auto; } table { border-collapse: collapse; font-size: 0.9em; min-width: 60%; }
th, td { border: 1px solid #d8d8d8; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.pass { color: #176c2a; font-weight: 600; } .fail { color: #b00020; font-weight: 700; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def table(headers: list[str], rows: list[list], raw_columns: tuple[int, ...] = ()) -> str:
    """A table; every cell escaped, except the columns in ``raw_columns`` (markup made here)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c if k in raw_columns else esc(c)}</td>" for k, c in enumerate(row)) + "</tr>"
                   for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def verdict(passed: bool | None) -> str:
    if passed is None:
        return "-"
    return '<span class="pass">pass</span>' if passed else '<span class="fail">FAIL</span>'


def image(data: bytes, alt: str, mime: str = "image/png") -> str:
    return f'<img alt="{esc(alt)}" src="data:{mime};base64,{base64.b64encode(data).decode("ascii")}">'


def page(title: str, sections: list[tuple[str, str]], meta: str = "") -> str:
    """The whole document: a title, a line of context, then (heading, body markup) sections."""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    body = "".join(f"<h2>{esc(h)}</h2>\n{b}\n" for h, b in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>\n<h1>{esc(title)}</h1>\n"
            f"<p class=\"meta\">{esc(meta)}{' · ' if meta else ''}written {stamp} by epts-export</p>\n{body}</body></html>\n")


def write_page(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary name (a reader never sees half a report)."""
    from ..fsutil import write_text

    write_text(Path(path), text)
    return Path(path)
