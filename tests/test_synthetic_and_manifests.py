"""The synthetic GLDv2 has the official layout, and the manifests derived from it are right."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ray_landmark.data import gldv2
from ray_landmark.data.metadata import NOT_IN_VIEW, UNKNOWN_ID, LabelLookup, Manifest, prepare_manifests
from ray_landmark.data.storage import resolve
from ray_landmark.data.config import SyntheticSpec
from ray_landmark.data.synthetic import write_synthetic_gldv2


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}


def test_layout_and_columns_match_gldv2(gldv2_local):
    root = Path(gldv2_local)
    columns = {
        gldv2.TRAIN_CSV: ["id", "url", "landmark_id"],
        gldv2.TRAIN_CLEAN_CSV: ["landmark_id", "images"],
        gldv2.LABEL_TO_CATEGORY_CSV: ["landmark_id", "category"],
        gldv2.INDEX_CSV: ["id"],
        gldv2.TEST_CSV: ["id"],
        gldv2.INDEX_TO_LANDMARK_CSV: ["id", "landmark_id"],
        gldv2.RECOGNITION_GT_CSV: ["id", "landmarks", "Usage"],
        gldv2.RETRIEVAL_GT_CSV: ["id", "images", "Usage"],
    }
    for name, cols in columns.items():
        assert list(pd.read_csv(root / name, nrows=1).columns) == cols, name
    for split in gldv2.SPLITS:
        csv_ids = set(pd.read_csv(root / f"metadata/{split}.csv", dtype=str)["id"])
        tar_ids = set()
        for tar_path in sorted((root / split).glob("images_*.tar")):
            md5_line = (root / "md5sum" / split / f"md5.{tar_path.stem}.txt").read_text()
            assert md5_line.split()[0] == hashlib.md5(tar_path.read_bytes()).hexdigest()
            for name, data in _members(tar_path).items():
                image_id = Path(name).stem
                assert name == f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"
                assert Image.open(io.BytesIO(data)).format == "JPEG"
                tar_ids.add(image_id)
        assert tar_ids == csv_ids, split


def test_ground_truth_has_non_landmarks_usage_and_retrieval_matches(gldv2_local):
    root = Path(gldv2_local)
    recognition = pd.read_csv(root / gldv2.RECOGNITION_GT_CSV, dtype=str, keep_default_na=False)
    retrieval = pd.read_csv(root / gldv2.RETRIEVAL_GT_CSV, dtype=str, keep_default_na=False)
    clean_landmarks = set(pd.read_csv(root / gldv2.TRAIN_CLEAN_CSV, dtype=str)["landmark_id"])
    index_ids = set(pd.read_csv(root / gldv2.INDEX_CSV, dtype=str)["id"])
    assert (recognition["landmarks"] == "").sum() == SyntheticSpec().test_non_landmark_images
    assert set(recognition.loc[recognition["landmarks"] != "", "landmarks"]) <= clean_landmarks
    assert set(recognition["Usage"]) == {"Public", "Private", "Ignored"}
    relevant = retrieval.loc[retrieval["images"] != "None", "images"].str.split()
    assert len(relevant) and all(set(r) <= index_ids for r in relevant)
    non_landmarks = set(recognition.loc[recognition["landmarks"] == "", "id"])
    assert (retrieval.set_index("id").loc[list(non_landmarks), "images"] == "None").all()


def test_class_sizes_are_long_tailed(gldv2_local):
    counts = pd.read_csv(Path(gldv2_local) / gldv2.TRAIN_CSV)["landmark_id"].value_counts()
    assert counts.max() >= 8 * counts.min()
    assert (counts <= counts.median()).sum() >= len(counts) / 2


def test_generation_is_deterministic_from_the_seed(tmp_path):
    spec = SyntheticSpec(num_landmarks=6, max_images_per_landmark=5, test_landmark_images=3,
                         test_non_landmark_images=2, index_distractor_landmarks=1, train_shards=1)
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        write_synthetic_gldv2(spec.model_copy(update={"seed": seed}), resolve(str(tmp_path / name)), progress=None)
    tar = lambda d: (tmp_path / d / "train" / gldv2.shard_name(0)).read_bytes()  # noqa: E731
    assert tar("a") == tar("b") != tar("c")


def test_views_label_maps_and_counts(gldv2_local):
    manifest = Manifest(resolve(gldv2_local + "/manifest"))
    train = pd.read_csv(Path(gldv2_local) / gldv2.TRAIN_CSV, dtype={"id": str})
    clean = pd.read_csv(Path(gldv2_local) / gldv2.TRAIN_CLEAN_CSV)
    for view in ("gldv2c", "gldv2x", "full"):
        classes = manifest.view_classes(view)
        images = manifest.view_images(view)
        # landmark ids sorted ascending -> 0..C-1, and counts are the view's own
        assert classes["landmark_id"].is_monotonic_increasing
        assert classes["class"].tolist() == list(range(len(classes)))
        assert classes["count"].tolist() == images.groupby("class").size().tolist()
        mapping = dict(zip(classes["landmark_id"], classes["class"]))
        assert (images["landmark_id"].map(mapping) == images["class"]).all()
    assert len(manifest.view_images("full")) == len(train)
    assert len(manifest.view_classes("gldv2c")) == len(clean)
    assert len(manifest.view_images("gldv2c")) == clean["images"].str.split().str.len().sum()
    gldv2x = manifest.view_images("gldv2x")
    assert set(gldv2x["landmark_id"]) == set(clean["landmark_id"])
    assert len(gldv2x) == train["landmark_id"].isin(set(clean["landmark_id"])).sum()


def test_label_lookup_holds_every_train_id_in_under_100_mb():
    n = 4_132_914  # GLDv2 train images
    rng = np.random.default_rng(0)
    # Sorted, distinct, even ids over half the uint64 range, made without sorting 4 M numbers (seconds on 2
    # busy cores): the running sum of random even steps.
    ids = np.cumsum(2 * rng.integers(1, 2**41, size=n, dtype=np.uint64), dtype=np.uint64)
    classes = rng.integers(-1, 81_313, size=len(ids)).astype(np.int32)
    lookup = LabelLookup(ids, classes)
    assert lookup.ids.nbytes + lookup.classes.nbytes < 100 * 2**20
    probe = rng.choice(len(ids), size=1000, replace=False)
    assert (lookup.classes_of(ids[probe]) == classes[probe]).all()
    unknown = np.array([1, 3, ids[-1] + 1], np.uint64)  # odd: no train id
    assert set(lookup.classes_of(unknown)) == {UNKNOWN_ID}
    assert NOT_IN_VIEW in lookup.classes_of(ids[classes == NOT_IN_VIEW][:5])


def test_eval_selection_keeps_scored_queries_and_their_relevant_index_images_first(gldv2_local):
    from ray_landmark.data.metadata import SELECTED

    manifest = Manifest(resolve(gldv2_local + "/manifest"))
    queries, index = manifest.eval_selection(max_queries=10, max_index=12)
    chosen = set(gldv2.u64_to_ids(queries.ids[queries.classes == SELECTED]))
    recognition = manifest.recognition().set_index("id")
    assert len(chosen) == 10 and set(recognition.loc[list(chosen), "usage"]) <= {"Public", "Private"}
    kept = set(gldv2.u64_to_ids(index.ids[index.classes == SELECTED]))
    retrieval = manifest.retrieval().set_index("id")
    relevant = {i for q in chosen for i in str(retrieval.loc[q, "images"]).split()}
    assert len(kept) == 12 and (relevant <= kept or kept <= relevant)
    all_queries, all_index = manifest.eval_selection(None, None)
    assert (all_index.classes == SELECTED).all() and (all_queries.classes == SELECTED).sum() == (
        recognition["usage"] != "Ignored"
    ).sum()


def test_the_eval_sets_are_the_csvs_index_and_test_lists_distractors_without_a_landmark_row_included(gldv2_local):
    root = Path(gldv2_local)
    listed_index = set(pd.read_csv(root / gldv2.INDEX_CSV, dtype=str)["id"])
    labelled_index = set(pd.read_csv(root / gldv2.INDEX_TO_LANDMARK_CSV, dtype=str)["id"])
    unlisted = listed_index - labelled_index
    assert len(unlisted) == SyntheticSpec().index_unlisted_images > 0  # the synthetic set plants such distractors

    manifest = Manifest(resolve(gldv2_local + "/manifest"))
    index = manifest.index()
    assert set(index["id"]) == listed_index
    assert index.set_index("id").loc[sorted(unlisted), "landmark_id"].isna().all()
    assert set(manifest.test()["id"]) == set(pd.read_csv(root / gldv2.TEST_CSV, dtype=str)["id"])
    _, index_selection = manifest.eval_selection(None, None)
    assert set(gldv2.u64_to_ids(index_selection.ids)) == listed_index


def test_verify_shards_counts_only_images_the_shards_hold(gldv2_local, tmp_path):
    import shutil
    import tarfile

    from ray_landmark.data.shard_members import dataset_shard_index, image_ids

    root = tmp_path / "copy"
    shutil.copytree(gldv2_local, root, ignore=shutil.ignore_patterns("manifest"))
    shard = root / "train" / gldv2.shard_name(0)
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    removed = {os.path.basename(name)[:-4] for name, _ in members[:3]}
    shard.write_bytes(gldv2.pack_tar(members[3:]))
    loc = resolve(str(root))

    shard_index = dataset_shard_index(loc, progress=None)
    assert not set(gldv2.u64_to_ids(image_ids(shard_index["train"]))) & removed
    summary = prepare_manifests(loc, loc.child("manifest"), progress=None, shard_index=shard_index)

    assert summary["verified"]["train"] == {"rows_without_images": 3, "images_without_rows": 0}
    assert summary["verified"]["index"] == summary["verified"]["test"] == {"rows_without_images": 0,
                                                                           "images_without_rows": 0}
    full = Manifest(loc.child("manifest")).view_classes("full")
    listed = pd.read_csv(root / gldv2.TRAIN_CSV, dtype={"id": str})
    assert full["count"].sum() == len(listed) - 3
    unverified = prepare_manifests(loc, loc.child("manifest_csv"), progress=None)
    assert Manifest(loc.child("manifest_csv")).view_classes("full")["count"].sum() == len(listed)
    assert "verified" not in unverified
    assert Manifest(loc.child("manifest_csv")).shard_index("train") is None


def test_the_shard_index_round_trips_and_locates_every_members_bytes(gldv2_local, gldv2_s3, s3):
    from ray_landmark.data.config import StorageConfig
    from ray_landmark.data.shard_members import INDEX_COLUMNS, split_shard_index

    manifest = Manifest(resolve(gldv2_local + "/manifest"))  # written by the fixture with the index
    root = Path(gldv2_local)
    for split in gldv2.SPLITS:
        index = manifest.shard_index(split)
        assert list(index.columns) == list(INDEX_COLUMNS)
        listed = split_shard_index(resolve(gldv2_local).child(split), progress=None)
        pd.testing.assert_frame_equal(index, listed)
        for shard, rows in index.groupby("shard"):
            tar_path = root / split / shard
            data = tar_path.read_bytes()
            assert (rows["shard_bytes"] == len(data)).all() and rows["shard_complete"].all()
            located = {f"{int(i):016x}": data[o : o + n] for i, o, n in zip(rows["id"], rows["offset"], rows["size"])}
            assert located == {Path(name).stem: blob for name, blob in _members(tar_path).items()}
            assert (rows["name"] == "").all()  # the synthetic shards hold nothing but images
    # The same shards in a bucket give the same index.
    s3_index = Manifest(resolve(gldv2_s3 + "/manifest", StorageConfig(endpoint_url=s3.endpoint_url))).shard_index("train")
    pd.testing.assert_frame_equal(s3_index, manifest.shard_index("train"))


def test_the_shard_index_lists_other_members_by_name_and_marks_a_truncated_tar(tmp_path):
    from ray_landmark.data.shard_members import shard_members

    members = [(gldv2.member_name("a" * 16), b"\xff\xd8\xff" + b"x" * 3000), ("0/0/0/readme.txt", b"hello"),
               (gldv2.member_name("b" * 16), b"\xff\xd8\xff" + b"y" * 5000)]
    tar = gldv2.pack_tar(members)
    (tmp_path / "whole.tar").write_bytes(tar)
    cut_at = tar.index(b"y" * 100) + 100
    (tmp_path / "cut.tar").write_bytes(tar[:cut_at])
    loc = resolve(str(tmp_path))

    whole = shard_members(loc, str(tmp_path / "whole.tar"))
    cut = shard_members(loc, str(tmp_path / "cut.tar"))

    assert whole["name"].tolist() == ["0/0/0/readme.txt", "", ""]  # tar order: members sorted by name
    assert whole["id"].tolist() == [0, int("a" * 16, 16), int("b" * 16, 16)]
    assert whole["shard_complete"].all() and not cut["shard_complete"].any()
    # The cut member is listed with the size its header gives: it reaches past the shard's end.
    assert (cut[["id", "offset", "size"]].to_numpy() == whole[["id", "offset", "size"]].to_numpy()).all()
    assert cut["offset"].iloc[-1] + cut["size"].iloc[-1] > cut["shard_bytes"].iloc[0] == cut_at
