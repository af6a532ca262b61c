"""Ray Data pipelines over the GLDv2 tar shards, read from a folder or a bucket with no download step.

    tar shards --one task per tar: read (raw member bytes, label joined by id, view filter), then decode + augment
    each block of data.decode_batch_size rows--> image uint8[S,S,3], label int64 --> get_dataset_shard

Ray Data fuses the read and the decode into one task (``stream_shards``), so each task streams its tar and decodes what
it reads, as a DataLoader worker does; the JPEG bytes never pass through the object store.

How a read task reads its tar: where the manifest has the split's shard index (``jobs/prepare_gldv2.py
--verify-shards``; ``shard_members.py``) and ``data.ranged_reads`` is on, it fetches only the members the stream needs,
by ranged requests, neighbours closer than ``data.range_gap_bytes`` in one request; members outside the view cost
nothing. Without an index it streams the whole tar and drops the members outside the view after their bytes have come
in (under GLDv2c, about 60 % of GLDv2's train bytes). Both give the same rows, counts and per-epoch shard order;
each task reports the bytes it read.

With ``data.decode: gpu`` (or ``worker``, or ``auto`` on GPU workers) the stream stops after the read stage and each
training or embedding worker decodes its own batches on its device (``worker_decode.py``): ``train_batches`` and
``images_on_device`` below give the workers the same images either way.

Bad input never stops an epoch: a member that is not a JPEG, an empty one, a corrupt JPEG, the cut-off end of a
truncated tar (with ranged reads: a range that comes back short of the member) and ids missing from the metadata are
each skipped, logged and counted by reason in the stream's tally of a ``SampleCounter`` (``data/counts.py``), a
small actor that the training loop reads once per epoch. A request to object storage that fails is retried by the S3 filesystem alone
(``data.storage.retries`` tries, ``storage.s3_filesystem``); a shard that still cannot be read fails the job with
its URI. Before any of that, a stream's shards are compared with what the manifest expects (``split_shards``): a
listed shard that is missing, empty, a folder or shorter than its index fails the job at once naming it, or with
``data.missing_shards: skip`` is left out and named.
"""

from __future__ import annotations

import collections
import logging
import os
import tarfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
import ray.data
from ray.data.datasource import FileBasedDatasource

from ray_landmark.data import gldv2
from ray_landmark.data.config import DataConfig
from ray_landmark.data.counts import StreamCounter, stream_counter
from ray_landmark.data.epoch_rows import StreamRows, is_set, stream_rows
from ray_landmark.data.jpeg import CorruptImage, Preprocessing, decode_resized
from ray_landmark.errors import ConfigError, JobError
from ray_landmark.data.metadata import (
    NOT_IN_VIEW, UNKNOWN_ID, LabelLookup, Manifest, complete_manifest, open_manifest,
)
from ray_landmark.data.shard_members import image_id_of, split_tars
from ray_landmark.data.storage import Location, resolve, with_storage_error
from ray_landmark.progress import say


log = logging.getLogger(__name__)

# Rows per block emitted by a read task that only reads (the workers decode): about 30 MB of GLDv2's ~120 KB JPEGs.
READ_BLOCK_ROWS = 256

JPEG_MAGIC = b"\xff\xd8\xff"
# The label of rows read without a lookup (every member of the split is kept).
UNLABELLED = -3

# Counter keys: samples dropped by the pipeline, and rows that were read or filtered on purpose.
SKIP_REASONS = ("not_jpeg", "empty_member", "corrupt_jpeg", "truncated_tar", "unknown_id")
READ = "read"  # members handed on to decoding (matched to the view, or every member when there are no labels)
NOT_IN_VIEW_KEY = "not_in_view"  # train images the label view leaves out: expected, not an error
BYTES_READ = "bytes_read"  # bytes fetched from the shards: whole tars when streaming, the ranges when not
RANGE_REQUESTS = "range_requests"  # ranged requests made (ranged reads only)
TRAINED_EARLIER = "trained_before_resume"  # rows of a resumed epoch that its checkpoint says were trained: left out

# One ranged request reads at most this much unless one member is longer: a read task holds one range at a time, and
# Ray Data's own streaming reads buffer as much (DataContext.streaming_read_buffer_size).
RANGE_MAX_BYTES = 32 * 2**20


class GLDv2TarDatasource(FileBasedDatasource):
    """Raw JPEG bytes of the members of GLDv2 tars, one read task per tar, with the label and the ``row`` of the train
    ids joined by image id, or with ``split_name`` that name as ``split`` instead (eval rows). With ``epoch_rows`` (a
    ``StreamRows``) each task leaves out the rows it names as trained before a resume."""

    _FILE_EXTENSIONS = ["tar"]

    def __init__(
        self, paths: list[str], *, location: Location, lookup_ref, counter, tries: int, shuffle_files, shuffle_rows: int,
        split_name: str | None = None, shard_index: dict | None = None, range_gap_bytes: int = 0,
        block_rows: int = READ_BLOCK_ROWS, epoch_rows=None,
    ):
        super().__init__(paths, filesystem=location.fs, shuffle=shuffle_files, file_extensions=["tar"])
        # One retry layer, the S3 filesystem's (storage.s3_filesystem): Ray Data's own, which reopens and rereads a
        # file up to 10 times on errors its DataContext.retried_io_errors matches, is off for this datasource only.
        self._data_context = self._data_context.copy()
        self._data_context.retried_io_errors = []
        self._split_name = split_name
        self._shuffle_rows = shuffle_rows
        self._location = location
        self._lookup_ref = lookup_ref
        self._counter = counter
        self._tries = tries
        self._shard_index = shard_index or {}  # shard file name -> ObjectRef of its ShardMembers
        self._range_gap_bytes = range_gap_bytes
        self._block_rows = block_rows
        self._epoch_rows = epoch_rows

    def _open_input_source(self, filesystem, path, **open_args):
        # Our filesystem, not Ray Data's retrying wrapper of it (``filesystem``): see __init__.
        fs = self._location.fs
        if os.path.basename(path) in self._shard_index:
            open_shard = lambda: fs.open_input_file(path)  # noqa: E731 (random access, for ranged reads)
        else:
            open_shard = lambda: super(GLDv2TarDatasource, self)._open_input_source(fs, path, **open_args)  # noqa: E731
        return with_storage_error(f"opening shard {self._location.uri_of(path)}", open_shard,
                                  self._location.tries(self._tries))

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        lookup: LabelLookup | None = ray.get(self._lookup_ref) if self._lookup_ref is not None else None
        counts: collections.Counter = collections.Counter()
        uri, shard = self._location.uri_of(path), os.path.basename(path)
        members = ray.get(self._shard_index[shard]) if shard in self._shard_index else None
        # Fixed for the whole execution: it changes only before a worker group starts reading (data/epoch_rows.py).
        excluded = self._epoch_rows.excluded_rows() if self._epoch_rows is not None else None
        if members is not None and f.size() != members.shard_bytes:
            log.warning("shard %s has %d bytes, its shard index %d: streaming it whole; rerun jobs/prepare_gldv2.py "
                        "--verify-shards to index it again", uri, f.size(), members.shard_bytes)
            f, members = pa.BufferedInputStream(f, RANGE_MAX_BYTES), None
        if members is not None:
            rows = ranged_members(f, members, uri, lookup, counts, self._range_gap_bytes, excluded)
        else:
            rows = self._labelled_members(f, uri, lookup, counts, excluded)
        for chunk in windowed_shuffle(rows, self._block_rows, self._shuffle_rows, np.random.default_rng()):
            counts[READ] += len(chunk)
            self._counter.add(dict(counts))
            counts.clear()
            ids, blobs, labels, view_rows = zip(*chunk)
            yield pa.table(
                {
                    "id": pa.array(ids, pa.string()),
                    "jpeg": pa.array(blobs, pa.binary()),
                    **({"label": pa.array(labels, pa.int64()), "row": pa.array(view_rows, pa.int64())}
                       if self._split_name is None
                       else {"split": pa.array([self._split_name] * len(ids), pa.string())}),
                    "shard": pa.array([shard] * len(ids), pa.string()),  # which tar: the embedding job's unit of work
                }
            )
        self._counter.add(dict(counts))  # skips after the last chunk

    @staticmethod
    def _labelled_members(
        f, uri: str, lookup: LabelLookup | None, counts, excluded: np.ndarray | None
    ) -> Iterator[tuple[str, bytes, int, int]]:
        """(id, JPEG bytes, class, row) of the tar's usable members in the view, less the ``excluded`` rows (packed
        bits); everything else is counted."""

        skip, truncated = _skip_loggers(uri, counts)
        last_id = None
        f = _CountingReader(f)
        try:
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    if not member.isreg():
                        continue
                    image_id = image_id_of(member.name)
                    if image_id is None:
                        skip("not_jpeg", member.name)
                        continue
                    last_id = image_id
                    row = lookup.row_of(image_id) if lookup is not None else -1
                    label = lookup.class_at(row) if lookup is not None else UNLABELLED
                    if label == NOT_IN_VIEW:
                        counts[NOT_IN_VIEW_KEY] += 1  # filtered on purpose, but its bytes come over the wire anyway
                        continue
                    if excluded is not None and row >= 0 and is_set(excluded, np.int64(row)):
                        counts[TRAINED_EARLIER] += 1
                        continue
                    data = tar.extractfile(member).read()
                    if len(data) < member.size:  # tarfile returns what is there when the stream ends early
                        truncated(f"image {image_id} was cut off")
                        return
                    if _usable(member.name, data, label, skip):
                        yield image_id, data, label, row
        except tarfile.ReadError as err:  # the tar ends inside a header or a member
            truncated(f"it ends after image {last_id} ({err})" if last_id else str(err))
        finally:
            counts[BYTES_READ] += f.bytes_read


class _CountingReader:
    """A stream that counts the bytes read through it (tarfile reads a stream in 10 KB records)."""

    def __init__(self, f):
        self.f, self.bytes_read = f, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.bytes_read += len(data)
        return data


def _skip_loggers(uri: str, counts: collections.Counter):
    """``skip(reason, member, detail)`` and ``truncated(detail)``: count and log one dropped member or a cut-off shard."""

    def skip(reason: str, member: str, detail: str = "") -> None:
        counts[reason] += 1
        log.warning("skipped %s in %s: %s %s", member, uri, reason, detail)

    def truncated(detail: str) -> None:
        counts["truncated_tar"] += 1
        log.warning("shard %s is truncated: %s; the rest of the shard is lost", uri, detail)

    return skip, truncated


def _usable(member: str, data: bytes, label: int, skip) -> bool:
    """Whether a member's complete bytes go on to decoding; if not, it is skipped by reason."""
    if not data:
        skip("empty_member", member)
    elif not data.startswith(JPEG_MAGIC):
        skip("not_jpeg", member, "(no JPEG start-of-image marker)")
    elif label == UNKNOWN_ID:
        skip("unknown_id", member, "(no row in the split's metadata)")
    else:
        return True
    return False


@dataclass(frozen=True)
class ShardMembers:
    """One shard's rows of the shard index, in tar order, as its read task gets them."""

    ids: np.ndarray  # uint64; 0 where ``names`` gives a member not named like an image
    names: list[str]  # "" for images
    offsets: np.ndarray  # int64, where each member's data starts
    sizes: np.ndarray  # int64
    shard_bytes: int  # the shard's size when it was listed
    complete: bool  # the listing reached the tar's end

    @classmethod
    def of(cls, rows: pd.DataFrame) -> "ShardMembers":
        return cls(rows["id"].to_numpy(np.uint64), rows["name"].tolist(), rows["offset"].to_numpy(np.int64),
                   rows["size"].to_numpy(np.int64), int(rows["shard_bytes"].iloc[0]),
                   bool(rows["shard_complete"].iloc[0]))


def plan_ranges(
    offsets: np.ndarray, sizes: np.ndarray, wanted: list[int], shard_bytes: int, gap_bytes: int,
    max_bytes: int = RANGE_MAX_BYTES,
) -> list[tuple[int, int, list[int]]]:
    """(start, end, members) of the ranged requests that read the ``wanted`` members (positions, in tar order): a
    member joins the request before it when the bytes between them are at most ``gap_bytes`` and the request stays
    within ``max_bytes``. No request reaches past ``shard_bytes``: a member listed beyond the shard's end (a truncated
    tar) is read up to that end and comes back short."""
    ranges: list[tuple[int, int, list[int]]] = []
    for i in wanted:
        start = min(int(offsets[i]), shard_bytes)
        end = min(int(offsets[i] + sizes[i]), shard_bytes)
        if ranges and start - ranges[-1][1] <= gap_bytes and end - ranges[-1][0] <= max_bytes:
            ranges[-1] = (ranges[-1][0], end, [*ranges[-1][2], i])
        else:
            ranges.append((start, end, [i]))
    return ranges


def ranged_members(
    f, members: ShardMembers, uri: str, lookup: LabelLookup | None, counts, gap_bytes: int,
    excluded: np.ndarray | None = None,
) -> Iterator[tuple[str, bytes, int, int]]:
    """What ``_labelled_members`` gives from streaming the tar, read from the random-access file ``f`` through its
    shard index: only the members in the view (and those the metadata lacks, to be counted), less the ``excluded``
    rows, are fetched, and every member is counted as streaming counts it, in tar order. A range that comes back short
    of a member is the ranged form of a truncated tar: counted, named, and the rest of the shard is lost."""
    skip, truncated = _skip_loggers(uri, counts)
    rows = lookup.rows_of(members.ids) if lookup is not None else np.full(len(members.ids), -1)
    labels = lookup.classes_at(rows) if lookup is not None else np.full(len(members.ids), UNLABELLED)
    trained = is_set(excluded, np.maximum(rows, 0)) & (rows >= 0) if excluded is not None else \
        np.zeros(len(rows), bool)
    wanted = [i for i, (name, label) in enumerate(zip(members.names, labels))
              if not name and label != NOT_IN_VIEW and not trained[i]]
    requests = plan_ranges(members.offsets, members.sizes, wanted, members.shard_bytes, gap_bytes)
    request_of = {i: r for r, (_, _, read) in enumerate(requests) for i in read}
    current, start, data = -1, 0, b""
    last_id = None
    for i, (name, label) in enumerate(zip(members.names, labels)):
        if name:
            skip("not_jpeg", name)
            continue
        image_id = f"{int(members.ids[i]):016x}"
        last_id = image_id
        if label == NOT_IN_VIEW:
            counts[NOT_IN_VIEW_KEY] += 1  # filtered on purpose, before reading its bytes
            continue
        if trained[i]:
            counts[TRAINED_EARLIER] += 1
            continue
        if request_of[i] != current:
            current = request_of[i]
            start, end, _ = requests[current]
            data = f.read_at(end - start, start) if end > start else b""
            counts[BYTES_READ] += len(data)
            counts[RANGE_REQUESTS] += int(end > start)
        first = int(members.offsets[i]) - start
        blob = data[first : first + int(members.sizes[i])]
        if len(blob) < members.sizes[i]:
            truncated(f"image {image_id} was cut off: {len(blob)} of its {members.sizes[i]} bytes came back")
            return
        if _usable(gldv2.member_name(image_id), blob, int(label), skip):
            yield image_id, blob, int(label), int(rows[i])
    if not members.complete:  # the listing stopped inside a header: streaming would stop there too
        truncated(f"it ends after image {last_id}" if last_id else "no member is complete")


def windowed_shuffle(rows: Iterator, chunk: int, window: int, rng: np.random.Generator) -> Iterator[list]:
    """Lists of ``chunk`` rows. With a window, each list is drawn at random from the next ``window + chunk`` rows, so
    a row moves up to ``window`` places; without one, rows keep their order."""
    buffer: list = []
    for row in rows:
        buffer.append(row)
        if len(buffer) >= window + chunk:
            picked = set(rng.choice(len(buffer), chunk, replace=False).tolist()) if window else set(range(chunk))
            yield [buffer[i] for i in rng.permutation(sorted(picked))] if window else buffer[:chunk]
            buffer = [r for i, r in enumerate(buffer) if i not in picked]
    if window:
        buffer = [buffer[i] for i in rng.permutation(len(buffer))]
    for start in range(0, len(buffer), chunk):
        yield buffer[start : start + chunk]


def decode_images(
    batch: dict[str, np.ndarray], *, image_size: int, preprocessing: Preprocessing, augment: bool, keep_ids: bool,
    counter,
) -> dict[str, np.ndarray]:
    """map_batches UDF: JPEG bytes -> fixed-size uint8 images; corrupt JPEGs are dropped and counted. Eval rows carry
    their ``split`` name (test, index, train) instead of a class."""
    images, keep = [], []
    for i, (image_id, data) in enumerate(zip(batch["id"], batch["jpeg"])):
        try:
            images.append(decode_resized(data, image_size, preprocessing))
            keep.append(i)
        except CorruptImage as err:
            log.warning("skipped %s: corrupt_jpeg %s", image_id, err)
    n_corrupt = len(batch["id"]) - len(keep)
    counter.add({"corrupt_jpeg": n_corrupt} if n_corrupt else {})
    stacked = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
    if augment and images:
        # Imported here, in the tasks that augment: torch costs a fresh task process seconds of imports, and every
        # process that unpickles a stream (Ray Data's split coordinators, Ray Train's dataset manager) imports this
        # module.
        from ray_landmark.data.transforms import TrainAugmentation, augment_hwc

        stacked = augment_hwc(stacked, TrainAugmentation())
    out = {"image": stacked}
    if "label" in batch:
        out["label"] = np.asarray(batch["label"])[keep].astype(np.int64)
        if "row" in batch:
            out["row"] = np.asarray(batch["row"])[keep]
    else:
        out["split"] = np.asarray(batch["split"])[keep]
    if keep_ids:
        out["id"] = np.asarray(batch["id"])[keep]
        out["shard"] = np.asarray(batch["shard"])[keep]
    return out


@dataclass
class ShardStream:
    """A dataset over the shards of one split, with the counter its tasks report to."""

    dataset: ray.data.Dataset
    counter: StreamCounter
    skipped_shards: dict[str, str] | None = None  # shard -> why it is left out (data.missing_shards: skip)
    epoch_rows: StreamRows | None = None  # the train stream's ledger of trained rows (data/epoch_rows.py)

    def counts(self) -> dict[str, int]:
        return self.counter.totals()


class ShardError(JobError, OSError):
    """A tar shard the manifest lists that is missing, empty, a folder or shorter than its shard index; the message
    names it and what to do."""


@dataclass(frozen=True)
class SplitShards:
    """A split's tar shards as found against what the manifest expects (``Manifest.expected_shards``)."""

    location: Location
    paths: list[str]  # the usable tars' filesystem paths, sorted
    skipped: dict[str, str]  # shard file name -> why it is left out (data.missing_shards: skip)

    def summary(self) -> str:
        """``train_001.tar (missing), train_002.tar (empty, 0 bytes)``."""
        return ", ".join(f"{name} ({why})" for name, why in sorted(self.skipped.items()))


_said_skipping: set[str] = set()


def split_shards(cfg: DataConfig, split: str, printer=say) -> SplitShards:
    """The split's usable tar shards. Each shard the manifest expects (its shard index, or the tar list
    ``prepare_gldv2`` records) must be a file at least as long as when it was listed; a missing, empty or shorter
    one, or a folder named like a tar, is a ShardError naming them (``data.missing_shards: error``), or is left out
    and named once (``skip``). Found before any Ray task reads a byte."""
    loc = resolve(cfg.root, cfg.storage).child(split)
    tars = split_tars(loc, tries=cfg.storage.retries)
    manifest = complete_manifest(cfg)
    expected = (manifest.expected_shards(split) if manifest else None) or {}
    by_name = {os.path.basename(p): p for p in tars.files}
    problems = {os.path.basename(p): "a folder, not a tar" for p in tars.folders}
    for name, size in ((os.path.basename(p), size) for p, size in tars.files.items()):
        if size == 0:
            problems[name] = "empty, 0 bytes"
        elif size < expected.get(name, 0):
            problems[name] = f"{size} bytes, shorter than the {expected[name]} the manifest recorded"
    for name in expected:
        if name not in by_name and name not in problems:
            problems[name] = "missing"
    usable = [p for name, p in by_name.items() if name not in problems]
    if problems and (cfg.missing_shards == "error" or not usable):
        listed = ", ".join(f"{loc.uri}/{name} ({why})" for name, why in sorted(problems.items())[:3])
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        remedy = ("restore them (or rerun jobs/prepare_gldv2.py if they changed on purpose), or set "
                  "data.missing_shards: skip to go on without them") if usable else \
            "no usable shard is left: check data.root"
        raise ShardError(f"data.root: {len(problems)} {split} shard(s) unusable: {listed}{more}; {remedy}")
    found = SplitShards(loc, sorted(usable), dict(sorted(problems.items())))
    if found.skipped and f"{loc.uri}:{found.summary()}" not in _said_skipping:
        _said_skipping.add(f"{loc.uri}:{found.summary()}")
        printer(f"[data] WARNING skipping {len(found.skipped)} {split} shard(s) of {loc.uri} "
                f"(data.missing_shards: skip): {found.summary()}")
    return found


def shard_paths(cfg: DataConfig, split: str) -> tuple[Location, list[str]]:
    """The split's location and the filesystem paths of its usable tar shards, sorted (``split_shards``)."""
    found = split_shards(cfg, split)
    return found.location, found.paths


_said_streaming: set[str] = set()


def shard_index_refs(cfg: DataConfig, split: str, shards: set[str]) -> dict[str, "ray.ObjectRef"]:
    """Shard file name -> object-store reference of its ``ShardMembers``, for the ``shards`` the split's shard index
    lists; empty (whole shards are streamed, which is said once per manifest and split) without an index or with
    ``data.ranged_reads: false``."""
    if not cfg.ranged_reads:
        return {}
    manifest = complete_manifest(cfg)  # streaming a split needs no manifest; only its index does
    index = manifest.shard_index(split) if manifest else None
    if index is None:
        where = f"{cfg.manifest_uri} ({split})"
        if where not in _said_streaming:
            _said_streaming.add(where)
            say(f"[data] no shard index in {where}: reading whole shards; jobs/prepare_gldv2.py --verify-shards "
                f"writes one, so that only the images in use are read")
        return {}
    index = index[index["shard"].isin(shards)]
    return {shard: ray.put(ShardMembers.of(rows)) for shard, rows in index.groupby("shard", sort=False)}


def stream_shards(
    cfg: DataConfig,
    split: str,
    *,
    lookup: LabelLookup | None,
    augment: bool,
    keep_ids: bool,
    shuffle: bool,
    split_column: bool = False,
    only_shards: set[str] | None = None,
    worker_decode: bool = False,
    epoch_rows=None,
) -> ShardStream:
    """The shards of ``split`` (or those named in ``only_shards``) as decoded images, or with ``worker_decode`` as
    the read stage's rows (``id``, ``jpeg`` bytes, ``shard``) for the consuming workers to decode. With a lookup, only
    the ids it selects are kept (with the split's shard index, only their bytes are read; without it, every member's
    bytes are read and the others dropped); without one, every member is kept. Rows carry the lookup's class as
    ``label`` and the image's ``row`` among the train ids, or with ``split_column`` the split's name as ``split``.
    ``epoch_rows`` (a ``StreamRows``) leaves out the rows a resumed epoch trained before its checkpoint."""
    shards = split_shards(cfg, split)
    loc, paths = shards.location, shards.paths
    if only_shards is not None:
        paths = [p for p in paths if os.path.basename(p) in only_shards]
    counter = stream_counter()
    index = shard_index_refs(cfg, split, {os.path.basename(p) for p in paths})
    datasource = GLDv2TarDatasource(
        paths,
        location=loc,
        lookup_ref=ray.put(lookup) if lookup is not None else None,
        counter=counter,
        tries=cfg.storage.retries,
        # A new shard order every epoch (every execution), and rows shuffled in a window of each tar's raw members:
        # cheaper than a buffer of decoded images at the trainer (an S×S×3 image is several times its JPEG).
        shuffle_files=ray.data.FileShuffleConfig(seed=cfg.seed) if shuffle else None,
        shuffle_rows=cfg.shuffle_buffer if shuffle else 0,
        split_name=split if split_column else None,
        shard_index=index,
        range_gap_bytes=cfg.range_gap_bytes,
        # Decoding in Ray Data: blocks of one decode batch, decoded whole by a map with the read's resources, which Ray
        # fuses into the read task: two stages cost more CPU per image (BENCHMARKS.md).
        block_rows=READ_BLOCK_ROWS if worker_decode else cfg.decode_batch_size,
        epoch_rows=epoch_rows,
    )
    # One read task per tar, its blocks as the task makes them: Ray Data otherwise splits them to reach its own target
    # number of blocks, and a split read fuses with nothing.
    tasks = dict(override_num_blocks=len(paths))
    skipped = shards.skipped if only_shards is None else {k: v for k, v in shards.skipped.items() if k in only_shards}
    if worker_decode:  # the read stage's rows go to the workers as they are
        return ShardStream(ray.data.read_datasource(datasource, num_cpus=cfg.read_cpus, **tasks), counter, skipped,
                           epoch_rows)
    dataset = ray.data.read_datasource(datasource, num_cpus=cfg.decode_cpus, **tasks).map_batches(
        decode_images,
        fn_kwargs=dict(
            image_size=cfg.image_size, preprocessing=cfg.preprocessing, augment=augment, keep_ids=keep_ids,
            counter=counter,
        ),
        batch_size=None,
        batch_format="numpy",
        num_cpus=cfg.decode_cpus,
    )
    return ShardStream(dataset, counter, skipped, epoch_rows)


def train_stream(cfg: DataConfig, manifest: Manifest | None = None, worker_decode: bool = False) -> ShardStream:
    """Augmented, shuffled train images of ``cfg.view`` with their class ids and rows (their JPEGs with
    ``worker_decode``), and the ledger (``StreamRows``) that lets a resumed epoch stream exactly its untrained rows."""
    manifest = manifest or open_manifest(cfg)
    lookup = manifest.label_lookup(cfg.view)
    # On the driver's node, as the counter: it must outlive the worker groups and nodes that training loses.
    epoch_rows = stream_rows(len(lookup.ids), lookup.digest())
    return stream_shards(
        cfg, "train", lookup=lookup, augment=cfg.augment, keep_ids=False, shuffle=True, worker_decode=worker_decode,
        epoch_rows=epoch_rows,
    )


def eval_stream(
    cfg: DataConfig, split: str, selection: LabelLookup | None = None, only_shards: set[str] | None = None,
    worker_decode: bool = False,
) -> ShardStream:
    """Resized (not augmented) images of ``split`` (their JPEGs with ``worker_decode``) with their ids, shard and a
    ``split`` column; ``selection`` (from ``Manifest.eval_selection`` or a view's label lookup) keeps only the ids it
    selects."""
    return stream_shards(
        cfg, split, lookup=selection, augment=False, keep_ids=True, shuffle=False, split_column=True,
        only_shards=only_shards, worker_decode=worker_decode,
    )


# ---------------------------------------------------------------- the consuming workers' side


def decodes_in_worker(cfg: DataConfig, worker_has_gpu: bool, gpu_setting: str = "train.use_gpu: true") -> bool:
    """``data.decode`` for workers with or without a GPU: True when the workers decode their own batches."""
    if cfg.decode == "gpu" and not worker_has_gpu:
        raise ConfigError(f"data.decode: gpu needs workers with a GPU ({gpu_setting}); use data.decode: worker to "
                          f"decode on the workers' CPUs, or cpu to decode in Ray Data tasks")
    return cfg.decode in ("gpu", "worker") or (cfg.decode == "auto" and worker_has_gpu)
