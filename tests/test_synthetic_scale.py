"""GLDv2 at a fraction of its counts (ray_landmark/data/synthetic_scale.py): exact counts, tars, views, class-size
shape, non-landmark share and unlisted index images, read by the manifests code; bad input and a killed run."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import job_error
from PIL import Image

from ray_landmark.data import gldv2, synthetic_scale
from ray_landmark.data.metadata import prepare_manifests
from ray_landmark.data.shard_members import dataset_shard_index
from ray_landmark.data.storage import resolve
from ray_landmark.data.synthetic_scale import (
    GLDV2, MARKER, ScaledCounts, ScaledPlan, SyntheticScaleError, long_tail_sizes, write_scaled_gldv2,
)

F = 0.0005  # the scale benchmark's test fraction
# GLDv2's counts times F, rounded half up, written out: 4,132,914 train images -> 2,066; 203,094 landmarks -> 102 ...
AT_F = {"train_images": 2066, "train_classes": 102, "clean_images": 790, "clean_classes": 41, "gldv2x_images": 1600,
        "index_images": 381, "test_images": 59, "test_landmark_images": 1, "train_tars": 1, "index_tars": 1,
        "test_tars": 1}


def _quiet(line, transient=False):
    pass


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    """The set at F with its manifests (shard index included, as prepare_gldv2.py --verify-shards writes them)."""
    root = resolve(str(tmp_path_factory.mktemp("scaled") / "gldv2"))
    summary = write_scaled_gldv2(F, root, printer=_quiet)
    manifest = prepare_manifests(root, root.child("manifest"), progress=None,
                                 shard_index=dataset_shard_index(root, progress=None))
    return Path(root.path), summary, manifest


def _csv(root: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(root / name, dtype=str, keep_default_na=False)


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}


def test_counts_are_gldv2s_times_the_fraction_and_tars_at_least_one():
    assert {k: getattr(ScaledCounts.at(F), k) for k in AT_F} == AT_F
    assert {k: getattr(ScaledCounts.at(1.0), k) for k in GLDV2} == GLDV2
    at_1_percent = ScaledCounts.at(0.01)
    # Several tars: each gets its share of the split's images, within one.
    plan = ScaledPlan(ScaledCounts.at(0.003))
    per_tar = np.bincount(plan.splits["train"].shard)
    assert len(per_tar) == 2 and per_tar.sum() == 12_399 and per_tar.max() - per_tar.min() <= 1
    assert (at_1_percent.train_tars, at_1_percent.index_tars, at_1_percent.test_tars) == (5, 1, 1)
    assert (at_1_percent.train_images, at_1_percent.test_landmark_images) == (41_329, 20)


def test_the_written_set_has_exactly_the_counts_layout_and_tars(scaled):
    root, summary, _ = scaled
    train, index, test = (_csv(root, n) for n in (gldv2.TRAIN_CSV, gldv2.INDEX_CSV, gldv2.TEST_CSV))
    assert list(train.columns) == ["id", "url", "landmark_id"]
    assert (len(train), train["landmark_id"].nunique(), len(index), len(test)) == (
        AT_F["train_images"], AT_F["train_classes"], AT_F["index_images"], AT_F["test_images"])
    assert len(_csv(root, gldv2.LABEL_TO_CATEGORY_CSV)) == AT_F["train_classes"]
    listed = {"train": set(train["id"]), "index": set(index["id"]), "test": set(test["id"])}
    sides = set()
    for split in gldv2.SPLITS:
        tars = sorted((root / split).glob("images_*.tar"))
        assert [t.name for t in tars] == [gldv2.shard_name(i) for i in range(AT_F[f"{split}_tars"])]
        ids = set()
        for tar in tars:
            md5 = (root / gldv2.checksum_name(split, int(tar.stem[-3:]))).read_text().split()[0]
            assert md5 == hashlib.md5(tar.read_bytes()).hexdigest()
            for name, data in _members(tar).items():
                image_id = Path(name).stem
                assert name == gldv2.member_name(image_id)
                ids.add(image_id)
                if len(sides) < 200:
                    sides.update(Image.open(io.BytesIO(data)).size)
        assert ids == listed[split], split
    assert min(sides) >= 32 and max(sides) <= 64
    # The disk check counts on the plan's bytes: they are the bytes written.
    written = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and "manifest" not in p.parts
                  and p.name != MARKER)
    assert summary["bytes"] == written


def test_views_and_eval_sets_as_the_manifests_code_reads_them(scaled):
    _, _, manifest = scaled
    assert manifest["views"] == {
        "full": {"images": 2066, "classes": 102, "classes_without_images": 0},
        "gldv2c": {"images": 790, "classes": 41, "classes_without_images": 0},
        "gldv2x": {"images": 1600, "classes": 41, "classes_without_images": 0},
    }
    assert {k: v for k, v in manifest["eval"].items() if k != "scored_test"} == {
        "test": 59, "non_landmark_test": 58, "index": 381, "index_without_landmark": 38}
    assert all(v == {"rows_without_images": 0, "images_without_rows": 0} for v in manifest["verified"].values())


def test_class_sizes_are_long_tailed_at_the_tiny_fraction_and_at_gldv2s_size(scaled):
    root, _, _ = scaled
    sizes = _csv(root, gldv2.TRAIN_CSV)["landmark_id"].value_counts().to_numpy()
    assert sizes.max() >= 40 * np.median(sizes) and (sizes <= 5).mean() >= 0.4 and sizes.min() >= 1
    # At f = 1 (the law alone, no images): 203,094 sizes summing to 4,132,914, thousands in the largest.
    clean = long_tail_sizes(GLDV2["clean_classes"], GLDV2["gldv2x_images"], 2)
    others = long_tail_sizes(GLDV2["train_classes"] - GLDV2["clean_classes"],
                             GLDV2["train_images"] - GLDV2["gldv2x_images"], 1)
    full = np.concatenate([clean, others])
    assert (len(full), full.sum(), clean.sum()) == (203_094, 4_132_914, 3_200_000)
    assert full.max() > 5000 and np.median(full) <= 8 and 0.4 <= (full <= 5).mean() <= 0.5


def test_non_landmark_share_ground_truth_and_unlisted_index_images(scaled):
    root, _, _ = scaled
    recognition, retrieval = _csv(root, gldv2.RECOGNITION_GT_CSV), _csv(root, gldv2.RETRIEVAL_GT_CSV)
    assert (recognition["landmarks"] == "").sum() == 58  # 115,605 of 117,577 in GLDv2, times F
    non_landmark = recognition["landmarks"] == ""
    assert (retrieval.loc[non_landmark, "images"] == "None").all()
    assert (retrieval.loc[non_landmark, "Usage"] == "Ignored").all()
    clean = _csv(root, gldv2.TRAIN_CLEAN_CSV)
    assert set(recognition.loc[~non_landmark, "landmarks"]) <= set(clean["landmark_id"])
    index_landmark = _csv(root, gldv2.INDEX_TO_LANDMARK_CSV).set_index("id")["landmark_id"]
    for images in retrieval.loc[~non_landmark, "images"]:
        relevant = images.split()
        assert len(relevant) == synthetic_scale.RELEVANT_PER_TEST_LANDMARK
        assert index_landmark.loc[relevant].nunique() == 1
    unlisted = set(_csv(root, gldv2.INDEX_CSV)["id"]) - set(index_landmark.index)
    assert len(unlisted) == 38  # INDEX_UNLISTED_SHARE of 381


@pytest.mark.parametrize("fraction, message", [
    ("1.5", "error: --fraction 1.5: a fraction of GLDv2's counts is in (0, 1]"),
    ("0", "error: --fraction 0.0: a fraction of GLDv2's counts is in (0, 1]"),
    ("nan", "error: --fraction nan: a fraction of GLDv2's counts is in (0, 1]"),
    ("0.0001", "error: --fraction 0.0001: below 0.000254, where GLDv2's 1,972 landmark test images would round to "
               "none; use 0.000254 <= f <= 1"),
])
def test_a_fraction_out_of_range_is_one_line_and_writes_nothing(monkeypatch, tmp_path, fraction, message):
    out = tmp_path / "gldv2"
    assert job_error(monkeypatch, "make_synthetic_gldv2.py", "--out", str(out), "--fraction", fraction) == message
    assert not out.exists()


def test_too_little_disk_is_one_line_with_the_bytes_needed_before_anything_is_written(monkeypatch, tmp_path):
    out = tmp_path / "gldv2"
    free = 10**6
    monkeypatch.setattr(synthetic_scale.shutil, "disk_usage", lambda path: type("Usage", (), {"free": free})())
    error = job_error(monkeypatch, "make_synthetic_gldv2.py", "--out", str(out), "--fraction", str(F))
    assert error.startswith(f"error: {out}: fraction {F} needs ") and error.endswith(
        f" of disk, {free:,} (1.0 MB) are free there; free some space or choose a smaller fraction"), error
    needed = int(error.split(" needs ")[1].split(" bytes")[0].replace(",", ""))
    assert needed > free and not out.exists()


def test_a_killed_run_is_never_taken_as_complete_resumes_and_refuses_another_fraction(monkeypatch, tmp_path, scaled):
    done_root, done, _ = scaled
    out = tmp_path / "gldv2"

    def killed_after_the_train_tars(line, transient=False):
        if "train tars" in line and not transient:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_scaled_gldv2(F, resolve(str(out)), printer=killed_after_the_train_tars)
    assert json.loads((out / MARKER).read_text()) == {"fraction": F, "seed": 0, "complete": False}
    assert (out / "train" / gldv2.shard_name(0)).exists() and not (out / "index").exists()

    error = job_error(monkeypatch, "make_synthetic_gldv2.py", "--out", str(out), "--fraction", "0.001")
    assert error == (f"error: {out} holds an unfinished synthetic GLDv2 of fraction {F} (seed 0), not 0.001 (seed 0); "
                     "choose another folder or delete it")
    leftover = out / "index" / f"{gldv2.shard_name(0)}.partial-12345"  # a tar a killed run was writing
    leftover.parent.mkdir()
    leftover.write_bytes(b"half a tar")
    lines = []
    summary = write_scaled_gldv2(F, resolve(str(out)), printer=lambda line, transient=False: lines.append(line))
    assert ", 1 tars kept from an earlier run" in lines[0] and not summary["reused"] and not leftover.exists()
    assert lines[2].endswith("| 0 tars, 1 kept from an earlier run")
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in root.rglob("*")  # noqa: E731
                          if p.is_file() and "manifest" not in p.parts and p.name != MARKER}
    assert files(out) == files(done_root)  # resumed: the same bytes as one uninterrupted run
    again = write_scaled_gldv2(F, resolve(str(out)), printer=_quiet)
    assert again["reused"] and again["counts"] == done["counts"]
    with pytest.raises(SyntheticScaleError, match=r"holds a complete synthetic GLDv2 of fraction 0.0005"):
        write_scaled_gldv2(0.001, resolve(str(out)), printer=_quiet)


def test_a_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a dataset")
    expected = f"{tmp_path} already holds files and no {MARKER}: not a set this job wrote; choose an empty or new " \
               "folder"
    with pytest.raises(SyntheticScaleError, match=f"^{re.escape(expected)}$"):
        write_scaled_gldv2(F, resolve(str(tmp_path)), printer=_quiet)
