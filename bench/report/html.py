"""report.html: report.md as one self-contained page, for where relative files do not
resolve. The MLflow UI shows a run's HTML artifact in a frame of its own: report.md's
figures there are link text and its relative links lead nowhere. Here every figure is inline
(a data: URI of its PNG) and every link to a file of the report names that file in the run's
artifacts instead. report.md itself keeps its relative links: on disk, in a repository or a
write-up that copies the folder, they resolve."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import markdown

_IMAGE = re.compile(r'<img alt="([^"]*)" src="([^"]+)"\s*/?>')
_LINK = re.compile(r'<a href="([^":#]+)">([^<]*)</a>')
# a page as wide as the tables need on a 1600 px screen, its prose at a readable measure;
# a table wider than the page scrolls inside its own box instead of being cut off
BODY_PX = 1500
_STYLE = f"""body{{font-family:system-ui,sans-serif;max-width:{BODY_PX}px;margin:2em auto;
padding:0 1em;line-height:1.45;color:#222}}p,ul,ol,h1,h2,h3{{max-width:1100px}}
.table-scroll{{overflow-x:auto;max-width:100%}}
table{{border-collapse:collapse;margin:1em 0;font-size:.9em}}
th,td{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}th{{background:#f3f3f3}}
td:first-child,th:first-child{{text-align:left}}img{{max-width:100%;height:auto}}
code{{background:#f3f3f3;padding:0 .2em}}"""


def render(md_text: str, folder: Path, title: str) -> str:
    """The HTML page of `md_text` (report.md of `folder`), figures inline."""
    body = markdown.markdown(md_text, extensions=["tables"])

    def image(m: re.Match) -> str:
        alt, src = m.group(1), m.group(2)
        path = folder / src
        if not path.is_file():
            return f"<p><em>figure {html.escape(src)} is missing</em></p>"
        data = base64.b64encode(path.read_bytes()).decode()
        return f'<img alt="{alt}" src="data:image/png;base64,{data}"/>'

    def link(m: re.Match) -> str:
        target, text = m.group(1), m.group(2)
        if not (folder / target).exists():
            return m.group(0)
        return f"{text} (<code>{html.escape(target)}</code> in this run's artifacts)"

    body = _LINK.sub(link, _IMAGE.sub(image, body))
    body = body.replace("<table>", '<div class="table-scroll"><table>') \
        .replace("</table>", "</table></div>")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>"
            f"{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n{body}\n"
            f"</body></html>\n")
