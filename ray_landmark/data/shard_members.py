"""Which images the tar shards actually hold, read from the members' headers alone.

A tar member's 512-byte header precedes its data, and a seekable file lets ``tarfile`` jump over the data to the next
header, so listing a 1 GB GLDv2 shard reads a few MB (one ranged request per member on S3). Shards are listed in
parallel threads: the work is waiting on storage, not CPU.
"""

from __future__ import annotations

import os
import tarfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ray_landmark.data import gldv2
from ray_landmark.data.storage import Location, StorageError, list_files, with_retries


def shard_image_ids(loc: Location, path: str, tries: int = 3) -> np.ndarray:
    """uint64 ids of the JPEG members of one tar (a truncated tar: the members before the cut)."""

    def _list() -> list[str]:
        ids = []
        with loc.fs.open_input_file(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            try:
                for member in tar:
                    image_id, _, ext = os.path.basename(member.name).partition(".")
                    if member.isreg() and ext == "jpg" and gldv2.is_image_id(image_id):
                        ids.append(image_id)
            except tarfile.ReadError:
                pass  # the tar ends inside a member; the training reader counts it as truncated_tar
        return ids

    return gldv2.ids_to_u64(with_retries(f"listing the members of {loc.uri_of(path)}", _list, tries))


def split_image_ids(split: Location, threads: int = 32, tries: int = 3, progress=print) -> np.ndarray:
    """Sorted unique uint64 ids of every image in the tar shards under ``split``."""
    paths = list_files(split, ".tar", tries=tries)
    found: list[np.ndarray] = []
    with ThreadPoolExecutor(max_workers=min(threads, len(paths))) as pool:
        for done, ids in enumerate(pool.map(lambda p: shard_image_ids(split, p, tries), paths), start=1):
            found.append(ids)
            if progress and (done % 20 == 0 or done == len(paths)):
                progress(f"verify {split.uri}: {done}/{len(paths)} shards listed, {sum(map(len, found)):,} images")
    if not found:
        raise StorageError(f"{split.uri}: no tar shards to verify")
    return np.unique(np.concatenate(found))
