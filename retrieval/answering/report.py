"""A self-contained HTML page to eyeball answers: each query beside its top-k gallery images.

Every image is inlined as a base64 JPEG thumbnail, so the page can be mailed or archived alone.
A gallery image seen by many queries is encoded once.
"""
from __future__ import annotations

import base64
import html
import io
import logging
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

THUMBNAIL = 128  # pixels, longer side
MAX_QUERIES = 500  # beyond this the page gets too heavy to open; the first ones are shown
HEATMAP_QUERIES = 100  # heat-maps cost two forward passes per match: the first queries get them

_STYLE = """
body { font-family: sans-serif; margin: 1em; }
table { border-collapse: collapse; }
td { border: 1px solid #ccc; padding: 4px; text-align: center; vertical-align: top; font-size: 12px; }
td.query { background: #eef; }
td.new { background: #fee; width: 128px; }
.name { max-width: 128px; overflow-wrap: anywhere; }
td.right { background: #dfd; outline: 3px solid #2a2; }
td.wrong-query { background: #fdd; }
.scores { font-size: 16px; }
details img { width: 96px; height: 96px; }
"""


def jpeg_thumbnail(path: str | Path, size: int = THUMBNAIL) -> bytes:
    """A JPEG no larger than ``size`` on its longer side (the report's and the server's page's
    thumbnails); ``load_image``'s one-line UserError for a file it cannot use."""
    from PIL import Image

    from ..data import load_image

    image = Image.fromarray(load_image(path, max_side=size))
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


@lru_cache(maxsize=4096)
def thumbnail_uri(path: str, size: int = THUMBNAIL) -> str | None:
    """A data: URI of a JPEG thumbnail, or None if the file cannot be used (moved, corrupt, a
    decompression bomb swapped in since indexing): ``load_image`` decides, as for every image."""
    from ..errors import UserError

    try:
        data = jpeg_thumbnail(path, size)
    except UserError as err:
        log.warning("no thumbnail: %s", err)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


def _image_cell(path: str | None, lines: list[str], css: str = "", extra: str = "") -> str:
    uri = thumbnail_uri(path) if path else None
    picture = f'<img src="{uri}" alt="{html.escape(Path(path).name)}"><br>' if uri else ""
    text = "<br>".join(f'<span class="name">{html.escape(line)}</span>' for line in lines)
    return f'<td class="{css}">{picture}{text}{extra}</td>'


def render(result, explain=None) -> str:
    """The page for a ``retrieval.answering.query.QueryResult``; with ``explain(query, gallery) -> (PNG,
    PNG)`` each match of the first ``HEATMAP_QUERIES`` queries gets a "why?" toggle with both
    heat-maps (``retrieval.answering.heatmap``)."""
    threshold = "none" if result.threshold is None else f"{result.threshold:.4f}"
    answers = result.answers[:MAX_QUERIES]
    rows = []
    truths = result.truths or {}
    for number, answer in enumerate(answers):
        truth = truths.get(answer.image)
        query_lines = [Path(answer.image).name] + ([f"truth: {truth}"] if truth is not None else [])
        found = truth is not None and truth in answer.labels
        query_css = "query" if truth is None or found else "query wrong-query"
        cells = [_image_cell(answer.image, query_lines, query_css)]
        for rank, hit in enumerate(answer.hits, start=1):
            right = " right" if truth is not None and hit.identity == truth else ""
            if hit.similarity is None:
                cells.append(_image_cell(None, [f"{rank}. {hit.identity}",
                                                f"below threshold {threshold}"], "new" + right))
            else:
                why = _why(explain, answer.image, hit.gallery_image) \
                    if explain is not None and number < HEATMAP_QUERIES else ""
                cells.append(_image_cell(hit.gallery_image, [f"{rank}. {hit.identity}",
                                                             f"{hit.similarity:.4f}"], right.strip(),
                                         why))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    shown = f"first {len(answers)} of {len(result.answers)}" if len(answers) < len(result.answers) \
        else f"{len(answers)}"
    header = "<tr><th>query</th>" + "".join(f"<th>{i}</th>" for i in range(1, result.k + 1)) + "</tr>"
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>query report</title>"
            f"<style>{_STYLE}</style></head><body>\n"
            f"<h1>Query report</h1><p>index {html.escape(result.index_dir)}; {shown} queries; "
            f"top {result.k}; new_whale threshold {threshold}</p>\n{_scores(result)}"
            f"<table>{header}\n" + "\n".join(rows) + "\n</table></body></html>\n")


def _why(explain, query: str, gallery: str) -> str:
    """A closed <details> with the pair's two heat-maps (red: found in the other image)."""
    try:
        query_png, gallery_png = explain(query, gallery)
    except Exception as err:  # a moved gallery image: the report is still worth writing
        log.warning("no heat-map for %s vs %s: %s", query, gallery, err)
        return ""
    images = "".join(f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" '
                     f'alt="{alt}" title="{alt}: red = found in the other image">'
                     for png, alt in ((query_png, "query"), (gallery_png, "gallery")))
    return f'<details class="why"><summary>why?</summary>{images}</details>'


def _scores(result) -> str:
    """The evaluation line at the top, where the queries had a truth."""
    e = result.evaluation
    if e is None:
        return ""
    return (f'<p class="scores" id="scores">against {html.escape(str(result.truth_source))}, '
            f"{e.queries} queries: <b>MAP@5 {e.map5:.4f}</b>, top-1 {e.top1:.4f}, top-5 {e.top5:.4f}, "
            f"macro-F1 {e.macro_f1:.4f}. The true identity is outlined in green; a query whose "
            "answers miss it is red.</p>\n")


def write_report(path: str | Path, result, explain=None) -> None:
    from ..files import atomic_write

    if len(result.answers) > MAX_QUERIES:
        log.warning("the report shows the first %d of %d queries", MAX_QUERIES, len(result.answers))
    if explain is not None and len(result.answers) > HEATMAP_QUERIES:
        log.warning("heat-maps for the first %d of %d queries", HEATMAP_QUERIES, len(result.answers))
    page = render(result, explain)
    atomic_write(path, lambda temp: temp.write_text(page, encoding="utf-8"))
