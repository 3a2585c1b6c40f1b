"""report.html: report.md as one self-contained page. Every figure is inline (a data: URI
of its PNG), so the page shows whole wherever it is opened, the MLflow UI included. Links
to the report's files (tables/, runs.csv) stay relative: they open the files beside the
page, on disk (reports/<grid>/) or in a downloaded copy of the run's artifacts, which hold
the same paths. The MLflow UI (3.x) shows an HTML artifact from a blob: URL in a frame
sandboxed to scripts, where a relative link resolves to nothing, and it serves artifacts
only as downloads, which such a frame may not start: there no link can open a file, so the
page says where the file is instead."""

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


def render(md_text: str, folder: Path, title: str, run_id: str | None = None) -> str:
    """The HTML page of `md_text` (report.md of `folder`), figures inline, links relative;
    `run_id`: the run whose artifacts the report is logged to."""
    body = markdown.markdown(md_text, extensions=["tables"])

    def image(m: re.Match) -> str:
        alt, src = m.group(1), m.group(2)
        path = folder / src
        if not path.is_file():
            return f"<p><em>figure {html.escape(src)} is missing</em></p>"
        data = base64.b64encode(path.read_bytes()).decode()
        return f'<img alt="{alt}" src="data:image/png;base64,{data}"/>'

    body = _IMAGE.sub(image, body)
    body = body.replace("<table>", '<div class="table-scroll"><table>') \
        .replace("</table>", "</table></div>")
    if _LINK.search(body):
        body = body.replace("</h1>", "</h1>\n" + _links_note(run_id), 1)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>"
            f"{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n{body}\n"
            f"</body></html>\n")


def _links_note(run_id: str | None) -> str:
    """Where the page's links to files work, and where they do not."""
    copy = (f" or in a copy of the MLflow run's artifacts (<code>mlflow artifacts download "
            f"-r {html.escape(run_id)}</code>)" if run_id else "")
    return (f'<p class="note"><em>Links to files (tables/, runs.csv) open the files beside '
            f"this page: in its folder on disk{copy}. In the MLflow UI's artifact view they "
            f"open nothing (the page is shown there without a folder around it): pick the "
            f"same path in the run's artifact list.</em></p>\n")
