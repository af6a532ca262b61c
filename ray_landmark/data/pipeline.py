"""Ray Data pipelines over the GLDv2 tar shards, streamed from a folder or a bucket with no download step.

    tar shards --read (one task per tar: raw member bytes, label joined by id, view filter)-->
    id, jpeg, label --decode + augment (CPU tasks)--> image uint8[S,S,3], label int64 --> get_dataset_shard

Bad input never stops an epoch: a member that is not a JPEG, an empty one, a corrupt JPEG, the cut-off end of a
truncated tar and ids missing from the metadata are each skipped, logged and counted by reason in ``SampleCounter``,
a small actor that the training loop reads once per epoch. A shard that cannot be opened is retried, then fails the job
with its URI.
"""

from __future__ import annotations

import logging
import os
import tarfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data.datasource import FileBasedDatasource

from ray_landmark.data import gldv2
from ray_landmark.data.config import DataConfig
from ray_landmark.data.metadata import NOT_IN_VIEW, UNKNOWN_ID, LabelLookup, Manifest, open_manifest
from ray_landmark.data.storage import Location, list_files, resolve, with_retries
from ray_landmark.data.transforms import CorruptImage, ImageTransform

log = logging.getLogger(__name__)

# Rows per block emitted by a read task (Ray's own webdataset reader uses 512 too).
READ_BLOCK_ROWS = 256

JPEG_MAGIC = b"\xff\xd8\xff"

# Counter keys: samples dropped by the pipeline, and rows that were read or filtered on purpose.
SKIP_REASONS = ("not_jpeg", "empty_member", "corrupt_jpeg", "truncated_tar", "unknown_id")
READ = "read"  # members handed on to decoding (matched to the view, or every member when there are no labels)
NOT_IN_VIEW_KEY = "not_in_view"  # train images the label view leaves out: expected, not an error


@ray.remote(num_cpus=0)
class SampleCounter:
    """Running totals of what the read and decode tasks saw, by reason."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def add(self, counts: dict[str, int]) -> None:
        for key, n in counts.items():
            self.counts[key] = self.counts.get(key, 0) + n

    def totals(self) -> dict[str, int]:
        return dict(self.counts)


def _report(counter, counts: dict[str, int]) -> None:
    # Waiting for the actor keeps the totals exact when the consumer reads them right after the last batch.
    if counts:
        ray.get(counter.add.remote(counts))


def counts_since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before)) if after.get(k, 0) != before.get(k, 0)}


class GLDv2TarDatasource(FileBasedDatasource):
    """Raw JPEG bytes of the members of GLDv2 tars, one read task per tar, with the label joined by image id."""

    _FILE_EXTENSIONS = ["tar"]

    def __init__(self, paths: list[str], *, location: Location, lookup_ref, counter, tries: int, shuffle):
        super().__init__(paths, filesystem=location.fs, shuffle=shuffle, file_extensions=["tar"])
        self._location = location
        self._lookup_ref = lookup_ref
        self._counter = counter
        self._tries = tries

    def _open_input_source(self, filesystem, path, **open_args):
        return with_retries(
            f"opening shard {self._location.uri_of(path)}",
            lambda: super(GLDv2TarDatasource, self)._open_input_source(filesystem, path, **open_args),
            self._tries,
        )

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        lookup: LabelLookup | None = ray.get(self._lookup_ref) if self._lookup_ref is not None else None
        uri = self._location.uri_of(path)
        ids: list[str] = []
        blobs: list[bytes] = []
        counts: dict[str, int] = {}

        def skip(reason: str, member: str, detail: str = "") -> None:
            counts[reason] = counts.get(reason, 0) + 1
            log.warning("skipped %s in %s: %s %s", member, uri, reason, detail)

        def block() -> pa.Table:
            id_array = np.array(ids)
            if lookup is None:
                labels = np.full(len(ids), -1, np.int64)
                keep = np.ones(len(ids), bool)
            else:
                labels = lookup.classes_of(gldv2.ids_to_u64(ids)) if ids else np.zeros(0, np.int64)
                keep = labels >= 0
                for image_id in id_array[labels == UNKNOWN_ID]:
                    skip("unknown_id", gldv2.member_name(image_id), "(not in the train metadata)")
                n_filtered = int((labels == NOT_IN_VIEW).sum())
                if n_filtered:
                    counts[NOT_IN_VIEW_KEY] = counts.get(NOT_IN_VIEW_KEY, 0) + n_filtered
            counts[READ] = counts.get(READ, 0) + int(keep.sum())
            table = pa.table(
                {
                    "id": pa.array(id_array[keep].tolist(), pa.string()),
                    "jpeg": pa.array([b for b, k in zip(blobs, keep) if k], pa.binary()),
                    "label": pa.array(labels[keep], pa.int64()),
                }
            )
            ids.clear()
            blobs.clear()
            _report(self._counter, counts)
            counts.clear()
            return table

        try:
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    if not member.isreg():
                        continue
                    base = os.path.basename(member.name)
                    image_id, _, ext = base.partition(".")
                    if ext != "jpg" or not gldv2.is_image_id(image_id):
                        skip("not_jpeg", member.name)
                        continue
                    data = tar.extractfile(member).read()
                    if len(data) < member.size:  # tarfile returns what is there when the stream ends early
                        skip("truncated_tar", member.name)
                        break
                    if not data:
                        skip("empty_member", member.name)
                        continue
                    if not data.startswith(JPEG_MAGIC):
                        skip("not_jpeg", member.name, "(no JPEG start-of-image marker)")
                        continue
                    ids.append(image_id)
                    blobs.append(data)
                    if len(ids) == READ_BLOCK_ROWS:
                        yield block()
        except tarfile.ReadError as err:  # the tar ends inside a header or a member
            skip("truncated_tar", path, str(err))
        yield block()


def decode_images(
    batch: dict[str, np.ndarray], *, image_size: int, augment: bool, keep_ids: bool, counter
) -> dict[str, np.ndarray]:
    """map_batches UDF: JPEG bytes -> fixed-size uint8 images; corrupt JPEGs are dropped and counted."""
    transform = ImageTransform(image_size, augment)
    images, keep = [], []
    for i, (image_id, data) in enumerate(zip(batch["id"], batch["jpeg"])):
        try:
            images.append(transform(data))
            keep.append(i)
        except CorruptImage as err:
            log.warning("skipped %s: corrupt_jpeg %s", image_id, err)
    n_corrupt = len(batch["id"]) - len(keep)
    _report(counter, {"corrupt_jpeg": n_corrupt} if n_corrupt else {})
    out = {
        "image": np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8),
        "label": np.asarray(batch["label"])[keep].astype(np.int64),
    }
    if keep_ids:
        out["id"] = np.asarray(batch["id"])[keep]
    return out


@dataclass
class ShardStream:
    """A dataset over the shards of one split, with the counter its tasks report to."""

    dataset: ray.data.Dataset
    counter: "ray.actor.ActorHandle"
    shards: list[str]  # shard URIs

    def counts(self) -> dict[str, int]:
        return ray.get(self.counter.totals.remote())


def _shard_paths(cfg: DataConfig, split: str) -> tuple[Location, list[str]]:
    split_loc = resolve(cfg.root, cfg.storage).child(split)
    return split_loc, list_files(split_loc, ".tar", tries=cfg.storage.retries)


def stream_shards(
    cfg: DataConfig,
    split: str,
    *,
    lookup: LabelLookup | None,
    augment: bool,
    keep_ids: bool,
    shuffle: bool,
) -> ShardStream:
    """The shards of ``split`` as decoded images. With a lookup, rows carry the view's class and other ids are
    dropped; without one, every member is kept with label -1 (index and test images)."""
    loc, paths = _shard_paths(cfg, split)
    counter = SampleCounter.remote()
    datasource = GLDv2TarDatasource(
        paths,
        location=loc,
        lookup_ref=ray.put(lookup) if lookup is not None else None,
        counter=counter,
        tries=cfg.storage.retries,
        # A new shard order every epoch (every execution); the consumer's local buffer shuffles rows.
        shuffle=ray.data.FileShuffleConfig(seed=cfg.seed) if shuffle else None,
    )
    dataset = ray.data.read_datasource(datasource, num_cpus=cfg.read_cpus).map_batches(
        decode_images,
        fn_kwargs=dict(image_size=cfg.image_size, augment=augment, keep_ids=keep_ids, counter=counter),
        batch_size=cfg.decode_batch_size,
        batch_format="numpy",
        num_cpus=cfg.decode_cpus,
    )
    return ShardStream(dataset, counter, [loc.uri_of(p) for p in paths])


def train_stream(cfg: DataConfig, manifest: Manifest | None = None) -> ShardStream:
    """Augmented, shuffled train images of ``cfg.view`` with their class ids."""
    manifest = manifest or open_manifest(cfg)
    return stream_shards(
        cfg, "train", lookup=manifest.label_lookup(cfg.view), augment=cfg.augment, keep_ids=False, shuffle=True
    )


def eval_stream(cfg: DataConfig, split: str, lookup: LabelLookup | None = None) -> ShardStream:
    """Resized (not augmented) images of ``split`` with their image ids; with a lookup (train images as the kNN
    index), only the view's images, with their classes."""
    return stream_shards(cfg, split, lookup=lookup, augment=False, keep_ids=True, shuffle=False)
