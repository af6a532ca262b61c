"""The GLDv2 layout (docs/method.md §10.1): file names, image ids and tar members, shared by the reader and the
synthetic writer."""

from __future__ import annotations

import io
import re
import tarfile

import numpy as np

SPLITS = ("train", "index", "test")

# Metadata files relative to the dataset root, as in the official bucket.
TRAIN_CSV = "metadata/train.csv"
TRAIN_CLEAN_CSV = "metadata/train_clean.csv"
LABEL_TO_CATEGORY_CSV = "metadata/train_label_to_category.csv"
INDEX_CSV = "metadata/index.csv"
TEST_CSV = "metadata/test.csv"
INDEX_TO_LANDMARK_CSV = "metadata/index_image_to_landmark.csv"
RECOGNITION_GT_CSV = "ground_truth/recognition_solution_v2.1.csv"
RETRIEVAL_GT_CSV = "ground_truth/retrieval_solution_v2.1.csv"

_ID_RE = re.compile(r"^[0-9a-f]{16}$")


def shard_name(index: int) -> str:
    return f"images_{index:03d}.tar"


def checksum_name(split: str, index: int) -> str:
    return f"md5sum/{split}/md5.images_{index:03d}.txt"


def member_name(image_id: str) -> str:
    """``0123456789abcdef`` -> ``0/1/2/0123456789abcdef.jpg``."""
    return f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def is_image_id(text: str) -> bool:
    return bool(_ID_RE.match(text))


def ids_to_u64(ids) -> np.ndarray:
    """16-hex-character image ids -> uint64 (8 bytes each instead of a ~65-byte Python string)."""
    return np.array([int(i, 16) for i in ids], dtype=np.uint64)


def u64_to_ids(values: np.ndarray) -> list[str]:
    """uint64 -> 16-hex-character image ids, formatted all at once (millions of ids in well under a second)."""
    text = np.asarray(values, dtype=np.uint64).astype(">u8").tobytes().hex()
    return [text[i:i + 16] for i in range(0, len(text), 16)]


def pack_tar(members: list[tuple[str, bytes]]) -> bytes:
    """A tar like GLDv2's: members sorted by name, each preceded by its not-yet-written parent directories."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        dirs_written: set[str] = set()
        for name, data in sorted(members):
            parts = name.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                d = "/".join(parts[:depth])
                if d not in dirs_written:
                    info = tarfile.TarInfo(d + "/")
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
                    dirs_written.add(d)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
