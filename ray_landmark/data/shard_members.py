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

import numpy as np
import pandas as pd

from ray_landmark.data import gldv2
from ray_landmark.data.storage import Location, StorageError, list_files, with_storage_error

# The shard index's columns: the shard's file name; the member's image id (0 for a member that is not named like a
# GLDv2 image, whose ``name`` is then given; "" for images); where its data starts and how long it is; the shard's size
# when it was listed, and whether the listing reached the tar's end (False: the tar ends inside a header or a member).
INDEX_COLUMNS = ("shard", "id", "name", "offset", "size", "shard_bytes", "shard_complete")


def image_id_of(member_name: str) -> str | None:
    """The image id of a member named like GLDv2's ``a/b/c/<16 hex>.jpg``; None for any other name."""
    image_id, _, ext = os.path.basename(member_name).partition(".")
    return image_id if ext == "jpg" and gldv2.is_image_id(image_id) else None


def shard_members(loc: Location, path: str, tries: int = 3) -> pd.DataFrame:
    """The shard index rows of one tar: its regular members in tar order (a truncated tar: those whose header is
    there, the last one possibly cut off inside its data)."""

    def _list() -> pd.DataFrame:
        rows, complete = [], True
        with loc.fs.open_input_file(path) as f:
            shard_bytes = f.size()
            with tarfile.open(fileobj=f, mode="r:") as tar:
                try:
                    for member in tar:
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


def split_shard_index(split: Location, threads: int = 32, tries: int = 3, progress=print) -> pd.DataFrame:
    """The shard index of every tar under ``split``, shards in name order, members in tar order."""
    paths = list_files(split, ".tar", tries=tries)
    found: list[pd.DataFrame] = []
    with ThreadPoolExecutor(max_workers=min(threads, len(paths))) as pool:
        for done, members in enumerate(pool.map(lambda p: shard_members(split, p, tries), paths), start=1):
            found.append(members)
            if progress and (done % 20 == 0 or done == len(paths)):
                images = sum(int((m["name"] == "").sum()) for m in found)
                progress(f"verify {split.uri}: {done}/{len(paths)} shards listed, {images:,} images")
    if not found:
        raise StorageError(f"{split.uri}: no tar shards to verify")
    return pd.concat(found, ignore_index=True)


def dataset_shard_index(root: Location, progress=print) -> dict[str, pd.DataFrame]:
    """Split -> shard index of every split of the GLDv2 under ``root``: ``prepare_manifests``'s ``shard_index``."""
    return {split: split_shard_index(root.child(split), progress=progress) for split in gldv2.SPLITS}


def image_ids(index: pd.DataFrame) -> np.ndarray:
    """Sorted unique uint64 ids of the images a shard index lists."""
    return np.unique(index.loc[index["name"] == "", "id"].to_numpy(np.uint64))
