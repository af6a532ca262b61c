"""The shard pipeline on a real local Ray, reading real tars of real JPEGs from a folder and from a local S3 server."""

from __future__ import annotations

import collections
import hashlib
import io
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ray_landmark.data import gldv2
from ray_landmark.data.config import DataConfig, StorageConfig, SyntheticSpec
from ray_landmark.data.metadata import open_manifest
from ray_landmark.data.pipeline import (
    SKIP_REASONS,
    ShardMembers,
    ShardStream,
    eval_stream,
    plan_ranges,
    ranged_members,
    stream_shards,
    train_stream,
    windowed_shuffle,
)
from ray_landmark.data.shard_members import shard_members
from ray_landmark.data.storage import StorageError, resolve


pytestmark = pytest.mark.usefixtures("ray_session")


def _config(root: str, s3=None, **kwargs) -> DataConfig:
    storage = StorageConfig(endpoint_url=s3.endpoint_url, retries=2) if s3 else StorageConfig(retries=2)
    return DataConfig(root=root, storage=storage, image_size=32, decode_batch_size=16, **kwargs)


def _ids_and_labels(stream) -> list[tuple[str, int]]:
    return [(str(i), int(l)) for b in stream.dataset.iter_batches(batch_size=64) for i, l in zip(b["id"], b["label"])]


@pytest.mark.parametrize("ranged", [True, False], ids=["ranged", "streamed"])
@pytest.mark.parametrize("where", ["local", "s3"])
# The quick run (-m "not slow") streams GLDv2c, a filtered view, by every path; the other views in the full run.
@pytest.mark.parametrize("view", ["gldv2c", pytest.param("gldv2x", marks=pytest.mark.slow),
                                  pytest.param("full", marks=pytest.mark.slow)])
def test_every_image_of_the_view_arrives_once_with_its_class(where, view, ranged, request, s3):
    root = request.getfixturevalue("gldv2_local" if where == "local" else "gldv2_s3")
    cfg = _config(root, s3 if where == "s3" else None, view=view, ranged_reads=ranged)
    manifest = open_manifest(cfg)
    expected = manifest.view_images(view)
    stream = stream_shards(cfg, "train", lookup=manifest.label_lookup(view), augment=True, keep_ids=True, shuffle=True)

    got = _ids_and_labels(stream)

    want = sorted(zip(gldv2.u64_to_ids(expected["id"].to_numpy()), expected["class"].astype(int)))
    assert sorted(got) == want
    counts = stream.counts()
    assert counts["read"] == len(want)
    assert not any(counts.get(reason) for reason in SKIP_REASONS)


def test_train_stream_feeds_fixed_size_uint8_images_and_int64_labels(gldv2_s3, s3):
    cfg = _config(gldv2_s3, s3, view="gldv2c")
    manifest = open_manifest(cfg)
    classes = manifest.view_classes("gldv2c")
    stream = train_stream(cfg, manifest)

    label_counts = collections.Counter()
    for batch in stream.dataset.iter_torch_batches(batch_size=16):
        assert set(batch) == {"image", "label", "row"}
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (32, 32, 3)
        assert batch["label"].dtype == torch.int64
        label_counts.update(batch["label"].tolist())

    assert label_counts == dict(zip(classes["class"].astype(int), classes["count"].astype(int)))


def test_each_tar_is_read_and_decoded_by_one_task(gldv2_local):
    cfg = _config(gldv2_local, view="full")
    stream = train_stream(cfg)
    for _ in stream.dataset.iter_batches(batch_size=16):
        pass
    # Ray fused the read and the decode: one operator, one task per tar; no split blocks, no second stage.
    stats = stream.dataset.stats()
    shards = len(os.listdir(os.path.join(gldv2_local, "train")))
    assert f"Operator 1 ReadGLDv2Tar->MapBatches(decode_images): {shards} tasks executed" in stats, stats
    assert "Operator 2" not in stats


def test_shard_order_changes_between_epochs(gldv2_local):
    import ray.data

    cfg = _config(gldv2_local, view="full")
    manifest = open_manifest(cfg)
    # With order preserved, any change of order between epochs comes from the per-epoch shard shuffle.
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    try:
        stream = stream_shards(cfg, "train", lookup=manifest.label_lookup("full"), augment=False, keep_ids=True, shuffle=True)
        epochs = [[i for i, _ in _ids_and_labels(stream)] for _ in range(3)]
    finally:
        ctx.execution_options.preserve_order = False
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(epochs[2])
    assert len({tuple(e) for e in epochs}) > 1


def test_eval_stream_keeps_ids_and_resizes_without_augmenting(gldv2_local):
    cfg = _config(gldv2_local)
    stream = eval_stream(cfg, "test")
    taken = stream.dataset.take_all()
    assert {str(r["split"]) for r in taken} == {"test"} and "label" not in taken[0]
    rows = {str(r["id"]): r["image"] for r in taken}
    recognition = open_manifest(cfg).recognition()
    assert set(rows) == set(recognition["id"])
    # Resizing the decoded JPEG ourselves gives the same pixels: no augmentation on the eval path.
    tar_path = os.path.join(gldv2_local, "test", gldv2.shard_name(0))
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar if m.isreg())
        image_id = os.path.basename(member.name)[:-4]
        data = tar.extractfile(member).read()
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.BILINEAR))
    # Reduced-size (draft) decoding shifts a few edge pixels; an augmentation would move the mean error far more.
    assert np.abs(rows[image_id].astype(int) - expected.astype(int)).mean() < 2


# ---------------------------------------------------------------- bad input


def test_bad_input_is_skipped_counted_and_every_good_sample_arrives_once(damaged_gldv2):
    cfg = _config(damaged_gldv2.root, view="full")
    manifest = open_manifest(cfg)
    stream = stream_shards(cfg, "train", lookup=manifest.label_lookup("full"), augment=True, keep_ids=True, shuffle=True)

    got = _ids_and_labels(stream)

    assert sorted(got) == damaged_gldv2.good_samples
    counts = stream.counts()
    assert {r: counts.get(r, 0) for r in SKIP_REASONS} == damaged_gldv2.skips
    # The view's images that never appeared: what the view lists minus what was read.
    assert damaged_gldv2.view_rows - counts["read"] == 1  # the one cut off


def test_a_shard_that_disappears_fails_at_once_naming_its_uri(gldv2_local, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(gldv2_local, root)
    cfg = _config(str(root), view="full")
    manifest = open_manifest(cfg)
    stream = stream_shards(cfg, "train", lookup=manifest.label_lookup("full"), augment=False, keep_ids=True, shuffle=False)
    missing = root / "train" / gldv2.shard_name(1)
    missing.unlink()
    with pytest.raises(Exception, match=rf"opening shard {missing} failed \(not found\)"):
        stream.dataset.take_all()


def test_an_unreachable_bucket_fails_naming_the_uri():
    cfg = DataConfig(root="s3://gldv2/v2", storage=StorageConfig(endpoint_url="http://127.0.0.1:9", retries=2, connect_timeout_s=1))
    with pytest.raises(StorageError, match=r"listing s3://gldv2/v2/train failed after 2 tries"):
        stream_shards(cfg, "train", lookup=None, augment=False, keep_ids=True, shuffle=False)


@pytest.mark.parametrize("ranged", [True, False], ids=["ranged", "streamed"])
def test_a_shard_the_store_fails_to_serve_fails_after_exactly_retries_tries_of_its_request(gldv2_s3, s3, ranged):
    from fault_proxy import FaultProxy

    shard = gldv2.shard_name(1)
    with FaultProxy(s3.endpoint_url) as proxy:
        storage = StorageConfig(endpoint_url=proxy.endpoint_url, retries=3)
        cfg = DataConfig(root=gldv2_s3, storage=storage, image_size=32, view="full", ranged_reads=ranged)
        stream = stream_shards(cfg, "train", lookup=open_manifest(cfg).label_lookup("full"), augment=False,
                               keep_ids=True, shuffle=False, worker_decode=True)
        proxy.fail_reads = rf"/train/{shard}$"  # S3's 503 SlowDown, which every layer of retries would retry
        with pytest.raises(Exception, match="AWS Error (SLOW_DOWN|SERVICE_UNAVAILABLE) during GetObject"):
            stream.dataset.take_all()
    # One layer retries, the S3 filesystem's: data.storage.retries tries of the one request, not tries of tries.
    assert [p for m, p in proxy.requests if m == "GET" and p.endswith(f"/train/{shard}")] == [
        f"/{gldv2_s3.removeprefix('s3://')}/train/{shard}"] * 3


def test_a_missing_bucket_on_a_live_server_fails_naming_the_uri(s3):
    cfg = _config("s3://no-such-bucket/gldv2", s3)
    with pytest.raises(StorageError, match="s3://no-such-bucket/gldv2/train"):
        stream_shards(cfg, "train", lookup=None, augment=False, keep_ids=True, shuffle=False)


def test_missing_credentials_are_reported_before_any_request(monkeypatch, tmp_path):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(StorageError, match="no S3 credentials found.*anonymous: true"):
        resolve("s3://gldv2/v2", StorageConfig(endpoint_url="http://127.0.0.1:9"))


def test_anonymous_access_reads_a_public_bucket(gldv2_local, s3):
    bucket = s3.create_bucket("gldv2-public", public=True)
    client = s3.client()
    for dirpath, _, files in os.walk(os.path.join(gldv2_local, "test")):
        for name in files:
            key = "v2/test/" + name
            client.put_object(Bucket="gldv2-public", Key=key, Body=open(os.path.join(dirpath, name), "rb").read(), ACL="public-read")
    cfg = DataConfig(
        root=f"{bucket}/v2", storage=StorageConfig(endpoint_url=s3.endpoint_url, anonymous=True), image_size=32
    )
    stream = stream_shards(cfg, "test", lookup=None, augment=False, keep_ids=True, shuffle=False)
    assert stream.dataset.count() == sum(1 for _ in open(os.path.join(gldv2_local, "metadata", "test.csv"))) - 1


@pytest.mark.parametrize("window", [0, 5, 100])
def test_windowed_shuffle_emits_every_row_once_and_moves_rows_at_most_the_window(window):
    rows = list(range(57))
    chunks = list(windowed_shuffle(iter(rows), 8, window, np.random.default_rng(0)))
    out = [r for c in chunks for r in c]
    assert sorted(out) == rows and all(len(c) <= 8 for c in chunks)
    if window == 0:
        assert out == rows
    else:
        assert out != rows
        # A row can only be emitted once it has been read, at most window + chunk rows ahead of it.
        assert all(position >= row - window - 8 for position, row in enumerate(out))


def test_a_missing_manifest_says_how_to_make_one(tmp_path):
    from ray_landmark.data.metadata import open_manifest

    cfg = DataConfig(root=str(tmp_path), storage=StorageConfig(retries=1))
    with pytest.raises(StorageError, match=rf"{tmp_path}/manifest: no complete manifest there.*jobs/prepare_gldv2.py"):
        open_manifest(cfg).view_classes("gldv2c")


# ---------------------------------------------------------------- ranged reads through the shard index


def _read_rows(stream) -> list[tuple[str, str, int]]:
    """(id, md5 of the JPEG bytes, label) of the read stage's rows (``worker_decode``: nothing decoded)."""
    return sorted((str(i), hashlib.md5(j).hexdigest(), int(l)) for b in stream.dataset.iter_batches(batch_size=64)
                  for i, j, l in zip(b["id"], b["jpeg"], b["label"]))


def _read_stage(cfg: DataConfig) -> ShardStream:
    return train_stream(cfg, worker_decode=True)


def test_ranged_reads_give_the_streams_members_bytes_and_skip_counts_on_damaged_shards(damaged_gldv2):
    streamed = _read_stage(_config(damaged_gldv2.root, view="full", ranged_reads=False))
    ranged = _read_stage(_config(damaged_gldv2.root, view="full", range_gap_bytes=0))

    rows = _read_rows(ranged)
    assert rows == _read_rows(streamed)
    # The corrupt JPEG is dropped when decoded, which this read stage does not do.
    assert [i for i, _, _ in rows] == sorted([i for i, _ in damaged_gldv2.good_samples] + [
        damaged_gldv2.corrupt_id])
    streamed_counts, ranged_counts = streamed.counts(), ranged.counts()
    reasons = [*SKIP_REASONS, "not_in_view", "read"]
    assert {r: ranged_counts.get(r, 0) for r in reasons} == {r: streamed_counts.get(r, 0) for r in reasons}
    assert {r: ranged_counts.get(r, 0) for r in SKIP_REASONS} == {**damaged_gldv2.skips, "corrupt_jpeg": 0}
    # Ranged requests skip the tar headers and the members not named like images: fewer bytes than the whole tars.
    assert 0 < ranged_counts["bytes_read"] < streamed_counts["bytes_read"]
    assert "range_requests" not in streamed_counts


def test_ranged_reads_fetch_exactly_the_bytes_of_the_views_images_from_s3(gldv2_s3, s3):
    cfg = _config(gldv2_s3, s3, view="gldv2c", range_gap_bytes=0)
    stream = _read_stage(cfg)
    rows = [(i, len(j)) for b in stream.dataset.iter_batches(batch_size=64) for i, j in zip(b["id"], b["jpeg"])]
    counts = stream.counts()
    assert len(rows) == len(open_manifest(cfg).view_images("gldv2c")) == counts["read"]
    assert counts["bytes_read"] == sum(n for _, n in rows)
    # No gap allowed: a request per image, since tar headers lie between any two members.
    assert counts["range_requests"] == len(rows)

    merged = _read_stage(cfg.model_copy(update={"range_gap_bytes": 2**30}))
    assert sum(len(b["id"]) for b in merged.dataset.iter_batches(batch_size=64)) == len(rows)
    # Any gap allowed: one request per shard, which reads every byte from its first wanted member to its last.
    assert merged.counts()["range_requests"] == SyntheticSpec().train_shards
    assert counts["bytes_read"] < merged.counts()["bytes_read"]


def test_a_range_that_comes_back_short_is_counted_as_a_truncated_tar_and_named(gldv2_local, tmp_path, caplog):
    import pyarrow.fs as pafs

    split = resolve(gldv2_local).child("train")
    path = os.path.join(split.path, gldv2.shard_name(0))
    members = ShardMembers.of(shard_members(split, path))
    cut = len(members.ids) // 2  # the shard changed since it was indexed: it now ends inside this member
    short = tmp_path / gldv2.shard_name(0)
    short.write_bytes(open(path, "rb").read()[: members.offsets[cut] + members.sizes[cut] // 2])
    counts = collections.Counter()

    with pafs.LocalFileSystem().open_input_file(str(short)) as f:
        rows = list(ranged_members(f, members, str(short), None, counts, gap_bytes=0))

    assert [i for i, _, _, _ in rows] == gldv2.u64_to_ids(members.ids[:cut])
    assert counts["truncated_tar"] == 1 and counts["bytes_read"] == sum(len(b) for _, b, _, _ in rows) + (
        members.sizes[cut] // 2)
    cut_id = f"{int(members.ids[cut]):016x}"
    assert f"shard {short} is truncated: image {cut_id} was cut off" in caplog.text


def test_coalesced_requests_stay_inside_the_shard_and_read_every_wanted_member(gldv2_local):
    split = resolve(gldv2_local).child("train")
    members = ShardMembers.of(shard_members(split, os.path.join(split.path, gldv2.shard_name(1))))
    offsets, sizes = members.offsets, members.sizes
    rng = np.random.default_rng(0)
    # The last member listed beyond the shard's end, as in a tar cut off inside it.
    shard_bytes = int(offsets[-1] + sizes[-1] // 2)
    for gap in (0, 600, 5_000, 50_000, 2**40):
        for max_bytes in (1, 20_000, 2**40):
            wanted = sorted({*rng.choice(len(offsets), size=len(offsets) // 3).tolist(), len(offsets) - 1})
            requests = plan_ranges(offsets, sizes, wanted, shard_bytes, gap, max_bytes)
            assert [i for _, _, read in requests for i in read] == wanted
            for (start, end, read), following in zip(requests, [*requests[1:], None]):
                assert 0 <= start <= end <= shard_bytes
                assert start == offsets[read[0]] and end == min(offsets[read[-1]] + sizes[read[-1]], shard_bytes)
                assert end - start <= max_bytes or len(read) == 1
                if following is not None:
                    assert following[0] >= end  # no byte is read twice
                    next_end = min(offsets[following[2][0]] + sizes[following[2][0]], shard_bytes)
                    assert following[0] - end > gap or next_end - start > max_bytes  # not merged: too far
    assert len(plan_ranges(offsets, sizes, list(range(len(offsets))), shard_bytes, 2**40, 2**40)) == 1


def test_an_epoch_given_up_half_way_is_followed_by_a_complete_one_with_ranged_reads(gldv2_s3, s3):
    """What resuming mid-epoch asks of the stream: a new epoch after one abandoned part way delivers every image of
    the view once (the training loop's resume is in tests/test_training.py, on an indexed manifest too)."""
    cfg = _config(gldv2_s3, s3, view="full")
    stream = _read_stage(cfg)
    abandoned = stream.dataset.iter_batches(batch_size=16)
    assert len(next(iter(abandoned))["id"]) == 16
    del abandoned

    ids = [str(i) for b in stream.dataset.iter_batches(batch_size=64) for i in b["id"]]

    expected = gldv2.u64_to_ids(open_manifest(cfg).view_images("full")["id"].to_numpy())
    assert sorted(ids) == sorted(expected)
    assert stream.counts()["range_requests"] > 0


def test_without_an_index_whole_shards_are_streamed_and_that_is_said_once(gldv2_local, tmp_path, capsys):
    root = tmp_path / "unindexed"
    shutil.copytree(gldv2_local, root)
    shutil.rmtree(root / "manifest" / "shards")
    cfg = _config(str(root), view="gldv2c")
    streams = [_read_stage(cfg), _read_stage(cfg)]
    said = capsys.readouterr().out
    assert said.count(f"no shard index in {root}/manifest (train): reading whole shards") == 1
    tars = sum((root / "train" / gldv2.shard_name(i)).stat().st_size for i in range(SyntheticSpec().train_shards))
    assert sum(len(b["id"]) for b in streams[0].dataset.iter_batches(batch_size=64)) > 0
    counts = streams[0].counts()
    assert "range_requests" not in counts and 0.9 * tars < counts["bytes_read"] <= tars


def test_a_shard_rewritten_since_it_was_indexed_is_streamed_whole(gldv2_local, tmp_path):
    root = tmp_path / "rewritten"
    shutil.copytree(gldv2_local, root)
    shard = root / "train" / gldv2.shard_name(0)
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    # The first image moved to the end: every offset moved, and the tar grew (zero blocks after its end, which tar
    # readers ignore). A shard shorter than its index is an error instead (tests/test_bad_input.py).
    shard.write_bytes(gldv2.pack_tar(members[1:] + members[:1]) + bytes(10240))
    stream = _read_stage(_config(str(root), view="full"))

    ids = sorted(str(i) for b in stream.dataset.iter_batches(batch_size=64) for i in b["id"])

    in_tars = []
    for i in range(SyntheticSpec().train_shards):
        with tarfile.open(root / "train" / gldv2.shard_name(i)) as tar:
            in_tars += [os.path.basename(m.name)[:-4] for m in tar if m.isreg()]
    assert ids == sorted(in_tars)
    assert not any(stream.counts().get(reason) for reason in SKIP_REASONS)
