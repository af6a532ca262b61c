"""Which members the tar shards actually hold and where their bytes are, read from the members' headers alone.

A tar member's 512-byte header precedes its data, and a seekable file lets ``tarfile`` jump over the data to the next
header, so listing a 1 GB GLDv2 shard reads a few MB (one ranged request per member on S3). Shards are listed in
parallel threads: the work is waiting on storage, not CPU.

The listing is the split's shard index (``Manifest.shard_index``): one row per regular member with the byte range of
its data, from which the train and eval streams read only the members they need (``pipeline.py``).
"""

from __future__ import annotations

import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

import pyarrow.fs as pafs

from ray_landmark.data import gldv2
from ray_landmark.data.storage import Location, StorageError, with_storage_error
from ray_landmark.errors import JobError

# The shard index's columns: the shard's file name; the member's image id (0 for a member that is not named like a
# GLDv2 image, whose ``name`` is then given; "" for images); where its data starts and how long it is; the shard's size
# when it was listed, and whether the listing reached the tar's end (False: the tar ends inside a header or a member).
INDEX_COLUMNS = ("shard", "id", "name", "offset", "size", "shard_bytes", "shard_complete")


class UnusableShard(JobError, ValueError):
    """A tar shard that cannot be read at all (empty, not a tar, a folder); the message names it."""


@dataclass(frozen=True)
class SplitTars:
    """What a split's folder holds: its tar files (path -> size in bytes) and the folders named like tars."""

    files: dict[str, int]
    folders: list[str]


def split_tars(split: Location, tries: int = 3) -> SplitTars:
    """The ``*.tar`` entries under ``split`` (a missing or empty folder is an error naming it)."""

    def _list():
        if split.fs.get_file_info(split.path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{split.uri} does not exist")
        return split.fs.get_file_info(pafs.FileSelector(split.path, recursive=True))

    entries = with_storage_error(f"listing {split.uri}", _list, split.tries(tries))
    tars = [e for e in entries if e.path.endswith(".tar")]
    found = SplitTars({e.path: e.size for e in sorted(tars, key=lambda e: e.path) if e.is_file},
                      sorted(e.path for e in tars if e.type == pafs.FileType.Directory))
    if not found.files and not found.folders:
        raise StorageError(f"{split.uri}: no *.tar files found; check data.root")
    return found


def split_tar_files(split: Location, tries: int = 3) -> pd.DataFrame:
    """``shard`` (file name) and ``bytes`` of every tar file under ``split``: the tar list a manifest without a shard
    index records. Empty when the split has no tars."""
    try:
        files = split_tars(split, tries).files
    except StorageError:
        files = {}
    return pd.DataFrame({"shard": [os.path.basename(p) for p in files], "bytes": np.array(list(files.values()),
                                                                                       np.int64)})


def image_id_of(member_name: str) -> str | None:
    """The image id of a member named like GLDv2's ``a/b/c/<16 hex>.jpg``; None for any other name."""
    image_id, _, ext = os.path.basename(member_name).partition(".")
    return image_id if ext == "jpg" and gldv2.is_image_id(image_id) else None


class ReadAhead:
    """A tar file as tarfile reads it, its small reads served from one block read ahead: tarfile reads each member's
    header as a seek, a 1-byte read, a 512-byte read and a tell, and every one of those on a pyarrow file is a call
    that gives up the GIL (and a read is a request on S3). Here a header costs one ``read_at``: listing a 62-tar split
    in 32 threads took 4.5 times the CPU of one thread, the threads fighting over the GIL."""

    def __init__(self, f, block: int = 4096):
        self._f, self._size, self._block = f, f.size(), block
        self._pos, self._buffer, self._buffer_at = 0, b"", 0

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = (0, self._pos, self._size)[whence] + offset
        return self._pos

    def read(self, size: int = -1) -> bytes:
        size = self._size - self._pos if size < 0 else size
        start = self._pos - self._buffer_at
        if start < 0 or start + size > len(self._buffer):
            if size > self._block:
                data = self._f.read_at(size, self._pos)
                self._pos += len(data)
                return data
            self._buffer, self._buffer_at, start = self._f.read_at(self._block, self._pos), self._pos, 0
        data = self._buffer[start : start + size]
        self._pos += len(data)
        return data


def shard_members(loc: Location, path: str, tries: int = 3) -> pd.DataFrame:
    """The shard index rows of one tar: its regular members in tar order (a truncated tar: those whose header is
    there, the last one possibly cut off inside its data)."""

    def _list() -> pd.DataFrame:
        rows, complete = [], True
        with loc.fs.open_input_file(path) as f:
            shard_bytes = f.size()
            if shard_bytes == 0:
                raise UnusableShard(f"{loc.uri_of(path)} is empty (0 bytes)")
            try:
                tar = tarfile.open(fileobj=ReadAhead(f), mode="r:")
            except tarfile.ReadError as err:  # not an OSError: tarfile's own
                raise UnusableShard(f"{loc.uri_of(path)} is not a tar ({err})") from None
            with tar:
                try:
                    while (member := tar.next()) is not None:
                        # tarfile keeps every header it read (about 1 KB each); 32 tars listed at once held 260 MB
                        tar.members.clear()
                        if member.isreg():
                            image_id = image_id_of(member.name)
                            rows.append((int(image_id, 16) if image_id else 0, "" if image_id else member.name,
                                         member.offset_data, member.size))
                except tarfile.ReadError:
                    complete = False  # the tar ends inside a header or a member; the readers count truncated_tar
        ids, names, offsets, sizes = zip(*rows) if rows else ((), (), (), ())
        return pd.DataFrame({
            "shard": os.path.basename(path), "id": np.array(ids, np.uint64), "name": list(names),
            "offset": np.array(offsets, np.int64), "size": np.array(sizes, np.int64),
            "shard_bytes": np.int64(shard_bytes), "shard_complete": complete,
        }, columns=list(INDEX_COLUMNS))

    return with_storage_error(f"listing the members of {loc.uri_of(path)}", _list, loc.tries(tries))


def split_shard_index(split: Location, threads: int = 32, tries: int = 3, progress=print,
                      warn=print) -> pd.DataFrame:
    """The shard index of every tar under ``split``, shards in name order, members in tar order. A tar that cannot be
    listed at all (empty, not a tar, a folder named like one) is an ``UnusableShard`` naming every such one; a
    truncated tar is indexed up to where it ends and named in one line (``warn``)."""
    tars = split_tars(split, tries)
    paths = list(tars.files)
    unusable = [f"{split.uri_of(p)} is a folder, not a tar" for p in tars.folders]

    def members_of(path: str) -> pd.DataFrame | None:
        try:
            return shard_members(split, path, tries)
        except UnusableShard as err:
            unusable.append(str(err))
            return None

    found: list[pd.DataFrame] = []
    images = 0  # a running count: summing every listed shard again at each progress line grew with shards x members
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(paths)))) as pool:
        for done, (path, members) in enumerate(zip(paths, pool.map(members_of, paths)), start=1):
            if members is None:
                continue
            found.append(members)
            images += int((members["name"] == "").sum())
            cut_off = (members["offset"] + members["size"] > members["shard_bytes"]).any()
            if not members["shard_complete"].iloc[0] or cut_off:
                warn(f"[verify] WARNING {split.uri_of(path)} is truncated: it ends inside a member "
                     f"after {len(members)} members; training and embedding skip its cut-off end (truncated_tar); "
                     f"replace the file to use all of it")
            if progress and (done % 20 == 0 or done == len(paths)):
                progress(f"verify {split.uri}: {done}/{len(paths)} shards listed, {images:,} images")
    if unusable:
        raise UnusableShard(f"{len(unusable)} unusable shard(s) under {split.uri}: {'; '.join(sorted(unusable))}; "
                            f"replace each with its complete tar (or remove it) and rerun")
    return pd.concat(found, ignore_index=True)


def dataset_shard_index(root: Location, progress=print, warn=print) -> dict[str, pd.DataFrame]:
    """Split -> shard index of every split of the GLDv2 under ``root``: ``prepare_manifests``'s ``shard_index``."""
    return {split: split_shard_index(root.child(split), progress=progress, warn=warn) for split in gldv2.SPLITS}


def dataset_tar_files(root: Location) -> dict[str, pd.DataFrame]:
    """Split -> its tars' names and sizes: ``prepare_manifests``'s ``shard_files`` (without ``--verify-shards``)."""
    return {split: split_tar_files(root.child(split)) for split in gldv2.SPLITS}


def image_ids(index: pd.DataFrame) -> np.ndarray:
    """Sorted unique uint64 ids of the images a shard index lists."""
    return np.unique(index.loc[index["name"] == "", "id"].to_numpy(np.uint64))
