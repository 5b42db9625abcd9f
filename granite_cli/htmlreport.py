"""The HTML report: one page to look through many captions — a card per picture (the picture,
its answer or its error in red, schema data as a table), a summary, and a filter box.

The file carries its own styles and script (no network needed, nothing fetched) and shows the
pictures by relative links, as the markdown report does: a report of thousands of pictures stays
small and quick to rebuild every few seconds during a run, and pictures open at full size; the
price is that the report keeps its place beside the pictures. What a browser cannot show from a
link — PDF and TIFF pages, pictures from URLs (never fetched by the page), stdin or memory,
formats browsers do not read — is shown by a small rendering made while the run had the
picture, written once into a folder of ours beside the report (`report.html.files/`), and
linked to the document itself where there is one (a PDF at its page).

Every string that comes from a file name, a prompt, an answer or an error is escaped: a file named
`<img src=x onerror=alert(1)>.png` shows as that text.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import TextIO
from urllib.parse import quote

from PIL import Image

from .records import Record
from .writer_base import StreamWriter, shown

#: What browsers show inline from a link; anything else (PDF, TIFF) gets a small rendering.
INLINE = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".gif", ".webp", ".bmp", ".ico", ".avif"}
GENERATOR = '<meta name="generator" content="granite-vision">'
#: Longest side of a page's small rendering, in pixels (two card widths, for sharp screens).
THUMBNAIL_PX = 360
#: What the report's folder of small renderings holds: our own file names, nothing else.
THUMBNAIL_NAME = re.compile(r"[0-9a-f]{20}\.jpg")

_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:0;background:#f4f4f5;color:#18181b}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:12px 20px;z-index:1}
h1{font-size:20px;margin:0 0 4px}.summary{color:#52525b;margin:0 0 8px}
#filter{font:inherit;padding:6px 10px;width:min(480px,70vw);border:1px solid #bbb;border-radius:6px}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:14px;padding:16px 20px}
.card{background:#fff;border:1px solid #ddd;border-radius:10px;overflow:hidden;display:flex;flex-direction:column}
.card.error{border:2px solid #dc2626;background:#fef2f2}
.picture{display:flex;align-items:center;justify-content:center;height:180px;background:#e4e4e7;color:#3f3f46}
.picture img{max-width:100%;max-height:180px;object-fit:contain}
.body{padding:10px 12px}.name{font-weight:600;word-break:break-all;margin:0 0 6px;font-size:14px}
.answer{white-space:pre-wrap;margin:0}
.prompt{font-weight:600;margin:0 0 4px;white-space:pre-wrap}
.failure{color:#b91c1c;font-weight:600;margin:0;white-space:pre-wrap}
table{border-collapse:collapse;margin-top:8px;width:100%;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top;word-break:break-word}
.hidden{display:none}
"""

_SCRIPT = """
const cards = [...document.querySelectorAll('.card')];
const filter = document.getElementById('filter'), only = document.getElementById('errors-only');
document.getElementById('total').textContent = cards.length;
document.getElementById('failed').textContent = cards.filter(c => c.classList.contains('error')).length;
function apply() {
  const words = filter.value.toLowerCase().split(/\\s+/).filter(Boolean);
  let shown = 0;
  for (const card of cards) {
    const hit = words.every(w => card.dataset.text.includes(w)) && (!only.checked || card.classList.contains('error'));
    card.classList.toggle('hidden', !hit);
    shown += hit;
  }
  document.getElementById('shown').textContent = shown === cards.length ? '' : `${shown} shown`;
}
const asked = new URLSearchParams(location.hash.slice(1));
filter.value = asked.get('q') || '';
only.checked = asked.get('errors') === '1';
filter.addEventListener('input', apply);
only.addEventListener('change', apply);
apply();
"""


def files_folder(report: Path) -> Path:
    """The folder of ours beside a report that holds its pages' small renderings."""
    return report.with_name(report.name + ".files")


def needs_thumbnail(source: str, page: int | None, local: bool) -> bool:
    """Whether a browser cannot show this picture from a link to it (see the module's docstring)."""
    return page is not None or not local or Path(source).suffix.lower() not in INLINE


def thumbnail_name(source: str, page: int | None) -> str:
    return hashlib.sha1(f"{source}\0{page}".encode("utf-8", "surrogateescape")).hexdigest()[:20] + ".jpg"


def thumbnail(image: Image.Image) -> bytes:
    """A small JPEG of a picture, for its card."""
    small = image.copy()
    small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=80)  # the picture as the model saw it: RGB
    return buffer.getvalue()


class HtmlWriter(StreamWriter):
    """A web page with one card per record (see the module's docstring)."""

    name = "html"
    help = "a web page to look through: a card per picture, errors in red, a filter box"
    suffixes = (".html", ".htm")
    report = True

    def __init__(self, stream: TextIO, path: Path | None = None, columns: Sequence[str] = ()):
        super().__init__(stream, path)
        self.files = files_folder(path.resolve()) if path is not None else None
        self.started = False
        self.last: tuple | None = None
        """The picture of the card before (a picture's several answers are grouped)."""

    def write(self, record: Record) -> None:
        if not self.started:
            self._head(record.model)
        self.stream.write(self._card(record))
        self.stream.flush()

    def close(self) -> None:
        if not self.started:
            self._head(None)
        self.stream.write(f"</main>\n<script>{_SCRIPT}</script>\n</body>\n</html>\n")
        self.stream.flush()

    @staticmethod
    def recognizes(text: str) -> bool:
        """Our start and our end (a page cut short is not a whole report)."""
        ours = text.startswith("<!doctype html>") and GENERATOR in text[:2000]  # as we write it
        return ours and text.rstrip().endswith("</html>")

    @staticmethod
    def holds_records(text: str) -> bool:
        return '<article class="card' in text

    def _head(self, model: str | None) -> None:
        self.started = True
        made = time.strftime("%Y-%m-%d %H:%M")
        about = f"model <code>{escape(model)}</code> · " if model else ""
        self.stream.write(
            f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n{GENERATOR}\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>granite-vision report</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n<header>\n"
            "<h1>granite-vision report</h1>\n"
            f'<p class="summary">{about}<span id="total">0</span> pictures, <span id="failed">0</span> failed'
            f" · made {escape(made)}</p>\n"
            + (
                '<p class="summary">Pictures show only in a report written to a file (-o report.html):'
                " they are linked from its folder.</p>\n"
                if self.files is None
                else ""
            )
            + '<input id="filter" type="search" placeholder="Filter by name, answer or error" autofocus>\n'
            '<label><input id="errors-only" type="checkbox"> errors only</label> <span id="shown"></span>\n'
            "</header>\n<main>\n"
        )

    def _card(self, record: Record) -> str:
        name = shown(record.source if record.page is None else f"{record.source} (page {record.page})")
        error = shown(record.error or "")
        text = " ".join(filter(None, [name, record.answer, error])).lower()
        if record.ok:
            body = f'<p class="answer">{escape(record.answer or "")}</p>'
            if isinstance(record.data, dict):
                rows = "".join(
                    f"<tr><th>{escape(str(key))}</th><td>{escape(_value(value))}</td></tr>"
                    for key, value in record.data.items()
                )
                body += f"<table>{rows}</table>"
        else:
            body = f'<p class="failure">Error: {escape(error)}</p>'
        if record.prompt_template is not None:  # one of several prompts: said above its answer
            body = f'<p class="prompt">{escape(shown(record.prompt))}</p>' + body
        # A picture's next answers (several prompts) follow its card, without the picture again.
        more = (record.source, record.page) == self.last
        self.last = (record.source, record.page)
        picture = '<div class="picture"></div>' if more else self._picture(record)
        return (
            f'<article class="card{" more" if more else ""}{"" if record.ok else " error"}" data-text="{escape(text)}">'
            f"{picture}"
            f'<div class="body"><p class="name">{escape(name)}</p>{body}</div></article>\n'
        )

    def _picture(self, record: Record) -> str:
        link = self.link(record.source, record.page)
        local = link is not None and not record.source.startswith(("http://", "https://"))
        picture = link if local and not needs_thumbnail(record.source, record.page, local) else None
        ours = False
        if picture is None and self.files is not None:  # a small rendering of ours, if the run made one
            small = self.files / thumbnail_name(record.source, record.page)
            if small.exists():
                picture, ours = quote(os.fsencode(f"{self.files.name}/{small.name}")), True
        # A failed card shows a page the run did read (ours), never a file it may not have read.
        shown = picture is not None and (record.ok or ours)
        image = f'<img src="{escape(picture)}" loading="lazy" alt="">' if shown else ""
        label = image or (f"open page {record.page}" if record.page else "open the file" if link else "no picture")
        if link is None:
            return f'<div class="picture">{label}</div>'
        return f'<a class="picture" href="{escape(link)}">{label}</a>'


def _value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
