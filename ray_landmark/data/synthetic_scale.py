"""GLDv2 at a fraction ``f`` of its counts, for rehearsing every stage at scale: the official layout, CSV columns and
tar counts, a long-tailed class-size law, the GLDv2c / GLDv2x / full views, the test set's non-landmark share and
index images without a landmark row. The pixels are tiny JPEGs (32-64 px) from a pool rendered once and reused, so the
counts, not the pixels, cost the time.

The counts at ``f = 1`` (``GLDV2``), each scaled by ``f`` and rounded half up:

* train: 4,132,914 images of 203,094 landmarks in 500 tars; GLDv2c: 1,580,470 images of 81,313 landmarks; GLDv2x,
  every train image of those landmarks: about 3.2 M (docs/method.md §1), taken as 3,200,000;
* index: 761,757 images in 100 tars; test: 117,577 images in 20 tars (docs/method.md §10.1), at least one tar each;
* 1,972 test images show a landmark and 115,605 none (98.3 %): github.com/cvdfoundation/google-landmark/issues/22
  counts 1,973 rows of ``recognition_solution_v2.1.csv`` with landmarks and 115,605 without, one row more than the
  117,577 (a header counted as a landmark row, we take it). The GLDv2 paper (Weyand et al., CVPR 2020) speaks of "a
  large fraction of out-of-domain test photos" in its abstract.

Class sizes. The paper's abstract names "an extremely long-tailed class distribution"; we found no fitted law for it
to take. The law here is ours, so that most landmarks have a few images and a few have thousands: log-normal sizes with
sigma ``SIZE_SIGMA``, taken at the quantiles (i + 0.5) / n (a smooth sample, the same for every seed) and scaled so
that the sizes sum to the image count exactly, each class keeping a minimum (``long_tail_sizes``). GLDv2c's landmarks
are the GLDv2x ones, larger on average (39 images against 8 for the others, from the counts above), so the two groups
are drawn apart: the 81,313 f GLDv2c landmarks share 3,200,000 f train images (at least 2 each), the other landmarks
the rest (at least 1 each). A GLDv2c landmark keeps a share of its train images in ``train_clean.csv`` proportional to
its size (at least 2; 1,580,470 f in all); the images it drops show clutter (label noise, as GLDv2's cleaning drops).
At f = 1 the largest class has 6,388 images, the median 6, and 46 % of the classes have at most 5 (64 % at most 10);
at any f the median and these shares stay about the same, and the largest class grows with f.

Choices without a source, ours: the index holds ``RELEVANT_PER_TEST_LANDMARK`` images of each landmark the test set
shows (its retrieval ground truth), ``INDEX_UNLISTED_SHARE`` of images listed in ``index.csv`` with no row in
``index_image_to_landmark.csv`` (retrieval still ranks them), and the rest in index-only landmarks with the same law
at train's mean size; test images are Public, Private or Ignored as in the small synthetic set (``USAGE_SHARES``).

Rerunning: ``MARKER`` (``synthetic_scale.json`` in the root) is written before the first file with the fraction and
seed, and rewritten with ``"complete": true`` after the last. A rerun of the same fraction and seed reuses a complete
set and resumes an unfinished one (every file is written whole, and a tar already there with its planned size is
kept); another fraction or seed, or a folder that holds other files, is refused.
"""

from __future__ import annotations

import functools
import glob
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from ray_landmark.data import gldv2
from ray_landmark.data.storage import Location, exists, read_bytes, write_bytes
from ray_landmark.data.synthetic import (
    CATEGORY_PREFIX, URL_PREFIX, USAGE_SHARES, csv_files, jpeg_bytes, render_building, render_clutter, render_view,
    unique_image_ids, write_shard,
)
from ray_landmark.errors import JobError
from ray_landmark.progress import Printer, ProgressLine, say

GLDV2 = {
    "train_images": 4_132_914, "train_classes": 203_094, "clean_images": 1_580_470, "clean_classes": 81_313,
    "gldv2x_images": 3_200_000, "index_images": 761_757, "test_images": 117_577, "test_landmark_images": 1_972,
    "train_tars": 500, "index_tars": 100, "test_tars": 20,
}
# The smallest fraction at which every count is at least one without raising it: 1,972 landmark test images, the
# smallest count, round to one from f = 0.5 / 1972 = 0.0002536 up.
MIN_FRACTION = math.ceil(0.5 / GLDV2["test_landmark_images"] * 1e6) / 1e6
SIZE_SIGMA = 1.4
RELEVANT_PER_TEST_LANDMARK = 3
INDEX_UNLISTED_SHARE = 0.1
TRAIN_MEAN_SIZE = GLDV2["train_images"] / GLDV2["train_classes"]  # 20.35
# The JPEG pool: views of POOL_BUILDINGS landmarks (POOL_VIEWS each) and POOL_CLUTTER non-landmark scenes, each of a
# width and height drawn from 32 to 64 px. An image of landmark number l is a view of building l % POOL_BUILDINGS.
POOL_BUILDINGS, POOL_VIEWS, POOL_CLUTTER = 64, 4, 64
POOL_SIDES = (32, 64)
JPEG_QUALITY = 75
MARKER = "synthetic_scale.json"
LANDMARK_IDS = 210_000  # train landmark ids: distinct, drawn from 0 .. LANDMARK_IDS - 1 (room for 203,094)
INDEX_LANDMARK_IDS = 300_000  # index landmark ids start here: their own namespace, as GLDv2's are


class SyntheticScaleError(JobError, ValueError):
    """A fraction, or an output location, that this writer cannot use; the message says what to do."""


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class ScaledCounts:
    """GLDv2's counts at a fraction: every image and class count is ``GLDV2``'s times ``fraction``, rounded half up;
    tars likewise, but at least one per split."""

    fraction: float
    train_images: int
    train_classes: int
    clean_images: int
    clean_classes: int
    gldv2x_images: int
    index_images: int
    test_images: int
    test_landmark_images: int
    train_tars: int
    index_tars: int
    test_tars: int

    @classmethod
    def at(cls, fraction: float, what: str = "fraction") -> "ScaledCounts":
        """The counts at ``fraction``; one that is not in [MIN_FRACTION, 1] is a SyntheticScaleError naming
        ``what`` (the flag or key that gave it)."""
        if not 0 < fraction <= 1:  # also NaN
            raise SyntheticScaleError(f"{what} {fraction}: a fraction of GLDv2's counts is in (0, 1]")
        if fraction < MIN_FRACTION:
            raise SyntheticScaleError(
                f"{what} {fraction}: below {MIN_FRACTION}, where GLDv2's {GLDV2['test_landmark_images']:,} landmark "
                f"test images would round to none; use {MIN_FRACTION} <= f <= 1")
        scaled = {key: _half_up(n * fraction) for key, n in GLDV2.items()}
        for key in ("train_tars", "index_tars", "test_tars"):
            scaled[key] = max(1, scaled[key])
        return cls(fraction=fraction, **scaled)


def apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Whole numbers in proportion to ``weights`` that sum to ``total`` exactly (the largest remainders get one
    more)."""
    raw = total * weights / weights.sum()
    whole = np.floor(raw).astype(np.int64)
    whole[np.argsort(whole - raw, kind="stable")[: total - int(whole.sum())]] += 1
    return whole


def long_tail_sizes(classes: int, images: int, minimum: int, sigma: float = SIZE_SIGMA) -> np.ndarray:
    """``classes`` class sizes, largest first, that sum to ``images`` exactly: ``minimum`` each, plus the rest shared
    in proportion to the log-normal quantiles (i + 0.5) / classes."""
    if classes == 0:
        return np.zeros(0, np.int64)
    normal = NormalDist()
    z = np.array([normal.inv_cdf(1 - (i + 0.5) / classes) for i in range(classes)])
    return minimum + apportion(images - minimum * classes, np.exp(sigma * z))


@dataclass
class SplitImages:
    """One split's images, in the order of its CSV: uint64 ids, the pool JPEG each shows, the tar that holds it."""

    ids: np.ndarray
    pool: np.ndarray
    shard: np.ndarray


def _balanced_shards(rng: np.random.Generator, n: int, shards: int) -> np.ndarray:
    """A tar for each of ``n`` images: random, but every tar gets n // shards or one more (GLDv2's tars are about
    equal, and not grouped by landmark)."""
    shard = np.empty(n, np.int64)
    shard[rng.permutation(n)] = np.arange(n) * shards // n
    return shard


class ScaledPlan:
    """Every image of the set (id, split, landmark, pool JPEG, tar) and the GLDv2 tables, from the counts and a seed;
    numpy arrays throughout, so f = 1 (5 M images) plans in seconds."""

    def __init__(self, counts: ScaledCounts, seed: int = 0):
        rng = np.random.default_rng([seed, 5])
        c = counts
        n_lm, n_clean = c.train_classes, c.clean_classes
        # Landmark numbers 0 .. n_clean - 1 are GLDv2c's, largest first; the others follow, largest first.
        sizes = np.concatenate([long_tail_sizes(n_clean, c.gldv2x_images, 2),
                                long_tail_sizes(n_lm - n_clean, c.train_images - c.gldv2x_images, 1)])
        kept = np.zeros(n_lm, np.int64)
        kept[:n_clean] = 2 + apportion(c.clean_images - 2 * n_clean, (sizes[:n_clean] - 2).astype(float))
        self.kept = kept
        self.landmark_ids = rng.choice(LANDMARK_IDS, size=n_lm, replace=False)

        ids = unique_image_ids(rng, c.train_images + c.test_images + c.index_images)
        train_ids, test_ids, index_ids = np.split(ids, [c.train_images, c.train_images + c.test_images])

        # Train: each landmark's rows together (its first `kept` rows are its GLDv2c images), shuffled for the CSV.
        landmark = np.repeat(np.arange(n_lm), sizes)
        position = np.arange(c.train_images) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        clean_row = position < kept[landmark]
        pool = np.where(clean_row | (landmark >= n_clean), _views(rng, landmark), _clutter(rng, c.train_images))
        self.train_clean_ids = gldv2.u64_to_ids(train_ids[clean_row])  # grouped by landmark, in landmark order
        order = rng.permutation(c.train_images)
        self.train_landmark = landmark[order]
        self.splits = {"train": SplitImages(train_ids[order], pool[order],
                                            _balanced_shards(rng, c.train_images, c.train_tars))}

        # Test: landmark images of GLDv2c landmarks (the recognition ground truth), then non-landmark clutter.
        test_landmark = np.full(c.test_images, -1)
        test_landmark[: c.test_landmark_images] = rng.choice(n_clean, size=c.test_landmark_images)
        test_pool = np.where(test_landmark >= 0, _views(rng, test_landmark), _clutter(rng, c.test_images))
        order = rng.permutation(c.test_images)
        self.test_landmark = test_landmark[order]
        self.usage = rng.choice(list(USAGE_SHARES), size=c.test_images, p=list(USAGE_SHARES.values()))
        self.splits["test"] = SplitImages(test_ids, test_pool[order], _balanced_shards(rng, c.test_images, c.test_tars))

        # Index: the relevant images of each landmark the test set shows, index-only landmarks, unlisted clutter.
        shown = np.unique(self.test_landmark[self.test_landmark >= 0])
        n_relevant = len(shown) * RELEVANT_PER_TEST_LANDMARK
        n_unlisted = _half_up(INDEX_UNLISTED_SHARE * c.index_images)
        n_others = c.index_images - n_relevant - n_unlisted  # 171 or more from MIN_FRACTION up
        index_only = long_tail_sizes(max(1, _half_up(n_others / TRAIN_MEAN_SIZE)) if n_others else 0, n_others, 1)
        # Index landmark k (k < len(shown)) is test landmark shown[k]; the others are index-only, with building
        # numbers after the train landmarks'.
        index_landmark = np.concatenate([np.repeat(np.arange(len(shown)), RELEVANT_PER_TEST_LANDMARK),
                                         len(shown) + np.repeat(np.arange(len(index_only)), index_only),
                                         np.full(n_unlisted, -1)])
        building = np.concatenate([shown, n_lm + np.arange(len(index_only))])
        index_pool = np.where(index_landmark >= 0, _views(rng, building[np.maximum(index_landmark, 0)]),
                              _clutter(rng, c.index_images))
        order = rng.permutation(c.index_images)
        self.index_landmark = index_landmark[order]
        self.shown = shown
        self.index_landmark_ids = INDEX_LANDMARK_IDS + rng.choice(
            max(100_000, 2 * (len(shown) + len(index_only))), size=len(shown) + len(index_only), replace=False)
        self.splits["index"] = SplitImages(index_ids, index_pool[order],
                                           _balanced_shards(rng, c.index_images, c.index_tars))
        self.counts = counts
        self.tars = {"train": c.train_tars, "index": c.index_tars, "test": c.test_tars}

    def tables(self) -> dict[str, pd.DataFrame]:
        """GLDv2's CSVs (path under the root -> table), with its columns."""
        train, test, index = (self.splits[s] for s in ("train", "test", "index"))
        train_ids = pd.Series(gldv2.u64_to_ids(train.ids))
        n_clean = self.counts.clean_classes
        bounds = np.concatenate([[0], np.cumsum(self.kept[:n_clean])])
        clean = pd.DataFrame({
            "landmark_id": self.landmark_ids[:n_clean],
            "images": [" ".join(self.train_clean_ids[a:b]) for a, b in zip(bounds[:-1], bounds[1:])],
        }).sort_values("landmark_id", ignore_index=True)
        landmark_ids = np.sort(self.landmark_ids)

        test_ids = gldv2.u64_to_ids(test.ids)
        index_ids = pd.Series(gldv2.u64_to_ids(index.ids))
        listed = self.index_landmark >= 0
        relevant = self.index_landmark < len(self.shown)
        # The relevant index images of each test landmark, by its position in `shown`.
        by_shown = index_ids[listed & relevant].groupby(self.index_landmark[listed & relevant]).agg(" ".join)
        is_landmark = self.test_landmark >= 0
        shown_at = np.searchsorted(self.shown, self.test_landmark)
        test_landmark_ids = self.landmark_ids[np.maximum(self.test_landmark, 0)].astype(str)
        return {
            gldv2.TRAIN_CSV: pd.DataFrame({"id": train_ids, "url": URL_PREFIX + train_ids + ".jpg",
                                           "landmark_id": self.landmark_ids[self.train_landmark]}),
            gldv2.TRAIN_CLEAN_CSV: clean,
            gldv2.LABEL_TO_CATEGORY_CSV: pd.DataFrame({"landmark_id": landmark_ids,
                                                       "category": [f"{CATEGORY_PREFIX}{x}" for x in landmark_ids]}),
            gldv2.INDEX_CSV: pd.DataFrame({"id": index_ids}),
            gldv2.TEST_CSV: pd.DataFrame({"id": test_ids}),
            gldv2.INDEX_TO_LANDMARK_CSV: pd.DataFrame({
                "id": index_ids[listed].to_numpy(),
                "landmark_id": self.index_landmark_ids[self.index_landmark[listed]]}),
            gldv2.RECOGNITION_GT_CSV: pd.DataFrame({
                "id": test_ids,
                "landmarks": np.where(is_landmark, test_landmark_ids, ""),
                "Usage": self.usage}),
            gldv2.RETRIEVAL_GT_CSV: pd.DataFrame({
                "id": test_ids,
                "images": np.where(is_landmark, by_shown.reindex(shown_at).to_numpy(), "None"),
                "Usage": np.where(is_landmark, self.usage, "Ignored")}),
        }

    def tar_bytes(self, split: str, pool_sizes: np.ndarray) -> np.ndarray:
        """The exact size of each tar of ``split`` as ``gldv2.pack_tar`` writes it: a 512-byte header per member and
        per directory (a/, a/b/, a/b/c/ of the ids it holds), data padded to 512 bytes, two zero blocks at the end,
        all padded to tarfile's 10,240-byte record."""
        images = self.splits[split]
        shards = self.tars[split]
        data = np.bincount(images.shard, weights=512 + -(-pool_sizes[images.pool] // 512) * 512, minlength=shards)
        prefix = np.bincount(images.shard * 4096 + (images.ids >> np.uint64(52)).astype(np.int64),
                             minlength=shards * 4096).reshape(shards, 16, 16, 16) > 0
        folders = prefix.sum((1, 2, 3)) + prefix.any(3).sum((1, 2)) + prefix.any((2, 3)).sum(1)
        raw = data.astype(np.int64) + 512 * folders + 1024
        return -(-raw // 10240) * 10240


def _views(rng: np.random.Generator, landmark: np.ndarray) -> np.ndarray:
    """A pool JPEG for each image of landmark number ``landmark``: a random view of its building."""
    return (landmark % POOL_BUILDINGS) * POOL_VIEWS + rng.integers(0, POOL_VIEWS, size=len(landmark))


def _clutter(rng: np.random.Generator, n: int) -> np.ndarray:
    return POOL_BUILDINGS * POOL_VIEWS + rng.integers(0, POOL_CLUTTER, size=n)


@functools.cache
def jpeg_pool(seed: int = 0) -> tuple[bytes, ...]:
    """The JPEGs every image reuses: POOL_VIEWS views of each of POOL_BUILDINGS buildings, then POOL_CLUTTER
    non-landmark scenes, each 32-64 px a side (the renderer of ``synthetic.py``); rendered once per process."""
    pool = []
    for number in range(POOL_BUILDINGS * POOL_VIEWS + POOL_CLUTTER):
        rng = np.random.default_rng([seed, 6, number])
        width, height = (int(x) for x in rng.integers(POOL_SIDES[0], POOL_SIDES[1] + 1, size=2))
        if number < POOL_BUILDINGS * POOL_VIEWS:
            building = render_building(np.random.default_rng([seed, 7, number // POOL_VIEWS]), 64, 64)
            image = render_view(building, rng, width, height, hard=False)
        else:
            image = render_clutter(rng, width, height)
        pool.append(jpeg_bytes(image, JPEG_QUALITY))
    return tuple(pool)


def _free_bytes(root: Location) -> int | None:
    """Free bytes on the disk that holds a local ``root`` (its nearest existing folder); None for a bucket."""
    if root.is_s3:
        return None
    path = root.path
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def _holds_files(root: Location) -> bool:
    from pyarrow import fs as pafs

    info = root.fs.get_file_info(root.path)
    if info.type == pafs.FileType.NotFound:
        return False
    return info.type != pafs.FileType.Directory or bool(root.fs.get_file_info(pafs.FileSelector(root.path)))


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def write_scaled_gldv2(fraction: float, root: Location, seed: int = 0, printer: Printer | None = say,
                       what: str = "fraction") -> dict:
    """Write GLDv2 at ``fraction`` of its counts under ``root`` (a folder or bucket); returns the summary, which
    ``reused`` says was written by an earlier run. Everything is checked before the first file: the fraction
    (``what`` names the flag), that the root is empty or holds this set, and that a local disk has room for every
    byte the plan will write (a bucket is not checked)."""
    started = time.perf_counter()
    show = printer or (lambda line, transient=False: None)
    counts = ScaledCounts.at(fraction, what)
    identity = {"fraction": fraction, "seed": seed}
    marker = root.child(MARKER)
    earlier = json.loads(read_bytes(marker)) if exists(marker) else None
    if earlier is not None and {k: earlier.get(k) for k in identity} != identity:
        state = "a complete" if earlier.get("complete") else "an unfinished"
        raise SyntheticScaleError(
            f"{root.uri} holds {state} synthetic GLDv2 of fraction {earlier.get('fraction')} (seed "
            f"{earlier.get('seed')}), not {fraction} (seed {seed}); choose another folder or delete it")
    if earlier is None and _holds_files(root):
        raise SyntheticScaleError(f"{root.uri} already holds files and no {MARKER}: not a set this job wrote; "
                                  "choose an empty or new folder")
    if earlier is not None and earlier.get("complete"):
        show(f"synthetic GLDv2 f={fraction}: complete in {root.uri} already (its {MARKER}); reused")
        return {**earlier["summary"], "reused": True}

    plan = ScaledPlan(counts, seed)
    pool = jpeg_pool(seed)
    pool_sizes = np.array([len(b) for b in pool], np.int64)
    csvs = csv_files(plan.tables())
    tars = {split: plan.tar_bytes(split, pool_sizes) for split in gldv2.SPLITS}
    md5_file = len(f"{'0' * 32}  {gldv2.shard_name(0)}\n")  # write_shard's md5 file of each tar
    total = sum(len(b) for b in csvs.values()) + sum(int(t.sum()) + md5_file * len(t) for t in tars.values())
    done = {(split, shard) for split, sizes in tars.items() for shard, size in enumerate(sizes)
            if _tar_complete(root, split, shard, int(size))}
    needed = total - sum(int(tars[split][shard]) + md5_file for split, shard in done)
    free = _free_bytes(root)
    if free is not None and needed > free:
        raise SyntheticScaleError(
            f"{root.uri}: fraction {fraction} needs {needed:,} bytes ({_gb(needed)}) of disk, {free:,} "
            f"({_gb(free)}) are free there; free some space or choose a smaller fraction")
    show(f"synthetic GLDv2 f={fraction}: {counts.train_images:,} train images of {counts.train_classes:,} landmarks "
         f"(GLDv2c {counts.clean_images:,} of {counts.clean_classes:,}, GLDv2x {counts.gldv2x_images:,}), "
         f"{counts.index_images:,} index, {counts.test_images:,} test; {counts.train_tars}/{counts.index_tars}/"
         f"{counts.test_tars} tars, {_gb(total)}{f', {len(done)} tars kept from an earlier run' if done else ''} "
         f"(planned in {time.perf_counter() - started:.1f} s)")
    write_bytes(marker, json.dumps({**identity, "complete": False}).encode())
    if not root.is_s3:  # a file a killed run was writing (write_bytes: written beside its place, then renamed)
        for partial in glob.glob(os.path.join(root.path, "**", "*.partial-*"), recursive=True):
            os.remove(partial)

    for name, data in csvs.items():
        write_bytes(root.child(name), data)
    show(f"synthetic GLDv2 f={fraction}: {len(csvs)} CSV files, {_gb(sum(len(b) for b in csvs.values()))}")
    for split in ("train", "index", "test"):
        images = plan.splits[split]
        ids = gldv2.u64_to_ids(images.ids)
        order = np.argsort(images.shard, kind="stable")
        bounds = np.searchsorted(images.shard[order], np.arange(len(tars[split]) + 1))
        todo = [shard for shard in range(len(tars[split])) if (split, shard) not in done]
        line = ProgressLine(f"synthetic GLDv2 f={fraction}: {split} tars", printer=show,
                            total=int(sum(bounds[shard + 1] - bounds[shard] for shard in todo)))
        for shard in todo:
            rows = order[bounds[shard]:bounds[shard + 1]]
            members = [(gldv2.member_name(ids[i]), pool[images.pool[i]]) for i in rows]
            written = write_shard(root, split, shard, members)
            if written != tars[split][shard]:  # the disk check counted on the plan's size
                raise RuntimeError(f"{split} tar {shard}: planned {tars[split][shard]} bytes, wrote {written}")
            line.update(len(members), extra=f"tar {shard + 1}/{len(tars[split])}")
        kept = len(tars[split]) - len(todo)
        line.close(f"{len(todo)} tars" + (f", {kept} kept from an earlier run" if kept else ""))

    summary = {"root": root.uri, **identity, "counts": asdict(counts), "bytes": total,
               "seconds": round(time.perf_counter() - started, 1)}
    write_bytes(marker, json.dumps({**identity, "complete": True, "summary": summary}).encode())
    show(f"synthetic GLDv2 f={fraction}: wrote {_gb(total)} to {root.uri} in {summary['seconds']} s")
    return {**summary, "reused": False}


def _tar_complete(root: Location, split: str, shard: int, size: int) -> bool:
    """Whether an earlier run of this plan wrote the tar (its planned size) and then its md5 file."""
    tar = root.child(split, gldv2.shard_name(shard))
    info = tar.fs.get_file_info(tar.path)
    return info.size == size and exists(root.child(gldv2.checksum_name(split, shard)))
