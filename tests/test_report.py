"""The ensemble report: JPEGs read from the tar shards by id, and one self-contained, escaped HTML page."""

from __future__ import annotations

import base64
import io
import re
import tarfile
from html.parser import HTMLParser

import pandas as pd
import pytest
from PIL import Image

from ray_landmark.data import gldv2
from ray_landmark.data.storage import list_files, resolve
from ray_landmark.data.synthetic import SyntheticSpec, write_synthetic_gldv2
from ray_landmark.infer import report
from ray_landmark.infer.report import GalleryEntry, RetrievedImage, read_jpegs, render_report, write_report

JPEG_MAGIC = b"\xff\xd8\xff"
UNKNOWN_ID = "0123456789abcdef"
SPEC = SyntheticSpec(
    num_landmarks=6, max_images_per_landmark=4, min_images_per_landmark=2, test_landmark_images=6,
    test_non_landmark_images=3, index_distractor_landmarks=2, index_distractor_images=2,
    train_shards=1, index_shards=3, test_shards=2,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("gldv2")
    write_synthetic_gldv2(SPEC, resolve(str(root)), progress=None)
    return root


def _ids(root, csv: str) -> list[str]:
    return pd.read_csv(root / csv)["id"].tolist()


def _members_by_shard(root, split: str) -> list[dict[str, bytes]]:
    """Every shard's id -> bytes, read the plain way, to compare against."""
    shards = []
    for path in list_files(resolve(str(root / split)), ".tar"):
        with tarfile.open(path) as tar:
            shards.append({m.name.rsplit("/", 1)[1][:-4]: tar.extractfile(m).read() for m in tar if m.isreg()})
    return shards


@pytest.mark.parametrize("split, csv", [("test", gldv2.TEST_CSV), ("index", gldv2.INDEX_CSV)])
def test_read_jpegs_returns_the_wanted_images_and_skips_unknown_ids(dataset, split, csv):
    ids = _ids(dataset, csv)
    wanted = ids[:2] + ids[-2:]
    assert UNKNOWN_ID not in ids
    expected = {k: v for shard in _members_by_shard(dataset, split) for k, v in shard.items()}

    got = read_jpegs(resolve(str(dataset / split)), wanted + [UNKNOWN_ID])

    assert set(got) == set(wanted)
    for image_id, data in got.items():
        assert data.startswith(JPEG_MAGIC)
        assert data == expected[image_id]
        assert Image.open(io.BytesIO(data)).size == (SPEC.width, SPEC.height)


def test_read_jpegs_stops_once_all_ids_are_found(dataset, monkeypatch):
    shards = _members_by_shard(dataset, "index")
    assert len(shards) == 3 and all(shards)
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(report.tarfile, "open", lambda *a, **kw: opened.append(1) or real_open(*a, **kw))

    got = read_jpegs(resolve(str(dataset / "index")), list(shards[0])[:2])

    assert len(got) == 2 and len(opened) == 1
    assert read_jpegs(resolve(str(dataset / "index")), []) == {}
    assert len(opened) == 1


@pytest.mark.parametrize("cut_inside", ["member", "header"])
def test_read_jpegs_keeps_what_precedes_a_truncation(dataset, tmp_path, caplog, cut_inside):
    (path,) = list_files(resolve(str(dataset / "train")), ".tar")
    with tarfile.open(path) as tar:
        members = [m for m in tar if m.isreg()]
    middle = members[len(members) // 2]
    cut = middle.offset_data + middle.size // 2 if cut_inside == "member" else middle.offset + 100
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / gldv2.shard_name(0)).write_bytes(open(path, "rb").read()[:cut])
    first, last = (m.name.rsplit("/", 1)[1][:-4] for m in (members[0], members[-1]))
    split = resolve(str(tmp_path / "train"))

    assert list(read_jpegs(split, [first, last])) == [first]
    if cut_inside == "member":  # (tarfile takes a cut inside a header for the end of the archive)
        assert "unreadable tar" in caplog.text
    caplog.clear()
    assert list(read_jpegs(split, [first])) == [first]
    assert caplog.text == ""  # it stopped at the wanted member, before the cut


def test_read_jpegs_skips_a_shard_that_is_not_a_tar(dataset, tmp_path, caplog):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / gldv2.shard_name(0)).write_bytes(b"<html>403 Forbidden</html>")
    (path, _) = list_files(resolve(str(dataset / "test")), ".tar")
    (tmp_path / "test" / gldv2.shard_name(1)).write_bytes(open(path, "rb").read())
    wanted = list(_members_by_shard(dataset, "test")[0])[:3]

    assert set(read_jpegs(resolve(str(tmp_path / "test")), wanted)) == set(wanted)
    assert "unreadable tar" in caplog.text


# ---------------------------------------------------------------- the page


class _Page(HTMLParser):
    """The parts of the page the tests check: classes seen, resource attributes and image sources."""

    def __init__(self, text: str):
        super().__init__()
        self.classes: list[str] = []
        self.resources: list[str] = []
        self.tags: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name == "class":
                self.classes += value.split()
            if name in ("src", "href"):
                self.resources.append(value)


def _jpeg(size: tuple[int, int]) -> bytes:
    """A photo-sized JPEG that compresses like one (noise, not a flat colour)."""
    out = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(out, format="JPEG")
    return out.getvalue()


def _gallery(images: dict[str, bytes], index_ids: list[str]) -> list[GalleryEntry]:
    return [
        GalleryEntry("aaaaaaaaaaaaaaaa", "Public", (17,), 17, 0.93,
                     [RetrievedImage(i, n % 2 == 0, images.get(i)) for n, i in enumerate(index_ids[:5])],
                     images.get("aaaaaaaaaaaaaaaa")),
        GalleryEntry("bbbbbbbbbbbbbbbb", "Private", (), 5, 0.21,
                     [RetrievedImage(i, False, images.get(i)) for i in index_ids[5:8]], None),
        GalleryEntry("cccccccccccccccc", "Private", (), None, None, [], None),
    ]


METRICS = [
    {"what": "DOLG tiny (model)", "GAP": 0.612345, "mAP@100": 0.40011},
    {"what": "ensemble + post-processing", "GAP": 0.7, "mAP@100": None, "queries": 47},
    {"what": "Hybrid-Swin tiny (model)", "GAP": float("nan")},
]


def test_write_report_is_one_self_contained_page(dataset, tmp_path):
    index_ids = _ids(dataset, gldv2.INDEX_CSV)[:8]
    images = read_jpegs(resolve(str(dataset / "index")), index_ids)
    images["aaaaaaaaaaaaaaaa"] = _jpeg((1024, 768))
    gallery = _gallery(images, index_ids)

    loc = write_report(str(tmp_path / "out" / "report.html"), title="Ensemble <script>alert(1)</script>",
                       metrics=METRICS, notes=["Private scored with <b>set B</b>"], gallery=gallery)
    text = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    page = _Page(text)

    assert loc.path == str(tmp_path / "out" / "report.html")
    # metrics: 4 decimals, integers as they are, missing as a dash
    for shown in ("0.6123", "0.4001", "0.7000", "<td>47</td>", "DOLG tiny (model)", "ensemble + post-processing"):
        assert shown in text
    assert text.count("<td>—</td>") == 1 + 1 + 3
    # escaping: no markup from the title or notes gets through
    assert "<script" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<b>set B</b>" not in text and "&lt;b&gt;set B&lt;/b&gt;" in text
    assert "script" not in page.tags and "link" not in page.tags
    # one row per entry; marks: recognition (right, wrong, right) + retrieval (3 relevant, 2 + 3 not)
    assert page.classes.count("row") == 3
    assert text.count(report.OK_MARK) == 2 + 3
    assert text.count(report.BAD_MARK) == 1 + 2 + 3
    # thumbnails inline: one data URI per image that has bytes, nothing fetched from elsewhere
    assert len(page.resources) == 1 + 8
    assert all(r.startswith("data:image/jpeg;base64,") for r in page.resources)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text)
    # the two queries without bytes are placeholders naming their id
    assert page.classes.count("placeholder") == 2
    assert re.search(r'class="thumb placeholder">[^<]*<br>bbbbbbbbbbbbbbbb<', text)


def test_thumbnails_are_downscaled(tmp_path):
    big = _jpeg((1024, 768))
    gallery = [GalleryEntry("aaaaaaaaaaaaaaaa", "Public", (1,), 1, 0.5, [RetrievedImage("b" * 16, True, big)], big)]

    page = _Page(render_report(title="t", metrics=METRICS, notes=[], gallery=gallery))

    for uri in page.resources:
        thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        assert thumb.size == (128, 96)
    assert sum(len(r) for r in page.resources) < len(big)


@pytest.mark.parametrize(
    "truth, predicted, correct",
    [
        ((17,), 17, True), ((17, 18), 18, True), ((17,), 3, False), ((17,), None, False),
        ((), 3, False), ((), None, True),  # non-landmark queries
    ],
)
def test_recognition_is_right_as_gap_counts_it(truth, predicted, correct):
    assert GalleryEntry("a" * 16, "Public", truth, predicted, 0.5).recognition_correct is correct


def test_undecodable_bytes_give_a_placeholder():
    gallery = [GalleryEntry("aaaaaaaaaaaaaaaa", "Public", (1,), 2, 0.5, [], b"not a jpeg")]

    page = _Page(render_report(title="t", metrics=[], notes=[], gallery=gallery))

    assert page.resources == [] and page.classes.count("placeholder") == 1
    assert "bad" in page.classes  # predicted 2, truth 1
