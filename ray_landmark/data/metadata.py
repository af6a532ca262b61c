"""GLDv2 metadata: the official CSVs -> compact manifests, written once, read by every job.

Manifest layout (Parquet, under ``data.manifest``, default ``<root>/manifest``):

* ``train_ids.parquet``: every train image id (uint64, sorted) with its landmark id.
* ``<view>/images.parquet``: id, class, landmark_id of each image in the view (gldv2c, gldv2x, full).
* ``<view>/classes.parquet``: class, landmark_id, count; classes are landmark ids sorted ascending -> 0..C-1.
* ``eval/test.parquet``: every test image id of ``metadata/test.csv`` (the queries of both tracks).
* ``eval/index.parquet``: every index image id of ``metadata/index.csv``, with its landmark id where
  ``index_image_to_landmark.csv`` has one (distractors have none: retrieval still ranks them).
* ``eval/recognition.parquet``: test id, landmark ids (space-separated, empty for non-landmark images), usage.
* ``eval/retrieval.parquet``: test id, relevant index ids (space-separated, empty when none), usage.
* ``shards/<split>.parquet`` (written with ``--verify-shards``): the split's shard index, one row per tar member with
  the byte range of its data (``shard_members.INDEX_COLUMNS``); the streams then read only the members they need.
* ``summary.json``: row counts.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ray_landmark.data import gldv2
from ray_landmark.data.config import DataConfig, LabelView
from ray_landmark.data.shard_members import image_ids
from ray_landmark.data.storage import Location, StorageError, exists, read_bytes, resolve, write_bytes
from ray_landmark.errors import JobError

log = logging.getLogger(__name__)

# Lookup codes for ids without a class: in train but left out by the chosen view, or not in train at all.
NOT_IN_VIEW = -1
UNKNOWN_ID = -2
SUMMARY_FILE = "summary.json"  # written last: a manifest with one is complete
# shards/<split>_tars.parquet: the split's tar files (shard, bytes) when it has no shard index (without --verify-shards)
TARS_SUFFIX = "_tars.parquet"
# The lookup code of a selected eval image (test or index): its rows carry the split, not a class.
SELECTED = 0


class MetadataError(JobError, ValueError):
    """A GLDv2 CSV that cannot be used as it is; the message names the file and what is wrong."""


def _read_csv(root: Location, name: str, **kwargs) -> pd.DataFrame:
    loc = root.child(name)
    try:
        return pd.read_csv(io.BytesIO(read_bytes(loc)), **kwargs)
    except StorageError:
        raise
    except (ValueError, pd.errors.ParserError) as err:
        raise MetadataError(f"{loc.uri}: not a readable GLDv2 CSV: {err}") from None


def _require_columns(df: pd.DataFrame, columns: list[str], uri: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise MetadataError(f"{uri}: missing column(s) {missing}; found {list(df.columns)}; is it GLDv2's file?")


def _valid_ids(ids: pd.Series, uri: str) -> np.ndarray:
    ids = ids.astype(str).str.strip().str.lower()
    bad = ~ids.str.fullmatch(r"[0-9a-f]{16}")
    if bad.any():
        raise MetadataError(f"{uri}: {int(bad.sum())} image id(s) are not 16 hex characters, e.g. {ids[bad].iloc[0]!r}")
    return gldv2.ids_to_u64(ids)


def _landmark_ids(values: pd.Series, uri: str, nullable: bool = False) -> pd.Series:
    """A CSV's landmark_id column as integers; a value that is not one is a MetadataError naming the file, how many
    and the first, with its row."""
    numbers = pd.to_numeric(values, errors="coerce")
    missing = numbers.isna() & (values.notna() if nullable else True)
    bad = missing | (numbers.notna() & (numbers % 1 != 0))
    if bad.any():
        first = bad.to_numpy().nonzero()[0][0]
        raise MetadataError(f"{uri}: {int(bad.sum())} landmark_id value(s) are not whole numbers, the first "
                            f"{values.iloc[first]!r} on data row {first + 1}; is it GLDv2's file?")
    return numbers.astype("Int64" if nullable else np.int64)


def _to_parquet(loc: Location, df: pd.DataFrame) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
    write_bytes(loc, buf.getvalue())


def _read_parquet(loc: Location) -> pd.DataFrame:
    try:
        data = read_bytes(loc)
    except StorageError as err:
        raise StorageError(
            f"{err}. Is the manifest there? Write it once with jobs/prepare_gldv2.py --root <data.root> --out <URI> "
            "and set data.manifest to that URI"
        ) from None
    return pq.read_table(io.BytesIO(data)).to_pandas()


def _view_tables(images: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Label map and counts for one view: landmark ids sorted ascending -> classes 0..C-1."""
    classes = images.groupby("landmark_id").size().rename("count").reset_index().sort_values("landmark_id")
    classes.insert(0, "class", np.arange(len(classes), dtype=np.int32))
    class_of = pd.Series(classes["class"].to_numpy(), index=classes["landmark_id"].to_numpy())
    images = images.assign(**{"class": class_of.loc[images["landmark_id"].to_numpy()].to_numpy()})
    return images[["id", "class", "landmark_id"]].sort_values("id", ignore_index=True), classes.reset_index(drop=True)


def _keep_existing(images: pd.DataFrame, existing: np.ndarray | None) -> pd.DataFrame:
    return images if existing is None else images[np.isin(images["id"].to_numpy(np.uint64), existing)]


def prepare_manifests(
    root: Location, out: Location, progress=print, shard_index: dict[str, pd.DataFrame] | None = None,
    shard_files: dict[str, pd.DataFrame] | None = None,
) -> dict:
    """Read the official CSVs under ``root`` and write the manifests under ``out``; returns the summary.

    ``shard_index`` (split -> its shard index, from ``shard_members.split_shard_index``) is written with the manifests
    and restricts the label views to images that exist, so class counts (the dynamic margins) and steps per epoch are
    true; rows without images and images without rows are counted in the summary. Without it, counts are the CSVs'
    and the streams read whole shards. ``shard_files`` (split -> its tars' ``shard`` and ``bytes``, without a shard
    index) records which tars there are, so that a job finds one missing later.

    Every CSV is read and checked before anything is written, and ``summary.json`` is removed first and written last:
    a manifest is complete exactly when it has one (``open_manifest`` checks), so a failed or interrupted run never
    leaves a mix of two runs' files that looks usable.
    """
    tables: dict[tuple[str, ...], pd.DataFrame] = {}  # file (path parts under out) -> its table, written at the end
    shard_ids = {split: image_ids(index) for split, index in shard_index.items()} if shard_index else None
    for split, index in (shard_index or {}).items():
        tables[("shards", f"{split}.parquet")] = index
    for split, files in (shard_files or {}).items():
        if len(files) and split not in (shard_index or {}):
            tables[("shards", f"{split}{TARS_SUFFIX}")] = files
    train = _read_csv(root, gldv2.TRAIN_CSV, dtype={"id": str})
    _require_columns(train, ["id", "landmark_id"], root.child(gldv2.TRAIN_CSV).uri)
    train = pd.DataFrame(
        {"id": _valid_ids(train["id"], gldv2.TRAIN_CSV),
         "landmark_id": _landmark_ids(train["landmark_id"], root.child(gldv2.TRAIN_CSV).uri)}
    ).drop_duplicates("id")
    clean = _read_csv(root, gldv2.TRAIN_CLEAN_CSV, dtype={"images": str})
    _require_columns(clean, ["landmark_id", "images"], root.child(gldv2.TRAIN_CLEAN_CSV).uri)
    # Exploded without the images column: pandas copied each landmark's whole id list into every one of its rows
    # (158,047 rows at f = 0.1 of GLDv2's counts took 630 MB instead of 30).
    clean = pd.DataFrame({"landmark_id": clean["landmark_id"], "id": clean["images"].fillna("").str.split()}
                         ).explode("id").dropna(subset=["id"])
    clean = pd.DataFrame(
        {"id": _valid_ids(clean["id"], gldv2.TRAIN_CLEAN_CSV),
         "landmark_id": _landmark_ids(clean["landmark_id"], root.child(gldv2.TRAIN_CLEAN_CSV).uri)}
    ).drop_duplicates("id")

    view_images = {
        "full": train,
        "gldv2c": clean,
        "gldv2x": train[train["landmark_id"].isin(set(clean["landmark_id"]))],
    }
    # A train_clean id that train.csv lacks would be unknown to the lookup; keep every id the views name.
    all_ids = pd.concat([train, clean]).drop_duplicates("id").sort_values("id", ignore_index=True)
    tables[("train_ids.parquet",)] = all_ids
    summary: dict = {"source": root.uri, "train_ids": len(all_ids), "views": {}}
    train_existing = shard_ids["train"] if shard_ids else None
    for view, images in view_images.items():
        listed_classes = images["landmark_id"].nunique()
        images, classes = _view_tables(_keep_existing(images, train_existing))
        tables[(view, "images.parquet")] = images
        tables[(view, "classes.parquet")] = classes
        summary["views"][view] = {"images": len(images), "classes": len(classes)}
        if shard_ids:
            summary["views"][view]["classes_without_images"] = int(listed_classes - len(classes))
        if progress:
            progress(f"manifest {view}: {len(images):,} images, {len(classes):,} classes")

    recognition = _read_csv(root, gldv2.RECOGNITION_GT_CSV, dtype={"id": str, "landmarks": str}, keep_default_na=False)
    _require_columns(recognition, ["id", "landmarks", "Usage"], root.child(gldv2.RECOGNITION_GT_CSV).uri)
    retrieval = _read_csv(root, gldv2.RETRIEVAL_GT_CSV, dtype={"id": str, "images": str}, keep_default_na=False)
    _require_columns(retrieval, ["id", "images", "Usage"], root.child(gldv2.RETRIEVAL_GT_CSV).uri)
    test_ids = _read_csv(root, gldv2.TEST_CSV, dtype={"id": str})
    _require_columns(test_ids, ["id"], root.child(gldv2.TEST_CSV).uri)
    index_ids = _read_csv(root, gldv2.INDEX_CSV, dtype={"id": str})
    _require_columns(index_ids, ["id"], root.child(gldv2.INDEX_CSV).uri)
    index_landmarks = _read_csv(root, gldv2.INDEX_TO_LANDMARK_CSV, dtype={"id": str})
    _require_columns(index_landmarks, ["id", "landmark_id"], root.child(gldv2.INDEX_TO_LANDMARK_CSV).uri)
    # index.csv defines the index; index_image_to_landmark.csv only labels part of it.
    index = index_ids[["id"]].merge(index_landmarks[["id", "landmark_id"]], on="id", how="left")
    index["landmark_id"] = _landmark_ids(index["landmark_id"], root.child(gldv2.INDEX_TO_LANDMARK_CSV).uri,
                                         nullable=True)
    tables[("eval", "test.parquet")] = test_ids[["id"]]
    tables[("eval", "index.parquet")] = index
    tables[("eval", "recognition.parquet")] = pd.DataFrame(
        {"id": recognition["id"], "landmarks": recognition["landmarks"], "usage": recognition["Usage"]})
    tables[("eval", "retrieval.parquet")] = pd.DataFrame(
        {"id": retrieval["id"], "images": retrieval["images"].replace("None", ""), "usage": retrieval["Usage"]})
    summary["eval"] = {
        "test": len(test_ids),
        "scored_test": int((recognition["Usage"] != "Ignored").sum()),
        "non_landmark_test": int((recognition["landmarks"] == "").sum()),
        "index": len(index),
        "index_without_landmark": int(index["landmark_id"].isna().sum()),
    }
    if shard_ids:
        listed = {"train": all_ids["id"].to_numpy(np.uint64), "test": gldv2.ids_to_u64(test_ids["id"]),
                  "index": gldv2.ids_to_u64(index["id"])}
        summary["verified"] = {
            split: {
                "rows_without_images": int((~np.isin(listed[split], ids)).sum()),
                "images_without_rows": int((~np.isin(ids, listed[split])).sum()),
            }
            for split, ids in shard_ids.items()
        }
        if progress:
            progress(f"verified against the shards: {summary['verified']}")
    elif progress:
        progress("class counts are from the CSVs; --verify-shards counts only images the shards hold")
    marker = out.child(SUMMARY_FILE)
    if exists(marker):
        marker.fs.delete_file(marker.path)
    for parts, table in tables.items():
        _to_parquet(out.child(*parts), table)
    write_bytes(marker, json.dumps(summary, indent=2).encode())
    return summary


@dataclass(frozen=True)
class LabelLookup:
    """id -> class for every train id, in 12 bytes an id (4.13 M ids: 50 MB), searched with np.searchsorted.

    Classes are those of one label view; ids that the view leaves out map to NOT_IN_VIEW.
    """

    ids: np.ndarray  # uint64, sorted
    classes: np.ndarray  # int32

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Positions of uint64 ids in ``ids`` (an image's row: what the epoch's ledger of trained images counts by,
        ``data/epoch_rows.py``); -1 for ids not in train at all."""
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return np.where(self.ids[pos] == ids, pos, -1).astype(np.int64)

    def classes_at(self, rows: np.ndarray) -> np.ndarray:
        """Classes of rows from ``rows_of``; NOT_IN_VIEW for ids outside the view, UNKNOWN_ID for ids not in train."""
        return np.where(rows >= 0, self.classes[rows], UNKNOWN_ID).astype(np.int64)

    def classes_of(self, ids: np.ndarray) -> np.ndarray:
        return self.classes_at(self.rows_of(ids))

    def row_of(self, image_id: str) -> int:
        return int(self.rows_of(np.array([int(image_id, 16)], np.uint64))[0])

    def class_at(self, row: int) -> int:
        return int(self.classes[row]) if row >= 0 else UNKNOWN_ID

    def digest(self) -> str:
        """A fingerprint of the train ids and which of them the view holds: a ledger of rows (``data/epoch_rows.py``)
        saved under one lookup means nothing under another."""
        return hashlib.sha256(self.ids.tobytes() + (self.classes != NOT_IN_VIEW).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class Manifest:
    """The manifests of one dataset, read from ``data.manifest``."""

    location: Location

    def view_images(self, view: LabelView) -> pd.DataFrame:
        return _read_parquet(self.location.child(view, "images.parquet"))

    def view_classes(self, view: LabelView) -> pd.DataFrame:
        return _read_parquet(self.location.child(view, "classes.parquet"))

    def label_lookup(self, view: LabelView) -> LabelLookup:
        all_ids = _read_parquet(self.location.child("train_ids.parquet"))["id"].to_numpy(np.uint64)
        images = self.view_images(view)
        classes = np.full(len(all_ids), NOT_IN_VIEW, dtype=np.int32)
        classes[np.searchsorted(all_ids, images["id"].to_numpy(np.uint64))] = images["class"].to_numpy(np.int32)
        return LabelLookup(all_ids, classes)

    def shard_index(self, split: str) -> pd.DataFrame | None:
        """The split's shard index (``shard_members.INDEX_COLUMNS``), or None when the manifest was written
        without ``--verify-shards``."""
        loc = self.location.child("shards", f"{split}.parquet")
        return _read_parquet(loc) if exists(loc) else None

    def expected_shards(self, split: str) -> dict[str, int] | None:
        """Shard file name -> its size in bytes when the manifest was written, for every tar of ``split`` the manifest
        knows (its shard index, else the tar list ``prepare_gldv2`` records); None when it knows none (a manifest of
        before the tar lists)."""
        index = self.shard_index(split)
        if index is not None:
            return dict(zip(index["shard"], index["shard_bytes"].astype(int)))
        loc = self.location.child("shards", f"{split}{TARS_SUFFIX}")
        if not exists(loc):
            return None
        tars = _read_parquet(loc)
        return dict(zip(tars["shard"], tars["bytes"].astype(int)))

    def recognition(self) -> pd.DataFrame:
        return _read_parquet(self.location.child("eval", "recognition.parquet"))

    def retrieval(self) -> pd.DataFrame:
        return _read_parquet(self.location.child("eval", "retrieval.parquet"))

    def index(self) -> pd.DataFrame:
        return _read_parquet(self.location.child("eval", "index.parquet"))

    def test(self) -> pd.DataFrame:
        return _read_parquet(self.location.child("eval", "test.parquet"))

    def eval_selection(
        self, max_queries: int | None, max_index: int | None, seed: int = 0
    ) -> tuple[LabelLookup, LabelLookup]:
        """Lookups of a per-epoch validation subset, over every test and index id of the CSVs: scored test images
        (Usage not Ignored) and index images (those relevant to the chosen queries first) map to SELECTED, the rest to
        NOT_IN_VIEW, which the read tasks drop (without fetching their bytes where the split has a shard index)."""
        recognition = self.recognition()
        scored = recognition.loc[recognition["usage"] != "Ignored", "id"]
        if max_queries and max_queries < len(scored):
            scored = scored.sample(max_queries, random_state=seed)
        all_index_ids = index_ids = self.index()["id"]
        if max_index and max_index < len(index_ids):
            queries = set(scored)
            retrieval = self.retrieval()
            relevant = {
                i for q, imgs in zip(retrieval["id"], retrieval["images"]) if q in queries for i in str(imgs).split()
            }
            others = index_ids[~index_ids.isin(relevant)].sample(frac=1.0, random_state=seed)
            index_ids = pd.concat([index_ids[index_ids.isin(relevant)], others]).iloc[:max_index]
        return _selection(self.test()["id"], scored), _selection(all_index_ids, index_ids)


def _selection(all_ids: pd.Series, selected: pd.Series) -> LabelLookup:
    ids = np.sort(gldv2.ids_to_u64(all_ids))
    classes = np.where(np.isin(ids, gldv2.ids_to_u64(selected)), SELECTED, NOT_IN_VIEW).astype(np.int32)
    return LabelLookup(ids, classes)


def complete_manifest(cfg: DataConfig) -> Manifest | None:
    """The manifest of ``cfg`` if one was written to the end (it has its ``summary.json``), else None."""
    storage = cfg.manifest_storage or cfg.storage
    loc = resolve(cfg.manifest_uri, storage)
    return Manifest(loc) if exists(loc.child(SUMMARY_FILE), storage.retries) else None


def open_manifest(cfg: DataConfig) -> Manifest:
    """The manifest of ``cfg``; a StorageError naming it when it is missing or was left incomplete."""
    manifest = complete_manifest(cfg)
    if manifest is None:
        loc = resolve(cfg.manifest_uri, cfg.manifest_storage or cfg.storage)
        raise StorageError(
            f"{loc.uri}: no complete manifest there ({SUMMARY_FILE} missing: never written, or its writing was cut "
            f"off); write it with jobs/prepare_gldv2.py --root <data.root> --out {loc.uri}, or set data.manifest"
        )
    return manifest
