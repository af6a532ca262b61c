"""Revisited Oxford and Paris (ROxf, RPar) and the R1M distractors as the revisitop project distributes them, and a
synthetic set in the same layout.

    <data>/<dataset>/gnd_<dataset>.pkl   {"imlist": [name], "qimlist": [name], "gnd": [per query: {"bbx": [x1, y1,
                                         x2, y2], "easy": [i], "hard": [i], "junk": [i]}]}, i a position in imlist
    <data>/<dataset>/jpg/<name>.jpg      every image of imlist and qimlist
    <distractors>/                       R1M: JPEGs in a folder (any depth), or tar shards (.tar, .tar.gz) of JPEGs

``<data>`` and ``<distractors>`` are folders or bucket URIs. The ground truth is a pickle, and unpickling runs whatever
code a pickle names: it is read with an unpickler that builds plain lists, dicts, tuples, strings and numbers only and
refuses any class or function (the official files hold nothing else).

Images are embedded in parts, the unit of work that is written once and skipped by a rerun: the queries, the database
in slices of ``part_size`` names, and each distractor tar (or slice of a distractor folder).
"""

from __future__ import annotations

import io
import math
import os
import pickle
import tarfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from ray_landmark.data.config import StorageConfig, SyntheticSpec
from ray_landmark.data.storage import Location, StorageError, list_files, read_bytes, resolve, write_bytes
from ray_landmark.errors import JobError

DATASETS = ("roxford5k", "rparis6k")
GROUND_TRUTH_KEYS = ("imlist", "qimlist", "gnd")
QUERY_KEYS = ("bbx", "easy", "hard", "junk")
JPEG_SUFFIX = ".jpg"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class RevisitedDataError(JobError, ValueError):
    """Ground truth, images or distractors that cannot be used; the message names the file and what to do."""


# ---------------------------------------------------------------- the ground truth


class _PlainUnpickler(pickle.Unpickler):
    """Builds what a pickle holds without naming a class or function: lists, dicts, tuples, sets, strings, bytes,
    numbers, booleans and None. Any global (a class, a function, a numpy array) is refused, so no code of the
    pickle's choosing runs."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it names {module}.{name}, and only plain lists, dicts, strings and numbers "
                                     f"are accepted")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds persistent ids, and only plain lists, dicts, strings and numbers "
                                     "are accepted")


def load_pickle_safely(data: bytes, uri: str):
    """The plain content of a pickle; a refused or broken one is an error naming ``uri``."""
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, ValueError, EOFError, TypeError, IndexError, KeyError) as err:
        raise RevisitedDataError(f"{uri}: refused to load this pickle: {err}") from None


@dataclass(frozen=True)
class GroundTruth:
    """A dataset's ground truth: database and query names, and per query its box and easy/hard/junk positions."""

    dataset: str
    uri: str  # the pickle's
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict]  # per query: bbx (4 floats), easy, hard, junk (lists of positions in imlist)


def parse_ground_truth(content, dataset: str, uri: str) -> GroundTruth:
    """Check the structure of a loaded ground truth; the first problem is an error naming the file and the key."""
    def fail(what: str):
        raise RevisitedDataError(f"{uri}: {what}; expected the revisitop ground truth of {dataset} "
                                 f"(keys {', '.join(GROUND_TRUTH_KEYS)})")

    if not isinstance(content, dict):
        fail(f"holds a {type(content).__name__}, not a dict")
    missing = [k for k in GROUND_TRUTH_KEYS if k not in content]
    if missing:
        fail(f"missing key {', '.join(repr(k) for k in missing)}")
    imlist, qimlist, gnd = (content[k] for k in GROUND_TRUTH_KEYS)
    for key, names in (("imlist", imlist), ("qimlist", qimlist)):
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
            fail(f"'{key}' is not a list of image names")
    if not isinstance(gnd, (list, tuple)) or len(gnd) != len(qimlist):
        fail(f"'gnd' has {len(gnd) if isinstance(gnd, (list, tuple)) else 'no list of'} entries for "
             f"{len(qimlist)} queries")
    queries = []
    for q, entry in enumerate(gnd):
        if not isinstance(entry, dict) or any(k not in entry for k in QUERY_KEYS):
            fail(f"gnd[{q}] lacks one of the keys {', '.join(QUERY_KEYS)}")
        box = entry["bbx"]
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(v) for v in box)):
            fail(f"gnd[{q}]['bbx'] is not 4 numbers (x1, y1, x2, y2)")
        lists = {}
        for key in ("easy", "hard", "junk"):
            positions = list(entry[key]) if isinstance(entry[key], (list, tuple)) else [entry[key]]
            if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(imlist) for i in positions):
                fail(f"gnd[{q}]['{key}'] holds something other than positions 0..{len(imlist) - 1} of imlist")
            lists[key] = positions
        queries.append({"bbx": [float(v) for v in box], **lists})
    return GroundTruth(dataset, uri, list(imlist), list(qimlist), queries)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def dataset_location(data: str, dataset: str, storage: StorageConfig | None = None) -> Location:
    if dataset not in DATASETS:
        raise RevisitedDataError(f"--dataset {dataset}: one of {', '.join(DATASETS)}")
    return resolve(data, storage).child(dataset)


def read_ground_truth(data: str, dataset: str, storage: StorageConfig | None = None) -> GroundTruth:
    """``<data>/<dataset>/gnd_<dataset>.pkl``, loaded safely and checked."""
    loc = dataset_location(data, dataset, storage).child(f"gnd_{dataset}.pkl")
    try:
        raw = read_bytes(loc)
    except StorageError as err:
        raise RevisitedDataError(f"{err}; download gnd_{dataset}.pkl from the revisitop project "
                                 f"(docs/reproduction.md)") from None
    return parse_ground_truth(load_pickle_safely(raw, loc.uri), dataset, loc.uri)


def image_folder(data: str, dataset: str, storage: StorageConfig | None = None) -> Location:
    return dataset_location(data, dataset, storage).child("jpg")


def missing_images(truth: GroundTruth, folder: Location) -> list[str]:
    """Names of imlist and qimlist without a ``<name>.jpg`` in ``folder`` (one listing), sorted."""
    try:
        paths = list_files(folder, JPEG_SUFFIX)
    except StorageError:
        paths = []  # an empty or absent folder: every image is missing, which the caller reports
    present = {folder.uri_of(p)[len(folder.uri) + 1:-len(JPEG_SUFFIX)] for p in paths}
    return sorted(set(truth.imlist + truth.qimlist) - present)


# ---------------------------------------------------------------- parts: the unit of embedding


@dataclass(frozen=True)
class Part:
    """Images embedded and written together: named files of a folder (``<folder>/<name>.jpg``, queries with their
    boxes), or every JPEG member of one tar shard."""

    name: str  # its embeddings file is <name>.parquet
    folder: str | None = None
    files: tuple[str, ...] = ()
    boxes: tuple[tuple[float, float, float, float] | None, ...] = ()  # per file; None: the whole image
    tar: str | None = None


def dataset_parts(truth: GroundTruth, folder: Location, part_size: int,
                  skip: set[str] = frozenset()) -> tuple[list[Part], list[Part]]:
    """The queries (cropped to their boxes) and the database in slices of ``part_size``, kept apart so that a name
    in both lists (a crop and its full image) stays two images. ``skip``: names left out (missing images the user
    allowed)."""
    queries = [(n, tuple(g["bbx"])) for n, g in zip(truth.qimlist, truth.gnd) if n not in skip]
    database = [(n, None) for n in truth.imlist if n not in skip]
    return _folder_parts("queries", folder, queries, part_size), _folder_parts("database", folder, database, part_size)


def _folder_parts(prefix: str, folder: Location, named_boxes: list[tuple[str, tuple | None]],
                  part_size: int) -> list[Part]:
    """Parts of at most ``part_size`` (name, box) pairs of one folder, named <prefix>-00000, -00001, ..."""
    return [Part(f"{prefix}-{start // part_size:05d}", folder.uri,
                 tuple(n for n, _ in named_boxes[start:start + part_size]),
                 tuple(b for _, b in named_boxes[start:start + part_size]))
            for start in range(0, len(named_boxes), part_size)]


def distractor_parts(uri: str, storage: StorageConfig | None, part_size: int) -> list[Part]:
    """One part per tar shard under ``uri``, or when it holds none, its JPEGs (any depth) in slices of
    ``part_size``; ids are the names without ``.jpg`` (a tar member's file name, a file's path under ``uri``)."""
    loc = resolve(uri, storage)
    tars = [p for suffix in TAR_SUFFIXES for p in _listing(loc, suffix)]
    if tars:
        return [Part(_tar_part_name(os.path.basename(p)), tar=loc.uri_of(p)) for p in sorted(tars)]
    files = [loc.uri_of(p)[len(loc.uri) + 1:-len(JPEG_SUFFIX)] for p in _listing(loc, JPEG_SUFFIX)]
    if not files:
        raise RevisitedDataError(f"--distractors {loc.uri}: no tar shards and no .jpg files found there")
    return _folder_parts("folder", loc, [(f, None) for f in files], part_size)


def _listing(loc: Location, suffix: str) -> list[str]:
    try:
        return list_files(loc, suffix)
    except StorageError as err:
        if "no *" in str(err):  # the folder exists but holds no such file
            return []
        raise RevisitedDataError(f"--distractors: {err}") from None


def _tar_part_name(file_name: str) -> str:
    for suffix in TAR_SUFFIXES:
        if file_name.endswith(suffix):
            return "tar-" + file_name[:-len(suffix)]
    return "tar-" + file_name


def read_part(part: Part, storage: StorageConfig | None, tries: int = 3) -> Iterator[tuple[str, bytes, tuple | None]]:
    """(id, JPEG bytes, box) of each image of a part; a file or tar that cannot be read fails with its URI."""
    if part.tar is not None:
        yield from _tar_members(resolve(part.tar, storage))
        return
    folder = resolve(part.folder, storage)
    for name, box in zip(part.files, part.boxes):
        yield name, read_bytes(folder.child(name + JPEG_SUFFIX), tries), box


def _tar_members(loc: Location) -> Iterator[tuple[str, bytes, None]]:
    """The .jpg members of a tar (gzip or not), streamed; a tar that ends early is an error naming it (its part
    would otherwise be written as complete without the rest)."""
    def truncated(detail) -> RevisitedDataError:
        return RevisitedDataError(f"{loc.uri}: unreadable or truncated tar ({detail}); download it again")

    with loc.fs.open_input_stream(loc.path) as f:
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if member.isreg() and member.name.lower().endswith(JPEG_SUFFIX):
                        data = tar.extractfile(member).read()
                        if len(data) < member.size:  # a stream that ends early gives what is there
                            raise truncated(f"{member.name} is cut off")
                        yield os.path.basename(member.name)[:-len(JPEG_SUFFIX)], data, None
        except (tarfile.ReadError, EOFError) as err:
            raise truncated(err) from None


# ---------------------------------------------------------------- pixels


def crop_box(size: tuple[int, int], box) -> tuple[tuple[int, int, int, int] | None, bool]:
    """The pixel box (left, top, right, bottom) of ``box`` (x1, y1, x2, y2; rounded as PIL's crop rounds) inside an
    image of ``size`` (width, height), and whether it had to be clipped. None when nothing of it is inside."""
    width, height = size
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    clipped = (max(0, min(x1, width)), max(0, min(y1, height)), max(0, min(x2, width)), max(0, min(y2, height)))
    inside = clipped[2] > clipped[0] and clipped[3] > clipped[1]
    return (clipped if inside else None), clipped != (x1, y1, x2, y2)


def resize_long_side(image: Image.Image, long_side: int, square: bool) -> np.ndarray:
    """uint8 H×W×3: the image with its longer side at ``long_side`` and its aspect kept (bilinear, antialiased), or
    with ``square`` squashed to long_side², as the models were trained."""
    width, height = image.size
    if square:
        target = (long_side, long_side)
    else:
        ratio = long_side / max(width, height)
        target = (max(1, round(width * ratio)), max(1, round(height * ratio)))
    return np.asarray(image.resize(target, Image.BILINEAR) if target != image.size else image)


# ---------------------------------------------------------------- the synthetic set


@dataclass(frozen=True)
class SyntheticRevisitedSpec:
    """A small ROxf-like set drawn from the landmarks of a synthetic GLDv2 (``gldv2``): new views of its buildings,
    so a model trained on that GLDv2 recognises them."""

    gldv2: SyntheticSpec
    landmarks: int = 6  # landmarks with queries (of the GLDv2's clean view)
    queries_per_landmark: int = 2
    easy: int = 4  # database images per landmark
    hard: int = 3
    junk: int = 2
    negatives: int = 12  # database images of no query's landmark (clutter and other landmarks)
    distractors: int = 30  # R1M-like images
    distractor_shards: int = 2
    seed: int = 7


def write_synthetic_revisited(spec: SyntheticRevisitedSpec, data: Location, distractors: Location,
                              name: str = "roxford5k", distractor_format: str = "tar") -> dict:
    """Write ``<data>/<name>/gnd_<name>.pkl`` with ``jpg/``, and the distractors under ``distractors`` (tar shards
    or a folder of JPEGs). The last query landmark has no hard image, so the Hard protocol skips its queries."""
    from ray_landmark.data import synthetic  # the GLDv2 renderer: buildings, views and clutter

    g = spec.gldv2
    width, height = g.width, g.height
    # Queried landmarks: those of the GLDv2's clean view, which a model trained on it has seen; then the others.
    order = _landmarks_clean_first(g)
    buildings = {lm: synthetic.render_building(np.random.default_rng([g.seed, 2, lm]), width, height)
                 for lm in order[:spec.landmarks + spec.negatives]}
    images: dict[str, Image.Image] = {}
    imlist: list[str] = []
    counter = iter(range(10**9))

    def rng() -> np.random.Generator:
        return np.random.default_rng([spec.seed, next(counter)])

    def add(name_: str, image: Image.Image) -> int:
        images[name_] = image
        imlist.append(name_)
        return len(imlist) - 1

    qimlist, gnd = [], []
    for number, lm in enumerate(order[:spec.landmarks]):
        building = buildings[lm]
        hard = 0 if number == spec.landmarks - 1 else spec.hard
        easy_ids = [add(f"lm{lm:02d}_easy_{k}", synthetic.render_view(building, rng(), width, height, False))
                    for k in range(spec.easy)]
        hard_ids = [add(f"lm{lm:02d}_hard_{k}", synthetic.render_view(building, rng(), width, height, True))
                    for k in range(hard)]
        junk_ids = [add(f"lm{lm:02d}_junk_{k}", _junk_view(building, rng(), width, height))
                    for k in range(spec.junk)]
        for k in range(spec.queries_per_landmark):
            query, box = _query_view(building, rng(), width, height)
            images[f"lm{lm:02d}_query_{k}"] = query
            qimlist.append(f"lm{lm:02d}_query_{k}")
            gnd.append({"bbx": box, "easy": easy_ids, "hard": hard_ids, "junk": junk_ids})
    others = order[spec.landmarks:]
    for k in range(spec.negatives):
        image = (synthetic.render_view(buildings[others[k]], rng(), width, height, False) if k < len(others)
                 else synthetic.render_clutter(rng(), width, height))
        add(f"negative_{k:03d}", image)

    folder = data.child(name)
    for image_name, image in images.items():
        write_bytes(folder.child("jpg", image_name + JPEG_SUFFIX), synthetic.jpeg_bytes(image, g.jpeg_quality))
    truth = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    write_bytes(folder.child(f"gnd_{name}.pkl"), pickle.dumps(truth, protocol=4))

    members = [(f"d{k:05d}.jpg", synthetic.jpeg_bytes(synthetic.render_clutter(rng(), width, height), g.jpeg_quality))
               for k in range(spec.distractors)]
    if distractor_format == "tar":
        from ray_landmark.data.gldv2 import pack_tar

        for shard in range(spec.distractor_shards):
            write_bytes(distractors.child(f"distractors_{shard:03d}.tar"),
                        pack_tar([(f"jpg/{n}", b) for n, b in members[shard::spec.distractor_shards]]))
    else:
        for member_name, jpeg in members:
            write_bytes(distractors.child(member_name), jpeg)
    return {"data": data.uri, "dataset": name, "queries": len(qimlist), "database": len(imlist),
            "distractors": len(members), "distractors_at": distractors.uri}


def _landmarks_clean_first(gldv2: SyntheticSpec) -> list[int]:
    """The GLDv2's landmark numbers, those of its clean train view first (the plan alone, no image is rendered)."""
    from ray_landmark.data import synthetic

    plan = synthetic._Plan(gldv2)
    train = [image for image in plan.images if image.split == "train"]
    public_id = {image.filed_under: int(lid) for image, lid in zip(train, plan.train["landmark_id"])}
    clean = set(plan.train_clean["landmark_id"].astype(int))
    return sorted(range(gldv2.num_landmarks), key=lambda lm: (public_id.get(lm) not in clean, lm))


def _query_view(building, rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, list[float]]:
    """A view of the building beside clutter, on a canvas 1.5 times as wide; the box is where the view is."""
    from ray_landmark.data import synthetic

    canvas = synthetic.render_clutter(rng, width * 3 // 2, height)
    left = int(rng.integers(0, width // 2 + 1))
    canvas.paste(synthetic.render_view(building, rng, width, height, False), (left, 0))
    return canvas, [float(left), 0.0, float(left + width), float(height)]


def _junk_view(building, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """The building small in a corner of clutter, mostly hidden: what the revisited annotation calls junk."""
    from ray_landmark.data import synthetic

    scene = synthetic.render_clutter(rng, width, height)
    small = synthetic.render_view(building, rng, width, height, False).resize((width // 3, height // 3))
    scene.paste(small, (0, 0))
    ImageDraw.Draw(scene).rectangle((width // 8, 0, width // 3, height // 4), fill=(30, 30, 30))
    return scene
