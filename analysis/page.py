"""``report.html``: the report as one self-contained page — figures embedded as PNG data, no
script, style or font fetched from anywhere — that opens from a laptop's disk, an e-mail, or
MLflow's artifact preview of the sweep's parent run.

Tables sort on a click of their header: by the leading number of each cell (``60 [51, 66] (1)``
sorts as 60; "–" and other text after every number), else alphabetically. Verdict cells are
coloured. The page carries the same blocks as ``report.md`` (``analysis.report.report_blocks``).
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from analysis.arms import fmt_number

if TYPE_CHECKING:
    from analysis.report import Block

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f; margin: 2em auto;
       max-width: 1200px; padding: 0 1.5em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; font-size: .92em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: .3em .55em; text-align: left; white-space: nowrap; }
th { background: #f6f6f6; cursor: pointer; user-select: none; position: sticky; top: 0; }
th[aria-sort="ascending"]::after { content: " ▲"; } th[aria-sort="descending"]::after { content: " ▼"; }
tbody tr:nth-child(even) { background: #fbfbfb; }
td.better { background: #e3f4e1; } td.worse { background: #fbe3e1; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 14px; max-width: 60em; }
.missing { color: #a00; }
"""

# Sort a table by the clicked column: numbers (a cell's leading number) before text, toggling order.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener("click", function () {
      var ascending = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var text = row.cells[col].textContent.trim(), number = parseFloat(text);
        return isNaN(number) ? [1, text.toLowerCase()] : [0, number];
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x[0] !== y[0]) { return x[0] - y[0]; }  // text after numbers, either way
        var order = x[1] < y[1] ? -1 : x[1] > y[1] ? 1 : 0;
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def inline(text: str) -> str:
    """Escaped text with the markdown the report uses inline: ``**bold**`` and ```code```."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)


def table(frame) -> str:
    """A frame as a sortable table; verdict cells get the class ``better`` or ``worse``."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for row in frame.itertuples(index=False):
        cells = []
        for value in row:
            text = fmt_number(value)
            cls = f' class="{text}"' if text in ("better", "worse") else ""
            cells.append(f"<td{cls}>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def figure(title: str, path: Path, caption: str) -> str:
    """The PNG at ``path`` embedded as data, with its caption; a note where the file is missing."""
    if not path.is_file():
        return f'<p class="missing">{html.escape(title)}: {html.escape(path.name)} was not written.</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{inline(caption)}</figcaption></figure>")


def page(blocks: Sequence[Block], title: str, folder: Path) -> str:
    """The whole page; figures are read from ``folder`` and embedded."""
    body = []
    for block in blocks:
        if block.kind == "heading":
            body.append(f"<h{block.level}>{inline(block.text)}</h{block.level}>")
        elif block.kind == "text":
            body.append(f"<p>{inline(block.text)}</p>")
        elif block.kind == "table":
            body.append(table(block.table))
        elif block.kind == "figure":
            body.append(figure(block.text, folder / block.file, block.caption))
        elif block.kind == "bullets":
            body.append("<ul>" + "".join(f"<li>{inline(item)}</li>" for item in block.items) + "</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + f"\n<script>{SCRIPT}</script>\n</body></html>\n")
