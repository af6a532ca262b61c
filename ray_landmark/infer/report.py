"""The HTML report of the ensemble job and of Revisited Oxford and Paris: one self-contained page with the metrics,
the notes and a gallery of queries.

The page has no external resources (no CSS, JS, fonts or image links): thumbnails are inlined as base64 JPEG data URIs,
downscaled to ~128 px, so the file can be mailed, opened from a bucket or archived with the run and still look the
same. A gallery row shows a query (with its truth and the recognition prediction, where there is recognition), then
its top retrieved images, each marked relevant (green, ✓), not (red, ✗), or ignored by the metric (grey).
"""

from __future__ import annotations

import base64
import functools
import html
import io
import logging
import math
import numbers
import os
import socket
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

from PIL import Image

from ray_landmark.data.storage import Location, list_files, resolve, with_storage_error, write_bytes

log = logging.getLogger(__name__)

THUMB_PX = 128
MISSING = "—"
OK_MARK, BAD_MARK = "✓", "✗"
LEGEND = ("Each row: the query with its truth and the recognition prediction (confidence), then its top retrieved "
          "index images in rank order; green border: relevant, red border: not relevant.")


# ---------------------------------------------------------------- reading images


def read_jpegs(split: Location, ids: Iterable[str], tries: int = 3) -> dict[str, bytes]:
    """image id -> JPEG bytes, for the given ids found in the split's tar shards; ids not found are absent.

    Meant for a gallery (a few hundred images): each tar is streamed once, only wanted members are read, and the
    scan stops as soon as every id has been found.
    """
    wanted = set(ids)
    found: dict[str, bytes] = {}
    if not wanted:
        return found  # no listing, which on a bucket is a request
    for path in list_files(split, ".tar", tries=split.tries(tries)):
        if wanted <= found.keys():
            break
        read = functools.partial(_read_members, split, path, wanted, found)
        with_storage_error(f"reading {split.uri_of(path)}", read, split.tries(tries))
    return found


def _read_members(split: Location, path: str, wanted: set[str], found: dict[str, bytes]) -> None:
    """Add the wanted members of one tar to ``found``; a truncated tar keeps what was read before the cut."""
    try:
        with split.fs.open_input_stream(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                image_id, _, ext = os.path.basename(member.name).partition(".")
                if not member.isreg() or ext != "jpg" or image_id not in wanted:
                    continue
                found[image_id] = tar.extractfile(member).read()
                if wanted <= found.keys():
                    return
    except tarfile.ReadError as err:  # truncated, or not a tar at all: not worth failing a report for
        log.warning("%s: unreadable tar (%s); kept the images read before it", split.uri_of(path), err)


# ---------------------------------------------------------------- gallery entries


@dataclass(frozen=True)
class RetrievedImage:
    """One retrieved image of a query, in rank order; ``jpeg`` None shows a placeholder."""

    image_id: str
    relevant: bool | None  # None: ignored by the metric (Revisited's junk images)
    jpeg: bytes | None = None
    kind: str = ""  # shown after the id: Revisited's easy, hard, junk or negative


@dataclass
class GalleryEntry:
    """One query: its truth, the recognition prediction and the top retrieved images."""

    query_id: str
    usage: str  # a tag after the id: the Kaggle split that scores it ("Public", "Private"), or Revisited's dataset
    true_landmarks: tuple[int, ...] | None  # empty: a non-landmark query; None: no recognition (Revisited)
    predicted_landmark: int | None = None  # None: no recognition prediction
    confidence: float | None = None
    retrieved: list[RetrievedImage] = field(default_factory=list)
    query_jpeg: bytes | None = None

    @property
    def recognition_correct(self) -> bool:
        """As GAP counts it: any prediction on a non-landmark query is wrong, and so is none on a landmark."""
        if self.predicted_landmark is None:
            return not self.true_landmarks
        return self.predicted_landmark in self.true_landmarks


# ---------------------------------------------------------------- rendering

_CSS = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 20px; color: #222; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta { color: #666; font-size: 12px; margin: 0; }
table.metrics { border-collapse: collapse; font-variant-numeric: tabular-nums; }
table.metrics th, table.metrics td { border: 1px solid #ddd; padding: 5px 12px; }
table.metrics th { background: #f3f4f6; text-align: center; }
table.metrics td { text-align: right; }
table.metrics td:first-child, table.metrics th:first-child { text-align: left; }
table.metrics tbody tr:nth-child(even) { background: #fafafa; }
ul.notes { margin: 0; padding-left: 20px; }
.legend { color: #555; font-size: 12px; margin: 0 0 6px; }
.row { display: flex; gap: 14px; align-items: flex-start; padding: 10px 0; border-bottom: 1px solid #e5e5e5; }
.query { flex: 0 0 210px; font-size: 12px; }
.results { display: flex; flex-wrap: wrap; gap: 6px; }
.thumb { display: block; box-sizing: border-box; object-fit: contain; background: #f0f0f0; border: 3px solid #ccc;
         border-radius: 4px; }
.query .thumb { width: 134px; height: 102px; border-color: #3b6fd8; }
figure { position: relative; margin: 0; width: 100px; text-align: center; }
figure .thumb { width: 100px; height: 78px; }
figure.ok .thumb { border-color: #1e8e3e; }
figure.bad .thumb { border-color: #d93025; }
figure.ignored .thumb { border-color: #999; }
.placeholder { display: flex; flex-direction: column; align-items: center; justify-content: center; background: #bbb;
               color: #333; font: 9px monospace; word-break: break-all; }
.id { font: 10px monospace; color: #555; }
.mark { display: inline-block; width: 18px; height: 18px; line-height: 18px; border-radius: 50%; color: #fff;
        font-weight: bold; font-size: 12px; text-align: center; }
.mark.ok { background: #1e8e3e; }
.mark.bad { background: #d93025; }
figure .mark { position: absolute; top: 5px; right: 5px; }
.rank { position: absolute; top: 5px; left: 5px; padding: 0 4px; border-radius: 3px; background: rgba(0, 0, 0, .6);
        color: #fff; font-size: 11px; }
.tag { display: inline-block; padding: 0 5px; border-radius: 3px; background: #e8eaf6; color: #334; font-size: 11px; }
.pred { margin: 4px 0 2px; padding: 2px 4px; border-radius: 3px; white-space: nowrap; }
.pred.ok { background: #e6f4ea; }
.pred.bad { background: #fce8e6; }
"""


def thumbnail_uri(jpeg: bytes, size: int = THUMB_PX) -> str | None:
    """A ``data:`` URI of the image shrunk to ``size`` px on its long side; None when the bytes do not decode."""
    try:
        with Image.open(io.BytesIO(jpeg)) as img:
            img = img.convert("RGB")
            img.thumbnail((size, size))
    except OSError as err:  # PIL raises OSError subclasses for corrupt or unknown images
        log.warning("thumbnail: undecodable image (%s)", err)
        return None
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _format_value(value: object) -> str:
    """Numbers to 4 decimals (integers as they are), missing values as a dash."""
    if value is None or (isinstance(value, numbers.Real) and math.isnan(value)):
        return MISSING
    if isinstance(value, numbers.Integral):
        return str(value)
    if isinstance(value, numbers.Real):
        return f"{float(value):.4f}"
    return _e(value)


def _metrics_table(rows: list[dict]) -> str:
    if not rows:
        return f"<p>{MISSING}</p>"
    columns: list[str] = []
    for row in rows:  # the union of the rows' keys, in first-seen order (the "what" column first)
        columns += [k for k in row if k not in columns]
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_format_value(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows
    )
    return f'<table class="metrics"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _thumb(image_id: str, jpeg: bytes | None, size: int) -> str:
    uri = thumbnail_uri(jpeg, size) if jpeg is not None else None
    if uri is None:
        return f'<div class="thumb placeholder">no image<br>{_e(image_id)}</div>'
    return f'<img class="thumb" src="{uri}" alt="{_e(image_id)}">'


def _mark(correct: bool) -> str:
    return f'<span class="mark ok">{OK_MARK}</span>' if correct else f'<span class="mark bad">{BAD_MARK}</span>'


def _recognition(entry: GalleryEntry) -> str:
    truth = " ".join(str(t) for t in entry.true_landmarks) or "non-landmark"
    if entry.predicted_landmark is None:
        pred = "no prediction"
    else:
        pred = f"predicted <b>{_e(entry.predicted_landmark)}</b> ({_format_value(entry.confidence)})"
    correct = entry.recognition_correct
    return (f"<div>truth <b>{_e(truth)}</b></div>"
            f'<div class="pred {"ok" if correct else "bad"}">{_mark(correct)} {pred}</div>')


def _query_card(entry: GalleryEntry, size: int) -> str:
    hits = sum(bool(r.relevant) for r in entry.retrieved)
    return (
        f'<div class="query">{_thumb(entry.query_id, entry.query_jpeg, size)}'
        f'<div><span class="id">{_e(entry.query_id)}</span> <span class="tag">{_e(entry.usage)}</span></div>'
        + (_recognition(entry) if entry.true_landmarks is not None else "")
        + f"<div>retrieval: {hits} of {len(entry.retrieved)} relevant</div></div>"
    )


def _figure(rank: int, image: RetrievedImage, size: int) -> str:
    verdict = "ignored" if image.relevant is None else "ok" if image.relevant else "bad"
    caption = image.image_id + (f" ({image.kind})" if image.kind else "")
    return (
        f'<figure class="{verdict}">{_thumb(image.image_id, image.jpeg, size)}'
        f'<span class="rank">{rank}</span>{"" if image.relevant is None else _mark(image.relevant)}'
        f'<figcaption class="id">{_e(caption)}</figcaption></figure>'
    )


def _gallery_row(entry: GalleryEntry, size: int) -> str:
    figures = "".join(_figure(rank, image, size) for rank, image in enumerate(entry.retrieved, start=1))
    return f'<div class="row">{_query_card(entry, size)}<div class="results">{figures}</div></div>'


def render_report(
    *,
    title: str,
    metrics: list[dict],
    notes: list[str],
    gallery: list[GalleryEntry],
    info: Mapping[str, object] | None = None,
    thumb_px: int = THUMB_PX,
    gallery_title: str | None = None,
    legend: str = LEGEND,
) -> str:
    """The report page as an HTML string; ``info`` adds "key: value" lines (run folder, models...) under the title;
    ``gallery_title`` defaults to the ensemble's (sampled test queries)."""
    generated = f"generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC on {socket.gethostname()}"
    meta = [generated] + [f"{k}: {v}" for k, v in (info or {}).items()]
    notes_items = "".join(f"<li>{_e(n)}</li>" for n in notes) or f"<li>{MISSING}</li>"
    body = [
        f"<h1>{_e(title)}</h1>",
        *(f'<p class="meta">{_e(m)}</p>' for m in meta),
        f"<h2>Metrics</h2>{_metrics_table(metrics)}",
        f'<h2>Notes</h2><ul class="notes">{notes_items}</ul>',
        f"<h2>{_e(gallery_title or f'Gallery: {len(gallery)} sampled test queries')}</h2>",
        f'<p class="legend">{_e(legend)}</p>',
        *(_gallery_row(entry, thumb_px) for entry in gallery),
    ]
    head = f'<meta charset="utf-8"><title>{_e(title)}</title><style>{_CSS}</style>'
    return f'<!DOCTYPE html>\n<html lang="en"><head>{head}</head><body>\n' + "\n".join(body) + "\n</body></html>\n"


def write_report(path_or_location: str | Location, **report) -> Location:
    """Write ``render_report(**report)`` to a file or bucket key and return where it went."""
    loc = resolve(path_or_location) if isinstance(path_or_location, str) else path_or_location
    page = render_report(**report)
    write_bytes(loc, page.encode("utf-8"))
    log.info("report: %s (%.1f MB)", loc.uri, len(page) / 1e6)
    return loc
